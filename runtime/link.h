/* pipewright — a slow link for runs on one machine (a test and teaching
 * aid), and the alpha-beta model of the all-reduce algorithms that
 * `--allreduce auto` chooses with.
 *
 *     pw_link link = {.latency_s = 50e-6, .bandwidth = 100e6};   // 100 MB/s
 *     pw_coll slow;
 *     PW_CHECK(pw_coll_throttle_create(&fast, &link, PW_ALLREDUCE_RING, 1, &slow));
 *     PW_CHECK(pw_coll_allreduce(&slow, spans, n, abort));  // the same bytes, later
 *     pw_coll_throttle_destroy(&slow);
 *
 * The model (docs/distributed.md, "Slow links"). Every process (in one
 * process: every worker) has one outgoing link per direction of the
 * network, of `bandwidth` bytes/s, shared by all of its messages to every
 * destination, and every message takes `latency_s` more to arrive. A
 * message of b bytes handed over at time t leaves when the link is free,
 * occupies it b/B and arrives latency later:
 *
 *     leave = max(t, free);  free = leave + b/B;  arrive = free + latency
 *
 * Point-to-point messages (activations and their gradients between stages)
 * are held back by exactly that (pw_link_clock_due): the MPI transport
 * posts the send at `arrive`, the in-process engine delivers it then.
 * A collective wrapped by pw_coll_throttle_create runs unchanged — the
 * same bytes — and then waits the link time of its algorithm's messages
 * under the same model (pw_link_allreduce_s), so a throttled all-reduce
 * takes its real time plus the link's. The all-reduce's link and the
 * stages' link are modelled independently (not one shared NIC).
 * The parameter server's messages (transport ps_isend, --sync ps) are held
 * back by the same rule on a clock of the process's own for them.
 * Receiving is not throttled (the sender's link is the bottleneck).
 *
 * Thread-safety: pw_link is plain data; a pw_link_clock belongs to one
 * sending thread; a throttled pw_coll is used like the one it wraps.
 */
#ifndef PW_RUNTIME_LINK_H
#define PW_RUNTIME_LINK_H

#include <stddef.h>
#include <stdint.h>

#include "runtime/collective.h"
#include "runtime/status.h"
#include "runtime/transport.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A link: latency per message (seconds, >= 0) and bandwidth (bytes/s per
 * direction; 0: unlimited). All zero: no throttle. */
typedef struct pw_link {
    double latency_s;
    double bandwidth;
} pw_link;

/* 1 when `l` (may be NULL) slows anything down. */
static inline int pw_link_on(const pw_link *l) { return l && (l->latency_s > 0 || l->bandwidth > 0); }

/* One sender's link: when it is next free (ns, pw_now_ns's clock). */
typedef struct pw_link_clock {
    int64_t free_ns;
} pw_link_clock;

/* A message of `bytes` handed to the link at `now_ns`: returns when it
 * arrives (the model above) and books the link until it has left. */
int64_t pw_link_clock_due(pw_link_clock *c, const pw_link *l, int64_t now_ns, size_t bytes);

/* Link time (seconds) of one all-reduce of `bytes` over n members with
 * `algo`, on one member's critical path, by the model above. Segments are
 * bytes/n (the ring's cut). tree: two phases, each n−1 segments on the
 * sender's link then one latency: 2((n−1)·s/B + α). ring: 2(n−1) steps,
 * each one segment and one latency: 2(n−1)(s/B + α). mpi: modelled as the
 * ring (the library's algorithm is its own). hierarchical: only the phase
 * between hosts is on the link, a tree over `hosts` leaders with the whole
 * bucket: 2((H−1)·bytes/H/B + α) (0 when H = 1); the phases within a host
 * are shared memory. auto is not an algorithm here (0). */
double pw_link_allreduce_s(const pw_link *l, pw_allreduce_algo algo, int n, int hosts, double bytes);

/* A pw_coll that runs `inner`'s calls unchanged and then sleeps the link
 * time of the call (pw_link_allreduce_s for `algo` with `hosts`, nothing
 * for an empty bucket; the all-gather of one double: 2(n−1) messages of 8
 * bytes as a ring). Polls
 * the abort flag while it sleeps. `inner` is borrowed and must outlive
 * *out. PW_OK; PW_ERR_NOMEM. */
