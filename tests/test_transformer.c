/* Tests for the transformer pieces: the ops (embedding, pos_embedding,
 * causal_attention, dropout, the vectorised exp/gelu) against finite
 * differences and direct formulas, causal masking, dropout determinism and
 * partition independence, activation recomputation (bit-identical to none,
 * also across stages and with a split W), tied embeddings, byte-level text
 * data, a small GPT that learns, and the learning-rate schedule (warm-up and
 * cosine/linear decay) keeping the pipeline bit-identical to one stage.
 *
 * Every test carries the same .timeout: Criterion leaks under LeakSanitizer
 * when a file mixes timeouts.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <criterion/parameterized.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "graph/graph.h"
#include "runtime/rng.h"
#include "stages/ops/cpu/attention_avx512.h"
#include "stages/ops/cpu/ops.h"
#include "stages/train/data.h"
#include "stages/ops/optim.h"
#include "stages/train/pipeline.h"
#include "stages/program/program.h"

#define TIMEOUT 120

/* ---------------------------------------------------------------- helpers */

static uint64_t rng_next(uint64_t *s) /* splitmix64 */
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float *rand_f(int64_t n, float lo, float hi, uint64_t seed)
{
    float *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    cr_assert_not_null(p);
    for (int64_t i = 0; i < n; i++)
        p[i] = lo + (hi - lo) * (float)((double)(rng_next(&seed) >> 40) / 16777216.0);
    return p;
}

static float *zeros_f(int64_t n)
{
    float *p = calloc((size_t)(n > 0 ? n : 1), sizeof(float));
    cr_assert_not_null(p);
    return p;
}

static double dot_d(const float *a, const float *b, int64_t n)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}

static int same_bits(const char *what, const void *a, const void *b, size_t bytes)
{
    if (memcmp(a, b, bytes) == 0) return 1;
    const float *fa = a, *fb = b;
    int shown = 0;
    for (size_t i = 0; i < bytes / 4 && shown < 5; i++)
        if (memcmp(&fa[i], &fb[i], 4) != 0) {
            fprintf(stderr, "%s[%zu]: %.9g vs %.9g\n", what, i, (double)fa[i], (double)fb[i]);
            shown++;
        }
    return 0;
}

/* ---------------------------------------------------------------- finite differences */

typedef double (*objective_fn)(void *ctx);

/* Central differences in double of f with respect to param[0..count),
 * compared with the analytic gradient `ana`: |num − ana| ≤ tol·max(|ana|,
 * 0.1·max|ana|, floor). Prints the first misses and the worst error. */
static int grad_matches(const char *what, float step, float *param, int64_t count,
                        const float *ana, objective_fn f, void *ctx, double tol, double floor_abs)
{
    double amax = 0.0, worst = 0.0;
    for (int64_t i = 0; i < count; i++) amax = fmax(amax, fabs((double)ana[i]));
    double fl = fmax(floor_abs, 0.1 * amax);
    int misses = 0;
    for (int64_t i = 0; i < count; i++) {
        float v = param[i];
        float e = step * fmaxf(1.0f, fabsf(v));
        float vp = v + e, vm = v - e;
        param[i] = vp;
        double lp = f(ctx);
        param[i] = vm;
        double lm = f(ctx);
        param[i] = v;
        double num = (lp - lm) / ((double)vp - (double)vm);
        double err = fabs(num - (double)ana[i]) / fmax(fabs((double)ana[i]), fl);
        if (!(err <= tol)) {
            if (misses < 5)
                fprintf(stderr, "%s[%lld]: analytic %.9g numeric %.9g (err %.3g)\n", what,
                        (long long)i, (double)ana[i], num, err);
            misses++;
        }
        if (err > worst || isnan(err)) worst = isnan(err) ? INFINITY : err;
    }
    cr_log_info("%s: max gradient error %.3g over %lld elements", what, worst, (long long)count);
    if (misses) fprintf(stderr, "%s: %d of %lld differ, max err %.3g\n", what, misses,
                        (long long)count, worst);
    return misses == 0;
}

#define FD_STEP 1e-2f
#define FD_TOL 2e-2

/* ---------------------------------------------------------------- exp and gelu */

