/* pipewright — CUDA devices, per-stage device memory and streams, and
 * completion delivered to a libevent loop.
 *
 *     int n;
 *     if (pw_cuda_device_count(&n) != PW_OK) {     // "no CUDA device: ..."
 *         fprintf(stderr, "%s\n", pw_last_error());
 *         return 1;
 *     }
 *     pw_cuda_stage_config sc = { .device = 0, .name = "stage 1" };
 *     sc.bytes[PW_CUDA_MEM_PARAMS] = plan.params;  // sizes from the plan
 *     ...
 *     pw_cuda_stage *st;
 *     PW_CHECK(pw_cuda_stage_create(&sc, &st));   // 4 cudaMallocs, 3 streams
 *     float *w;
 *     PW_CHECK(pw_cuda_stage_carve(st, PW_CUDA_MEM_PARAMS, bytes, (void **)&w));
 *
 *     // On the stage's worker thread, which runs `base`:
 *     pw_cuda_notifier *nt;
 *     PW_CHECK(pw_cuda_notifier_create(base, &nt));
 *     ... enqueue the forward on pw_cuda_stage_stream(st, PW_CUDA_STREAM_COMPUTE) ...
 *     done.fn = on_forward_done; done.arg = ctx;  // caller-owned, lives on
 *     PW_CHECK(pw_cuda_notify(nt, compute, &done));
 *     // returns at once; on_forward_done(ctx) later runs on the loop thread
 *
 * Memory follows ARCHITECTURE.md's "plan, then allocate": a stage makes one
 * device allocation per category up front, and everything after is carved
 * out of those blocks (no cudaMalloc in the step loop).
 *
 * Streams and hand-offs (STYLE 7): each stage has a compute, a send and a
 * receive stream (non-blocking with respect to the legacy default stream).
 * pw_cuda_stage_handoff orders one stream after another with
 * cudaEventRecord + cudaStreamWaitEvent; the host never waits.
 *
 * Completion: pw_cuda_notify enqueues a host function on the stream
 * (cudaLaunchHostFunc) that writes the completion's address to a pipe; the
 * notifier's libevent read event on that pipe runs completion->fn on the
 * loop's thread. The CUDA host-function thread only writes 8 bytes; it never
 * calls back into CUDA or into the loop. If the loop stops reading and the
 * pipe fills (thousands of completions), the stream's host functions wait
 * for it: nothing is lost.
 */
#ifndef PW_STAGES_CUDA_DEVICE_H
#define PW_STAGES_CUDA_DEVICE_H

#include <stddef.h>

#include "runtime/status.h"
#include "stages/ops/cuda/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

struct event_base;

/* ---- devices ---- */

/* Number of CUDA devices. PW_OK with *count ≥ 1; otherwise *count = 0 and
 * PW_ERR_UNSUPPORTED with "no CUDA device: <the runtime's reason>" (no
 * driver, no GPU, CUDA_VISIBLE_DEVICES empty, ...). */
pw_status pw_cuda_device_count(int *count);

typedef struct pw_cuda_device_info {
    int index;
    char name[256];
    size_t total_mem, free_mem;  /* bytes; free at the time of the query */
    int cc_major, cc_minor;      /* compute capability (9.0 = H100/H200) */
    int sm_count;
} pw_cuda_device_info;

/* Name, memory and capability of device `dev`. PW_ERR_INVALID_ARG for an
 * index out of range, PW_ERR_UNSUPPORTED when there is no device at all. */
pw_status pw_cuda_device_query(int dev, pw_cuda_device_info *out);

/* PCI bus id of device `dev` in hwloc's form, "0000:11:00.0" (lower case,
 * 4-digit domain; cudaDeviceGetPCIBusId's answer, normalised), into buf (at
 * least 16 bytes): what runtime/topology.h looks the GPU up by to bind its
 * worker near it (pw_cpu_place_gpus). Errors as pw_cuda_device_query. */
pw_status pw_cuda_device_pci(int dev, char *buf, size_t n);

/* ---- plain buffers (setup, tests, benchmarks; never the step loop) ---- */

/* Makes `dev` the calling thread's current device. */
pw_status pw_cuda_malloc(int dev, size_t bytes, void **dptr);
void pw_cuda_free(void *dptr); /* accepts NULL */
/* Synchronous copies and fill: each waits for every stream of the device
 * before and after, so it is ordered with the stages' non-blocking streams. */
