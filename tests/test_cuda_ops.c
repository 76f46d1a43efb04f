/* pipewright — tests for the CUDA backend (stages/ops/cuda/ops.h, device.h).
 *
 * The CPU kernels are the oracle (STYLE 9): every CUDA op runs on random
 * inputs beside its CPU op, and the results must agree within fp32 rounding
 * (TF32 or bf16 rounding for the GEMM tests in those math modes). The error
 * is normalised by the largest reference magnitude of the array: max |gpu −
 * cpu| / max |cpu|. On a mismatch the first few differing elements and the
 * max error are printed. The reductions over rows (linear db, layernorm
 * dw/db, embedding and position-embedding gradients) and the dropout masks
 * must be identical to the CPU's bit for bit, and every op must give the
 * same bits when run twice.
 *
 * Without a GPU (or without a driver) every test that needs one calls
 * cr_skip_test("no CUDA device: ..."); the tests of the no-device errors and
 * of the completion pipe run everywhere. Built without CUDA, the file is one
 * skipped test. Each test creates its CUDA context itself (Criterion runs
 * each test in its own process; STYLE 10).
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#ifndef PW_HAVE_CUDA

Test(cuda, built_without_cuda)
{
    cr_skip_test("built without CUDA (no CUDA compiler when CMake configured this build)");
}

#else

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "runtime/rng.h"
#include "runtime/status.h"
#include "stages/ops/cpu/ops.h"
#include "stages/ops/cuda/device.h"
#include "stages/ops/cuda/ops.h"
#include "stages/ops/optim.h"

/* Normalised-error tolerances. */
#define TOL_EW 1e-6     /* element-wise ops (rounding identical by design) */
#define TOL_RED 2e-6    /* row reductions in double (layernorm, softmax) */
#define TOL_GEMM 2e-5   /* fp32 SGEMM: a different summation order */
#define TOL_TF32 5e-3   /* TF32 tensor cores: 10-bit mantissa products */
/* bf16 tensor cores: 8-bit significands, up to 2·2^-8 per product. With
 * round-to-nearest operands the worst case of these tests is 7.5e-3 (linear
 * (1, 1, 1) with bias, where x·w and b nearly cancel; emulated on the CPU);
 * attention's is 3.4e-3. */
#define TOL_BF16 1.5e-2

/* Bit-exact comparisons with the CPU op need a CPU build that does not
 * contract a·b + c into an FMA (x86-64 without -march has no FMA). Only
 * layernorm's dw has a product in its sum; where the compiler may fuse it,
 * the test compares dw with an unfused reference of its own instead. */
#if defined(__FP_FAST_FMAF)
#define CPU_MAY_FUSE 1
#else
#define CPU_MAY_FUSE 0
#endif

/* One timeout for every test: Criterion 2.4.1's runner leaks a timeout
 * record (48 bytes, reported by LeakSanitizer at exit, which fails the ASan
 * CI step) when tests of one binary run in parallel with different
 * timeouts. */
#define TIMEOUT_S 120

/* ---------------------------------------------------------------- helpers */

#define MAX_BUFS 128

typedef struct gpu {
    pw_cuda_stream s;
    pw_cuda_ops *ops;
    void *bufs[MAX_BUFS];
    int n_bufs;
} gpu;

static void gpu_open(gpu *g, pw_cuda_math math)
{
    memset(g, 0, sizeof *g);
    int n = 0;
    if (pw_cuda_device_count(&n) != PW_OK) cr_skip_test("%s", pw_last_error());
    cr_assert_eq(pw_cuda_stream_create(0, &g->s), PW_OK, "%s", pw_last_error());
    pw_cuda_ops_config oc = {.device = 0, .stream = g->s, .math = math};
    cr_assert_eq(pw_cuda_ops_create(&oc, &g->ops), PW_OK, "%s", pw_last_error());
}

/* Frees every buffer dev() made so far (after the stream is done). */
static void gpu_release(gpu *g)
{
    cr_assert_eq(pw_cuda_sync(g->s), PW_OK, "%s", pw_last_error());
    for (int i = 0; i < g->n_bufs; i++) pw_cuda_free(g->bufs[i]);
    g->n_bufs = 0;
}

static void gpu_close(gpu *g)
{
    gpu_release(g);
    pw_cuda_ops_destroy(g->ops);
    pw_cuda_stream_destroy(g->s);
}

/* A device buffer filled with `src` (bytes), or with a NaN pattern when src
 * is NULL so that an element the op forgets to write shows up. */
static void *dev(gpu *g, const void *src, size_t bytes)
{
    cr_assert_lt(g->n_bufs, MAX_BUFS);
    void *d;
    cr_assert_eq(pw_cuda_malloc(0, bytes, &d), PW_OK, "%s", pw_last_error());
    g->bufs[g->n_bufs++] = d;
    if (src)
        cr_assert_eq(pw_cuda_upload(d, src, bytes), PW_OK, "%s", pw_last_error());
    else
        cr_assert_eq(pw_cuda_memset(d, 0xff, bytes), PW_OK, "%s", pw_last_error());
    return d;
}

static float *dev_f(gpu *g, const float *src, int64_t n)
{
    return dev(g, src, (size_t)(n > 0 ? n : 1) * sizeof(float));
}

/* Host copy of a device array (waits for the device). */
static float *host_f(const float *d, int64_t n)
{
    float *h = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    cr_assert_not_null(h);
    cr_assert_eq(pw_cuda_download(h, d, (size_t)n * sizeof(float)), PW_OK, "%s", pw_last_error());
    return h;
}

static float *rand_f(int64_t n, float lo, float hi, uint64_t seed)
{
    float *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    cr_assert_not_null(p);
    uint64_t key = pw_rng_key(seed, "test_cuda_ops");
    for (int64_t i = 0; i < n; i++) p[i] = lo + (hi - lo) * pw_rng_uniform(key, (uint64_t)i);
    return p;
}

static float *copy_f(const float *src, int64_t n)
{
    float *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    cr_assert_not_null(p);
    memcpy(p, src, (size_t)n * sizeof(float));
    return p;
}

/* max |got − ref| / max |ref| ≤ tol, else print the first differing
 * elements and fail. NaN anywhere in got (and not in ref) fails. */
static void check_close(const char *what, const float *got, const float *ref, int64_t n,
                        double tol)
{
    double maxref = 0.0;
    for (int64_t i = 0; i < n; i++) maxref = fmax(maxref, fabs((double)ref[i]));
    const double norm = maxref > 0.0 ? maxref : 1.0;
    double maxerr = 0.0;
    int64_t worst = -1, bad = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - (double)ref[i]) / norm;
        if (isnan(got[i]) != isnan(ref[i])) e = INFINITY;
        if (isnan(e)) e = 0.0; /* both NaN */
        if (e > maxerr) {
            maxerr = e;
            worst = i;
        }
        if (e > tol && bad++ < 5)
            cr_log_error("%s[%lld]: gpu %.9g cpu %.9g (normalised error %.3g)", what,
                         (long long)i, (double)got[i], (double)ref[i], e);
    }
    cr_assert(maxerr <= tol,
              "%s: %lld of %lld elements differ; max normalised error %.3g at %lld (tolerance "
              "%.3g, max |cpu| %.3g)",
              what, (long long)bad, (long long)n, maxerr, (long long)worst, tol, maxref);
}

/* Download d (n floats) and compare with the CPU's ref. */
static void check_dev(const char *what, const float *d, const float *ref, int64_t n, double tol)
{
    float *h = host_f(d, n);
    check_close(what, h, ref, n, tol);
    free(h);
}

/* Download d (n floats): it must hold ref's bits exactly (memcmp), else
 * print the first differing elements (value and bits) and the max error. */
