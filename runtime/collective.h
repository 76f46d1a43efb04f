/* pipewright — collectives: summing gradient buckets across data-parallel
 * replicas, and gathering one number from every member of a group.
 *
 * A collective endpoint (pw_coll) is one member's handle on a group of n
 * members. Two implementations sit behind the same vtable:
 *   - in-process (this file): a tree or a ring over shared memory between
 *     threads of one process (pw_shm_group);
 *   - MPI (runtime/transport.h): the same tree or ring over MPI
 *     point-to-point, or MPI_Iallreduce, on a communicator.
 *
 *     pw_shm_group *g;
 *     PW_CHECK(pw_shm_group_create(2, &g));
 *     // on member k's thread (k = 0, 1), with its own gradient spans:
 *     pw_coll me = pw_shm_group_member(g, k);
 *     pw_span spans[] = {{w_grad, 4096}, {b_grad, 64}};
 *     PW_CHECK(pw_coll_allreduce(&me, spans, 2, NULL));   // in place: the sum
 *     ...
 *     pw_shm_group_destroy(g);   // after every member has returned
 *
 * Calls are blocking: the engine runs them on a communication thread per
 * worker, so its event loops never block (docs/distributed.md). Every member
 * must make the same sequence of calls with spans of equal total length
 * (the layouts may differ; only the concatenation matters).
 *
 * Two algorithms, each with a fixed summation order that depends only on
 * the bucket's length L and the member count n — never on thread timing —
 * and that the MPI versions reproduce exactly, so in-process and MPI runs
 * give the same bytes. Either cuts the bucket into n segments, segment
 * j = [⌊jL/n⌋, ⌊(j+1)L/n⌋).
 *
 * Tree (the default). Every element is the pairwise sum over the members
 * in index order: at distance w = 1, 2, 4 … the partial of member a (a a
 * multiple of 2w) becomes partial(a) + partial(a + w) where a + w < n, e.g.
 *
 *     (g0 + g1) + (g2 + g3)          n = 4
 *     ((g0 + g1) + (g2 + g3)) + g4   n = 5
 *
 * Because a replica's gradient is itself the pairwise sum of its part of
 * the global batch (stages/program/program.h, grad_groups), R replicas give the
 * same bits as one replica summing the whole batch for every power of two R
 * (docs/api.md, "Determinism"). Member j sums segment j: in process it
 * reads the other members' copies of it in place and the others then copy
 * the result from member 0; over MPI it receives the n − 1 other copies of
 * segment j and sends the sum back to each, so a member sends and receives
 * 2(n−1)/n·L floats, as in the ring (but to every member, not only its
 * neighbours).
 *
 * Ring. Reduce-scatter: at step s = 0 .. n−2 member k adds the partial sum
 * of segment (k−s−1) mod n that member k−1 holds into its own copy:
 * mine = prev + mine. After n−1 steps member k holds segment (k+1) mod n
 * complete. All-gather: at step t = 0 .. n−2 member k copies the complete
 * segment (k−t) mod n from member k−1. So every element of segment j is
 *
 *     ((g_j + g_{j+1}) + g_{j+2}) + … + g_{j−1}        (member indices mod n)
 *
 * summed left to right in float, starting at member j: the same bits as
 * the tree for n <= 2 only. Each member moves 2(n−1)/n·L floats, the
 * ring's optimum, to its neighbours only.
 *
 * Aborting. Every call polls `abort` (may be NULL) at least every few
 * milliseconds while it waits for another member and then returns
 * PW_ERR_TIMEOUT ("aborted"); a member that never arrives therefore cannot
 * hang its peers once the caller raises the flag (the engine does when any
 * worker fails). After an aborted call the group may only be destroyed.
 */
#ifndef PW_RUNTIME_COLLECTIVE_H
#define PW_RUNTIME_COLLECTIVE_H

#include <stdatomic.h>
#include <stdint.h>

#include "runtime/atomic.h" /* atomic_int, also for C++ */
#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The all-reduce algorithms (see above). */
typedef enum pw_coll_algo {
    PW_COLL_TREE = 0,  /* pairwise over the members in index order (default) */
    PW_COLL_RING,      /* the ring's order */
} pw_coll_algo;

/* A contiguous run of floats: one parameter's gradient, say. */
typedef struct pw_span {
    float *data;
    int64_t n;
} pw_span;

