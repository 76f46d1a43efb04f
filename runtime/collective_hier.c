/* pipewright — the hierarchical all-reduce over MPI, and the endpoint the
 * MPI transport hands the engine: an algorithm of collective_mpi.c or the
 * hierarchical one, behind a slow link when one is set (link.h), or, for
 * `--allreduce auto`, several of them behind auto's choice.
 *
 * Hierarchical (docs/distributed.md, "Hierarchical all-reduce"). The
 * members of the group are cut by host: MPI_Comm_split_type(SHARED) on
 * the group, or the test hook PW_TEST_HOSTS=h0,h1,... (a non-negative host
 * id per world rank) to make several "hosts" of one machine. Then:
 *   1. within each host, collective.h's tree over the host's members in
 *      member order (an all-reduce over the host's communicator: every
 *      member of the host ends with the host's sum);
 *   2. the hosts' leaders (each host's lowest member) run the tree across
 *      the hosts, ordered by their leaders' member index;
 *   3. each leader broadcasts the total within its host (MPI_Ibcast).
 * Every element is therefore tree_H(tree_h0(...), tree_h1(...), ...): the
 * flat tree's bytes exactly when every host holds a contiguous run of
 * members and all hosts but the last hold the same power-of-two count (the
 * last no more): then the within-host trees are the flat tree's first
 * levels and the leaders' tree its last (pw_hier_matches_tree). */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/link.h"
#include "runtime/log.h"

int pw_hier_matches_tree(const int *host_of, int n)
{
    /* Contiguous blocks: each host's members form one run. */
    int block = 0; /* the first block's size */
    for (int i = 0; i < n;) {
        int j = i;
        while (j < n && host_of[j] == host_of[i]) j++;
        for (int k = j; k < n; k++)
            if (host_of[k] == host_of[i]) return 0; /* the host comes back: not contiguous */
        const int size = j - i;
        if (i == 0) {
            block = size;
            if (j < n && (block & (block - 1)) != 0) return 0; /* more hosts: a power of two */
        } else if (j < n ? size != block : size > block) {
            return 0;
        }
        i = j;
    }
    return 1;
}

#ifdef PW_HAVE_MPI
#include "runtime/transport-internal.h"

typedef struct hier {
    MPI_Comm local, leaders; /* leaders: MPI_COMM_NULL on a non-leader */
    pw_coll local_tree, leader_tree;
    pw_coll flat;            /* the whole group (its all-gather) */
    int hosts, is_leader;
} hier;

/* This process's host id: PW_TEST_HOSTS's entry for its world rank, -1
 * without the variable. The whole list is checked (every process then
 * refuses a bad one alike, and none waits for another in a collective). */
static pw_status test_host(int *out)
{
    *out = -1;
    const char *spec = getenv("PW_TEST_HOSTS");
    if (!spec || !*spec) return PW_OK;
    int w = 0, size = 0, i = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &w);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    for (const char *p = spec;; i++) {
        char *end = NULL;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > 1 << 20 || (*end && *end != ','))
            return pw_error(PW_ERR_INVALID_ARG, "PW_TEST_HOSTS='%s': entry %d is not a host id (0, 1, ...); give "
                            "one per world rank, separated by commas", spec, i);
        if (i == w) *out = (int)v;
        if (!*end) break;
        p = end + 1;
    }
    if (i + 1 != size)
        return pw_error(PW_ERR_INVALID_ARG, "PW_TEST_HOSTS='%s' names %d host%s for %d processes (one per world "
                        "rank)", spec, i + 1, i ? "s" : "", size);
    return PW_OK;
}

static pw_status hier_allreduce(void *self, int member, const pw_span *spans, int n_spans, const atomic_int *abort)
{
    hier *h = self;
    (void)member;
    int64_t L = pw_span_total(spans, n_spans);
    if (L == 0) return PW_OK;
    PW_CHECK(pw_coll_allreduce(&h->local_tree, spans, n_spans, abort));
    if (h->hosts == 1) return PW_OK;
    if (h->is_leader) PW_CHECK(pw_coll_allreduce(&h->leader_tree, spans, n_spans, abort));
    if (h->local_tree.n_members == 1) return PW_OK;
    for (int i = 0; i < n_spans; i++) {
        if (!spans[i].n) continue;
        if (spans[i].n > INT_MAX)
            return pw_error(PW_ERR_UNSUPPORTED, "hierarchical all-reduce: a span of %lld floats",
                            (long long)spans[i].n);
        MPI_Request r;
        pw_mpi_lock();
        int rc = MPI_Ibcast(spans[i].data, (int)spans[i].n, MPI_FLOAT, 0, h->local, &r);
        pw_mpi_unlock();
        if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "hierarchical all-reduce: MPI_Ibcast");
        PW_CHECK(pw_mpi_wait(&r, 1, NULL, abort, "hierarchical all-reduce: broadcast within the host"));
    }
    return PW_OK;
}