static void check_bits(const char *what, const float *d, const float *ref, int64_t n)
{
    float *h = host_f(d, n);
    if (n > 0 && memcmp(h, ref, (size_t)n * sizeof(float)) != 0) {
        int64_t bad = 0, first = -1;
        double maxerr = 0.0;
        for (int64_t i = 0; i < n; i++) {
            uint32_t a, b;
            memcpy(&a, &h[i], sizeof a);
            memcpy(&b, &ref[i], sizeof b);
            if (a == b) continue;
            if (first < 0) first = i;
            maxerr = fmax(maxerr, fabs((double)h[i] - (double)ref[i]));
            if (bad++ < 5)
                cr_log_error("%s[%lld]: gpu %.9g (0x%08x) cpu %.9g (0x%08x)", what, (long long)i,
                             (double)h[i], a, (double)ref[i], b);
        }
        cr_assert_fail("%s: %lld of %lld elements differ from the CPU's bits (first at %lld, max "
                       "|gpu − cpu| %.3g)",
                       what, (long long)bad, (long long)n, (long long)first, maxerr);
    }
    free(h);
}

#define OK(call) cr_assert_eq((call), PW_OK, "%s: %s", #call, pw_last_error())

/* ---------------------------------------------------------------- no device */

/* Runs everywhere: without a device every entry point says so clearly;
 * with one, the query is sane. */
Test(cuda_device, no_device_is_a_clear_error, .timeout = TIMEOUT_S)
{
    int n = -1;
    pw_status st = pw_cuda_device_count(&n);
    if (st != PW_OK) {
        cr_assert_eq(st, PW_ERR_UNSUPPORTED);
        cr_assert_eq(n, 0);
        cr_assert(strncmp(pw_last_error(), "no CUDA device", 14) == 0, "message: %s",
                  pw_last_error());
        pw_cuda_stage_config sc = {.device = 0, .name = "stage 0"};
        sc.bytes[PW_CUDA_MEM_PARAMS] = 1024;
        pw_cuda_stage *stg = (pw_cuda_stage *)&n; /* must be reset to NULL */
        cr_assert_eq(pw_cuda_stage_create(&sc, &stg), PW_ERR_UNSUPPORTED);
        cr_assert_null(stg);
        cr_assert(strstr(pw_last_error(), "no CUDA device") != NULL, "%s", pw_last_error());
        pw_cuda_ops_config oc = {0};
        pw_cuda_ops *ops = (pw_cuda_ops *)&n;
        cr_assert_eq(pw_cuda_ops_create(&oc, &ops), PW_ERR_UNSUPPORTED);
        cr_assert_null(ops);
        void *d = &n;
        cr_assert_eq(pw_cuda_malloc(0, 16, &d), PW_ERR_UNSUPPORTED);
        cr_assert_null(d);
        pw_cuda_device_info info;
        cr_assert_eq(pw_cuda_device_query(0, &info), PW_ERR_UNSUPPORTED);
        pw_cuda_stage_destroy(NULL);
        pw_cuda_ops_destroy(NULL);
        pw_cuda_notifier_destroy(NULL);
        return;
    }
    cr_assert_geq(n, 1);
    pw_cuda_device_info info;
    OK(pw_cuda_device_query(0, &info));
    cr_log_info("device 0: %s, cc %d.%d, %d SMs, %zu MiB (%zu free)", info.name, info.cc_major,
                info.cc_minor, info.sm_count, info.total_mem >> 20, info.free_mem >> 20);
    cr_assert_gt(info.total_mem, 0);
    cr_assert_leq(info.free_mem, info.total_mem);
    cr_assert_gt(strlen(info.name), 0);
    cr_assert_eq(pw_cuda_device_query(n, &info), PW_ERR_INVALID_ARG);
}

/* Runs everywhere: the names round-trip, anything else is refused; with a
 * device, a context refuses a math value outside the enum. */
Test(cuda_device, math_mode_names, .timeout = TIMEOUT_S)
{
    static const pw_cuda_math modes[] = {PW_CUDA_MATH_FP32, PW_CUDA_MATH_TF32, PW_CUDA_MATH_BF16};
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        pw_cuda_math m = (pw_cuda_math)-1;
        cr_assert_eq(pw_cuda_math_parse(pw_cuda_math_name(modes[i]), &m), 0);
        cr_assert_eq(m, modes[i]);
    }
    cr_assert_str_eq(pw_cuda_math_name(PW_CUDA_MATH_FP32), "fp32");
    cr_assert_str_eq(pw_cuda_math_name(PW_CUDA_MATH_TF32), "tf32");
    cr_assert_str_eq(pw_cuda_math_name(PW_CUDA_MATH_BF16), "bf16");
    cr_assert_str_eq(pw_cuda_math_name((pw_cuda_math)7), "unknown");
    pw_cuda_math m = PW_CUDA_MATH_TF32;
    cr_assert_eq(pw_cuda_math_parse("BF16", &m), 0);
    cr_assert_eq(m, PW_CUDA_MATH_BF16);
    cr_assert_eq(pw_cuda_math_parse("fp16", &m), -1);
    cr_assert_eq(pw_cuda_math_parse("", &m), -1);
    cr_assert_eq(pw_cuda_math_parse(NULL, &m), -1);
    cr_assert_eq(m, PW_CUDA_MATH_BF16, "a refused name leaves *out alone");

    int n;
    if (pw_cuda_device_count(&n) != PW_OK) return;
    pw_cuda_ops_config oc = {.device = 0, .math = (pw_cuda_math)3};
    pw_cuda_ops *ops = (pw_cuda_ops *)&n;
    cr_assert_eq(pw_cuda_ops_create(&oc, &ops), PW_ERR_INVALID_ARG);
    cr_assert_null(ops);
    cr_assert(strstr(pw_last_error(), "math") != NULL, "%s", pw_last_error());
}

/* ---------------------------------------------------------------- notifier */

typedef struct post_ctx {
    pw_cuda_notifier *n;
    pw_cuda_completion *c;
    int count;
} post_ctx;

static void count_done(void *arg) { (*(int *)arg)++; }

static void *poster(void *arg)
{
    post_ctx *p = arg;
    for (int i = 0; i < p->count; i++) pw_cuda_notifier_post(p->n, &p->c[i]);
    return NULL;
}

/* The completion pipe alone, from a foreign thread as the CUDA host-function
 * thread would: no GPU needed. Every completion runs once, on the loop. */
Test(cuda_device, notifier_delivers_from_another_thread, .timeout = TIMEOUT_S)
{
    struct event_base *base = event_base_new();
    cr_assert_not_null(base);
    pw_cuda_notifier *n;
    OK(pw_cuda_notifier_create(base, &n));
    enum { COUNT = 20000 }; /* 160 KB: more than a pipe holds (64 KB), so the writer waits */
    static pw_cuda_completion c[COUNT];
    int done = 0;
    for (int i = 0; i < COUNT; i++) {
        c[i].fn = count_done;
        c[i].arg = &done;
        c[i].notifier = n;
    }
    post_ctx pc = {n, c, COUNT};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, poster, &pc), 0);
    while (done < COUNT) event_base_loop(base, EVLOOP_ONCE);
    pthread_join(th, NULL);
    cr_assert_eq(done, COUNT);
    cr_assert_eq(pw_cuda_notifier_delivered(n), (unsigned long)COUNT);
    pw_cuda_notifier_destroy(n);
    event_base_free(base);
}

/* ---------------------------------------------------------------- stage */

