/* pipewright — the CPU kernels that run on the thread team (element-wise,
 * row and column sweeps, the optimizer, the non-finite check) give the same
 * bits with 1, 2, 3 and 4 threads, on shapes that are not multiples of
 * their ranges, and the same bits as the sequential definition:
 *   - element-wise kernels: each element alone (the kernel called on one
 *     element at a time);
 *   - row kernels (layernorm, softmax cross-entropy): each row alone;
 *   - reductions over rows (bias, layernorm, embedding and position
 *     gradients): one call per row, in row order (the micro-batch rule);
 *   - the optimizer: pw_optim_update over the whole tensor on this thread.
 * Each sensitive reduction also shows that another order gives other bits
 * on these inputs, so the comparisons can fail. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "stages/ops/backend.h"
#include "stages/ops/cpu/gemm.h"
#include "stages/ops/cpu/ops.h"
#include "tests/tsan_criterion.h" /* runs under ThreadSanitizer (scripts/test.sh) */

#define MAX_THREADS 4

static uint64_t rng_state;

static float rnd(float scale)
{
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return (float)((double)(rng_state >> 40) / (double)(1 << 24) - 0.5) * scale;
}

static float *vec(int64_t n, float scale)
{
    float *v = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    cr_assert_not_null(v);
    for (int64_t i = 0; i < n; i++) v[i] = rnd(scale);
    return v;
}

static float *copy_of(const float *v, int64_t n)
{
    float *c = malloc((size_t)n * sizeof(float));
    cr_assert_not_null(c);
    memcpy(c, v, (size_t)n * sizeof(float));
    return c;
}

static void expect_bits(const float *got, const float *want, int64_t n, const char *what, int th)
{
    int64_t first = -1, diff = 0;
    for (int64_t i = 0; i < n; i++)
        if (memcmp(&got[i], &want[i], sizeof(float)) != 0) {
            if (first < 0) first = i;
            diff++;
        }
    cr_expect_eq(diff, 0, "%s, %d threads: %lld of %lld elements differ (first at %lld: %.9g vs %.9g)",
                 what, th, (long long)diff, (long long)n, (long long)first,
                 first >= 0 ? got[first] : 0.0, first >= 0 ? want[first] : 0.0);
}

static void expect_differs(const float *a, const float *b, int64_t n, const char *what)
{
    cr_assert(memcmp(a, b, (size_t)n * sizeof(float)) != 0,
              "%s: another summation order gives the same bits on these inputs, so the "
              "comparison proves nothing", what);
}

static int saved_threads;
static void setup(void)
{
    rng_state = 88172645463325252ull;
    saved_threads = pw_cpu_get_threads();
}
static void teardown(void) { pw_cpu_set_threads(saved_threads); }

/* Several ranges, and a ragged last one: n is no multiple of PW_CPU_GRAIN
 * nor of the vector width. */
#define N_ELEM (5 * PW_CPU_GRAIN + 13)

