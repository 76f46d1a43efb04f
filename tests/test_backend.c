/* pipewright — the stage program's backend table (stages/ops/backend.h).
 *
 * The CUDA path of the program (device memory in one block per category,
 * the data and the engine's host messages staged through uploads and
 * downloads, the loss statistics kept in backend memory, parameters read
 * and written through pw_program_param_read/write, tied gradients summed
 * through host copies, checkpoints) can only run on a GPU. Most of it does
 * not depend on the GPU, though: this file registers "hostdev", a backend
 * that claims device memory (so the program takes every device path) but
 * allocates its blocks with malloc and runs the CPU ops. Since its ops are
 * the CPU's, every run must give the CPU backend's bytes exactly; a missing
 * upload or download shows up as different bytes. It runs everywhere,
 * with or without CUDA.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <criterion/parameterized.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graph/graph.h"
#include "runtime/status.h"
#include "stages/ops/backend.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"
#include "stages/program/program.h"
#include "stages/train/program_stage.h"
#include "scheduler/runner.h"
#include "graph/partition.h"
#include "tests/pipeline_support.h"

#define TIMEOUT_S 120

#include "tests/tsan_criterion.h" /* runs under ThreadSanitizer */

/* ---------------------------------------------------------------- hostdev */

/* A download in flight (hostdev-async): the source's bytes when it was
 * enqueued, written to the host only when the stream gets there. */
typedef struct hd_copy {
    void *dst;
    void *data;
    size_t bytes;
} hd_copy;

typedef struct hostdev {
    void *block[PW_MEM_COUNT];
    int syncs;
    hd_copy *pend;      /* hostdev-async: downloads since the last notify/sync */
    int n_pend, cap_pend;
    int inflight;       /* notifies not yet run (hdq.mu) */
} hostdev;

static void hd_flush(hd_copy *c, int n)
{
    for (int i = 0; i < n; i++) {
        memcpy(c[i].dst, c[i].data, c[i].bytes);
        free(c[i].data);
    }
    free(c);
}

/* hostdev-async's "stream": one thread runs the notified completions in
 * order, each after a random delay of up to 200 µs: its downloads land in
 * host memory, then the program's callback runs (and wakes the engine). */
typedef struct hd_job {
    hostdev *h;
    hd_copy *copies;
    int n;
    void (*fn)(void *);
    void *arg;
} hd_job;

#define HDQ_CAP 256
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv, idle;
    hd_job q[HDQ_CAP];
    int head, n, started;
    pthread_t thread;
    unsigned jobs_run;
} hdq = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER, .idle = PTHREAD_COND_INITIALIZER};

static void *hdq_main(void *arg)
{
    (void)arg;
    unsigned rng = 2024;
    pthread_mutex_lock(&hdq.mu);
    for (;;) {
        while (!hdq.n) pthread_cond_wait(&hdq.cv, &hdq.mu);
        hd_job j = hdq.q[hdq.head];
        hdq.head = (hdq.head + 1) % HDQ_CAP;
        hdq.n--;
        pthread_mutex_unlock(&hdq.mu);
        rng = rng * 1103515245u + 12345u;
        usleep((rng >> 16) % 200);
        hd_flush(j.copies, j.n);
        pthread_mutex_lock(&hdq.mu);
        /* Counted down before fn: once fn has run, the engine may end the
         * step and the program close this context. */
        j.h->inflight--;
        hdq.jobs_run++;
        pthread_cond_broadcast(&hdq.idle);
        pthread_mutex_unlock(&hdq.mu);
        j.fn(j.arg);
        pthread_mutex_lock(&hdq.mu);
    }
    return NULL;
}

/* Waits for the context's notifies, then lands its remaining downloads. */
static void hd_drain(hostdev *h)
{
    pthread_mutex_lock(&hdq.mu);
    while (h->inflight) pthread_cond_wait(&hdq.idle, &hdq.mu);
    pthread_mutex_unlock(&hdq.mu);
    hd_flush(h->pend, h->n_pend);
    h->pend = NULL;
    h->n_pend = h->cap_pend = 0;
}

static void hd_close(void *ctx)
{
    hostdev *h = ctx;
    if (!h) return;
    hd_drain(h);
    for (int c = 0; c < PW_MEM_COUNT; c++) free(h->block[c]);
    free(h);
}

/* Two pretend devices; programs opened on each (a pipeline given the bare
 * name spreads its ranks over them). */
#define HD_DEVICES 2
static int hd_opened[HD_DEVICES];

static int hd_device_count(void) { return HD_DEVICES; }

static pw_status hd_open(int device, pw_math math, const char *who, const size_t bytes[PW_MEM_COUNT],
                         void **ctx, void *base[PW_MEM_COUNT])
{
    (void)who;
    (void)math;
    if (device < 0 || device >= HD_DEVICES) return pw_error(PW_ERR_INVALID_ARG, "hostdev: no device %d", device);
    hd_opened[device]++;
    hostdev *h = calloc(1, sizeof *h);
    if (!h) return pw_error(PW_ERR_NOMEM, "hostdev: out of memory");
    for (int c = 0; c < PW_MEM_COUNT; c++) {
        base[c] = NULL;
        if (!bytes[c]) continue;
        /* Separate blocks, 256-byte aligned like cudaMalloc's, zeroed. */
        if (posix_memalign(&h->block[c], 256, bytes[c]) != 0) {
            hd_close(h);
            return pw_error(PW_ERR_NOMEM, "hostdev: out of memory");
        }
        memset(h->block[c], 0, bytes[c]);
        base[c] = h->block[c];
    }
    *ctx = h;
    return PW_OK;
}

static pw_status hd_sync(void *ctx)
{
    ((hostdev *)ctx)->syncs++;
    return PW_OK;
}