Test(cuda_device, stage_memory_streams_and_completion, .timeout = TIMEOUT_S)
{
    int ndev;
    if (pw_cuda_device_count(&ndev) != PW_OK) cr_skip_test("%s", pw_last_error());
    pw_cuda_stage_config sc = {.device = 0, .name = "stage 1"};
    sc.bytes[PW_CUDA_MEM_PARAMS] = 1 << 20;
    sc.bytes[PW_CUDA_MEM_GRADS] = 1 << 20;
    sc.bytes[PW_CUDA_MEM_ACTIVATIONS] = 4 << 20;
    pw_cuda_stage *st;
    OK(pw_cuda_stage_create(&sc, &st));
    cr_assert_eq(pw_cuda_stage_capacity(st, PW_CUDA_MEM_OPTIM), 0);
    float *a, *b;
    OK(pw_cuda_stage_carve(st, PW_CUDA_MEM_PARAMS, 1000 * sizeof(float), (void **)&a));
    OK(pw_cuda_stage_carve(st, PW_CUDA_MEM_PARAMS, 1000 * sizeof(float), (void **)&b));
    cr_assert_eq((uintptr_t)a % 256, 0);
    cr_assert_eq((uintptr_t)b % 256, 0);
    cr_assert_geq((char *)b - (char *)a, 4000);
    void *x;
    cr_assert_eq(pw_cuda_stage_carve(st, PW_CUDA_MEM_PARAMS, 1 << 20, &x), PW_ERR_NOMEM);
    cr_assert(strstr(pw_last_error(), "stage 1") && strstr(pw_last_error(), "parameters"), "%s",
              pw_last_error());
    cr_assert_eq(pw_cuda_stage_carve(st, PW_CUDA_MEM_OPTIM, 4, &x), PW_ERR_NOMEM);
    pw_cuda_stage_reset(st, PW_CUDA_MEM_PARAMS);
    cr_assert_eq(pw_cuda_stage_used(st, PW_CUDA_MEM_PARAMS), 0);

    /* compute → send hand-off, then a completion on the send stream. */
    pw_cuda_ops_config oc = {.device = 0,
                             .stream = pw_cuda_stage_stream(st, PW_CUDA_STREAM_COMPUTE)};
    pw_cuda_ops *ops;
    OK(pw_cuda_ops_create(&oc, &ops));
    float *h = rand_f(1000, -1, 1, 7);
    OK(pw_cuda_upload(a, h, 1000 * sizeof(float)));
    OK(pw_cuda_relu_fwd(ops, a, b, 1000));
    OK(pw_cuda_stage_handoff(st, PW_CUDA_STREAM_COMPUTE, PW_CUDA_STREAM_SEND));
    struct event_base *base = event_base_new();
    pw_cuda_notifier *n;
    OK(pw_cuda_notifier_create(base, &n));
    int done = 0;
    pw_cuda_completion c = {.fn = count_done, .arg = &done};
    OK(pw_cuda_notify(n, pw_cuda_stage_stream(st, PW_CUDA_STREAM_SEND), &c));
    while (!done) event_base_loop(base, EVLOOP_ONCE);
    float ref[1000];
    pw_cpu_relu_fwd(h, ref, 1000);
    check_dev("relu after hand-off", b, ref, 1000, 0.0);
    pw_cuda_notifier_destroy(n);
    event_base_free(base);
    pw_cuda_ops_destroy(ops);
    pw_cuda_stage_destroy(st);
    free(h);
}

/* ---------------------------------------------------------------- linear */

static void run_linear(pw_cuda_math math, double tol)
{
    static const int64_t shapes[][3] = {{1, 1, 1}, {7, 13, 5}, {64, 128, 96}, {33, 257, 511},
                                        {5, 0, 3}};
    gpu g;
    gpu_open(&g, math);
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const int64_t n = shapes[si][0], in = shapes[si][1], out = shapes[si][2];
        char what[96];
        float *x = rand_f(n * in, -1, 1, 1 + si), *w = rand_f(out * in, -1, 1, 2 + si);
        float *b = rand_f(out, -1, 1, 3 + si), *dy = rand_f(n * out, -1, 1, 4 + si);
        float *dx0 = rand_f(n * in, -1, 1, 5 + si), *dw0 = rand_f(out * in, -1, 1, 6 + si);
        float *db0 = rand_f(out, -1, 1, 7 + si);
        float *dx_d0 = dev_f(&g, dx0, n * in);
        float *x_d = dev_f(&g, x, n * in), *w_d = dev_f(&g, w, out * in);
        float *b_d = dev_f(&g, b, out), *dy_d = dev_f(&g, dy, n * out);
        float *y_d = dev_f(&g, NULL, n * out), *dx_d = dev_f(&g, NULL, n * in);
        float *dw_d = dev_f(&g, dw0, out * in), *db_d = dev_f(&g, db0, out);
        float *y = malloc((size_t)(n * out + 1) * sizeof(float));
        float *dx = malloc((size_t)(n * in + 1) * sizeof(float));
        for (int bias = 0; bias < 2; bias++) {
            pw_cpu_linear_fwd(x, w, bias ? b : NULL, y, n, in, out);
            OK(pw_cuda_linear_fwd(g.ops, x_d, w_d, bias ? b_d : NULL, y_d, n, in, out));
            snprintf(what, sizeof what, "linear_fwd%s (%lld, %lld, %lld)", bias ? "" : " no bias",
                     (long long)n, (long long)in, (long long)out);
            check_dev(what, y_d, y, n * out, tol);
        }
        pw_cpu_linear_bwd_input(dy, w, dx, n, in, out, 0);
        OK(pw_cuda_linear_bwd_input(g.ops, dy_d, w_d, dx_d, n, in, out, 0));
        snprintf(what, sizeof what, "linear_bwd_input (%lld, %lld, %lld)", (long long)n,
                 (long long)in, (long long)out);
        check_dev(what, dx_d, dx, n * in, tol);
        pw_cpu_linear_bwd_input(dy, w, dx0, n, in, out, 1);
        OK(pw_cuda_linear_bwd_input(g.ops, dy_d, w_d, dx_d0, n, in, out, 1));
        snprintf(what, sizeof what, "linear_bwd_input accumulate (%lld, %lld, %lld)",
                 (long long)n, (long long)in, (long long)out);
        check_dev(what, dx_d0, dx0, n * in, tol);
        pw_cpu_linear_bwd_weight(dy, x, dw0, db0, n, in, out);
        OK(pw_cuda_linear_bwd_weight(g.ops, dy_d, x_d, dw_d, db_d, n, in, out));
        snprintf(what, sizeof what, "linear_bwd_weight dw (%lld, %lld, %lld)", (long long)n,
                 (long long)in, (long long)out);
        check_dev(what, dw_d, dw0, out * in, tol);
        snprintf(what, sizeof what, "linear_bwd_weight db (%lld, %lld, %lld)", (long long)n,
                 (long long)in, (long long)out);
        check_bits(what, db_d, db0, out); /* row order: the CPU's, in every math mode */
        free(x), free(w), free(b), free(dy), free(dx0), free(dw0), free(db0), free(y), free(dx);
    }
    gpu_close(&g);
}

Test(cuda_ops, linear_fp32, .timeout = TIMEOUT_S) { run_linear(PW_CUDA_MATH_FP32, TOL_GEMM); }
Test(cuda_ops, linear_tf32, .timeout = TIMEOUT_S) { run_linear(PW_CUDA_MATH_TF32, TOL_TF32); }
Test(cuda_ops, linear_bf16, .timeout = TIMEOUT_S) { run_linear(PW_CUDA_MATH_BF16, TOL_BF16); }

/* ---------------------------------------------------------------- element-wise */