Test(cpu_threads, elementwise, .init = setup, .fini = teardown, .timeout = 120)
{
    const int64_t n = N_ELEM;
    float *x = vec(n, 8.0f), *x2 = vec(n, 8.0f), *dy = vec(n, 1.0f), *base = vec(n, 1.0f);
    uint8_t *mask = malloc((size_t)n), *mask_ref = malloc((size_t)n);
    float *ref[8], *got = malloc((size_t)n * sizeof(float));
    for (int k = 0; k < 8; k++) ref[k] = copy_of(base, n);
    pw_cpu_set_threads(1);
    for (int64_t i = 0; i < n; i++) { /* one element at a time: no range is ever split */
        pw_cpu_relu_fwd(x + i, ref[0] + i, 1);
        pw_cpu_relu_bwd_input(x + i, dy + i, ref[1] + i, 1, 1);
        pw_cpu_gelu_fwd(x + i, ref[2] + i, 1);
        pw_cpu_gelu_bwd_input(x + i, dy + i, ref[3] + i, 1, 1);
        pw_cpu_add_fwd(x + i, x2 + i, ref[4] + i, 1);
        pw_cpu_copy_grad(dy + i, ref[5] + i, 1, 1);
    }
    /* Dropout: sample s of 7 elements has random indices (first + s)·7 + j. */
    const int64_t numel = 7, batch = n / numel;
    for (int64_t b = 0; b < batch; b++)
        pw_cpu_dropout_fwd(x + b * numel, ref[6] + b * numel, mask_ref + b * numel, 1, numel, 0.3f,
                           12345, 1000 + b);
    for (int64_t i = 0; i < batch * numel; i++)
        pw_cpu_dropout_bwd_input(mask_ref + i, dy + i, ref[7] + i, 1, 0.3f, 1);
    for (int th = 1; th <= MAX_THREADS; th++) {
        pw_cpu_set_threads(th);
        memcpy(got, base, (size_t)n * sizeof(float));
        pw_cpu_relu_fwd(x, got, n);
        expect_bits(got, ref[0], n, "relu_fwd", th);
        memcpy(got, base, (size_t)n * sizeof(float));
        pw_cpu_relu_bwd_input(x, dy, got, n, 1);
        expect_bits(got, ref[1], n, "relu_bwd_input (accumulate)", th);
        pw_cpu_gelu_fwd(x, got, n);
        expect_bits(got, ref[2], n, "gelu_fwd", th);
        memcpy(got, base, (size_t)n * sizeof(float));
        pw_cpu_gelu_bwd_input(x, dy, got, n, 1);
        expect_bits(got, ref[3], n, "gelu_bwd_input (accumulate)", th);
        pw_cpu_add_fwd(x, x2, got, n);
        expect_bits(got, ref[4], n, "add_fwd", th);
        memcpy(got, base, (size_t)n * sizeof(float));
        pw_cpu_copy_grad(dy, got, n, 1);
        expect_bits(got, ref[5], n, "copy_grad (accumulate)", th);
        memset(mask, 2, (size_t)n);
        pw_cpu_dropout_fwd(x, got, mask, batch, numel, 0.3f, 12345, 1000);
        expect_bits(got, ref[6], batch * numel, "dropout_fwd", th);
        cr_expect(memcmp(mask, mask_ref, (size_t)(batch * numel)) == 0, "dropout mask, %d threads", th);
        memcpy(got, base, (size_t)n * sizeof(float));
        pw_cpu_dropout_bwd_input(mask_ref, dy, got, batch * numel, 0.3f, 1);
        expect_bits(got, ref[7], batch * numel, "dropout_bwd_input (accumulate)", th);
    }
    for (int k = 0; k < 8; k++) free(ref[k]);
    free(got); free(x); free(x2); free(dy); free(base); free(mask); free(mask_ref);
}

/* Rows of d = 300 (several rows per range) and of d = 5000 (a row longer
 * than a range: one row per range). */