static pw_status hier_allgather(void *self, int member, double v, double *out, const atomic_int *abort)
{
    hier *h = self;
    (void)member;
    return pw_coll_allgather_f64(&h->flat, v, out, abort);
}

/* The compressed all-reduces' gather (runtime/compress.h): over the whole
 * group, as the flat algorithms do (the payloads are summed in member order
 * by the compressor, not by the hierarchy). */
static pw_status hier_allgather_bytes(void *self, int member, const void *mine, int64_t bytes, void *out,
                                      const atomic_int *abort)
{
    hier *h = self;
    (void)member;
    return pw_coll_allgather_bytes(&h->flat, mine, bytes, out, abort);
}

static const pw_coll_i hier_i = {.name = "mpi-hierarchical", .allreduce = hier_allreduce,
                                 .allgather_f64 = hier_allgather,
                                 .allgather_bytes = hier_allgather_bytes}; /* no waiting_for: the sub-groups'
                                                                             members are not the group's */

static void hier_free(hier *h)
{
    if (!h) return;
    pw_mpi_coll_fini(&h->local_tree);
    pw_mpi_coll_fini(&h->leader_tree);
    pw_mpi_coll_fini(&h->flat);
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin && h->local != MPI_COMM_NULL) MPI_Comm_free(&h->local);
    if (!fin && h->leaders != MPI_COMM_NULL) MPI_Comm_free(&h->leaders);
    free(h);
}

/* Builds the hierarchy on `comm` (collective). *hosts: the host count;
 * *matches: 1 when its bytes are the flat tree's. */
static pw_status hier_create(MPI_Comm comm, pw_coll *out, int *hosts, int *matches)
{
    memset(out, 0, sizeof *out);
    int n = 0, me = 0, host = -1;
    MPI_Comm_size(comm, &n);
    MPI_Comm_rank(comm, &me);
    PW_CHECK(test_host(&host));
    hier *h = calloc(1, sizeof *h);
    int *host_of = calloc((size_t)n, sizeof *host_of);
    if (!h || !host_of) {
        free(h);
        free(host_of);
        return pw_error(PW_ERR_NOMEM, "hierarchical all-reduce: out of memory");
    }
    h->local = h->leaders = MPI_COMM_NULL;
    pw_status st = PW_OK;
    int rc;
    if (host >= 0) rc = MPI_Comm_split(comm, host, me, &h->local);
    else rc = MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, me, MPI_INFO_NULL, &h->local);
    int lrank = 0;
    if (rc == MPI_SUCCESS) {
        MPI_Comm_set_errhandler(h->local, MPI_ERRORS_RETURN);
        MPI_Comm_rank(h->local, &lrank);
        h->is_leader = lrank == 0;
        rc = MPI_Comm_split(comm, h->is_leader ? 0 : MPI_UNDEFINED, me, &h->leaders);
    }
    /* Each member's host, named by its leader's member index. */
    int leader = me;
    if (rc == MPI_SUCCESS) rc = MPI_Bcast(&leader, 1, MPI_INT, 0, h->local);
    if (rc == MPI_SUCCESS) rc = MPI_Allgather(&leader, 1, MPI_INT, host_of, 1, MPI_INT, comm);
    if (rc != MPI_SUCCESS) st = pw_mpi_error(rc, "hierarchical all-reduce: splitting the group by host");
    if (st == PW_OK) {
        h->hosts = 0;
        for (int i = 0; i < n; i++) h->hosts += host_of[i] == i;
        *hosts = h->hosts;
        *matches = pw_hier_matches_tree(host_of, n);
        if (h->leaders != MPI_COMM_NULL) MPI_Comm_set_errhandler(h->leaders, MPI_ERRORS_RETURN);
        st = pw_mpi_coll_init(h->local, PW_ALLREDUCE_TREE, &h->local_tree);
    }
    if (st == PW_OK) st = pw_mpi_coll_init(comm, PW_ALLREDUCE_TREE, &h->flat);
    if (st == PW_OK && h->is_leader) st = pw_mpi_coll_init(h->leaders, PW_ALLREDUCE_TREE, &h->leader_tree);
    free(host_of);
    if (st != PW_OK) {
        hier_free(h);
        return st;
    }
    *out = (pw_coll){.vt = &hier_i, .self = h, .member = me, .n_members = n};
    return PW_OK;
}

