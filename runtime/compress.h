/* pipewright — compressed gradient all-reduce across data-parallel replicas
 * (pipeline-run --compress; docs/distributed.md, "Compression").
 *
 * A compressor is one member's state for one gradient bucket (a fixed list
 * of spans): what it needs from step to step (the error-feedback residual,
 * PowerSGD's warm-started Q). Its all-reduce replaces pw_coll_allreduce for
 * that bucket and, like it, leaves the SUM over the members in the spans,
 * the same bytes on every member.
 *
 *     pw_compress_config cc;
 *     PW_CHECK(pw_compress_parse("topk:0.01", &cc));
 *     pw_compressor *z;
 *     PW_CHECK(pw_compressor_create(&cc, spans, rows, n_spans, &z));  // once per bucket
 *     // every step, on the member's communication thread, like pw_coll_allreduce:
 *     pw_compress_bytes by;
 *     PW_CHECK(pw_compressor_allreduce(z, &coll, spans, n_spans, abort, &by));
 *     pw_compressor_destroy(z);
 *
 * The modes (summation order: "Determinism" below):
 *   bf16, fp16  each member rounds its gradient to 16 bits (round to nearest,
 *               ties to even; fp16 saturates to ±inf past 65504 and keeps
 *               subnormals), the 16-bit payloads are all-gathered and every
 *               member decodes them to fp32 and sums them in fp32. No state.
 *   topk:R      per span (one parameter's gradient), k = ⌈R·n⌉ (at least 1)
 *               of acc = gradient + residual with the largest |acc| travel
 *               as (uint32 index, fp32 value); the rest stays in the residual
 *               for the next step (error feedback: Stich et al. 2018, the
 *               "memory" of Lin et al.'s DGC without momentum correction).
 *               Ties in |acc| go to the lower index. State: the residual,
 *               one float per gradient float.
 *   powersgd:r  Vogels et al. 2019, Algorithm 1 with error feedback (their
 *               Algorithm 2), per matrix as PyTorch's powerSGD_hook does:
 *               a span given rows > 0 is M (rows × cols) with rank
 *               q = min(r, rows, cols); when (rows + cols)·q < rows·cols
 *               it is compressed: M += residual; P = M Q; P summed across
 *               the members (the group's all-reduce, with every uncompressed
 *               span in the same call); P orthogonalised (Gram–Schmidt,
 *               columns in order); Q = Mᵀ P; Q summed; the result P Qᵀ;
 *               residual = M − P Qᵀ / n_members. Q is warm-started: the
 *               summed Q of the last step (the first step's from the seed,
 *               the same on every member). Vectors (rows 0) and matrices
 *               too small to gain are all-reduced uncompressed in fp32.
 *               State: the residual of each compressed matrix and its Q.
 *
 * Determinism. The 16-bit and top-k modes sum the members' decoded
 * contributions (dense fp32 vectors) pairwise in member order — the tree
 * order of collective.h — on every member, so in-process and MPI runs give
 * the same bytes, and so do stage counts, schedules and threads for the
 * same member count (both modes work per element or per span, never across
 * the bucket). PowerSGD's two sums are the group's own all-reduce (tree or
 * ring, the run's choice), and everything else is per matrix in a fixed
 * loop order, so the same holds for it. None of them equals the
 * uncompressed run's bits (the rounding or the selection changes the
 * gradient), and the power-of-two replicas-equal-one-replica property of
 * the uncompressed tree does not hold: R replicas each compress their own
 * part.
 *
 * A parameter server (the endpoint has push_bytes): the 16-bit and top-k
 * modes encode as above (top-k's residual kept the same way) and push the
 * payload instead of gathering it; the server decodes each member's spans
 * (pw_compress_decode_span) and sums them in the tree order, which is the
 * gathering all-reduce's sum. PowerSGD takes two round trips instead
 * (the endpoint's push_round): each member pushes its P (and its
 * uncompressed spans in fp32); the server sums the P's in the tree order,
 * orthogonalises them (pw_compress_powersgd_orthogonalise) and sends the
 * result back; each member pushes Q = Mᵀ P; the server sums the Q's,
 * sends the sum back and rebuilds the gradient (pw_compress_powersgd_
 * rebuild), and each member keeps its residual and the summed Q as here.
 * With the tree all-reduce's sum order that is the all-reduce run's every
 * float. An endpoint with push_bytes but no push_round: PW_ERR_UNSUPPORTED.
 *
 * Threads: a compressor is used by one thread at a time (its member's
 * communication thread); the group's members each have their own. Host
 * memory only (spans on a GPU are refused by the engine).
 */
