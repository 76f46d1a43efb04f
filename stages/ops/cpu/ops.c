/* pipewright — CPU reference kernels (fp32). Contract in ops.h.
 *
 * How the kernels are written, and why:
 *   - GEMMs go through pw_cpu_gemm (gemm.h): single-threaded BLAS calls on
 *     tiles fixed by the shape, spread over the CPU thread team, so their
 *     bits do not depend on the thread count. Everything else is a single
 *     sweep over its data, written (VEC_FOR below) so that gcc -O2
 *     vectorises it. Kernels never allocate.
 *   - Every reduction that is not a GEMM runs in a fixed order on the calling
 *     thread, so its bits depend only on its inputs (not on the thread
 *     count, not on the call history). Attention runs its sequences and
 *     heads as independent items over the team. Row reductions in double use LANES
 *     independent partial sums combined in a fixed order: the same bits on
 *     every run, and independent chains that the compiler can vectorise.
 *   - Reductions over rows (db, layernorm dw/db) add each row straight into
 *     the destination, row 0 first. Splitting a batch into micro-batches and
 *     calling once per micro-batch in order therefore gives the same bits as
 *     one call over the whole batch.
 *   - Pointers are `restrict`: ops.h promises arrays never alias.
 */
#include "stages/ops/cpu/ops.h"
#include "stages/ops/cpu/gemm.h"

#include <limits.h>
#include <math.h>
#include <string.h>

#include "graph/graph.h"
#include "runtime/rng.h"
#include "runtime/status.h"

/* gcc -O2 runs the vectoriser with its "very cheap" cost model: it vectorises
 * a loop only when the trip count is a known multiple of the vector width (no
 * epilogue, no run-time alias checks). A plain `for (i < n)` loop therefore
 * stays scalar. VEC_FOR(i, n, body) runs body over blocks of exactly VEC_N
 * elements (an inner loop gcc does vectorise), then over the scalar tail.
 * Bodies must load unconditionally: `c ? a[i] : 0` is a conditional load and
 * blocks vectorisation, so load into a local first. Checked with
 * -fopt-info-vec; the order of operations per element is unchanged, so the
 * bits are the same as the scalar loop's. */
#define VEC_N 8
#define VEC_FOR(i, n, ...)                                                    \
    do {                                                                      \
        const int64_t vec_n_ = (n);                                           \
        int64_t vec_b_ = 0;                                                   \
        for (; vec_b_ + VEC_N <= vec_n_; vec_b_ += VEC_N)                     \
            for (int vec_l_ = 0; vec_l_ < VEC_N; vec_l_++) {                  \
                const int64_t i = vec_b_ + vec_l_;                            \
                __VA_ARGS__                                                   \
            }                                                                 \
        for (int64_t i = vec_b_; i < vec_n_; i++) { __VA_ARGS__ }             \
    } while (0)

/* ---------------------------------------------------------------- linear */

