/* pipewright — CUDA kernels (fp32). Contract in ops.h; the reference is
 * stages/cpu/ops.c, whose structure this file follows op by op.
 *
 * How the kernels are written, and why:
 *   - GEMMs are cuBLAS SGEMMs. cuBLAS is column-major and our arrays are
 *     row-major, so a row-major C (m, n) = A·B is computed as the
 *     column-major Cᵀ (n, m) = Bᵀ·Aᵀ: the operands swap places and keep
 *     their leading dimensions. Each call below says which CPU GEMM it is.
 *   - Element-wise ops are grid-stride loops over int64 indices.
 *   - A row reduction is one block of NT threads per row: each thread sums a
 *     strided part in double, then a fixed shuffle tree and a fixed tree over
 *     the warps. The order depends on NT only, so the bits are the same on
 *     every run (no atomics anywhere).
 *   - A reduction over rows (db, layernorm dw/db, embedding gradients) gives
 *     each column to one thread that walks the rows in order, row 0 first:
 *     the CPU's order, so micro-batch splits stay exact and the bits equal
 *     the CPU's (the file is built with --fmad=false, so a·b + c rounds
 *     twice, as on the CPU).
 *   - Nothing here allocates or synchronises with the host.
 */
#include "stages/cuda/ops.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

static pw_status blas_status(cublasStatus_t s, const char *op);

/* Blocks of the first level of pw_cuda_sumsq_d (part of its order). */
#define SUM_BLOCKS 128

struct pw_cuda_ops {
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    int allow_tf32;
    double *partials; /* SUM_BLOCKS doubles of device scratch, allocated at create */
    void *workspace;  /* cuBLAS workspace owned by this context */
    size_t workspace_bytes;
};

/* cublasSetStream resets the workspace to cuBLAS's default pool, so the
 * context's own workspace is set again after every stream change. */
static pw_status bind_stream(pw_cuda_ops *ops, cudaStream_t s)
{
    ops->stream = s;
    pw_status st = blas_status(cublasSetStream(ops->blas, s), "set_stream");
    if (st == PW_OK)
        st = blas_status(cublasSetWorkspace(ops->blas, ops->workspace, ops->workspace_bytes),
                         "set_stream");
    return st;
}

/* Threads per block for row reductions and element-wise kernels. Part of
 * the reductions' definition (it fixes their order): changing it changes
 * the bits of layernorm and the softmaxes. */
#define NT 256
/* Grid cap for grid-stride loops: enough blocks to fill any current GPU. */
#define MAX_BLOCKS 65535
/* Threads per block of the column kernels (a thread walks all rows of its
 * column): small blocks spread a few hundred columns over many SMs. */
#define COL_NT 32

/* ---------------------------------------------------------------- errors */

static pw_status launch_status(const char *op)
{
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return PW_OK;
    return pw_error(PW_ERR_INTERNAL, "CUDA op %s: %s", op, cudaGetErrorString(e));
}

static pw_status blas_status(cublasStatus_t s, const char *op)
{
    if (s == CUBLAS_STATUS_SUCCESS) return PW_OK;
    return pw_error(PW_ERR_INTERNAL, "CUDA op %s: cuBLAS: %s", op, cublasGetStatusString(s));
}

/* cuBLAS takes int dimensions. */
static pw_status dims_ok(const char *op, int64_t a, int64_t b, int64_t c)
{
    if (a > INT_MAX || b > INT_MAX || c > INT_MAX)
        return pw_error(PW_ERR_UNSUPPORTED,
                        "CUDA op %s: dimension over %d (%lld, %lld, %lld) is not supported", op,
                        INT_MAX, (long long)a, (long long)b, (long long)c);
    return PW_OK;
}

static unsigned grid_of(int64_t n, int per_block)
{
    int64_t b = (n + per_block - 1) / per_block;
    return (unsigned)(b < 1 ? 1 : b > MAX_BLOCKS ? MAX_BLOCKS : b);
}

static unsigned grid_for(int64_t n) { return grid_of(n, NT); }

#define GRID_STRIDE(i, n)                                                             \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);         \
         i += (int64_t)blockDim.x * gridDim.x)

/* ---------------------------------------------------------------- context */

extern "C" pw_status pw_cuda_ops_create(const pw_cuda_ops_config *cfg, pw_cuda_ops **out)
{
    *out = NULL;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n < 1) {
        (void)cudaGetLastError();
        return pw_error(PW_ERR_UNSUPPORTED, "no CUDA device: %s",
                        e != cudaSuccess ? cudaGetErrorString(e) : "the runtime reports 0 devices");
    }
    if (cfg->device < 0 || cfg->device >= n)
        return pw_error(PW_ERR_INVALID_ARG, "CUDA device %d does not exist (%d devices)",
                        cfg->device, n);
    e = cudaSetDevice(cfg->device);
    if (e != cudaSuccess) return launch_status("create");
    pw_cuda_ops *ops = (pw_cuda_ops *)calloc(1, sizeof *ops);
    if (!ops) return pw_error(PW_ERR_NOMEM, "CUDA ops: out of host memory");
    ops->device = cfg->device;
    ops->stream = cfg->stream;
    ops->allow_tf32 = cfg->allow_tf32;
    pw_status st = blas_status(cublasCreate(&ops->blas), "create");
    if (st != PW_OK) {
        free(ops);
        return st;
    }
    /* Plain fp32 GEMMs unless TF32 is asked for (CUBLAS_DEFAULT_MATH never
     * uses TF32 on its own). Atomics stay disallowed (the default, stated
     * for the reader): some cuBLAS routines would otherwise change bits run
     * to run. */
    st = blas_status(cublasSetMathMode(ops->blas, cfg->allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH
                                                                  : CUBLAS_DEFAULT_MATH),
                     "create");
    if (st == PW_OK)
        st = blas_status(cublasSetAtomicsMode(ops->blas, CUBLAS_ATOMICS_NOT_ALLOWED), "create");
    ops->workspace_bytes = cfg->blas_workspace ? cfg->blas_workspace : (size_t)32 << 20;
    if (st == PW_OK && cudaMalloc(&ops->workspace, ops->workspace_bytes)) {
        ops->workspace = NULL;
        st = launch_status("create");
    }
    if (st == PW_OK && cudaMalloc((void **)&ops->partials, SUM_BLOCKS * sizeof(double))) {
        ops->partials = NULL;
        st = launch_status("create");
    }
    if (st == PW_OK) st = bind_stream(ops, cfg->stream);
    if (st != PW_OK) {
        pw_cuda_ops_destroy(ops);
        return st;
    }
    *out = ops;
    return PW_OK;
}

