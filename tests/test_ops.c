/* pipewright — tests for the CPU fp32 kernels (stages/ops/cpu/ops.h).
 *
 * The CPU kernels are the oracle every other backend is checked against, so
 * they are checked here against first principles:
 *   - every backward (inputs and weights) against double-precision central
 *     differences of L = Σ r·y, r a fixed random tensor, evaluated with the
 *     fp32 forward kernels;
 *   - forwards against direct double-precision formulas;
 *   - the accumulate contract (dx overwritten vs added; dw/db always added);
 *   - determinism (same inputs, same bits) and micro-batch splits.
 * On a mismatch each check prints the first few differing elements and the
 * max error to stderr before failing.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <criterion/parameterized.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stages/ops/cpu/ops.h"

/* ---------------------------------------------------------------- helpers */

static uint64_t rng_next(uint64_t *s) /* splitmix64 */
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rng_uniform(uint64_t *s, float lo, float hi)
{
    return lo + (hi - lo) * (float)((double)(rng_next(s) >> 40) / 16777216.0);
}

static float *alloc_f(int64_t n)
{
    float *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    cr_assert_not_null(p);
    return p;
}

static float *zeros_f(int64_t n)
{
    float *p = alloc_f(n);
    memset(p, 0, (size_t)(n > 0 ? n : 1) * sizeof(float));
    return p;
}

static float *rand_f(int64_t n, float lo, float hi, uint64_t seed)
{
    float *p = alloc_f(n);
    for (int64_t i = 0; i < n; i++) p[i] = rng_uniform(&seed, lo, hi);
    return p;
}

static float *copy_f(const float *src, int64_t n)
{
    float *p = alloc_f(n);
    memcpy(p, src, (size_t)(n > 0 ? n : 1) * sizeof(float));
    return p;
}

static int32_t *rand_labels(int64_t n, int64_t C, uint64_t seed)
{
    int32_t *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t));
    cr_assert_not_null(p);
    for (int64_t i = 0; i < n; i++) p[i] = (int32_t)(rng_next(&seed) % (uint64_t)C);
    return p;
}

static double dot_d(const float *a, const float *b, int64_t n)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}

/* Compares got[i] with want[i] within tol·bound[i] (bound NULL: tol·|want|).
 * Prints the first few misses and the max error scaled by the bound; returns
 * whether all matched. A NaN anywhere counts as a miss. */
static int close_enough(const char *what, const float *got, const double *want,
                        const double *bound, double tol, int64_t count)
{
    double worst = 0.0;
    int64_t misses = 0;
    for (int64_t i = 0; i < count; i++) {
        double scale = bound ? bound[i] : fabs(want[i]);
        if (scale < 1e-30) scale = 1e-30;
        double err = fabs((double)got[i] - want[i]) / scale;
        if (!(err <= tol)) {
            if (misses < 5)
                fprintf(stderr, "%s[%lld]: got %.9g want %.9g (err %.3g, tol %.3g)\n",
                        what, (long long)i, (double)got[i], want[i], err, tol);
            misses++;
            err = isnan(err) ? INFINITY : err;
        }
        if (err > worst) worst = err;
    }
    if (misses)
        fprintf(stderr, "%s: %lld of %lld elements differ, max err %.3g\n", what,
                (long long)misses, (long long)count, worst);
    return misses == 0;
}

/* Same bits, element by element; prints the first few differences. */
static int same_bits(const char *what, const float *a, const float *b, int64_t count)
{
    int64_t misses = 0;
    for (int64_t i = 0; i < count; i++) {
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0) {
            if (misses < 5)
                fprintf(stderr, "%s[%lld]: %.9g vs %.9g\n", what, (long long)i,
                        (double)a[i], (double)b[i]);
            misses++;
        }
    }
    if (misses)
        fprintf(stderr, "%s: %lld of %lld elements differ in bits\n", what,
                (long long)misses, (long long)count);
    return misses == 0;
}

/* ---------------------------------------------------------------- finite differences */

#define FD_STEP 1e-2f /* step, relative to values of size ~1 */
#define FD_TOL 2e-2   /* fp32 forward + O(step²) truncation leave ~1e-3 */

typedef double (*objective_fn)(void *ctx);

/* num[i] = ∂f/∂param[i] by central differences in double. The denominator is
 * the step actually taken after rounding v ± eps to float. */
static double *fd_grad(objective_fn f, void *ctx, float step, float *param, int64_t count)
{
    double *num = malloc((size_t)(count > 0 ? count : 1) * sizeof(double));
    cr_assert_not_null(num);
    for (int64_t i = 0; i < count; i++) {
        float v = param[i];
        float e = step * fmaxf(1.0f, fabsf(v));
        float vp = v + e, vm = v - e;
        param[i] = vp;
        double lp = f(ctx);
        param[i] = vm;
        double lm = f(ctx);
        param[i] = v;
        num[i] = (lp - lm) / ((double)vp - (double)vm);
    }
    return num;
}

/* Error of each element is |num − ana| / max(|ana|, 0.1·max|ana|, 1e-3): a
 * relative error, with a floor so elements near zero are judged against the
 * tensor's scale rather than their own. */