#ifndef PW_RUNTIME_COMPRESS_H
#define PW_RUNTIME_COMPRESS_H

#include <stddef.h>
#include <stdint.h>

#include "runtime/collective.h"
#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pw_compress_kind {
    PW_COMPRESS_NONE = 0,  /* the plain fp32 all-reduce */
    PW_COMPRESS_BF16,
    PW_COMPRESS_FP16,
    PW_COMPRESS_TOPK,
    PW_COMPRESS_POWERSGD,
} pw_compress_kind;

typedef struct pw_compress_config {
    pw_compress_kind kind;
    double ratio;   /* topk: the fraction of each span kept, in (0, 1] */
    int rank;       /* powersgd: r >= 1 */
    uint64_t seed;  /* powersgd: the first Q's seed (the same on every member) */
} pw_compress_config;

/* "none", "bf16", "fp16", "topk:RATIO" (0 < RATIO <= 1, e.g. 0.01) or
 * "powersgd:RANK" (1 <= RANK <= 1024). PW_ERR_INVALID_ARG with a message
 * naming the spelling otherwise. seed is left 0. */
pw_status pw_compress_parse(const char *s, pw_compress_config *out);
/* The spelling back ("topk:0.01"). */
void pw_compress_name(const pw_compress_config *c, char *out, size_t n);

/* What one member of `members` puts on the wire, and the link time, for one
 * all-reduce of the tensors numel[0..n) (rows[i] > 0: a rows × numel/rows
 * matrix, as pw_compressor_create takes them; rows may be NULL) — the
 * model the simulator forecasts with (pipeline-run --simulate --compress).
 * wire_bytes: the bytes the compressor reports as `wire` (pw_compress_bytes).
 * link_s: the link time by runtime/link.h's model, the throttle's: none is
 * the fp32 all-reduce with `algo` (pw_link_allreduce_s); bf16, fp16 and
 * topk an all-gather of each member's payload, members − 1 messages;
 * powersgd two all-reduces with `algo`, of P with every uncompressed tensor
 * and of Q. The compressor's own compute is not in it. `cc` NULL: none. */
typedef struct pw_link pw_link;
typedef struct pw_compress_cost {
    int64_t raw_bytes, wire_bytes;
    double link_s;
} pw_compress_cost;
pw_compress_cost pw_compress_model(const pw_compress_config *cc, const int64_t *numel, const int64_t *rows, int n,
                                   int members, int hosts, const pw_link *l, int algo);

/* The scalar codecs (round to nearest, ties to even; NaN stays NaN). */
uint16_t pw_f32_to_bf16(float f);
float pw_bf16_to_f32(uint16_t h);
uint16_t pw_f32_to_fp16(float f);
float pw_fp16_to_f32(uint16_t h);

typedef struct pw_compressor pw_compressor;

/* For a bucket of these spans (only their sizes are kept; the all-reduce
 * takes the spans again). rows (optional, [n_spans]): rows[i] > 0 when span
 * i is a rows[i] × (n / rows[i]) matrix, row-major, else 0 (a vector; NULL:
 * all vectors); only PowerSGD uses it. PW_OK; PW_ERR_INVALID_ARG (kind
 * none, a bad ratio or rank, rows not dividing n); PW_ERR_NOMEM. */
