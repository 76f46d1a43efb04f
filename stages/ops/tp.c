/* pipewright — tensor-parallel ops on the CPU (tp.h): each rank's part is the
 * CPU reference kernel (stages/ops/cpu/ops.h) on its slice, the parts meet
 * in the group's tree all-reduce (runtime/collective.h). */
#include "stages/ops/tp.h"

#include <math.h>
#include <string.h>

#include "runtime/trace.h" /* pw_now_ns */
#include "stages/ops/cpu/ops.h"

pw_status pw_tp_allreduce(const pw_tp *tp, float *x, int64_t n)
{
    if (tp->size <= 1) return PW_OK;
    pw_span sp = {x, n};
    const int64_t t0 = tp->on_sum ? pw_now_ns() : 0;
    pw_status st = pw_coll_allreduce(&tp->coll, &sp, 1, tp->abort);
    if (tp->on_sum && st == PW_OK) tp->on_sum(tp->on_sum_arg, t0, pw_now_ns(), n * (int64_t)sizeof(float));
    return st;
}

double pw_tp_tree_sum_d(double *v, int T)
{
    if (T <= 0) return 0.0;
    for (int w = 1; w < T; w *= 2)
        for (int a = 0; a + w < T; a += 2 * w) v[a] = v[a] + v[a + w];
    return v[0];
}

/* ------------------------------------------------------ column-parallel */

void pw_tp_col_linear_fwd(const float *x, const float *w_k, const float *b_k, float *y_k, int64_t n,
                          int64_t in, int64_t out_k)
{
    pw_cpu_linear_fwd(x, w_k, b_k, y_k, n, in, out_k);
}

pw_status pw_tp_col_linear_bwd_input(const pw_tp *tp, const float *dy_k, const float *w_k, float *dx,
                                     int64_t n, int64_t in, int64_t out_k)
{
    pw_cpu_linear_bwd_input(dy_k, w_k, dx, n, in, out_k, 0);
    return pw_tp_allreduce(tp, dx, n * in);
}

void pw_tp_col_linear_bwd_weight(const float *dy_k, const float *x, float *dw_k, float *db_k, int64_t n,
                                 int64_t in, int64_t out_k)
{
    pw_cpu_linear_bwd_weight(dy_k, x, dw_k, db_k, n, in, out_k);
}

/* --------------------------------------------------------- row-parallel */

pw_status pw_tp_row_linear_fwd(const pw_tp *tp, const float *x_k, const float *w_k, const float *b,
                               float *y, int64_t n, int64_t in_k, int64_t out)
{
    pw_cpu_linear_fwd(x_k, w_k, tp->rank == 0 ? b : NULL, y, n, in_k, out);
    return pw_tp_allreduce(tp, y, n * out);
}

void pw_tp_row_linear_bwd_input(const float *dy, const float *w_k, float *dx_k, int64_t n, int64_t in_k,
                                int64_t out, int accumulate)
{
    pw_cpu_linear_bwd_input(dy, w_k, dx_k, n, in_k, out, accumulate);
}

void pw_tp_row_linear_bwd_weight(const float *dy, const float *x_k, float *dw_k, float *db, int64_t n,
                                 int64_t in_k, int64_t out)
{
    pw_cpu_linear_bwd_weight(dy, x_k, dw_k, db, n, in_k, out);
}

/* ----------------------------------------------- vocabulary-parallel embedding */

pw_status pw_tp_embedding_fwd(const pw_tp *tp, const int32_t *tokens, const float *w_k, float *y, int64_t n,
                              int64_t vocab, int64_t d)
{
    int64_t lo, hi;
    pw_tp_range(vocab, tp->size, tp->rank, &lo, &hi);
    for (int64_t r = 0; r < n; r++) {
        const int64_t t = tokens[r];
        if (t >= lo && t < hi) memcpy(y + r * d, w_k + (t - lo) * d, (size_t)d * sizeof(float));
        else memset(y + r * d, 0, (size_t)d * sizeof(float));
    }
    return pw_tp_allreduce(tp, y, n * d);
}

void pw_tp_embedding_bwd_weight(const pw_tp *tp, const int32_t *tokens, const float *dy, float *dw_k,
                                int64_t n, int64_t vocab, int64_t d)
{
    int64_t lo, hi;
    pw_tp_range(vocab, tp->size, tp->rank, &lo, &hi);
    for (int64_t r = 0; r < n; r++) {
        const int64_t t = tokens[r];
        if (t < lo || t >= hi) continue;
        float *dst = dw_k + (t - lo) * d;
        const float *src = dy + r * d;
        for (int64_t c = 0; c < d; c++) dst[c] += src[c];
    }
}

/* ------------------------------------------ vocabulary-parallel cross-entropy */

/* Σ v in double in the CPU kernels' lane scheme (stages/ops/cpu/ops.c,
 * sum_d: 8 lanes, then the tail), so that T = 1 gives the unsplit op's bits. */
#define LANES 8
static double sum_lanes(const float *v, int64_t d)
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

/* What a rank tells the others per row (floats, at [row][rank][..]). */
enum { XM = 0, XS_HI, XS_LO, XZ, XBEST, XN };

