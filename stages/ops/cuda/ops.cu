/* pipewright — CUDA kernels (fp32). Contract in ops.h; the reference is
 * stages/ops/cpu/ops.c, whose structure this file follows op by op.
 *
 * How the kernels are written, and why:
 *   - GEMMs are cuBLAS, all through gemm() below: fp32 arrays, the compute
 *     type of the context's math mode (fp32, TF32 or bf16 tensor cores).
 *     cuBLAS is column-major and our arrays are row-major, so a row-major
 *     C (m, n) = A·B is computed as the column-major Cᵀ (n, m) = Bᵀ·Aᵀ: the
 *     operands swap places and keep their leading dimensions. Each call
 *     below says which CPU GEMM it is.
 *   - Element-wise ops are grid-stride loops over int64 indices.
 *   - A row reduction is one block of NT threads per row: each thread sums a
 *     strided part in double, then a fixed shuffle tree and a fixed tree over
 *     the warps. The order depends on NT only, so the bits are the same on
 *     every run (no atomics anywhere).
 *   - A reduction over rows (db, layernorm dw/db, embedding gradients) adds
 *     each column's rows in order, row 0 first: the CPU's order, so
 *     micro-batch splits stay exact and the bits equal the CPU's (the file
 *     is built with --fmad=false, so a·b + c rounds twice, as on the CPU).
 *     Blocks stage tiles of rows in shared memory so that the serial adds
 *     do not wait on global memory ("reductions over rows" below).
 *   - Nothing here allocates or synchronises with the host.
 */
#include "stages/ops/cuda/ops.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

static pw_status blas_status(cublasStatus_t s, const char *op);

/* Blocks of the first level of pw_cuda_sumsq_d (part of its order). */
#define SUM_BLOCKS 128

/* The linear forward with its bias fused into the GEMM (cuBLASLt's bias
 * epilogue: y = x·wᵀ + b in one pass instead of a fill and a GEMM that
 * reads y back): one plan per shape, made on first use — the descriptors
 * and the algorithm cuBLASLt's heuristic picks, which is then the same
 * every call (the same bits every run). In-place split-K reductions are
 * excluded from the choice (their order could vary). */
#define LT_PLANS 32
/* Pointer alignment the plans assume (bytes); a call with a less aligned
 * pointer takes the unfused path. */
#define LT_ALIGN 16

typedef struct lt_plan {
    int64_t n, in, out;          /* the shape; n == 0: a free entry */
    int ok;                      /* 0: no algorithm: the unfused path */
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, d;
    cublasLtMatmulAlgo_t algo;
} lt_plan;