static pw_status hd_async_sync(void *ctx)
{
    hostdev *h = ctx;
    hd_drain(h);
    h->syncs++;
    return PW_OK;
}

static pw_status hd_async_download(void *ctx, void *dst, const void *src, size_t bytes)
{
    hostdev *h = ctx;
    if (h->n_pend == h->cap_pend) {
        int cap = h->cap_pend ? 2 * h->cap_pend : 16;
        hd_copy *c = realloc(h->pend, (size_t)cap * sizeof *c);
        if (!c) return pw_error(PW_ERR_NOMEM, "hostdev-async: out of memory");
        h->pend = c;
        h->cap_pend = cap;
    }
    void *data = malloc(bytes ? bytes : 1);
    if (!data) return pw_error(PW_ERR_NOMEM, "hostdev-async: out of memory");
    memcpy(data, src, bytes);
    h->pend[h->n_pend++] = (hd_copy){dst, data, bytes};
    return PW_OK;
}

static pw_status hd_async_notify(void *ctx, void (*fn)(void *), void *arg)
{
    hostdev *h = ctx;
    pthread_mutex_lock(&hdq.mu);
    if (!hdq.started) {
        if (pthread_create(&hdq.thread, NULL, hdq_main, NULL) != 0) {
            pthread_mutex_unlock(&hdq.mu);
            return pw_error(PW_ERR_IO, "hostdev-async: no completion thread");
        }
        pthread_detach(hdq.thread);
        hdq.started = 1;
    }
    cr_assert_lt(hdq.n, HDQ_CAP);
    hdq.q[(hdq.head + hdq.n++) % HDQ_CAP] = (hd_job){h, h->pend, h->n_pend, fn, arg};
    h->inflight++;
    h->pend = NULL;
    h->n_pend = h->cap_pend = 0;
    pthread_cond_signal(&hdq.cv);
    pthread_mutex_unlock(&hdq.mu);
    return PW_OK;
}

static unsigned hd_jobs_run(void)
{
    pthread_mutex_lock(&hdq.mu);
    unsigned n = hdq.jobs_run;
    pthread_mutex_unlock(&hdq.mu);
    return n;
}

/* Page-locking as cudaHostRegister checks it: whole pages, no page twice;
 * what is registered must be unregistered (by its base) before it is
 * freed, which the tests check by counting what is left. */
#define HD_MAX_PINNED 64
static struct {
    pthread_mutex_t mu;
    char *base[HD_MAX_PINNED];
    size_t bytes[HD_MAX_PINNED];
    int n, total, violations;
} hdp = {.mu = PTHREAD_MUTEX_INITIALIZER};

static pw_status hd_host_register(void *base, size_t bytes)
{
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    char *b = base;
    pthread_mutex_lock(&hdp.mu);
    int ok = (uintptr_t)b % page == 0 && bytes % page == 0 && bytes > 0 && hdp.n < HD_MAX_PINNED;
    for (int i = 0; ok && i < hdp.n; i++)
        if (b < hdp.base[i] + hdp.bytes[i] && hdp.base[i] < b + bytes) ok = 0;
    if (ok) {
        hdp.base[hdp.n] = b;
        hdp.bytes[hdp.n++] = bytes;
        hdp.total++;
    } else {
        hdp.violations++;
    }
    pthread_mutex_unlock(&hdp.mu);
    return ok ? PW_OK : pw_error(PW_ERR_INVALID_ARG, "hostdev: bad host registration %p + %zu", base, bytes);
}

static void hd_host_unregister(void *base)
{
    pthread_mutex_lock(&hdp.mu);
    int i = 0;
    while (i < hdp.n && hdp.base[i] != (char *)base) i++;
    if (i == hdp.n) {
        hdp.violations++;
    } else {
        hdp.base[i] = hdp.base[hdp.n - 1];
        hdp.bytes[i] = hdp.bytes[--hdp.n];
    }
    pthread_mutex_unlock(&hdp.mu);
}

/* Message memory "on the device": host memory here (the ops are the CPU's),
 * counted so that the tests see which path a pipeline took. */
static int hd_msg_live, hd_msg_allocs;

static pw_status hd_message_alloc(int device, size_t bytes, void **base)
{
    cr_assert(device >= 0 && device < HD_DEVICES, "message memory on device %d", device);
    if (posix_memalign(base, 256, bytes) != 0) return pw_error(PW_ERR_NOMEM, "hostdev: out of memory");
    memset(*base, 0, bytes);
    __atomic_add_fetch(&hd_msg_live, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&hd_msg_allocs, 1, __ATOMIC_SEQ_CST);
    return PW_OK;
}

static void hd_message_free(void *base)
{
    __atomic_sub_fetch(&hd_msg_live, 1, __ATOMIC_SEQ_CST);
    free(base);
}

/* Recording brackets (backend.h, record_begin) as the CUDA backend needs
 * them: paired, never nested, one key per (kind, slot), and no copy to or
 * from the host between them (uploads and downloads stay outside). The
 * ops still run as made. Per thread: each stage's worker brackets its own. */
static _Thread_local int hd_rec_key = -1;
static int hd_rec_count, hd_rec_violations;

static pw_status hd_record_begin(void *ctx, int key)
{
    (void)ctx;
    if (hd_rec_key != -1 || key < 0 || key >= 3 * 16) __atomic_add_fetch(&hd_rec_violations, 1, __ATOMIC_SEQ_CST);
    hd_rec_key = key;
    __atomic_add_fetch(&hd_rec_count, 1, __ATOMIC_SEQ_CST);
    return PW_OK;
}

static pw_status hd_record_end(void *ctx, int key, pw_status calls)
{
    (void)ctx;
    if (hd_rec_key != key) __atomic_add_fetch(&hd_rec_violations, 1, __ATOMIC_SEQ_CST);
    hd_rec_key = -1;
    return calls;
}