pw_status pw_coll_throttle_create(const pw_coll *inner, const pw_link *l, pw_allreduce_algo algo, int hosts,
                                  pw_coll *out);
/* Frees the wrapper (not the inner collective). Accepts NULL / a zeroed pw_coll. */
void pw_coll_throttle_destroy(pw_coll *c);

/* Sleeps until `until_ns` (pw_now_ns's clock), polling *abort (may be
 * NULL) every millisecond: PW_OK, or PW_ERR_TIMEOUT when aborted. */
pw_status pw_link_sleep_until(int64_t until_ns, const atomic_int *abort, const char *what);

/* ------------------------------------------------------ --allreduce auto */

/* One candidate's cost line: an all-reduce of b bytes takes alpha + beta·b
 * seconds. */
typedef struct pw_ab {
    double alpha, beta;
} pw_ab;

/* The candidate with the smallest alpha + beta·bytes (the first on a tie);
 * candidates with usable[i] == 0 (NULL: all usable) are skipped. -1 when
 * none. Pure: the same table gives the same choice on every member. */
int pw_ab_pick(const pw_ab *table, const int *usable, int n, double bytes);

/* The line through two measured points (bytes, seconds); beta >= 0,
 * alpha >= 0 (clamped: noise can tilt the line below the origin). */
pw_ab pw_ab_fit(double b0, double t0, double b1, double t1);

/* An all-reduce that sends each bucket to one of `n` candidate endpoints
 * (all on the same group, each used in the same order by every member),
 * chosen by pw_ab_pick from `table` by the bucket's bytes. The table must
 * be the same on every member (pw_coll_auto_measure makes it so). The
 * candidates are borrowed and must outlive *out; `names` too. */
typedef struct pw_coll_auto_cfg {
    const pw_coll *cands;     /* [n] */
    const char *const *names; /* [n] for messages and the table's log */
    const pw_ab *table;       /* [n] (NULL: measure before use) */
    int n;
} pw_coll_auto_cfg;
pw_status pw_coll_auto_create(const pw_coll_auto_cfg *cfg, pw_coll *out);
void pw_coll_auto_destroy(pw_coll *c);
/* Measures every candidate on its group (collective: every member calls
 * it at the same point): the best of `reps` all-reduces of `small` and
 * `big` floats each, fitted as a line; member 0's lines are shared with
 * every member (an all-gather) so that all choose alike. Fills table[n]
 * of the auto endpoint and, when out_table is not NULL, out_table[n]. */
pw_status pw_coll_auto_measure(pw_coll *c, int64_t small, int64_t big, int reps, pw_ab *out_table);
/* The candidate index auto would use for a bucket of `bytes`. */
int pw_coll_auto_choice(const pw_coll *c, double bytes);

/* ------------------------------------------------ the hierarchical all-reduce */

/* 1 when the hierarchical all-reduce (runtime/collective_hier.c) gives the
 * flat tree's bytes for members whose hosts are host_of[0..n): every host
 * holds a contiguous run of members, and every host but the last the same
 * power-of-two count (the last no more). Pure. */
int pw_hier_matches_tree(const int *host_of, int n);

/* The MPI endpoint the transport uses, on a communicator the caller owns
 * (benchmarks and tests; `comm` is an MPI_Comm passed by address):
 * `algo` (auto measures its candidates here, collectively), each behind
 * `link` when pw_link_on(link). PW_ERR_UNSUPPORTED without MPI. */
pw_status pw_mpi_coll_create_link(const void *comm, pw_allreduce_algo algo, const pw_link *link, pw_coll *out);
void pw_mpi_coll_destroy_link(pw_coll *c); /* accepts a zeroed pw_coll */
/* For an endpoint of pw_mpi_coll_create_link: the index of the algorithm a
 * bucket of `bytes` runs on and its name ("tree", "ring", "mpi",
 * "hierarchical"); -1 for another endpoint. */
int pw_mpi_coll_auto_choice(const pw_coll *c, double bytes, const char **name);

#ifdef __cplusplus
}
#endif
#endif