extern "C" void pw_cuda_ops_destroy(pw_cuda_ops *ops)
{
    if (!ops) return;
    if (ops->blas) cublasDestroy(ops->blas);
    if (ops->partials) cudaFree(ops->partials);
    if (ops->workspace) cudaFree(ops->workspace);
    free(ops);
}

extern "C" pw_status pw_cuda_ops_set_stream(pw_cuda_ops *ops, pw_cuda_stream stream)
{
    return bind_stream(ops, stream);
}

extern "C" pw_cuda_stream pw_cuda_ops_stream(const pw_cuda_ops *ops) { return ops->stream; }

/* ---------------------------------------------------------------- reductions */

/* Σ v over the block (every thread gets the result). `sh` holds NT/32
 * doubles. Fixed order: shuffle tree within each warp, then warp 0's tree
 * over the warp sums. */
__device__ static double block_sum_d(double v, double *sh)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < NT / 32 ? sh[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    double r = sh[0];
    __syncthreads(); /* sh may be reused by the next call */
    return r;
}

/* max over the block, NaN-free inputs assumed equal to the CPU's `a > m ? a
 * : m` (max is exact, so order does not matter for finite values). */
__device__ static float block_max_f(float v, float *sh)
{
    for (int o = 16; o > 0; o >>= 1) {
        float u = __shfl_down_sync(0xffffffffu, v, o);
        v = u > v ? u : v;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < NT / 32 ? sh[lane] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) {
            float u = __shfl_down_sync(0xffffffffu, v, o);
            v = u > v ? u : v;
        }
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

/* ---------------------------------------------------------------- exp */

/* The CPU's vec_exp (stages/cpu/ops.c), one lane: same constants, same
 * steps, and with --fmad=false the same roundings. */
__device__ static float pw_exp(float x)
{
    const float magic = 12582912.0f; /* 1.5·2^23 */
    x = x < -87.33654f ? -87.33654f : x;
    x = x > 88.0f ? 88.0f : x;
    float t = x * 1.44269504088896341f + magic;
    float n = t - magic;
    float scale = __uint_as_float(((__float_as_uint(t) - 0x4B400000u + 127u) << 23));
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    float q = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r + 1.0f;
    return q * scale;
}

/* ---------------------------------------------------------------- linear */

__global__ static void k_fill_rows(const float *__restrict__ b, float *__restrict__ y, int64_t n,
                                   int64_t out)
{
    GRID_STRIDE(i, n * out) y[i] = b[i % out];
}

/* db[j] += Σ_r dy[r, j], r = 0, 1, ... in order (the CPU's order). */
__global__ static void k_col_sum_add(const float *__restrict__ dy, float *__restrict__ db,
                                     int64_t n, int64_t out)
{
    GRID_STRIDE(j, out)
    {
        float acc = db[j];
        for (int64_t r = 0; r < n; r++) acc += dy[r * out + j];
        db[j] = acc;
    }
}

extern "C" pw_status pw_cuda_linear_fwd(pw_cuda_ops *ops, const float *x, const float *w,
                                        const float *b, float *y, int64_t n, int64_t in,
                                        int64_t out)
{
    if (n <= 0 || out <= 0) return PW_OK;
    PW_CHECK(dims_ok("linear_fwd", n, in, out));
    float beta = 0.0f;
    if (b) {
        k_fill_rows<<<grid_for(n * out), NT, 0, ops->stream>>>(b, y, n, out);
        PW_CHECK(launch_status("linear_fwd"));
        beta = 1.0f;
    }
    if (in <= 0) {
        if (!b && cudaMemsetAsync(y, 0, (size_t)(n * out) * sizeof(float), ops->stream))
            return launch_status("linear_fwd");
        return PW_OK;
    }
    const float one = 1.0f;
    /* y (n, out) = x · wᵀ  ⇔  yᵀ (out, n) = w · xᵀ; w is (in, out) column-major. */
    return blas_status(cublasSgemm(ops->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)out, (int)n, (int)in,
                                   &one, w, (int)in, x, (int)in, &beta, y, (int)out),
                       "linear_fwd");
}

extern "C" pw_status pw_cuda_linear_bwd_input(pw_cuda_ops *ops, const float *dy, const float *w,
                                              float *dx, int64_t n, int64_t in, int64_t out,
                                              int accumulate)
{
    if (n <= 0 || in <= 0) return PW_OK;
    if (out <= 0) {
        if (!accumulate && cudaMemsetAsync(dx, 0, (size_t)(n * in) * sizeof(float), ops->stream))
            return launch_status("linear_bwd_input");
        return PW_OK;
    }
    PW_CHECK(dims_ok("linear_bwd_input", n, in, out));
    const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    /* dx (n, in) = dy · w  ⇔  dxᵀ (in, n) = wᵀ · dyᵀ. beta = 0 never reads dx. */
    return blas_status(cublasSgemm(ops->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)in, (int)n, (int)out,
                                   &one, w, (int)in, dy, (int)out, &beta, dx, (int)in),
                       "linear_bwd_input");
}