Test(cuda_ops, relu_gelu_add_copy, .timeout = TIMEOUT_S)
{
    gpu g;
    gpu_open(&g, PW_CUDA_MATH_FP32);
    const int64_t n = 10007;
    float *x = rand_f(n, -6, 6, 11), *x2 = rand_f(n, -3, 3, 12), *dy = rand_f(n, -1, 1, 13);
    float *acc0 = rand_f(n, -1, 1, 14);
    float *ref = malloc((size_t)n * sizeof(float)), *ref2 = copy_f(acc0, n);
    float *x_d = dev_f(&g, x, n), *x2_d = dev_f(&g, x2, n), *dy_d = dev_f(&g, dy, n);
    float *y_d = dev_f(&g, NULL, n), *dx_d = dev_f(&g, NULL, n);

    pw_cpu_relu_fwd(x, ref, n);
    OK(pw_cuda_relu_fwd(g.ops, x_d, y_d, n));
    check_dev("relu_fwd", y_d, ref, n, 0.0);
    float *y = host_f(y_d, n);
    pw_cpu_relu_bwd_input(y, dy, ref, n, 0);
    OK(pw_cuda_relu_bwd_input(g.ops, y_d, dy_d, dx_d, n, 0));
    check_dev("relu_bwd_input", dx_d, ref, n, 0.0);
    float *acc_d = dev_f(&g, acc0, n);
    pw_cpu_relu_bwd_input(y, dy, ref2, n, 1);
    OK(pw_cuda_relu_bwd_input(g.ops, y_d, dy_d, acc_d, n, 1));
    check_dev("relu_bwd_input accumulate", acc_d, ref2, n, TOL_EW);
    free(y);

    pw_cpu_gelu_fwd(x, ref, n);
    OK(pw_cuda_gelu_fwd(g.ops, x_d, y_d, n));
    check_dev("gelu_fwd", y_d, ref, n, TOL_EW);
    pw_cpu_gelu_bwd_input(x, dy, ref, n, 0);
    OK(pw_cuda_gelu_bwd_input(g.ops, x_d, dy_d, dx_d, n, 0));
    check_dev("gelu_bwd_input", dx_d, ref, n, TOL_EW);
    memcpy(ref2, acc0, (size_t)n * sizeof(float));
    acc_d = dev_f(&g, acc0, n);
    pw_cpu_gelu_bwd_input(x, dy, ref2, n, 1);
    OK(pw_cuda_gelu_bwd_input(g.ops, x_d, dy_d, acc_d, n, 1));
    check_dev("gelu_bwd_input accumulate", acc_d, ref2, n, TOL_EW);

    pw_cpu_add_fwd(x, x2, ref, n);
    OK(pw_cuda_add_fwd(g.ops, x_d, x2_d, y_d, n));
    check_dev("add_fwd", y_d, ref, n, 0.0);
    pw_cpu_copy_grad(dy, ref, n, 0);
    OK(pw_cuda_copy_grad(g.ops, dy_d, dx_d, n, 0));
    check_dev("copy_grad", dx_d, ref, n, 0.0);
    memcpy(ref2, acc0, (size_t)n * sizeof(float));
    acc_d = dev_f(&g, acc0, n);
    pw_cpu_copy_grad(dy, ref2, n, 1);
    OK(pw_cuda_copy_grad(g.ops, dy_d, acc_d, n, 1));
    check_dev("copy_grad accumulate", acc_d, ref2, n, 0.0);

    free(x), free(x2), free(dy), free(acc0), free(ref), free(ref2);
    gpu_close(&g);
}

/* ---------------------------------------------------------------- layernorm */

/* dw (d) += Σ_r dy·((x − mean)·rstd), row by row: the CPU op's expression
 * and order, with the product rounded before the add even where the
 * compiler would fuse them (volatile). */
static void ln_dw_unfused(const float *x, const float *mean, const float *rstd, const float *dy,
                          float *dw, int64_t n, int64_t d)
{
    for (int64_t r = 0; r < n; r++)
        for (int64_t j = 0; j < d; j++) {
            volatile float p = dy[r * d + j] * ((x[r * d + j] - mean[r]) * rstd[r]);
            dw[j] += p;
        }
}

/* Runs layernorm bwd_weight on both sides from dw0/db0 (d each, on the
 * host, left unchanged) and compares bit for bit: db with the CPU op, dw
 * with the unfused reference and, where the CPU build cannot fuse, with
 * the CPU op too. */
static void check_ln_weight(gpu *g, const char *shape, const float *x, const float *mean,
                            const float *rstd, const float *dy, const float *dw0,
                            const float *db0, const float *x_d, const float *mean_d,
                            const float *rstd_d, const float *dy_d, int64_t n, int64_t d)
{
    char what[128];
    float *dw = copy_f(dw0, d), *db = copy_f(db0, d), *dw_ref = copy_f(dw0, d);
    float *dw_d = dev_f(g, dw0, d), *db_d = dev_f(g, db0, d);
    pw_cpu_layernorm_bwd_weight(x, mean, rstd, dy, dw, db, n, d);
    ln_dw_unfused(x, mean, rstd, dy, dw_ref, n, d);
    OK(pw_cuda_layernorm_bwd_weight(g->ops, x_d, mean_d, rstd_d, dy_d, dw_d, db_d, n, d));
    snprintf(what, sizeof what, "layernorm_bwd_weight db %s", shape);
    check_bits(what, db_d, db, d);
    snprintf(what, sizeof what, "layernorm_bwd_weight dw %s (unfused reference)", shape);
    check_bits(what, dw_d, dw_ref, d);
    snprintf(what, sizeof what, "layernorm_bwd_weight dw %s", shape);
    if (CPU_MAY_FUSE)
        check_dev(what, dw_d, dw, d, TOL_EW);
    else
        check_bits(what, dw_d, dw, d);
    free(dw), free(db), free(dw_ref);
}

Test(cuda_ops, layernorm, .timeout = TIMEOUT_S)
{
    static const int64_t shapes[][2] = {{1, 1}, {5, 7}, {64, 768}, {3, 1000}, {2, 4099}};
    gpu g;
    gpu_open(&g, PW_CUDA_MATH_FP32);
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const int64_t n = shapes[si][0], d = shapes[si][1];
        char what[96];
        /* An offset mean tests the two-pass variance. */
        float *x = rand_f(n * d, 2, 4, 21 + si), *w = rand_f(d, 0.5f, 1.5f, 22 + si);
        float *b = rand_f(d, -1, 1, 23 + si), *dy = rand_f(n * d, -1, 1, 24 + si);
        float *dx0 = rand_f(n * d, -1, 1, 25 + si), *dw0 = rand_f(d, -1, 1, 26 + si);
        float *db0 = rand_f(d, -1, 1, 27 + si);
        float *y = malloc((size_t)(n * d) * sizeof(float)),
              *dx = malloc((size_t)(n * d) * sizeof(float));
        float *mean = malloc((size_t)n * sizeof(float)), *rstd = malloc((size_t)n * sizeof(float));
        float *x_d = dev_f(&g, x, n * d), *w_d = dev_f(&g, w, d), *b_d = dev_f(&g, b, d);
        float *dy_d = dev_f(&g, dy, n * d), *y_d = dev_f(&g, NULL, n * d);
        float *mean_d = dev_f(&g, NULL, n), *rstd_d = dev_f(&g, NULL, n);
        float *dx_d = dev_f(&g, NULL, n * d), *dx0_d = dev_f(&g, dx0, n * d);

        pw_cpu_layernorm_fwd(x, w, b, y, mean, rstd, n, d, 1e-5f);
        OK(pw_cuda_layernorm_fwd(g.ops, x_d, w_d, b_d, y_d, mean_d, rstd_d, n, d, 1e-5f));
        snprintf(what, sizeof what, "layernorm_fwd y (%lld, %lld)", (long long)n, (long long)d);
        check_dev(what, y_d, y, n * d, TOL_RED);
        snprintf(what, sizeof what, "layernorm_fwd mean (%lld, %lld)", (long long)n, (long long)d);
        check_dev(what, mean_d, mean, n, TOL_RED);
        snprintf(what, sizeof what, "layernorm_fwd rstd (%lld, %lld)", (long long)n, (long long)d);
        check_dev(what, rstd_d, rstd, n, TOL_RED);
        /* Backward from the CPU's statistics on both sides, so only the
         * backward itself is compared. */
        OK(pw_cuda_upload(mean_d, mean, (size_t)n * sizeof(float)));
        OK(pw_cuda_upload(rstd_d, rstd, (size_t)n * sizeof(float)));
        pw_cpu_layernorm_bwd_input(x, w, mean, rstd, dy, dx, n, d, 0);
        OK(pw_cuda_layernorm_bwd_input(g.ops, x_d, w_d, mean_d, rstd_d, dy_d, dx_d, n, d, 0));
        snprintf(what, sizeof what, "layernorm_bwd_input (%lld, %lld)", (long long)n, (long long)d);
        check_dev(what, dx_d, dx, n * d, TOL_RED);
        pw_cpu_layernorm_bwd_input(x, w, mean, rstd, dy, dx0, n, d, 1);
        OK(pw_cuda_layernorm_bwd_input(g.ops, x_d, w_d, mean_d, rstd_d, dy_d, dx0_d, n, d, 1));
        snprintf(what, sizeof what, "layernorm_bwd_input accumulate (%lld, %lld)", (long long)n,
                 (long long)d);
        check_dev(what, dx0_d, dx0, n * d, TOL_RED);
        snprintf(what, sizeof what, "(%lld, %lld)", (long long)n, (long long)d);
        check_ln_weight(&g, what, x, mean, rstd, dy, dw0, db0, x_d, mean_d, rstd_d, dy_d, n, d);
        free(x), free(w), free(b), free(dy), free(dx0), free(dw0), free(db0);
        free(y), free(dx), free(mean), free(rstd);
    }
    gpu_close(&g);
}