struct pw_cuda_ops {
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    cublasLtHandle_t lt;         /* NULL: no fused bias (cublasLtCreate failed) */
    lt_plan plans[LT_PLANS];
    int n_plans;
    cublasComputeType_t compute; /* every GEMM's compute type: the math mode */
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

/* Every GEMM of this file: column-major C = alpha·op(A)·op(B) + beta·C on
 * fp32 arrays, in the context's math mode (ops->compute; the algorithm is
 * cuBLAS's default choice). batch > 1: that many GEMMs, the k-th on A +
 * k·sa, B + k·sb, C + k·sc. beta = 0 never reads C. */
static pw_status gemm(pw_cuda_ops *ops, const char *op, cublasOperation_t ta,
                      cublasOperation_t tb, int m, int n, int k, float alpha, const float *A,
                      int lda, int64_t sa, const float *B, int ldb, int64_t sb, float beta,
                      float *C, int ldc, int64_t sc, int batch)
{
    cublasStatus_t s;
    if (batch == 1)
        s = cublasGemmEx(ops->blas, ta, tb, m, n, k, &alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F,
                         ldb, &beta, C, CUDA_R_32F, ldc, ops->compute, CUBLAS_GEMM_DEFAULT);
    else
        s = cublasGemmStridedBatchedEx(ops->blas, ta, tb, m, n, k, &alpha, A, CUDA_R_32F, lda,
                                       (long long)sa, B, CUDA_R_32F, ldb, (long long)sb, &beta,
                                       C, CUDA_R_32F, ldc, (long long)sc, batch, ops->compute,
                                       CUBLAS_GEMM_DEFAULT);
    return blas_status(s, op);
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

/* ---------------------------------------------------------------- math modes */

static const char *const math_names[] = {"fp32", "tf32", "bf16"};

extern "C" const char *pw_cuda_math_name(pw_cuda_math m)
{
    return (unsigned)m < sizeof math_names / sizeof math_names[0] ? math_names[m] : "unknown";
}

extern "C" int pw_cuda_math_parse(const char *s, pw_cuda_math *out)
{
    for (unsigned i = 0; s && i < sizeof math_names / sizeof math_names[0]; i++)
        if (!strcasecmp(s, math_names[i])) {
            *out = (pw_cuda_math)i;
            return 0;
        }
    return -1;
}

/* fp32 operands, fp32 accumulation and output in every mode; the FAST
 * types let the tensor cores round the operands (TF32: 10-bit mantissa,
 * bf16: 7-bit). */
static cublasComputeType_t compute_type(pw_cuda_math m)
{
    switch (m) {
    case PW_CUDA_MATH_TF32: return CUBLAS_COMPUTE_32F_FAST_TF32;
    case PW_CUDA_MATH_BF16: return CUBLAS_COMPUTE_32F_FAST_16BF;
    default: return CUBLAS_COMPUTE_32F;
    }
}

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
    if ((unsigned)cfg->math > PW_CUDA_MATH_BF16)
        return pw_error(PW_ERR_INVALID_ARG, "CUDA ops: math mode %d is not fp32, tf32 or bf16",
                        (int)cfg->math);
    e = cudaSetDevice(cfg->device);
    if (e != cudaSuccess) return launch_status("create");
    pw_cuda_ops *ops = (pw_cuda_ops *)calloc(1, sizeof *ops);
    if (!ops) return pw_error(PW_ERR_NOMEM, "CUDA ops: out of host memory");
    ops->device = cfg->device;
    ops->stream = cfg->stream;
    ops->compute = compute_type(cfg->math);
    pw_status st = blas_status(cublasCreate(&ops->blas), "create");
    if (st != PW_OK) {
        free(ops);
        return st;
    }
    if (cublasLtCreate(&ops->lt) != CUBLAS_STATUS_SUCCESS) ops->lt = NULL; /* unfused bias then */
    /* The math mode travels in each GEMM's compute type (gemm()); the
     * handle's mode stays CUBLAS_DEFAULT_MATH, which never turns
     * CUBLAS_COMPUTE_32F into TF32 on its own. Atomics stay disallowed (the
     * default, stated for the reader): some cuBLAS routines would otherwise
     * change bits run to run. */
    st = blas_status(cublasSetMathMode(ops->blas, CUBLAS_DEFAULT_MATH), "create");
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

static void lt_plan_free(lt_plan *p)
{
    if (p->desc) cublasLtMatmulDescDestroy(p->desc);
    if (p->a) cublasLtMatrixLayoutDestroy(p->a);
    if (p->b) cublasLtMatrixLayoutDestroy(p->b);
    if (p->d) cublasLtMatrixLayoutDestroy(p->d);
    memset(p, 0, sizeof *p);
}

/* The plan of y (n, out) = x (n, in) · wᵀ + b, i.e. yᵀ (out, n) = op(w)·xᵀ
 * with w stored (in, out) column-major, as linear_fwd's cublasGemmEx call
 * sees them; NULL when there is none (the caller takes the unfused path). */
static lt_plan *lt_plan_for(pw_cuda_ops *ops, int64_t n, int64_t in, int64_t out)
{
    if (!ops->lt) return NULL;
    for (int i = 0; i < ops->n_plans; i++) {
        lt_plan *p = &ops->plans[i];
        if (p->n == n && p->in == in && p->out == out) return p->ok ? p : NULL;
    }
    if (ops->n_plans == LT_PLANS) return NULL; /* many shapes: the rest unfused */
    lt_plan *p = &ops->plans[ops->n_plans++];
    memset(p, 0, sizeof *p);
    p->n = n;
    p->in = in;
    p->out = out;
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t f32 = CUDA_R_32F;
    const uint64_t ws = ops->workspace_bytes;
    const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_MASK & ~(uint32_t)CUBLASLT_REDUCTION_SCHEME_INPLACE;
    const uint32_t align = LT_ALIGN; /* what the heuristic may assume of every pointer */
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t res;
    int count = 0;
    int ok = cublasLtMatmulDescCreate(&p->desc, ops->compute, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &f32, sizeof f32) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatrixLayoutCreate(&p->a, CUDA_R_32F, (uint64_t)in, (uint64_t)out, in) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatrixLayoutCreate(&p->b, CUDA_R_32F, (uint64_t)in, (uint64_t)n, in) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatrixLayoutCreate(&p->d, CUDA_R_32F, (uint64_t)out, (uint64_t)n, out) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof schemes) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align, sizeof align) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align, sizeof align) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align, sizeof align) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align, sizeof align) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulAlgoGetHeuristic(ops->lt, p->desc, p->a, p->b, p->d, p->d, pref, 1, &res, &count) == CUBLAS_STATUS_SUCCESS &&
             count > 0;
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (!ok) {
        lt_plan_free(p);
        p->n = n; /* remembered as "none" */
        p->in = in;
        p->out = out;
        return NULL;
    }
    p->algo = res.algo;
    p->ok = 1;
    return p;
}