extern "C" pw_status pw_cuda_linear_bwd_weight(pw_cuda_ops *ops, const float *dy, const float *x,
                                               float *dw, float *db, int64_t n, int64_t in,
                                               int64_t out)
{
    if (n <= 0 || out <= 0) return PW_OK;
    PW_CHECK(dims_ok("linear_bwd_weight", n, in, out));
    if (in > 0) {
        const float one = 1.0f;
        /* dw (out, in) += dyᵀ · x  ⇔  dwᵀ (in, out) += xᵀ · dy. */
        PW_CHECK(blas_status(cublasSgemm(ops->blas, CUBLAS_OP_N, CUBLAS_OP_T, (int)in, (int)out,
                                         (int)n, &one, x, (int)in, dy, (int)out, &one, dw,
                                         (int)in),
                             "linear_bwd_weight"));
    }
    if (db) {
        k_col_sum_add<<<grid_of(out, COL_NT), COL_NT, 0, ops->stream>>>(dy, db, n, out);
        PW_CHECK(launch_status("linear_bwd_weight"));
    }
    return PW_OK;
}

/* ---------------------------------------------------------------- relu, gelu */

__global__ static void k_relu_fwd(const float *__restrict__ x, float *__restrict__ y, int64_t n)
{
    GRID_STRIDE(i, n)
    {
        float v = x[i];
        y[i] = v < 0.0f ? 0.0f : v;
    }
}

__global__ static void k_relu_bwd(const float *__restrict__ y, const float *__restrict__ dy,
                                  float *__restrict__ dx, int64_t n, int accumulate)
{
    GRID_STRIDE(i, n)
    {
        float g = y[i] > 0.0f ? dy[i] : 0.0f;
        dx[i] = accumulate ? dx[i] + g : g;
    }
}

extern "C" pw_status pw_cuda_relu_fwd(pw_cuda_ops *ops, const float *x, float *y, int64_t n)
{
    if (n <= 0) return PW_OK;
    k_relu_fwd<<<grid_for(n), NT, 0, ops->stream>>>(x, y, n);
    return launch_status("relu_fwd");
}

extern "C" pw_status pw_cuda_relu_bwd_input(pw_cuda_ops *ops, const float *y, const float *dy,
                                            float *dx, int64_t n, int accumulate)
{
    if (n <= 0) return PW_OK;
    k_relu_bwd<<<grid_for(n), NT, 0, ops->stream>>>(y, dy, dx, n, accumulate);
    return launch_status("relu_bwd_input");
}

#define GELU_K 0.7978845608028654f /* √(2/π) */
#define GELU_C 0.044715f

/* The CPU's vec_gelu / vec_gelu_grad, same expression trees. */
__device__ static float gelu_f(float v)
{
    float e = pw_exp(-2.0f * GELU_K * (v + GELU_C * v * v * v));
    return v / (1.0f + e);
}

__device__ static float gelu_grad(float v)
{
    float e = pw_exp(-2.0f * GELU_K * (v + GELU_C * v * v * v));
    float s = 1.0f / (1.0f + e);
    float du = GELU_K * (1.0f + 3.0f * GELU_C * v * v);
    return s + 2.0f * v * s * (e * s) * du;
}

__global__ static void k_gelu_fwd(const float *__restrict__ x, float *__restrict__ y, int64_t n)
{
    GRID_STRIDE(i, n) y[i] = gelu_f(x[i]);
}

__global__ static void k_gelu_bwd(const float *__restrict__ x, const float *__restrict__ dy,
                                  float *__restrict__ dx, int64_t n, int accumulate)
{
    GRID_STRIDE(i, n)
    {
        float g = dy[i] * gelu_grad(x[i]);
        dx[i] = accumulate ? dx[i] + g : g;
    }
}

extern "C" pw_status pw_cuda_gelu_fwd(pw_cuda_ops *ops, const float *x, float *y, int64_t n)
{
    if (n <= 0) return PW_OK;
    k_gelu_fwd<<<grid_for(n), NT, 0, ops->stream>>>(x, y, n);
    return launch_status("gelu_fwd");
}

extern "C" pw_status pw_cuda_gelu_bwd_input(pw_cuda_ops *ops, const float *x, const float *dy,
                                            float *dx, int64_t n, int accumulate)
{
    if (n <= 0) return PW_OK;
    k_gelu_bwd<<<grid_for(n), NT, 0, ops->stream>>>(x, dy, dx, n, accumulate);
    return launch_status("gelu_bwd_input");
}

/* ---------------------------------------------------------------- layernorm */

/* One block per row. Two passes in double (mean, then squared deviations),
 * as the CPU op. */
__global__ static void __launch_bounds__(NT)
    k_layernorm_fwd(const float *__restrict__ x, const float *__restrict__ w,
                    const float *__restrict__ b, float *__restrict__ y, float *__restrict__ mean,
                    float *__restrict__ rstd, int64_t d, float eps)
{
    __shared__ double sh[NT / 32];
    const int64_t r = blockIdx.x;
    const float *xr = x + r * d;
    float *yr = y + r * d;
    double s = 0.0;
    for (int64_t j = threadIdx.x; j < d; j += NT) s += (double)xr[j];
    const double m = block_sum_d(s, sh) / (double)d;
    double q = 0.0;
    for (int64_t j = threadIdx.x; j < d; j += NT) {
        double e = (double)xr[j] - m;
        q += e * e;
    }
    const double var = block_sum_d(q, sh) / (double)d;
    const float mf = (float)m;
    const float rs = 1.0f / sqrtf((float)var + eps);
    if (threadIdx.x == 0) {
        mean[r] = mf;
        rstd[r] = rs;
    }
    for (int64_t j = threadIdx.x; j < d; j += NT) yr[j] = (xr[j] - mf) * rs * w[j] + b[j];
}