Test(kernels, exp_and_gelu_accuracy, .timeout = TIMEOUT)
{
    const int64_t n = 400001;
    float *x = malloc((size_t)n * 4), *y = malloc((size_t)n * 4), *y2 = malloc((size_t)n * 4);
    cr_assert(x && y && y2);
    double worst = 0.0;
    for (int64_t i = 0; i < n; i++) x[i] = -87.0f + 175.0f * (float)i / (float)(n - 1);
    pw_cpu_exp(x, y, n);
    for (int64_t i = 0; i < n; i++) {
        double w = exp((double)x[i]);
        worst = fmax(worst, fabs((double)y[i] - w) / w);
    }
    cr_log_info("exp: max relative error %.3g", worst);
    cr_expect_leq(worst, 3e-7, "exp relative error %.3g", worst);

    worst = 0.0;
    for (int64_t i = 0; i < n; i++) x[i] = -12.0f + 24.0f * (float)i / (float)(n - 1);
    pw_cpu_gelu_fwd(x, y, n);
    for (int64_t i = 0; i < n; i++) {
        double v = x[i];
        double w = 0.5 * v * (1.0 + tanh(sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
        worst = fmax(worst, fabs((double)y[i] - w) / fmax(1.0, fabs(v)));
    }
    cr_log_info("gelu: max error %.3g (absolute, relative beyond |x| = 1)", worst);
    cr_expect_leq(worst, 1e-6, "gelu error %.3g", worst);

    /* an element's bits do not depend on where it falls (vector body or tail) */
    pw_cpu_gelu_fwd(x + 3, y2, 13);
    cr_expect(same_bits("gelu tail", y2, y + 3, 13 * 4));
    float *dy = rand_f(n, -1, 1, 5), *dx = malloc((size_t)n * 4), *dx2 = malloc((size_t)n * 4);
    pw_cpu_gelu_bwd_input(x, dy, dx, n, 0);
    pw_cpu_gelu_bwd_input(x + 5, dy + 5, dx2, 7, 0);
    cr_expect(same_bits("gelu grad tail", dx2, dx + 5, 7 * 4));

    /* special values */
    float sp[4] = {NAN, -1000.0f, 1000.0f, 0.0f}, o[4];
    pw_cpu_exp(sp, o, 4);
    cr_expect(isnan(o[0]) && o[1] >= 0.0f && o[1] < 1e-37f && isfinite(o[2]) && o[3] == 1.0f,
              "exp(nan, -1000, 1000, 0) = %g %g %g %g", o[0], o[1], o[2], o[3]);
    pw_cpu_gelu_fwd(sp, o, 4);
    cr_expect(isnan(o[0]) && fabsf(o[1]) < 1e-30f && o[2] == 1000.0f && o[3] == 0.0f,
              "gelu(nan, -1000, 1000, 0) = %g %g %g %g", o[0], o[1], o[2], o[3]);
    free(x), free(y), free(y2), free(dy), free(dx), free(dx2);
}

/* ---------------------------------------------------------------- embedding */

struct emb_ctx {
    const int32_t *tok;
    float *w, *y;
    const float *r;
    int64_t n, V, d;
};

static double emb_obj(void *p)
{
    struct emb_ctx *c = p;
    pw_cpu_embedding_fwd(c->tok, c->w, c->y, c->n, c->V, c->d);
    return dot_d(c->r, c->y, c->n * c->d);
}

Test(grad, embedding, .timeout = TIMEOUT)
{
    /* token 2 appears twice (its rows sum), 7 is out of range (zeros, no gradient) */
    const int32_t tok[6] = {2, 0, 4, 2, 7, 1};
    const int64_t n = 6, V = 5, d = 3;
    float *w = rand_f(V * d, -1, 1, 1), *r = rand_f(n * d, -1, 1, 2), *y = zeros_f(n * d);
    float *dw = zeros_f(V * d);
    pw_cpu_embedding_fwd(tok, w, y, n, V, d);
    for (int64_t j = 0; j < d; j++) {
        cr_expect_eq(y[0 * d + j], w[2 * d + j]);
        cr_expect_eq(y[4 * d + j], 0.0f, "an out-of-range token gives a zero row");
    }
    pw_cpu_embedding_bwd_weight(tok, r, dw, n, V, d);
    struct emb_ctx c = {tok, w, y, r, n, V, d};
    cr_expect(grad_matches("embedding dw", FD_STEP, w, V * d, dw, emb_obj, &c, FD_TOL, 1e-3));
    for (int64_t j = 0; j < d; j++) cr_expect_eq(dw[3 * d + j], 0.0f, "unused token row");
    free(w), free(r), free(y), free(dw);
}

struct pos_ctx {
    float *x, *w, *y;
    const float *r;
    int64_t b, T, d;
};

static double pos_obj(void *p)
{
    struct pos_ctx *c = p;
    pw_cpu_pos_embedding_fwd(c->x, c->w, c->y, c->b, c->T, c->d);
    return dot_d(c->r, c->y, c->b * c->T * c->d);
}

Test(grad, pos_embedding, .timeout = TIMEOUT)
{
    const int64_t b = 3, T = 4, d = 5, max = 6;
    float *x = rand_f(b * T * d, -1, 1, 3), *w = rand_f(max * d, -1, 1, 4);
    float *r = rand_f(b * T * d, -1, 1, 5), *y = zeros_f(b * T * d), *dx = zeros_f(b * T * d);
    float *dw = zeros_f(max * d);
    pw_cpu_pos_embedding_bwd_weight(r, dw, b, T, d);
    pw_cpu_copy_grad(r, dx, b * T * d, 0);
    struct pos_ctx c = {x, w, y, r, b, T, d};
    cr_expect(grad_matches("pos_embedding dx", FD_STEP, x, b * T * d, dx, pos_obj, &c, FD_TOL, 1e-3));
    cr_expect(grad_matches("pos_embedding dw", FD_STEP, w, max * d, dw, pos_obj, &c, FD_TOL, 1e-3));
    for (int64_t j = T * d; j < max * d; j++) cr_expect_eq(dw[j], 0.0f, "rows beyond T");
    /* micro-batch splits are exact */
    float *dw2 = zeros_f(max * d);
    pw_cpu_pos_embedding_bwd_weight(r, dw2, 1, T, d);
    pw_cpu_pos_embedding_bwd_weight(r + T * d, dw2, 2, T, d);
    cr_expect(same_bits("pos dw 3 vs 1+2", dw2, dw, (size_t)(max * d) * 4));
    free(x), free(w), free(r), free(y), free(dx), free(dw), free(dw2);
}

/* ---------------------------------------------------------------- attention */

struct att_shape {
    int64_t T, H;
};

struct att_ctx {
    float *qkv, *out, *att;
    const float *r;
    int64_t b, T, D, H;
};

static double att_obj(void *p)
{
    struct att_ctx *c = p;
    pw_cpu_attention_fwd(c->qkv, c->out, c->att, c->b, c->T, c->D, c->H);
    return dot_d(c->r, c->out, c->b * c->T * c->D);
}

/* out in double straight from the definition. */
static void attention_ref(const float *qkv, double *out, int64_t b, int64_t T, int64_t D,
                          int64_t H)
{
    int64_t hd = D / H;
    double *w = malloc((size_t)T * sizeof(double));
    cr_assert_not_null(w);
    for (int64_t s0 = 0; s0 < b; s0++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++) {
                const float *q = qkv + (s0 * T + t) * 3 * D + h * hd;
                double m = -INFINITY, z = 0.0;
                for (int64_t s = 0; s <= t; s++) {
                    const float *k = qkv + (s0 * T + s) * 3 * D + D + h * hd;
                    double a = 0.0;
                    for (int64_t j = 0; j < hd; j++) a += (double)q[j] * (double)k[j];
                    w[s] = a / sqrt((double)hd);
                    m = fmax(m, w[s]);
                }
                for (int64_t s = 0; s <= t; s++) z += (w[s] = exp(w[s] - m));
                for (int64_t j = 0; j < hd; j++) {
                    double o = 0.0;
                    for (int64_t s = 0; s <= t; s++)
                        o += w[s] / z * (double)qkv[(s0 * T + s) * 3 * D + 2 * D + h * hd + j];
                    out[(s0 * T + t) * D + h * hd + j] = o;
                }
            }
    free(w);
}

ParameterizedTestParameters(grad, attention)
{
    /* T > PW_CPU_ATTENTION_BLOCK (32) exercises the kernels' row and key
     * blocks, including a last block that is not full (37, 70). */
    static struct att_shape s[] = {{1, 1}, {1, 4}, {3, 1}, {3, 2}, {3, 4},
                                   {8, 1}, {8, 2}, {8, 4}, {5, 2},
                                   {32, 2}, {37, 2}, {64, 1}, {70, 4}};
    return cr_make_param_array(struct att_shape, s, sizeof s / sizeof s[0]);
}

/* Forward against the definition in double, zeros above the diagonal,
 * rows summing to 1, dqkv against finite differences, accumulate. */
static void check_attention(int64_t b, int64_t T, int64_t D, int64_t H)
{
    const int64_t nq = b * T * 3 * D, no = b * T * D;
    float *qkv = rand_f(nq, -1.5f, 1.5f, 10 + (uint64_t)(T * 7 + H));
    float *r = rand_f(no, -1, 1, 20), *out = zeros_f(no), *att = zeros_f(b * H * T * T);
    float *dqkv = zeros_f(nq), *work = zeros_f(H * T * T);
    double *ref = malloc((size_t)no * sizeof(double));
    cr_assert_not_null(ref);

    pw_cpu_attention_fwd(qkv, out, att, b, T, D, H);
    attention_ref(qkv, ref, b, T, D, H);
    double worst = 0.0;
    for (int64_t i = 0; i < no; i++) worst = fmax(worst, fabs((double)out[i] - ref[i]));
    cr_expect_leq(worst, 1e-5, "attention forward (T=%lld H=%lld): max error %.3g", (long long)T,
                  (long long)H, worst);
    for (int64_t s0 = 0; s0 < b * H; s0++)
        for (int64_t t = 0; t < T; t++) {
            double rs = 0.0;
            for (int64_t s = 0; s < T; s++) {
                float a = att[(s0 * T + t) * T + s];
                if (s > t) cr_expect_eq(a, 0.0f, "probability above the diagonal");
                rs += a;
            }
            cr_expect(fabs(rs - 1.0) < 1e-5, "row %lld sums to %.9g", (long long)t, rs);
        }

    pw_cpu_attention_bwd_input(qkv, att, r, dqkv, work, b, T, D, H, 0);
    struct att_ctx c = {qkv, out, att, r, b, T, D, H};
    char what[64];
    snprintf(what, sizeof what, "attention dqkv (T=%lld H=%lld)", (long long)T, (long long)H);
    cr_expect(grad_matches(what, FD_STEP, qkv, nq, dqkv, att_obj, &c, FD_TOL, 1e-3));

    /* accumulate = 1 adds onto what is there */
    float *acc = rand_f(nq, -1, 1, 30), *base = malloc((size_t)nq * 4);
    memcpy(base, acc, (size_t)nq * 4);
    pw_cpu_attention_fwd(qkv, out, att, b, T, D, H);
    pw_cpu_attention_bwd_input(qkv, att, r, acc, work, b, T, D, H, 1);
    for (int64_t i = 0; i < nq; i++)
        cr_expect(fabs((double)acc[i] - ((double)base[i] + dqkv[i])) <=
                      1e-6 * (fabs(base[i]) + fabs(dqkv[i])) + 1e-7,
                  "accumulate [%lld]", (long long)i);
    free(qkv), free(r), free(out), free(att), free(dqkv), free(work), free(ref), free(acc),
        free(base);
}

ParameterizedTest(struct att_shape *sh, grad, attention, .timeout = TIMEOUT)
{
    check_attention(2, sh->T, 8, sh->H);
}

/* Head sizes that are multiples of 16 take the AVX-512 kernels
 * (attention_avx512.h) where the CPU has them: every column chunk (16, 32,
 * 64 wide and their sums), row tiles cut short by T, key tiles of 32 with a
 * partial last one. */
struct att_wide {
    int64_t b, T, D, H;
};

ParameterizedTestParameters(grad, attention_wide)
{
    static struct att_wide s[] = {{2, 5, 16, 1},  {2, 37, 32, 2}, {1, 40, 32, 1}, {1, 33, 48, 1},
                                  {1, 21, 64, 1}, {1, 18, 128, 1}, {1, 70, 32, 2}, {2, 16, 112, 1}};
    return cr_make_param_array(struct att_wide, s, sizeof s / sizeof s[0]);
}

ParameterizedTest(struct att_wide *sh, grad, attention_wide, .timeout = TIMEOUT)
{
    cr_log_info("hd %lld: %s kernels", (long long)(sh->D / sh->H),
                pw_cpu_att_fast_usable(sh->D / sh->H) ? "AVX-512" : "blocked BLAS");
    check_attention(sh->b, sh->T, sh->D, sh->H);
}

/* Both attention paths (the AVX-512 kernels and the blocked BLAS, chosen
 * by the CPU and hd) agree to rounding; each gives the same bits at 1, 2
 * and 3 threads. */
Test(attention, paths_agree_and_threads_do_not_matter, .timeout = TIMEOUT)
{
    const int64_t b = 3, T = 45, D = 64, H = 2, nq = b * T * 3 * D, no = b * T * D;
    const int64_t na = b * H * T * T;
    float *qkv = rand_f(nq, -2, 2, 51), *dout = rand_f(no, -1, 1, 52);
    float *out[2], *att[2], *dqkv[2], *work = zeros_f(H * T * T);
    float *o2 = zeros_f(no), *a2 = zeros_f(na), *d2 = zeros_f(nq);
    const int threads0 = pw_cpu_get_threads();
    for (int blas = 0; blas < 2; blas++) {
        pw_cpu_attention_use_blas(blas);
        out[blas] = zeros_f(no), att[blas] = zeros_f(na), dqkv[blas] = zeros_f(nq);
        pw_cpu_set_threads(1);
        pw_cpu_attention_fwd(qkv, out[blas], att[blas], b, T, D, H);
        pw_cpu_attention_bwd_input(qkv, att[blas], dout, dqkv[blas], work, b, T, D, H, 0);
        for (int th = 2; th <= 3; th++) {
            pw_cpu_set_threads(th);
            pw_cpu_attention_fwd(qkv, o2, a2, b, T, D, H);
            pw_cpu_attention_bwd_input(qkv, a2, dout, d2, work, b, T, D, H, 0);
            cr_expect(same_bits("attention out, 1 thread vs more", out[blas], o2, (size_t)no * 4));
            cr_expect(same_bits("attention att, 1 thread vs more", att[blas], a2, (size_t)na * 4));
            cr_expect(same_bits("attention dqkv, 1 thread vs more", dqkv[blas], d2, (size_t)nq * 4));
        }
    }
    pw_cpu_attention_use_blas(0);
    pw_cpu_set_threads(threads0);
    double worst = 0.0, scale = 0.0;
    for (int64_t i = 0; i < no; i++) worst = fmax(worst, fabs((double)out[0][i] - out[1][i]));
    cr_expect_leq(worst, 1e-5, "attention out: paths differ by %.3g", worst);
    worst = 0.0;
    for (int64_t i = 0; i < nq; i++) {
        worst = fmax(worst, fabs((double)dqkv[0][i] - dqkv[1][i]));
        scale = fmax(scale, fabs((double)dqkv[1][i]));
    }
    cr_expect_leq(worst, 1e-5 * scale, "attention dqkv: paths differ by %.3g (max |dqkv| %.3g)",
                  worst, scale);
    for (int k = 0; k < 2; k++) free(out[k]), free(att[k]), free(dqkv[k]);
    free(qkv), free(dout), free(work), free(o2), free(a2), free(d2);
}

/* The blocked kernels compute each sequence on its own: a batch of three
 * gives, bit for bit, what each sequence gives alone (so micro-batch splits
 * stay exact), forward and backward, with T spanning several blocks. */
static void check_batch_independence(int64_t T, int64_t D, int64_t H)
{
    const int64_t b = 3, nq = T * 3 * D, no = T * D;
    float *qkv = rand_f(b * nq, -2, 2, 41), *dout = rand_f(b * no, -1, 1, 42);
    float *out = zeros_f(b * no), *att = zeros_f(b * H * T * T), *dqkv = zeros_f(b * nq);
    float *out1 = zeros_f(no), *att1 = zeros_f(H * T * T), *dqkv1 = zeros_f(nq);
    float *work = zeros_f(H * T * T);
    pw_cpu_attention_fwd(qkv, out, att, b, T, D, H);
    pw_cpu_attention_bwd_input(qkv, att, dout, dqkv, work, b, T, D, H, 0);
    for (int64_t i = 0; i < b; i++) {
        pw_cpu_attention_fwd(qkv + i * nq, out1, att1, 1, T, D, H);
        pw_cpu_attention_bwd_input(qkv + i * nq, att1, dout + i * no, dqkv1, work, 1, T, D, H, 0);
        cr_expect(same_bits("attention out, alone vs in a batch", out1, out + i * no,
                            (size_t)no * 4));
        cr_expect(same_bits("attention dqkv, alone vs in a batch", dqkv1, dqkv + i * nq,
                            (size_t)nq * 4));
    }
    free(qkv), free(dout), free(out), free(att), free(dqkv), free(out1), free(att1), free(dqkv1),
        free(work);
}

Test(attention, sequences_independent_of_batch, .timeout = TIMEOUT)
{
    check_batch_independence(70, 16, 2); /* hd 8: the blocked BLAS path */
    check_batch_independence(70, 64, 2); /* hd 32: the AVX-512 kernels where usable */
}

/* Changing the query, key or value of a later position leaves every earlier
 * output bit for bit unchanged. */
Test(attention, causal_masking, .timeout = TIMEOUT)
{
    const int64_t T = 9, D = 12, H = 3, t0 = 4;
    float *qkv = rand_f(T * 3 * D, -2, 2, 40), *out1 = zeros_f(T * D), *out2 = zeros_f(T * D);
    float *att = zeros_f(H * T * T);
    pw_cpu_attention_fwd(qkv, out1, att, 1, T, D, H);
    for (int64_t i = t0 * 3 * D; i < T * 3 * D; i++) qkv[i] = qkv[i] * -3.0f + 1e3f;
    pw_cpu_attention_fwd(qkv, out2, att, 1, T, D, H);
    cr_expect(same_bits("outputs before t0", out1, out2, (size_t)(t0 * D) * 4));
    cr_expect(memcmp(out1 + t0 * D, out2 + t0 * D, 4) != 0, "later outputs should change");
    free(qkv), free(out1), free(out2), free(att);
}

/* ---------------------------------------------------------------- dropout */

struct drop_ctx {
    float *x, *y;
    uint8_t *mask;
    const float *r;
    int64_t b, numel;
    float p;
    uint64_t key;
};

static double drop_obj(void *pv)
{
    struct drop_ctx *c = pv;
    pw_cpu_dropout_fwd(c->x, c->y, c->mask, c->b, c->numel, c->p, c->key, 0);
    return dot_d(c->r, c->y, c->b * c->numel);
}

Test(grad, dropout, .timeout = TIMEOUT)
{
    const int64_t b = 3, numel = 50;
    float *x = rand_f(b * numel, -1, 1, 50), *r = rand_f(b * numel, -1, 1, 51);
    float *y = zeros_f(b * numel), *dx = zeros_f(b * numel);
    uint8_t *mask = calloc((size_t)(b * numel), 1);
    const float p = 0.3f;
    uint64_t key = pw_rng_u64(pw_rng_key(7, "dropout:test"), 3);
    pw_cpu_dropout_fwd(x, y, mask, b, numel, p, key, 0);
    int kept = 0;
    for (int64_t i = 0; i < b * numel; i++) {
        kept += mask[i];
        cr_expect(y[i] == (mask[i] ? x[i] * (1.0f / (1.0f - p)) : 0.0f), "y[%lld]", (long long)i);
    }
    cr_expect(kept > 80 && kept < 130, "kept %d of 150 at p = 0.3", kept);
    pw_cpu_dropout_bwd_input(mask, r, dx, b * numel, p, 0);
    struct drop_ctx c = {x, y, mask, r, b, numel, p, key};
    cr_expect(grad_matches("dropout dx", FD_STEP, x, b * numel, dx, drop_obj, &c, FD_TOL, 1e-3));
    /* p = 0 is the identity, bit for bit */
    pw_cpu_dropout_fwd(x, y, mask, b, numel, 0.0f, key, 0);
    cr_expect(same_bits("dropout p=0", y, x, (size_t)(b * numel) * 4));
    free(x), free(r), free(y), free(dx), free(mask);
}

/* A sample's mask depends on its global index only: one call over 8 samples,
 * two of 4 and eight of 1 draw the same masks. */
Test(dropout, mask_independent_of_micro_batch_size, .timeout = TIMEOUT)
{
    const int64_t numel = 37, n = 8;
    float *x = rand_f(n * numel, -1, 1, 60), *y = zeros_f(n * numel), *y2 = zeros_f(n * numel);
    uint8_t *m1 = calloc((size_t)(n * numel), 1), *m2 = calloc((size_t)(n * numel), 1);
    uint64_t key = 0x1234;
    pw_cpu_dropout_fwd(x, y, m1, n, numel, 0.25f, key, 100);
    for (int64_t h = 0; h < 2; h++)
        pw_cpu_dropout_fwd(x + h * 4 * numel, y2 + h * 4 * numel, m2 + h * 4 * numel, 4, numel,
                           0.25f, key, 100 + h * 4);
    cr_expect(memcmp(m1, m2, (size_t)(n * numel)) == 0);
    cr_expect(same_bits("y 8 vs 4+4", y, y2, (size_t)(n * numel) * 4));
    for (int64_t i = 0; i < n; i++)
        pw_cpu_dropout_fwd(x + i * numel, y2 + i * numel, m2 + i * numel, 1, numel, 0.25f, key,
                           100 + i);
    cr_expect(memcmp(m1, m2, (size_t)(n * numel)) == 0);
    /* a different global index gives a different mask */
    pw_cpu_dropout_fwd(x, y2, m2, 1, numel, 0.25f, key, 101);
    cr_expect(memcmp(m1, m2, (size_t)numel) != 0);
    free(x), free(y), free(y2), free(m1), free(m2);
}

/* ---------------------------------------------------------------- graphs */

static pw_graph *parse(const char *text)
{
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_string(text, strlen(text), "t.graph", &g), PW_OK, "%s",
                 pw_last_error());
    return g;
}

/* A small GPT: V tokens, context T, width D, H heads, B blocks, dropout p;
 * `tied` ties the head to wte. */
static pw_graph *small_gpt(int T, int D, int H, int B, int V, double p, int tied)
{
    char text[4096];
    snprintf(text, sizeof text,
             "graph small_gpt\n"
             "input tokens : i32[%d]\n"
             "label next : i32[%d]\n"
             "tok = embedding(tokens, vocab=%d, dim=%d) as wte\n"
             "pos = pos_embedding(tok, max=%d) as wpe\n"
             "x0  = dropout(pos, p=%g)\n"
             "h = repeat %d as h (x = x0) {\n"
             "  a   = layernorm(x) as ln_1\n"
             "  qkv = linear(a, out=%d) as attn.c_attn\n"
             "  att = causal_attention(qkv, heads=%d)\n"
             "  o   = linear(att, out=%d) as attn.c_proj\n"
             "  od  = dropout(o, p=%g)\n"
             "  x1  = add(x, od)\n"
             "  m   = layernorm(x1) as ln_2\n"
             "  fc  = linear(m, out=%d) as mlp.c_fc\n"
             "  g   = gelu(fc)\n"
             "  pr  = linear(g, out=%d) as mlp.c_proj\n"
             "  pd  = dropout(pr, p=%g)\n"
             "  x2  = add(x1, pd)\n"
             "  return x2\n"
             "}\n"
             "hf = layernorm(h) as ln_f\n"
             "logits = linear(hf, out=%d, bias=false%s) as lm_head\n"
             "loss = softmax_cross_entropy(logits, next)\n",
             T, T, V, D, T, p, B, 3 * D, H, D, p, 4 * D, D, p, V,
             tied ? ", weight=wte.weight" : "");
    return parse(text);
}

/* Deterministic English-like text: sentences drawn from a small list. */
static char *make_corpus(size_t bytes)
{
    static const char *const sent[] = {
        "the quick brown fox jumps over the lazy dog. ",
        "a stitch in time saves nine. ",
        "all that glitters is not gold. ",
        "the early bird catches the worm. ",
        "practice makes perfect, and perfect practice makes more. ",
        "to be or not to be, that is the question. ",
    };
    char *buf = malloc(bytes + 128);
    cr_assert_not_null(buf);
    uint64_t s = 99;
    size_t at = 0;
    while (at < bytes) {
        const char *w = sent[rng_next(&s) % 6];
        size_t l = strlen(w);
        memcpy(buf + at, w, l);
        at += l;
    }
    buf[bytes] = '\0';
    return buf;
}

static char tmpdir[64];

static void make_tmpdir(void)
{
    strcpy(tmpdir, "/tmp/pw_test_transformer_XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
}

static void remove_tmpdir(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    cr_assert_eq(system(cmd), 0);
}

static void write_file(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "%s", path);
    cr_assert_eq(fwrite(data, 1, n, f), n);
    fclose(f);
}

static pw_dataset *corpus_dataset(int64_t T, int train, size_t bytes)
{
    char path[128];
    snprintf(path, sizeof path, "%s/corpus.txt", tmpdir);
    struct stat sb;
    if (stat(path, &sb) != 0) {
        char *c = make_corpus(bytes);
        write_file(path, c, bytes);
        free(c);
    }
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_load_text(path, T, train, &d), PW_OK, "%s", pw_last_error());
    return d;
}