extern "C" void pw_cuda_ops_destroy(pw_cuda_ops *ops)
{
    if (!ops) return;
    for (int i = 0; i < ops->n_plans; i++) lt_plan_free(&ops->plans[i]);
    if (ops->lt) cublasLtDestroy(ops->lt);
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

/* ---------------------------------------------------------------- reductions over rows */

/* db, layernorm dw/db and the embedding gradient add n rows into d columns.
 * The CPU op adds row 0, then row 1, ...; float addition does not
 * associate, so to keep its bits every column must be that same chain of n
 * dependent adds: no tree, no split of the rows over threads or blocks.
 * The floor is n FADD latencies (~4 cycles each: ~2 µs per 1000 rows),
 * whatever the number of columns.
 *
 * One thread per column reading its rows from global memory (the first
 * version) paid a memory latency per row instead, ~0.1 µs (layernorm
 * bwd_weight, 1024 rows: 0.128 ms on the H100). Here a block owns COL_W
 * columns: its COL_WARPS warps load a tile of rows (a warp per row at a
 * time, 128 coalesced bytes) into registers, store it to shared memory, and
 * warp 0 — a thread per column — adds the tile's rows in order into a
 * register while the loads of the next tile are in flight. A tile costs
 * about max(one memory latency, its rows' adds), so with 128-256 rows per
 * tile the kernels run near the floor. The additions, their operands and
 * their order are the old kernels' exactly: the same bits. (The grid-stride
 * loop over column groups never changes a column's order either.) */
#define COL_W 32                          /* columns per block: one per lane */
#define COL_WARPS 8                       /* warps per block, loading rows */
#define COL_THREADS (COL_W * COL_WARPS)
#define DB_ROWS 256                       /* tile rows of db (one staged array) */

/* v[i] = a[r, col] for rows r = r0 + warp + COL_WARPS·i (i < PER) of the
 * (n, d) array a, 0 outside it: a warp reads COL_W consecutive floats of a
 * row. Loads only; nothing waits for them until v is used. */
template <int PER>
__device__ static __forceinline__ void load_tile(float (&v)[PER], const float *__restrict__ a,
                                                 int64_t r0, int64_t n, int64_t d, int64_t col)
{
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        const int64_t r = r0 + warp + (int64_t)COL_WARPS * i;
        v[i] = col < d && r < n ? a[r * d + col] : 0.0f;
    }
}

/* Rows of the tile that starts at r0 (≤ rows, the tile height). */
__device__ static __forceinline__ int tile_rows(int64_t r0, int64_t n, int rows)
{
    return n - r0 < rows ? (int)(n - r0) : rows;
}

/* db[j] += Σ_r dy[r, j], r = 0, 1, ... in order (the CPU's order). */
__global__ static void __launch_bounds__(COL_THREADS)
    k_col_sum_add(const float *__restrict__ dy, float *__restrict__ db, int64_t n, int64_t d)
{
    constexpr int PER = DB_ROWS / COL_WARPS;
    __shared__ float tile[DB_ROWS][COL_W];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int64_t c0 = (int64_t)blockIdx.x * COL_W; c0 < d; c0 += (int64_t)gridDim.x * COL_W) {
        const int64_t col = c0 + lane;
        float acc = warp == 0 && col < d ? db[col] : 0.0f;
        float v[PER];
        load_tile(v, dy, 0, n, d, col);
        for (int64_t r0 = 0; r0 < n; r0 += DB_ROWS) {
#pragma unroll
            for (int i = 0; i < PER; i++) tile[warp + COL_WARPS * i][lane] = v[i];
            __syncthreads();
            if (r0 + DB_ROWS < n) load_tile(v, dy, r0 + DB_ROWS, n, d, col);
            if (warp == 0) {
                const int rows = tile_rows(r0, n, DB_ROWS);
#pragma unroll 16
                for (int r = 0; r < rows; r++) acc += tile[r][lane];
            }
            __syncthreads(); /* the tile is read before the next one overwrites it */
        }
        if (warp == 0 && col < d) db[col] = acc;
    }
}