/* ---------------------------------------------------------------- softmax xent */

Test(cuda_ops, softmax_xent, .timeout = TIMEOUT_S)
{
    static const int64_t shapes[][2] = {{1, 1}, {13, 10}, {64, 1000}, {5, 3001}};
    gpu g;
    gpu_open(&g, PW_CUDA_MATH_FP32);
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const int64_t n = shapes[si][0], C = shapes[si][1];
        char what[96];
        float *logits = rand_f(n * C, -8, 8, 31 + si), *acc0 = rand_f(n * C, -1, 1, 32 + si);
        int32_t *labels = malloc((size_t)n * sizeof(int32_t));
        uint64_t key = pw_rng_key(33 + si, "labels");
        for (int64_t r = 0; r < n; r++)
            labels[r] = (int32_t)(pw_rng_u64(key, (uint64_t)r) % (uint64_t)C);
        if (n > 2) labels[1] = -1, labels[2] = (int32_t)C; /* caller errors: handled, no crash */
        float *probs = malloc((size_t)(n * C) * sizeof(float)),
              *dl = malloc((size_t)(n * C) * sizeof(float));
        float *l_d = dev_f(&g, logits, n * C), *p_d = dev_f(&g, NULL, n * C);
        float *dl_d = dev_f(&g, NULL, n * C), *acc_d = dev_f(&g, acc0, n * C);
        int32_t *lab_d = dev(&g, labels, (size_t)n * sizeof(int32_t));
        double *rows_d = dev(&g, NULL, (size_t)n * sizeof(double)),
               *sum_d = dev(&g, NULL, sizeof(double));

        double loss = pw_cpu_softmax_xent_fwd(logits, labels, probs, n, C);
        OK(pw_cuda_softmax_xent_fwd(g.ops, l_d, lab_d, p_d, rows_d, n, C));
        OK(pw_cuda_sum_d(g.ops, rows_d, n, sum_d, 0));
        snprintf(what, sizeof what, "softmax_xent_fwd probs (%lld, %lld)", (long long)n,
                 (long long)C);
        check_dev(what, p_d, probs, n * C, TOL_RED);
        double got;
        OK(pw_cuda_download(&got, sum_d, sizeof got));
        cr_assert(fabs(got - loss) <= 1e-5 * fmax(1.0, fabs(loss)),
                  "softmax_xent_fwd loss (%lld, %lld): gpu %.12g cpu %.12g", (long long)n,
                  (long long)C, got, loss);
        OK(pw_cuda_sum_d(g.ops, rows_d, n, sum_d, 1));
        double twice;
        OK(pw_cuda_download(&twice, sum_d, sizeof twice));
        cr_assert_eq(twice, got + got, "sum_d accumulate: %.17g vs 2 × %.17g", twice, got);

        /* Backward from the same probabilities on both sides. */
        OK(pw_cuda_upload(p_d, probs, (size_t)(n * C) * sizeof(float)));
        const float scale = 1.0f / (float)(4 * n);
        pw_cpu_softmax_xent_bwd(probs, labels, dl, n, C, scale, 0);
        OK(pw_cuda_softmax_xent_bwd(g.ops, p_d, lab_d, dl_d, n, C, scale, 0));
        snprintf(what, sizeof what, "softmax_xent_bwd (%lld, %lld)", (long long)n, (long long)C);
        check_dev(what, dl_d, dl, n * C, TOL_EW);
        pw_cpu_softmax_xent_bwd(probs, labels, acc0, n, C, scale, 1);
        OK(pw_cuda_softmax_xent_bwd(g.ops, p_d, lab_d, acc_d, n, C, scale, 1));
        snprintf(what, sizeof what, "softmax_xent_bwd accumulate (%lld, %lld)", (long long)n,
                 (long long)C);
        check_dev(what, acc_d, acc0, n * C, TOL_EW);
        free(logits), free(acc0), free(labels), free(probs), free(dl);
    }
    gpu_close(&g);
}

/* ---------------------------------------------------------------- embeddings */

Test(cuda_ops, embedding_and_position, .timeout = TIMEOUT_S)
{
    gpu g;
    gpu_open(&g, PW_CUDA_MATH_FP32);
    const int64_t vocab = 50, d = 33, n = 100;
    int32_t tokens[100];
    uint64_t key = pw_rng_key(41, "tokens");
    for (int64_t r = 0; r < n; r++)
        tokens[r] = (int32_t)(pw_rng_u64(key, (uint64_t)r) % 20); /* repeats */
    tokens[7] = -1, tokens[8] = (int32_t)vocab; /* out of range: zero row, no gradient */
    float *w = rand_f(vocab * d, -1, 1, 42), *dy = rand_f(n * d, -1, 1, 43);
    float *dw = rand_f(vocab * d, -1, 1, 44), *y = malloc((size_t)(n * d) * sizeof(float));
    int32_t *tok_d = dev(&g, tokens, sizeof tokens);
    float *w_d = dev_f(&g, w, vocab * d), *dy_d = dev_f(&g, dy, n * d);
    float *dw_d = dev_f(&g, dw, vocab * d), *y_d = dev_f(&g, NULL, n * d);
    pw_cpu_embedding_fwd(tokens, w, y, n, vocab, d);
    OK(pw_cuda_embedding_fwd(g.ops, tok_d, w_d, y_d, n, vocab, d));
    check_dev("embedding_fwd", y_d, y, n * d, 0.0);
    pw_cpu_embedding_bwd_weight(tokens, dy, dw, n, vocab, d);
    OK(pw_cuda_embedding_bwd_weight(g.ops, tok_d, dy_d, dw_d, n, vocab, d));
    check_bits("embedding_bwd_weight", dw_d, dw, vocab * d);

    const int64_t batch = 3, T = 17, Tmax = 20, dp = 24;
    float *x = rand_f(batch * T * dp, -1, 1, 45), *pw = rand_f(Tmax * dp, -1, 1, 46);
    float *pdy = rand_f(batch * T * dp, -1, 1, 47), *pdw = rand_f(Tmax * dp, -1, 1, 48);
    float *py = malloc((size_t)(batch * T * dp) * sizeof(float));
    float *x_d = dev_f(&g, x, batch * T * dp), *pw_d = dev_f(&g, pw, Tmax * dp);
    float *pdy_d = dev_f(&g, pdy, batch * T * dp), *pdw_d = dev_f(&g, pdw, Tmax * dp);
    float *py_d = dev_f(&g, NULL, batch * T * dp);
    pw_cpu_pos_embedding_fwd(x, pw, py, batch, T, dp);
    OK(pw_cuda_pos_embedding_fwd(g.ops, x_d, pw_d, py_d, batch, T, dp));
    check_dev("pos_embedding_fwd", py_d, py, batch * T * dp, 0.0);
    pw_cpu_pos_embedding_bwd_weight(pdy, pdw, batch, T, dp);
    OK(pw_cuda_pos_embedding_bwd_weight(g.ops, pdy_d, pdw_d, batch, T, dp));
    check_bits("pos_embedding_bwd_weight", pdw_d, pdw, Tmax * dp);
    free(w), free(dy), free(dw), free(y), free(x), free(pw), free(pdy), free(pdw), free(py);
    gpu_close(&g);
}

/* ---------------------------------------------------------------- reductions over rows */