static pw_status hd_rec_upload(void *ctx, void *dst, const void *src, size_t bytes)
{
    if (hd_rec_key != -1) __atomic_add_fetch(&hd_rec_violations, 1, __ATOMIC_SEQ_CST);
    return pw_backend_cpu_i.upload(ctx, dst, src, bytes);
}

static pw_status hd_rec_download(void *ctx, void *dst, const void *src, size_t bytes)
{
    if (hd_rec_key != -1) __atomic_add_fetch(&hd_rec_violations, 1, __ATOMIC_SEQ_CST);
    return hd_async_download(ctx, dst, src, bytes);
}

/* The replicas' all-reduce through the backend (pw_span_mem): the host's
 * float loop, counted, with a fence per ring step as a GPU needs. */
static int hd_span_applies, hd_span_fences;

static pw_status hd_span_apply(float *dst, const float *src, int64_t n, int add)
{
    if (add)
        for (int64_t i = 0; i < n; i++) dst[i] = src[i] + dst[i];
    else
        memcpy(dst, src, (size_t)n * sizeof *dst);
    __atomic_add_fetch(&hd_span_applies, 1, __ATOMIC_SEQ_CST);
    return PW_OK;
}

static pw_status hd_span_fence(void)
{
    __atomic_add_fetch(&hd_span_fences, 1, __ATOMIC_SEQ_CST);
    return PW_OK;
}

static const pw_span_mem hd_span_mem = {.apply = hd_span_apply, .fence = hd_span_fence};

static pw_backend_i hostdev_i, hostdev_async_i;

static void register_hostdev(void)
{
    hostdev_i = pw_backend_cpu_i; /* the CPU's ops... */
    hostdev_i.name = "hostdev";
    hostdev_i.device_memory = 1;  /* ...behind the device paths */
    hostdev_i.open = hd_open;
    hostdev_i.close = hd_close;
    hostdev_i.device_count = hd_device_count;
    hostdev_i.sync = hd_sync;
    hostdev_i.host_register = hd_host_register;
    hostdev_i.host_unregister = hd_host_unregister;
    hostdev_i.message_alloc = hd_message_alloc;
    hostdev_i.message_free = hd_message_free;
    hostdev_i.span_memory = &hd_span_mem;
    cr_assert_eq(pw_backend_register(&hostdev_i), PW_OK, "%s", pw_last_error());
    /* "hostdev-async": completes each training call later, from its own
     * thread, and lands the downloads only then (like a GPU stream): a
     * message sent or a loss read before the completion has the wrong
     * bytes. */
    hostdev_async_i = hostdev_i;
    hostdev_async_i.name = "hostdev-async";
    hostdev_async_i.sync = hd_async_sync;
    hostdev_async_i.download = hd_async_download;
    hostdev_async_i.notify = hd_async_notify;
    hostdev_async_i.record_begin = hd_record_begin;
    hostdev_async_i.record_end = hd_record_end;
    hostdev_async_i.upload = hd_rec_upload;
    hostdev_async_i.download = hd_rec_download;
    cr_assert_eq(pw_backend_register(&hostdev_async_i), PW_OK, "%s", pw_last_error());
}

/* ---------------------------------------------------------------- runs */

static const char *MLP = "graph b_mlp\n" PW_TEST_MLP_BODY;

/* Tied head (a tie across stages), dropout, attention. */
static const char *GPT = "graph b_gpt\n" PW_TEST_GPT_BODY;

static pw_graph *parse(const char *text) { return test_parse(text, "b.graph"); }

static pw_dataset *dataset(const pw_graph *g, int gpt)
{
    pw_dataset *d = NULL;
    if (gpt) {
        cr_assert_eq(pw_dataset_from_spec_for_graph("text:fortunes", 1, g, &d), PW_OK, "%s",
                     pw_last_error());
    } else {
        pw_synthetic_config sc = {.n = 256, .sample_shape = {.ndim = 2, .d = {4, 6}},
                                  .n_classes = 5, .seed = 3, .noise = 1.0f};
        cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    }
    return d;
}

typedef struct run_cfg {
    const char *device;
    int stages;
    pw_schedule_kind kind;
    int recompute;
    int chunks_per_rank;
    double clip;
    int batch, micro;  /* 0: 16 and 4 */
    int replicas;      /* 0: 1 */
} run_cfg;

static pw_pipeline *make(const pw_graph *g, const pw_dataset *d, const run_cfg *r)
{
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = r->batch ? r->batch : 16;
    pc.micro_batches = r->micro ? r->micro : 4;
    pc.stages = r->stages;
    pc.schedule = r->kind;
    pc.chunks_per_rank = r->chunks_per_rank;
    pc.partition = PW_PARTITION_FLOPS;
    pc.optim = pw_optim_defaults(PW_OPTIM_ADAMW);
    pc.seed = 7;
    pc.shuffle = 1;
    pc.pin = 0;
    pc.recompute = r->recompute;
    pc.clip_grad_norm = r->clip;
    pc.device = r->device;
    pc.replicas = r->replicas ? r->replicas : 1;
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    return pl;
}

typedef struct result {
    float *params;
    int64_t count;
    double loss[3];
    double eval_loss;
} result;

static result run(const pw_graph *g, const pw_dataset *d, const run_cfg *r)
{
    pw_pipeline *pl = make(g, d, r);
    result o = {0};
    for (int s = 0; s < 3; s++) {
        pw_step_stats st;
        cr_assert_eq(pw_pipeline_step(pl, &st), PW_OK, "%s: %s", r->device, pw_last_error());
        o.loss[s] = st.loss;
    }
    if (d->n <= 4096) { /* the MLP's data; the text corpus would take long */
        pw_eval_stats es;
        cr_assert_eq(pw_pipeline_evaluate(pl, d, &es), PW_OK, "%s: %s", r->device, pw_last_error());
        o.eval_loss = es.loss;
    }
    o.params = test_pipeline_params(pl, g, &o.count);
    pw_pipeline_destroy(pl);
    return o;
}