Test(cpu_threads, layernorm_rows_and_columns, .init = setup, .fini = teardown, .timeout = 120)
{
    static const int64_t shapes[][2] = {{157, 300}, {5, 5000}};
    for (int si = 0; si < 2; si++) {
        const int64_t n = shapes[si][0], d = shapes[si][1], nd = n * d;
        float *x = vec(nd, 4.0f), *w = vec(d, 2.0f), *b = vec(d, 1.0f), *dy = vec(nd, 1.0f);
        float *y_ref = vec(nd, 1), *mean_ref = vec(n, 1), *rstd_ref = vec(n, 1), *dx0 = vec(nd, 1.0f);
        float *dx_ref = copy_of(dx0, nd), *dw0 = vec(d, 1.0f), *db0 = vec(d, 1.0f);
        float *dw_ref = copy_of(dw0, d), *db_ref = copy_of(db0, d);
        pw_cpu_set_threads(1);
        for (int64_t r = 0; r < n; r++) {
            pw_cpu_layernorm_fwd(x + r * d, w, b, y_ref + r * d, mean_ref + r, rstd_ref + r, 1, d, 1e-5f);
            pw_cpu_layernorm_bwd_input(x + r * d, w, mean_ref + r, rstd_ref + r, dy + r * d,
                                       dx_ref + r * d, 1, d, 1);
            pw_cpu_layernorm_bwd_weight(x + r * d, mean_ref + r, rstd_ref + r, dy + r * d, dw_ref,
                                        db_ref, 1, d);
        }
        /* The column sums in two halves added afterwards: other bits. */
        float *dw_split = copy_of(dw0, d), *db_split = copy_of(db0, d), *dw_h = vec(d, 0), *db_h = vec(d, 0);
        memset(dw_h, 0, (size_t)d * sizeof(float));
        memset(db_h, 0, (size_t)d * sizeof(float));
        pw_cpu_layernorm_bwd_weight(x, mean_ref, rstd_ref, dy, dw_split, db_split, n / 2, d);
        pw_cpu_layernorm_bwd_weight(x + n / 2 * d, mean_ref + n / 2, rstd_ref + n / 2, dy + n / 2 * d,
                                    dw_h, db_h, n - n / 2, d);
        for (int64_t c = 0; c < d; c++) dw_split[c] += dw_h[c];
        expect_differs(dw_split, dw_ref, d, "layernorm dw");
        float *y = vec(nd, 1), *mean = vec(n, 1), *rstd = vec(n, 1), *dx = vec(nd, 1), *dw = vec(d, 1), *db = vec(d, 1);
        for (int th = 1; th <= MAX_THREADS; th++) {
            pw_cpu_set_threads(th);
            pw_cpu_layernorm_fwd(x, w, b, y, mean, rstd, n, d, 1e-5f);
            expect_bits(y, y_ref, nd, "layernorm_fwd y", th);
            expect_bits(mean, mean_ref, n, "layernorm_fwd mean", th);
            expect_bits(rstd, rstd_ref, n, "layernorm_fwd rstd", th);
            memcpy(dx, dx0, (size_t)nd * sizeof(float));
            pw_cpu_layernorm_bwd_input(x, w, mean, rstd, dy, dx, n, d, 1);
            expect_bits(dx, dx_ref, nd, "layernorm_bwd_input", th);
            memcpy(dw, dw0, (size_t)d * sizeof(float));
            memcpy(db, db0, (size_t)d * sizeof(float));
            pw_cpu_layernorm_bwd_weight(x, mean, rstd, dy, dw, db, n, d);
            expect_bits(dw, dw_ref, d, "layernorm_bwd_weight dw", th);
            expect_bits(db, db_ref, d, "layernorm_bwd_weight db", th);
        }
        free(x); free(w); free(b); free(dy); free(y_ref); free(mean_ref); free(rstd_ref); free(dx0);
        free(dx_ref); free(dw0); free(db0); free(dw_ref); free(db_ref); free(dw_split); free(db_split);
        free(dw_h); free(db_h); free(y); free(mean); free(rstd); free(dx); free(dw); free(db);
    }
}

/* The bias gradient of a linear layer, and the embeddings' weight
 * gradients: column ranges, every row in order. */
