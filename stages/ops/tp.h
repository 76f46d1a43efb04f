/* pipewright — tensor-parallel ops (Megatron-style), on the CPU: one rank's
 * part of a linear, an embedding or the softmax cross-entropy split over T
 * ranks, and the cross-rank sums that put the parts together (issue 16,
 * docs/parallelism.md "Tensor parallelism").
 *
 *     // rank k of T, on its own thread, with its endpoint of a T-member
 *     // group (runtime/collective.h: pw_shm_group_member(g, k)):
 *     pw_tp tp = {.rank = k, .size = T, .coll = pw_shm_group_member(g, k)};
 *     int64_t lo, hi;
 *     pw_tp_range(out, T, k, &lo, &hi);            // this rank's output features
 *     pw_tp_col_linear_fwd(x, w + lo * in, b + lo, y_k, n, in, hi - lo);
 *     ...
 *     PW_CHECK(pw_tp_row_linear_fwd(&tp, h_k, w2_k, b2, y, n, hi - lo, out2));
 *
 * Splits. A dimension of length L splits over T ranks as the collectives cut
 * a bucket: rank k holds [⌊kL/T⌋, ⌊(k+1)L/T⌋) (pw_tp_range). Sizes need not
 * divide evenly (17 over 3: 5, 6, 6); a rank may hold nothing (L < T), and
 * every function accepts a length of 0.
 *
 *   column-parallel linear   w (out, in) split by rows (output features), b
 *                            with it: y_k = x · w_kᵀ + b_k is rank k's slice
 *                            of y. Its input gradient is a sum over ranks.
 *   row-parallel linear      w split by columns (input features), x arrives
 *                            split the same way (a column-parallel linear's
 *                            output): y = Σ_k x_k · w_kᵀ + b, the sum over
 *                            ranks; b is whole on every rank and added once
 *                            (rank 0's partial). Its input gradient is local.
 *   vocabulary-parallel      the table (vocab, d) split by rows: rank k
 *   embedding                writes the rows of tokens it holds, zeros for
 *                            the others, and the ranks' outputs are summed.
 *   vocabulary-parallel      logits (n, C) split by columns (the output of a
 *   cross-entropy            column-parallel head): each rank reduces its
 *                            columns to a few numbers per row, the ranks
 *                            exchange them (never the logits), and each
 *                            rank writes the probabilities of its columns.
 *
 * Summation order, fixed and documented (STYLE 18). Every cross-rank sum is
 * pw_coll_allreduce's tree: per element, the pairwise sum over the ranks in
 * index order, (p0 + p1) + (p2 + p3), ((p0 + p1) + (p2 + p3)) + p4 — it
 * depends only on T, never on thread timing, so a run is reproducible bit
 * for bit at a given T. Sums of one non-zero part and zeros (the embedding's
 * output, the cross-entropy's exchange, which is an all-gather carried by
 * the all-reduce with each rank's numbers in its own place and zeros in the
 * others') are exact: their bits do not depend on T at all. The
 * cross-entropy's normaliser is the pairwise sum over ranks in index order
 * (pw_tp_tree_sum_d) of each rank's Σ exp(l − m_k), rescaled to the global
 * maximum, in double.
 *
 * What is and is not the unsplit op's bits (tests/test_op_table.c,
 * op_table::tensor_parallel, checks each for T = 1 … 4):
 *   - identical at every T: the weight and bias gradients of both linears
 *     (each element is the same sum over rows), the embedding's forward
 *     and gradient;
 *   - within rounding: the row-parallel forward and the column-parallel
 *     input gradient (the sum over the features split is cut into T
 *     partial sums added by the tree), the cross-entropy's loss and
 *     probabilities (its normaliser summed per rank), and — measured, not
 *     by construction — the column-parallel forward and the row-parallel
 *     input gradient: the BLAS computes a slice's GEMM with another
 *     kernel path than the whole one's (OpenBLAS 0.3.21 here: last bits);
 *   - at T = 1 every function gives the unsplit op's bits.
 *
 * Memory: host memory only (the CPU backend). A communication error or an
 * abort (pw_tp.abort raised) returns the collective's status
 * (PW_ERR_TIMEOUT "aborted"); afterwards the group may only be destroyed.
 * Thread-safety: each rank calls from its own thread; the ranks of a group
 * must make the same calls in the same order with the same n.
 */
#ifndef PW_STAGES_OPS_TP_H
#define PW_STAGES_OPS_TP_H

#include <stdint.h>

#include "runtime/collective.h"
#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One rank's place in a tensor-parallel group. */
typedef struct pw_tp {
    int rank;                 /* 0 .. size−1 */
    int size;                 /* T >= 1 */
    pw_coll coll;             /* the group's endpoint, coll.member == rank (unused at T = 1) */
    const atomic_int *abort;  /* may be NULL: see runtime/collective.h "Aborting" */
    /* (optional) told of every cross-rank sum once it returns, on the
     * rank's thread: when it began and ended (pw_now_ns) and the bytes
     * summed; the training driver records it in the trace (a TP_ALLREDUCE
     * event, runtime/trace.h). */
    void (*on_sum)(void *arg, int64_t t0_ns, int64_t t1_ns, int64_t bytes);
    void *on_sum_arg;
} pw_tp;