static int grad_matches(const char *what, float step, float *param, int64_t count,
                        const float *ana, objective_fn f, void *ctx)
{
    double *num = fd_grad(f, ctx, step, param, count);
    double amax = 0.0;
    for (int64_t i = 0; i < count; i++) amax = fmax(amax, fabs((double)ana[i]));
    double floor_ = fmax(1e-3, 0.1 * amax);
    double *bound = calloc((size_t)(count > 0 ? count : 1), sizeof(double));
    cr_assert_not_null(bound);
    for (int64_t i = 0; i < count; i++) bound[i] = fmax(fabs((double)ana[i]), floor_);
    /* compare analytic (got) with numeric (want) */
    int ok = close_enough(what, ana, num, bound, FD_TOL, count);
    double worst = 0.0;
    for (int64_t i = 0; i < count; i++)
        worst = fmax(worst, fabs(num[i] - (double)ana[i]) / bound[i]);
    cr_log_info("%s: max gradient error %.3g over %lld elements", what, worst,
                (long long)count);
    free(bound);
    free(num);
    return ok;
}

#define EXPECT_GRAD(step, param, count, ana, f, ctx, ...)                     \
    do {                                                                      \
        char what_[160];                                                      \
        snprintf(what_, sizeof what_, __VA_ARGS__);                           \
        cr_expect(grad_matches(what_, (step), (param), (count), (ana), (f), (ctx)), \
                  "%s: gradient check failed (see stderr)", what_);           \
    } while (0)

/* ---------------------------------------------------------------- shapes */

struct lin_shape {
    int64_t n, in, out;
};
struct row_shape {
    int64_t n, d;
};

ParameterizedTestParameters(grad, linear)
{
    static struct lin_shape s[] = {{1, 1, 1},  {1, 7, 13}, {7, 13, 1},
                                   {13, 7, 5}, {3, 1, 7},  {64, 96, 80}};
    return cr_make_param_array(struct lin_shape, s, sizeof s / sizeof s[0]);
}

#define ROW_SHAPES                                                            \
    static struct row_shape s[] = {{1, 1}, {1, 7}, {7, 13}, {13, 1}, {5, 3}, {64, 80}};

/* ---------------------------------------------------------------- gradient checks */

struct lin_ctx {
    float *x, *w, *b, *y;
    const float *r;
    int64_t n, in, out;
};

static double lin_obj(void *p)
{
    struct lin_ctx *c = p;
    pw_cpu_linear_fwd(c->x, c->w, c->b, c->y, c->n, c->in, c->out);
    return dot_d(c->r, c->y, c->n * c->out);
}

ParameterizedTest(struct lin_shape *s, grad, linear, .timeout = 60)
{
    int64_t n = s->n, in = s->in, out = s->out;
    float *x = rand_f(n * in, -1, 1, 1), *w = rand_f(out * in, -1, 1, 2);
    float *b = rand_f(out, -1, 1, 3), *r = rand_f(n * out, -1, 1, 4);
    float *y = alloc_f(n * out), *dx = alloc_f(n * in);
    float *dw = zeros_f(out * in), *db = zeros_f(out);
    pw_cpu_linear_bwd_input(r, w, dx, n, in, out, 0);
    pw_cpu_linear_bwd_weight(r, x, dw, db, n, in, out);

    struct lin_ctx c = {x, w, b, y, r, n, in, out};
    EXPECT_GRAD(FD_STEP, x, n * in, dx, lin_obj, &c, "linear dx (n=%lld in=%lld out=%lld)",
                (long long)n, (long long)in, (long long)out);
    EXPECT_GRAD(FD_STEP, w, out * in, dw, lin_obj, &c, "linear dw (n=%lld in=%lld out=%lld)",
                (long long)n, (long long)in, (long long)out);
    EXPECT_GRAD(FD_STEP, b, out, db, lin_obj, &c, "linear db (n=%lld in=%lld out=%lld)",
                (long long)n, (long long)in, (long long)out);
    free(x), free(w), free(b), free(r), free(y), free(dx), free(dw), free(db);
}

struct ln_ctx {
    float *x, *w, *b, *y, *mean, *rstd;
    const float *r;
    int64_t n, d;
};
#define LN_EPS 1e-5f
/* x̂ curves on the scale of the row's spread (1/rstd), not of x: a short row
 * of random values can have a spread of 0.05, where a 1e-2 step leaves ~1%
 * truncation error. w and b enter linearly and keep FD_STEP. */
#define LN_STEP 1e-3f

static double ln_obj(void *p)
{
    struct ln_ctx *c = p;
    pw_cpu_layernorm_fwd(c->x, c->w, c->b, c->y, c->mean, c->rstd, c->n, c->d, LN_EPS);
    return dot_d(c->r, c->y, c->n * c->d);
}

ParameterizedTestParameters(grad, layernorm)
{
    ROW_SHAPES
    return cr_make_param_array(struct row_shape, s, sizeof s / sizeof s[0]);
}

ParameterizedTest(struct row_shape *s, grad, layernorm, .timeout = 60)
{
    int64_t n = s->n, d = s->d;
    float *x = rand_f(n * d, -1, 1, 11), *w = rand_f(d, 0.5f, 1.5f, 12);
    float *b = rand_f(d, -1, 1, 13), *r = rand_f(n * d, -1, 1, 14);
    float *y = alloc_f(n * d), *mean = alloc_f(n), *rstd = alloc_f(n);
    float *dx = alloc_f(n * d), *dw = zeros_f(d), *db = zeros_f(d);
    pw_cpu_layernorm_fwd(x, w, b, y, mean, rstd, n, d, LN_EPS);
    pw_cpu_layernorm_bwd_input(x, w, mean, rstd, r, dx, n, d, 0);
    pw_cpu_layernorm_bwd_weight(x, mean, rstd, r, dw, db, n, d);

    struct ln_ctx c = {x, w, b, y, mean, rstd, r, n, d};
    EXPECT_GRAD(LN_STEP, x, n * d, dx, ln_obj, &c, "layernorm dx (n=%lld d=%lld)", (long long)n,
                (long long)d);
    EXPECT_GRAD(FD_STEP, w, d, dw, ln_obj, &c, "layernorm dw (n=%lld d=%lld)", (long long)n,
                (long long)d);
    EXPECT_GRAD(FD_STEP, b, d, db, ln_obj, &c, "layernorm db (n=%lld d=%lld)", (long long)n,
                (long long)d);
    free(x), free(w), free(b), free(r), free(y), free(mean), free(rstd);
    free(dx), free(dw), free(db);
}