pw_status pw_cuda_upload(void *dst, const void *src, size_t bytes);
pw_status pw_cuda_download(void *dst, const void *src, size_t bytes);
pw_status pw_cuda_memset(void *dptr, int byte, size_t bytes);
/* Waits for a stream (NULL: the whole device). Tests and benchmarks only. */
pw_status pw_cuda_sync(pw_cuda_stream s);
/* A new non-blocking stream on `dev`, and its release (accepts NULL). */
pw_status pw_cuda_stream_create(int dev, pw_cuda_stream *out);
void pw_cuda_stream_destroy(pw_cuda_stream s);

/* ---- stream-ordered helpers (the step loop: nothing waits) ---- */

/* Makes `dev` the calling thread's current device (an engine worker calls
 * it before enqueuing a stage's work: the current device is per thread). */
pw_status pw_cuda_set_device(int dev);
/* Enqueues a copy of `bytes` on `s`; either side may be host or device
 * memory (unified addressing decides the direction). From or to pageable
 * host memory the runtime may wait for the copy before returning; the
 * host buffer must stay valid until `s` has passed the copy either way. */
pw_status pw_cuda_copy_async(void *dst, const void *src, size_t bytes, pw_cuda_stream s);
/* Page-locks [base, base + bytes) of host memory for every device of the
 * process (cudaHostRegister, portable), so that copies between it and a
 * device run asynchronously. No page may be registered twice (the runtime
 * refuses); page-aligned blocks never share one. Undo it with
 * pw_cuda_host_unregister before freeing the memory. */
pw_status pw_cuda_host_register(void *base, size_t bytes);
void pw_cuda_host_unregister(void *base);
/* `bytes` of zeroed memory on device `dev` (cudaMalloc, then a memset that
 * waits): the message buffers of stages that all compute on `dev`. Makes
 * `dev` current on the calling thread. Free with pw_cuda_free. */
pw_status pw_cuda_message_alloc(int dev, size_t bytes, void **dptr);
/* CUDA graphs: the work a thread enqueues on `s` between capture_begin and
 * capture_end is recorded (not run) and instantiated once; graph_launch
 * replays it on a stream, as one launch. Capture is thread-local (other
 * threads' streams go on as usual). capture_end with `discard` (the
 * recorded calls failed) ends the capture and keeps nothing. */
typedef struct CUgraphExec_st *pw_cuda_graph; /* cudaGraphExec_t */
pw_status pw_cuda_capture_begin(pw_cuda_stream s);
pw_status pw_cuda_capture_end(pw_cuda_stream s, int discard, pw_cuda_graph *out);
pw_status pw_cuda_graph_launch(pw_cuda_graph g, pw_cuda_stream s);
void pw_cuda_graph_destroy(pw_cuda_graph g); /* accepts NULL */
/* Page-locked host memory (cudaMallocHost), zeroed; free with pw_cuda_host_free. */
pw_status pw_cuda_host_alloc(size_t bytes, void **out);
void pw_cuda_host_free(void *p); /* accepts NULL */
/* Enqueues a fill of `bytes` device bytes with `byte` on `s`. */
pw_status pw_cuda_memset_async(void *dptr, int byte, size_t bytes, pw_cuda_stream s);
/* Enqueues fn(arg) on `s` (cudaLaunchHostFunc): it runs on a CUDA runtime
 * thread once everything enqueued on `s` before has finished. fn must not
 * call CUDA; waking another thread (an engine worker's event_active) is
 * what it is for. Not called when the context has failed: a watchdog must
 * cover a completion that never comes. Never blocks. */
pw_status pw_cuda_host_call(pw_cuda_stream s, void (*fn)(void *arg), void *arg);

/* ---- one stage's device memory and streams ---- */

typedef enum pw_cuda_mem {
    PW_CUDA_MEM_PARAMS = 0,
    PW_CUDA_MEM_GRADS,
    PW_CUDA_MEM_OPTIM,        /* optimizer state */
    PW_CUDA_MEM_ACTIVATIONS,  /* stash slots, workspace, message buffers */
    PW_CUDA_MEM_COUNT
} pw_cuda_mem;