pw_status pw_compressor_create(const pw_compress_config *cfg, const pw_span *spans, const int64_t *rows,
                               int n_spans, pw_compressor **out);
void pw_compressor_destroy(pw_compressor *z); /* accepts NULL */

/* Per call: the bucket's bytes in fp32 (raw) and the payload this member
 * put on the wire for it (wire; for PowerSGD the floats of its two
 * all-reduces, for the others its all-gathered bytes). An all-reduce moves
 * 2(n−1)/n × its payload per member, an all-gather (n−1) ×: the same for
 * two members (docs/distributed.md). */
typedef struct pw_compress_bytes {
    int64_t raw;
    int64_t wire;
} pw_compress_bytes;

/* Sums the spans across the group in place, compressed (see above); every
 * member calls it with spans of the same sizes as at creation. Statuses as
 * pw_coll_allreduce's, and PW_ERR_SHAPE when the spans differ from the
 * creation's. `bytes` is optional. After a failure the state is undefined
 * (the step fails; pw_compressor_reset before reuse). */
pw_status pw_compressor_allreduce(pw_compressor *z, const pw_coll *co, const pw_span *spans, int n_spans,
                                  const atomic_int *abort, pw_compress_bytes *bytes);

/* A parameter server's side of a push (pw_coll_i.push_bytes): the bytes one
 * member's payload has for a span of n floats (bf16, fp16: 2n; topk: 8k,
 * k as above; 0 for none and powersgd, which do not push), and that
 * payload decoded into out[0 .. n) (top-k: zeros where nothing was sent),
 * the same floats the gathering all-reduce decodes, so a server summing
 * the members' decoded spans in the tree order gets its bytes.
 * PW_ERR_SHAPE when `bytes` is not pw_compress_span_bytes(cc, n). */
int64_t pw_compress_span_bytes(const pw_compress_config *cc, int64_t n);
pw_status pw_compress_decode_span(const pw_compress_config *cc, int64_t n, const void *payload, int64_t bytes,
                                  float *out);

/* PowerSGD's server side (a parameter server, see above), the functions
 * the compressor itself uses. The rank q a span of n floats with `rows`
 * rows (0: a vector) is compressed to, 0 when it travels uncompressed
 * (pw_compressor_create's rule). */
int pw_compress_powersgd_rank(const pw_compress_config *cc, int64_t n, int64_t rows);
/* P (rows × q, row-major), summed over the members: its columns
 * orthonormalised in order (Gram–Schmidt, each projection twice). */
void pw_compress_powersgd_orthogonalise(float *P, int64_t rows, int q);
/* out (rows × cols) = P Qᵀ, Q cols × q: the summed gradient. */
void pw_compress_powersgd_rebuild(const float *P, const float *Q, int64_t rows, int64_t cols, int q, float *out);

/* The state carried between steps, for checkpoints: its length in floats
 * (0 for bf16 and fp16), a copy out, a copy in (the same length), and back
 * to the start (residuals zero, Q from the seed). */
int64_t pw_compressor_state_floats(const pw_compressor *z);
void pw_compressor_state_get(const pw_compressor *z, float *out);
void pw_compressor_state_set(pw_compressor *z, const float *in);
void pw_compressor_reset(pw_compressor *z);
/* Span i's part of that state: its floats (0: the span carries none: bf16,
 * fp16, or a PowerSGD span sent uncompressed) and, in *off, where they
 * start. topk: the residual (the span's n floats); powersgd: the residual
 * (n) then Q (cols x q). The parts of the spans are disjoint and in span
 * order, so a checkpoint may keep them per span (per parameter). */
int64_t pw_compressor_span_state(const pw_compressor *z, int i, int64_t *off);
/* Copies span i's part out / in (pw_compressor_span_state's floats). */
void pw_compressor_span_state_get(const pw_compressor *z, int i, float *out);
void pw_compressor_span_state_set(pw_compressor *z, int i, const float *in);

#ifdef __cplusplus
}
#endif
#endif
