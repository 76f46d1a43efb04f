/* pipewright — CUDA devices, stage memory and streams, completion into a
 * libevent loop. Contract in device.h.
 *
 * Plain C against the CUDA runtime API (cuda_runtime_api.h is C): only the
 * kernels need nvcc (ops.cu).
 */
#define _GNU_SOURCE /* pipe2 */
#include "stages/ops/cuda/device.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cuda_runtime_api.h>
#include <event2/event.h>

#include "runtime/log.h"

/* ---------------------------------------------------------------- devices */

pw_status pw_cuda_device_count(int *count)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n < 1) {
        *count = 0;
        /* A failed query leaves a sticky "last error" in the runtime; clear
         * it so a later, unrelated check does not report it. */
        (void)cudaGetLastError();
        return pw_error(PW_ERR_UNSUPPORTED, "no CUDA device: %s",
                        e != cudaSuccess ? cudaGetErrorString(e)
                                         : "the runtime reports 0 devices");
    }
    *count = n;
    return PW_OK;
}

/* PW_OK when `dev` names an existing device; the error otherwise. */
static pw_status check_device(int dev)
{
    int n;
    PW_CHECK(pw_cuda_device_count(&n));
    if (dev < 0 || dev >= n)
        return pw_error(PW_ERR_INVALID_ARG, "CUDA device %d does not exist (%d device%s)", dev,
                        n, n == 1 ? "" : "s");
    return PW_OK;
}

static pw_status cuda_fail(cudaError_t e, const char *what)
{
    (void)cudaGetLastError();
    return pw_error(e == cudaErrorMemoryAllocation ? PW_ERR_NOMEM : PW_ERR_INTERNAL, "%s: %s",
                    what, cudaGetErrorString(e));
}

#define CUDA_TRY(call, what)                                                  \
    do {                                                                      \
        cudaError_t e_ = (call);                                              \
        if (e_ != cudaSuccess) return cuda_fail(e_, what);                    \
    } while (0)