Test(cpu_threads, column_reductions, .init = setup, .fini = teardown, .timeout = 120)
{
    const int64_t n = 203, out = 1001, vocab = 37, T = 29, batch = 7, d = 67;
    float *dy = vec(n * out, 1.0f), *db0 = vec(out, 1.0f), *db_ref = copy_of(db0, out);
    pw_cpu_set_threads(1);
    for (int64_t r = 0; r < n; r++) pw_cpu_linear_bwd_weight(dy + r * out, NULL, NULL, db_ref, 1, 0, out);
    float *db_split = copy_of(db0, out), *half = vec(out, 0);
    memset(half, 0, (size_t)out * sizeof(float));
    pw_cpu_linear_bwd_weight(dy, NULL, NULL, db_split, n / 2, 0, out);
    pw_cpu_linear_bwd_weight(dy + n / 2 * out, NULL, NULL, half, n - n / 2, 0, out);
    for (int64_t c = 0; c < out; c++) db_split[c] += half[c];
    expect_differs(db_split, db_ref, out, "linear db");

    /* Embedding: n tokens over a small vocabulary (rows repeat often), one
     * out of range (dropped). */
    int32_t *tok = malloc((size_t)n * sizeof *tok);
    for (int64_t r = 0; r < n; r++) tok[r] = (int32_t)((r * 7 + r / 3) % vocab);
    tok[n / 2] = (int32_t)vocab;
    float *ey = vec(n * d, 1.0f), *ew0 = vec(vocab * d, 1.0f), *ew_ref = copy_of(ew0, vocab * d);
    for (int64_t r = 0; r < n; r++) pw_cpu_embedding_bwd_weight(tok + r, ey + r * d, ew_ref, 1, vocab, d);
    /* Position embedding: batch samples of T × d. */
    float *py = vec(batch * T * d, 1.0f), *pw0 = vec(T * d, 1.0f), *pw_ref = copy_of(pw0, T * d);
    for (int64_t b = 0; b < batch; b++) pw_cpu_pos_embedding_bwd_weight(py + b * T * d, pw_ref, 1, T, d);

    float *db = vec(out, 0), *ew = vec(vocab * d, 0), *pw = vec(T * d, 0);
    for (int th = 1; th <= MAX_THREADS; th++) {
        pw_cpu_set_threads(th);
        memcpy(db, db0, (size_t)out * sizeof(float));
        pw_cpu_linear_bwd_weight(dy, NULL, NULL, db, n, 0, out);
        expect_bits(db, db_ref, out, "linear_bwd_weight db", th);
        memcpy(ew, ew0, (size_t)(vocab * d) * sizeof(float));
        pw_cpu_embedding_bwd_weight(tok, ey, ew, n, vocab, d);
        expect_bits(ew, ew_ref, vocab * d, "embedding_bwd_weight", th);
        memcpy(pw, pw0, (size_t)(T * d) * sizeof(float));
        pw_cpu_pos_embedding_bwd_weight(py, pw, batch, T, d);
        expect_bits(pw, pw_ref, T * d, "pos_embedding_bwd_weight", th);
    }
    free(dy); free(db0); free(db_ref); free(db_split); free(half); free(tok); free(ey); free(ew0);
    free(ew_ref); free(py); free(pw0); free(pw_ref); free(db); free(ew); free(pw);
}

/* Softmax cross-entropy: more rows than one block of the forward (the
 * loss is summed over blocks in row order), some labels out of range. */