/* Rank k's part of a dimension of length L over T ranks: [*lo, *hi). */
static inline void pw_tp_range(int64_t L, int T, int k, int64_t *lo, int64_t *hi)
{
    *lo = L * k / T;
    *hi = L * (k + 1) / T;
}

/* x[0..n) summed over the group in place (the tree order above). */
pw_status pw_tp_allreduce(const pw_tp *tp, float *x, int64_t n);

/* v[0..T) summed pairwise in index order: (v0 + v1) + (v2 + v3) ... (the
 * collective tree's order); v is overwritten. */
double pw_tp_tree_sum_d(double *v, int T);

/* ---- column-parallel linear: w_k (out_k, in), b_k (out_k) or NULL ---- */

/* y_k (n, out_k) = x (n, in) · w_kᵀ + b_k. Local. */
void pw_tp_col_linear_fwd(const float *x, const float *w_k, const float *b_k, float *y_k,
                          int64_t n, int64_t in, int64_t out_k);
/* dx (n, in) = Σ_ranks dy_k (n, out_k) · w_k: each rank's part, then the
 * all-reduce. Overwrites dx (never accumulates: the partial sums must not
 * carry an earlier gradient T times). */
pw_status pw_tp_col_linear_bwd_input(const pw_tp *tp, const float *dy_k, const float *w_k, float *dx,
                                     int64_t n, int64_t in, int64_t out_k);
/* dw_k += dy_kᵀ · x; db_k += Σ_rows dy_k. Local. */
void pw_tp_col_linear_bwd_weight(const float *dy_k, const float *x, float *dw_k, float *db_k,
                                 int64_t n, int64_t in, int64_t out_k);

/* ---- row-parallel linear: w_k (out, in_k), b (out, whole) or NULL ---- */

/* y (n, out) = Σ_ranks x_k (n, in_k) · w_kᵀ, + b in rank 0's partial. */
pw_status pw_tp_row_linear_fwd(const pw_tp *tp, const float *x_k, const float *w_k, const float *b,
                               float *y, int64_t n, int64_t in_k, int64_t out);
/* dx_k (n, in_k) (+)= dy (n, out) · w_k. Local. */
void pw_tp_row_linear_bwd_input(const float *dy, const float *w_k, float *dx_k, int64_t n, int64_t in_k,
                                int64_t out, int accumulate);
/* dw_k += dyᵀ · x_k; db += Σ_rows dy (the same on every rank: dy is). */
void pw_tp_row_linear_bwd_weight(const float *dy, const float *x_k, float *dw_k, float *db, int64_t n,
                                 int64_t in_k, int64_t out);

/* ---- vocabulary-parallel embedding: w_k = rows [lo, hi) of (vocab, d) ---- */

/* y (n, d) = the full table's row of each token: rank k writes the tokens it
 * holds, zeros elsewhere, then the all-reduce (exact). A token outside
 * [0, vocab) gives a zero row, as pw_cpu_embedding_fwd. */
pw_status pw_tp_embedding_fwd(const pw_tp *tp, const int32_t *tokens, const float *w_k, float *y,
                              int64_t n, int64_t vocab, int64_t d);
/* dw_k += each dy row into its token's row, for the tokens rank k holds, row
 * 0 first (the unsplit op's bits). Local. */
void pw_tp_embedding_bwd_weight(const pw_tp *tp, const int32_t *tokens, const float *dy, float *dw_k,
                                int64_t n, int64_t vocab, int64_t d);

/* ---- vocabulary-parallel softmax cross-entropy: logits_k = columns [lo, hi) of (n, C) ---- */

/* Scratch floats pw_tp_xent_fwd needs for n rows at T ranks. */
static inline int64_t pw_tp_xent_scratch(int64_t n, int T) { return n * (int64_t)T * 5; }

/* probs_k (n, C_k) = rank k's columns of softmax(logits) over all C
 * columns; *loss = Σ_rows −log p[label] (double, the same on every rank);
 * *correct (optional) = rows whose first largest logit over all C is the
 * label. Per row, rank k reduces its columns to five numbers (its maximum
 * m_k, Σ exp(l − m_k) as two floats, the label's logit if it holds it, its
 * first largest column), the ranks all-gather them through `scratch`
 * (pw_tp_xent_scratch floats), and each combines them in rank order: the
 * maximum M, S = Σ_k s_k·exp(m_k − M) pairwise (pw_tp_tree_sum_d). Labels
 * outside [0, C) count 0, as pw_cpu_softmax_xent_fwd. */
pw_status pw_tp_xent_fwd(const pw_tp *tp, const float *logits_k, const int32_t *labels, float *probs_k,
                         float *scratch, int64_t n, int64_t C, double *loss, int64_t *correct);
/* dlogits_k (n, C_k) (+)= (probs_k − onehot(label)) · scale, the one-hot
 * only in the columns rank k holds. Local. */
void pw_tp_xent_bwd(const pw_tp *tp, const float *probs_k, const int32_t *labels, float *dlogits_k,
                    int64_t n, int64_t C, float scale, int accumulate);

#ifdef __cplusplus
}
#endif
#endif
