/* pipewright — CPU reference kernels (fp32). Contract in ops.h.
 *
 * How the kernels are written, and why:
 *   - GEMMs go through pw_cpu_gemm (gemm.h): single-threaded BLAS calls on
 *     tiles fixed by the shape, spread over the CPU thread team, so their
 *     bits do not depend on the thread count. Everything else is a sweep
 *     over its data, written (VEC_FOR, vec.h) so that gcc -O2 vectorises
 *     it. Kernels never allocate.
 *   - The sweeps run on the same team (pw_cpu_parallel_for), cut by the
 *     shape alone, in one of three ways that never split a reduction:
 *     element-wise kernels by ranges of PW_CPU_GRAIN elements; row kernels
 *     (layernorm, softmax) by ranges of whole rows, each row reduced by one
 *     thread exactly as before; reductions over rows (db, layernorm dw/db,
 *     the embeddings' weight gradients) by ranges of columns, each column
 *     summed over every row in row order. Every element is therefore
 *     computed by the same operations in the same order whichever thread
 *     takes its range and however many there are: the same bits as one
 *     sweep on one thread. Ranges start at multiples of VEC_N, so even an
 *     element's vector lane or scalar tail position is unchanged.
 *   - Row reductions in double use LANES independent partial sums combined
 *     in a fixed order: the same bits on every run, and independent chains
 *     that the compiler can vectorise. Attention runs its sequences and
 *     heads as independent items over the team.
 *   - Reductions over rows add each row straight into the destination, row
 *     0 first. Splitting a batch into micro-batches and calling once per
 *     micro-batch in order therefore gives the same bits as one call over
 *     the whole batch.
 *   - Pointers are `restrict`: ops.h promises arrays never alias.
 */
#include "stages/ops/cpu/ops.h"
#include "stages/ops/cpu/attention_avx512.h"
#include "stages/ops/cpu/gemm.h"
#include "stages/ops/cpu/vec.h"

#include <limits.h>
#include <math.h>
#include <string.h>

#include "graph/graph.h"
#include "runtime/rng.h"
#include "runtime/status.h"

/* ---------------------------------------------------------------- ranges */

/* Rows per range of a row kernel over rows of d: about PW_CPU_GRAIN
 * elements, at least one row. */
static int64_t rows_per_range(int64_t d)
{
    return d >= PW_CPU_GRAIN ? 1 : PW_CPU_GRAIN / (d > 0 ? d : 1);
}

/* Columns per range of a reduction over n rows of d: an eighth of the row
 * in whole 64-byte lines (16 floats, a multiple of VEC_N; two ranges
 * rarely write one cache line), at least 64 columns so that each range
 * reads runs of a few lines per row (narrower ranges walk the rows with too
 * little to read in each: slower than one thread); one range when the whole
 * is small. */
static int64_t cols_per_range(int64_t n, int64_t d)
{
    if (n * d < 2 * PW_CPU_GRAIN) return d;
    int64_t c = (d / 8 + 15) / 16 * 16;
    return c < 64 ? 64 : c;
}

/* The arguments of the sweeps below: each kernel uses the fields it names. */
typedef struct sweep {
    const float *x, *w, *b, *dy, *mean, *rstd;
    const int32_t *tok;     /* tokens or labels */
    const uint8_t *mask;
    float *y, *dx, *dw, *db;
    float *mean_out, *rstd_out;
    uint8_t *mask_out;
    int64_t n, d;           /* rows and their length, for row and column kernels */
    int64_t vocab;          /* embedding */
    float s;                /* a scale */
    float eps;              /* layernorm's epsilon; dropout's p */
    uint64_t key;           /* dropout */
    int64_t first;          /* dropout: the first element's random index */
    int acc;                /* add into the output (1) or write it (0) */
} sweep;

/* ---------------------------------------------------------------- linear */

void pw_cpu_linear_fwd(const float *restrict x, const float *restrict w,
                       const float *restrict b, float *restrict y, int64_t n,
                       int64_t in, int64_t out)
{
    if (n <= 0 || out <= 0) return;
    if (in <= 0) {
        if (b)
            for (int64_t r = 0; r < n; r++) memcpy(y + r * out, b, (size_t)out * sizeof(float));
        else
            memset(y, 0, (size_t)(n * out) * sizeof(float));
        return;
    }
    /* The bias goes in first and the GEMM adds onto it (beta = 1), tile by
     * tile: no pass over y of its own, same rounding (acc + b). */
    if (b) pw_cpu_gemm_bias(0, 1, n, out, in, x, in, w, in, b, y, out);
    else pw_cpu_gemm(0, 1, n, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
}

void pw_cpu_linear_bwd_input(const float *restrict dy, const float *restrict w,
                             float *restrict dx, int64_t n, int64_t in, int64_t out,
                             int accumulate)
{
    if (n <= 0 || in <= 0) return;
    if (out <= 0) { /* dx = 0·w: nothing to add, zero to write */
        if (!accumulate) memset(dx, 0, (size_t)(n * in) * sizeof(float));
        return;
    }
    /* beta = 0 makes the BLAS write C without reading it, so stale contents
     * (even NaN) never leak into dx. */
    pw_cpu_gemm(0, 0, n, in, out, 1.0f, dy, out, w, in, accumulate ? 1.0f : 0.0f, dx, in);
}

/* db[0, m) += every row of dy (rows of ld), row 0 first. */
static void column_sums(const float *restrict dy, float *restrict db, int64_t n, int64_t ld,
                        int64_t m)
{
    for (int64_t r = 0; r < n; r++) {
        const float *restrict g = dy + r * ld;
        VEC_FOR(c, m, db[c] += g[c];);
    }
}

static void bias_grad_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    column_sums(j->dy + lo, j->db + lo, j->n, j->d, hi - lo);
}

