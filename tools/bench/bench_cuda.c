/* bench_cuda — the CUDA backend on one GPU:
 *   1. GEMM throughput of the stage's linear ops (pw_cuda_linear_fwd,
 *      _bwd_input, _bwd_weight, bias and db included) against cuBLAS's own
 *      GEMM (cublasGemmEx) on the same shapes, same stream, same compute
 *      type (the --math mode);
 *   2. every other CUDA op against its CPU op (stages/ops/cpu/ops.h) at one
 *      transformer block's sizes: milliseconds per call and the speed-up.
 *
 *   bench_cuda [--math fp32|tf32|bf16] [--iters N] [--rows R] [--width D]
 *              [--heads H] [--seq T] [--threads T]
 *
 * --math is the GEMMs' mode (stages/ops/cuda/ops.h, "Math modes"; default
 * fp32); the older --tf32 0|1 still works and means fp32 or tf32 when
 * --math is not given.
 *
 * GPU times come from CUDA events around N back-to-back calls after two
 * warm-up calls (per-call time = total / N, so launch overhead counts).
 * CPU times are the median of 5 calls with the BLAS on --threads threads.
 * Lines starting with "SUMMARY" are what tests/gpu/run.sh puts in its table.
 *
 * Exit status: 0 after a run, 77 (skipped) when built without CUDA or when
 * there is no CUDA device, 1 on an error. */
#include <stdio.h>

#ifndef PW_HAVE_CUDA

int main(void)
{
    printf("bench_cuda: built without CUDA (no CUDA compiler when CMake configured this build)\n");
    return 77;
}

#else

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "runtime/rng.h"
#include "runtime/status.h"
#include "stages/ops/cpu/ops.h"
#include "stages/ops/cuda/device.h"
#include "stages/ops/cuda/ops.h"
#include "tools/bench/bench_util.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define DIE(...)                                                              \
    do {                                                                      \
        fprintf(stderr, "bench_cuda: " __VA_ARGS__);                          \
        fprintf(stderr, "\n");                                                \
        exit(1);                                                              \
    } while (0)