/* dx = rstd · (g − mean(g) − x̂ · mean(g·x̂)), g = dy·w (the CPU's form). */
__global__ static void __launch_bounds__(NT)
    k_layernorm_bwd_input(const float *__restrict__ x, const float *__restrict__ w,
                          const float *__restrict__ mean, const float *__restrict__ rstd,
                          const float *__restrict__ dy, float *__restrict__ dx, int64_t d,
                          int accumulate)
{
    __shared__ double sh[NT / 32];
    const int64_t r = blockIdx.x;
    const float *xr = x + r * d, *gr = dy + r * d;
    float *dxr = dx + r * d;
    const float mf = mean[r], rs = rstd[r];
    double s1 = 0.0, s2 = 0.0;
    for (int64_t j = threadIdx.x; j < d; j += NT) {
        float g = gr[j] * w[j];
        float xh = (xr[j] - mf) * rs;
        s1 += (double)g;
        s2 += (double)g * (double)xh;
    }
    const double t1 = block_sum_d(s1, sh);
    const double t2 = block_sum_d(s2, sh);
    const float mg = (float)(t1 / (double)d), mgx = (float)(t2 / (double)d);
    for (int64_t k = threadIdx.x; k < d; k += NT) {
        float xh = (xr[k] - mf) * rs;
        float v = rs * (gr[k] * w[k] - mg - xh * mgx);
        dxr[k] = accumulate ? dxr[k] + v : v;
    }
}

/* Column j walks rows in order (the CPU's order: bit-identical). */
__global__ static void k_layernorm_bwd_weight(const float *__restrict__ x,
                                              const float *__restrict__ mean,
                                              const float *__restrict__ rstd,
                                              const float *__restrict__ dy, float *__restrict__ dw,
                                              float *__restrict__ db, int64_t n, int64_t d)
{
    GRID_STRIDE(j, d)
    {
        float aw = dw[j], ab = db[j];
        for (int64_t r = 0; r < n; r++) {
            float g = dy[r * d + j];
            aw += g * ((x[r * d + j] - mean[r]) * rstd[r]);
            ab += g;
        }
        dw[j] = aw;
        db[j] = ab;
    }
}

/* Rows go in grid.x (up to 2^31 − 1). */
static pw_status rows_ok(const char *op, int64_t n)
{
    if (n > INT_MAX)
        return pw_error(PW_ERR_UNSUPPORTED, "CUDA op %s: %lld rows (over %d) not supported", op,
                        (long long)n, INT_MAX);
    return PW_OK;
}

extern "C" pw_status pw_cuda_layernorm_fwd(pw_cuda_ops *ops, const float *x, const float *w,
                                           const float *b, float *y, float *mean, float *rstd,
                                           int64_t n, int64_t d, float eps)
{
    if (d <= 0 || n <= 0) return PW_OK;
    PW_CHECK(rows_ok("layernorm_fwd", n));
    k_layernorm_fwd<<<(unsigned)n, NT, 0, ops->stream>>>(x, w, b, y, mean, rstd, d, eps);
    return launch_status("layernorm_fwd");
}

extern "C" pw_status pw_cuda_layernorm_bwd_input(pw_cuda_ops *ops, const float *x, const float *w,
                                                 const float *mean, const float *rstd,
                                                 const float *dy, float *dx, int64_t n, int64_t d,
                                                 int accumulate)
{
    if (d <= 0 || n <= 0) return PW_OK;
    PW_CHECK(rows_ok("layernorm_bwd_input", n));
    k_layernorm_bwd_input<<<(unsigned)n, NT, 0, ops->stream>>>(x, w, mean, rstd, dy, dx, d,
                                                                accumulate);
    return launch_status("layernorm_bwd_input");
}

extern "C" pw_status pw_cuda_layernorm_bwd_weight(pw_cuda_ops *ops, const float *x,
                                                  const float *mean, const float *rstd,
                                                  const float *dy, float *dw, float *db, int64_t n,
                                                  int64_t d)
{
    if (d <= 0 || n <= 0) return PW_OK;
    k_layernorm_bwd_weight<<<grid_of(d, COL_NT), COL_NT, 0, ops->stream>>>(x, mean, rstd, dy, dw,
                                                                           db, n, d);
    return launch_status("layernorm_bwd_weight");
}

/* ---------------------------------------------------------------- add, copy */

__global__ static void k_add(const float *__restrict__ a, const float *__restrict__ b,
                             float *__restrict__ y, int64_t n)
{
    GRID_STRIDE(i, n) y[i] = a[i] + b[i];
}

__global__ static void k_acc(const float *__restrict__ dy, float *__restrict__ dx, int64_t n)
{
    GRID_STRIDE(i, n) dx[i] += dy[i];
}

extern "C" pw_status pw_cuda_add_fwd(pw_cuda_ops *ops, const float *a, const float *b, float *y,
                                     int64_t n)
{
    if (n <= 0) return PW_OK;
    k_add<<<grid_for(n), NT, 0, ops->stream>>>(a, b, y, n);
    return launch_status("add_fwd");
}

extern "C" pw_status pw_cuda_copy_grad(pw_cuda_ops *ops, const float *dy, float *dx, int64_t n,
                                       int accumulate)
{
    if (n <= 0) return PW_OK;
    if (accumulate) {
        k_acc<<<grid_for(n), NT, 0, ops->stream>>>(dy, dx, n);
    } else if (cudaMemcpyAsync(dx, dy, (size_t)n * sizeof(float), cudaMemcpyDeviceToDevice,
                               ops->stream) != cudaSuccess) {
        return launch_status("copy_grad");
    }
    return launch_status("copy_grad");
}

/* ---------------------------------------------------------------- softmax xent */

__device__ static bool label_ok(int32_t label, int64_t C) { return label >= 0 && label < C; }

/* One block per row: max, exp (expf: within 2 ulp of glibc's), Σ in double,
 * scale; the row loss as logsumexp − logit[label] in double. */