Test(cpu_threads, softmax_xent, .init = setup, .fini = teardown, .timeout = 120)
{
    const int64_t n = 1300, C = 97;
    float *logits = vec(n * C, 12.0f), *p_ref = vec(n * C, 1), *p = vec(n * C, 1);
    int32_t *lab = malloc((size_t)n * sizeof *lab);
    for (int64_t r = 0; r < n; r++) lab[r] = (int32_t)((r * 31) % (C + 3)) - 1; /* -1 and C.. too */
    pw_cpu_set_threads(1);
    double loss_ref = 0.0;
    int64_t correct_ref = 0;
    for (int64_t r = 0; r < n; r++) {
        int64_t c;
        loss_ref += pw_cpu_softmax_xent_fwd_count(logits + r * C, lab + r, p_ref + r * C, 1, C, &c);
        correct_ref += c;
    }
    float *d0 = vec(n * C, 1.0f), *d_ref = copy_of(d0, n * C), *dl = vec(n * C, 1);
    for (int64_t r = 0; r < n; r++)
        pw_cpu_softmax_xent_bwd(p_ref + r * C, lab + r, d_ref + r * C, 1, C, 0.01f, 1);
    /* Summed as two halves: other bits (the comparison below can fail). */
    double a = pw_cpu_softmax_xent_fwd(logits, lab, p, n / 2, C);
    double b = pw_cpu_softmax_xent_fwd(logits + n / 2 * C, lab + n / 2, p + n / 2 * C, n - n / 2, C);
    cr_assert(memcmp(&(double){a + b}, &loss_ref, sizeof(double)) != 0,
              "the loss summed in two halves has the row-order bits: the check proves nothing");
    for (int th = 1; th <= MAX_THREADS; th++) {
        pw_cpu_set_threads(th);
        int64_t correct = -1;
        double loss = pw_cpu_softmax_xent_fwd_count(logits, lab, p, n, C, &correct);
        cr_expect(memcmp(&loss, &loss_ref, sizeof(double)) == 0, "loss, %d threads: %.17g vs %.17g", th,
                  loss, loss_ref);
        cr_expect_eq(correct, correct_ref, "correct rows, %d threads", th);
        expect_bits(p, p_ref, n * C, "softmax probabilities", th);
        memcpy(dl, d0, (size_t)(n * C) * sizeof(float));
        pw_cpu_softmax_xent_bwd(p, lab, dl, n, C, 0.01f, 1);
        expect_bits(dl, d_ref, n * C, "softmax_xent_bwd", th);
    }
    cr_assert_gt(correct_ref, 0);
    free(logits); free(p_ref); free(p); free(lab); free(d0); free(d_ref); free(dl);
}

/* The CPU backend's optimizer slots (ranges on the team; one also clears
 * the gradient) against pw_optim_update over the whole tensor, SGD with
 * momentum and AdamW, three steps each. */
Test(cpu_threads, optimizer, .init = setup, .fini = teardown, .timeout = 120)
{
    const int64_t n = N_ELEM;
    const pw_backend_i *be = &pw_backend_cpu_i;
    for (int kind = 0; kind < 2; kind++) {
        pw_optim_config c = pw_optim_defaults(kind ? PW_OPTIM_ADAMW : PW_OPTIM_SGD);
        c.weight_decay = 0.01f;
        const int sf = pw_optim_state_floats(c.kind);
        float *p0 = vec(n, 1.0f), *g = vec(n, 0.1f);
        float *p_ref = copy_of(p0, n), *s_ref = vec(sf * n, 0);
        memset(s_ref, 0, (size_t)(sf * n) * sizeof(float));
        pw_cpu_set_threads(1);
        for (int step = 1; step <= 3; step++) pw_optim_update(&c, step, p_ref, g, s_ref, n, 1);
        float *p = vec(n, 0), *s = vec(sf * n, 0), *gz = vec(n, 0);
        for (int th = 1; th <= MAX_THREADS; th++) {
            pw_cpu_set_threads(th);
            memcpy(p, p0, (size_t)n * sizeof(float));
            memset(s, 0, (size_t)(sf * n) * sizeof(float));
            for (int step = 1; step <= 3; step++)
                cr_assert_eq(be->optim_update(NULL, &c, step, p, g, s, n, 1), PW_OK);
            expect_bits(p, p_ref, n, kind ? "adamw parameters" : "sgd parameters", th);
            expect_bits(s, s_ref, sf * n, kind ? "adamw state" : "sgd momentum", th);
            /* optim_update_zero: the same update, and the gradient cleared. */
            memcpy(p, p0, (size_t)n * sizeof(float));
            memset(s, 0, (size_t)(sf * n) * sizeof(float));
            for (int step = 1; step <= 3; step++) {
                memcpy(gz, g, (size_t)n * sizeof(float));
                cr_assert_eq(be->optim_update_zero(NULL, &c, step, p, gz, s, n, 1), PW_OK);
                int64_t nonzero = 0;
                for (int64_t i = 0; i < n; i++) nonzero += gz[i] != 0.0f || signbit(gz[i]);
                cr_expect_eq(nonzero, 0, "optim_update_zero left %lld gradient elements", (long long)nonzero);
            }
            expect_bits(p, p_ref, n, kind ? "adamw parameters (zeroing)" : "sgd parameters (zeroing)", th);
            expect_bits(s, s_ref, sf * n, kind ? "adamw state (zeroing)" : "sgd momentum (zeroing)", th);
        }
        free(p0); free(g); free(p_ref); free(s_ref); free(p); free(s); free(gz);
    }
}