typedef enum pw_cuda_stream_kind {
    PW_CUDA_STREAM_COMPUTE = 0,
    PW_CUDA_STREAM_SEND,
    PW_CUDA_STREAM_RECV,
    PW_CUDA_STREAM_COUNT
} pw_cuda_stream_kind;

typedef struct pw_cuda_stage_config {
    int device;
    size_t bytes[PW_CUDA_MEM_COUNT];  /* planned size of each category; 0 = none */
    const char *name;                 /* for messages ("stage 2"); may be NULL */
} pw_cuda_stage_config;

typedef struct pw_cuda_stage pw_cuda_stage;

/* One cudaMalloc per non-empty category and three streams on cfg->device,
 * which becomes the calling thread's current device (call it on the stage's
 * worker thread).
 * PW_ERR_UNSUPPORTED with "no CUDA device" when there is none,
 * PW_ERR_INVALID_ARG for a bad device index, PW_ERR_NOMEM (naming the stage,
 * the category, the bytes asked and the bytes free) when a block does not
 * fit. Nothing is left allocated on failure. */
pw_status pw_cuda_stage_create(const pw_cuda_stage_config *cfg, pw_cuda_stage **out);
/* Waits for the stage's streams, then frees everything. Accepts NULL. */
void pw_cuda_stage_destroy(pw_cuda_stage *st);

/* The next `bytes` of category `cat` (256-byte aligned, as cudaMalloc's own
 * alignment), or PW_ERR_NOMEM naming the stage and category when the plan
 * is exceeded (a planning bug or a caller asking for more than it planned). */
pw_status pw_cuda_stage_carve(pw_cuda_stage *st, pw_cuda_mem cat, size_t bytes, void **dptr);
/* Forgets every carve of `cat` (the block stays allocated). */
void pw_cuda_stage_reset(pw_cuda_stage *st, pw_cuda_mem cat);
/* Bytes planned / carved so far in `cat`. */
size_t pw_cuda_stage_capacity(const pw_cuda_stage *st, pw_cuda_mem cat);
size_t pw_cuda_stage_used(const pw_cuda_stage *st, pw_cuda_mem cat);
pw_cuda_stream pw_cuda_stage_stream(const pw_cuda_stage *st, pw_cuda_stream_kind kind);
int pw_cuda_stage_device(const pw_cuda_stage *st);
/* Work enqueued on `to` after this call starts only once everything enqueued
 * on `from` before it has finished (event record + stream wait; the host does
 * not wait). */
pw_status pw_cuda_stage_handoff(pw_cuda_stage *st, pw_cuda_stream_kind from,
                                pw_cuda_stream_kind to);

/* ---- completion into a libevent loop ---- */

typedef struct pw_cuda_notifier pw_cuda_notifier;

/* What to run on the loop thread when a stream reaches a point. The caller
 * owns it and keeps it alive (and unchanged) until fn has run; the same
 * struct may be reused after that. */
typedef struct pw_cuda_completion {
    void (*fn)(void *arg);
    void *arg;
    pw_cuda_notifier *notifier; /* set by pw_cuda_notify */
} pw_cuda_completion;

/* A notifier watching a pipe in `base` (EV_READ | EV_PERSIST). Create and
 * destroy it on the thread that runs `base`. */
pw_status pw_cuda_notifier_create(struct event_base *base, pw_cuda_notifier **out);
/* Accepts NULL. Completions not yet delivered are dropped: wait for the
 * streams first. */
void pw_cuda_notifier_destroy(pw_cuda_notifier *n);

/* When every operation enqueued on `s` before this call has finished,
 * c->fn(c->arg) runs on the loop thread of n. Never blocks. */
pw_status pw_cuda_notify(pw_cuda_notifier *n, pw_cuda_stream s, pw_cuda_completion *c);

/* Delivers `c` through the pipe now, from any thread: what the CUDA host
 * function calls, public so that the notifier can be tested without a GPU. */
void pw_cuda_notifier_post(pw_cuda_notifier *n, pw_cuda_completion *c);
/* Completions delivered (fn called) so far. */
unsigned long pw_cuda_notifier_delivered(const pw_cuda_notifier *n);

#ifdef __cplusplus
}
#endif
#endif