/* The kernels that add rows into columns (linear db, layernorm dw/db, the
 * embedding gradients) work in tiles of 32 columns × 128 or 256 rows and
 * keep the CPU's order of additions, so their bits must be the CPU op's.
 * Shapes: one row, rows around the tile heights (127, 128, 129, 255, 256,
 * 257), several tiles with a partial last one, columns not a multiple of
 * 32, and more columns than one grid covers (WIDE: 65535 blocks of 32
 * columns, then a second round). The accumulators start from random values
 * (the ops ADD into them), and column 0 of db starts at −0 with −0 in every
 * row: the sum must stay −0, which a kernel that pads a tile with +0 would
 * break. */
#define WIDE (65535 * 32 + 65)

Test(cuda_ops, reductions_over_rows_bit_exact, .timeout = TIMEOUT_S)
{
    gpu g;
    gpu_open(&g, PW_CUDA_MATH_FP32);
    char what[128];

    /* linear db (in = 0: the GEMM is skipped, db alone). */
    static const int64_t db_shapes[][2] = {{1, 1},    {1, 33},   {127, 32}, {255, 31},
                                           {256, 64}, {257, 65}, {700, 100}, {1030, 773},
                                           {3, WIDE}};
    for (size_t si = 0; si < sizeof db_shapes / sizeof db_shapes[0]; si++) {
        const int64_t n = db_shapes[si][0], out = db_shapes[si][1];
        float *dy = rand_f(n * out, -1, 1, 200 + si), *db = rand_f(out, -1, 1, 220 + si);
        db[0] = -0.0f;
        for (int64_t r = 0; r < n; r++) dy[r * out] = -0.0f;
        float *dy_d = dev_f(&g, dy, n * out), *db_d = dev_f(&g, db, out);
        float *unused_d = dev_f(&g, NULL, 1);
        pw_cpu_linear_bwd_weight(dy, NULL, NULL, db, n, 0, out);
        cr_assert(signbit(db[0]) && db[0] == 0.0f, "the CPU's −0 sum");
        OK(pw_cuda_linear_bwd_weight(g.ops, dy_d, unused_d, unused_d, db_d, n, 0, out));
        snprintf(what, sizeof what, "linear_bwd_weight db (n %lld, out %lld)", (long long)n,
                 (long long)out);
        check_bits(what, db_d, db, out);
        free(dy), free(db);
        gpu_release(&g);
    }

    /* layernorm dw/db (any mean and rstd will do: the sums are compared). */
    static const int64_t ln_shapes[][2] = {{1, 1},    {1, 40},   {127, 33}, {128, 32},
                                           {129, 31}, {300, 70}, {1030, 768}, {2, WIDE}};
    for (size_t si = 0; si < sizeof ln_shapes / sizeof ln_shapes[0]; si++) {
        const int64_t n = ln_shapes[si][0], d = ln_shapes[si][1];
        float *x = rand_f(n * d, -2, 2, 240 + si), *dy = rand_f(n * d, -1, 1, 250 + si);
        float *mean = rand_f(n, -1, 1, 260 + si), *rstd = rand_f(n, 0.5f, 2.0f, 270 + si);
        float *dw0 = rand_f(d, -1, 1, 280 + si), *db0 = rand_f(d, -1, 1, 290 + si);
        float *x_d = dev_f(&g, x, n * d), *dy_d = dev_f(&g, dy, n * d);
        float *mean_d = dev_f(&g, mean, n), *rstd_d = dev_f(&g, rstd, n);
        snprintf(what, sizeof what, "(n %lld, d %lld)", (long long)n, (long long)d);
        check_ln_weight(&g, what, x, mean, rstd, dy, dw0, db0, x_d, mean_d, rstd_d, dy_d, n, d);
        free(x), free(dy), free(mean), free(rstd), free(dw0), free(db0);
        gpu_release(&g);
    }

    /* Embedding gradient: token patterns against the 128-row tiles. */
    enum { TOK_RANDOM, TOK_SAME, TOK_RUNS, TOK_DISTINCT };
    static const struct {
        int64_t n, vocab, d;
        int pattern;
    } emb[] = {
        {1, 5, 1, TOK_SAME},          /* one row */
        {129, 200, 33, TOK_DISTINCT}, /* no repeats, a 1-row last tile */
        {300, 50, 33, TOK_RANDOM},    /* repeats within and across tiles, invalid tokens */
        {260, 7, 40, TOK_SAME},       /* one token: a chain through every tile */
        {1000, 1000, 70, TOK_RUNS},   /* runs of 150 crossing tile boundaries */
        {3, 2, WIDE, TOK_SAME},       /* a second round of column groups */
    };
    for (size_t si = 0; si < sizeof emb / sizeof emb[0]; si++) {
        const int64_t n = emb[si].n, vocab = emb[si].vocab, d = emb[si].d;
        int32_t *tokens = malloc((size_t)n * sizeof(int32_t));
        cr_assert_not_null(tokens);
        uint64_t key = pw_rng_key(300 + si, "tokens");
        for (int64_t r = 0; r < n; r++) {
            switch (emb[si].pattern) {
            case TOK_RANDOM: /* [−3, vocab + 3): some out of range */
                tokens[r] = (int32_t)(pw_rng_u64(key, (uint64_t)r) % (uint64_t)(vocab + 6)) - 3;
                break;
            case TOK_SAME: tokens[r] = (int32_t)(vocab / 2); break;
            case TOK_RUNS: tokens[r] = (int32_t)((r / 150) % 4); break;
            default: tokens[r] = (int32_t)((r * 7) % vocab); break;
            }
        }
        if (n > 10) tokens[5] = INT32_MIN, tokens[9] = INT32_MAX, tokens[n - 1] = (int32_t)vocab;
        float *dy = rand_f(n * d, -1, 1, 310 + si), *dw = rand_f(vocab * d, -1, 1, 320 + si);
        int32_t *tok_d = dev(&g, tokens, (size_t)n * sizeof(int32_t));
        float *dy_d = dev_f(&g, dy, n * d), *dw_d = dev_f(&g, dw, vocab * d);
        pw_cpu_embedding_bwd_weight(tokens, dy, dw, n, vocab, d);
        OK(pw_cuda_embedding_bwd_weight(g.ops, tok_d, dy_d, dw_d, n, vocab, d));
        snprintf(what, sizeof what, "embedding_bwd_weight (n %lld, vocab %lld, d %lld)",
                 (long long)n, (long long)vocab, (long long)d);
        check_bits(what, dw_d, dw, vocab * d);
        free(tokens), free(dy), free(dw);
        gpu_release(&g);
    }

    /* Position-embedding gradient (T < Tmax: rows past T stay untouched). */
    static const int64_t pos_shapes[][4] = {{1, 1, 1, 1}, {3, 17, 24, 20}, {5, 100, 33, 128}};
    for (size_t si = 0; si < sizeof pos_shapes / sizeof pos_shapes[0]; si++) {
        const int64_t batch = pos_shapes[si][0], T = pos_shapes[si][1], d = pos_shapes[si][2];
        const int64_t Tmax = pos_shapes[si][3];
        float *dy = rand_f(batch * T * d, -1, 1, 330 + si), *dw = rand_f(Tmax * d, -1, 1, 340 + si);
        float *dy_d = dev_f(&g, dy, batch * T * d), *dw_d = dev_f(&g, dw, Tmax * d);
        pw_cpu_pos_embedding_bwd_weight(dy, dw, batch, T, d);
        OK(pw_cuda_pos_embedding_bwd_weight(g.ops, dy_d, dw_d, batch, T, d));
        snprintf(what, sizeof what, "pos_embedding_bwd_weight (batch %lld, T %lld, d %lld)",
                 (long long)batch, (long long)T, (long long)d);
        check_bits(what, dw_d, dw, Tmax * d);
        free(dy), free(dw);
        gpu_release(&g);
    }
    gpu_close(&g);
}

/* ---------------------------------------------------------------- attention */