/* The non-finite check names the first array with an infinity or a NaN,
 * wherever it sits in the array, with any team. */
Test(cpu_threads, find_nonfinite, .init = setup, .fini = teardown, .timeout = 120)
{
    const int64_t sizes[3] = {17, 9 * PW_CPU_GRAIN + 3, 4 * PW_CPU_GRAIN + 1};
    float *g[3];
    for (int i = 0; i < 3; i++) g[i] = vec(sizes[i], 100.0f);
    const struct { int array; int64_t at; float v; int want; } cases[] = {
        {-1, 0, 0.0f, -1},
        {1, 9 * PW_CPU_GRAIN + 2, INFINITY, 1},
        {1, 5 * PW_CPU_GRAIN + 7, NAN, 1},
        {2, 0, -INFINITY, 2},
        {0, 16, NAN, 0},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++)
        for (int th = 1; th <= MAX_THREADS; th++) {
            pw_cpu_set_threads(th);
            float old = 0.0f;
            if (cases[k].array >= 0) {
                old = g[cases[k].array][cases[k].at];
                g[cases[k].array][cases[k].at] = cases[k].v;
            }
            int bad = -7;
            cr_assert_eq(pw_backend_cpu_i.find_nonfinite(NULL, g, sizes, 3, &bad), PW_OK);
            cr_expect_eq(bad, cases[k].want, "case %zu, %d threads: %d, want %d", k, th, bad, cases[k].want);
            if (cases[k].array >= 0) g[cases[k].array][cases[k].at] = old;
        }
    for (int i = 0; i < 3; i++) free(g[i]);
}

/* Row-wise copies: embedding and position embedding forward. */
Test(cpu_threads, embedding_forward, .init = setup, .fini = teardown, .timeout = 120)
{
    const int64_t n = 301, vocab = 50, d = 83, batch = 5, T = 61;
    int32_t *tok = malloc((size_t)n * sizeof *tok);
    for (int64_t r = 0; r < n; r++) tok[r] = (int32_t)(r % (vocab + 2)) - 1; /* -1 and vocab: zero rows */
    float *w = vec(vocab * d, 1.0f), *y_ref = vec(n * d, 1), *y = vec(n * d, 1);
    float *x = vec(batch * T * d, 1.0f), *pw = vec(T * d, 1.0f), *py_ref = vec(batch * T * d, 1);
    float *py = vec(batch * T * d, 1);
    pw_cpu_set_threads(1);
    for (int64_t r = 0; r < n; r++) pw_cpu_embedding_fwd(tok + r, w, y_ref + r * d, 1, vocab, d);
    for (int64_t b = 0; b < batch; b++) pw_cpu_pos_embedding_fwd(x + b * T * d, pw, py_ref + b * T * d, 1, T, d);
    for (int th = 1; th <= MAX_THREADS; th++) {
        pw_cpu_set_threads(th);
        pw_cpu_embedding_fwd(tok, w, y, n, vocab, d);
        expect_bits(y, y_ref, n * d, "embedding_fwd", th);
        pw_cpu_pos_embedding_fwd(x, pw, py, batch, T, d);
        expect_bits(py, py_ref, batch * T * d, "pos_embedding_fwd", th);
    }
    free(tok); free(w); free(y_ref); free(y); free(x); free(pw); free(py_ref); free(py);
}