__global__ static void __launch_bounds__(NT)
    k_xent_fwd(const float *__restrict__ logits, const int32_t *__restrict__ labels,
               float *__restrict__ probs, double *__restrict__ row_loss, int64_t C)
{
    __shared__ double sh[NT / 32];
    __shared__ float shf[NT / 32];
    const int64_t r = blockIdx.x;
    const float *lr = logits + r * C;
    float *pr = probs + r * C;
    float m = -INFINITY;
    for (int64_t j = threadIdx.x; j < C; j += NT) m = lr[j] > m ? lr[j] : m;
    m = block_max_f(m, shf);
    double s = 0.0;
    for (int64_t j = threadIdx.x; j < C; j += NT) {
        float e = expf(lr[j] - m);
        pr[j] = e;
        s += (double)e;
    }
    s = block_sum_d(s, sh);
    const float inv = (float)(1.0 / s);
    for (int64_t j = threadIdx.x; j < C; j += NT) pr[j] *= inv;
    if (threadIdx.x == 0) {
        const int32_t lab = labels[r];
        row_loss[r] = label_ok(lab, C) ? ((double)m + log(s)) - (double)lr[lab] : 0.0;
    }
}

/* Element-wise; the label's element rounds once: old + (p − 1)·scale. */
__global__ static void k_xent_bwd(const float *__restrict__ probs,
                                  const int32_t *__restrict__ labels, float *__restrict__ dlogits,
                                  int64_t n, int64_t C, float scale, int accumulate)
{
    GRID_STRIDE(i, n * C)
    {
        const int64_t r = i / C, j = i - r * C;
        const float p = probs[i];
        const float old = accumulate ? dlogits[i] : 0.0f;
        if (labels[r] == j && label_ok(labels[r], C))
            dlogits[i] = old + (p - 1.0f) * scale;
        else
            dlogits[i] = accumulate ? old + p * scale : p * scale;
    }
}

__global__ static void __launch_bounds__(NT)
    k_sum_d(const double *__restrict__ v, int64_t n, double *__restrict__ out, int accumulate)
{
    __shared__ double sh[NT / 32];
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += NT) s += v[i];
    s = block_sum_d(s, sh);
    if (threadIdx.x == 0) *out = accumulate ? *out + s : s;
}

extern "C" pw_status pw_cuda_softmax_xent_fwd(pw_cuda_ops *ops, const float *logits,
                                              const int32_t *labels, float *probs,
                                              double *row_loss, int64_t n, int64_t C)
{
    if (n <= 0) return PW_OK;
    PW_CHECK(rows_ok("softmax_xent_fwd", n));
    if (C <= 0) {
        if (cudaMemsetAsync(row_loss, 0, (size_t)n * sizeof(double), ops->stream))
            return launch_status("softmax_xent_fwd");
        return PW_OK;
    }
    k_xent_fwd<<<(unsigned)n, NT, 0, ops->stream>>>(logits, labels, probs, row_loss, C);
    return launch_status("softmax_xent_fwd");
}

extern "C" pw_status pw_cuda_softmax_xent_bwd(pw_cuda_ops *ops, const float *probs,
                                              const int32_t *labels, float *dlogits, int64_t n,
                                              int64_t C, float scale, int accumulate)
{
    if (n <= 0 || C <= 0) return PW_OK;
    k_xent_bwd<<<grid_for(n * C), NT, 0, ops->stream>>>(probs, labels, dlogits, n, C, scale,
                                                        accumulate);
    return launch_status("softmax_xent_bwd");
}

extern "C" pw_status pw_cuda_sum_d(pw_cuda_ops *ops, const double *v, int64_t n, double *out,
                                   int accumulate)
{
    k_sum_d<<<1, NT, 0, ops->stream>>>(v, n < 0 ? 0 : n, out, accumulate);
    return launch_status("sum_d");
}

/* ---------------------------------------------------------------- embedding */

__global__ static void k_embedding_fwd(const int32_t *__restrict__ tokens,
                                       const float *__restrict__ w, float *__restrict__ y,
                                       int64_t n, int64_t vocab, int64_t d)
{
    GRID_STRIDE(i, n * d)
    {
        const int64_t r = i / d, j = i - r * d;
        const int32_t t = tokens[r];
        y[i] = (t >= 0 && t < vocab) ? w[(int64_t)t * d + j] : 0.0f;
    }
}

/* Column j walks the rows in order: a token that occurs twice sums its rows
 * in position order, as on the CPU. Parallel over d only; see docs/cuda.md. */
__global__ static void k_embedding_bwd(const int32_t *__restrict__ tokens,
                                       const float *__restrict__ dy, float *__restrict__ dw,
                                       int64_t n, int64_t vocab, int64_t d)
{
    GRID_STRIDE(j, d)
    {
        for (int64_t r = 0; r < n; r++) {
            const int32_t t = tokens[r];
            if (t < 0 || t >= vocab) continue;
            dw[(int64_t)t * d + j] += dy[r * d + j];
        }
    }
}

__global__ static void k_pos_fwd(const float *__restrict__ x, const float *__restrict__ w,
                                 float *__restrict__ y, int64_t batch, int64_t n)
{
    GRID_STRIDE(i, batch * n) y[i] = x[i] + w[i % n];
}

__global__ static void k_pos_bwd(const float *__restrict__ dy, float *__restrict__ dw,
                                 int64_t batch, int64_t n)
{
    GRID_STRIDE(i, n)
    {
        float acc = dw[i];
        for (int64_t b = 0; b < batch; b++) acc += dy[b * n + i];
        dw[i] = acc;
    }
}

extern "C" pw_status pw_cuda_embedding_fwd(pw_cuda_ops *ops, const int32_t *tokens, const float *w,
                                           float *y, int64_t n, int64_t vocab, int64_t d)
{
    if (n <= 0 || d <= 0) return PW_OK;
    k_embedding_fwd<<<grid_for(n * d), NT, 0, ops->stream>>>(tokens, w, y, n, vocab, d);
    return launch_status("embedding_fwd");
}

extern "C" pw_status pw_cuda_embedding_bwd_weight(pw_cuda_ops *ops, const int32_t *tokens,
                                                  const float *dy, float *dw, int64_t n,
                                                  int64_t vocab, int64_t d)
{
    if (n <= 0 || d <= 0) return PW_OK;
    k_embedding_bwd<<<grid_of(d, COL_NT), COL_NT, 0, ops->stream>>>(tokens, dy, dw, n, vocab, d);
    return launch_status("embedding_bwd_weight");
}