static void run_attention(pw_cuda_math math, double tol)
{
    /* {batch, T, D, H}: one position; T not a multiple of anything; several
     * heads; T above the block size (NT = 256) so rows span several strides. */
    static const int64_t shapes[][4] = {{1, 1, 8, 1},   {2, 7, 16, 2},   {2, 64, 64, 4},
                                        {1, 128, 96, 12}, {1, 300, 64, 2}, {3, 33, 48, 3}};
    gpu g;
    gpu_open(&g, math);
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const int64_t B = shapes[si][0], T = shapes[si][1], D = shapes[si][2], H = shapes[si][3];
        char what[128];
        const int64_t nqkv = B * T * 3 * D, nout = B * T * D, natt = B * H * T * T;
        float *qkv = rand_f(nqkv, -1, 1, 51 + si), *dout = rand_f(nout, -1, 1, 52 + si);
        float *acc0 = rand_f(nqkv, -1, 1, 53 + si);
        float *out = malloc((size_t)nout * sizeof(float)),
              *att = malloc((size_t)natt * sizeof(float));
        float *dqkv = malloc((size_t)nqkv * sizeof(float)),
              *scr = malloc((size_t)(H * T * T) * sizeof(float));
        float *qkv_d = dev_f(&g, qkv, nqkv), *dout_d = dev_f(&g, dout, nout);
        float *out_d = dev_f(&g, NULL, nout), *att_d = dev_f(&g, NULL, natt);
        float *dqkv_d = dev_f(&g, NULL, nqkv), *acc_d = dev_f(&g, acc0, nqkv);
        float *scr_d = dev_f(&g, NULL, H * T * T);

        pw_cpu_attention_fwd(qkv, out, att, B, T, D, H);
        OK(pw_cuda_attention_fwd(g.ops, qkv_d, out_d, att_d, B, T, D, H));
        snprintf(what, sizeof what, "attention_fwd out (B %lld, T %lld, D %lld, H %lld)",
                 (long long)B, (long long)T, (long long)D, (long long)H);
        check_dev(what, out_d, out, nout, tol);
        snprintf(what, sizeof what, "attention_fwd att (B %lld, T %lld, D %lld, H %lld)",
                 (long long)B, (long long)T, (long long)D, (long long)H);
        float *att_h = host_f(att_d, natt);
        check_close(what, att_h, att, natt, tol);
        /* Causality is exact: nothing above the diagonal. */
        for (int64_t r = 0; r < B * H * T; r++)
            for (int64_t s = r % T + 1; s < T; s++)
                cr_assert_eq(att_h[r * T + s], 0.0f, "%s: att[%lld][%lld] above the diagonal", what,
                             (long long)r, (long long)s);
        free(att_h);

        /* Backward from the CPU's probabilities on both sides. */
        OK(pw_cuda_upload(att_d, att, (size_t)natt * sizeof(float)));
        pw_cpu_attention_bwd_input(qkv, att, dout, dqkv, scr, B, T, D, H, 0);
        OK(pw_cuda_attention_bwd_input(g.ops, qkv_d, att_d, dout_d, dqkv_d, scr_d, B, T, D, H, 0));
        snprintf(what, sizeof what, "attention_bwd_input (B %lld, T %lld, D %lld, H %lld)",
                 (long long)B, (long long)T, (long long)D, (long long)H);
        check_dev(what, dqkv_d, dqkv, nqkv, tol);
        pw_cpu_attention_bwd_input(qkv, att, dout, acc0, scr, B, T, D, H, 1);
        OK(pw_cuda_attention_bwd_input(g.ops, qkv_d, att_d, dout_d, acc_d, scr_d, B, T, D, H, 1));
        snprintf(what, sizeof what,
                 "attention_bwd_input accumulate (B %lld, T %lld, D %lld, H %lld)", (long long)B,
                 (long long)T, (long long)D, (long long)H);
        check_dev(what, acc_d, acc0, nqkv, tol);
        free(qkv), free(dout), free(acc0), free(out), free(att), free(dqkv), free(scr);
    }
    gpu_close(&g);
}

Test(cuda_ops, attention, .timeout = TIMEOUT_S) { run_attention(PW_CUDA_MATH_FP32, TOL_GEMM); }
Test(cuda_ops, attention_tf32, .timeout = TIMEOUT_S)
{
    run_attention(PW_CUDA_MATH_TF32, TOL_TF32);
}
Test(cuda_ops, attention_bf16, .timeout = TIMEOUT_S)
{
    run_attention(PW_CUDA_MATH_BF16, TOL_BF16);
}

/* ---------------------------------------------------------------- dropout */

Test(cuda_ops, dropout_masks_match_cpu, .timeout = TIMEOUT_S)
{
    gpu g;
    gpu_open(&g, PW_CUDA_MATH_FP32);
    const int64_t batch = 4, numel = 1000, n = batch * numel, first = 5;
    const float p = 0.1f;
    /* The program's keying: a key per (seed, step, op); samples by global index. */
    const uint64_t key = pw_rng_key(42, "dropout/step3/node7");
    float *x = rand_f(n, -1, 1, 61), *dy = rand_f(n, -1, 1, 62), *acc0 = rand_f(n, -1, 1, 63);
    float *y = malloc((size_t)n * sizeof(float)), *dx = malloc((size_t)n * sizeof(float));
    uint8_t *mask = malloc((size_t)n), *mask_g = malloc((size_t)n);
    float *x_d = dev_f(&g, x, n), *dy_d = dev_f(&g, dy, n), *y_d = dev_f(&g, NULL, n);
    float *dx_d = dev_f(&g, NULL, n), *acc_d = dev_f(&g, acc0, n);
    uint8_t *mask_d = dev(&g, NULL, (size_t)n);

    pw_cpu_dropout_fwd(x, y, mask, batch, numel, p, key, first);
    OK(pw_cuda_dropout_fwd(g.ops, x_d, y_d, mask_d, batch, numel, p, key, first));
    OK(pw_cuda_download(mask_g, mask_d, (size_t)n));
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++) {
        cr_assert_eq(mask_g[i], mask[i], "dropout mask differs at %lld: gpu %d cpu %d",
                     (long long)i, mask_g[i], mask[i]);
        kept += mask[i];
    }
    cr_assert(kept > n * 8 / 10 && kept < n, "dropout kept %lld of %lld", (long long)kept,
              (long long)n);
    check_dev("dropout_fwd", y_d, y, n, 0.0);
    pw_cpu_dropout_bwd_input(mask, dy, dx, n, p, 0);
    OK(pw_cuda_dropout_bwd_input(g.ops, mask_d, dy_d, dx_d, n, p, 0));
    check_dev("dropout_bwd_input", dx_d, dx, n, 0.0);
    pw_cpu_dropout_bwd_input(mask, dy, acc0, n, p, 1);
    OK(pw_cuda_dropout_bwd_input(g.ops, mask_d, dy_d, acc_d, n, p, 1));
    check_dev("dropout_bwd_input accumulate", acc_d, acc0, n, TOL_EW);

    /* A micro-batch that starts later sees the same masks for the same
     * global samples: samples 7 and 8 alone equal rows 2 and 3 above. */
    OK(pw_cuda_dropout_fwd(g.ops, x_d + 2 * numel, y_d, mask_d, 2, numel, p, key, first + 2));
    OK(pw_cuda_download(mask_g, mask_d, (size_t)(2 * numel)));
    cr_assert(memcmp(mask_g, mask + 2 * numel, (size_t)(2 * numel)) == 0,
              "dropout masks depend on the micro-batch split");
    free(x), free(dy), free(acc0), free(y), free(dx), free(mask), free(mask_g);
    gpu_close(&g);
}

/* ---------------------------------------------------------------- determinism */