void pw_cpu_linear_bwd_weight(const float *restrict dy, const float *restrict x,
                              float *restrict dw, float *restrict db, int64_t n,
                              int64_t in, int64_t out)
{
    if (n <= 0 || out <= 0) return;
    if (in > 0)
        pw_cpu_gemm(1, 0, out, in, n, 1.0f, dy, out, x, in, 1.0f, dw, in);
    if (db) {
        /* Row by row into db: fixed order, and micro-batch splits are exact. */
        const sweep j = {.dy = dy, .db = db, .n = n, .d = out};
        pw_cpu_parallel_for(out, cols_per_range(n, out), bias_grad_range, &j);
    }
}

/* ---------------------------------------------------------------- relu */

/* Each range is a call of a sequential kernel whose pointers are restrict
 * parameters: gcc vectorises VEC_FOR over those, not over restrict locals. */
static void relu_fwd_seq(const float *restrict x, float *restrict y, int64_t n)
{
    /* `x < 0 ? 0 : x` rather than fmaxf: NaN passes through, so a diverging
     * run is caught by the loss check instead of being silently zeroed. */
    VEC_FOR(i, n, float v = x[i]; y[i] = v < 0.0f ? 0.0f : v;);
}

static void relu_fwd_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    relu_fwd_seq(j->x + lo, j->y + lo, hi - lo);
}

void pw_cpu_relu_fwd(const float *restrict x, float *restrict y, int64_t n)
{
    const sweep j = {.x = x, .y = y};
    pw_cpu_parallel_for(n, PW_CPU_GRAIN, relu_fwd_range, &j);
}

static void relu_bwd_seq(const float *restrict y, const float *restrict dy, float *restrict dx,
                         int64_t n, int acc)
{
    if (acc) {
        VEC_FOR(i, n, float g = dy[i]; dx[i] += y[i] > 0.0f ? g : 0.0f;);
    } else {
        VEC_FOR(i, n, float g = dy[i]; dx[i] = y[i] > 0.0f ? g : 0.0f;);
    }
}

static void relu_bwd_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    relu_bwd_seq(j->x + lo, j->dy + lo, j->dx + lo, hi - lo, j->acc);
}

void pw_cpu_relu_bwd_input(const float *restrict y, const float *restrict dy,
                           float *restrict dx, int64_t n, int accumulate)
{
    const sweep j = {.x = y, .dy = dy, .dx = dx, .acc = accumulate};
    pw_cpu_parallel_for(n, PW_CPU_GRAIN, relu_bwd_range, &j);
}

/* ---------------------------------------------------------------- exp */

/* exp, gelu and the attention softmax are written with GCC's vector
 * extensions (4 floats: one SSE / NEON register, the baseline of x86-64 and
 * aarch64; wider types change the calling convention of these helpers
 * without AVX, which gcc warns about) rather than with VEC_FOR: they clamp
 * their argument, and gcc -O2 does not vectorise a loop whose float select
 * feeds further arithmetic ("control flow in loop").
 * glibc's expf/tanhf are calls it never vectorises without -ffast-math
 * (tanhf was the whole cost of gelu). The tail of an array goes through the
 * same vector code on a zero-padded copy, so an element's bits do not depend
 * on where it falls (micro-batch splits stay exact). */
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(16)));
typedef uint32_t vu __attribute__((vector_size(16)));

static inline vf vec_load(const float *p, int64_t m)
{
    vf v = {0};
    memcpy(&v, p, (size_t)m * sizeof(float));
    return v;
}

static inline void vec_store(float *p, vf v, int64_t m)
{
    memcpy(p, &v, (size_t)m * sizeof(float));
}

/* (x < lo) ? lo : x, lane by lane; NaN compares false and passes through. */
static inline vf vec_max_keep_nan(vf x, float lo)
{
    vi m = x < lo;
    vf l = {lo, lo, lo, lo};
    return (vf)(((vi)x & ~m) | ((vi)l & m));
}

static inline vf vec_min_keep_nan(vf x, float hi)
{
    vi m = x > hi;
    vf h = {hi, hi, hi, hi};
    return (vf)(((vi)x & ~m) | ((vi)h & m));
}

/* e^x:
 *   x = n·ln2 + r, n = round(x·log2 e), |r| ≤ ln2/2 (Cody–Waite: ln2 in two
 *   parts, the first with few enough bits that n·LN2_HI is exact);
 *   e^r by its Taylor series to degree 7 (truncation < 1e-8 relative);
 *   2^n built in the exponent bits.
 * n comes from "magic number" rounding: adding 1.5·2^23 leaves n in the low
 * mantissa bits, read back with unsigned arithmetic (no float-to-int
 * conversion, so NaN stays defined and propagates through r). The clamps
 * keep 2^n a normal float. */
static inline vf vec_exp(vf x)
{
    const float magic = 12582912.0f; /* 1.5·2^23 */
    x = vec_max_keep_nan(x, -87.33654f); /* n ≥ −126 */
    x = vec_min_keep_nan(x, 88.0f);      /* n ≤ 127 */
    vf t = x * 1.44269504088896341f + magic;
    vf n = t - magic;
    vf scale = (vf)(((vu)t - 0x4B400000u + 127u) << 23); /* 2^n */
    vf r = x - n * 0.693145751953125f;   /* LN2_HI */
    r = r - n * 1.428606765330187045e-06f; /* LN2_LO */
    vf q = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r + 1.0f;
    return q * scale;
}