extern "C" pw_status pw_cuda_pos_embedding_fwd(pw_cuda_ops *ops, const float *x, const float *w,
                                               float *y, int64_t batch, int64_t T, int64_t d)
{
    if (batch <= 0 || T <= 0 || d <= 0) return PW_OK;
    k_pos_fwd<<<grid_for(batch * T * d), NT, 0, ops->stream>>>(x, w, y, batch, T * d);
    return launch_status("pos_embedding_fwd");
}

extern "C" pw_status pw_cuda_pos_embedding_bwd_weight(pw_cuda_ops *ops, const float *dy, float *dw,
                                                      int64_t batch, int64_t T, int64_t d)
{
    if (batch <= 0 || T <= 0 || d <= 0) return PW_OK;
    k_pos_bwd<<<grid_for(T * d), NT, 0, ops->stream>>>(dy, dw, batch, T * d);
    return launch_status("pos_embedding_bwd_weight");
}

/* ---------------------------------------------------------------- attention */

/* Causal softmax of one row (t) of one head: the CPU's steps (max over
 * s ≤ t, pw_exp, Σ in double, scale, exact zeros above the diagonal). One
 * block per row of the (H·T) rows of a sequence. */
__global__ static void __launch_bounds__(NT) k_causal_softmax(float *__restrict__ att, int64_t T)
{
    __shared__ double sh[NT / 32];
    __shared__ float shf[NT / 32];
    const int64_t row = blockIdx.x, t = row % T, len = t + 1;
    float *a = att + row * T;
    float m = -INFINITY;
    for (int64_t s = threadIdx.x; s < len; s += NT) m = a[s] > m ? a[s] : m;
    m = block_max_f(m, shf);
    double sum = 0.0;
    for (int64_t s = threadIdx.x; s < len; s += NT) {
        float e = pw_exp(a[s] - m);
        a[s] = e;
        sum += (double)e;
    }
    const float inv = (float)(1.0 / block_sum_d(sum, sh));
    for (int64_t s = threadIdx.x; s < T; s += NT) a[s] = s < len ? a[s] * inv : 0.0f;
}

/* dS[t, s] = P[t, s]·(dP[t, s] − Σ_s' P·dP)·scale for s ≤ t, 0 above. */
__global__ static void __launch_bounds__(NT)
    k_causal_softmax_bwd(const float *__restrict__ att, float *__restrict__ ds, int64_t T,
                         float scale)
{
    __shared__ double sh[NT / 32];
    const int64_t row = blockIdx.x, t = row % T, len = t + 1;
    const float *p = att + row * T;
    float *d = ds + row * T;
    double dot = 0.0;
    for (int64_t s = threadIdx.x; s < len; s += NT) dot += (double)p[s] * (double)d[s];
    const float df = (float)block_sum_d(dot, sh);
    for (int64_t s = threadIdx.x; s < T; s += NT)
        d[s] = s < len ? p[s] * (d[s] - df) * scale : 0.0f;
}

/* Per sequence b, all H heads in one strided-batched GEMM each (head h's
 * Q, K, V start h·hd columns further; its att block T·T further). */
extern "C" pw_status pw_cuda_attention_fwd(pw_cuda_ops *ops, const float *qkv, float *out,
                                           float *att, int64_t batch, int64_t T, int64_t D,
                                           int64_t H)
{
    if (batch <= 0 || T <= 0 || D <= 0 || H <= 0) return PW_OK;
    if (D % H)
        return pw_error(PW_ERR_SHAPE, "CUDA attention: D = %lld is not a multiple of H = %lld",
                        (long long)D, (long long)H);
    PW_CHECK(dims_ok("attention_fwd", T, 3 * D, H));
    PW_CHECK(rows_ok("attention_fwd", H * T));
    const int64_t hd = D / H, ld = 3 * D;
    const float scale = (float)(1.0 / sqrt((double)hd)), one = 1.0f, zero = 0.0f;
    for (int64_t b = 0; b < batch; b++) {
        const float *q = qkv + b * T * ld, *k = q + D, *v = q + 2 * D;
        float *a = att + b * H * T * T;
        /* S (T, T) = scale · Q · Kᵀ  (the CPU's NoTrans/Trans GEMM). */
        PW_CHECK(blas_status(
            cublasSgemmStridedBatched(ops->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)T, (int)T, (int)hd,
                                      &scale, k, (int)ld, hd, q, (int)ld, hd, &zero, a, (int)T,
                                      T * T, (int)H),
            "attention_fwd"));
        k_causal_softmax<<<(unsigned)(H * T), NT, 0, ops->stream>>>(a, T);
        PW_CHECK(launch_status("attention_fwd"));
        /* O (T, hd) = P · V  ⇔  Oᵀ = Vᵀ · Pᵀ. */
        PW_CHECK(blas_status(
            cublasSgemmStridedBatched(ops->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)hd, (int)T, (int)T,
                                      &one, v, (int)ld, hd, a, (int)T, T * T, &zero,
                                      out + b * T * D, (int)D, hd, (int)H),
            "attention_fwd"));
    }
    return PW_OK;
}