pw_status pw_cuda_device_query(int dev, pw_cuda_device_info *out)
{
    PW_CHECK(check_device(dev));
    struct cudaDeviceProp prop;
    CUDA_TRY(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
    memset(out, 0, sizeof *out);
    out->index = dev;
    snprintf(out->name, sizeof out->name, "%s", prop.name);
    out->total_mem = prop.totalGlobalMem;
    out->cc_major = prop.major;
    out->cc_minor = prop.minor;
    out->sm_count = prop.multiProcessorCount;
    /* cudaMemGetInfo reports on the current device: switch, then restore,
     * so a query leaves the calling thread's device alone. */
    size_t free_b = 0, total_b = 0;
    int prev = 0;
    CUDA_TRY(cudaGetDevice(&prev), "cudaGetDevice");
    CUDA_TRY(cudaSetDevice(dev), "cudaSetDevice");
    cudaError_t e = cudaMemGetInfo(&free_b, &total_b);
    (void)cudaSetDevice(prev);
    if (e != cudaSuccess) return cuda_fail(e, "cudaMemGetInfo");
    out->free_mem = free_b;
    return PW_OK;
}

pw_status pw_cuda_device_pci(int dev, char *buf, size_t n)
{
    if (!buf || n < 16) return pw_error(PW_ERR_INVALID_ARG, "pw_cuda_device_pci: a buffer of 16 bytes is needed");
    buf[0] = '\0';
    PW_CHECK(check_device(dev));
    char id[64];
    CUDA_TRY(cudaDeviceGetPCIBusId(id, (int)sizeof id, dev), "cudaDeviceGetPCIBusId");
    /* "0000:11:00.0" or "00000000:11:00.0", upper case hex: the same
     * address in hwloc's spelling, so it compares as a string too. */
    unsigned domain, bus, device, func;
    if (sscanf(id, "%x:%x:%x.%x", &domain, &bus, &device, &func) != 4)
        return pw_error(PW_ERR_INTERNAL, "CUDA device %d: unexpected PCI bus id '%s'", dev, id);
    snprintf(buf, n, "%04x:%02x:%02x.%01x", domain, bus, device, func);
    return PW_OK;
}

/* ---------------------------------------------------------------- buffers */

pw_status pw_cuda_malloc(int dev, size_t bytes, void **dptr)
{
    *dptr = NULL;
    PW_CHECK(check_device(dev));
    CUDA_TRY(cudaSetDevice(dev), "cudaSetDevice");
    cudaError_t e = cudaMalloc(dptr, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        *dptr = NULL;
        (void)cudaGetLastError();
        return pw_error(PW_ERR_NOMEM, "cudaMalloc of %zu bytes on device %d: %s", bytes, dev,
                        cudaGetErrorString(e));
    }
    return PW_OK;
}

void pw_cuda_free(void *dptr)
{
    if (dptr) (void)cudaFree(dptr);
}

pw_status pw_cuda_message_alloc(int dev, size_t bytes, void **dptr)
{
    PW_CHECK(pw_cuda_malloc(dev, bytes, dptr));
    /* Zeroed like a host arena; the stages' non-blocking streams do not
     * wait for the legacy stream, so wait here (once, at creation). */
    if (cudaMemset(*dptr, 0, bytes) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
        cudaError_t e = cudaGetLastError();
        pw_cuda_free(*dptr);
        *dptr = NULL;
        return pw_error(PW_ERR_INTERNAL, "zeroing %zu bytes of messages on device %d: %s", bytes, dev,
                        cudaGetErrorString(e));
    }
    return PW_OK;
}

/* The stages' streams are non-blocking: they do not wait for the legacy
 * stream that cudaMemcpy / cudaMemset use. So these helpers wait for the
 * whole device before and after, which is what a test or a setup step wants
 * (and why they never belong in the step loop). */
pw_status pw_cuda_upload(void *dst, const void *src, size_t bytes)
{
    if (!bytes) return PW_OK;
    CUDA_TRY(cudaDeviceSynchronize(), "upload");
    CUDA_TRY(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "upload");
    CUDA_TRY(cudaDeviceSynchronize(), "upload");
    return PW_OK;
}

pw_status pw_cuda_download(void *dst, const void *src, size_t bytes)
{
    if (!bytes) return PW_OK;
    CUDA_TRY(cudaDeviceSynchronize(), "download");
    CUDA_TRY(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "download");
    return PW_OK;
}

pw_status pw_cuda_memset(void *dptr, int byte, size_t bytes)
{
    if (!bytes) return PW_OK;
    CUDA_TRY(cudaDeviceSynchronize(), "cudaMemset");
    CUDA_TRY(cudaMemset(dptr, byte, bytes), "cudaMemset");
    CUDA_TRY(cudaDeviceSynchronize(), "cudaMemset");
    return PW_OK;
}

pw_status pw_cuda_sync(pw_cuda_stream s)
{
    if (s)
        CUDA_TRY(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    else
        CUDA_TRY(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    return PW_OK;
}

pw_status pw_cuda_set_device(int dev)
{
    CUDA_TRY(cudaSetDevice(dev), "cudaSetDevice");
    return PW_OK;
}

pw_status pw_cuda_copy_async(void *dst, const void *src, size_t bytes, pw_cuda_stream s)
{
    if (!bytes) return PW_OK;
    CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s), "cudaMemcpyAsync");
    return PW_OK;
}

pw_status pw_cuda_host_register(void *base, size_t bytes)
{
    if (!bytes) return PW_OK;
    CUDA_TRY(cudaHostRegister(base, bytes, cudaHostRegisterPortable), "cudaHostRegister");
    return PW_OK;
}

void pw_cuda_host_unregister(void *base)
{
    if (base && cudaHostUnregister(base) != cudaSuccess) (void)cudaGetLastError();
}

pw_status pw_cuda_capture_begin(pw_cuda_stream s)
{
    CUDA_TRY(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    return PW_OK;
}

pw_status pw_cuda_capture_end(pw_cuda_stream s, int discard, pw_cuda_graph *out)
{
    *out = NULL;
    cudaGraph_t graph = NULL;
    cudaError_t e = cudaStreamEndCapture(s, &graph);
    if (discard || e != cudaSuccess) {
        if (graph) (void)cudaGraphDestroy(graph);
        if (e == cudaSuccess) return PW_OK;
        (void)cudaGetLastError();
        return pw_error(PW_ERR_INTERNAL, "cudaStreamEndCapture: %s", cudaGetErrorString(e));
    }
    cudaGraphExec_t exec = NULL;
    e = cudaGraphInstantiate(&exec, graph, 0);
    (void)cudaGraphDestroy(graph);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return pw_error(PW_ERR_INTERNAL, "cudaGraphInstantiate: %s", cudaGetErrorString(e));
    }
    *out = exec;
    return PW_OK;
}

pw_status pw_cuda_graph_launch(pw_cuda_graph g, pw_cuda_stream s)
{
    CUDA_TRY(cudaGraphLaunch(g, s), "cudaGraphLaunch");
    return PW_OK;
}

void pw_cuda_graph_destroy(pw_cuda_graph g)
{
    if (g) (void)cudaGraphExecDestroy(g);
}

pw_status pw_cuda_host_alloc(size_t bytes, void **out)
{
    *out = NULL;
    CUDA_TRY(cudaMallocHost(out, bytes ? bytes : 1), "cudaMallocHost");
    memset(*out, 0, bytes);
    return PW_OK;
}

void pw_cuda_host_free(void *p)
{
    if (p) (void)cudaFreeHost(p);
}

pw_status pw_cuda_memset_async(void *dptr, int byte, size_t bytes, pw_cuda_stream s)
{
    if (!bytes) return PW_OK;
    CUDA_TRY(cudaMemsetAsync(dptr, byte, bytes, s), "cudaMemsetAsync");
    return PW_OK;
}

pw_status pw_cuda_stream_create(int dev, pw_cuda_stream *out)
{
    *out = NULL;
    PW_CHECK(check_device(dev));
    CUDA_TRY(cudaSetDevice(dev), "cudaSetDevice");
    cudaStream_t s;
    CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    *out = s;
    return PW_OK;
}

void pw_cuda_stream_destroy(pw_cuda_stream s)
{
    if (s) (void)cudaStreamDestroy(s);
}

/* ---------------------------------------------------------------- stage */

#define CARVE_ALIGN 256

static const char *const mem_names[PW_CUDA_MEM_COUNT] = {
    "parameters", "gradients", "optimizer state", "activations"};

struct pw_cuda_stage {
    int device;
    char name[64];
    struct {
        char *base;       /* one cudaMalloc; NULL when the plan is 0 bytes */
        size_t capacity;  /* planned bytes */
        size_t used;      /* carved so far (aligned) */
    } mem[PW_CUDA_MEM_COUNT];
    cudaStream_t stream[PW_CUDA_STREAM_COUNT];
    /* handoff[from][to]: re-recorded at each hand-off. cudaStreamWaitEvent
     * captures the event's state when it is called, so one event per pair
     * serves every hand-off in order. */
    cudaEvent_t handoff[PW_CUDA_STREAM_COUNT][PW_CUDA_STREAM_COUNT];
};

pw_status pw_cuda_stage_create(const pw_cuda_stage_config *cfg, pw_cuda_stage **out)
{
    *out = NULL;
    PW_CHECK(check_device(cfg->device));
    pw_cuda_stage *st = calloc(1, sizeof *st);
    if (!st) return pw_error(PW_ERR_NOMEM, "CUDA stage: out of host memory");
    st->device = cfg->device;
    snprintf(st->name, sizeof st->name, "%s", cfg->name ? cfg->name : "stage");
    pw_status s = PW_OK;
    cudaError_t e = cudaSetDevice(cfg->device);
    if (e != cudaSuccess) {
        s = cuda_fail(e, "cudaSetDevice");
        goto fail;
    }
    for (int c = 0; c < PW_CUDA_MEM_COUNT; c++) {
        st->mem[c].capacity = cfg->bytes[c];
        if (!cfg->bytes[c]) continue;
        e = cudaMalloc((void **)&st->mem[c].base, cfg->bytes[c]);
        if (e != cudaSuccess) {
            st->mem[c].base = NULL;
            size_t free_b = 0, total_b = 0;
            (void)cudaGetLastError();
            (void)cudaMemGetInfo(&free_b, &total_b);
            s = pw_error(PW_ERR_NOMEM,
                         "%s on CUDA device %d: %s block of %zu bytes does not fit "
                         "(%zu bytes free of %zu): %s",
                         st->name, cfg->device, mem_names[c], cfg->bytes[c], free_b, total_b,
                         cudaGetErrorString(e));
            goto fail;
        }
    }
    for (int k = 0; k < PW_CUDA_STREAM_COUNT; k++) {
        e = cudaStreamCreateWithFlags(&st->stream[k], cudaStreamNonBlocking);
        if (e != cudaSuccess) {
            st->stream[k] = NULL;
            s = cuda_fail(e, "cudaStreamCreate");
            goto fail;
        }
    }
    for (int a = 0; a < PW_CUDA_STREAM_COUNT; a++)
        for (int b = 0; b < PW_CUDA_STREAM_COUNT; b++) {
            if (a == b) continue;
            /* Timing off: a hand-off event is only an ordering point. */
            e = cudaEventCreateWithFlags(&st->handoff[a][b], cudaEventDisableTiming);
            if (e != cudaSuccess) {
                st->handoff[a][b] = NULL;
                s = cuda_fail(e, "cudaEventCreate");
                goto fail;
            }
        }
    PW_INFO(PW_SUB_MEM,
            "%s on CUDA device %d: params %zu, grads %zu, optim %zu, activations %zu bytes",
            st->name, st->device, cfg->bytes[0], cfg->bytes[1], cfg->bytes[2], cfg->bytes[3]);
    *out = st;
    return PW_OK;
fail:
    pw_cuda_stage_destroy(st);
    return s;
}

void pw_cuda_stage_destroy(pw_cuda_stage *st)
{
    if (!st) return;
    (void)cudaSetDevice(st->device);
    for (int k = 0; k < PW_CUDA_STREAM_COUNT; k++)
        if (st->stream[k]) {
            (void)cudaStreamSynchronize(st->stream[k]);
            (void)cudaStreamDestroy(st->stream[k]);
        }
    for (int a = 0; a < PW_CUDA_STREAM_COUNT; a++)
        for (int b = 0; b < PW_CUDA_STREAM_COUNT; b++)
            if (st->handoff[a][b]) (void)cudaEventDestroy(st->handoff[a][b]);
    for (int c = 0; c < PW_CUDA_MEM_COUNT; c++)
        if (st->mem[c].base) (void)cudaFree(st->mem[c].base);
    free(st);
}

pw_status pw_cuda_stage_carve(pw_cuda_stage *st, pw_cuda_mem cat, size_t bytes, void **dptr)
{
    *dptr = NULL;
    if ((unsigned)cat >= PW_CUDA_MEM_COUNT)
        return pw_error(PW_ERR_INVALID_ARG, "%s: no memory category %d", st->name, (int)cat);
    size_t used = st->mem[cat].used, cap = st->mem[cat].capacity;
    size_t need = (bytes + CARVE_ALIGN - 1) / CARVE_ALIGN * CARVE_ALIGN;
    if (need < bytes || need > cap - used)
        return pw_error(PW_ERR_NOMEM,
                        "%s on CUDA device %d: %zu more bytes of %s than planned "
                        "(%zu of %zu in use)",
                        st->name, st->device, bytes, mem_names[cat], used, cap);
    *dptr = st->mem[cat].base + used;
    st->mem[cat].used = used + need;
    return PW_OK;
}

void pw_cuda_stage_reset(pw_cuda_stage *st, pw_cuda_mem cat)
{
    if ((unsigned)cat < PW_CUDA_MEM_COUNT) st->mem[cat].used = 0;
}

size_t pw_cuda_stage_capacity(const pw_cuda_stage *st, pw_cuda_mem cat)
{
    return (unsigned)cat < PW_CUDA_MEM_COUNT ? st->mem[cat].capacity : 0;
}

size_t pw_cuda_stage_used(const pw_cuda_stage *st, pw_cuda_mem cat)
{
    return (unsigned)cat < PW_CUDA_MEM_COUNT ? st->mem[cat].used : 0;
}

pw_cuda_stream pw_cuda_stage_stream(const pw_cuda_stage *st, pw_cuda_stream_kind kind)
{
    return (unsigned)kind < PW_CUDA_STREAM_COUNT ? st->stream[kind] : NULL;
}

int pw_cuda_stage_device(const pw_cuda_stage *st) { return st->device; }

pw_status pw_cuda_stage_handoff(pw_cuda_stage *st, pw_cuda_stream_kind from,
                                pw_cuda_stream_kind to)
{
    if ((unsigned)from >= PW_CUDA_STREAM_COUNT || (unsigned)to >= PW_CUDA_STREAM_COUNT)
        return pw_error(PW_ERR_INVALID_ARG, "%s: bad stream kind", st->name);
    if (from == to) return PW_OK; /* a stream is already ordered with itself */
    cudaEvent_t ev = st->handoff[from][to];
    CUDA_TRY(cudaEventRecord(ev, st->stream[from]), "cudaEventRecord");
    CUDA_TRY(cudaStreamWaitEvent(st->stream[to], ev, 0), "cudaStreamWaitEvent");
    return PW_OK;
}

/* ---------------------------------------------------------------- notifier */

struct pw_cuda_notifier {
    int rfd, wfd;         /* pipe: host functions write, the loop reads */
    struct event *ev;
    unsigned long delivered;
};

static void notifier_readable(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    pw_cuda_notifier *n = arg;
    /* Each post is one 8-byte write (atomic: below PIPE_BUF), so a read
     * returns whole records. Drain what is there; EAGAIN ends the batch. */
    pw_cuda_completion *batch[64];
    for (;;) {
        ssize_t got = read(fd, batch, sizeof batch);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break;
        size_t k = (size_t)got / sizeof batch[0];
        PW_ASSERT((size_t)got % sizeof batch[0] == 0);
        for (size_t i = 0; i < k; i++) {
            n->delivered++;
            batch[i]->fn(batch[i]->arg);
        }
        if ((size_t)got < sizeof batch) break;
    }
}

pw_status pw_cuda_notifier_create(struct event_base *base, pw_cuda_notifier **out)
{
    *out = NULL;
    pw_cuda_notifier *n = calloc(1, sizeof *n);
    if (!n) return pw_error(PW_ERR_NOMEM, "CUDA notifier: out of host memory");
    n->rfd = n->wfd = -1;
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
        int err = errno;
        free(n);
        return pw_error(PW_ERR_IO, "CUDA notifier: pipe: %s", strerror(err));
    }
    n->rfd = fds[0];
    n->wfd = fds[1];
    /* Only the read end is non-blocking: a writer that finds the pipe full
     * waits for the loop rather than dropping a completion. */
    if (fcntl(n->rfd, F_SETFL, fcntl(n->rfd, F_GETFL) | O_NONBLOCK) != 0) {
        int err = errno;
        pw_cuda_notifier_destroy(n);
        return pw_error(PW_ERR_IO, "CUDA notifier: fcntl: %s", strerror(err));
    }
    n->ev = event_new(base, n->rfd, EV_READ | EV_PERSIST, notifier_readable, n);
    if (!n->ev || event_add(n->ev, NULL) != 0) {
        pw_cuda_notifier_destroy(n);
        return pw_error(PW_ERR_INTERNAL, "CUDA notifier: cannot watch its pipe in the event loop");
    }
    *out = n;
    return PW_OK;
}