void pw_cpu_linear_fwd(const float *restrict x, const float *restrict w,
                       const float *restrict b, float *restrict y, int64_t n,
                       int64_t in, int64_t out)
{
    if (n <= 0 || out <= 0) return;
    /* The bias goes in first and the GEMM adds onto it (beta = 1): one pass
     * over y fewer than GEMM-then-add, same rounding (acc + b). */
    float beta = 0.0f;
    if (b) {
        for (int64_t r = 0; r < n; r++) memcpy(y + r * out, b, (size_t)out * sizeof(float));
        beta = 1.0f;
    }
    if (in <= 0) {
        if (!b) memset(y, 0, (size_t)(n * out) * sizeof(float));
        return;
    }
    pw_cpu_gemm(0, 1, n, out, in, 1.0f, x, in, w, in, beta, y, out);
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

void pw_cpu_linear_bwd_weight(const float *restrict dy, const float *restrict x,
                              float *restrict dw, float *restrict db, int64_t n,
                              int64_t in, int64_t out)
{
    if (n <= 0 || out <= 0) return;
    if (in > 0)
        pw_cpu_gemm(1, 0, out, in, n, 1.0f, dy, out, x, in, 1.0f, dw, in);
    if (db) {
        /* Row by row into db: fixed order, and micro-batch splits are exact. */
        for (int64_t r = 0; r < n; r++) {
            const float *restrict g = dy + r * out;
            VEC_FOR(j, out, db[j] += g[j];);
        }
    }
}

/* ---------------------------------------------------------------- relu */

void pw_cpu_relu_fwd(const float *restrict x, float *restrict y, int64_t n)
{
    /* `x < 0 ? 0 : x` rather than fmaxf: NaN passes through, so a diverging
     * run is caught by the loss check instead of being silently zeroed. */
    VEC_FOR(i, n, float v = x[i]; y[i] = v < 0.0f ? 0.0f : v;);
}

void pw_cpu_relu_bwd_input(const float *restrict y, const float *restrict dy,
                           float *restrict dx, int64_t n, int accumulate)
{
    if (accumulate) {
        VEC_FOR(i, n, float g = dy[i]; dx[i] += y[i] > 0.0f ? g : 0.0f;);
    } else {
        VEC_FOR(i, n, float g = dy[i]; dx[i] = y[i] > 0.0f ? g : 0.0f;);
    }
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

void pw_cpu_gelu_fwd(const float *restrict x, float *restrict y, int64_t n)
{
    VF_FOR(i, m, n, vec_store(y + i, vec_gelu(vec_load(x + i, m)), m););
}

void pw_cpu_gelu_bwd_input(const float *restrict x, const float *restrict dy,
                           float *restrict dx, int64_t n, int accumulate)
{
    if (accumulate) {
        VF_FOR(i, m, n, vf g = vec_load(dy + i, m) * vec_gelu_grad(vec_load(x + i, m));
               vec_store(dx + i, vec_load(dx + i, m) + g, m););
    } else {
        VF_FOR(i, m, n, vf g = vec_load(dy + i, m) * vec_gelu_grad(vec_load(x + i, m));
               vec_store(dx + i, g, m););
    }
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

void pw_cpu_layernorm_fwd(const float *restrict x, const float *restrict w,
                          const float *restrict b, float *restrict y,
                          float *restrict mean, float *restrict rstd, int64_t n,
                          int64_t d, float eps)
{
    if (d <= 0) return;
    for (int64_t r = 0; r < n; r++) {
        const float *restrict xr = x + r * d;
        float *restrict yr = y + r * d;
        /* Two passes (mean, then squared deviations) in double: no
         * catastrophic cancellation when |mean| ≫ std. */
        double m = sum_d(xr, d) / (double)d;
        double var = sumsq_dev_d(xr, m, d) / (double)d;
        float mf = (float)m;
        float rs = 1.0f / sqrtf((float)var + eps);
        mean[r] = mf;
        rstd[r] = rs;
        /* The backward recomputes x̂ from the stored float mean/rstd exactly
         * as here, so forward and backward see the same x̂. */
        VEC_FOR(j, d, yr[j] = (xr[j] - mf) * rs * w[j] + b[j];);
    }
}

void pw_cpu_layernorm_bwd_input(const float *restrict x, const float *restrict w,
                                const float *restrict mean, const float *restrict rstd,
                                const float *restrict dy, float *restrict dx,
                                int64_t n, int64_t d, int accumulate)
{
    if (d <= 0) return;
    for (int64_t r = 0; r < n; r++) {
        const float *restrict xr = x + r * d;
        const float *restrict gr = dy + r * d;
        float *restrict dxr = dx + r * d;
        const float mf = mean[r], rs = rstd[r];
        /* With g = dy·w and x̂ = (x − mean)·rstd:
         *   dx = rstd · (g − mean(g) − x̂ · mean(g·x̂))                      */
        double s1[LANES] = {0}, s2[LANES] = {0};
        int64_t j = 0;
        for (; j + LANES <= d; j += LANES)
            for (int l = 0; l < LANES; l++) {
                float g = gr[j + l] * w[j + l];
                float xh = (xr[j + l] - mf) * rs;
                s1[l] += (double)g;
                s2[l] += (double)g * (double)xh;
            }
        double t1 = 0.0, t2 = 0.0;
        for (int l = 0; l < LANES; l++) {
            t1 += s1[l];
            t2 += s2[l];
        }
        for (; j < d; j++) {
            float g = gr[j] * w[j];
            float xh = (xr[j] - mf) * rs;
            t1 += (double)g;
            t2 += (double)g * (double)xh;
        }
        const float mg = (float)(t1 / (double)d), mgx = (float)(t2 / (double)d);
        if (accumulate) {
            VEC_FOR(k, d, float xh = (xr[k] - mf) * rs;
                    dxr[k] += rs * (gr[k] * w[k] - mg - xh * mgx););
        } else {
            VEC_FOR(k, d, float xh = (xr[k] - mf) * rs;
                    dxr[k] = rs * (gr[k] * w[k] - mg - xh * mgx););
        }
    }
}

void pw_cpu_layernorm_bwd_weight(const float *restrict x, const float *restrict mean,
                                 const float *restrict rstd, const float *restrict dy,
                                 float *restrict dw, float *restrict db, int64_t n,
                                 int64_t d)
{
    for (int64_t r = 0; r < n; r++) {
        const float *restrict xr = x + r * d;
        const float *restrict gr = dy + r * d;
        const float mf = mean[r], rs = rstd[r];
        VEC_FOR(j, d, dw[j] += gr[j] * ((xr[j] - mf) * rs); db[j] += gr[j];);
    }
}

/* ---------------------------------------------------------------- add, copy */

void pw_cpu_add_fwd(const float *restrict a, const float *restrict b, float *restrict y,
                    int64_t n)
{
    VEC_FOR(i, n, y[i] = a[i] + b[i];);
}

/* Element-wise passes over long arrays (gradients) run on the thread team
 * in chunks of fixed size: each element is computed by the same code
 * whichever thread takes its chunk, so the bits never depend on the team. */
#define PASS_CHUNK ((int64_t)1 << 16)
#define PASS_PARALLEL ((int64_t)1 << 18)

typedef struct pass_job {
    const float *src;
    float *dst;
    int64_t n;
    int op; /* 0 copy, 1 accumulate, 2 zero */
} pass_job;

static void pass_range(const pass_job *j, int64_t lo, int64_t hi)
{
    const float *restrict dy = j->src;
    float *restrict dx = j->dst;
    if (j->op == 1) {
        for (int64_t i = lo; i < hi; i++) dx[i] += dy[i];
    } else if (j->op == 0) {
        memcpy(dx + lo, dy + lo, (size_t)(hi - lo) * sizeof(float));
    } else {
        memset(dx + lo, 0, (size_t)(hi - lo) * sizeof(float));
    }
}

static void pass_item(void *arg, int64_t item, int worker)
{
    (void)worker;
    const pass_job *j = arg;
    const int64_t lo = item * PASS_CHUNK, hi = lo + PASS_CHUNK < j->n ? lo + PASS_CHUNK : j->n;
    pass_range(j, lo, hi);
}

static void pass_run(const float *src, float *dst, int64_t n, int op)
{
    if (n <= 0) return;
    pass_job j = {.src = src, .dst = dst, .n = n, .op = op};
    if (n < PASS_PARALLEL) pass_range(&j, 0, n);
    else pw_cpu_parallel((n + PASS_CHUNK - 1) / PASS_CHUNK, pass_item, &j);
}

void pw_cpu_copy_grad(const float *restrict dy, float *restrict dx, int64_t n,
                      int accumulate)
{
    if (n <= 0) return;
    if (n >= PASS_PARALLEL) {
        pass_run(dy, dx, n, accumulate ? 1 : 0);
    } else if (accumulate) {
        VEC_FOR(i, n, dx[i] += dy[i];);
    } else {
        memcpy(dx, dy, (size_t)n * sizeof(float));
    }
}

void pw_cpu_zero(void *dst, size_t bytes)
{
    if (bytes % sizeof(float) == 0 && (int64_t)(bytes / sizeof(float)) >= PASS_PARALLEL)
        pass_run(NULL, dst, (int64_t)(bytes / sizeof(float)), 2);
    else if (bytes)
        memset(dst, 0, bytes);
}

/* ---------------------------------------------------------------- softmax xent */

static int label_ok(int32_t label, int64_t C) { return label >= 0 && (int64_t)label < C; }

double pw_cpu_softmax_xent_fwd(const float *restrict logits, const int32_t *restrict labels,
                               float *restrict probs, int64_t n, int64_t C)
{
    if (C <= 0) return 0.0;
    double loss = 0.0;
    for (int64_t r = 0; r < n; r++) {
        const float *restrict lr = logits + r * C;
        float *restrict pr = probs + r * C;
        float m = lr[0];
        for (int64_t j = 1; j < C; j++) m = lr[j] > m ? lr[j] : m;
        /* exp(l − max) ≤ 1: no overflow at any logit size; the sum in
         * double keeps the normaliser exact to well below float rounding. */
        for (int64_t j = 0; j < C; j++) pr[j] = expf(lr[j] - m);
        double s = sum_d(pr, C);
        float inv = (float)(1.0 / s);
        VEC_FOR(j, C, pr[j] *= inv;);
        /* −log p[label] as logsumexp − logit[label]: stays accurate when
         * p[label] is tiny or rounds to 0 in float. */
        int32_t lab = labels[r];
        if (label_ok(lab, C)) loss += ((double)m + log(s)) - (double)lr[lab];
    }
    return loss;
}

void pw_cpu_softmax_xent_bwd(const float *restrict probs, const int32_t *restrict labels,
                             float *restrict dlogits, int64_t n, int64_t C, float scale,
                             int accumulate)
{
    if (C <= 0) return;
    for (int64_t r = 0; r < n; r++) {
        const float *restrict pr = probs + r * C;
        float *restrict dr = dlogits + r * C;
        int32_t lab = labels[r];
        int ok = label_ok(lab, C);
        /* Sweep with no one-hot, then redo the label's element from its
         * saved old value, so it is rounded once: old + (p − 1)·scale. */
        float old = (ok && accumulate) ? dr[lab] : 0.0f;
        if (accumulate) {
            VEC_FOR(j, C, dr[j] += pr[j] * scale;);
        } else {
            VEC_FOR(j, C, dr[j] = pr[j] * scale;);
        }
        if (ok) dr[lab] = old + (pr[lab] - 1.0f) * scale;
    }
}

/* ---------------------------------------------------------------- embedding */

void pw_cpu_embedding_fwd(const int32_t *restrict tokens, const float *restrict w,
                          float *restrict y, int64_t n, int64_t vocab, int64_t d)
{
    for (int64_t r = 0; r < n; r++) {
        int32_t t = tokens[r];
        if (t >= 0 && (int64_t)t < vocab)
            memcpy(y + r * d, w + (int64_t)t * d, (size_t)d * sizeof(float));
        else
            memset(y + r * d, 0, (size_t)d * sizeof(float));
    }
}

void pw_cpu_embedding_bwd_weight(const int32_t *restrict tokens, const float *restrict dy,
                                 float *restrict dw, int64_t n, int64_t vocab, int64_t d)
{
    /* Row by row, in order: a token that occurs twice sums its rows in
     * position order, and micro-batch splits give the same bits. */
    for (int64_t r = 0; r < n; r++) {
        int32_t t = tokens[r];
        if (t < 0 || (int64_t)t >= vocab) continue;
        float *restrict row = dw + (int64_t)t * d;
        const float *restrict g = dy + r * d;
        VEC_FOR(j, d, row[j] += g[j];);
    }
}

void pw_cpu_pos_embedding_fwd(const float *restrict x, const float *restrict w,
                              float *restrict y, int64_t batch, int64_t T, int64_t d)
{
    const int64_t n = T * d;
    for (int64_t b = 0; b < batch; b++) {
        const float *restrict xb = x + b * n;
        float *restrict yb = y + b * n;
        VEC_FOR(i, n, yb[i] = xb[i] + w[i];);
    }
}

void pw_cpu_pos_embedding_bwd_weight(const float *restrict dy, float *restrict dw,
                                     int64_t batch, int64_t T, int64_t d)
{
    const int64_t n = T * d;
    for (int64_t b = 0; b < batch; b++) {
        const float *restrict g = dy + b * n;
        VEC_FOR(i, n, dw[i] += g[i];);
    }
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
 * a sequence's bits do not depend on the micro-batching. */
#define ATT_BLOCK PW_CPU_ATTENTION_BLOCK
_Static_assert(PW_CPU_ATTENTION_BLOCK == PW_ATTENTION_BLOCK,
               "graph/ops.c's attention cost counts blocks of PW_ATTENTION_BLOCK rows");

typedef struct att_job {
    const float *qkv, *att, *dout;
    float *out, *attw, *dqkv, *scratch;
    int64_t batch, T, D, H;
    float beta;
} att_job;

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
    for (int64_t r0 = 0; r0 < T; r0 += ATT_BLOCK) {
        const int64_t rn = T - r0 < ATT_BLOCK ? T - r0 : ATT_BLOCK, cols = r0 + rn;
        float *ab = a + r0 * T;
        pw_cpu_gemm_1t(0, 1, rn, cols, hd, scale, q + r0 * ld, ld, k, ld, 0.0f, ab, T);
        for (int64_t t = r0; t < r0 + rn; t++) {
            float *restrict row = a + t * T;
            const int64_t len = t + 1;
            float m = row[0];
            for (int64_t s = 1; s < len; s++) m = row[s] > m ? row[s] : m;
            VF_FOR(s, w, len, vec_store(row + s, vec_exp(vec_load(row + s, w) - m), w););
            const float inv = (float)(1.0 / sum_d(row, len));
            VEC_FOR(s, len, row[s] *= inv;);
            if (len < T) memset(row + len, 0, (size_t)(T - len) * sizeof(float));
        }
        pw_cpu_gemm_1t(0, 0, rn, hd, cols, 1.0f, ab, T, v, ld, 0.0f,
                       j->out + (b * T + r0) * D + h * hd, D);
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
static void attention_bwd_item(void *arg, int64_t h, int worker)
{
    (void)worker;
    const att_job *j = arg;
    const int64_t T = j->T, D = j->D, H = j->H;
    const int64_t hd = D / H, ld = 3 * D;
    const float scale = (float)(1.0 / sqrt((double)hd));
    const float beta = j->beta;
    float *ds = j->scratch + h * T * T;
    for (int64_t b = 0; b < j->batch; b++) {
        const float *q = j->qkv + b * T * ld + h * hd, *k = q + D, *v = q + 2 * D;
        const float *dO = j->dout + b * T * D + h * hd;
        float *dq = j->dqkv + b * T * ld + h * hd, *dk = dq + D, *dv = dq + 2 * D;
        const float *a = j->att + (b * H + h) * T * T;
        for (int64_t r0 = 0; r0 < T; r0 += ATT_BLOCK) {
            const int64_t rn = T - r0 < ATT_BLOCK ? T - r0 : ATT_BLOCK, cols = r0 + rn;
            pw_cpu_gemm_1t(0, 1, rn, cols, hd, 1.0f, dO + r0 * D, D, v, ld, 0.0f, ds + r0 * T, T);
            for (int64_t t = r0; t < r0 + rn; t++) {
                const float *restrict pr = a + t * T;
                float *restrict dr = ds + t * T;
                const int64_t len = t + 1;
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

void pw_cpu_dropout_fwd(const float *restrict x, float *restrict y, uint8_t *restrict mask,
                        int64_t batch, int64_t numel, float p, uint64_t key,
                        int64_t first_sample)
{
    const float scale = 1.0f / (1.0f - p);
    for (int64_t b = 0; b < batch; b++) {
        const uint64_t base = (uint64_t)(first_sample + b) * (uint64_t)numel;
        const float *restrict xb = x + b * numel;
        float *restrict yb = y + b * numel;
        uint8_t *restrict mb = mask + b * numel;
        for (int64_t j = 0; j < numel; j++) {
            int keep = pw_rng_uniform(key, base + (uint64_t)j) >= p;
            mb[j] = (uint8_t)keep;
            yb[j] = keep ? xb[j] * scale : 0.0f;
        }
    }
}

void pw_cpu_dropout_bwd_input(const uint8_t *restrict mask, const float *restrict dy,
                              float *restrict dx, int64_t n, float p, int accumulate)
{
    const float scale = 1.0f / (1.0f - p);
    if (accumulate) {
        VEC_FOR(i, n, float g = dy[i] * scale; dx[i] += mask[i] ? g : 0.0f;);
    } else {
        VEC_FOR(i, n, float g = dy[i] * scale; dx[i] = mask[i] ? g : 0.0f;);
    }
}