static void expect_same(const result *a, const result *b, const char *what)
{
    cr_assert_eq(a->count, b->count);
    for (int s = 0; s < 3; s++)
        cr_expect_eq(a->loss[s], b->loss[s], "%s: step %d loss %.17g vs %.17g", what, s + 1, a->loss[s],
                     b->loss[s]);
    cr_expect_eq(a->eval_loss, b->eval_loss, "%s: evaluation loss %.17g vs %.17g", what, a->eval_loss,
                 b->eval_loss);
    if (memcmp(a->params, b->params, (size_t)a->count * sizeof(float)) == 0) return;
    int shown = 0;
    for (int64_t i = 0; i < a->count && shown < 5; i++)
        if (a->params[i] != b->params[i]) {
            cr_log_error("%s: param[%lld] %.9g vs %.9g", what, (long long)i, a->params[i], b->params[i]);
            shown++;
        }
    cr_assert_fail("%s: parameters differ", what);
}

typedef struct case_t {
    int gpt;
    int stages;
    pw_schedule_kind kind;
    int recompute;
} case_t;

ParameterizedTestParameters(backend, device_paths_match_the_cpu)
{
    static case_t cases[24];
    int n = 0;
    for (int gpt = 0; gpt < 2; gpt++)
        for (int s = 1; s <= 3; s++)
            for (int k = 0; k < 2; k++)
                for (int rc = 0; rc < 2; rc++)
                    cases[n++] = (case_t){gpt, s, k ? PW_SCHEDULE_ZB_H1 : PW_SCHEDULE_1F1B, rc};
    return cr_make_param_array(case_t, cases, (size_t)n);
}

/* A "device" program (every upload, download and device-side statistic)
 * computes the CPU program's bytes: loss per step, evaluation, parameters. */