/* ---------------------------------------------------------------- exp */

/* The CPU's vec_exp (stages/ops/cpu/ops.c), one lane: same constants, same
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

extern "C" pw_status pw_cuda_linear_fwd(pw_cuda_ops *ops, const float *x, const float *w,
                                        const float *b, float *y, int64_t n, int64_t in,
                                        int64_t out)
{
    if (n <= 0 || out <= 0) return PW_OK;
    PW_CHECK(dims_ok("linear_fwd", n, in, out));
    const int aligned = ((uintptr_t)x | (uintptr_t)w | (uintptr_t)b | (uintptr_t)y) % LT_ALIGN == 0;
    if (b && in > 0 && aligned) {
        lt_plan *p = lt_plan_for(ops, n, in, out);
        if (p) { /* the bias in the GEMM's epilogue: y = x·wᵀ + b in one pass */
            const float one = 1.0f, zero = 0.0f;
            PW_CHECK(blas_status(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                                &b, sizeof b), "linear_fwd"));
            return blas_status(cublasLtMatmul(ops->lt, p->desc, &one, w, p->a, x, p->b, &zero, y, p->d,
                                              y, p->d, &p->algo, ops->workspace,
                                              ops->workspace_bytes, ops->stream),
                               "linear_fwd");
        }
    }
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
    /* y (n, out) = x · wᵀ  ⇔  yᵀ (out, n) = w · xᵀ; w is (in, out) column-major. */
    return gemm(ops, "linear_fwd", CUBLAS_OP_T, CUBLAS_OP_N, (int)out, (int)n, (int)in, 1.0f, w,
                (int)in, 0, x, (int)in, 0, beta, y, (int)out, 0, 1);
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
    /* dx (n, in) = dy · w  ⇔  dxᵀ (in, n) = wᵀ · dyᵀ. beta = 0 never reads dx. */
    return gemm(ops, "linear_bwd_input", CUBLAS_OP_N, CUBLAS_OP_N, (int)in, (int)n, (int)out,
                1.0f, w, (int)in, 0, dy, (int)out, 0, accumulate ? 1.0f : 0.0f, dx, (int)in, 0,
                1);
}