/* for (i = 0; i < n; i += VF) with m = the lanes in use (VF, or the tail). */
#define VF ((int64_t)(sizeof(vf) / sizeof(float)))
#define VF_FOR(i, m, n, ...)                                                  \
    do {                                                                      \
        const int64_t vf_n_ = (n);                                            \
        int64_t i = 0;                                                        \
        for (; i + VF <= vf_n_; i += VF) {                                    \
            const int64_t m = VF;                                             \
            __VA_ARGS__                                                       \
        }                                                                     \
        if (i < vf_n_) {                                                      \
            const int64_t m = vf_n_ - i;                                      \
            __VA_ARGS__                                                       \
        }                                                                     \
    } while (0)

void pw_cpu_exp(const float *restrict x, float *restrict y, int64_t n)
{
    VF_FOR(i, m, n, vec_store(y + i, vec_exp(vec_load(x + i, m)), m););
}

/* ---------------------------------------------------------------- gelu */

#define GELU_K 0.7978845608028654f /* √(2/π) */
#define GELU_C 0.044715f

/* 0.5·x·(1 + tanh u) = x·σ(2u) = x / (1 + e^(−2u)): the same function with
 * one exp, and no 1 + tanh cancellation in the left tail. */
static inline vf vec_gelu(vf v)
{
    vf e = vec_exp(-2.0f * GELU_K * (v + GELU_C * v * v * v));
    return v / (1.0f + e);
}

/* d/dx of x·σ(2u), u = k·(x + c·x³), σ(2u) = 1/(1 + e), e = e^(−2u):
 *   σ + x·σ·(1 − σ)·2·u',  u' = k·(1 + 3c·x²),  1 − σ = e·σ             */
static inline vf vec_gelu_grad(vf v)
{
    vf e = vec_exp(-2.0f * GELU_K * (v + GELU_C * v * v * v));
    vf s = 1.0f / (1.0f + e);
    vf du = GELU_K * (1.0f + 3.0f * GELU_C * v * v);
    return s + 2.0f * v * s * (e * s) * du;
}

static void gelu_fwd_seq(const float *restrict x, float *restrict y, int64_t n)
{
    VF_FOR(i, m, n, vec_store(y + i, vec_gelu(vec_load(x + i, m)), m););
}

static void gelu_fwd_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    gelu_fwd_seq(j->x + lo, j->y + lo, hi - lo);
}

void pw_cpu_gelu_fwd(const float *restrict x, float *restrict y, int64_t n)
{
    const sweep j = {.x = x, .y = y};
    pw_cpu_parallel_for(n, PW_CPU_GRAIN, gelu_fwd_range, &j);
}

static void gelu_bwd_seq(const float *restrict x, const float *restrict dy, float *restrict dx,
                         int64_t n, int acc)
{
    if (acc) {
        VF_FOR(i, m, n, vf g = vec_load(dy + i, m) * vec_gelu_grad(vec_load(x + i, m));
               vec_store(dx + i, vec_load(dx + i, m) + g, m););
    } else {
        VF_FOR(i, m, n, vf g = vec_load(dy + i, m) * vec_gelu_grad(vec_load(x + i, m));
               vec_store(dx + i, g, m););
    }
}

static void gelu_bwd_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    gelu_bwd_seq(j->x + lo, j->dy + lo, j->dx + lo, hi - lo, j->acc);
}

void pw_cpu_gelu_bwd_input(const float *restrict x, const float *restrict dy,
                           float *restrict dx, int64_t n, int accumulate)
{
    const sweep j = {.x = x, .dy = dy, .dx = dx, .acc = accumulate};
    pw_cpu_parallel_for(n, PW_CPU_GRAIN, gelu_bwd_range, &j);
}

/* ---------------------------------------------------------------- layernorm */

/* Partial sums per row reduction. Part of the result's definition: changing
 * it changes the rounding (and so the bits) of layernorm and softmax. */
#define LANES 8

/* Σ v in double (see the file comment for the lane scheme). */
static double sum_d(const float *restrict v, int64_t d)
{
    double acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += (double)v[i + l];
    double s = 0.0;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; i < d; i++) s += (double)v[i];
    return s;
}

/* Σ (v − m)² in double: the second pass of a two-pass variance. */
static double sumsq_dev_d(const float *restrict v, double m, int64_t d)
{
    double acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) {
            double e = (double)v[i + l] - m;
            acc[l] += e * e;
        }
    double s = 0.0;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; i < d; i++) {
        double e = (double)v[i] - m;
        s += e * e;
    }
    return s;
}

static void layernorm_fwd_row(const float *restrict xr, const float *restrict w,
                              const float *restrict b, float *restrict yr, float *restrict mean,
                              float *restrict rstd, int64_t d, float eps)
{
    /* Two passes (mean, then squared deviations) in double: no
     * catastrophic cancellation when |mean| ≫ std. */
    double m = sum_d(xr, d) / (double)d;
    double var = sumsq_dev_d(xr, m, d) / (double)d;
    float mf = (float)m;
    float rs = 1.0f / sqrtf((float)var + eps);
    *mean = mf;
    *rstd = rs;
    /* The backward recomputes x̂ from the stored float mean/rstd exactly
     * as here, so forward and backward see the same x̂. */
    VEC_FOR(c, d, yr[c] = (xr[c] - mf) * rs * w[c] + b[c];);
}

static void layernorm_fwd_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    const int64_t d = j->d;
    for (int64_t r = lo; r < hi; r++)
        layernorm_fwd_row(j->x + r * d, j->w, j->b, j->y + r * d, j->mean_out + r, j->rstd_out + r, d,
                          j->eps);
}

void pw_cpu_layernorm_fwd(const float *restrict x, const float *restrict w,
                          const float *restrict b, float *restrict y,
                          float *restrict mean, float *restrict rstd, int64_t n,
                          int64_t d, float eps)
{
    if (d <= 0) return;
    const sweep j = {.x = x, .w = w, .b = b, .y = y, .mean_out = mean, .rstd_out = rstd, .d = d,
                     .eps = eps};
    pw_cpu_parallel_for(n, rows_per_range(d), layernorm_fwd_range, &j);
}