struct ew_ctx {
    float *x, *x2, *y;
    const float *r;
    int64_t n;
    int op; /* 0 relu, 1 gelu, 2 add */
};

static double ew_obj(void *p)
{
    struct ew_ctx *c = p;
    if (c->op == 0) pw_cpu_relu_fwd(c->x, c->y, c->n);
    if (c->op == 1) pw_cpu_gelu_fwd(c->x, c->y, c->n);
    if (c->op == 2) pw_cpu_add_fwd(c->x, c->x2, c->y, c->n);
    return dot_d(c->r, c->y, c->n);
}

ParameterizedTestParameters(grad, elementwise)
{
    ROW_SHAPES
    return cr_make_param_array(struct row_shape, s, sizeof s / sizeof s[0]);
}

ParameterizedTest(struct row_shape *s, grad, elementwise, .timeout = 60)
{
    int64_t n = s->n * s->d;
    float *x = rand_f(n, -3, 3, 21), *x2 = rand_f(n, -1, 1, 22);
    float *r = rand_f(n, -1, 1, 23), *y = alloc_f(n);
    float *dx = alloc_f(n), *dx2 = alloc_f(n);
    struct ew_ctx c = {x, x2, y, r, n, 0};

    /* relu: keep every input at least 0.1 away from the kink (step is 1e-2) */
    for (int64_t i = 0; i < n; i++)
        if (fabsf(x[i]) < 0.1f) x[i] = x[i] < 0 ? x[i] - 0.1f : x[i] + 0.1f;
    c.op = 0;
    pw_cpu_relu_fwd(x, y, n);
    pw_cpu_relu_bwd_input(y, r, dx, n, 0);
    EXPECT_GRAD(FD_STEP, x, n, dx, ew_obj, &c, "relu dx (n=%lld)", (long long)n);

    c.op = 1;
    pw_cpu_gelu_bwd_input(x, r, dx, n, 0);
    EXPECT_GRAD(FD_STEP, x, n, dx, ew_obj, &c, "gelu dx (n=%lld)", (long long)n);

    c.op = 2;
    pw_cpu_copy_grad(r, dx, n, 0);
    pw_cpu_copy_grad(r, dx2, n, 0);
    EXPECT_GRAD(FD_STEP, x, n, dx, ew_obj, &c, "add da (n=%lld)", (long long)n);
    EXPECT_GRAD(FD_STEP, x2, n, dx2, ew_obj, &c, "add db (n=%lld)", (long long)n);
    free(x), free(x2), free(r), free(y), free(dx), free(dx2);
}

struct sx_ctx {
    float *logits, *probs;
    const int32_t *labels;
    int64_t n, C;
    float scale;
};

static double sx_obj(void *p)
{
    struct sx_ctx *c = p;
    return c->scale * pw_cpu_softmax_xent_fwd(c->logits, c->labels, c->probs, c->n, c->C);
}

ParameterizedTestParameters(grad, softmax_xent)
{
    ROW_SHAPES
    return cr_make_param_array(struct row_shape, s, sizeof s / sizeof s[0]);
}

ParameterizedTest(struct row_shape *s, grad, softmax_xent, .timeout = 60)
{
    int64_t n = s->n, C = s->d;
    float *logits = rand_f(n * C, -2, 2, 31), *probs = alloc_f(n * C);
    float *dl = alloc_f(n * C);
    int32_t *labels = rand_labels(n, C, 32);
    float scale = 1.0f / (float)(2 * n); /* as if this were half the global batch */
    pw_cpu_softmax_xent_fwd(logits, labels, probs, n, C);
    pw_cpu_softmax_xent_bwd(probs, labels, dl, n, C, scale, 0);
    struct sx_ctx c = {logits, probs, labels, n, C, scale};
    EXPECT_GRAD(FD_STEP, logits, n * C, dl, sx_obj, &c, "softmax_xent dlogits (n=%lld C=%lld)",
                (long long)n, (long long)C);
    free(logits), free(probs), free(dl), free(labels);
}

/* ---------------------------------------------------------------- forwards */

Test(forward, linear_matches_naive)
{
    static const struct lin_shape shapes[] = {
        {1, 1, 1}, {3, 7, 13}, {13, 1, 7}, {33, 257, 65}, {64, 96, 80}};
    for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        int64_t n = shapes[k].n, in = shapes[k].in, out = shapes[k].out;
        float *x = rand_f(n * in, -1, 1, 41), *w = rand_f(out * in, -1, 1, 42);
        float *b = rand_f(out, -1, 1, 43), *y = alloc_f(n * out);
        double *want = malloc((size_t)(n * out) * sizeof(double));
        double *bound = malloc((size_t)(n * out) * sizeof(double));
        cr_assert(want && bound);
        for (int use_bias = 0; use_bias < 2; use_bias++) {
            const float *bb = use_bias ? b : NULL;
            /* error scale of a dot product: Σ|x·w| + |b| */
            for (int64_t i = 0; i < n; i++)
                for (int64_t j = 0; j < out; j++) {
                    double acc = bb ? bb[j] : 0.0, mag = bb ? fabs(bb[j]) : 0.0;
                    for (int64_t p = 0; p < in; p++) {
                        double t = (double)x[i * in + p] * (double)w[j * in + p];
                        acc += t;
                        mag += fabs(t);
                    }
                    want[i * out + j] = acc;
                    bound[i * out + j] = mag;
                }
            /* stale NaN in y must not survive (no bias: GEMM with beta = 0) */
            for (int64_t i = 0; i < n * out; i++) y[i] = NAN;
            pw_cpu_linear_fwd(x, w, bb, y, n, in, out);
            char what[96];
            snprintf(what, sizeof what, "linear y (n=%lld in=%lld out=%lld bias=%d)",
                     (long long)n, (long long)in, (long long)out, use_bias);
            cr_expect(close_enough(what, y, want, bound, 1e-5, n * out), "%s mismatch", what);
        }
        free(x), free(w), free(b), free(y), free(want), free(bound);
    }
}