/* The ops with reductions give the same bits on a second run. */
Test(cuda_ops, same_bits_twice, .timeout = TIMEOUT_S)
{
    gpu g;
    gpu_open(&g, PW_CUDA_MATH_FP32);
    const int64_t B = 2, T = 100, D = 64, H = 4, n = B * T;
    float *qkv = rand_f(B * T * 3 * D, -1, 1, 71), *dout = rand_f(B * T * D, -1, 1, 72);
    float *w = rand_f(D, 0.5f, 1.5f, 73), *b = rand_f(D, -1, 1, 74);
    float *qkv_d = dev_f(&g, qkv, B * T * 3 * D), *dout_d = dev_f(&g, dout, B * T * D);
    float *w_d = dev_f(&g, w, D), *b_d = dev_f(&g, b, D);
    float *out_d = dev_f(&g, NULL, B * T * D), *att_d = dev_f(&g, NULL, B * H * T * T);
    float *scr_d = dev_f(&g, NULL, H * T * T), *mean_d = dev_f(&g, NULL, n),
          *rstd_d = dev_f(&g, NULL, n);
    float *res[2][3];
    for (int run = 0; run < 2; run++) {
        float *dqkv_d = dev_f(&g, NULL, B * T * 3 * D), *y_d = dev_f(&g, NULL, n * D);
        float *dx_d = dev_f(&g, NULL, n * D);
        OK(pw_cuda_attention_fwd(g.ops, qkv_d, out_d, att_d, B, T, D, H));
        OK(pw_cuda_attention_bwd_input(g.ops, qkv_d, att_d, dout_d, dqkv_d, scr_d, B, T, D, H, 0));
        OK(pw_cuda_layernorm_fwd(g.ops, out_d, w_d, b_d, y_d, mean_d, rstd_d, n, D, 1e-5f));
        OK(pw_cuda_layernorm_bwd_input(g.ops, out_d, w_d, mean_d, rstd_d, dout_d, dx_d, n, D, 0));
        res[run][0] = host_f(dqkv_d, B * T * 3 * D);
        res[run][1] = host_f(y_d, n * D);
        res[run][2] = host_f(dx_d, n * D);
    }
    cr_assert(memcmp(res[0][0], res[1][0], (size_t)(B * T * 3 * D) * sizeof(float)) == 0,
              "attention_bwd_input: different bits on a second run");
    cr_assert(memcmp(res[0][1], res[1][1], (size_t)(n * D) * sizeof(float)) == 0,
              "layernorm_fwd: different bits on a second run");
    cr_assert(memcmp(res[0][2], res[1][2], (size_t)(n * D) * sizeof(float)) == 0,
              "layernorm_bwd_input: different bits on a second run");
    for (int r = 0; r < 2; r++)
        for (int k = 0; k < 3; k++) free(res[r][k]);
    free(qkv), free(dout), free(w), free(b);
    gpu_close(&g);
}

/* ---------------------------------------------------------------- optimizer */

/* Three steps of each optimizer (SGD without and with momentum, AdamW; with
 * and without weight decay; a warm-up + cosine schedule) against
 * pw_optim_update on the same gradients. */
Test(cuda_ops, optimizer_updates, .timeout = TIMEOUT_S)
{
    gpu g;
    gpu_open(&g, PW_CUDA_MATH_FP32);
    const int64_t n = 4099;
    pw_optim_config cfgs[4];
    cfgs[0] = pw_optim_defaults(PW_OPTIM_SGD);
    cfgs[0].momentum = 0.0f;
    cfgs[0].weight_decay = 0.01f;
    cfgs[1] = pw_optim_defaults(PW_OPTIM_SGD);
    cfgs[1].weight_decay = 0.01f;
    cfgs[2] = pw_optim_defaults(PW_OPTIM_ADAMW);
    cfgs[3] = pw_optim_defaults(PW_OPTIM_ADAMW);
    cfgs[3].schedule = PW_LR_COSINE;
    cfgs[3].warmup_steps = 2;
    cfgs[3].decay_steps = 5;
    for (int ci = 0; ci < 4; ci++)
        for (int decay = 0; decay < 2; decay++) {
            char what[96];
            const int sf = pw_optim_state_floats(cfgs[ci].kind);
            float *p = rand_f(n, -1, 1, 81 + ci), *state = calloc((size_t)(sf * n), sizeof(float));
            float *p_d = dev_f(&g, p, n), *s_d = dev_f(&g, state, sf * n),
                  *g_d = dev_f(&g, NULL, n);
            for (int64_t step = 1; step <= 3; step++) {
                float *gr = rand_f(n, -1, 1, 90 + (uint64_t)(10 * ci + step));
                OK(pw_cuda_upload(g_d, gr, (size_t)n * sizeof(float)));
                pw_optim_update(&cfgs[ci], step, p, gr, state, n, decay);
                OK(pw_cuda_optim_update(g.ops, &cfgs[ci], step, p_d, g_d, s_d, n, decay));
                snprintf(what, sizeof what, "optim %s%s%s step %lld params",
                         pw_optim_name(cfgs[ci].kind), ci == 3 ? " (cosine)" : "",
                         decay ? " decay" : "", (long long)step);
                check_dev(what, p_d, p, n, TOL_EW);
                snprintf(what, sizeof what, "optim %s%s%s step %lld state",
                         pw_optim_name(cfgs[ci].kind), ci == 3 ? " (cosine)" : "",
                         decay ? " decay" : "", (long long)step);
                check_dev(what, s_d, state, sf * n, TOL_EW);
                free(gr);
            }
            free(p), free(state);
        }
    gpu_close(&g);
}

/* ---------------------------------------------------------------- metrics, clipping */

Test(cuda_ops, argmax_sumsq_scale, .timeout = TIMEOUT_S)
{
    gpu g;
    gpu_open(&g, PW_CUDA_MATH_FP32);
    /* Accuracy: the program's argmax_correct (first largest logit). */
    const int64_t n = 37, C = 1000;
    float *logits = rand_f(n * C, -4, 4, 101);
    int32_t labels[37];
    int64_t want = 0;
    for (int64_t r = 0; r < n; r++) {
        const float *l = logits + r * C;
        int64_t best = 0;
        for (int64_t c = 1; c < C; c++)
            if (l[c] > l[best]) best = c;
        labels[r] = (int32_t)(r % 3 ? best : (best + 1) % C); /* two thirds right */
        if (r == 5) { /* a tie: the first one counts */
            logits[r * C + 900] = logits[r * C + best];
            labels[r] = (int32_t)(best < 900 ? best : 900);
        }
        want += labels[r] == best || (r == 5);
    }
    float *l_d = dev_f(&g, logits, n * C);
    int32_t *lab_d = dev(&g, labels, sizeof labels);
    double *hits_d = dev(&g, NULL, (size_t)n * sizeof(double)),
           *cnt_d = dev(&g, NULL, sizeof(double));
    OK(pw_cuda_argmax_hits(g.ops, l_d, lab_d, hits_d, n, C));
    OK(pw_cuda_sum_d(g.ops, hits_d, n, cnt_d, 0));
    double got;
    OK(pw_cuda_download(&got, cnt_d, sizeof got));
    cr_assert_eq(got, (double)want, "argmax_hits: %g correct, want %lld", got, (long long)want);

    /* Sum of squares against a double sum; scaling exactly as on the CPU. */
    static const int64_t sizes[] = {0, 1, 127, 100003};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        const int64_t m = sizes[si];
        float *v = rand_f(m, -2, 2, 110 + si);
        double ref = 0.0;
        for (int64_t i = 0; i < m; i++) ref += (double)v[i] * (double)v[i];
        float *v_d = dev_f(&g, v, m);
        double *out_d = dev(&g, NULL, sizeof(double));
        OK(pw_cuda_sumsq_d(g.ops, v_d, m, out_d, 0));
        double s1, s2;
        OK(pw_cuda_download(&s1, out_d, sizeof s1));
        cr_assert(fabs(s1 - ref) <= 1e-10 * fmax(1.0, ref), "sumsq_d (%lld): gpu %.17g cpu %.17g",
                  (long long)m, s1, ref);
        OK(pw_cuda_sumsq_d(g.ops, v_d, m, out_d, 1));
        OK(pw_cuda_download(&s2, out_d, sizeof s2));
        cr_assert_eq(s2, s1 + s1, "sumsq_d accumulate (%lld)", (long long)m);
        for (int64_t i = 0; i < m; i++) v[i] *= 0.37f;
        OK(pw_cuda_scale(g.ops, v_d, m, 0.37f));
        check_dev("scale", v_d, v, m, 0.0);
        free(v);
    }
    free(logits);
    gpu_close(&g);
}

#endif /* PW_HAVE_CUDA */