ParameterizedTest(case_t *c, backend, device_paths_match_the_cpu, .timeout = TIMEOUT_S)
{
    register_hostdev();
    pw_graph *g = parse(c->gpt ? GPT : MLP);
    pw_dataset *d = dataset(g, c->gpt);
    run_cfg r = {.device = "cpu", .stages = c->stages, .kind = c->kind, .recompute = c->recompute};
    result cpu = run(g, d, &r);
    r.device = "hostdev";
    result dev = run(g, d, &r);
    char what[128];
    snprintf(what, sizeof what, "%s, %d stages, %s%s: hostdev vs cpu", c->gpt ? "GPT" : "MLP", c->stages,
             pw_schedule_kind_name(c->kind), c->recompute ? ", recompute" : "");
    expect_same(&cpu, &dev, what);
    r.device = "hostdev-async:0"; /* one device: the messages stay there */
    unsigned before = hd_jobs_run();
    result adev = run(g, d, &r);
    cr_assert_gt(hd_jobs_run(), before, "no call completed asynchronously");
    /* The training calls went through record brackets, properly (not
     * under recompute, whose redo paths vary). */
    cr_expect_eq(hd_rec_violations, 0, "record brackets misused");
    if (!c->recompute) cr_expect_gt(hd_rec_count, 0, "no training call was bracketed for recording");
    else cr_expect_eq(hd_rec_count, 0, "recompute must not record");
    snprintf(what, sizeof what, "%s, %d stages, %s%s: hostdev-async vs cpu", c->gpt ? "GPT" : "MLP",
             c->stages, pw_schedule_kind_name(c->kind), c->recompute ? ", recompute" : "");
    expect_same(&cpu, &adev, what);
    free(adev.params);
    free(cpu.params);
    free(dev.params);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* A device pipeline page-locks its host memory — every program's staging
 * block, and the engine's messages when they stay on the host — in whole
 * pages, no page twice, and unlocks all of it before freeing it. Stages
 * that all compute on one device keep their messages there instead. */
typedef struct host_case {
    const char *device;
    int stages;
    int messages_on_device; /* else page-locked host messages (several devices) */
} host_case;

Test(backend, host_memory_is_locked_and_released, .timeout = TIMEOUT_S)
{
    register_hostdev();
    pw_graph *g = parse(GPT);
    pw_dataset *d = dataset(g, 1);
    const host_case cases[] = {
        {"hostdev", 1, 0},       /* one stage: no messages */
        {"hostdev", 3, 0},       /* the bare name spreads ranks over both devices */
        {"hostdev-async", 2, 0},
        {"hostdev:0", 3, 1},     /* every stage on device 0 */
        {"hostdev-async:1", 2, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const host_case *c = &cases[i];
        int before = hdp.total, allocs = hd_msg_allocs;
        run_cfg r = {.device = c->device, .stages = c->stages, .kind = PW_SCHEDULE_1F1B};
        pw_pipeline *pl = make(g, d, &r);
        pw_step_stats st;
        cr_assert_eq(pw_pipeline_step(pl, &st), PW_OK, "%s", pw_last_error());
        const int host_msgs = c->stages > 1 && !c->messages_on_device;
        cr_expect_eq(hdp.n, c->stages + host_msgs, "%s x %d: %d blocks locked", c->device, c->stages, hdp.n);
        cr_expect_eq(hdp.total - before, c->stages + host_msgs);
        cr_expect_eq(hd_msg_allocs - allocs, c->messages_on_device, "%s x %d: device messages",
                     c->device, c->stages);
        pw_pipeline_destroy(pl);
        cr_expect_eq(hdp.n, 0, "%s x %d: %d blocks still locked after destroy", c->device, c->stages, hdp.n);
        cr_expect_eq(hd_msg_live, 0, "%s x %d: message memory not freed", c->device, c->stages);
    }
    cr_expect_eq(hdp.violations, 0, "registrations that cudaHostRegister would refuse");
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* Data-parallel replicas of device programs: the engine's all-reduce sums
 * the gradients through the backend's span operations (a GPU's kernels),
 * in the ring's order — the CPU replicas' bytes; with the tied GPT head,
 * clipping, and the messages on one device. */
Test(backend, replicas_all_reduce_through_the_backend, .timeout = TIMEOUT_S)
{
    register_hostdev();
    for (int gpt = 0; gpt < 2; gpt++) {
        pw_graph *g = parse(gpt ? GPT : MLP);
        pw_dataset *d = dataset(g, gpt);
        for (int s = 1; s <= 2; s++) {
            run_cfg r = {.device = "cpu", .stages = s, .kind = PW_SCHEDULE_1F1B, .replicas = 2,
                         .clip = 0.5};
            result cpu = run(g, d, &r);
            r.device = "hostdev:0";
            int before = hd_span_applies;
            result dev = run(g, d, &r);
            cr_expect_gt(hd_span_applies, before, "the all-reduce did not go through the backend");
            cr_expect_geq(hd_span_fences, 1);
            char what[96];
            snprintf(what, sizeof what, "%s, %d stages x 2 replicas: hostdev vs cpu", gpt ? "GPT" : "MLP", s);
            expect_same(&cpu, &dev, what);
            free(cpu.params);
            free(dev.params);
        }
        pw_dataset_destroy(d);
        pw_graph_destroy(g);
    }
}

/* Interleaved: several chunks per worker, each its own device program. */
Test(backend, interleaved_matches_the_cpu, .timeout = TIMEOUT_S)
{
    register_hostdev();
    pw_graph *g = parse(GPT);
    pw_dataset *d = dataset(g, 1);
    run_cfg r = {.device = "cpu", .stages = 2, .kind = PW_SCHEDULE_INTERLEAVED, .chunks_per_rank = 2};
    result cpu = run(g, d, &r);
    r.device = "hostdev:0";
    result dev = run(g, d, &r);
    expect_same(&cpu, &dev, "GPT, interleaved 2x2: hostdev vs cpu");
    free(cpu.params);
    free(dev.params);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* A checkpoint from a device pipeline has the CPU's bytes and loads back
 * (into either backend) unchanged. */
Test(backend, checkpoints_cross_backends, .timeout = TIMEOUT_S)
{
    register_hostdev();
    pw_graph *g = parse(GPT);
    pw_dataset *d = dataset(g, 1);
    run_cfg rd = {.device = "hostdev", .stages = 2, .kind = PW_SCHEDULE_1F1B};
    run_cfg rc = {.device = "cpu", .stages = 3, .kind = PW_SCHEDULE_1F1B};
    pw_pipeline *dev = make(g, d, &rd);
    for (int s = 0; s < 2; s++) cr_assert_eq(pw_pipeline_step(dev, NULL), PW_OK, "%s", pw_last_error());
    char path[64];
    snprintf(path, sizeof path, "/tmp/pw_backend_ckpt_%d.safetensors", (int)getpid());
    cr_assert_eq(pw_pipeline_save(dev, path, NULL), PW_OK, "%s", pw_last_error());
    int64_t n1, n2, n3;
    float *want = test_pipeline_params(dev, g, &n1);
    pw_pipeline *cpu = make(g, d, &rc);
    cr_assert_eq(pw_pipeline_load(cpu, path, NULL), PW_OK, "%s", pw_last_error());
    float *got = test_pipeline_params(cpu, g, &n2);
    cr_assert_eq(n1, n2);
    cr_assert(memcmp(want, got, (size_t)n1 * sizeof(float)) == 0, "device checkpoint into the CPU differs");
    pw_pipeline *dev2 = make(g, d, &rd);
    cr_assert_eq(pw_pipeline_load(dev2, path, NULL), PW_OK, "%s", pw_last_error());
    float *back = test_pipeline_params(dev2, g, &n3);
    cr_assert(memcmp(want, back, (size_t)n1 * sizeof(float)) == 0, "device checkpoint back differs");
    unlink(path);
    free(want);
    free(got);
    free(back);
    pw_pipeline_destroy(dev);
    pw_pipeline_destroy(dev2);
    pw_pipeline_destroy(cpu);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* The program's own calls on a device program: data through
 * pw_program_data, values and gradients in device memory, a non-finite
 * gradient still refused by name. */
Test(backend, program_calls, .timeout = TIMEOUT_S)
{
    register_hostdev();
    pw_graph *g = parse(MLP);
    pw_program_config pc = {.graph = g, .micro_batch = 4, .slots = 2,
                            .optim = pw_optim_defaults(PW_OPTIM_SGD), .device = "hostdev"};
    pw_program *p;
    cr_assert_eq(pw_program_create(&pc, &p), PW_OK, "%s", pw_last_error());
    cr_assert(pw_program_on_device(p));
    pw_program_init_params(p, 1);
    float *x = pw_program_data(p, g->input, 1);
    int32_t *y = pw_program_data(p, g->label, 1);
    cr_assert_not_null(x);
    cr_assert_not_null(y);
    cr_assert_neq((void *)x, pw_program_value(p, g->input, 1), "a device program stages its data");
    cr_assert_null(pw_program_data(p, g->nodes[1].output, 1));
    for (int i = 0; i < 4 * 24; i++) x[i] = (float)(i % 7) - 3.0f;
    for (int i = 0; i < 4; i++) y[i] = i % 5;
    cr_assert_eq(pw_program_forward(p, 1, 4), PW_OK, "%s", pw_last_error());
    cr_assert(pw_program_loss_sum(p, 1) > 0, "loss %g", pw_program_loss_sum(p, 1));
    cr_assert_eq(pw_program_backward_input(p, 1), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_program_backward_weight(p, 1), PW_OK, "%s", pw_last_error());
    pw_program_param pp;
    pw_program_param_at(p, 0, &pp);
    float *gr = malloc((size_t)pp.numel * sizeof *gr);
    cr_assert_eq(pw_program_param_read(p, 0, PW_PARAM_GRAD, 0, gr), PW_OK, "%s", pw_last_error());
    gr[3] = NAN;
    cr_assert_eq(pw_program_param_write(p, 0, PW_PARAM_GRAD, gr), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_program_optimizer_step(p, 1), PW_ERR_NUMERIC);
    cr_expect(strstr(pw_last_error(), pp.name) != NULL, "%s", pw_last_error());
    cr_expect_eq(pw_program_param_read(p, 0, PW_PARAM_GRAD, 1, gr), PW_ERR_INVALID_ARG);
    cr_expect_eq(pw_program_param_read(p, 99, PW_PARAM_DATA, 0, gr), PW_ERR_INVALID_ARG);
    free(gr);
    pw_program_destroy(p);
    pw_graph_destroy(g);
}

/* "hostdev" spreads the ranks over its two devices (rank r on r mod 2);
 * "hostdev:1" puts every stage on device 1; one program alone takes 0. */
Test(backend, bare_name_spreads_ranks_over_devices, .timeout = TIMEOUT_S)
{
    register_hostdev();
    pw_graph *g = parse(MLP);
    pw_dataset *d = dataset(g, 0);
    run_cfg r = {.device = "hostdev", .stages = 3, .kind = PW_SCHEDULE_1F1B};
    memset(hd_opened, 0, sizeof hd_opened);
    pw_pipeline *pl = make(g, d, &r);
    cr_expect_eq(hd_opened[0], 2, "ranks 0 and 2 on device 0 (%d programs)", hd_opened[0]);
    cr_expect_eq(hd_opened[1], 1, "rank 1 on device 1 (%d programs)", hd_opened[1]);
    pw_pipeline_destroy(pl);
    r.device = "hostdev:1";
    memset(hd_opened, 0, sizeof hd_opened);
    pl = make(g, d, &r);
    cr_expect_eq(hd_opened[0], 0);
    cr_expect_eq(hd_opened[1], 3);
    pw_pipeline_destroy(pl);
    pw_program_config pc = {.graph = g, .micro_batch = 4, .optim = pw_optim_defaults(PW_OPTIM_SGD),
                            .device = "hostdev"};
    pw_program *p;
    memset(hd_opened, 0, sizeof hd_opened);
    cr_assert_eq(pw_program_create(&pc, &p), PW_OK, "%s", pw_last_error());
    cr_expect_eq(hd_opened[0], 1);
    pw_program_destroy(p);
    pc.device = "hostdev:2";
    cr_expect_eq(pw_program_create(&pc, &p), PW_ERR_INVALID_ARG, "no device 2");
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* Clipping reads and scales the gradients through host copies on a device:
 * the CPU's bytes, both where the engine clips (no tie across stages: the
 * MLP) and where the pipeline does after summing a tie (the GPT). A small
 * limit so that every step clips. */
Test(backend, clipping_matches_the_cpu, .timeout = TIMEOUT_S)
{
    register_hostdev();
    for (int gpt = 0; gpt < 2; gpt++) {
        pw_graph *g = parse(gpt ? GPT : MLP);
        pw_dataset *d = dataset(g, gpt);
        run_cfg r = {.device = "cpu", .stages = 2, .kind = PW_SCHEDULE_ZB_H1, .clip = 0.05};
        result cpu = run(g, d, &r);
        r.device = "hostdev";
        result dev = run(g, d, &r);
        expect_same(&cpu, &dev, gpt ? "GPT, clipped: hostdev vs cpu" : "MLP, clipped: hostdev vs cpu");
        r.clip = 0;
        result unclipped = run(g, d, &r);
        cr_expect(memcmp(unclipped.params, dev.params, (size_t)dev.count * sizeof(float)) != 0,
                  "the limit never clipped: the test would prove nothing");
        free(unclipped.params);
        free(cpu.params);
        free(dev.params);
        pw_dataset_destroy(d);
        pw_graph_destroy(g);
    }
}

/* ------------------------------------------ asynchronous device programs */

typedef struct async_case {
    pw_schedule_kind kind;
    int stages;
} async_case;

ParameterizedTestParameters(backend, async_device_every_schedule)
{
    static async_case cases[6 * 4];
    static const pw_schedule_kind kinds[] = {PW_SCHEDULE_GPIPE, PW_SCHEDULE_1F1B, PW_SCHEDULE_INTERLEAVED,
                                             PW_SCHEDULE_ZB_H1, PW_SCHEDULE_ZB_H2, PW_SCHEDULE_ZB_V};
    int n = 0;
    for (int k = 0; k < 6; k++)
        for (int s = 1; s <= 4; s++) cases[n++] = (async_case){kinds[k], s};
    return cr_make_param_array(async_case, cases, (size_t)n);
}

/* Every schedule × 1-4 stages with completions that come later from another
 * thread (the engine's pending path, downloads landing only at completion):
 * the CPU's bytes — loss per step, evaluation, parameters. */
ParameterizedTest(async_case *c, backend, async_device_every_schedule, .timeout = TIMEOUT_S)
{
    register_hostdev();
    pw_graph *g = parse(MLP);
    pw_dataset *d = dataset(g, 0);
    run_cfg r = {.device = "cpu", .stages = c->stages, .kind = c->kind};
    if (c->kind == PW_SCHEDULE_INTERLEAVED || c->kind == PW_SCHEDULE_ZB_V) r.chunks_per_rank = 2;
    if (c->kind == PW_SCHEDULE_INTERLEAVED && c->stages == 3) { /* micro-batches: a multiple of 3 */
        r.batch = 24;
        r.micro = 6;
    }
    result cpu = run(g, d, &r);
    r.device = "hostdev-async:0"; /* one device: the messages stay there */
    unsigned before = hd_jobs_run();
    result dev = run(g, d, &r);
    cr_assert_gt(hd_jobs_run(), before, "no call completed asynchronously");
    cr_expect_eq(hd_rec_violations, 0, "record brackets misused");
    cr_expect_gt(hd_rec_count, 0, "no training call was bracketed for recording");
    char what[128];
    snprintf(what, sizeof what, "MLP, %d stages, %s: hostdev-async vs cpu", c->stages,
             pw_schedule_kind_name(c->kind));
    expect_same(&cpu, &dev, what);
    free(cpu.params);
    free(dev.params);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* The pipeline's own paths on an asynchronous device: the tied GPT head
 * (the optimizer outside the engine), clipping, interleaved chunks. */
Test(backend, async_device_pipeline_paths, .timeout = TIMEOUT_S)
{
    register_hostdev();
    pw_graph *g = parse(GPT);
    pw_dataset *d = dataset(g, 1);
    static const run_cfg cfgs[] = {
        {.stages = 3, .kind = PW_SCHEDULE_1F1B},
        {.stages = 2, .kind = PW_SCHEDULE_ZB_H1, .clip = 0.05},
        {.stages = 2, .kind = PW_SCHEDULE_INTERLEAVED, .chunks_per_rank = 2, .recompute = 1},
    };
    for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++) {
        run_cfg r = cfgs[i];
        r.device = "cpu";
        result cpu = run(g, d, &r);
        r.device = "hostdev-async";
        result dev = run(g, d, &r);
        char what[96];
        snprintf(what, sizeof what, "GPT case %zu: hostdev-async vs cpu", i);
        expect_same(&cpu, &dev, what);
        free(cpu.params);
        free(dev.params);
    }
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* Programs as engine chunks (stages/train/program_stage.h) on an asynchronous
 * device, through the runner (scheduler/runner.h): the loss read at
 * completion, the messages landing at completion, the replicas' sum through
 * the backend's span memory — the CPU's bytes. */
typedef struct ps_model {
    const pw_graph *g;
    const pw_dataset *d;
    const char *device;
    int *cuts;
    int n_chunks, replicas;
    pw_program *progs[16];
    pw_program_stage *stages[16];
} ps_model;

static pw_status ps_make(void *user, const pw_chunk_spec *c, pw_engine_chunk *out)
{
    ps_model *m = user;
    if (!m->cuts) {
        pw_partition part;
        PW_CHECK(pw_partition_make(m->g, c->n_chunks, PW_PARTITION_FLOPS, &part));
        m->cuts = malloc(((size_t)c->n_chunks + 1) * sizeof *m->cuts);
        cr_assert_not_null(m->cuts);
        memcpy(m->cuts, part.begin, ((size_t)c->n_chunks + 1) * sizeof *m->cuts);
        pw_partition_free(&part);
        m->n_chunks = c->n_chunks;
        m->replicas = c->replicas;
    }
    const int i = c->replica * c->n_chunks + c->chunk;
    cr_assert_lt(i, 16);
    pw_program_config pc = {.graph = m->g, .node_begin = m->cuts[c->chunk], .node_end = m->cuts[c->chunk + 1],
                            .micro_batch = 16 / (c->replicas * c->micro_batches), .loss_batch = 16,
                            .slots = c->slots, .optim = pw_optim_defaults(PW_OPTIM_ADAMW), .device = m->device};
    PW_CHECK(pw_program_create(&pc, &m->progs[i]));
    pw_program_init_params(m->progs[i], 7);
    pw_program_stage_config sc = {.program = m->progs[i], .batch = 16, .micro_batches = c->micro_batches,
                                  .replica = c->replica, .replicas = c->replicas, .data = m->d,
                                  .shuffle = 1, .seed = 7, .async = 1};
    PW_CHECK(pw_program_stage_create(&sc, &m->stages[i]));
    *out = pw_program_stage_chunk(m->stages[i]);
    return PW_OK;
}

static void ps_unmake(void *user, const pw_chunk_spec *c, pw_engine_chunk *chunk)
{
    (void)chunk;
    ps_model *m = user;
    const int i = c->replica * c->n_chunks + c->chunk;
    pw_program_stage_destroy(m->stages[i]);
    pw_program_destroy(m->progs[i]);
}

/* Three steps; the loss sum of each, and replica 0's parameters in graph
 * order (read before pw_runner_destroy unmakes the chunks). */
static void ps_run(const pw_graph *g, const pw_dataset *d, const char *device, const char *schedule, int S,
                   int R, double loss[3], float **params, int64_t *count)
{
    ps_model m = {.g = g, .d = d, .device = device};
    pw_runner_config rc = pw_runner_defaults();
    rc.schedule = schedule;
    rc.micro_batches = 2;
    rc.table = (pw_stage_table){.stages = S, .replicas = R, .make = ps_make, .unmake = ps_unmake, .user = &m};
    rc.pin = 0;
    rc.watchdog_s = 30;
    const pw_backend_i *be;
    int idx;
    cr_assert_eq(pw_backend_find(device, &be, &idx), PW_OK, "%s", pw_last_error());
    if (be->device_memory) rc.span_mem = be->span_memory;
    pw_runner *r;
    cr_assert_eq(pw_runner_create(&rc, &r), PW_OK, "%s: %s", device, pw_last_error());
    for (int s = 0; s < 3; s++) {
        cr_assert_eq(pw_runner_step(r), PW_OK, "%s: %s", device, pw_last_error());
        loss[s] = 0.0;
        for (int k = 0; k < R; k++) {
            double l;
            if (pw_program_stage_loss(m.stages[k * m.n_chunks + m.n_chunks - 1], &l, NULL)) loss[s] += l;
        }
    }
    int64_t total = 0;
    for (int p = 0; p < g->n_params; p++) total += pw_shape_numel(&g->params[p].shape);
    *params = calloc((size_t)total, sizeof **params);
    cr_assert_not_null(*params);
    int64_t off = 0;
    for (int p = 0; p < g->n_params; p++) {
        for (int ch = 0; ch < m.n_chunks; ch++)
            for (int j = 0; j < pw_program_n_params(m.progs[ch]); j++) {
                pw_program_param pp;
                pw_program_param_at(m.progs[ch], j, &pp);
                if (pp.graph_param == p)
                    cr_assert_eq(pw_program_param_read(m.progs[ch], j, PW_PARAM_DATA, 0, *params + off), PW_OK);
            }
        off += pw_shape_numel(&g->params[p].shape);
    }
    *count = total;
    pw_runner_destroy(r);
    free(m.cuts);
}

Test(backend, program_stages_on_an_async_device_match_the_cpu, .timeout = TIMEOUT_S)
{
    register_hostdev();
    pw_graph *g = parse(MLP);
    pw_dataset *d = dataset(g, 0);
    static const struct { const char *schedule; int stages, replicas; } cases[] = {
        {"1f1b", 2, 1}, {"zb-v", 2, 1}, {"interleaved", 2, 2}, {"zb-h1", 3, 2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        double lc[3], ld[3];
        float *pc, *pd;
        int64_t nc, nd;
        unsigned before = hd_jobs_run();
        ps_run(g, d, "cpu", cases[i].schedule, cases[i].stages, cases[i].replicas, lc, &pc, &nc);
        ps_run(g, d, "hostdev-async:0", cases[i].schedule, cases[i].stages, cases[i].replicas, ld, &pd, &nd);
        cr_assert_gt(hd_jobs_run(), before, "%s: no call completed asynchronously", cases[i].schedule);
        cr_assert_eq(nc, nd);
        for (int s = 0; s < 3; s++)
            cr_expect_eq(lc[s], ld[s], "%s S=%d R=%d: step %d loss %.17g (cpu) vs %.17g", cases[i].schedule,
                         cases[i].stages, cases[i].replicas, s + 1, lc[s], ld[s]);
        int64_t ndiff = 0;
        for (int64_t j = 0; j < nc; j++) ndiff += memcmp(&pc[j], &pd[j], sizeof *pc) != 0;
        cr_expect_eq(ndiff, 0, "%s S=%d R=%d: %lld of %lld parameters differ from the cpu's", cases[i].schedule,
                     cases[i].stages, cases[i].replicas, (long long)ndiff, (long long)nc);
        free(pc);
        free(pd);
    }
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* Outside an engine an asynchronous program is driven by hand: submitted
 * reports completion once, wait is the alternative. */
static pw_status g_done_st = PW_ERR_INTERNAL;
static pthread_mutex_t g_done_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_done_cv = PTHREAD_COND_INITIALIZER;
static int g_done_n;
static void on_done(void *arg, pw_status st, const char *msg)
{
    (void)arg;
    (void)msg;
    pthread_mutex_lock(&g_done_mu);
    g_done_st = st;
    g_done_n++;
    pthread_cond_signal(&g_done_cv);
    pthread_mutex_unlock(&g_done_mu);
}

Test(backend, async_program_by_hand, .timeout = TIMEOUT_S)
{
    register_hostdev();
    pw_graph *g = parse(MLP);
    double loss[2];
    for (int async = 0; async < 2; async++) {
        pw_program_config pc = {.graph = g, .micro_batch = 4, .slots = 1,
                                .optim = pw_optim_defaults(PW_OPTIM_SGD), .device = "hostdev-async"};
        pw_program *p;
        cr_assert_eq(pw_program_create(&pc, &p), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_program_set_async(p, async), async);
        pw_program_init_params(p, 1);
        float *x = pw_program_data(p, g->input, 0);
        int32_t *y = pw_program_data(p, g->label, 0);
        for (int i = 0; i < 4 * 24; i++) x[i] = (float)(i % 7) - 3.0f;
        for (int i = 0; i < 4; i++) y[i] = i % 5;
        cr_assert_eq(pw_program_forward(p, 0, 4), PW_OK, "%s", pw_last_error());
        if (async) {
            cr_assert_eq(pw_program_submitted(p, on_done, NULL), 1);
            pthread_mutex_lock(&g_done_mu);
            while (g_done_n < 1) pthread_cond_wait(&g_done_cv, &g_done_mu);
            pthread_mutex_unlock(&g_done_mu);
            cr_assert_eq(g_done_st, PW_OK);
            cr_assert_eq(pw_program_submitted(p, on_done, NULL), 0, "nothing in flight any more");
        } else {
            cr_assert_eq(pw_program_submitted(p, on_done, NULL), 0, "a synchronous program");
        }
        loss[async] = pw_program_loss_sum(p, 0);
        cr_assert_eq(pw_program_backward_input(p, 0), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_program_wait(p), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_program_wait(p), PW_OK);
        pw_program_destroy(p);
    }
    cr_assert_eq(loss[0], loss[1], "loss %.17g (synchronous) vs %.17g (asynchronous)", loss[0], loss[1]);
    cr_assert(loss[0] > 0);
    /* A CPU program has no asynchronous mode. */
    pw_program_config pc = {.graph = g, .micro_batch = 4, .optim = pw_optim_defaults(PW_OPTIM_SGD)};
    pw_program *p;
    cr_assert_eq(pw_program_create(&pc, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_program_set_async(p, 1), 0);
    pw_program_destroy(p);
    pw_graph_destroy(g);
}