TestSuite(data, .init = make_tmpdir, .fini = remove_tmpdir, .timeout = TIMEOUT);
TestSuite(program, .init = make_tmpdir, .fini = remove_tmpdir, .timeout = TIMEOUT);
TestSuite(gpt, .init = make_tmpdir, .fini = remove_tmpdir, .timeout = TIMEOUT);

Test(graph, tiny_gpt_parses, .timeout = TIMEOUT)
{
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_file(PW_SOURCE_DIR "/examples/tiny_gpt.graph", &g), PW_OK, "%s",
                 pw_last_error());
    cr_expect_str_eq(g->name, "tiny_gpt");
    int64_t n = 0;
    for (int i = 0; i < g->n_params; i++) n += pw_shape_numel(&g->params[i].shape);
    /* wte 256·256, wpe 128·256, 6 × (2 layernorms, c_attn, c_proj, c_fc, mlp.c_proj), ln_f */
    int64_t block = 2 * 512 + (768 * 256 + 768) + (256 * 256 + 256) + (1024 * 256 + 1024) +
                    (256 * 1024 + 256);
    cr_expect_eq(n, 256 * 256 + 128 * 256 + 6 * block + 512, "%lld parameters", (long long)n);
    int wte = pw_graph_find_param(g, "wte.weight");
    cr_assert_geq(wte, 0);
    cr_expect_eq(g->params[wte].n_uses, 2, "wte.weight is used by the embedding and the head");
    cr_expect_eq(g->params[wte].shape.d[0], 256);
    cr_expect_eq(g->params[wte].shape.d[1], 256);
    cr_expect_eq(pw_graph_find_param(g, "lm_head.weight"), -1);
    cr_expect_geq(pw_graph_find_param(g, "h.5.attn.c_attn.weight"), 0);
    cr_expect_geq(pw_graph_find_param(g, "h.0.mlp.c_proj.bias"), 0);
    cr_expect_geq(pw_graph_find_param(g, "wpe.weight"), 0);
    int users[4];
    cr_expect_eq(pw_graph_param_users(g, wte, users, 4), 2);
    cr_expect_eq(users[0], 0);
    cr_expect_eq(g->nodes[users[1]].op, PW_OP_LINEAR);
    cr_expect_eq(users[1], g->n_nodes - 2);
    cr_expect_eq(pw_graph_param_users(g, -1, NULL, 0), -1);
    cr_expect_eq(pw_graph_param_users(g, wte, NULL, 0), 2);
    int att = -1;
    for (int i = 0; i < g->n_nodes; i++)
        if (g->nodes[i].op == PW_OP_CAUSAL_ATTENTION) att = i;
    cr_assert_geq(att, 0);
    pw_op_cost c;
    cr_assert_eq(pw_graph_node_cost(g, att, &c), PW_OK);
    cr_expect_eq(c.param_bytes, 0);
    cr_expect_eq(c.act_bytes, (128 * 256 + 4 * 128 * 128) * 4);
    /* The kernel's blocks of 32 rows cover 32·(32 + 64 + 96 + 128) = 10240
     * of the 128² cells at T = 128. */
    cr_expect_eq(c.flops_fwd, 4.0 * 10240 * 256 + 5.0 * 4 * 128 * 129 / 2);
    cr_expect_eq(c.flops_bwd_input, 8.0 * 10240 * 256 + 5.0 * 4 * 128 * 129 / 2);
    FILE *f = fopen("/dev/null", "w");
    pw_graph_print(g, f);
    fclose(f);
    pw_graph_destroy(g);
}