pw_status pw_tp_xent_fwd(const pw_tp *tp, const float *logits_k, const int32_t *labels, float *probs_k,
                         float *scratch, int64_t n, int64_t C, double *loss, int64_t *correct)
{
    const int T = tp->size, k = tp->rank;
    int64_t lo, hi;
    pw_tp_range(C, T, k, &lo, &hi);
    const int64_t Ck = hi - lo;
    *loss = 0.0;
    if (correct) *correct = 0;
    if (C <= 0) return PW_OK;
    if (T > 1) memset(scratch, 0, (size_t)pw_tp_xent_scratch(n, T) * sizeof(float));

    for (int64_t r = 0; r < n; r++) {
        const float *lr = logits_k + r * Ck;
        float *pr = probs_k + r * Ck;
        float m = -INFINITY, best = -1.0f;
        double s = 0.0;
        if (Ck > 0) {
            int64_t b = 0;
            for (int64_t c = 1; c < Ck; c++)
                if (lr[c] > lr[b]) b = c;
            m = lr[b];
            best = (float)(lo + b);
            for (int64_t c = 0; c < Ck; c++) pr[c] = expf(lr[c] - m);
            s = sum_lanes(pr, Ck);
        }
        if (T == 1) {
            /* the unsplit op's row, in its order, the normaliser in double */
            const int32_t lab = labels[r];
            const int ok = lab >= 0 && (int64_t)lab < C;
            float inv = (float)(1.0 / s);
            for (int64_t c = 0; c < Ck; c++) pr[c] *= inv;
            if (ok) *loss += ((double)m + log(s)) - (double)lr[lab];
            if (correct && (int64_t)best == lab) (*correct)++;
            continue;
        }
        float *mine = scratch + (r * T + k) * XN;
        const float s_hi = (float)s;
        mine[XM] = m;
        mine[XS_HI] = s_hi;
        mine[XS_LO] = (float)(s - (double)s_hi);
        const int32_t lab = labels[r];
        mine[XZ] = (lab >= lo && lab < hi) ? lr[lab - lo] : 0.0f;
        mine[XBEST] = best;
    }
    if (T == 1) return PW_OK;

    /* The all-gather: every rank's numbers in its own place, zeros elsewhere,
     * summed (exact). */
    PW_CHECK(pw_tp_allreduce(tp, scratch, pw_tp_xent_scratch(n, T)));

    double part[64];
    double *parts = T <= 64 ? part : NULL;
    if (!parts) return pw_error(PW_ERR_UNSUPPORTED, "tensor-parallel cross-entropy: T = %d ranks (at most 64)", T);
    for (int64_t r = 0; r < n; r++) {
        const float *row = scratch + r * T * XN;
        /* The global maximum and its first column: the first rank (lowest
         * columns) whose maximum is the largest. */
        int bk = 0;
        for (int j = 1; j < T; j++)
            if (row[j * XN + XM] > row[bk * XN + XM]) bk = j;
        const float M = row[bk * XN + XM];
        for (int j = 0; j < T; j++) {
            const float *o = row + j * XN;
            const double sj = (double)o[XS_HI] + (double)o[XS_LO];
            parts[j] = o[XM] == -INFINITY ? 0.0 : sj * exp((double)o[XM] - (double)M);
        }
        const double S = pw_tp_tree_sum_d(parts, T);
        const float inv = (float)(1.0 / S);
        const float *lr = logits_k + r * Ck;
        float *pr = probs_k + r * Ck;
        for (int64_t c = 0; c < Ck; c++) pr[c] = expf(lr[c] - M) * inv;
        const int32_t lab = labels[r];
        if (lab >= 0 && (int64_t)lab < C) {
            int owner = 0;
            for (int j = 0; j < T; j++) {
                int64_t l0, h0;
                pw_tp_range(C, T, j, &l0, &h0);
                if (lab >= l0 && lab < h0) owner = j;
            }
            *loss += ((double)M + log(S)) - (double)row[owner * XN + XZ];
            if (correct && (int64_t)row[bk * XN + XBEST] == lab) (*correct)++;
        }
    }
    return PW_OK;
}

void pw_tp_xent_bwd(const pw_tp *tp, const float *probs_k, const int32_t *labels, float *dlogits_k,
                    int64_t n, int64_t C, float scale, int accumulate)
{
    int64_t lo, hi;
    pw_tp_range(C, tp->size, tp->rank, &lo, &hi);
    const int64_t Ck = hi - lo;
    for (int64_t r = 0; r < n; r++) {
        const float *pr = probs_k + r * Ck;
        float *dr = dlogits_k + r * Ck;
        const int32_t lab = labels[r];
        const int mine = lab >= lo && lab < hi;
        /* as pw_cpu_softmax_xent_bwd: the sweep, then the label's element
         * from its saved old value, rounded once */
        const float old = (mine && accumulate) ? dr[lab - lo] : 0.0f;
        if (accumulate)
            for (int64_t c = 0; c < Ck; c++) dr[c] += pr[c] * scale;
        else
            for (int64_t c = 0; c < Ck; c++) dr[c] = pr[c] * scale;
        if (mine) dr[lab - lo] = old + (pr[lab - lo] - 1.0f) * scale;
    }
}
