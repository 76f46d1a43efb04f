/* pipewright — the in-process all-reduces over shared memory, tree (the
 * default) and ring (see collective.h for the algorithms and their
 * summation orders).
 *
 * Tree. Three counters steps per call, B = round × 3:
 *   join           publish spans                         -> prog = B+1
 *   sum            every member >= B+1; member k sums segment k of every
 *                  member's spans in the tree order, in place, into member
 *                  0's copy                              -> prog = B+2
 *   gather         every member >= B+2; k != 0 copies the whole result
 *                  from member 0                         -> prog = B+3
 *   leave          member 0 waits for every member >= B+3 (they have read
 *                  its floats); the others leave at once
 * Segment k of every member is written only by member k during the sum,
 * and only member 0's copy is read during the gather, so no two members
 * touch the same float between two counter steps.
 *
 * Ring. Each member works in place on its own spans and reads its predecessor's.
 * Progress is one counter per member, bumped after each step under the
 * group mutex; a member waits on the condition variable until the counters
 * it depends on are far enough:
 *   join           publish spans                         -> prog = B+1
 *   RS step s      needs prev >= B+1+s                   -> prog = B+2+s
 *   AG step t      needs prev >= B+n+t (segment final)
 *                  and next >= B+2+t (next has read the
 *                  partial we are about to overwrite)    -> prog = B+n+1+t
 *   leave          needs next >= B+2n−1 (next has read
 *                  everything of ours it needs)
 * with B = round × (2n−1). The mutex hand-off orders every read of a
 * neighbour's floats after the write that produced them.
 */
#include "runtime/collective.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct member {
    int64_t prog;              /* allreduce steps done, over all rounds */
    int64_t rounds;            /* allreduce calls begun */
    const pw_span *spans;      /* this round's */
    int n_spans;
    int64_t total;
    int64_t gather_rounds;     /* allgather calls done writing */
    double gather[2];          /* by round parity */
    const void *blob;          /* allgather_bytes: this round's contribution */
    int64_t blob_bytes;
    int64_t blob_rounds;       /* allgather_bytes calls published */
    int64_t blob_read;         /* allgather_bytes calls done reading the others' */
} member;

struct pw_shm_group {
    int n;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pw_coll_algo algo;
    member *m;                 /* [n] */
    const pw_span_mem *mem;    /* NULL: the spans are host memory */
};

/* How long a waiter sleeps between looks at the abort flag. */
#define POLL_NS 2000000L

int64_t pw_span_total(const pw_span *spans, int n_spans)
{
    int64_t t = 0;
    for (int i = 0; i < n_spans; i++) t += spans[i].n;
    return t;
}

pw_status pw_shm_group_create(int n, pw_shm_group **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_shm_group_create: out is NULL");
    *out = NULL;
    if (n < 1) return pw_error(PW_ERR_INVALID_ARG, "shm group: %d members (need at least 1)", n);
    pw_shm_group *g = calloc(1, sizeof *g);
    if (g) g->m = calloc((size_t)n, sizeof *g->m);
    if (!g || !g->m) {
        free(g);
        return pw_error(PW_ERR_NOMEM, "shm group: out of memory for %d members", n);
    }
    g->n = n;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, &ca);
    pthread_condattr_destroy(&ca);
    *out = g;
    return PW_OK;
}

void pw_shm_group_destroy(pw_shm_group *g)
{
    if (!g) return;
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    free(g->m);
    free(g);
}

int pw_shm_group_joined(pw_shm_group *g, int k, int *slowest)
{
    pthread_mutex_lock(&g->mu);
    int64_t r = g->m[k].rounds, lo = r;
    int joined = 0;
    for (int j = 0; j < g->n; j++) {
        if (g->m[j].rounds >= r) joined++;
        if (g->m[j].rounds < lo) lo = g->m[j].rounds;
    }
    pthread_mutex_unlock(&g->mu);
    if (slowest) *slowest = (int)lo;
    return joined;
}