/* ---------------------------------------------------------------- text data */

/* The README's quick-start GPT: tiny_gpt.graph's names and tie at context
 * 64, width 128, 4 blocks, no dropout. */
Test(graph, tiny_gpt_quick_parses, .timeout = TIMEOUT)
{
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_file(PW_SOURCE_DIR "/examples/tiny_gpt_quick.graph", &g), PW_OK,
                 "%s", pw_last_error());
    cr_expect_str_eq(g->name, "tiny_gpt_quick");
    int64_t n = 0;
    for (int i = 0; i < g->n_params; i++) n += pw_shape_numel(&g->params[i].shape);
    int64_t block = 2 * 256 + (384 * 128 + 384) + (128 * 128 + 128) + (512 * 128 + 512) +
                    (128 * 512 + 128);
    cr_expect_eq(n, 256 * 128 + 64 * 128 + 4 * block + 256, "%lld parameters", (long long)n);
    int wte = pw_graph_find_param(g, "wte.weight");
    cr_assert_geq(wte, 0);
    cr_expect_eq(g->params[wte].n_uses, 2, "the head is tied to wte.weight");
    cr_expect_geq(pw_graph_find_param(g, "h.3.attn.c_attn.weight"), 0);
    for (int i = 0; i < g->n_nodes; i++) cr_expect_neq(g->nodes[i].op, PW_OP_DROPOUT);
    const pw_value *in = &g->values[g->input];
    cr_expect_eq(in->shape.d[in->shape.ndim - 1], 64);
    pw_graph_destroy(g);
}

Test(data, text_windows_split_and_checks)
{
    char path[128];
    snprintf(path, sizeof path, "%s/abc.txt", tmpdir);
    unsigned char bytes[101];
    for (int i = 0; i < 101; i++) bytes[i] = (unsigned char)(i * 7 + 3);
    write_file(path, bytes, sizeof bytes);

    pw_dataset *tr = NULL, *te = NULL;
    cr_assert_eq(pw_dataset_load_text(path, 8, 1, &tr), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_dataset_load_text(path, 8, 0, &te), PW_OK, "%s", pw_last_error());
    /* 101 bytes: held-out = the last 10 (101 / 10), training = the first 91 */
    cr_expect_eq(tr->text_len, 91);
    cr_expect_eq(te->text_len, 10);
    cr_expect_eq(tr->n, (91 - 1) / 8);
    cr_expect_eq(te->n, 1);
    cr_expect_eq(tr->x_dtype, PW_I32);
    cr_expect_eq(tr->label_numel, 8);
    cr_expect_eq(tr->n_classes, 256);

    int64_t idx[2] = {3, 0};
    int32_t x[16], y[16];
    cr_assert_eq(pw_dataset_gather(tr, idx, 2, x, y), PW_OK);
    for (int t = 0; t < 8; t++) {
        cr_expect_eq(x[t], bytes[24 + t]);
        cr_expect_eq(y[t], bytes[24 + t + 1]);
        cr_expect_eq(x[8 + t], bytes[t]);
    }
    cr_assert_eq(pw_dataset_gather(te, idx + 1, 1, x, y), PW_OK);
    cr_expect_eq(x[0], bytes[91]);
    cr_expect_eq(y[7], bytes[99]);
    int64_t bad = tr->n;
    cr_expect_eq(pw_dataset_gather(tr, &bad, 1, x, y), PW_ERR_INVALID_ARG);
    double h = pw_dataset_unigram_entropy(tr);
    cr_expect(h > 0.0 && h <= log(256.0), "entropy %g", h);

    /* the graph decides T */
    pw_graph *g = small_gpt(8, 16, 2, 1, 256, 0.0, 1);
    cr_expect_eq(pw_dataset_check_graph(g, tr), PW_OK, "%s", pw_last_error());
    char spec[160];
    snprintf(spec, sizeof spec, "text:%s", path);
    pw_dataset *d = (pw_dataset *)0x1;
    cr_expect_eq(pw_dataset_from_spec(spec, 1, &d), PW_ERR_INVALID_ARG);
    cr_expect_null(d);
    cr_expect(strstr(pw_last_error(), "pw_dataset_from_spec_for_graph"), "%s", pw_last_error());
    cr_assert_eq(pw_dataset_from_spec_for_graph(spec, 0, g, &d), PW_OK, "%s", pw_last_error());
    cr_expect_eq(d->n, 1);
    cr_expect_eq(d->sample_numel, 8);
    pw_dataset_destroy(d);

    /* a context longer than the held-out split */
    pw_graph *g2 = small_gpt(16, 16, 2, 1, 256, 0.0, 1);
    cr_expect_eq(pw_dataset_from_spec_for_graph(spec, 0, g2, &d), PW_ERR_INVALID_ARG);
    cr_expect(strstr(pw_last_error(), "needs at least 17"), "%s", pw_last_error());
    /* graphs that do not fit byte tokens */
    cr_expect_eq(pw_dataset_check_graph(g2, tr), PW_ERR_SHAPE);
    pw_graph *small_vocab = small_gpt(8, 16, 2, 1, 100, 0.0, 1);
    cr_expect_eq(pw_dataset_check_graph(small_vocab, tr), PW_ERR_SHAPE);
    cr_expect(strstr(pw_last_error(), "vocab=100"), "%s", pw_last_error());
    pw_graph *mlp = parse("input x : f32[8]\nlabel y : i32[]\nl = linear(x, out=256)\n"
                          "loss = softmax_cross_entropy(l, y)\n");
    cr_expect_eq(pw_dataset_check_graph(mlp, tr), PW_ERR_SHAPE);
    cr_expect(strstr(pw_last_error(), "embedding"), "%s", pw_last_error());
    cr_expect_eq(pw_dataset_from_spec_for_graph(spec, 1, mlp, &d), PW_ERR_SHAPE);
    cr_expect(strstr(pw_last_error(), "i32[T]"), "%s", pw_last_error());
    cr_expect_eq(pw_dataset_load_text("/nonexistent/x.txt", 8, 1, &d), PW_ERR_IO);
    cr_expect(strstr(pw_last_error(), "/nonexistent/x.txt"), "%s", pw_last_error());
    pw_graph_destroy(g), pw_graph_destroy(g2), pw_graph_destroy(small_vocab), pw_graph_destroy(mlp);
    pw_dataset_destroy(tr), pw_dataset_destroy(te);
}