static void layernorm_bwd_input_row(const float *restrict xr, const float *restrict w,
                                    const float *restrict gr, float *restrict dxr, float mf,
                                    float rs, int64_t d, int acc)
{
    /* With g = dy·w and x̂ = (x − mean)·rstd:
     *   dx = rstd · (g − mean(g) − x̂ · mean(g·x̂))                      */
    double s1[LANES] = {0}, s2[LANES] = {0};
    int64_t c = 0;
    for (; c + LANES <= d; c += LANES)
        for (int l = 0; l < LANES; l++) {
            float g = gr[c + l] * w[c + l];
            float xh = (xr[c + l] - mf) * rs;
            s1[l] += (double)g;
            s2[l] += (double)g * (double)xh;
        }
    double t1 = 0.0, t2 = 0.0;
    for (int l = 0; l < LANES; l++) {
        t1 += s1[l];
        t2 += s2[l];
    }
    for (; c < d; c++) {
        float g = gr[c] * w[c];
        float xh = (xr[c] - mf) * rs;
        t1 += (double)g;
        t2 += (double)g * (double)xh;
    }
    const float mg = (float)(t1 / (double)d), mgx = (float)(t2 / (double)d);
    if (acc) {
        VEC_FOR(k, d, float xh = (xr[k] - mf) * rs;
                dxr[k] += rs * (gr[k] * w[k] - mg - xh * mgx););
    } else {
        VEC_FOR(k, d, float xh = (xr[k] - mf) * rs;
                dxr[k] = rs * (gr[k] * w[k] - mg - xh * mgx););
    }
}

static void layernorm_bwd_input_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    const int64_t d = j->d;
    for (int64_t r = lo; r < hi; r++)
        layernorm_bwd_input_row(j->x + r * d, j->w, j->dy + r * d, j->dx + r * d, j->mean[r],
                                j->rstd[r], d, j->acc);
}

void pw_cpu_layernorm_bwd_input(const float *restrict x, const float *restrict w,
                                const float *restrict mean, const float *restrict rstd,
                                const float *restrict dy, float *restrict dx,
                                int64_t n, int64_t d, int accumulate)
{
    if (d <= 0) return;
    const sweep j = {.x = x, .w = w, .mean = mean, .rstd = rstd, .dy = dy, .dx = dx, .d = d,
                     .acc = accumulate};
    pw_cpu_parallel_for(n, rows_per_range(d), layernorm_bwd_input_range, &j);
}

/* dw[0, m) and db[0, m) += every row's terms (rows of ld), in row order. */
static void layernorm_bwd_weight_cols(const float *restrict x, const float *restrict mean,
                                      const float *restrict rstd, const float *restrict dy,
                                      float *restrict dw, float *restrict db, int64_t n,
                                      int64_t ld, int64_t m)
{
    for (int64_t r = 0; r < n; r++) {
        const float *restrict xr = x + r * ld;
        const float *restrict gr = dy + r * ld;
        const float mf = mean[r], rs = rstd[r];
        VEC_FOR(c, m, dw[c] += gr[c] * ((xr[c] - mf) * rs); db[c] += gr[c];);
    }
}

static void layernorm_bwd_weight_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    layernorm_bwd_weight_cols(j->x + lo, j->mean, j->rstd, j->dy + lo, j->dw + lo, j->db + lo, j->n,
                              j->d, hi - lo);
}

void pw_cpu_layernorm_bwd_weight(const float *restrict x, const float *restrict mean,
                                 const float *restrict rstd, const float *restrict dy,
                                 float *restrict dw, float *restrict db, int64_t n,
                                 int64_t d)
{
    if (n <= 0) return;
    const sweep j = {.x = x, .mean = mean, .rstd = rstd, .dy = dy, .dw = dw, .db = db, .n = n, .d = d};
    pw_cpu_parallel_for(d, cols_per_range(n, d), layernorm_bwd_weight_range, &j);
}

/* ---------------------------------------------------------------- add, copy */

static void add_seq(const float *restrict a, const float *restrict b, float *restrict y, int64_t n)
{
    VEC_FOR(i, n, y[i] = a[i] + b[i];);
}

static void add_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    add_seq(j->x + lo, j->w + lo, j->y + lo, hi - lo);
}

void pw_cpu_add_fwd(const float *restrict a, const float *restrict b, float *restrict y,
                    int64_t n)
{
    const sweep j = {.x = a, .w = b, .y = y};
    pw_cpu_parallel_for(n, PW_CPU_GRAIN, add_range, &j);
}

/* Copies and zeroing run at memory speed: ranges of 16 grains, so only
 * long arrays (gradients) are split. */
#define MEM_GRAIN (16 * PW_CPU_GRAIN)

static void copy_grad_seq(const float *restrict dy, float *restrict dx, int64_t n, int acc)
{
    if (acc) {
        VEC_FOR(i, n, dx[i] += dy[i];);
    } else {
        memcpy(dx, dy, (size_t)n * sizeof(float));
    }
}

static void copy_grad_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    copy_grad_seq(j->dy + lo, j->dx + lo, hi - lo, j->acc);
}

void pw_cpu_copy_grad(const float *restrict dy, float *restrict dx, int64_t n,
                      int accumulate)
{
    const sweep j = {.dy = dy, .dx = dx, .acc = accumulate};
    pw_cpu_parallel_for(n, accumulate ? PW_CPU_GRAIN : MEM_GRAIN, copy_grad_range, &j);
}