/* ------------------------------------------------------------ waiting */

static void deadline_in(struct timespec *ts, long ns)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_nsec += ns;
    while (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* With g->mu held: waits until *counter >= target. */
static pw_status wait_for(pw_shm_group *g, const int64_t *counter, int64_t target,
                          const atomic_int *abort)
{
    while (*counter < target) {
        if (abort && atomic_load_explicit(abort, memory_order_relaxed))
            return pw_error(PW_ERR_TIMEOUT, "collective aborted");
        struct timespec ts;
        deadline_in(&ts, POLL_NS);
        pthread_cond_timedwait(&g->cv, &g->mu, &ts);
    }
    return PW_OK;
}

static void bump(pw_shm_group *g, int k, int64_t to)
{
    g->m[k].prog = to;
    pthread_cond_broadcast(&g->cv);
}

/* ------------------------------------------------------- segment work */

/* dst[lo, hi) = src[lo, hi) + dst[lo, hi) (add) or = src[lo, hi) (copy),
 * positions in the concatenations of the two span lists; through `mem`
 * (then fenced) when the spans are not host memory. */
static pw_status seg_apply(const pw_span_mem *mem, const pw_span *dst, int nd, const pw_span *src,
                           int ns, int64_t lo, int64_t hi, int add)
{
    int i = 0, j = 0;
    int64_t di = 0, sj = 0; /* start of dst[i], src[j] in the concatenation */
    while (i < nd && di + dst[i].n <= lo) di += dst[i++].n;
    while (j < ns && sj + src[j].n <= lo) sj += src[j++].n;
    int64_t x = lo;
    while (x < hi && i < nd && j < ns) {
        int64_t dend = di + dst[i].n, send = sj + src[j].n;
        int64_t end = hi < dend ? hi : dend;
        if (send < end) end = send;
        float *restrict d = dst[i].data + (x - di);
        const float *restrict s = src[j].data + (x - sj);
        int64_t len = end - x;
        if (mem && len > 0)
            PW_CHECK(mem->apply(d, s, len, add));
        else if (add)
            for (int64_t k = 0; k < len; k++) d[k] = s[k] + d[k];
        else if (len > 0)
            memcpy(d, s, (size_t)len * sizeof(float));
        x = end;
        if (x == dend) di += dst[i++].n;
        if (x == send) sj += src[j++].n;
    }
    return mem ? mem->fence() : PW_OK;
}

/* ------------------------------------------------------------ vtable */

static pw_status shm_ring_allreduce(pw_shm_group *g, int k, const pw_span *spans, int n_spans,
                                    const atomic_int *abort)
{
    const int n = g->n;
    int64_t L = pw_span_total(spans, n_spans);
    pthread_mutex_lock(&g->mu);
    member *me = &g->m[k];
    const int64_t B = me->rounds * (2 * (int64_t)n - 1);
    me->rounds++;
    const int prev = (k + n - 1) % n, next = (k + 1) % n;
    member *pm = &g->m[prev], *nm = &g->m[next];
    me->spans = spans;
    me->n_spans = n_spans;
    me->total = L;
    bump(g, k, B + 1);
    pw_status st = wait_for(g, &pm->prog, B + 1, abort);
    if (st == PW_OK && pm->total != L)
        st = pw_error(PW_ERR_SHAPE, "all-reduce: member %d has %lld floats, member %d %lld", prev,
                      (long long)pm->total, k, (long long)L);
    /* Reduce-scatter. */
    for (int s = 0; st == PW_OK && s < n - 1; s++) {
        if ((st = wait_for(g, &pm->prog, B + 1 + s, abort)) != PW_OK) break;
        const pw_span *ps = pm->spans;
        int pn = pm->n_spans;
        pthread_mutex_unlock(&g->mu);
        int64_t lo, hi;
        pw_ring_segment(L, n, ((k - s - 1) % n + n) % n, &lo, &hi);
        st = seg_apply(g->mem, spans, n_spans, ps, pn, lo, hi, 1);
        pthread_mutex_lock(&g->mu);
        if (st != PW_OK) break;
        bump(g, k, B + 2 + s);
    }
    /* All-gather. */
    for (int t = 0; st == PW_OK && t < n - 1; t++) {
        if ((st = wait_for(g, &pm->prog, B + n + t, abort)) != PW_OK) break;
        if ((st = wait_for(g, &nm->prog, B + 2 + t, abort)) != PW_OK) break;
        const pw_span *ps = pm->spans;
        int pn = pm->n_spans;
        pthread_mutex_unlock(&g->mu);
        int64_t lo, hi;
        pw_ring_segment(L, n, ((k - t) % n + n) % n, &lo, &hi);
        st = seg_apply(g->mem, spans, n_spans, ps, pn, lo, hi, 0);
        pthread_mutex_lock(&g->mu);
        if (st != PW_OK) break;
        bump(g, k, B + n + 1 + t);
    }
    /* Our floats are the caller's again once the next member has read them. */
    if (st == PW_OK) st = wait_for(g, &nm->prog, B + 2 * (int64_t)n - 1, abort);
    pthread_mutex_unlock(&g->mu);
    return st;
}

/* With g->mu held: every member's counter >= target. */
static pw_status wait_all(pw_shm_group *g, int64_t target, const atomic_int *abort)
{
    for (int j = 0; j < g->n; j++) PW_CHECK(wait_for(g, &g->m[j].prog, target, abort));
    return PW_OK;
}

static pw_status shm_tree_allreduce(pw_shm_group *g, int k, const pw_span *spans, int n_spans,
                                    const atomic_int *abort)
{
    const int n = g->n;
    const int64_t L = pw_span_total(spans, n_spans);
    pthread_mutex_lock(&g->mu);
    member *me = &g->m[k];
    const int64_t B = me->rounds * 3;
    me->rounds++;
    me->spans = spans;
    me->n_spans = n_spans;
    me->total = L;
    bump(g, k, B + 1);
    pw_status st = wait_all(g, B + 1, abort);
    for (int j = 0; st == PW_OK && j < n; j++)
        if (g->m[j].total != L)
            st = pw_error(PW_ERR_SHAPE, "all-reduce: member %d has %lld floats, member %d %lld", j,
                          (long long)g->m[j].total, k, (long long)L);
    pthread_mutex_unlock(&g->mu);
    /* Segment k of every member: the pairs at distance 1, 2, 4 ... */
    int64_t lo, hi;
    pw_ring_segment(L, n, k, &lo, &hi);
    for (int w = 1; st == PW_OK && w < n; w *= 2)
        for (int a = 0; st == PW_OK && a + w < n; a += 2 * w)
            st = seg_apply(g->mem, g->m[a].spans, g->m[a].n_spans, g->m[a + w].spans, g->m[a + w].n_spans,
                           lo, hi, 1);
    pthread_mutex_lock(&g->mu);
    if (st == PW_OK) {
        bump(g, k, B + 2);
        st = wait_all(g, B + 2, abort);
    }
    if (st == PW_OK && k != 0) {
        pthread_mutex_unlock(&g->mu);
        st = seg_apply(g->mem, spans, n_spans, g->m[0].spans, g->m[0].n_spans, 0, L, 0);
        pthread_mutex_lock(&g->mu);
    }
    if (st == PW_OK) {
        bump(g, k, B + 3);
        if (k == 0) st = wait_all(g, B + 3, abort);
    }
    pthread_mutex_unlock(&g->mu);
    return st;
}

static pw_status shm_allreduce(void *self, int k, const pw_span *spans, int n_spans,
                               const atomic_int *abort)
{
    pw_shm_group *g = self;
    if (g->n == 1) { /* nothing to sum; the round still counts for pw_shm_group_joined */
        pthread_mutex_lock(&g->mu);
        g->m[k].rounds++;
        pthread_mutex_unlock(&g->mu);
        return PW_OK;
    }
    if (g->algo == PW_COLL_TREE) return shm_tree_allreduce(g, k, spans, n_spans, abort);
    return shm_ring_allreduce(g, k, spans, n_spans, abort);
}

static pw_status shm_allgather_f64(void *self, int k, double v, double *out, const atomic_int *abort)
{
    pw_shm_group *g = self;
    pthread_mutex_lock(&g->mu);
    member *me = &g->m[k];
    int64_t r = me->gather_rounds;
    me->gather[r & 1] = v;
    me->gather_rounds = r + 1;
    pthread_cond_broadcast(&g->cv);
    pw_status st = PW_OK;
    for (int j = 0; j < g->n && st == PW_OK; j++) {
        st = wait_for(g, &g->m[j].gather_rounds, r + 1, abort);
        if (st == PW_OK) out[j] = g->m[j].gather[r & 1];
    }
    pthread_mutex_unlock(&g->mu);
    return st;
}

/* Publish the pointer, copy every member's bytes once all have published,
 * and leave once all have copied (the caller may then reuse `mine`). Host
 * memory only. */
static pw_status shm_allgather_bytes(void *self, int k, const void *mine, int64_t bytes, void *out,
                                     const atomic_int *abort)
{
    pw_shm_group *g = self;
    pthread_mutex_lock(&g->mu);
    member *me = &g->m[k];
    const int64_t r = me->blob_rounds;
    me->blob = mine;
    me->blob_bytes = bytes;
    me->blob_rounds = r + 1;
    pthread_cond_broadcast(&g->cv);
    pw_status st = PW_OK;
    for (int j = 0; j < g->n && st == PW_OK; j++) st = wait_for(g, &g->m[j].blob_rounds, r + 1, abort);
    for (int j = 0; j < g->n && st == PW_OK; j++)
        if (g->m[j].blob_bytes != bytes)
            st = pw_error(PW_ERR_SHAPE, "all-gather: member %d has %lld bytes, member %d %lld", j,
                          (long long)g->m[j].blob_bytes, k, (long long)bytes);
    pthread_mutex_unlock(&g->mu);
    for (int j = 0; j < g->n && st == PW_OK; j++)
        if (bytes) memcpy((char *)out + (size_t)j * (size_t)bytes, g->m[j].blob, (size_t)bytes);
    pthread_mutex_lock(&g->mu);
    if (st == PW_OK) {
        me->blob_read = r + 1;
        pthread_cond_broadcast(&g->cv);
        for (int j = 0; j < g->n && st == PW_OK; j++) st = wait_for(g, &g->m[j].blob_read, r + 1, abort);
    }
    pthread_mutex_unlock(&g->mu);
    return st;
}

static const pw_coll_i shm_tree_i = {
    .name = "shm-tree",
    .allreduce = shm_allreduce,
    .allgather_f64 = shm_allgather_f64,
    .allgather_bytes = shm_allgather_bytes,
};
static const pw_coll_i shm_ring_i = {
    .name = "shm-ring",
    .allreduce = shm_allreduce,
    .allgather_f64 = shm_allgather_f64,
    .allgather_bytes = shm_allgather_bytes,
};

void pw_shm_group_set_algo(pw_shm_group *g, pw_coll_algo algo)
{
    g->algo = algo == PW_COLL_RING ? PW_COLL_RING : PW_COLL_TREE;
}

void pw_shm_group_set_memory(pw_shm_group *g, const pw_span_mem *mem)
{
    g->mem = mem && mem->apply && mem->fence ? mem : NULL;
}

pw_coll pw_shm_group_member(pw_shm_group *g, int k)
{
    pw_coll c = {.vt = g && g->algo == PW_COLL_RING ? &shm_ring_i : &shm_tree_i, .self = g, .member = k, .n_members = g ? g->n : 0};
    return c;
}