/* ------------------------------------------------ the composed endpoint */

enum { MAXC = 4 };

typedef struct stack {
    pw_coll top;             /* what callers use */
    pw_coll base[MAXC];      /* the algorithms */
    pw_coll thr[MAXC];       /* each behind the link, when throttled */
    const char *names[MAXC];
    int n, throttled, is_auto, hosts, matches;
    pw_allreduce_algo algo[MAXC];
} stack;

static pw_status st_allreduce(void *self, int member, const pw_span *spans, int n_spans, const atomic_int *abort)
{
    stack *s = self;
    (void)member;
    return pw_coll_allreduce(&s->top, spans, n_spans, abort);
}

static pw_status st_allgather(void *self, int member, double v, double *out, const atomic_int *abort)
{
    stack *s = self;
    (void)member;
    return pw_coll_allgather_f64(&s->top, v, out, abort);
}

static int st_waiting_for(void *self, int member)
{
    stack *s = self;
    (void)member;
    return s->top.vt->waiting_for ? s->top.vt->waiting_for(s->top.self, s->top.member) : -1;
}

/* The compressed all-reduces' gather: the top endpoint's when it has one,
 * else the first algorithm's that has (behind the link when throttled);
 * the hierarchical all-reduce alone has none (PW_ERR_UNSUPPORTED, naming
 * it). */
static pw_status st_allgather_bytes(void *self, int member, const void *mine, int64_t bytes, void *out,
                                    const atomic_int *abort)
{
    stack *s = self;
    (void)member;
    if (s->top.vt->allgather_bytes) return pw_coll_allgather_bytes(&s->top, mine, bytes, out, abort);
    for (int i = 0; i < s->n; i++) {
        const pw_coll *c = s->throttled ? &s->thr[i] : &s->base[i];
        if (s->base[i].vt->allgather_bytes) return pw_coll_allgather_bytes(c, mine, bytes, out, abort);
    }
    return pw_coll_allgather_bytes(&s->top, mine, bytes, out, abort);
}

static const pw_coll_i stack_i = {.name = "mpi", .allreduce = st_allreduce, .allgather_f64 = st_allgather,
                                  .waiting_for = st_waiting_for, .allgather_bytes = st_allgather_bytes};

static const char *algo_name(pw_allreduce_algo a)
{
    switch (a) {
    case PW_ALLREDUCE_TREE: return "tree";
    case PW_ALLREDUCE_RING: return "ring";
    case PW_ALLREDUCE_MPI: return "mpi";
    case PW_ALLREDUCE_HIER: return "hierarchical";
    default: return "auto";
    }
}

static void stack_free(stack *s)
{
    if (!s) return;
    if (s->is_auto) pw_coll_auto_destroy(&s->top);
    for (int i = 0; i < s->n; i++) {
        pw_coll_throttle_destroy(&s->thr[i]);
        if (s->algo[i] == PW_ALLREDUCE_HIER) {
            if (s->base[i].self) hier_free(s->base[i].self);
        } else {
            pw_mpi_coll_fini(&s->base[i]);
        }
    }
    free(s);
}

static pw_status add_algo(stack *s, MPI_Comm comm, pw_allreduce_algo a, const pw_link *link)
{
    const int i = s->n;
    s->algo[i] = a;
    s->names[i] = algo_name(a);
    if (a == PW_ALLREDUCE_HIER) PW_CHECK(hier_create(comm, &s->base[i], &s->hosts, &s->matches));
    else PW_CHECK(pw_mpi_coll_init(comm, a, &s->base[i]));
    s->n++;
    if (s->throttled) PW_CHECK(pw_coll_throttle_create(&s->base[i], link, a, s->hosts, &s->thr[i]));
    return PW_OK;
}