static void zero_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    memset(j->y + lo, 0, (size_t)(hi - lo) * sizeof(float));
}

void pw_cpu_zero(void *dst, size_t bytes)
{
    if (bytes % sizeof(float) == 0) {
        const sweep j = {.y = dst};
        pw_cpu_parallel_for((int64_t)(bytes / sizeof(float)), MEM_GRAIN, zero_range, &j);
    } else if (bytes) {
        memset(dst, 0, bytes);
    }
}

/* ---------------------------------------------------------------- softmax xent */

static int label_ok(int32_t label, int64_t C) { return label >= 0 && (int64_t)label < C; }

/* One row's results: its loss, whether its label counts, and whether its
 * first largest logit is the label. */
typedef struct xent_row {
    double loss;
    int ok, correct;
} xent_row;

/* Rows per block of the forward: the rows of a block are spread over the
 * team, their results kept here (on the stack), and then summed in row
 * order on the calling thread: the sum's order is the sequential loop's. */
#define XENT_ROWS 512

typedef struct xent_job {
    const float *logits;
    const int32_t *labels;
    float *probs;
    int64_t C, r0; /* the block's first row */
    xent_row *out; /* the block's rows */
} xent_job;

static void xent_fwd_range(const void *v, int64_t lo, int64_t hi)
{
    const xent_job *j = v;
    const int64_t C = j->C;
    for (int64_t k = lo; k < hi; k++) {
        const int64_t r = j->r0 + k;
        const float *restrict lr = j->logits + r * C;
        float *restrict pr = j->probs + r * C;
        /* The first largest logit: its value is the maximum (even with NaN:
         * comparisons with NaN are false either way). */
        int64_t best = 0;
        for (int64_t c = 1; c < C; c++)
            if (lr[c] > lr[best]) best = c;
        const float m = lr[best];
        /* exp(l − max) ≤ 1: no overflow at any logit size; the sum in
         * double keeps the normaliser exact to well below float rounding. */
        for (int64_t c = 0; c < C; c++) pr[c] = expf(lr[c] - m);
        double s = sum_d(pr, C);
        float inv = (float)(1.0 / s);
        VEC_FOR(c, C, pr[c] *= inv;);
        /* −log p[label] as logsumexp − logit[label]: stays accurate when
         * p[label] is tiny or rounds to 0 in float. */
        const int32_t lab = j->labels[r];
        xent_row *o = &j->out[k];
        o->ok = label_ok(lab, C);
        o->loss = o->ok ? ((double)m + log(s)) - (double)lr[lab] : 0.0;
        o->correct = best == lab;
    }
}

double pw_cpu_softmax_xent_fwd_count(const float *restrict logits, const int32_t *restrict labels,
                                     float *restrict probs, int64_t n, int64_t C,
                                     int64_t *correct)
{
    double loss = 0.0;
    int64_t right = 0;
    if (C > 0) {
        xent_row rows[XENT_ROWS];
        for (int64_t r0 = 0; r0 < n; r0 += XENT_ROWS) {
            const int64_t nb = n - r0 < XENT_ROWS ? n - r0 : XENT_ROWS;
            const xent_job j = {.logits = logits, .labels = labels, .probs = probs, .C = C,
                                .r0 = r0, .out = rows};
            pw_cpu_parallel_for(nb, rows_per_range(C), xent_fwd_range, &j);
            for (int64_t k = 0; k < nb; k++) {
                if (rows[k].ok) loss += rows[k].loss;
                right += rows[k].correct;
            }
        }
    }
    if (correct) *correct = right;
    return loss;
}

double pw_cpu_softmax_xent_fwd(const float *restrict logits, const int32_t *restrict labels,
                               float *restrict probs, int64_t n, int64_t C)
{
    return pw_cpu_softmax_xent_fwd_count(logits, labels, probs, n, C, NULL);
}

static void xent_bwd_row(const float *restrict pr, int32_t lab, float *restrict dr, int64_t C,
                         float scale, int acc)
{
    int ok = label_ok(lab, C);
    /* Sweep with no one-hot, then redo the label's element from its
     * saved old value, so it is rounded once: old + (p − 1)·scale. */
    float old = (ok && acc) ? dr[lab] : 0.0f;
    if (acc) {
        VEC_FOR(c, C, dr[c] += pr[c] * scale;);
    } else {
        VEC_FOR(c, C, dr[c] = pr[c] * scale;);
    }
    if (ok) dr[lab] = old + (pr[lab] - 1.0f) * scale;
}

static void xent_bwd_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    for (int64_t r = lo; r < hi; r++)
        xent_bwd_row(j->x + r * j->d, j->tok[r], j->dx + r * j->d, j->d, j->s, j->acc);
}

void pw_cpu_softmax_xent_bwd(const float *restrict probs, const int32_t *restrict labels,
                             float *restrict dlogits, int64_t n, int64_t C, float scale,
                             int accumulate)
{
    if (C <= 0) return;
    const sweep j = {.x = probs, .tok = labels, .dx = dlogits, .d = C, .s = scale, .acc = accumulate};
    pw_cpu_parallel_for(n, rows_per_range(C), xent_bwd_range, &j);
}

/* ---------------------------------------------------------------- embedding */

static void embedding_fwd_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    const int64_t d = j->d;
    for (int64_t r = lo; r < hi; r++) {
        int32_t t = j->tok[r];
        if (t >= 0 && (int64_t)t < j->vocab)
            memcpy(j->y + r * d, j->w + (int64_t)t * d, (size_t)d * sizeof(float));
        else
            memset(j->y + r * d, 0, (size_t)d * sizeof(float));
    }
}