#define CK(call)                                                              \
    do {                                                                      \
        if ((call) != PW_OK) DIE("%s: %s", #call, pw_last_error());           \
    } while (0)
#define CUK(call)                                                             \
    do {                                                                      \
        cudaError_t e_ = (call);                                              \
        if (e_ != cudaSuccess) DIE("%s: %s", #call, cudaGetErrorString(e_));  \
    } while (0)
#define CBK(call)                                                             \
    do {                                                                      \
        cublasStatus_t s_ = (call);                                           \
        if (s_ != CUBLAS_STATUS_SUCCESS) DIE("%s: %s", #call, cublasGetStatusString(s_)); \
    } while (0)

/* ---------------------------------------------------------------- buffers */

static float *host_rand(int64_t n, uint64_t seed)
{
    float *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (!p) DIE("out of host memory");
    uint64_t key = pw_rng_key(seed, "bench_cuda");
    for (int64_t i = 0; i < n; i++) p[i] = 2.0f * pw_rng_uniform(key, (uint64_t)i) - 1.0f;
    return p;
}

static void *dev_copy(const void *h, size_t bytes)
{
    void *d;
    CK(pw_cuda_malloc(0, bytes, &d));
    if (h) CK(pw_cuda_upload(d, h, bytes));
    else CK(pw_cuda_memset(d, 0, bytes));
    return d;
}

static float *dev_rand(int64_t n, uint64_t seed)
{
    float *h = host_rand(n, seed);
    float *d = dev_copy(h, (size_t)n * sizeof(float));
    free(h);
    return d;
}

/* ---------------------------------------------------------------- timing */

typedef struct timer {
    cudaStream_t s;
    cudaEvent_t a, b;
    int iters;
} timer;

/* Milliseconds per call of `body` on the timer's stream. */
#define GPU_MS(t, out_ms, ...)                                                \
    do {                                                                      \
        for (int w_ = 0; w_ < 2; w_++) { __VA_ARGS__; }                       \
        CUK(cudaEventRecord((t)->a, (t)->s));                                 \
        for (int i_ = 0; i_ < (t)->iters; i_++) { __VA_ARGS__; }              \
        CUK(cudaEventRecord((t)->b, (t)->s));                                 \
        CUK(cudaEventSynchronize((t)->b));                                    \
        float ms_;                                                            \
        CUK(cudaEventElapsedTime(&ms_, (t)->a, (t)->b));                      \
        (out_ms) = (double)ms_ / (t)->iters;                                  \
    } while (0)

/* Median milliseconds of 5 calls of `body` on the CPU (one warm-up). */
#define CPU_MS(out_ms, ...)                                                   \
    do {                                                                      \
        double v_[5];                                                         \
        { __VA_ARGS__; }                                                      \
        for (int r_ = 0; r_ < 5; r_++) {                                      \
            double t0_ = now_s();                                             \
            { __VA_ARGS__; }                                                  \
            v_[r_] = 1e3 * (now_s() - t0_);                                   \
        }                                                                     \
        qsort(v_, 5, sizeof v_[0], cmp_double);                               \
        (out_ms) = v_[2];                                                     \
    } while (0)

/* ---------------------------------------------------------------- GEMMs */

typedef struct shape { int64_t n, in, out; const char *what; } shape;

static double worst_ratio = 1e30;

/* The compute type ops.cu gives each GEMM in mode m. */
static cublasComputeType_t compute_type(pw_cuda_math m)
{
    switch (m) {
    case PW_CUDA_MATH_TF32: return CUBLAS_COMPUTE_32F_FAST_TF32;
    case PW_CUDA_MATH_BF16: return CUBLAS_COMPUTE_32F_FAST_16BF;
    default: return CUBLAS_COMPUTE_32F;
    }
}

/* One fp32 GEMM straight to cuBLAS, column-major, in compute type ct. */
static cublasStatus_t ref_gemm(cublasHandle_t blas, cublasComputeType_t ct, cublasOperation_t ta,
                               cublasOperation_t tb, int64_t m, int64_t n, int64_t k,
                               const float *A, int64_t lda, const float *B, int64_t ldb,
                               float beta, float *C, int64_t ldc)
{
    const float one = 1.0f;
    return cublasGemmEx(blas, ta, tb, (int)m, (int)n, (int)k, &one, A, CUDA_R_32F, (int)lda, B,
                        CUDA_R_32F, (int)ldb, &beta, C, CUDA_R_32F, (int)ldc, ct,
                        CUBLAS_GEMM_DEFAULT);
}

static void bench_gemm(timer *t, pw_cuda_ops *ops, cublasHandle_t blas, cublasComputeType_t ct,
                       const shape *sh)
{
    const int64_t n = sh->n, in = sh->in, out = sh->out;
    float *x = dev_rand(n * in, 1), *w = dev_rand(out * in, 2), *b = dev_rand(out, 3);
    float *dy = dev_rand(n * out, 4), *y = dev_copy(NULL, (size_t)(n * out) * sizeof(float));
    float *dx = dev_copy(NULL, (size_t)(n * in) * sizeof(float));
    float *dw = dev_copy(NULL, (size_t)(out * in) * sizeof(float));
    float *db = dev_copy(NULL, (size_t)out * sizeof(float));
    const double flop = 2.0 * (double)n * (double)in * (double)out;
    double op_ms[3], ref_ms[3];
    GPU_MS(t, op_ms[0], CK(pw_cuda_linear_fwd(ops, x, w, b, y, n, in, out)));
    GPU_MS(t, op_ms[1], CK(pw_cuda_linear_bwd_input(ops, dy, w, dx, n, in, out, 0)));
    GPU_MS(t, op_ms[2], CK(pw_cuda_linear_bwd_weight(ops, dy, x, dw, db, n, in, out)));
    /* The same three GEMMs straight to cuBLAS (ops.cu's operand order). */
    GPU_MS(t, ref_ms[0],
           CBK(ref_gemm(blas, ct, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, w, in, x, in, 0.0f, y,
                        out)));
    GPU_MS(t, ref_ms[1],
           CBK(ref_gemm(blas, ct, CUBLAS_OP_N, CUBLAS_OP_N, in, n, out, w, in, dy, out, 0.0f, dx,
                        in)));
    GPU_MS(t, ref_ms[2],
           CBK(ref_gemm(blas, ct, CUBLAS_OP_N, CUBLAS_OP_T, in, out, n, x, in, dy, out, 1.0f, dw,
                        in)));
    static const char *const names[3] = {"fwd", "bwd_input", "bwd_weight"};
    for (int k = 0; k < 3; k++) {
        const double op_tf = flop / (op_ms[k] * 1e-3) / 1e12;
        const double ref_tf = flop / (ref_ms[k] * 1e-3) / 1e12;
        const double ratio = op_tf / ref_tf;
        if (ratio < worst_ratio) worst_ratio = ratio;
        printf("  %-12s %-10s %6lld x %5lld x %5lld   %7.3f ms  %6.2f TFLOP/s   cuBLAS %6.2f "
               "TFLOP/s   "
               "ratio %.3f\n",
               sh->what, names[k], (long long)n, (long long)in, (long long)out, op_ms[k], op_tf,
               ref_tf, ratio);
        printf("SUMMARY gemm %s.%s %.2f %.2f %.3f\n", sh->what, names[k], op_tf, ref_tf, ratio);
    }
    pw_cuda_free(x), pw_cuda_free(w), pw_cuda_free(b), pw_cuda_free(dy), pw_cuda_free(y);
    pw_cuda_free(dx), pw_cuda_free(dw), pw_cuda_free(db);
}

/* ---------------------------------------------------------------- ops vs CPU */

static void report(const char *op, double cpu_ms, double gpu_ms)
{
    printf("  %-26s cpu %9.3f ms   gpu %8.4f ms   x%.1f\n", op, cpu_ms, gpu_ms, cpu_ms / gpu_ms);
    /* SUMMARY lines name the op by its first word (no spaces). */
    printf("SUMMARY op %.*s %.4f %.4f %.1f\n", (int)strcspn(op, " "), op, cpu_ms, gpu_ms,
           cpu_ms / gpu_ms);
}

static void bench_ops(timer *t, pw_cuda_ops *ops, int64_t n, int64_t D, int64_t H, int64_t T)
{
    const int64_t B = n / T, V = 8192, C = 8192;
    const int64_t nD = n * D, n4 = n * 4 * D, nqkv = n * 3 * D, natt = B * H * T * T;
    /* Host (CPU) arrays. */
    float *x = host_rand(n4, 11), *dy = host_rand(n4, 12), *y = host_rand(n4, 13);
    float *w = host_rand(D, 14), *bb = host_rand(D, 15), *mean = host_rand(n, 16);
    float *rstd = host_rand(n, 17), *dw = host_rand(V * D, 18), *db = host_rand(D, 19);
    float *qkv = host_rand(nqkv, 20), *att = host_rand(natt, 21), *scr = host_rand(H * T * T, 22);
    float *logits = host_rand(n * C, 23), *probs = host_rand(n * C, 24);
    int32_t *labels = malloc((size_t)n * sizeof(int32_t));
    uint8_t *mask = malloc((size_t)n4);
    if (!labels || !mask) DIE("out of host memory");
    for (int64_t r = 0; r < n; r++) labels[r] = (int32_t)(r * 7919 % C);
    /* Device twins. */
    float *x_d = dev_copy(x, (size_t)n4 * 4), *dy_d = dev_copy(dy, (size_t)n4 * 4);
    float *y_d = dev_copy(NULL, (size_t)n4 * 4), *w_d = dev_copy(w, (size_t)D * 4);
    float *b_d = dev_copy(bb, (size_t)D * 4), *mean_d = dev_copy(NULL, (size_t)n * 4);
    float *rstd_d = dev_copy(NULL, (size_t)n * 4), *dw_d = dev_copy(NULL, (size_t)(V * D) * 4);
    float *db_d = dev_copy(NULL, (size_t)D * 4), *qkv_d = dev_copy(qkv, (size_t)nqkv * 4);
    float *att_d = dev_copy(NULL, (size_t)natt * 4),
          *scr_d = dev_copy(NULL, (size_t)(H * T * T) * 4);
    float *dqkv_d = dev_copy(NULL, (size_t)nqkv * 4),
          *logits_d = dev_copy(logits, (size_t)(n * C) * 4);
    float *probs_d = dev_copy(NULL, (size_t)(n * C) * 4);
    int32_t *labels_d = dev_copy(labels, (size_t)n * 4);
    double *rows_d = dev_copy(NULL, (size_t)n * 8);
    uint8_t *mask_d = dev_copy(NULL, (size_t)n4);
    float *dqkv = host_rand(nqkv, 25);
    double cpu, gpu;
    const uint64_t key = pw_rng_key(1, "bench");

    CPU_MS(cpu, pw_cpu_gelu_fwd(x, y, n4));
    GPU_MS(t, gpu, CK(pw_cuda_gelu_fwd(ops, x_d, y_d, n4)));
    report("gelu_fwd (n, 4D)", cpu, gpu);
    CPU_MS(cpu, pw_cpu_gelu_bwd_input(x, dy, y, n4, 0));
    GPU_MS(t, gpu, CK(pw_cuda_gelu_bwd_input(ops, x_d, dy_d, y_d, n4, 0)));
    report("gelu_bwd_input (n, 4D)", cpu, gpu);
    CPU_MS(cpu, pw_cpu_add_fwd(x, dy, y, nD));
    GPU_MS(t, gpu, CK(pw_cuda_add_fwd(ops, x_d, dy_d, y_d, nD)));
    report("add_fwd (n, D)", cpu, gpu);
    CPU_MS(cpu, pw_cpu_layernorm_fwd(x, w, bb, y, mean, rstd, n, D, 1e-5f));
    GPU_MS(t, gpu, CK(pw_cuda_layernorm_fwd(ops, x_d, w_d, b_d, y_d, mean_d, rstd_d, n, D, 1e-5f)));
    report("layernorm_fwd", cpu, gpu);
    CPU_MS(cpu, pw_cpu_layernorm_bwd_input(x, w, mean, rstd, dy, y, n, D, 0));
    GPU_MS(t, gpu,
           CK(pw_cuda_layernorm_bwd_input(ops, x_d, w_d, mean_d, rstd_d, dy_d, y_d, n, D, 0)));
    report("layernorm_bwd_input", cpu, gpu);
    CPU_MS(cpu, pw_cpu_layernorm_bwd_weight(x, mean, rstd, dy, dw, db, n, D));
    GPU_MS(t, gpu,
           CK(pw_cuda_layernorm_bwd_weight(ops, x_d, mean_d, rstd_d, dy_d, dw_d, db_d, n, D)));
    report("layernorm_bwd_weight", cpu, gpu);
    CPU_MS(cpu, pw_cpu_softmax_xent_fwd(logits, labels, probs, n, C));
    GPU_MS(t, gpu, CK(pw_cuda_softmax_xent_fwd(ops, logits_d, labels_d, probs_d, rows_d, n, C)));
    report("softmax_xent_fwd (C 8192)", cpu, gpu);
    CPU_MS(cpu, pw_cpu_softmax_xent_bwd(probs, labels, logits, n, C, 1.0f / (float)n, 0));
    GPU_MS(
        t, gpu,
        CK(pw_cuda_softmax_xent_bwd(ops, probs_d, labels_d, logits_d, n, C, 1.0f / (float)n, 0)));
    report("softmax_xent_bwd (C 8192)", cpu, gpu);
    CPU_MS(cpu, pw_cpu_embedding_fwd(labels, dw, y, n, V, D));
    GPU_MS(t, gpu, CK(pw_cuda_embedding_fwd(ops, labels_d, dw_d, y_d, n, V, D)));
    report("embedding_fwd (V 8192)", cpu, gpu);
    CPU_MS(cpu, pw_cpu_embedding_bwd_weight(labels, dy, dw, n, V, D));
    GPU_MS(t, gpu, CK(pw_cuda_embedding_bwd_weight(ops, labels_d, dy_d, dw_d, n, V, D)));
    report("embedding_bwd_weight", cpu, gpu);
    CPU_MS(cpu, pw_cpu_dropout_fwd(x, y, mask, n, 4 * D, 0.1f, key, 0));
    GPU_MS(t, gpu, CK(pw_cuda_dropout_fwd(ops, x_d, y_d, mask_d, n, 4 * D, 0.1f, key, 0)));
    report("dropout_fwd (n, 4D)", cpu, gpu);
    CPU_MS(cpu, pw_cpu_attention_fwd(qkv, y, att, B, T, D, H));
    GPU_MS(t, gpu, CK(pw_cuda_attention_fwd(ops, qkv_d, y_d, att_d, B, T, D, H)));
    report("attention_fwd", cpu, gpu);
    CPU_MS(cpu, pw_cpu_attention_bwd_input(qkv, att, dy, dqkv, scr, B, T, D, H, 0));
    GPU_MS(t, gpu,
           CK(pw_cuda_attention_bwd_input(ops, qkv_d, att_d, dy_d, dqkv_d, scr_d, B, T, D, H, 0)));
    report("attention_bwd_input", cpu, gpu);

    free(x), free(dy), free(y), free(w), free(bb), free(mean), free(rstd), free(dw), free(db);
    free(qkv), free(att), free(scr), free(logits), free(probs), free(labels), free(mask),
        free(dqkv);
    void *dev_bufs[] = {x_d, dy_d, y_d, w_d, b_d, mean_d, rstd_d, dw_d, db_d, qkv_d, att_d,
                        scr_d, dqkv_d, logits_d, probs_d, labels_d, rows_d, mask_d};
    for (size_t i = 0; i < sizeof dev_bufs / sizeof dev_bufs[0]; i++) pw_cuda_free(dev_bufs[i]);
}

int main(int argc, char **argv)
{
    pw_cuda_math math = arg_int(argc, argv, "--tf32", 0) ? PW_CUDA_MATH_TF32 : PW_CUDA_MATH_FP32;
    const char *math_arg = arg_str(argc, argv, "--math", NULL);
    if (math_arg && pw_cuda_math_parse(math_arg, &math) != 0)
        DIE("--math %s: expected fp32, tf32 or bf16", math_arg);
    const int iters = (int)arg_int(argc, argv, "--iters", 20);
    const int64_t rows = arg_int(argc, argv, "--rows", 4096);
    const int64_t D = arg_int(argc, argv, "--width", 768);
    const int64_t H = arg_int(argc, argv, "--heads", 12);
    const int64_t T = arg_int(argc, argv, "--seq", 256);
    const int threads = (int)arg_int(argc, argv, "--threads", 16);
    if (iters < 1 || rows < T || T < 1 || D < 1 || H < 1 || D % H || rows % T)
        DIE("bad sizes: need iters ≥ 1, rows a multiple of --seq, width a multiple of --heads");

    int ndev;
    if (pw_cuda_device_count(&ndev) != PW_OK) {
        printf("bench_cuda: skipped: %s\n", pw_last_error());
        return 77;
    }
    pw_cuda_device_info info;
    CK(pw_cuda_device_query(0, &info));
    printf("bench_cuda: %s (cc %d.%d, %d SMs, %zu MiB), %s GEMMs, %d iterations per figure\n",
           info.name, info.cc_major, info.cc_minor, info.sm_count, info.total_mem >> 20,
           pw_cuda_math_name(math), iters);
    printf("SUMMARY device %s\n", info.name);
    pw_cpu_set_threads(threads);

    pw_cuda_stream s;
    CK(pw_cuda_stream_create(0, &s));
    pw_cuda_ops_config oc = {.device = 0, .stream = s, .math = math};
    pw_cuda_ops *ops;
    CK(pw_cuda_ops_create(&oc, &ops));
    /* The reference handle as ops.cu sets its own: default math mode, the
     * mode in each call's compute type. */
    cublasHandle_t blas;
    CBK(cublasCreate(&blas));
    CBK(cublasSetMathMode(blas, CUBLAS_DEFAULT_MATH));
    CBK(cublasSetStream(blas, s));
    const cublasComputeType_t ct = compute_type(math);
    timer t = {.s = s, .iters = iters};
    CUK(cudaEventCreate(&t.a));
    CUK(cudaEventCreate(&t.b));

    printf("\nlinear ops against cuBLAS (cublasGemmEx, %s; same shapes; rows = micro-batch x "
           "sequence):\n",
           pw_cuda_math_name(math));
    const shape shapes[] = {
        {rows, D, 3 * D, "qkv_proj"},
        {rows, D, D, "attn_out"},
        {rows, D, 4 * D, "mlp_up"},
        {rows, 4 * D, D, "mlp_down"},
        {4096, 4096, 4096, "square_4096"},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        bench_gemm(&t, ops, blas, ct, &shapes[i]);
    printf("SUMMARY gemm_worst_ratio %.3f\n", worst_ratio);

    printf(
        "\nCUDA ops against CPU ops (%lld rows, D %lld, H %lld, T %lld; CPU BLAS on %d threads):\n",
        (long long)rows, (long long)D, (long long)H, (long long)T, threads);
    bench_ops(&t, ops, rows, D, H, T);

    cudaEventDestroy(t.a);
    cudaEventDestroy(t.b);
    cublasDestroy(blas);
    pw_cuda_ops_destroy(ops);
    pw_cuda_stream_destroy(s);
    return 0;
}

#endif /* PW_HAVE_CUDA */