pw_status pw_mpi_coll_build(MPI_Comm comm, pw_allreduce_algo algo, const pw_link *link, pw_coll *out,
                            char *desc, size_t desc_n)
{
    memset(out, 0, sizeof *out);
    stack *s = calloc(1, sizeof *s);
    if (!s) return pw_error(PW_ERR_NOMEM, "MPI collective: out of memory");
    s->throttled = pw_link_on(link);
    s->hosts = 1;
    int n = 0;
    MPI_Comm_size(comm, &n);
    pw_status st = PW_OK;
    if (algo != PW_ALLREDUCE_AUTO) {
        st = add_algo(s, comm, algo, link);
        if (st == PW_OK) s->top = s->throttled ? s->thr[0] : s->base[0];
        if (st == PW_OK && desc)
            snprintf(desc, desc_n, "%s%s", algo_name(algo),
                     algo != PW_ALLREDUCE_HIER ? "" : s->matches ? " (the tree's bytes)" : " (not the tree's bytes)");
    } else {
        /* Candidates that give the tree's bytes: the tree always; the
         * hierarchy when the hosts make it match and there is more than
         * one; for 2 members every algorithm (a + b = b + a). */
        st = add_algo(s, comm, PW_ALLREDUCE_TREE, link);
        if (st == PW_OK) st = add_algo(s, comm, PW_ALLREDUCE_HIER, link);
        if (st == PW_OK && (!s->matches || s->hosts == 1 || s->hosts == n)) {
            /* no use: drop it (it is the tree, or not its bytes) */
            s->n--;
            pw_coll_throttle_destroy(&s->thr[s->n]);
            hier_free(s->base[s->n].self);
            memset(&s->base[s->n], 0, sizeof s->base[0]);
        }
        if (st == PW_OK && n == 2) st = add_algo(s, comm, PW_ALLREDUCE_RING, link);
        if (st == PW_OK && n == 2) st = add_algo(s, comm, PW_ALLREDUCE_MPI, link);
        if (st == PW_OK) {
            pw_coll_auto_cfg ac = {.cands = s->throttled ? s->thr : s->base, .names = s->names, .n = s->n};
            st = pw_coll_auto_create(&ac, &s->top);
            if (st == PW_OK) s->is_auto = 1;
        }
        /* Measured once, here: 1 Ki and 1 Mi floats (4 KB, 4 MB), best of 3. */
        pw_ab tab[MAXC];
        if (st == PW_OK) st = pw_coll_auto_measure(&s->top, 1024, 1 << 20, 3, tab);
        if (st == PW_OK && desc) {
            int off = snprintf(desc, desc_n, "auto over");
            for (int i = 0; i < s->n && off > 0 && (size_t)off < desc_n; i++)
                off += snprintf(desc + off, desc_n - (size_t)off, "%s %s", i ? "," : "", s->names[i]);
        }
    }
    if (st != PW_OK) {
        stack_free(s);
        return st;
    }
    *out = (pw_coll){.vt = &stack_i, .self = s, .member = s->top.member, .n_members = s->top.n_members};
    return PW_OK;
}

void pw_mpi_coll_unbuild(pw_coll *c)
{
    if (!c || c->vt != &stack_i) return;
    stack_free(c->self);
    memset(c, 0, sizeof *c);
}

int pw_mpi_coll_auto_choice(const pw_coll *c, double bytes, const char **name)
{
    if (!c || c->vt != &stack_i) return -1;
    const stack *s = c->self;
    int k = s->is_auto ? pw_coll_auto_choice(&s->top, bytes) : 0;
    if (name) *name = k >= 0 ? s->names[k] : "?";
    return k;
}

pw_status pw_mpi_coll_create_link(const void *comm, pw_allreduce_algo algo, const pw_link *link, pw_coll *out)
{
    if (!comm || !out) return pw_error(PW_ERR_INVALID_ARG, "pw_mpi_coll_create_link: NULL argument");
    return pw_mpi_coll_build(*(const MPI_Comm *)comm, algo, link, out, NULL, 0);
}
void pw_mpi_coll_destroy_link(pw_coll *c) { pw_mpi_coll_unbuild(c); }
#else
pw_status pw_mpi_coll_create_link(const void *comm, pw_allreduce_algo algo, const pw_link *link, pw_coll *out)
{
    (void)comm;
    (void)algo;
    (void)link;
    if (out) memset(out, 0, sizeof *out);
    return pw_error(PW_ERR_UNSUPPORTED, "this build has no MPI");
}
void pw_mpi_coll_destroy_link(pw_coll *c) { (void)c; }
int pw_mpi_coll_auto_choice(const pw_coll *c, double bytes, const char **name)
{
    (void)c;
    (void)bytes;
    if (name) *name = "?";
    return -1;
}
#endif