void pw_cpu_embedding_fwd(const int32_t *restrict tokens, const float *restrict w,
                          float *restrict y, int64_t n, int64_t vocab, int64_t d)
{
    const sweep j = {.tok = tokens, .w = w, .y = y, .vocab = vocab, .d = d};
    pw_cpu_parallel_for(n, rows_per_range(d), embedding_fwd_range, &j);
}

static void add_into(const float *restrict g, float *restrict row, int64_t m)
{
    VEC_FOR(c, m, row[c] += g[c];);
}

/* Columns [lo, hi) of every row of dw, the rows of dy added in order. */
static void embedding_bwd_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    const int64_t d = j->d;
    for (int64_t r = 0; r < j->n; r++) {
        int32_t t = j->tok[r];
        if (t < 0 || (int64_t)t >= j->vocab) continue;
        add_into(j->dy + r * d + lo, j->dw + (int64_t)t * d + lo, hi - lo);
    }
}

void pw_cpu_embedding_bwd_weight(const int32_t *restrict tokens, const float *restrict dy,
                                 float *restrict dw, int64_t n, int64_t vocab, int64_t d)
{
    /* Row by row, in order: a token that occurs twice sums its rows in
     * position order, and micro-batch splits give the same bits. */
    if (n <= 0) return;
    const sweep j = {.tok = tokens, .dy = dy, .dw = dw, .n = n, .d = d, .vocab = vocab};
    pw_cpu_parallel_for(d, cols_per_range(n, d), embedding_bwd_range, &j);
}

/* Elements [lo, hi) of the batch × T·d output; a range may span samples. */
static void pos_embedding_fwd_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    const int64_t n = j->d;
    for (int64_t e = lo; e < hi;) {
        const int64_t i = e % n, len = hi - e < n - i ? hi - e : n - i;
        add_seq(j->x + e, j->w + i, j->y + e, len); /* one addition: lanes cannot change it */
        e += len;
    }
}

void pw_cpu_pos_embedding_fwd(const float *restrict x, const float *restrict w,
                              float *restrict y, int64_t batch, int64_t T, int64_t d)
{
    const sweep j = {.x = x, .w = w, .y = y, .d = T * d};
    pw_cpu_parallel_for(batch * T * d, PW_CPU_GRAIN, pos_embedding_fwd_range, &j);
}

/* Elements [lo, hi) of dw, the samples added in order. */
static void pos_embedding_bwd_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    column_sums(j->dy + lo, j->dw + lo, j->n, j->d, hi - lo);
}

void pw_cpu_pos_embedding_bwd_weight(const float *restrict dy, float *restrict dw,
                                     int64_t batch, int64_t T, int64_t d)
{
    if (batch <= 0) return;
    const sweep j = {.dy = dy, .dw = dw, .n = batch, .d = T * d};
    pw_cpu_parallel_for(T * d, PW_CPU_GRAIN, pos_embedding_bwd_range, &j);
}

/* ---------------------------------------------------------------- attention */

/* Causal attention only needs the lower triangle of each T×T score matrix.
 * The kernels cut the T positions into blocks of ATT_BLOCK rows and skip the
 * blocks above the diagonal: row block i (rows r0 .. r0+rn) needs key
 * columns 0 .. r0+rn only, and key block j (columns c0 .. c0+cn) only gets
 * gradient from query rows c0 .. T. That is (nb + 1) / (2·nb) of the full
 * square's GEMM work for nb blocks (62.5 % at T = 128), in GEMMs still big
 * enough to run near the BLAS's rate. Inside a block the diagonal's upper
 * part is computed and then overwritten with exact zeros, so it never
 * reaches an output. Blocks depend on T only, never on the batch size, so
 * a sequence's bits do not depend on the micro-batching.
 *
 * Where the CPU has AVX-512F and hd is a multiple of 16 (at most
 * PW_ATT_FAST_MAX_HD), the same items run attention_avx512.c's own
 * register-blocked kernels instead of the BLAS (the same products over the
 * lower triangle at a 16-column grain, stack tiles only, softmax rows 16
 * lanes wide): 1.4-1.8x faster at the tiny GPT's shapes than this path on
 * OpenBLAS's AVX-512 kernel, 4x on its default SSE one; other bits
 * (another summation order), still fixed by the shape alone. The blocked
 * BLAS path below is the fallback for every other CPU and head size. */
#define ATT_BLOCK PW_CPU_ATTENTION_BLOCK
_Static_assert(PW_CPU_ATTENTION_BLOCK == PW_ATTENTION_BLOCK,
               "graph/ops.c's attention cost counts blocks of PW_ATTENTION_BLOCK rows");

typedef struct att_job {
    const float *qkv, *att, *dout;
    float *out, *attw, *dqkv, *scratch;
    int64_t batch, T, D, H;
    float beta;
} att_job;

/* The largest of v[0 .. n), n ≥ 1, as `m = v[s] > m ? v[s] : m` from
 * m = v[0] would find it: lanes start at v[0], so a NaN there gives NaN and
 * a NaN elsewhere is passed over, as in that loop. The lanes may pick the
 * other zero of ±0 when the largest value is a zero; x − m and so exp(x − m)
 * are the same either way. */
static float max_f(const float *restrict v, int64_t n)
{
    const float v0 = v[0];
    vf mv = {v0, v0, v0, v0};
    int64_t s = 0;
    for (; s + VF <= n; s += VF) {
        vf x = vec_load(v + s, VF);
        vi gt = x > mv;
        mv = (vf)(((vi)x & gt) | ((vi)mv & ~gt));
    }
    float m = mv[0];
    for (int l = 1; l < VF; l++) m = mv[l] > m ? mv[l] : m;
    for (; s < n; s++) m = v[s] > m ? v[s] : m;
    return m;
}