Test(data, directories_concatenate_in_name_order)
{
    char dir[128], p[192];
    snprintf(dir, sizeof dir, "%s/corpus", tmpdir);
    cr_assert_eq(mkdir(dir, 0700), 0);
    snprintf(p, sizeof p, "%s/b", dir);
    write_file(p, "BBBBBBBBBB", 10);
    snprintf(p, sizeof p, "%s/a", dir);
    write_file(p, "AAAAAAAAAA", 10);
    char link[192];
    snprintf(link, sizeof link, "%s/c", dir);
    cr_assert_eq(symlink(p, link), 0); /* links are skipped */
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_load_text(dir, 4, 1, &d), PW_OK, "%s", pw_last_error());
    cr_expect_eq(d->text_len, 18);
    cr_expect_eq(d->text[0], 'A');
    cr_expect_eq(d->text[10], 'B');
    pw_dataset_destroy(d);
}

Test(data, fortunes_corpus)
{
    struct stat sb;
    if (stat(PW_FORTUNES_DIR, &sb) != 0)
        cr_skip_test("the Debian package fortunes is not installed (%s)", PW_FORTUNES_DIR);
    pw_graph *g = small_gpt(128, 16, 2, 1, 256, 0.0, 1);
    pw_dataset *tr = NULL, *te = NULL;
    cr_assert_eq(pw_dataset_from_spec_for_graph("text:fortunes", 1, g, &tr), PW_OK, "%s",
                 pw_last_error());
    cr_assert_eq(pw_dataset_from_spec_for_graph("text:fortunes", 0, g, &te), PW_OK, "%s",
                 pw_last_error());
    double h = pw_dataset_unigram_entropy(te);
    cr_log_info("fortunes: %lld training and %lld held-out windows of 128 bytes; held-out "
                "unigram entropy %.4f nats (%.3f bits)", (long long)tr->n, (long long)te->n, h,
                h / log(2.0));
    cr_expect_gt(tr->n, 10000);
    cr_expect(h > 2.5 && h < 3.6, "English bytes have ~3 nats of unigram entropy, got %g", h);
    cr_expect_eq(pw_dataset_check_graph(g, tr), PW_OK, "%s", pw_last_error());
    pw_dataset_destroy(tr), pw_dataset_destroy(te), pw_graph_destroy(g);
}

/* ---------------------------------------------------------------- programs */

/* A run of `steps` optimizer steps over stages [bounds[s], bounds[s+1]),
 * wiring boundary values by hand (what the engine's ports do). */
typedef struct run_opts {
    int stages;
    int bounds[5];
    int recompute;
    int split_w;         /* 2 slots: F0 F1 B0 B1 W0 W1 instead of F B W per micro-batch */
    int64_t mb;
    int M;
    int steps;
    uint64_t seed;
} run_opts;

static void fill(pw_program *p, const pw_graph *g, const pw_dataset *d, int64_t start,
                 int64_t n, int slot)
{
    int64_t idx[64];
    for (int64_t i = 0; i < n; i++) idx[i] = (start + i) % d->n;
    cr_assert_eq(pw_dataset_gather(d, idx, n, pw_program_value(p, g->input, slot),
                                   pw_program_value(p, g->label, slot)),
                 PW_OK, "%s", pw_last_error());
}

/* A parameter held by several stages (a tie that spans them): the recipe of
 * pw_program_param_uses — every use's buffer, stages last to first, added
 * left to right; then each copy folds and takes the total. */
static void sum_ties_across_stages(const pw_graph *g, pw_program **p, int S)
{
    for (int gp = 0; gp < g->n_params; gp++) {
        int where[4], local[4], n = 0;
        for (int s = 0; s < S; s++)
            for (int i = 0; i < pw_program_n_params(p[s]); i++) {
                pw_program_param pp;
                pw_program_param_at(p[s], i, &pp);
                if (pp.graph_param == gp) where[n] = s, local[n++] = i;
            }
        if (n < 2) continue;
        int64_t numel = pw_shape_numel(&g->params[gp].shape);
        float *acc = zeros_f(numel);
        int first = 1;
        for (int k = n - 1; k >= 0; k--) {
            float *bufs[8];
            int uses = pw_program_param_uses(p[where[k]], local[k], bufs, 8);
            cr_assert(uses >= 1 && uses <= 8);
            for (int u = 0; u < uses; u++) {
                if (first) memcpy(acc, bufs[u], (size_t)numel * 4);
                else
                    for (int64_t j = 0; j < numel; j++) acc[j] += bufs[u][j];
                first = 0;
            }
        }
        for (int k = 0; k < n; k++) {
            pw_program_param pp;
            pw_program_fold_grads(p[where[k]]);
            pw_program_param_at(p[where[k]], local[k], &pp);
            memcpy(pp.grad, acc, (size_t)numel * 4);
        }
        free(acc);
    }
}

/* Parameters after the run, in graph order (one flat array), and the loss of
 * every step. */
static float *run(const pw_graph *g, const pw_dataset *d, const run_opts *o, double *losses,
                  pw_program_memory *mem0)
{
    pw_program *p[4];
    int slots = o->split_w ? 2 : 1;
    for (int s = 0; s < o->stages; s++) {
        pw_program_config pc = {.graph = g, .node_begin = o->bounds[s],
                                .node_end = o->bounds[s + 1], .micro_batch = o->mb,
                                .loss_batch = o->mb * o->M, .slots = slots,
                                .optim = pw_optim_defaults(PW_OPTIM_ADAMW),
                                .recompute = o->recompute};
        pc.optim.lr = 3e-3f;
        cr_assert_eq(pw_program_create(&pc, &p[s]), PW_OK, "%s", pw_last_error());
        pw_program_init_params(p[s], o->seed);
    }
    if (mem0) pw_program_memory_usage(p[0], mem0);
    const int S = o->stages;
    for (int step = 1; step <= o->steps; step++) {
        double loss = 0.0;
        for (int m0 = 0; m0 < o->M; m0 += slots) {
            /* forward of `slots` micro-batches, stage by stage */
            for (int k = 0; k < slots; k++) {
                int m = m0 + k;
                int64_t start = ((int64_t)(step - 1) * o->M + m) * o->mb;
                for (int s = 0; s < S; s++) {
                    fill(p[s], g, d, start, o->mb, k);
                    pw_program_set_rng(p[s], k, o->seed, step, (int64_t)m * o->mb);
                    if (s > 0) {
                        const int *ins;
                        int ni = pw_program_inputs(p[s], &ins);
                        for (int i = 0; i < ni; i++)
                            memcpy(pw_program_value(p[s], ins[i], k),
                                   pw_program_value(p[s - 1], ins[i], k),
                                   (size_t)o->mb * (size_t)pw_shape_numel(&g->values[ins[i]].shape) * 4);
                    }
                    cr_assert_eq(pw_program_forward(p[s], k, o->mb), PW_OK, "%s", pw_last_error());
                }
                loss += pw_program_loss_sum(p[S - 1], k);
            }
            /* backward: B of every slot, then (split) W of every slot */
            for (int k = 0; k < slots; k++) {
                for (int s = S - 1; s >= 0; s--) {
                    if (s < S - 1) {
                        const int *ins;
                        int ni = pw_program_inputs(p[s + 1], &ins);
                        for (int i = 0; i < ni; i++) {
                            float *src = pw_program_grad(p[s + 1], ins[i], k);
                            if (!src) continue;
                            memcpy(pw_program_grad(p[s], ins[i], k), src,
                                   (size_t)o->mb * (size_t)pw_shape_numel(&g->values[ins[i]].shape) * 4);
                        }
                    }
                    cr_assert_eq(pw_program_backward_input(p[s], k), PW_OK, "%s", pw_last_error());
                    if (!o->split_w)
                        cr_assert_eq(pw_program_backward_weight(p[s], k), PW_OK, "%s",
                                     pw_last_error());
                }
            }
            if (o->split_w)
                for (int k = 0; k < slots; k++)
                    for (int s = S - 1; s >= 0; s--)
                        cr_assert_eq(pw_program_backward_weight(p[s], k), PW_OK, "%s",
                                     pw_last_error());
        }
        sum_ties_across_stages(g, p, S);
        for (int s = 0; s < S; s++)
            cr_assert_eq(pw_program_optimizer_step(p[s], step), PW_OK, "%s", pw_last_error());
        if (losses)
            losses[step - 1] = loss / ((double)(o->mb * o->M) * (double)pw_program_loss_positions(p[S - 1]));
    }
    int64_t total = 0;
    for (int i = 0; i < g->n_params; i++) total += pw_shape_numel(&g->params[i].shape);
    float *out = calloc((size_t)total, 4);
    cr_assert_not_null(out);
    int64_t at = 0;
    for (int i = 0; i < g->n_params; i++) {
        int found = 0;
        for (int s = 0; s < S && !found; s++)
            for (int j = 0; j < pw_program_n_params(p[s]); j++) {
                pw_program_param pp;
                pw_program_param_at(p[s], j, &pp);
                if (pp.graph_param != i) continue;
                memcpy(out + at, pp.data, (size_t)pp.numel * 4);
                found = 1;
                break;
            }
        cr_assert(found, "parameter %s in no stage", g->params[i].name);
        at += pw_shape_numel(&g->params[i].shape);
    }
    for (int s = 0; s < S; s++) pw_program_destroy(p[s]);
    return out;
}