void pw_cuda_notifier_destroy(pw_cuda_notifier *n)
{
    if (!n) return;
    if (n->ev) event_free(n->ev);
    if (n->rfd >= 0) close(n->rfd);
    if (n->wfd >= 0) close(n->wfd);
    free(n);
}

void pw_cuda_notifier_post(pw_cuda_notifier *n, pw_cuda_completion *c)
{
    const char *p = (const char *)&c;
    size_t left = sizeof c;
    while (left) {
        ssize_t w = write(n->wfd, p, left);
        if (w < 0 && errno == EINTR) continue;
        /* Only a closed or broken pipe gets here: the notifier was destroyed
         * while work was still in flight, which device.h forbids. */
        PW_ASSERT(w > 0);
        p += w;
        left -= (size_t)w;
    }
}

unsigned long pw_cuda_notifier_delivered(const pw_cuda_notifier *n) { return n->delivered; }

/* Runs on the CUDA runtime's host-function thread; must not call CUDA. */
static void CUDART_CB notify_host_fn(void *arg)
{
    pw_cuda_completion *c = arg;
    pw_cuda_notifier_post(c->notifier, c);
}

pw_status pw_cuda_host_call(pw_cuda_stream s, void (*fn)(void *arg), void *arg)
{
    CUDA_TRY(cudaLaunchHostFunc(s, fn, arg), "cudaLaunchHostFunc");
    return PW_OK;
}

pw_status pw_cuda_notify(pw_cuda_notifier *n, pw_cuda_stream s, pw_cuda_completion *c)
{
    c->notifier = n;
    CUDA_TRY(cudaLaunchHostFunc(s, notify_host_fn, c), "cudaLaunchHostFunc");
    return PW_OK;
}