Test(forward, gelu_relu_match_formula)
{
    int64_t n = 1001;
    float *x = alloc_f(n), *y = alloc_f(n);
    double *want = malloc((size_t)n * sizeof(double));
    double *bound = malloc((size_t)n * sizeof(double));
    cr_assert(want && bound);
    for (int64_t i = 0; i < n; i++) x[i] = -10.0f + 20.0f * (float)i / (float)(n - 1);

    pw_cpu_gelu_fwd(x, y, n);
    for (int64_t i = 0; i < n; i++) {
        double v = x[i];
        want[i] = 0.5 * v * (1.0 + tanh(sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
        /* 1e-5 relative, 1e-7 absolute: with the tanh form, 1 + tanh(u)
         * cancels for u ≪ 0, so the left tail is accurate only to fp32's
         * absolute resolution at scale 1 (so are llm.c's and PyTorch's) */
        bound[i] = fabs(want[i]) + 1e-2;
    }
    cr_expect(close_enough("gelu y", y, want, bound, 1e-5, n));

    pw_cpu_relu_fwd(x, y, n);
    for (int64_t i = 0; i < n; i++) want[i] = x[i] > 0 ? x[i] : 0.0;
    cr_expect(close_enough("relu y", y, want, NULL, 0.0, n));

    /* NaN passes through relu so a diverging run shows in the loss */
    x[0] = NAN;
    pw_cpu_relu_fwd(x, y, 1);
    cr_expect(isnan(y[0]), "relu(NaN) should be NaN, got %g", (double)y[0]);
    free(x), free(y), free(want), free(bound);
}

/* Reference layernorm in double from the same float inputs. The contract
 * stores the mean as a float and x̂ is defined against that stored value (the
 * backward recomputes it from there), so y uses the float-rounded mean. */
static void layernorm_ref(const float *x, const float *w, const float *b, double *y,
                          double *mean, double *rstd, int64_t n, int64_t d, double eps)
{
    for (int64_t r = 0; r < n; r++) {
        double m = 0.0, v = 0.0;
        for (int64_t j = 0; j < d; j++) m += x[r * d + j];
        m /= (double)d;
        for (int64_t j = 0; j < d; j++) v += (x[r * d + j] - m) * (x[r * d + j] - m);
        v /= (double)d;
        mean[r] = m;
        rstd[r] = 1.0 / sqrt(v + eps);
        double mf = (float)m;
        for (int64_t j = 0; j < d; j++)
            y[r * d + j] = (x[r * d + j] - mf) * rstd[r] * w[j] + b[j];
    }
}

Test(forward, layernorm_matches_reference)
{
    int64_t n = 9, d = 131;
    float *x = rand_f(n * d, -1, 1, 51), *w = rand_f(d, -2, 2, 52);
    float *b = rand_f(d, -1, 1, 53);
    float *y = alloc_f(n * d), *mean = alloc_f(n), *rstd = alloc_f(n);
    double *want = malloc((size_t)(n * d) * sizeof(double));
    double *bound = malloc((size_t)(n * d) * sizeof(double));
    double wm[9], wr[9];
    cr_assert(want && bound);
    /* rows 0-2 sit on a large offset: a one-pass E[x²] − E[x]² in float
     * would lose the variance entirely */
    for (int64_t j = 0; j < 3 * d; j++) x[j] += 1.0e4f;

    pw_cpu_layernorm_fwd(x, w, b, y, mean, rstd, n, d, LN_EPS);
    layernorm_ref(x, w, b, want, wm, wr, n, d, LN_EPS);
    for (int64_t r = 0; r < n; r++)
        for (int64_t j = 0; j < d; j++)
            bound[r * d + j] = fabs(w[j]) * 4.0 + fabs(b[j]); /* |x̂| ≲ 2, w, b */
    cr_expect(close_enough("layernorm y", y, want, bound, 1e-5, n * d));
    cr_expect(close_enough("layernorm mean", mean, wm, NULL, 1e-6, n));
    cr_expect(close_enough("layernorm rstd", rstd, wr, NULL, 1e-5, n));
    free(x), free(w), free(b), free(y), free(mean), free(rstd), free(want), free(bound);
}

/* ---------------------------------------------------------------- softmax cross-entropy */

/* Σ_rows (logsumexp − logit[label]) and the probabilities, in double. */
static double xent_ref(const float *logits, const int32_t *labels, double *probs,
                       int64_t n, int64_t C)
{
    double loss = 0.0;
    for (int64_t r = 0; r < n; r++) {
        const float *l = logits + r * C;
        double m = l[0], s = 0.0;
        for (int64_t j = 1; j < C; j++) m = fmax(m, l[j]);
        for (int64_t j = 0; j < C; j++) s += exp((double)l[j] - m);
        for (int64_t j = 0; j < C; j++) probs[r * C + j] = exp((double)l[j] - m) / s;
        if (labels[r] >= 0 && labels[r] < C) loss += m + log(s) - l[labels[r]];
    }
    return loss;
}

static void check_xent(const char *what, const float *logits, const int32_t *labels,
                       int64_t n, int64_t C)
{
    float *probs = alloc_f(n * C);
    double *want = malloc((size_t)(n * C) * sizeof(double));
    double *bound = malloc((size_t)(n * C) * sizeof(double));
    cr_assert(want && bound);
    double loss = pw_cpu_softmax_xent_fwd(logits, labels, probs, n, C);
    double ref = xent_ref(logits, labels, want, n, C);
    cr_expect(isfinite(loss), "%s: loss not finite (%g)", what, loss);
    cr_expect(fabs(loss - ref) <= 1e-5 * fmax(fabs(ref), 1.0),
              "%s: loss %.12g, double reference %.12g", what, loss, ref);
    for (int64_t i = 0; i < n * C; i++) bound[i] = want[i] + 1e-7;
    cr_expect(close_enough(what, probs, want, bound, 1e-5, n * C), "%s: probs", what);
    for (int64_t r = 0; r < n; r++) {
        double s = 0.0;
        for (int64_t j = 0; j < C; j++) s += probs[r * C + j];
        cr_expect(fabs(s - 1.0) <= 1e-5, "%s: row %lld probabilities sum to %.9g", what,
                  (long long)r, s);
    }
    free(probs), free(want), free(bound);
}

Test(softmax_xent, loss_matches_double)
{
    int64_t n = 37, C = 1000;
    float *logits = rand_f(n * C, -5, 5, 61);
    int32_t *labels = rand_labels(n, C, 62);
    check_xent("softmax_xent C=1000", logits, labels, n, C);
    check_xent("softmax_xent C=7", logits, labels, 5, 7); /* labels < 1000: some out of range */
    free(logits), free(labels);
}

Test(softmax_xent, large_logits_stay_finite)
{
    int64_t n = 6, C = 33;
    float *logits = rand_f(n * C, -1.0e4f, 1.0e4f, 71);
    int32_t *labels = rand_labels(n, C, 72);
    for (int64_t j = 0; j < C; j++) logits[1 * C + j] = 1.0e4f;   /* a tie at 1e4 */
    for (int64_t j = 0; j < C; j++) logits[2 * C + j] = -1.0e4f;  /* all very negative */
    logits[3 * C + labels[3]] = -1.0e4f; /* label far below the max: loss ~2e4 */
    check_xent("softmax_xent |logits|<=1e4", logits, labels, n, C);

    float *probs = alloc_f(n * C), *dl = alloc_f(n * C);
    pw_cpu_softmax_xent_fwd(logits, labels, probs, n, C);
    pw_cpu_softmax_xent_bwd(probs, labels, dl, n, C, 1.0f / (float)n, 0);
    for (int64_t i = 0; i < n * C; i++)
        cr_expect(isfinite(dl[i]), "dlogits[%lld] = %g", (long long)i, (double)dl[i]);
    free(logits), free(labels), free(probs), free(dl);
}

Test(softmax_xent, out_of_range_labels)
{
    int64_t n = 4, C = 5;
    float *logits = rand_f(n * C, -2, 2, 81), *probs = alloc_f(n * C);
    float *dl = alloc_f(n * C);
    int32_t labels[4] = {2, -1, 5, 0};
    int32_t valid_only[2] = {2, 0};
    float *valid_logits = alloc_f(2 * C), *valid_probs = alloc_f(2 * C);
    memcpy(valid_logits, logits, (size_t)C * sizeof(float));
    memcpy(valid_logits + C, logits + 3 * C, (size_t)C * sizeof(float));

    double loss = pw_cpu_softmax_xent_fwd(logits, labels, probs, n, C);
    double valid = pw_cpu_softmax_xent_fwd(valid_logits, valid_only, valid_probs, 2, C);
    cr_expect(loss == valid, "rows with labels -1 and C must add 0: %.12g vs %.12g", loss,
              valid);

    float scale = 0.25f;
    pw_cpu_softmax_xent_bwd(probs, labels, dl, n, C, scale, 0);
    for (int64_t r = 1; r <= 2; r++)
        for (int64_t j = 0; j < C; j++)
            cr_expect(dl[r * C + j] == probs[r * C + j] * scale,
                      "row %lld (bad label): dlogits[%lld] = %g, want probs·scale = %g",
                      (long long)r, (long long)j, (double)dl[r * C + j],
                      (double)(probs[r * C + j] * scale));
    free(logits), free(probs), free(dl), free(valid_logits), free(valid_probs);
}

/* ---------------------------------------------------------------- accumulate contract */

/* A backward-input call with everything but dx and accumulate bound. */
typedef void (*bwd_fn)(void *ctx, float *dx, int accumulate);

/* accumulate = 0 must overwrite dx (stale NaN must not survive); accumulate =
 * 1 must give base + (the accumulate = 0 result), up to one rounding. */
static void check_accumulate(const char *what, bwd_fn f, void *ctx, int64_t count)
{
    float *fresh = alloc_f(count), *acc = rand_f(count, -1, 1, 91);
    float *base = copy_f(acc, count);
    double *want = malloc((size_t)count * sizeof(double));
    double *bound = malloc((size_t)count * sizeof(double));
    cr_assert(want && bound);
    for (int64_t i = 0; i < count; i++) fresh[i] = NAN;
    f(ctx, fresh, 0);
    int64_t stale = 0;
    for (int64_t i = 0; i < count; i++) stale += !isfinite(fresh[i]);
    cr_expect(stale == 0, "%s: accumulate=0 left %lld of %lld elements non-finite", what,
              (long long)stale, (long long)count);
    f(ctx, acc, 1);
    for (int64_t i = 0; i < count; i++) {
        want[i] = (double)base[i] + (double)fresh[i];
        bound[i] = fabs((double)base[i]) + fabs((double)fresh[i]);
    }
    char w2[128];
    snprintf(w2, sizeof w2, "%s accumulate=1", what);
    cr_expect(close_enough(w2, acc, want, bound, 1e-6, count), "%s: dx not added", what);
    free(fresh), free(acc), free(base), free(want), free(bound);
}

struct bwd_args {
    const float *x, *y, *w, *dy, *mean, *rstd;
    const int32_t *labels;
    int64_t n, in, out;
};

static void bwd_linear(void *p, float *dx, int a)
{
    struct bwd_args *c = p;
    pw_cpu_linear_bwd_input(c->dy, c->w, dx, c->n, c->in, c->out, a);
}
static void bwd_relu(void *p, float *dx, int a)
{
    struct bwd_args *c = p;
    pw_cpu_relu_bwd_input(c->y, c->dy, dx, c->n, a);
}
static void bwd_gelu(void *p, float *dx, int a)
{
    struct bwd_args *c = p;
    pw_cpu_gelu_bwd_input(c->x, c->dy, dx, c->n, a);
}
static void bwd_copy(void *p, float *dx, int a)
{
    struct bwd_args *c = p;
    pw_cpu_copy_grad(c->dy, dx, c->n, a);
}
static void bwd_layernorm(void *p, float *dx, int a)
{
    struct bwd_args *c = p;
    pw_cpu_layernorm_bwd_input(c->x, c->w, c->mean, c->rstd, c->dy, dx, c->n, c->in, a);
}
static void bwd_xent(void *p, float *dx, int a)
{
    struct bwd_args *c = p;
    pw_cpu_softmax_xent_bwd(c->y, c->labels, dx, c->n, c->in, 0.125f, a);
}

Test(accumulate, backward_input_overwrites_or_adds)
{
    int64_t n = 13, in = 37, out = 11;
    float *x = rand_f(n * in, -2, 2, 101), *w = rand_f(out * in, -1, 1, 102);
    float *dy_out = rand_f(n * out, -1, 1, 103), *dy = rand_f(n * in, -1, 1, 104);
    float *y = alloc_f(n * in), *mean = alloc_f(n), *rstd = alloc_f(n);
    float *lnw = rand_f(in, 0.5f, 1.5f, 105), *lnb = rand_f(in, -1, 1, 106);
    int32_t *labels = rand_labels(n, in, 107);

    struct bwd_args lin = {.dy = dy_out, .w = w, .n = n, .in = in, .out = out};
    check_accumulate("linear_bwd_input", bwd_linear, &lin, n * in);

    pw_cpu_relu_fwd(x, y, n * in);
    struct bwd_args ew = {.x = x, .y = y, .dy = dy, .n = n * in};
    check_accumulate("relu_bwd_input", bwd_relu, &ew, n * in);
    check_accumulate("gelu_bwd_input", bwd_gelu, &ew, n * in);
    check_accumulate("copy_grad", bwd_copy, &ew, n * in);

    pw_cpu_layernorm_fwd(x, lnw, lnb, y, mean, rstd, n, in, LN_EPS);
    struct bwd_args ln = {.x = x, .w = lnw, .dy = dy, .mean = mean, .rstd = rstd,
                          .n = n, .in = in};
    check_accumulate("layernorm_bwd_input", bwd_layernorm, &ln, n * in);

    pw_cpu_softmax_xent_fwd(x, labels, y, n, in);
    struct bwd_args sx = {.y = y, .labels = labels, .n = n, .in = in};
    check_accumulate("softmax_xent_bwd", bwd_xent, &sx, n * in);

    free(x), free(w), free(dy_out), free(dy), free(y), free(mean), free(rstd);
    free(lnw), free(lnb), free(labels);
}

/* Σ_r |dy[r,i]·x[r,j]| + |base|: the error scale of dw (i, j). */
static double *linear_dw_bound(const float *dy, const float *x, const float *base,
                               int64_t n, int64_t in, int64_t out)
{
    double *bound = malloc((size_t)(out * in) * sizeof(double));
    cr_assert_not_null(bound);
    for (int64_t i = 0; i < out; i++)
        for (int64_t j = 0; j < in; j++) {
            double m = fabs((double)base[i * in + j]);
            for (int64_t r = 0; r < n; r++) m += fabs((double)dy[r * out + i] * x[r * in + j]);
            bound[i * in + j] = m;
        }
    return bound;
}

Test(accumulate, backward_weight_adds)
{
    int64_t n = 9, in = 23, out = 17, d = in;
    float *x = rand_f(n * in, -1, 1, 111), *dy = rand_f(n * out, -1, 1, 112);
    float *dw0 = rand_f(out * in, -1, 1, 113), *db0 = rand_f(out, -1, 1, 114);
    float *dw = copy_f(dw0, out * in), *db = copy_f(db0, out);
    float *fw = zeros_f(out * in), *fb = zeros_f(out);
    double *want = malloc((size_t)(out * in) * sizeof(double));
    cr_assert_not_null(want);

    pw_cpu_linear_bwd_weight(dy, x, fw, fb, n, in, out);
    pw_cpu_linear_bwd_weight(dy, x, dw, db, n, in, out);
    double *bound = linear_dw_bound(dy, x, dw0, n, in, out);
    for (int64_t i = 0; i < out * in; i++) want[i] = (double)dw0[i] + fw[i];
    cr_expect(close_enough("linear dw += ", dw, want, bound, 1e-6, out * in));
    for (int64_t i = 0; i < out; i++) {
        double m = fabs((double)db0[i]);
        for (int64_t r = 0; r < n; r++) m += fabs((double)dy[r * out + i]);
        cr_expect(fabs(db[i] - ((double)db0[i] + fb[i])) <= 1e-6 * m,
                  "linear db[%lld] = %.9g, want %.9g + %.9g", (long long)i, (double)db[i],
                  (double)db0[i], (double)fb[i]);
    }
    /* db = NULL: only dw is touched */
    pw_cpu_linear_bwd_weight(dy, x, fw, NULL, n, in, out);

    /* layernorm dw/db add too */
    float *lnw = rand_f(d, 0.5f, 1.5f, 115), *lnb = rand_f(d, -1, 1, 116);
    float *y = alloc_f(n * d), *mean = alloc_f(n), *rstd = alloc_f(n);
    float *dyl = rand_f(n * d, -1, 1, 117);
    float *gw0 = rand_f(d, -1, 1, 118), *gb0 = rand_f(d, -1, 1, 119);
    float *gw = copy_f(gw0, d), *gb = copy_f(gb0, d), *hw = zeros_f(d), *hb = zeros_f(d);
    pw_cpu_layernorm_fwd(x, lnw, lnb, y, mean, rstd, n, d, LN_EPS);
    pw_cpu_layernorm_bwd_weight(x, mean, rstd, dyl, hw, hb, n, d);
    pw_cpu_layernorm_bwd_weight(x, mean, rstd, dyl, gw, gb, n, d);
    for (int64_t j = 0; j < d; j++) {
        double mw = fabs((double)gw0[j]), mb = fabs((double)gb0[j]);
        for (int64_t r = 0; r < n; r++) {
            double xh = ((double)x[r * d + j] - mean[r]) * rstd[r];
            mw += fabs(dyl[r * d + j] * xh);
            mb += fabs((double)dyl[r * d + j]);
        }
        cr_expect(fabs(gw[j] - ((double)gw0[j] + hw[j])) <= 1e-6 * mw,
                  "layernorm dw[%lld] = %.9g, want %.9g + %.9g", (long long)j,
                  (double)gw[j], (double)gw0[j], (double)hw[j]);
        cr_expect(fabs(gb[j] - ((double)gb0[j] + hb[j])) <= 1e-6 * mb,
                  "layernorm db[%lld] = %.9g, want %.9g + %.9g", (long long)j,
                  (double)gb[j], (double)gb0[j], (double)hb[j]);
    }
    free(x), free(dy), free(dw0), free(db0), free(dw), free(db), free(fw), free(fb);
    free(want), free(bound), free(lnw), free(lnb), free(y), free(mean), free(rstd);
    free(dyl), free(gw0), free(gb0), free(gw), free(gb), free(hw), free(hb);
}

/* ---------------------------------------------------------------- micro-batches */

Test(microbatch, linear_bwd_weight_split_matches_whole)
{
    int64_t n = 8, half = 4, in = 96, out = 80;
    float *x = rand_f(n * in, -1, 1, 121), *dy = rand_f(n * out, -1, 1, 122);
    float *dw0 = rand_f(out * in, -0.1f, 0.1f, 123), *db0 = rand_f(out, -0.1f, 0.1f, 124);
    float *dw_whole = copy_f(dw0, out * in), *db_whole = copy_f(db0, out);
    float *dw_split = copy_f(dw0, out * in), *db_split = copy_f(db0, out);
    double *want = malloc((size_t)(out * in) * sizeof(double));
    cr_assert_not_null(want);

    pw_cpu_linear_bwd_weight(dy, x, dw_whole, db_whole, n, in, out);
    pw_cpu_linear_bwd_weight(dy, x, dw_split, db_split, half, in, out);
    pw_cpu_linear_bwd_weight(dy + half * out, x + half * in, dw_split, db_split, n - half,
                             in, out);
    double *bound = linear_dw_bound(dy, x, dw0, n, in, out);
    for (int64_t i = 0; i < out * in; i++) want[i] = dw_whole[i];
    cr_expect(close_enough("dw 8 rows vs 4+4", dw_split, want, bound, 1e-6, out * in));
    /* db adds row by row in row order, so the split is exact */
    cr_expect(same_bits("db 8 rows vs 4+4", db_split, db_whole, out));
    free(x), free(dy), free(dw0), free(db0), free(dw_whole), free(db_whole);
    free(dw_split), free(db_split), free(want), free(bound);
}

Test(microbatch, layernorm_bwd_weight_split_is_exact)
{
    int64_t n = 8, half = 4, d = 37;
    float *x = rand_f(n * d, -1, 1, 131), *dy = rand_f(n * d, -1, 1, 132);
    float *w = rand_f(d, 0.5f, 1.5f, 133), *b = rand_f(d, -1, 1, 134);
    float *y = alloc_f(n * d), *mean = alloc_f(n), *rstd = alloc_f(n);
    float *dw1 = zeros_f(d), *db1 = zeros_f(d), *dw2 = zeros_f(d), *db2 = zeros_f(d);
    pw_cpu_layernorm_fwd(x, w, b, y, mean, rstd, n, d, LN_EPS);
    pw_cpu_layernorm_bwd_weight(x, mean, rstd, dy, dw1, db1, n, d);
    pw_cpu_layernorm_bwd_weight(x, mean, rstd, dy, dw2, db2, half, d);
    pw_cpu_layernorm_bwd_weight(x + half * d, mean + half, rstd + half, dy + half * d, dw2,
                                db2, n - half, d);
    cr_expect(same_bits("layernorm dw 8 vs 4+4", dw2, dw1, d));
    cr_expect(same_bits("layernorm db 8 vs 4+4", db2, db1, d));
    free(x), free(dy), free(w), free(b), free(y), free(mean), free(rstd);
    free(dw1), free(db1), free(dw2), free(db2);
}

/* ---------------------------------------------------------------- determinism */

Test(determinism, same_inputs_same_bits)
{
    int64_t n = 64, in = 96, out = 80, d = out;
    float *x = rand_f(n * in, -2, 2, 141), *w = rand_f(out * in, -1, 1, 142);
    float *b = rand_f(out, -1, 1, 143), *dy = rand_f(n * out, -1, 1, 144);
    float *lnw = rand_f(d, 0.5f, 1.5f, 145);
    int32_t *labels = rand_labels(n, d, 146);
    float *a[2], *m[2], *s[2], *g[2], *h[2];
    double loss[2];
    for (int k = 0; k < 2; k++) {
        a[k] = alloc_f(n * out), m[k] = alloc_f(n), s[k] = alloc_f(n);
        g[k] = zeros_f(out * in), h[k] = zeros_f(n * in);
    }
#define TWICE(what, len, call)                                                \
    do {                                                                      \
        for (int k = 0; k < 2; k++) { call; }                                 \
        cr_expect(same_bits(what, a[0], a[1], (len)), "%s differs between runs", what); \
    } while (0)

    TWICE("linear_fwd", n * out, pw_cpu_linear_fwd(x, w, b, a[k], n, in, out));
    TWICE("relu_fwd", n * out, pw_cpu_relu_fwd(dy, a[k], n * out));
    TWICE("relu_bwd", n * out, pw_cpu_relu_bwd_input(dy, dy, a[k], n * out, 0));
    TWICE("gelu_fwd", n * out, pw_cpu_gelu_fwd(dy, a[k], n * out));
    TWICE("gelu_bwd", n * out, pw_cpu_gelu_bwd_input(dy, dy, a[k], n * out, 0));
    TWICE("add_fwd", n * out, pw_cpu_add_fwd(dy, dy, a[k], n * out));
    TWICE("layernorm_fwd", n * d, pw_cpu_layernorm_fwd(dy, lnw, b, a[k], m[k], s[k], n, d, LN_EPS));
    cr_expect(same_bits("layernorm mean", m[0], m[1], n));
    cr_expect(same_bits("layernorm rstd", s[0], s[1], n));
    TWICE("layernorm_bwd_input", n * d,
          pw_cpu_layernorm_bwd_input(dy, lnw, m[0], s[0], x, a[k], n, d, 0));
    TWICE("softmax_xent_fwd", n * d,
          loss[k] = pw_cpu_softmax_xent_fwd(dy, labels, a[k], n, d));
    cr_expect(memcmp(&loss[0], &loss[1], sizeof(double)) == 0, "softmax_xent loss differs");
    TWICE("softmax_xent_bwd", n * d,
          pw_cpu_softmax_xent_bwd(dy, labels, a[k], n, d, 0.5f, 0));
#undef TWICE
    for (int k = 0; k < 2; k++) {
        pw_cpu_linear_bwd_input(dy, w, h[k], n, in, out, 0);
        pw_cpu_linear_bwd_weight(dy, x, g[k], NULL, n, in, out);
    }
    cr_expect(same_bits("linear_bwd_input", h[0], h[1], n * in));
    cr_expect(same_bits("linear_bwd_weight", g[0], g[1], out * in));
    for (int k = 0; k < 2; k++) free(a[k]), free(m[k]), free(s[k]), free(g[k]), free(h[k]);
    free(x), free(w), free(b), free(dy), free(lnw), free(labels);
}

/* ---------------------------------------------------------------- edges */

Test(edges, empty_dimensions)
{
    float b[3] = {1, 2, 3}, y[6], dx[6], dw[6] = {0}, db[3] = {0};
    float x[6] = {1, 2, 3, 4, 5, 6};
    /* in = 0: y = b on every row */
    pw_cpu_linear_fwd(x, x, b, y, 2, 0, 3);
    for (int i = 0; i < 6; i++) cr_expect(y[i] == b[i % 3], "y[%d] = %g", i, (double)y[i]);
    /* out = 0: dx = 0 when overwriting */
    for (int i = 0; i < 6; i++) dx[i] = NAN;
    pw_cpu_linear_bwd_input(x, x, dx, 2, 3, 0, 0);
    for (int i = 0; i < 6; i++) cr_expect(dx[i] == 0.0f, "dx[%d] = %g", i, (double)dx[i]);
    /* n = 0: nothing is touched */
    pw_cpu_linear_bwd_weight(x, x, dw, db, 0, 2, 3);
    for (int i = 0; i < 6; i++) cr_expect(dw[i] == 0.0f);
    for (int i = 0; i < 3; i++) cr_expect(db[i] == 0.0f);
}

Test(threads, set_and_get)
{
    int before = pw_cpu_get_threads();
    cr_expect(before >= 1, "BLAS reports %d threads", before);
    pw_cpu_set_threads(1);
    cr_expect_eq(pw_cpu_get_threads(), 1);
    pw_cpu_set_threads(0); /* clamped to 1 */
    cr_expect_eq(pw_cpu_get_threads(), 1);
    pw_cpu_set_threads(before);
    cr_expect_eq(pw_cpu_get_threads(), before);
}