extern "C" pw_status pw_cuda_attention_bwd_input(pw_cuda_ops *ops, const float *qkv,
                                                 const float *att, const float *dout, float *dqkv,
                                                 float *scratch, int64_t batch, int64_t T,
                                                 int64_t D, int64_t H, int accumulate)
{
    if (batch <= 0 || T <= 0 || D <= 0 || H <= 0) return PW_OK;
    if (D % H)
        return pw_error(PW_ERR_SHAPE, "CUDA attention: D = %lld is not a multiple of H = %lld",
                        (long long)D, (long long)H);
    PW_CHECK(dims_ok("attention_bwd_input", T, 3 * D, H));
    PW_CHECK(rows_ok("attention_bwd_input", H * T));
    const int64_t hd = D / H, ld = 3 * D;
    const float scale = (float)(1.0 / sqrt((double)hd)), one = 1.0f, zero = 0.0f;
    const float beta = accumulate ? 1.0f : 0.0f;
    for (int64_t b = 0; b < batch; b++) {
        const float *q = qkv + b * T * ld, *k = q + D, *v = q + 2 * D;
        const float *dO = dout + b * T * D;
        float *dq = dqkv + b * T * ld, *dk = dq + D, *dv = dq + 2 * D;
        const float *a = att + b * H * T * T;
        float *ds = scratch;
        /* dP (T, T) = dO · Vᵀ. */
        PW_CHECK(blas_status(
            cublasSgemmStridedBatched(ops->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)T, (int)T, (int)hd,
                                      &one, v, (int)ld, hd, dO, (int)D, hd, &zero, ds, (int)T,
                                      T * T, (int)H),
            "attention_bwd_input"));
        k_causal_softmax_bwd<<<(unsigned)(H * T), NT, 0, ops->stream>>>(a, ds, T, scale);
        PW_CHECK(launch_status("attention_bwd_input"));
        /* dQ (T, hd) = dS · K  ⇔  dQᵀ = Kᵀ · dSᵀ. */
        PW_CHECK(blas_status(
            cublasSgemmStridedBatched(ops->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)hd, (int)T, (int)T,
                                      &one, k, (int)ld, hd, ds, (int)T, T * T, &beta, dq,
                                      (int)ld, hd, (int)H),
            "attention_bwd_input"));
        /* dK (T, hd) = dSᵀ · Q  ⇔  dKᵀ = Qᵀ · dS. */
        PW_CHECK(blas_status(
            cublasSgemmStridedBatched(ops->blas, CUBLAS_OP_N, CUBLAS_OP_T, (int)hd, (int)T, (int)T,
                                      &one, q, (int)ld, hd, ds, (int)T, T * T, &beta, dk,
                                      (int)ld, hd, (int)H),
            "attention_bwd_input"));
        /* dV (T, hd) = Pᵀ · dO  ⇔  dVᵀ = dOᵀ · P. */
        PW_CHECK(blas_status(
            cublasSgemmStridedBatched(ops->blas, CUBLAS_OP_N, CUBLAS_OP_T, (int)hd, (int)T, (int)T,
                                      &one, dO, (int)D, hd, a, (int)T, T * T, &beta, dv, (int)ld,
                                      hd, (int)H),
            "attention_bwd_input"));
    }
    return PW_OK;
}

/* ---------------------------------------------------------------- dropout */

/* runtime/rng.c's pw_rng_u64 / pw_rng_uniform on the device, bit for bit. */
__device__ static uint64_t rng_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

__device__ static float rng_uniform(uint64_t key, uint64_t i)
{
    return (float)(rng_mix64(key + (i + 1) * 0x9e3779b97f4a7c15ULL) >> 40) * (1.0f / 16777216.0f);
}

__global__ static void k_dropout_fwd(const float *__restrict__ x, float *__restrict__ y,
                                     uint8_t *__restrict__ mask, int64_t batch, int64_t numel,
                                     float p, float scale, uint64_t key, int64_t first_sample)
{
    GRID_STRIDE(i, batch * numel)
    {
        const int64_t b = i / numel, j = i - b * numel;
        const uint64_t idx = (uint64_t)(first_sample + b) * (uint64_t)numel + (uint64_t)j;
        const bool keep = rng_uniform(key, idx) >= p;
        mask[i] = (uint8_t)keep;
        y[i] = keep ? x[i] * scale : 0.0f;
    }
}

__global__ static void k_dropout_bwd(const uint8_t *__restrict__ mask,
                                     const float *__restrict__ dy, float *__restrict__ dx,
                                     int64_t n, float scale, int accumulate)
{
    GRID_STRIDE(i, n)
    {
        const float g = mask[i] ? dy[i] * scale : 0.0f;
        dx[i] = accumulate ? dx[i] + g : g;
    }
}

extern "C" pw_status pw_cuda_dropout_fwd(pw_cuda_ops *ops, const float *x, float *y, uint8_t *mask,
                                         int64_t batch, int64_t numel, float p, uint64_t key,
                                         int64_t first_sample)
{
    if (batch <= 0 || numel <= 0) return PW_OK;
    k_dropout_fwd<<<grid_for(batch * numel), NT, 0, ops->stream>>>(
        x, y, mask, batch, numel, p, 1.0f / (1.0f - p), key, first_sample);
    return launch_status("dropout_fwd");
}

extern "C" pw_status pw_cuda_dropout_bwd_input(pw_cuda_ops *ops, const uint8_t *mask,
                                               const float *dy, float *dx, int64_t n, float p,
                                               int accumulate)
{
    if (n <= 0) return PW_OK;
    k_dropout_bwd<<<grid_for(n), NT, 0, ops->stream>>>(mask, dy, dx, n, 1.0f / (1.0f - p),
                                                       accumulate);
    return launch_status("dropout_bwd_input");
}

/* ---------------------------------------------------------------- optimizer */

/* optim.c's sgd_update, element by element (mode 0: no momentum; 1: first
 * step, the buffer starts at the gradient; 2: later steps). */
__global__ static void k_sgd(float *__restrict__ p, const float *__restrict__ g,
                             float *__restrict__ buf, int64_t n, float lr, float mu, float wd,
                             int mode)
{
    GRID_STRIDE(i, n)
    {
        float gi = g[i] + wd * p[i];
        if (mode == 0) {
            p[i] -= lr * gi;
        } else {
            float b = mode == 1 ? gi : mu * buf[i] + gi;
            buf[i] = b;
            p[i] -= lr * b;
        }
    }
}

/* optim.c's adamw_update, element by element, same expression trees. */
__global__ static void k_adamw(float *__restrict__ p, const float *__restrict__ g,
                               float *__restrict__ m, float *__restrict__ v, int64_t n, float b1,
                               float b2, float eps, float decay_mul, float bc2_sqrt,
                               float step_size)
{
    GRID_STRIDE(i, n)
    {
        float gi = g[i];
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = p[i] * decay_mul - step_size * mi / denom;
    }
}