/* A causal softmax row in place: row[0 .. len) = exp(row − max) / Σ, the sum
 * in double as sum_d adds (LANES partial sums, then the tail), taken as the
 * exponentials are stored; row[len .. T) = 0. */
static void softmax_row(float *restrict row, int64_t len, int64_t T)
{
    const float m = max_f(row, len);
    double acc[LANES] = {0};
    int64_t s = 0;
    for (; s + LANES <= len; s += LANES) {
        _Static_assert(LANES == 2 * 4, "two vectors per group of LANES");
        const vf e0 = vec_exp(vec_load(row + s, VF) - m), e1 = vec_exp(vec_load(row + s + VF, VF) - m);
        vec_store(row + s, e0, VF);
        vec_store(row + s + VF, e1, VF);
        for (int l = 0; l < VF; l++) {
            acc[l] += (double)e0[l];
            acc[VF + l] += (double)e1[l];
        }
    }
    double sum = 0.0;
    for (int l = 0; l < LANES; l++) sum += acc[l];
    VF_FOR(k, w, len - s, vec_store(row + s + k, vec_exp(vec_load(row + s + k, w) - m), w););
    for (; s < len; s++) sum += (double)row[s];
    const float inv = (float)(1.0 / sum);
    VEC_FOR(k, len, row[k] *= inv;);
    if (len < T) memset(row + len, 0, (size_t)(T - len) * sizeof(float));
}

/* One (sequence, head) of the forward, per row block: S = Q·Kᵀ/√hd and
 * O = P·V as BLAS GEMMs over the block's columns; the softmax writes exact
 * zeros above the diagonal (every entry of att above it is 0). Q, K, V are
 * read in place with leading dimension 3D; no copies. Items write disjoint
 * parts of att and out. */
static void attention_fwd_item(void *arg, int64_t item, int worker)
{
    (void)worker;
    const att_job *j = arg;
    const int64_t T = j->T, D = j->D, H = j->H, b = item / H, h = item % H;
    const int64_t hd = D / H, ld = 3 * D;
    const float scale = (float)(1.0 / sqrt((double)hd));
    const float *q = j->qkv + b * T * ld + h * hd, *k = q + D, *v = q + 2 * D;
    float *a = j->attw + (b * H + h) * T * T;
    float *o = j->out + b * T * D + h * hd;
    if (pw_cpu_att_fast_usable(hd)) {
        pw_cpu_att_scores(q, ld, k, ld, a, T, hd, scale);
        for (int64_t t = 0; t < T; t++) pw_cpu_att_softmax_row(a + t * T, t + 1, T);
        pw_cpu_att_rows(a, T, v, ld, o, D, hd, 0);
        return;
    }
    for (int64_t r0 = 0; r0 < T; r0 += ATT_BLOCK) {
        const int64_t rn = T - r0 < ATT_BLOCK ? T - r0 : ATT_BLOCK, cols = r0 + rn;
        float *ab = a + r0 * T;
        pw_cpu_gemm_1t(0, 1, rn, cols, hd, scale, q + r0 * ld, ld, k, ld, 0.0f, ab, T);
        for (int64_t t = r0; t < r0 + rn; t++) softmax_row(a + t * T, t + 1, T);
        pw_cpu_gemm_1t(0, 0, rn, hd, cols, 1.0f, ab, T, v, ld, 0.0f, o + r0 * D, D);
    }
}

void pw_cpu_attention_fwd(const float *restrict qkv, float *restrict out, float *restrict att,
                          int64_t batch, int64_t T, int64_t D, int64_t H)
{
    if (batch <= 0 || T <= 0 || D <= 0 || H <= 0) return;
    att_job j = {.qkv = qkv, .out = out, .attw = att, .batch = batch, .T = T, .D = D, .H = H};
    pw_cpu_parallel(batch * H, attention_fwd_item, &j);
}

/* With P the probabilities and dP = dO·Vᵀ:
 *   dS[t, s] = P[t, s]·(dP[t, s] − Σ_s' P[t, s']·dP[t, s']) / √hd
 *   dQ = dS·K,  dK = dSᵀ·Q,  dV = Pᵀ·dO
 * P is zero above the diagonal, so dS is too, and the row sums run over
 * s ≤ t only. dP and dQ go by row blocks (columns up to the block's last
 * row), dK and dV by key blocks (rows from the block's first column on).
 * One item is one head over every sequence (sequences in order), with the
 * head's own T×T of scratch; items write disjoint columns of dqkv. */
/* dS for row t in place of dP: dr[s] = pr[s]·(dr[s] − Σ_s' pr[s']·dr[s'])·scale
 * for s < len, the dot in double as sum_d adds; dr[len .. T) = 0. */