static int64_t n_param_elems(const pw_graph *g)
{
    int64_t total = 0;
    for (int i = 0; i < g->n_params; i++) total += pw_shape_numel(&g->params[i].shape);
    return total;
}

/* The first node of the block-1 attention (the c_proj linear after it), and
 * of the block-1 MLP: cuts that leave the residual x passing through the
 * middle stage untouched (received and passed on). */
static int node_of(const pw_graph *g, const char *value)
{
    for (int i = 0; i < g->n_nodes; i++)
        if (strcmp(g->values[g->nodes[i].output].name, value) == 0) return i;
    cr_assert_fail("no node defines '%s'", value);
    return -1;
}

Test(program, recompute_is_bit_identical)
{
    pw_graph *g = small_gpt(8, 16, 2, 2, 256, 0.1, 1);
    pw_dataset *d = corpus_dataset(8, 1, 20000);
    run_opts o = {.stages = 1, .bounds = {0, g->n_nodes}, .mb = 4, .M = 2, .steps = 3, .seed = 9};
    double l0[3], l1[3], l2[3], l3[3];
    pw_program_memory m0, m1;
    float *a = run(g, d, &o, l0, &m0);
    o.recompute = 1;
    float *b = run(g, d, &o, l1, &m1);
    int64_t n = n_param_elems(g);
    cr_expect(same_bits("params, recompute vs not", a, b, (size_t)n * 4));
    cr_expect(memcmp(l0, l1, sizeof l0) == 0, "losses differ: %.17g vs %.17g", l0[2], l1[2]);
    cr_log_info("activations per slot: %zu B without recompute, %zu B with (+ %zu B shared)",
                m0.activations, m1.activations, m1.shared);
    cr_expect_lt(m1.activations * 4, m0.activations, "recompute keeps only the stage's inputs");
    cr_expect_gt(m1.shared, m0.shared);

    /* split W with 2 slots: W of slot 0 runs after slot 1's backward, so
     * recompute rebuilds slot 0 once more; same bits either way */
    o.split_w = 1;
    float *c = run(g, d, &o, l2, NULL);
    o.recompute = 0;
    float *e = run(g, d, &o, l3, NULL);
    cr_expect(same_bits("params, split W + recompute", c, a, (size_t)n * 4));
    cr_expect(same_bits("params, split W", e, a, (size_t)n * 4));
    free(a), free(b), free(c), free(e);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* Three stages, with dropout, a residual that skips the middle stage, the
 * head on the last stage tied to the embedding on the first (summed by the
 * recipe of pw_program_param_uses), with and without recompute and split W:
 * bit-identical to one stage. */
Test(program, stages_with_skips_ties_and_dropout_match_one)
{
    pw_graph *g = small_gpt(8, 16, 2, 2, 256, 0.1, 1);
    pw_dataset *d = corpus_dataset(8, 1, 20000);
    run_opts o = {.stages = 1, .bounds = {0, g->n_nodes}, .mb = 2, .M = 3, .steps = 2, .seed = 4};
    float *ref = run(g, d, &o, NULL, NULL);
    int64_t n = n_param_elems(g);
    /* the middle stage is block 1's c_attn and attention: the residual x
     * (h.0/x2) skips it, from the first stage to the add in the last */
    int c1 = node_of(g, "h.1/qkv"), c2 = node_of(g, "h.1/o");
    {
        pw_program_config pc = {.graph = g, .node_begin = c1, .node_end = c2, .micro_batch = 2,
                                .optim = pw_optim_defaults(PW_OPTIM_SGD)};
        pw_program *mid;
        cr_assert_eq(pw_program_create(&pc, &mid), PW_OK);
        const int *ins, *outs;
        int ni = pw_program_inputs(mid, &ins), no = pw_program_outputs(mid, &outs), x = -1;
        for (int i = 0; i < ni; i++)
            for (int j = 0; j < no; j++)
                if (ins[i] == outs[j]) x = ins[i];
        cr_assert_geq(x, 0, "no value passes through the middle stage");
        cr_expect_str_eq(g->values[x].name, "h.0/x2");
        pw_program_destroy(mid);
    }
    /* what a stage keeps per sample under recompute: the whole graph reads
     * tokens and labels; [c1, c2) receives block 1's ln_1 output and the
     * residual it passes on */
    cr_expect_eq(pw_graph_range_input_bytes(g, 0, g->n_nodes), 2 * 8 * 4);
    cr_expect_eq(pw_graph_range_input_bytes(g, c1, c2), 2 * 8 * 16 * 4);
    cr_expect_eq(pw_graph_range_input_bytes(g, c2, c1), -1);
    o.stages = 3;
    o.bounds[0] = 0, o.bounds[1] = c1, o.bounds[2] = c2, o.bounds[3] = g->n_nodes;
    for (int rc = 0; rc < 2; rc++) {
        o.recompute = rc;
        for (int sw = 0; sw < 2; sw++) {
            o.split_w = sw;
            o.M = sw ? 4 : 3;
            float *ref2 = ref;
            if (sw) {
                run_opts one = o;
                one.stages = 1;
                one.bounds[1] = g->n_nodes;
                one.split_w = 0;
                one.recompute = 0;
                ref2 = run(g, d, &one, NULL, NULL);
            }
            float *x = run(g, d, &o, NULL, NULL);
            char what[64];
            snprintf(what, sizeof what, "3 stages (recompute %d, split W %d)", rc, sw);
            cr_expect(same_bits(what, x, ref2, (size_t)n * 4), "%s differs from 1 stage", what);
            free(x);
            if (ref2 != ref) free(ref2);
        }
    }
    free(ref);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* The fixture cut by hand into 4 stages (tie from the first stage to the
 * last, a residual skipping stage 1) trains bit-identically to one stage. */
Test(program, hand_cut_fixture_matches_one_stage)
{
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_file(PW_SOURCE_DIR "/tests/fixtures/graphs/gpt_tiny_cuts.graph", &g),
                 PW_OK, "%s", pw_last_error());
    cr_assert_eq(g->n_cuts, 3);
    pw_dataset *d = corpus_dataset(16, 1, 20000);
    run_opts o = {.stages = 1, .bounds = {0, g->n_nodes}, .mb = 2, .M = 2, .steps = 2, .seed = 6};
    float *ref = run(g, d, &o, NULL, NULL);
    o.stages = 0;
    o.bounds[0] = 0;
    for (int i = 1; i < g->n_nodes; i++)
        if (g->nodes[i].cut_before) o.bounds[++o.stages] = i;
    o.bounds[++o.stages] = g->n_nodes;
    cr_assert_eq(o.stages, 4);
    int64_t n = n_param_elems(g);
    for (int rc = 0; rc < 2; rc++) {
        o.recompute = rc;
        float *x = run(g, d, &o, NULL, NULL);
        cr_expect(same_bits("4 hand-cut stages", x, ref, (size_t)n * 4), "recompute %d", rc);
        free(x);
    }
    free(ref);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* Within a given BLAS kernel, a GEMM row's bits may depend on how many rows
 * the call has (OpenBLAS's Haswell and Zen kernels do; SkylakeX and
 * Sandybridge happen not to), so across micro-batch *sizes* activations
 * agree to a tolerance, not bit for bit. (Runs compared bit for bit keep the
 * micro-batch size: tests/test_determinism.c.) */
static int close_to(const char *what, const float *a, const float *b, size_t n, double rel)
{
    double maxabs = 0.0, maxerr = 0.0;
    for (size_t i = 0; i < n; i++) {
        double m = fabs((double)b[i]), e = fabs((double)a[i] - (double)b[i]);
        if (m > maxabs) maxabs = m;
        if (e > maxerr || e != e) maxerr = e != e ? INFINITY : e;
    }
    if (maxerr <= rel * maxabs) return 1;
    fprintf(stderr, "%s: max |a - b| %g > %g · max |b| (%g)\n", what, maxerr, rel, maxabs);
    return 0;
}

/* The micro-batch size changes nothing about the dropout masks: the masks
 * of 1 × 8 samples and 2 × 4 are the same bits (kernel and program), so
 * the activations and the loss agree (to the GEMMs' tolerance above). */
Test(program, dropout_masks_do_not_depend_on_micro_batch_size)
{
    pw_graph *g = small_gpt(8, 16, 2, 1, 256, 0.5, 1);
    pw_dataset *d = corpus_dataset(8, 1, 20000);
    pw_program *big, *small;
    pw_program_config pc = {.graph = g, .micro_batch = 8, .optim = pw_optim_defaults(PW_OPTIM_SGD)};
    cr_assert_eq(pw_program_create(&pc, &big), PW_OK);
    pc.micro_batch = 4;
    cr_assert_eq(pw_program_create(&pc, &small), PW_OK);
    pw_program_init_params(big, 3);
    pw_program_init_params(small, 3);
    cr_expect(pw_program_needs_rng(big));

    fill(big, g, d, 0, 8, 0);
    /* without the step and offset a training forward is refused */
    cr_expect_eq(pw_program_forward(big, 0, 8), PW_ERR_INVALID_ARG);
    cr_expect(strstr(pw_last_error(), "pw_program_set_rng"), "%s", pw_last_error());
    pw_program_set_rng(big, 0, 11, 5, 0);
    cr_assert_eq(pw_program_forward(big, 0, 8), PW_OK, "%s", pw_last_error());
    int v = g->nodes[node_of(g, "h.0/x2")].output;
    size_t per = (size_t)pw_shape_numel(&g->values[v].shape) * 4;
    float *want = malloc(8 * per);
    memcpy(want, pw_program_value(big, v, 0), 8 * per);
    double loss_big = pw_program_loss_sum(big, 0), loss_small = 0.0;
    for (int h = 0; h < 2; h++) {
        fill(small, g, d, 4 * h, 4, 0);
        pw_program_set_rng(small, 0, 11, 5, 4 * h);
        cr_assert_eq(pw_program_forward(small, 0, 4), PW_OK, "%s", pw_last_error());
        cr_expect(close_to("block output, 4-sample micro-batch", pw_program_value(small, v, 0),
                           (const float *)((char *)want + 4 * h * per), per, 1e-5));
        loss_small += pw_program_loss_sum(small, 0);
    }
    cr_expect(fabs(loss_big - loss_small) <= 1e-6 * fabs(loss_big), "%.17g vs %.17g", loss_big,
              loss_small);
    {   /* the masks themselves: exact */
        enum { NS = 8, NUMEL = 40 };
        float x[NS * NUMEL], y[NS * NUMEL];
        uint8_t m8[NS * NUMEL], m4[NS * NUMEL];
        for (int i = 0; i < NS * NUMEL; i++) x[i] = 1.0f + (float)i;
        pw_cpu_dropout_fwd(x, y, m8, NS, NUMEL, 0.5f, 77, 16);
        pw_cpu_dropout_fwd(x, y, m4, 4, NUMEL, 0.5f, 77, 16);
        pw_cpu_dropout_fwd(x + 4 * NUMEL, y, m4 + 4 * NUMEL, 4, NUMEL, 0.5f, 77, 20);
        cr_expect(memcmp(m8, m4, sizeof m8) == 0, "masks of 1 x 8 and 2 x 4 samples differ");
    }
    /* the next step draws new masks; evaluation draws none */
    pw_program_set_rng(big, 0, 11, 6, 0);
    cr_assert_eq(pw_program_forward(big, 0, 8), PW_OK);
    cr_expect(memcmp(pw_program_value(big, v, 0), want, 8 * per) != 0);
    cr_assert_eq(pw_program_forward_eval(big, 0, 8), PW_OK);
    float *e1 = malloc(8 * per);
    memcpy(e1, pw_program_value(big, v, 0), 8 * per);
    pw_program *nodrop;
    pw_graph *g0 = small_gpt(8, 16, 2, 1, 256, 0.0, 1);
    pc.graph = g0;
    pc.micro_batch = 8;
    cr_assert_eq(pw_program_create(&pc, &nodrop), PW_OK);
    pw_program_init_params(nodrop, 3);
    fill(nodrop, g0, d, 0, 8, 0);
    cr_assert_eq(pw_program_forward(nodrop, 0, 8), PW_OK, "p = 0 needs no randomness");
    cr_expect(same_bits("eval = no dropout", e1, pw_program_value(nodrop, v, 0), 8 * per));
    cr_expect_eq(pw_program_backward_input(big, 0), PW_ERR_INVALID_ARG,
                 "no backward after an evaluation forward");
    free(want), free(e1);
    pw_program_destroy(big), pw_program_destroy(small), pw_program_destroy(nodrop);
    pw_graph_destroy(g), pw_graph_destroy(g0);
    pw_dataset_destroy(d);
}

/* Changing a later token changes no earlier logit, through the whole model. */
Test(program, causal_through_the_model)
{
    pw_graph *g = small_gpt(8, 16, 2, 2, 256, 0.0, 1);
    pw_program *p;
    pw_program_config pc = {.graph = g, .micro_batch = 1, .optim = pw_optim_defaults(PW_OPTIM_SGD)};
    cr_assert_eq(pw_program_create(&pc, &p), PW_OK);
    pw_program_init_params(p, 1);
    int32_t *tok = pw_program_value(p, g->input, 0), *lab = pw_program_value(p, g->label, 0);
    for (int t = 0; t < 8; t++) tok[t] = lab[t] = 'a' + t;
    int lv = g->nodes[node_of(g, "logits")].output;
    cr_assert_eq(pw_program_forward_eval(p, 0, 1), PW_OK);
    float want[8 * 256];
    memcpy(want, pw_program_value(p, lv, 0), sizeof want);
    tok[5] = 'z';
    cr_assert_eq(pw_program_forward_eval(p, 0, 1), PW_OK);
    const float *got = pw_program_value(p, lv, 0);
    cr_expect(same_bits("logits of positions 0-4", got, want, 5 * 256 * 4));
    cr_expect(memcmp(got + 5 * 256, want + 5 * 256, 256 * 4) != 0);
    pw_program_destroy(p);
    pw_graph_destroy(g);
}

/* Whole-model gradients against finite differences of the mean loss over
 * every position of the batch: embeddings (the tied wte gets both uses),
 * attention, layernorm, MLP. */
struct model_ctx {
    pw_program *p;
    int64_t n, T;
};

static double model_loss(void *pv)
{
    struct model_ctx *c = pv;
    cr_assert_eq(pw_program_forward_eval(c->p, 0, c->n), PW_OK);
    return pw_program_loss_sum(c->p, 0) / (double)(c->n * c->T);
}

Test(program, gpt_gradients_match_finite_differences)
{
    const int64_t T = 5, n = 2;
    pw_graph *g = small_gpt((int)T, 8, 2, 1, 16, 0.0, 1);
    pw_program *p;
    pw_program_config pc = {.graph = g, .micro_batch = n, .optim = pw_optim_defaults(PW_OPTIM_SGD)};
    cr_assert_eq(pw_program_create(&pc, &p), PW_OK);
    pw_program_init_params(p, 2);
    int32_t *tok = pw_program_value(p, g->input, 0), *lab = pw_program_value(p, g->label, 0);
    uint64_t s = 5;
    for (int64_t i = 0; i < n * T; i++) tok[i] = (int32_t)(rng_next(&s) % 16);
    for (int64_t i = 0; i < n * T; i++) lab[i] = (int32_t)(rng_next(&s) % 16);
    /* larger weights than the init so that every path carries gradient */
    for (int i = 0; i < pw_program_n_params(p); i++) {
        pw_program_param pp;
        pw_program_param_at(p, i, &pp);
        if (pp.shape.ndim == 2)
            for (int64_t j = 0; j < pp.numel; j++) pp.data[j] *= 5.0f;
    }
    cr_assert_eq(pw_program_forward(p, 0, n), PW_OK);
    cr_assert_eq(pw_program_backward_input(p, 0), PW_OK);
    cr_assert_eq(pw_program_backward_weight(p, 0), PW_OK);
    pw_program_fold_grads(p); /* wte: the head's and the embedding's uses */
    struct model_ctx c = {p, n, T};
    static const char *const names[] = {"wte.weight", "wpe.weight", "h.0.ln_1.weight",
                                        "h.0.attn.c_attn.weight", "h.0.attn.c_proj.bias",
                                        "h.0.mlp.c_fc.weight", "ln_f.bias"};
    for (size_t k = 0; k < sizeof names / sizeof names[0]; k++) {
        pw_program_param pp = {0};
        for (int i = 0; i < pw_program_n_params(p); i++) {
            pw_program_param_at(p, i, &pp);
            if (strcmp(pp.name, names[k]) == 0) break;
        }
        cr_assert_str_eq(pp.name, names[k]);
        int64_t cnt = pp.numel < 48 ? pp.numel : 48;
        float *ana = malloc((size_t)cnt * 4);
        memcpy(ana, pp.grad, (size_t)cnt * 4);
        cr_expect(grad_matches(names[k], 3e-3f, pp.data, cnt, ana, model_loss, &c, 5e-2, 2e-4),
                  "%s", names[k]);
        free(ana);
    }
    pw_program_destroy(p);
    pw_graph_destroy(g);
}

/* The tied wte gets the sum of both uses' gradients: the same as the
 * embedding's and the head's gradients of an untied copy, added. */
Test(program, tied_weight_gets_both_gradients)
{
    pw_graph *tied = small_gpt(6, 8, 2, 1, 16, 0.0, 1), *untied = small_gpt(6, 8, 2, 1, 16, 0.0, 0);
    pw_program *a, *b;
    pw_program_config pc = {.graph = tied, .micro_batch = 3, .optim = pw_optim_defaults(PW_OPTIM_SGD)};
    cr_assert_eq(pw_program_create(&pc, &a), PW_OK);
    pc.graph = untied;
    cr_assert_eq(pw_program_create(&pc, &b), PW_OK);
    pw_program_init_params(a, 8);
    pw_program_init_params(b, 8);
    pw_program_param wa = {0}, wb = {0}, hb = {0}, pp;
    for (int i = 0; i < pw_program_n_params(a); i++) {
        pw_program_param_at(a, i, &pp);
        if (strcmp(pp.name, "wte.weight") == 0) wa = pp;
    }
    for (int i = 0; i < pw_program_n_params(b); i++) {
        pw_program_param_at(b, i, &pp);
        if (strcmp(pp.name, "wte.weight") == 0) wb = pp;
        if (strcmp(pp.name, "lm_head.weight") == 0) hb = pp;
    }
    cr_assert(wa.data && wb.data && hb.data);
    memcpy(hb.data, wb.data, (size_t)wb.numel * 4); /* the untied head starts equal */
    uint64_t s = 1;
    int32_t *ta = pw_program_value(a, tied->input, 0), *la = pw_program_value(a, tied->label, 0);
    int32_t *tb = pw_program_value(b, untied->input, 0), *lb = pw_program_value(b, untied->label, 0);
    for (int i = 0; i < 18; i++) {
        ta[i] = tb[i] = (int32_t)(rng_next(&s) % 16);
        la[i] = lb[i] = (int32_t)(rng_next(&s) % 16);
    }
    pw_program *both[2] = {a, b};
    for (int m = 0; m < 2; m++) /* two micro-batches */
        for (int k = 0; k < 2; k++) {
            cr_assert_eq(pw_program_forward(both[k], 0, 3), PW_OK);
            cr_assert_eq(pw_program_backward_input(both[k], 0), PW_OK);
            cr_assert_eq(pw_program_backward_weight(both[k], 0), PW_OK);
        }
    cr_expect_eq(pw_program_loss_sum(a, 0), pw_program_loss_sum(b, 0));
    /* each use in its own buffer: the head's (the last user) first */
    float *uses[4];
    int ia = -1;
    for (int i = 0; i < pw_program_n_params(a); i++) {
        pw_program_param_at(a, i, &pp);
        if (strcmp(pp.name, "wte.weight") == 0) ia = i;
    }
    cr_assert_eq(pw_program_param_uses(a, ia, uses, 4), 2);
    cr_expect_eq(uses[0], wa.grad);
    cr_expect(same_bits("head use", uses[0], hb.grad, (size_t)wa.numel * 4));
    cr_expect(same_bits("embedding use", uses[1], wb.grad, (size_t)wa.numel * 4));
    pw_program_fold_grads(a);
    pw_program_fold_grads(a); /* idempotent */
    int nonzero_head = 0, nonzero_emb = 0;
    for (int64_t j = 0; j < wa.numel; j++) {
        float want = hb.grad[j] + wb.grad[j];
        nonzero_head += hb.grad[j] != 0.0f;
        nonzero_emb += wb.grad[j] != 0.0f;
        cr_expect(memcmp(&wa.grad[j], &want, 4) == 0, "wte grad[%lld] = %.9g, want %.9g + %.9g",
                  (long long)j, (double)wa.grad[j], (double)hb.grad[j], (double)wb.grad[j]);
        cr_expect_eq(uses[1][j], 0.0f, "folded use buffers are cleared");
    }
    cr_expect_gt(nonzero_head, 0);
    cr_expect_gt(nonzero_emb, 0);
    pw_program_destroy(a), pw_program_destroy(b);
    pw_graph_destroy(tied), pw_graph_destroy(untied);
}

/* ---------------------------------------------------------------- training */

Test(gpt, small_gpt_learns_text)
{
    pw_graph *g = small_gpt(16, 32, 2, 2, 256, 0.1, 1);
    pw_dataset *d = corpus_dataset(16, 1, 40000);
    pw_dataset *te = corpus_dataset(16, 0, 40000);
    cr_assert_eq(pw_dataset_check_graph(g, d), PW_OK, "%s", pw_last_error());
    enum { STEPS = 300 };
    run_opts o = {.stages = 1, .bounds = {0, g->n_nodes}, .mb = 8, .M = 2, .steps = STEPS,
                  .seed = 1, .recompute = 1};
    double losses[STEPS];
    float *w = run(g, d, &o, losses, NULL);
    double first = losses[0], last = 0.0;
    for (int i = STEPS - 5; i < STEPS; i++) last += losses[i] / 5.0;
    double h = pw_dataset_unigram_entropy(te);
    cr_log_info("small GPT: loss %.3f -> %.3f over %d steps (unigram entropy %.3f nats)", first,
                last, STEPS, h);
    cr_expect(first > 5.0, "an untrained byte model starts near ln 256 = 5.55, got %g", first);
    /* the corpus repeats six sentences: context makes most bytes predictable */
    cr_expect(last < 0.5 * h, "after %d steps the loss %g should be well below the unigram "
              "entropy %g", STEPS, last, h);
    free(w);
    pw_dataset_destroy(d), pw_dataset_destroy(te);
    pw_graph_destroy(g);
}

/* ---------------------------------------------------------------- lr schedule */

Test(gpt, lr_schedule_values)
{
    pw_optim_config c = pw_optim_defaults(PW_OPTIM_ADAMW);
    c.lr = 1e-3f;
    cr_expect_eq(pw_optim_lr_at(&c, 1), c.lr, "the default schedule leaves lr alone");
    cr_expect_eq(pw_optim_lr_at(&c, 1000000), c.lr);
    c.schedule = PW_LR_COSINE;
    c.warmup_steps = 10;
    c.decay_steps = 110;
    c.min_lr = 1e-4f;
    cr_expect_float_eq(pw_optim_lr_at(&c, 1), 1e-4f, 1e-10, "warm-up: lr · 1/10");
    cr_expect_float_eq(pw_optim_lr_at(&c, 5), 5e-4f, 1e-10);
    cr_expect_eq(pw_optim_lr_at(&c, 10), c.lr, "the peak at the end of the warm-up");
    cr_expect_float_eq(pw_optim_lr_at(&c, 60), 5.5e-4f, 1e-9, "cosine half-way: (lr + min) / 2");
    cr_expect_float_eq(pw_optim_lr_at(&c, 110), c.min_lr, 1e-10);
    cr_expect_float_eq(pw_optim_lr_at(&c, 500), c.min_lr, 1e-10, "past the end: min_lr");
    for (int64_t t = 11; t < 110; t++)
        cr_expect_leq(pw_optim_lr_at(&c, t + 1), pw_optim_lr_at(&c, t), "cosine decays (step %lld)",
                      (long long)t);
    c.schedule = PW_LR_LINEAR;
    cr_expect_float_eq(pw_optim_lr_at(&c, 35), 7.75e-4f, 1e-9, "linear: a quarter of the way");
    c.decay_steps = 0; /* no length given: no decay after the warm-up */
    cr_expect_eq(pw_optim_lr_at(&c, 50), c.lr);
    pw_lr_schedule k;
    cr_expect_eq(pw_lr_schedule_parse("cosine", &k), PW_OK);
    cr_expect_eq(k, PW_LR_COSINE);
    cr_expect_str_eq(pw_lr_schedule_name(PW_LR_LINEAR), "linear");
    cr_expect_eq(pw_lr_schedule_parse("step", &k), PW_ERR_INVALID_ARG);
}

/* The tiny GPT's parameters after `steps` steps of a real pipeline (worker
 * threads, 1F1B, the tie summed across stages), in graph order. */
static float *pipeline_params(const pw_graph *g, const pw_dataset *d, int stages,
                              const pw_optim_config *oc, int steps)
{
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = 8;
    pc.micro_batches = 4;
    pc.stages = stages;
    pc.schedule = PW_SCHEDULE_1F1B;
    pc.optim = *oc;
    pc.seed = 5;
    pc.pin = 0;
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    for (int i = 0; i < steps; i++)
        cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
    float *out = calloc((size_t)n_param_elems(g), 4);
    cr_assert_not_null(out);
    int64_t at = 0;
    for (int i = 0; i < g->n_params; i++) {
        int found = 0;
        for (int s = 0; s < pw_pipeline_n_chunks(pl) && !found; s++) {
            pw_program *progs[16];
            int n = pw_pipeline_programs(pl, 0, s, progs, 16);
            for (int k = 0; k < n && !found; k++)
                for (int j = 0; j < pw_program_n_params(progs[k]); j++) {
                    pw_program_param pp;
                    pw_program_param_at(progs[k], j, &pp);
                    if (pp.graph_param != i) continue;
                    memcpy(out + at, pp.data, (size_t)pp.numel * 4);
                    found = 1;
                    break;
                }
        }
        cr_assert(found, "parameter %s in no stage", g->params[i].name);
        at += pw_shape_numel(&g->params[i].shape);
    }
    pw_pipeline_destroy(pl);
    return out;
}

/* Warm-up and cosine decay change the lr every step; every stage computes it
 * from the step alone, so 2 and 3 stages stay bit-identical to one, and the
 * schedule does change the result. */
Test(gpt, lr_schedule_keeps_stages_bit_identical)
{
    pw_graph *g = small_gpt(8, 16, 2, 2, 256, 0.1, 1);
    pw_dataset *d = corpus_dataset(8, 1, 20000);
    pw_optim_config oc = pw_optim_defaults(PW_OPTIM_ADAMW);
    oc.lr = 3e-3f;
    const int steps = 6;
    float *flat = pipeline_params(g, d, 1, &oc, steps);
    oc.schedule = PW_LR_COSINE;
    oc.warmup_steps = 2;
    oc.decay_steps = steps;
    oc.min_lr = 3e-4f;
    float *one = pipeline_params(g, d, 1, &oc, steps);
    const size_t bytes = (size_t)n_param_elems(g) * 4;
    cr_expect(memcmp(flat, one, bytes) != 0, "the schedule must change the update");
    for (int S = 2; S <= 3; S++) {
        float *many = pipeline_params(g, d, S, &oc, steps);
        char what[64];
        snprintf(what, sizeof what, "params, cosine schedule, %d stages vs 1", S);
        cr_expect(same_bits(what, one, many, bytes));
        free(many);
    }
    free(flat), free(one);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}