extern "C" pw_status pw_cuda_optim_update(pw_cuda_ops *ops, const pw_optim_config *c,
                                          int64_t step, float *p, const float *g, float *state,
                                          int64_t n, int decay)
{
    if (n <= 0) return PW_OK;
    const float lr = pw_optim_lr_at(c, step);
    if (c->kind == PW_OPTIM_SGD) {
        const int mode = c->momentum == 0.0f ? 0 : step == 1 ? 1 : 2;
        k_sgd<<<grid_for(n), NT, 0, ops->stream>>>(p, g, state, n, lr, c->momentum,
                                                   decay ? c->weight_decay : 0.0f, mode);
    } else {
        /* The host scalars exactly as optim.c computes them. */
        const float decay_mul = decay ? 1.0f - lr * c->weight_decay : 1.0f;
        const float bc1 = (float)(1.0 - pow(c->beta1, (double)step));
        const float bc2_sqrt = (float)sqrt(1.0 - pow(c->beta2, (double)step));
        const float step_size = lr / bc1;
        k_adamw<<<grid_for(n), NT, 0, ops->stream>>>(p, g, state, state + n, n, c->beta1,
                                                     c->beta2, c->eps, decay_mul, bc2_sqrt,
                                                     step_size);
    }
    return launch_status("optim_update");
}

/* ---------------------------------------------------------------- metrics, clipping */

/* One block per row: each thread keeps the first largest of its strided
 * elements; the tree keeps the larger value, the smaller index on a tie. */
__global__ static void __launch_bounds__(NT)
    k_argmax_hits(const float *__restrict__ logits, const int32_t *__restrict__ labels,
                  double *__restrict__ hits, int64_t C)
{
    __shared__ float sv[NT];
    __shared__ int64_t si[NT];
    const int64_t r = blockIdx.x;
    const float *l = logits + r * C;
    float best = threadIdx.x < C ? l[threadIdx.x] : -INFINITY;
    int64_t bi = threadIdx.x < C ? (int64_t)threadIdx.x : INT64_MAX;
    for (int64_t j = threadIdx.x + NT; j < C; j += NT)
        if (l[j] > best) best = l[j], bi = j;
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int o = NT / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) {
            float ov = sv[threadIdx.x + o];
            int64_t oi = si[threadIdx.x + o];
            if (ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x])) {
                sv[threadIdx.x] = ov;
                si[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) hits[r] = si[0] == (int64_t)labels[r] ? 1.0 : 0.0;
}

/* Level 1: block b sums the squares of chunk b (contiguous) into part[b]. */
__global__ static void __launch_bounds__(NT)
    k_sumsq_part(const float *__restrict__ v, int64_t n, int64_t chunk, double *__restrict__ part)
{
    __shared__ double sh[NT / 32];
    const int64_t lo = (int64_t)blockIdx.x * chunk;
    const int64_t hi = lo + chunk < n ? lo + chunk : n;
    double s = 0.0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += NT) s += (double)v[i] * (double)v[i];
    s = block_sum_d(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

/* Level 2: the chunk sums in order, one thread (SUM_BLOCKS adds). */
__global__ static void k_sumsq_total(const double *__restrict__ part, double *__restrict__ out,
                                     int accumulate)
{
    double s = 0.0;
    for (int b = 0; b < SUM_BLOCKS; b++) s += part[b];
    *out = accumulate ? *out + s : s;
}

__global__ static void k_scale(float *__restrict__ v, int64_t n, float s)
{
    GRID_STRIDE(i, n) v[i] *= s;
}

extern "C" pw_status pw_cuda_argmax_hits(pw_cuda_ops *ops, const float *logits,
                                         const int32_t *labels, double *hits, int64_t n, int64_t C)
{
    if (n <= 0) return PW_OK;
    PW_CHECK(rows_ok("argmax_hits", n));
    if (C <= 0) {
        if (cudaMemsetAsync(hits, 0, (size_t)n * sizeof(double), ops->stream))
            return launch_status("argmax_hits");
        return PW_OK;
    }
    k_argmax_hits<<<(unsigned)n, NT, 0, ops->stream>>>(logits, labels, hits, C);
    return launch_status("argmax_hits");
}

extern "C" pw_status pw_cuda_sumsq_d(pw_cuda_ops *ops, const float *v, int64_t n, double *out,
                                     int accumulate)
{
    if (n < 0) n = 0;
    /* Every block gets a chunk (possibly empty), so the order depends on n
     * only, never on the GPU. */
    const int64_t chunk = (n + SUM_BLOCKS - 1) / SUM_BLOCKS;
    k_sumsq_part<<<SUM_BLOCKS, NT, 0, ops->stream>>>(v, n, chunk > 0 ? chunk : 1, ops->partials);
    PW_CHECK(launch_status("sumsq_d"));
    k_sumsq_total<<<1, 1, 0, ops->stream>>>(ops->partials, out, accumulate);
    return launch_status("sumsq_d");
}

extern "C" pw_status pw_cuda_scale(pw_cuda_ops *ops, float *v, int64_t n, float s)
{
    if (n <= 0) return PW_OK;
    k_scale<<<grid_for(n), NT, 0, ops->stream>>>(v, n, s);
    return launch_status("scale");
}

__global__ static void k_fill_mean(const double *__restrict__ sum, float *__restrict__ y,
                                   int64_t n, double div)
{
    GRID_STRIDE(i, n) y[i] = (float)(*sum / div);
}

extern "C" pw_status pw_cuda_fill_mean(pw_cuda_ops *ops, const double *sum, float *y, int64_t n,
                                       double div)
{
    if (n <= 0) return PW_OK;
    k_fill_mean<<<grid_for(n), NT, 0, ops->stream>>>(sum, y, n, div);
    return launch_status("fill_mean");
}