typedef struct pw_coll_i {
    const char *name;  /* "shm-tree", "shm-ring", "mpi-tree", "mpi-ring", "mpi-iallreduce" */
    /* Sums the concatenation of `spans` across the group, in place, in the
     * algorithm's order above (an implementation that cannot, e.g. MPI_Iallreduce,
     * says so in docs/distributed.md). PW_OK; PW_ERR_TIMEOUT when aborted;
     * PW_ERR_SHAPE when members disagree on the total length; PW_ERR_IO on a
     * transport error. */
    pw_status (*allreduce)(void *self, int member, const pw_span *spans, int n_spans,
                           const atomic_int *abort);
    /* Every member contributes `v`; out[0 .. n_members−1] receives all of
     * them in member order. */
    pw_status (*allgather_f64)(void *self, int member, double v, double *out,
                               const atomic_int *abort);
    /* (optional) For messages, from any thread: the member whose data
     * `member` is waiting for right now, or -1 (not waiting, or unknown). */
    int (*waiting_for)(void *self, int member);
    /* (optional) Every member contributes `bytes` bytes at `mine` (the same
     * count on every member); out[0 .. n_members·bytes) receives all of
     * them in member order. The compressed all-reduces (runtime/compress.h)
     * move their payloads with it. PW_OK; PW_ERR_TIMEOUT when aborted;
     * PW_ERR_SHAPE when the members' counts differ (where detectable);
     * PW_ERR_IO on a transport error. */
    pw_status (*allgather_bytes)(void *self, int member, const void *mine, int64_t bytes, void *out,
                                 const atomic_int *abort);
    /* (optional) A parameter server's push (stages/train/ps.h): the member
     * sends its compressed payload of the spans (`mine`; span i's bytes
     * are [off[i], off[i + 1])) to whoever sums them, and the spans stay
     * as they are (nothing comes back here). pw_compressor_allreduce takes
     * it instead of gathering when the endpoint has it (bf16, fp16, top-k;
     * runtime/compress.h, pw_compress_decode_span for the other side). */
    pw_status (*push_bytes)(void *self, int member, const pw_span *spans, int n_spans, const void *mine,
                            const int64_t *off, const atomic_int *abort);
    /* (optional) PowerSGD through a parameter server, two rounds per
     * bucket: round 0 sends out[i] for each span i of the bucket `spans`
     * (its P, or its fp32 gradient when the span travels uncompressed) and
     * round 1 its Q (out[i].n == 0: nothing for that span); for each span
     * with back[i].n > 0 the server's reply (round 0: the members' P summed
     * in the tree order and orthogonalised; round 1: the summed Q) is in
     * back[i] when it returns. pw_compressor_allreduce takes it for
     * --compress powersgd when the endpoint has push_bytes. Statuses as
     * push_bytes'. */
    pw_status (*push_round)(void *self, int member, const pw_span *spans, int n_spans, int round,
                            const pw_span *out, const pw_span *back, const atomic_int *abort);
} pw_coll_i;

/* One member's endpoint. */
typedef struct pw_coll {
    const pw_coll_i *vt;
    void *self;
    int member;      /* 0 .. n_members−1 */
    int n_members;
} pw_coll;

static inline pw_status pw_coll_allreduce(const pw_coll *c, const pw_span *spans, int n_spans,
                                          const atomic_int *abort)
{
    return c->vt->allreduce(c->self, c->member, spans, n_spans, abort);
}
static inline pw_status pw_coll_allgather_f64(const pw_coll *c, double v, double *out,
                                              const atomic_int *abort)
{
    return c->vt->allgather_f64(c->self, c->member, v, out, abort);
}

/* PW_ERR_UNSUPPORTED when the endpoint has no allgather_bytes. */
static inline pw_status pw_coll_allgather_bytes(const pw_coll *c, const void *mine, int64_t bytes, void *out,
                                                const atomic_int *abort)
{
    if (!c->vt->allgather_bytes)
        return pw_error(PW_ERR_UNSUPPORTED, "collective %s cannot gather bytes (needed by --compress)",
                        c->vt->name);
    return c->vt->allgather_bytes(c->self, c->member, mine, bytes, out, abort);
}

/* Total floats of a span list. */
int64_t pw_span_total(const pw_span *spans, int n_spans);

/* Segment j of n over L floats: [*lo, *hi). */
static inline void pw_ring_segment(int64_t L, int n, int j, int64_t *lo, int64_t *hi)
{
    *lo = L * j / n;
    *hi = L * (j + 1) / n;
}

/* ---------------------------------------------------- in-process group */

typedef struct pw_shm_group pw_shm_group;

/* Where the spans' floats live, for a group whose members' gradients are
 * not host memory (stages on a GPU): the ring's two element operations,
 * run on the calling member's thread. apply: dst[0..n) = src + dst (add)
 * or = src (copy), float by float as the host loop does — so the same bits
 * — and possibly asynchronous; fence: returns once every apply the calling
 * thread made has finished (the ring calls it before telling the next
 * member that a segment is ready). NULL fields or no memory set: host
 * memory. */
typedef struct pw_span_mem {
    pw_status (*apply)(float *dst, const float *src, int64_t n, int add);
    pw_status (*fence)(void);
} pw_span_mem;

/* A group of n >= 1 members that are threads of this process. PW_OK,
 * PW_ERR_INVALID_ARG (n < 1), PW_ERR_NOMEM. */
pw_status pw_shm_group_create(int n, pw_shm_group **out);
/* Accepts NULL. No member may be inside a call. */
void pw_shm_group_destroy(pw_shm_group *g);
/* The spans of every later all-reduce of the group live in `mem`'s memory
 * (NULL: host memory, the default). Before any member's first call. */
void pw_shm_group_set_memory(pw_shm_group *g, const pw_span_mem *mem);
/* The group's algorithm (PW_COLL_TREE unless set). Before any member's
 * endpoint is taken. */
void pw_shm_group_set_algo(pw_shm_group *g, pw_coll_algo algo);
/* Member k's endpoint (0 <= k < n). */
pw_coll pw_shm_group_member(pw_shm_group *g, int k);
/* Members that have joined the collective member `k` is in now (for
 * messages: "1 of 2 replicas there"); the count of calls made so far by the
 * slowest member is in *slowest (optional). */
int pw_shm_group_joined(pw_shm_group *g, int k, int *slowest);

#ifdef __cplusplus
}
#endif
#endif