extern "C" pw_status pw_cuda_linear_bwd_weight(pw_cuda_ops *ops, const float *dy, const float *x,
                                               float *dw, float *db, int64_t n, int64_t in,
                                               int64_t out)
{
    if (n <= 0 || out <= 0) return PW_OK;
    PW_CHECK(dims_ok("linear_bwd_weight", n, in, out));
    if (in > 0) {
        /* dw (out, in) += dyᵀ · x  ⇔  dwᵀ (in, out) += xᵀ · dy. */
        PW_CHECK(gemm(ops, "linear_bwd_weight", CUBLAS_OP_N, CUBLAS_OP_T, (int)in, (int)out,
                      (int)n, 1.0f, x, (int)in, 0, dy, (int)out, 0, 1.0f, dw, (int)in, 0, 1));
    }
    if (db) {
        k_col_sum_add<<<grid_of(out, COL_W), COL_THREADS, 0, ops->stream>>>(dy, db, n, out);
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

/* Tile rows of layernorm bwd_weight: two staged arrays, 32 KiB of shared
 * memory and 4 × LN_ROWS / COL_WARPS prefetch registers per thread. */
#define LN_ROWS 128

/* dw[j] += Σ_r dy[r, j]·x̂[r, j], db[j] += Σ_r dy[r, j], rows in order (the
 * CPU's order: bit-identical). The tile holds the product, computed as the
 * CPU does, g·((x − mean)·rstd), and g; warp 0 adds them up ("reductions
 * over rows"). */
__global__ static void __launch_bounds__(COL_THREADS)
    k_layernorm_bwd_weight(const float *__restrict__ x, const float *__restrict__ mean,
                           const float *__restrict__ rstd, const float *__restrict__ dy,
                           float *__restrict__ dw, float *__restrict__ db, int64_t n, int64_t d)
{
    constexpr int PER = LN_ROWS / COL_WARPS;
    __shared__ float tp[LN_ROWS][COL_W]; /* g·x̂ */
    __shared__ float tg[LN_ROWS][COL_W]; /* g */
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int64_t c0 = (int64_t)blockIdx.x * COL_W; c0 < d; c0 += (int64_t)gridDim.x * COL_W) {
        const int64_t col = c0 + lane;
        float aw = 0.0f, ab = 0.0f;
        if (warp == 0 && col < d) {
            aw = dw[col];
            ab = db[col];
        }
        /* Raw loads of a tile (mean and rstd as (n, 1) arrays: each row's
         * value); the product is formed when they are stored, so nothing
         * waits for them before then. */
        float vx[PER], vg[PER], vm[PER], vr[PER];
        load_tile(vx, x, 0, n, d, col);
        load_tile(vg, dy, 0, n, d, col);
        load_tile(vm, mean, 0, n, 1, 0);
        load_tile(vr, rstd, 0, n, 1, 0);
        for (int64_t r0 = 0; r0 < n; r0 += LN_ROWS) {
#pragma unroll
            for (int i = 0; i < PER; i++) {
                tp[warp + COL_WARPS * i][lane] = vg[i] * ((vx[i] - vm[i]) * vr[i]);
                tg[warp + COL_WARPS * i][lane] = vg[i];
            }
            __syncthreads();
            const int64_t next = r0 + LN_ROWS;
            if (next < n) {
                load_tile(vx, x, next, n, d, col);
                load_tile(vg, dy, next, n, d, col);
                load_tile(vm, mean, next, n, 1, 0);
                load_tile(vr, rstd, next, n, 1, 0);
            }
            if (warp == 0) {
                const int rows = tile_rows(r0, n, LN_ROWS);
#pragma unroll 16
                for (int r = 0; r < rows; r++) {
                    aw += tp[r][lane];
                    ab += tg[r][lane];
                }
            }
            __syncthreads(); /* the tile is read before the next one overwrites it */
        }
        if (warp == 0 && col < d) {
            dw[col] = aw;
            db[col] = ab;
        }
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
    k_layernorm_bwd_weight<<<grid_of(d, COL_W), COL_THREADS, 0, ops->stream>>>(x, mean, rstd, dy,
                                                                               dw, db, n, d);
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

/* The embedding gradient, dw[tokens[r], j] += dy[r, j] for r = 0, 1, ...:
 * each (token, column) is a chain of adds over that token's rows in
 * position order, and chains of different tokens are independent. The
 * first version walked all rows of a column in one thread, a dw
 * read-modify-write per row (0.256 ms for 4096 rows on the H100).
 *
 * Here a block owns COL_W columns and goes through the rows in tiles of
 * EMB_ROWS, with the tile's tokens and dy in shared memory. For each row
 * the tile records whether it is its token's first row in the tile (a
 * "head") and the tile's next row with the same token. Then each head's
 * dw element is loaded once, its chain (the head, next, next of next, ...)
 * added in row order in a register, and stored once. Heads of a tile have
 * different tokens, so their loads are all in flight at once, and the only
 * serial global traffic left is one dw read-modify-write per distinct token
 * per tile; a tile's stores precede the next tile's loads (__syncthreads),
 * so a token seen in both continues from the stored value. Every (token,
 * column) gets the CPU's adds in the CPU's order: the same bits. While the
 * dw loads of tile k are in flight, the block computes tile k+1's links
 * (tokens double-buffered) and loads tile k+1's dy and tile k+2's tokens. */
#define EMB_ROWS 128

/* tokens[i], or −1 (never a valid token) past the end. */
__device__ static __forceinline__ int32_t token_at(const int32_t *__restrict__ tokens, int64_t i,
                                                   int64_t n)
{
    return i < n ? tokens[i] : -1;
}

/* For row r = threadIdx.x (< EMB_ROWS) of a tile of `rows` rows with
 * tokens tok: head[r] = 1 when its token is valid and no earlier row of the
 * tile has it; next[r] = the nearest later row of the tile with the same
 * token, or −1 (also for invalid tokens and rows past the tile's end). */
__device__ static void emb_links(const int32_t *tok, int rows, int64_t vocab, int *next,
                                 int *head)
{
    const int r = threadIdx.x;
    const int32_t t = tok[r];
    const bool valid = r < rows && t >= 0 && (int64_t)t < vocab;
    bool seen = false;
    int nx = -1;
    /* Every lane reads the same tok[k] (a broadcast); downwards, so the
     * last match above r is the nearest. */
    for (int k = rows - 1; k >= 0; k--) {
        const bool same = tok[k] == t;
        seen = seen || (same && k < r);
        nx = same && k > r ? k : nx;
    }
    head[r] = valid && !seen;
    next[r] = valid ? nx : -1;
}

/* dw is read and written by different threads of the block (a token's
 * chain in tile k and in tile k+1 may be other warps'), ordered by
 * __syncthreads, so it is a plain pointer: no __restrict__, never the
 * read-only cache. */
__global__ static void __launch_bounds__(COL_THREADS)
    k_embedding_bwd(const int32_t *__restrict__ tokens, const float *__restrict__ dy, float *dw,
                    int64_t n, int64_t vocab, int64_t d)
{
    constexpr int PER = EMB_ROWS / COL_WARPS; /* rows per thread and tile: warp + COL_WARPS·i */
    __shared__ float sdy[EMB_ROWS][COL_W];    /* dy of this tile */
    __shared__ int32_t stok[2][EMB_ROWS];     /* tokens of tiles k (k & 1) and k + 1 */
    __shared__ int snext[2][EMB_ROWS];        /* links of tiles k and k + 1 (emb_links) */
    __shared__ int shead[2][EMB_ROWS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, tid = threadIdx.x;
    const int64_t tiles = (n + EMB_ROWS - 1) / EMB_ROWS;
    for (int64_t c0 = (int64_t)blockIdx.x * COL_W; c0 < d; c0 += (int64_t)gridDim.x * COL_W) {
        const int64_t col = c0 + lane;
        const bool in = col < d;
        float v[PER];
        /* Tokens of tiles 0 and 1, dy of tile 0, links of tile 0. */
        if (tid < EMB_ROWS) {
            stok[0][tid] = token_at(tokens, tid, n);
            stok[1][tid] = token_at(tokens, EMB_ROWS + tid, n);
        }
        load_tile(v, dy, 0, n, d, col);
#pragma unroll
        for (int i = 0; i < PER; i++) sdy[warp + COL_WARPS * i][lane] = v[i];
        __syncthreads();
        if (tid < EMB_ROWS)
            emb_links(stok[0], tile_rows(0, n, EMB_ROWS), vocab, snext[0], shead[0]);
        __syncthreads();
        for (int64_t k = 0; k < tiles; k++) {
            const int b = (int)(k & 1);
            const int64_t r0 = k * EMB_ROWS;
            /* 1. The dw elements of this tile's heads. */
            float w[PER];
#pragma unroll
            for (int i = 0; i < PER; i++) {
                const int r = warp + COL_WARPS * i;
                w[i] = in && shead[b][r] ? dw[(int64_t)stok[b][r] * d + col] : 0.0f;
            }
            /* 2. Prefetch: dy of tile k + 1, tokens of tile k + 2 (0 and −1
             * past the end). Neither aliases dw. */
            load_tile(v, dy, r0 + EMB_ROWS, n, d, col);
            const int32_t t2 = tid < EMB_ROWS ? token_at(tokens, r0 + 2 * EMB_ROWS + tid, n) : -1;
            /* 3. Links of tile k + 1, whose tokens are in the other buffer. */
            if (k + 1 < tiles && tid < EMB_ROWS)
                emb_links(stok[b ^ 1], tile_rows(r0 + EMB_ROWS, n, EMB_ROWS), vocab, snext[b ^ 1],
                          shead[b ^ 1]);
            /* 4. Each head's chain, in row order, into its dw element. */
#pragma unroll
            for (int i = 0; i < PER; i++) {
                const int r = warp + COL_WARPS * i;
                if (!in || !shead[b][r]) continue;
                float acc = w[i];
                int j = r;
                do {
                    acc += sdy[j][lane];
                    j = snext[b][j];
                } while (j >= 0);
                dw[(int64_t)stok[b][r] * d + col] = acc;
            }
            /* This tile's dw stores before the next tile's loads; sdy,
             * stok[b] and the links of tile k are free after this. */
            __syncthreads();
            /* 5. Tile k + 1's dy and tile k + 2's tokens into the freed buffers. */
#pragma unroll
            for (int i = 0; i < PER; i++) sdy[warp + COL_WARPS * i][lane] = v[i];
            if (tid < EMB_ROWS) stok[b][tid] = t2;
            __syncthreads();
        }
    }
}

__global__ static void k_pos_fwd(const float *__restrict__ x, const float *__restrict__ w,
                                 float *__restrict__ y, int64_t batch, int64_t n)
{
    GRID_STRIDE(i, batch * n) y[i] = x[i] + w[i % n];
}

/* dw[i] += Σ_b dy[b, i], b in order (the CPU's order). Unlike the other
 * reductions over rows this one has T·d columns (hundreds of thousands) and
 * few rows (the micro-batch): a thread per column, consecutive threads on
 * consecutive elements, and the unrolled loads independent of the adds, so
 * the kernel streams dy at memory bandwidth with no tiling. */
__global__ static void k_pos_bwd(const float *__restrict__ dy, float *__restrict__ dw,
                                 int64_t batch, int64_t n)
{
    GRID_STRIDE(i, n)
    {
        float acc = dw[i];
#pragma unroll 4
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
    k_embedding_bwd<<<grid_of(d, COL_W), COL_THREADS, 0, ops->stream>>>(tokens, dy, dw, n, vocab,
                                                                        d);
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
    const float scale = (float)(1.0 / sqrt((double)hd));
    for (int64_t b = 0; b < batch; b++) {
        const float *q = qkv + b * T * ld, *k = q + D, *v = q + 2 * D;
        float *a = att + b * H * T * T;
        /* S (T, T) = scale · Q · Kᵀ  (the CPU's NoTrans/Trans GEMM). */
        PW_CHECK(gemm(ops, "attention_fwd", CUBLAS_OP_T, CUBLAS_OP_N, (int)T, (int)T, (int)hd,
                      scale, k, (int)ld, hd, q, (int)ld, hd, 0.0f, a, (int)T, T * T, (int)H));
        k_causal_softmax<<<(unsigned)(H * T), NT, 0, ops->stream>>>(a, T);
        PW_CHECK(launch_status("attention_fwd"));
        /* O (T, hd) = P · V  ⇔  Oᵀ = Vᵀ · Pᵀ. */
        PW_CHECK(gemm(ops, "attention_fwd", CUBLAS_OP_N, CUBLAS_OP_N, (int)hd, (int)T, (int)T,
                      1.0f, v, (int)ld, hd, a, (int)T, T * T, 0.0f, out + b * T * D, (int)D, hd,
                      (int)H));
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
    const float scale = (float)(1.0 / sqrt((double)hd));
    const float beta = accumulate ? 1.0f : 0.0f;
    for (int64_t b = 0; b < batch; b++) {
        const float *q = qkv + b * T * ld, *k = q + D, *v = q + 2 * D;
        const float *dO = dout + b * T * D;
        float *dq = dqkv + b * T * ld, *dk = dq + D, *dv = dq + 2 * D;
        const float *a = att + b * H * T * T;
        float *ds = scratch;
        /* dP (T, T) = dO · Vᵀ. */
        PW_CHECK(gemm(ops, "attention_bwd_input", CUBLAS_OP_T, CUBLAS_OP_N, (int)T, (int)T,
                      (int)hd, 1.0f, v, (int)ld, hd, dO, (int)D, hd, 0.0f, ds, (int)T, T * T,
                      (int)H));
        k_causal_softmax_bwd<<<(unsigned)(H * T), NT, 0, ops->stream>>>(a, ds, T, scale);
        PW_CHECK(launch_status("attention_bwd_input"));
        /* dQ (T, hd) = dS · K  ⇔  dQᵀ = Kᵀ · dSᵀ. */
        PW_CHECK(gemm(ops, "attention_bwd_input", CUBLAS_OP_N, CUBLAS_OP_N, (int)hd, (int)T,
                      (int)T, 1.0f, k, (int)ld, hd, ds, (int)T, T * T, beta, dq, (int)ld, hd,
                      (int)H));
        /* dK (T, hd) = dSᵀ · Q  ⇔  dKᵀ = Qᵀ · dS. */
        PW_CHECK(gemm(ops, "attention_bwd_input", CUBLAS_OP_N, CUBLAS_OP_T, (int)hd, (int)T,
                      (int)T, 1.0f, q, (int)ld, hd, ds, (int)T, T * T, beta, dk, (int)ld, hd,
                      (int)H));
        /* dV (T, hd) = Pᵀ · dO  ⇔  dVᵀ = dOᵀ · P. */
        PW_CHECK(gemm(ops, "attention_bwd_input", CUBLAS_OP_N, CUBLAS_OP_T, (int)hd, (int)T,
                      (int)T, 1.0f, dO, (int)D, hd, a, (int)T, T * T, beta, dv, (int)ld, hd,
                      (int)H));
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

/* Element i of a dropout forward: the mask from (key, sample, position). */
__device__ static void dropout_at(const float *__restrict__ x, float *__restrict__ y,
                                  uint8_t *__restrict__ mask, int64_t i, int64_t numel, float p,
                                  float scale, uint64_t key, int64_t first_sample)
{
    const int64_t b = i / numel, j = i - b * numel;
    const uint64_t idx = (uint64_t)(first_sample + b) * (uint64_t)numel + (uint64_t)j;
    const bool keep = rng_uniform(key, idx) >= p;
    mask[i] = (uint8_t)keep;
    y[i] = keep ? x[i] * scale : 0.0f;
}

__global__ static void k_dropout_fwd(const float *__restrict__ x, float *__restrict__ y,
                                     uint8_t *__restrict__ mask, int64_t batch, int64_t numel,
                                     float p, float scale, uint64_t key, int64_t first_sample)
{
    GRID_STRIDE(i, batch * numel) dropout_at(x, y, mask, i, numel, p, scale, key, first_sample);
}

/* The same, with (key, first_sample) read from device memory: a recorded
 * CUDA graph replays this kernel with new values written there first. */
__global__ static void k_dropout_fwd_dev(const float *__restrict__ x, float *__restrict__ y,
                                         uint8_t *__restrict__ mask, int64_t batch, int64_t numel,
                                         float p, float scale,
                                         const uint64_t *__restrict__ key_first)
{
    const uint64_t key = key_first[0];
    const int64_t first_sample = (int64_t)key_first[1];
    GRID_STRIDE(i, batch * numel) dropout_at(x, y, mask, i, numel, p, scale, key, first_sample);
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

extern "C" pw_status pw_cuda_dropout_fwd_dev(pw_cuda_ops *ops, const float *x, float *y,
                                             uint8_t *mask, int64_t batch, int64_t numel, float p,
                                             const uint64_t *key_first)
{
    if (batch <= 0 || numel <= 0) return PW_OK;
    k_dropout_fwd_dev<<<grid_for(batch * numel), NT, 0, ops->stream>>>(
        x, y, mask, batch, numel, p, 1.0f / (1.0f - p), key_first);
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

/* ---------------------------------------------------------------- replicas' all-reduce */

__global__ static void k_span_add(float *__restrict__ dst, const float *__restrict__ src, int64_t n)
{
    GRID_STRIDE(i, n) dst[i] = src[i] + dst[i];
}

extern "C" pw_status pw_cuda_span_apply(float *dst, const float *src, int64_t n, int add)
{
    if (n <= 0) return PW_OK;
    cudaPointerAttributes a;
    int cur = -1;
    if (cudaPointerGetAttributes(&a, dst) != cudaSuccess || cudaGetDevice(&cur) != cudaSuccess)
        return launch_status("all-reduce");
    if (a.type == cudaMemoryTypeDevice && a.device != cur && cudaSetDevice(a.device) != cudaSuccess)
        return launch_status("all-reduce");
    if (add) {
        k_span_add<<<grid_for(n), NT, 0, cudaStreamPerThread>>>(dst, src, n);
        return launch_status("all-reduce");
    }
    if (cudaMemcpyAsync(dst, src, (size_t)n * sizeof(float), cudaMemcpyDefault, cudaStreamPerThread))
        return launch_status("all-reduce");
    return PW_OK;
}

extern "C" pw_status pw_cuda_span_fence(void)
{
    if (cudaStreamSynchronize(cudaStreamPerThread) != cudaSuccess) return launch_status("all-reduce");
    return PW_OK;
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