static void dsoftmax_row(const float *restrict pr, float *restrict dr, int64_t len, int64_t T,
                         float scale)
{
    double acc[LANES] = {0};
    int64_t s = 0;
    for (; s + LANES <= len; s += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += (double)pr[s + l] * (double)dr[s + l];
    double dot = 0.0;
    for (int l = 0; l < LANES; l++) dot += acc[l];
    for (; s < len; s++) dot += (double)pr[s] * (double)dr[s];
    const float df = (float)dot;
    VEC_FOR(jj, len, dr[jj] = pr[jj] * (dr[jj] - df) * scale;);
    if (len < T) memset(dr + len, 0, (size_t)(T - len) * sizeof(float));
}

static void attention_bwd_item(void *arg, int64_t h, int worker)
{
    (void)worker;
    const att_job *j = arg;
    const int64_t T = j->T, D = j->D, H = j->H;
    const int64_t hd = D / H, ld = 3 * D;
    const float scale = (float)(1.0 / sqrt((double)hd));
    const float beta = j->beta;
    float *ds = j->scratch + h * T * T;
    const int fast = pw_cpu_att_fast_usable(hd);
    for (int64_t b = 0; b < j->batch; b++) {
        const float *q = j->qkv + b * T * ld + h * hd, *k = q + D, *v = q + 2 * D;
        const float *dO = j->dout + b * T * D + h * hd;
        float *dq = j->dqkv + b * T * ld + h * hd, *dk = dq + D, *dv = dq + 2 * D;
        const float *a = j->att + (b * H + h) * T * T;
        if (fast) {
            const int acc = beta != 0.0f;
            pw_cpu_att_scores(dO, D, v, ld, ds, T, hd, 1.0f);
            for (int64_t t = 0; t < T; t++)
                pw_cpu_att_dsoftmax_row(a + t * T, ds + t * T, t + 1, T, scale);
            pw_cpu_att_rows(ds, T, k, ld, dq, ld, hd, acc);
            pw_cpu_att_cols(ds, T, q, ld, dk, ld, hd, acc);
            pw_cpu_att_cols(a, T, dO, D, dv, ld, hd, acc);
            continue;
        }
        for (int64_t r0 = 0; r0 < T; r0 += ATT_BLOCK) {
            const int64_t rn = T - r0 < ATT_BLOCK ? T - r0 : ATT_BLOCK, cols = r0 + rn;
            pw_cpu_gemm_1t(0, 1, rn, cols, hd, 1.0f, dO + r0 * D, D, v, ld, 0.0f, ds + r0 * T, T);
            for (int64_t t = r0; t < r0 + rn; t++) dsoftmax_row(a + t * T, ds + t * T, t + 1, T, scale);
            pw_cpu_gemm_1t(0, 0, rn, hd, cols, 1.0f, ds + r0 * T, T, k, ld, beta, dq + r0 * ld, ld);
        }
        for (int64_t c0 = 0; c0 < T; c0 += ATT_BLOCK) {
            const int64_t cn = T - c0 < ATT_BLOCK ? T - c0 : ATT_BLOCK, rows = T - c0;
            pw_cpu_gemm_1t(1, 0, cn, hd, rows, 1.0f, ds + c0 * T + c0, T, q + c0 * ld, ld, beta,
                           dk + c0 * ld, ld);
            pw_cpu_gemm_1t(1, 0, cn, hd, rows, 1.0f, a + c0 * T + c0, T, dO + c0 * D, D, beta,
                           dv + c0 * ld, ld);
        }
    }
}

void pw_cpu_attention_bwd_input(const float *restrict qkv, const float *restrict att,
                                const float *restrict dout, float *restrict dqkv,
                                float *restrict scratch, int64_t batch, int64_t T, int64_t D,
                                int64_t H, int accumulate)
{
    if (batch <= 0 || T <= 0 || D <= 0 || H <= 0) return;
    att_job j = {.qkv = qkv, .att = att, .dout = dout, .dqkv = dqkv, .scratch = scratch,
                 .batch = batch, .T = T, .D = D, .H = H,
                 .beta = accumulate ? 1.0f : 0.0f /* 0: C is written, never read */};
    pw_cpu_parallel(H, attention_bwd_item, &j);
}

/* ---------------------------------------------------------------- dropout */

/* Elements [lo, hi) of the batch × numel output: element e is element
 * e mod numel of sample first_sample + e / numel, whose random index is
 * (first_sample + e / numel)·numel + e mod numel = first_sample·numel + e. */
static void dropout_fwd_seq(const float *restrict x, float *restrict y, uint8_t *restrict mask,
                            int64_t n, float p, float scale, uint64_t key, uint64_t first)
{
    for (int64_t e = 0; e < n; e++) {
        int keep = pw_rng_uniform(key, first + (uint64_t)e) >= p;
        mask[e] = (uint8_t)keep;
        y[e] = keep ? x[e] * scale : 0.0f;
    }
}

static void dropout_fwd_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    dropout_fwd_seq(j->x + lo, j->y + lo, j->mask_out + lo, hi - lo, j->eps, j->s, j->key,
                    (uint64_t)j->first + (uint64_t)lo);
}

void pw_cpu_dropout_fwd(const float *restrict x, float *restrict y, uint8_t *restrict mask,
                        int64_t batch, int64_t numel, float p, uint64_t key,
                        int64_t first_sample)
{
    const sweep j = {.x = x, .y = y, .mask_out = mask, .eps = p, .s = 1.0f / (1.0f - p),
                     .key = key, .first = (int64_t)((uint64_t)first_sample * (uint64_t)numel)};
    pw_cpu_parallel_for(batch * numel, PW_CPU_GRAIN, dropout_fwd_range, &j);
}

static void dropout_bwd_seq(const uint8_t *restrict mask, const float *restrict dy,
                            float *restrict dx, int64_t n, float scale, int acc)
{
    if (acc) {
        VEC_FOR(i, n, float g = dy[i] * scale; dx[i] += mask[i] ? g : 0.0f;);
    } else {
        VEC_FOR(i, n, float g = dy[i] * scale; dx[i] = mask[i] ? g : 0.0f;);
    }
}

static void dropout_bwd_range(const void *v, int64_t lo, int64_t hi)
{
    const sweep *j = v;
    dropout_bwd_seq(j->mask + lo, j->dy + lo, j->dx + lo, hi - lo, j->s, j->acc);
}

void pw_cpu_dropout_bwd_input(const uint8_t *restrict mask, const float *restrict dy,
                              float *restrict dx, int64_t n, float p, int accumulate)
{
    const sweep j = {.mask = mask, .dy = dy, .dx = dx, .s = 1.0f / (1.0f - p), .acc = accumulate};
    pw_cpu_parallel_for(n, PW_CPU_GRAIN, dropout_bwd_range, &j);
}
