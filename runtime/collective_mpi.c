/* pipewright — collectives over MPI: the tree and ring all-reduces of
 * collective.h over MPI_Isend/MPI_Irecv (the same additions in the same
 * order as in process, so the bytes match), MPI_Iallreduce as the alternative,
 * and an all-gather of one double. Blocking calls meant for a communication
 * thread: they test their requests without blocking inside MPI, so an abort
 * flag stops them. */
#ifdef PW_HAVE_MPI
#include <limits.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runtime/trace.h" /* pw_now_ns */
#include "runtime/transport-internal.h"

enum { TAG_RS = 11, TAG_AG = 12, TAG_AR = 13, TAG_TS = 14, TAG_TG = 15 };

typedef struct mpi_coll {
    MPI_Comm comm;
    int n, me;
    pw_allreduce_algo algo;
    float *pack;          /* a bucket of several spans, contiguous */
    int64_t pack_cap;
    float *tmp;           /* received segments (ring: one partial; tree: n − 1 copies) */
    int64_t tmp_cap;
    MPI_Request *req;     /* [2n] the tree's requests */
    atomic_int waiting;   /* the member a step waits for (the tree: the first
                             member that has not sent), -1 */
    pw_mpi_watch_fn watch; /* (optional) asked while the tree waits: pw_mpi_coll_watch */
    void *watch_arg;
} mpi_coll;

/* pw_mpi_wait, asking the coll's watch (when set) every few tens of
 * microseconds once the first spins have passed: a watch that returns an
 * error ends the wait with it. */
static pw_status coll_wait(mpi_coll *c, MPI_Request *reqs, int n, const atomic_int *abort, const char *what)
{
    if (!c->watch) return pw_mpi_wait(reqs, n, MPI_STATUSES_IGNORE, abort, what);
    const int64_t t0 = pw_now_ns();
    for (int spin = 0;; spin++) {
        int flag = 0;
        pw_mpi_lock();
        int rc = MPI_Testall(n, reqs, &flag, MPI_STATUSES_IGNORE);
        pw_mpi_unlock();
        if (rc != MPI_SUCCESS) return pw_mpi_error(rc, what);
        if (flag) return PW_OK;
        if (abort && atomic_load_explicit(abort, memory_order_relaxed))
            return pw_error(PW_ERR_TIMEOUT, "%s: aborted", what);
        if (spin < 64) {
            sched_yield();
            continue;
        }
        nanosleep(&(struct timespec){0, 20000}, NULL);
        PW_CHECK(c->watch(c->watch_arg, pw_now_ns() - t0, atomic_load(&c->waiting)));
    }
}

static pw_status grow(float **p, int64_t *cap, int64_t want)
{
    if (want <= *cap) return PW_OK;
    float *q = NULL;
    if (posix_memalign((void **)&q, 64, (size_t)want * sizeof(float)) != 0)
        return pw_error(PW_ERR_NOMEM, "all-reduce: out of memory for %lld floats", (long long)want);
    free(*p);
    *p = q;
    *cap = want;
    return PW_OK;
}

static void pack_spans(float *dst, const pw_span *spans, int n)
{
    for (int i = 0; i < n; i++) {
        if (spans[i].n) memcpy(dst, spans[i].data, (size_t)spans[i].n * sizeof(float));
        dst += spans[i].n;
    }
}

static void unpack_spans(const float *src, const pw_span *spans, int n)
{
    for (int i = 0; i < n; i++) {
        if (spans[i].n) memcpy(spans[i].data, src, (size_t)spans[i].n * sizeof(float));
        src += spans[i].n;
    }
}

/* One ring step: receive `rn` floats from prev into `rbuf` while sending
 * `sn` floats of `sbuf` to next. */
static pw_status exchange(mpi_coll *c, int tag, float *rbuf, int64_t rn, const float *sbuf, int64_t sn,
                          const atomic_int *abort)
{
    const int prev = (c->me + c->n - 1) % c->n, next = (c->me + 1) % c->n;
    MPI_Request r[2];
    MPI_Status st[2];
    pw_mpi_lock();
    int rc = MPI_Irecv(rbuf, (int)rn, MPI_FLOAT, prev, tag, c->comm, &r[0]);
    if (rc == MPI_SUCCESS) {
        rc = MPI_Isend(sbuf, (int)sn, MPI_FLOAT, next, tag, c->comm, &r[1]);
        if (rc != MPI_SUCCESS) {
            MPI_Cancel(&r[0]);
            MPI_Request_free(&r[0]);
        }
    }
    pw_mpi_unlock();
    if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "all-reduce ring step");
    atomic_store(&c->waiting, prev);
    pw_status ws = pw_mpi_wait(r, 2, st, abort, "all-reduce ring step");
    atomic_store(&c->waiting, -1);
    PW_CHECK(ws);
    int got = 0;
    MPI_Get_count(&st[0], MPI_FLOAT, &got);
    if (got != (int)rn)
        return pw_error(PW_ERR_SHAPE, "all-reduce: member %d sent %d floats of a segment, expected %lld "
                        "(the members' buckets differ)", prev, got, (long long)rn);
    return PW_OK;
}

static pw_status ring(mpi_coll *c, float *buf, int64_t L, const atomic_int *abort)
{
    const int n = c->n, k = c->me;
    PW_CHECK(grow(&c->tmp, &c->tmp_cap, L / n + 2));
    for (int s = 0; s < n - 1; s++) {
        int64_t slo, shi, rlo, rhi;
        pw_ring_segment(L, n, ((k - s) % n + n) % n, &slo, &shi);
        pw_ring_segment(L, n, ((k - s - 1) % n + n) % n, &rlo, &rhi);
        PW_CHECK(exchange(c, TAG_RS, c->tmp, rhi - rlo, buf + slo, shi - slo, abort));
        float *restrict d = buf + rlo;
        const float *restrict p = c->tmp;
        for (int64_t i = 0; i < rhi - rlo; i++) d[i] = p[i] + d[i];
    }
    for (int t = 0; t < n - 1; t++) {
        int64_t slo, shi, rlo, rhi;
        pw_ring_segment(L, n, ((k + 1 - t) % n + n) % n, &slo, &shi);
        pw_ring_segment(L, n, ((k - t) % n + n) % n, &rlo, &rhi);
        PW_CHECK(exchange(c, TAG_AG, buf + rlo, rhi - rlo, buf + slo, shi - slo, abort));
    }
    return PW_OK;
}

/* Waits for the tree's `n` requests; `from[i]` is whom request i waits on
 * (for pw_transport_blame's "waiting for"). */
static pw_status tree_wait(mpi_coll *c, int n, const int *from, const atomic_int *abort, const char *what)
{
    for (int i = 0; i < n; i++) { /* in order: the first one not done is whom we wait for */
        if (from[i] >= 0) atomic_store(&c->waiting, from[i]);
        pw_status st = coll_wait(c, &c->req[i], 1, abort, what);
        if (st != PW_OK) {
            pw_mpi_lock();
            for (int j = i + 1; j < n; j++) {
                MPI_Cancel(&c->req[j]);
                MPI_Request_free(&c->req[j]);
            }
            pw_mpi_unlock();
            atomic_store(&c->waiting, -1);
            return st;
        }
    }
    atomic_store(&c->waiting, -1);
    return PW_OK;
}

/* collective.h's tree: member k receives every other member's copy of
 * segment k, sums them pairwise in member order, and sends the sum back. */
static pw_status tree(mpi_coll *c, float *buf, int64_t L, const atomic_int *abort)
{
    const int n = c->n, k = c->me;
    int64_t lo, hi;
    pw_ring_segment(L, n, k, &lo, &hi);
    const int64_t seg = L / n + 1; /* every segment fits */
    PW_CHECK(grow(&c->tmp, &c->tmp_cap, seg * n));
    if (!c->req && !(c->req = malloc(sizeof *c->req * 2 * (size_t)n)))
        return pw_error(PW_ERR_NOMEM, "all-reduce: out of memory");
    int from[2 * 64 + 2], *fromp = n <= 64 ? from : malloc(sizeof(int) * 2 * (size_t)n);
    if (!fromp) return pw_error(PW_ERR_NOMEM, "all-reduce: out of memory");
    /* Reduce: receive segment k from everyone, send segment j to member j. */
    int nr = 0, rc = MPI_SUCCESS;
    pw_mpi_lock();
    for (int j = 0; j < n && rc == MPI_SUCCESS; j++) {
        if (j == k) continue;
        fromp[nr] = j;
        rc = MPI_Irecv(c->tmp + (int64_t)j * seg, (int)(hi - lo), MPI_FLOAT, j, TAG_TS, c->comm, &c->req[nr++]);
    }
    for (int j = 0; j < n && rc == MPI_SUCCESS; j++) {
        if (j == k) continue;
        int64_t jlo, jhi;
        pw_ring_segment(L, n, j, &jlo, &jhi);
        fromp[nr] = -1;
        rc = MPI_Isend(buf + jlo, (int)(jhi - jlo), MPI_FLOAT, j, TAG_TS, c->comm, &c->req[nr++]);
    }
    if (rc != MPI_SUCCESS)
        for (int i = 0; i < nr - 1; i++) {
            MPI_Cancel(&c->req[i]);
            MPI_Request_free(&c->req[i]);
        }
    pw_mpi_unlock();
    pw_status st = rc != MPI_SUCCESS ? pw_mpi_error(rc, "all-reduce tree") : tree_wait(c, nr, fromp, abort,
                                                                                     "all-reduce tree");
    if (st == PW_OK) {
        /* Our own copy joins the others in member order; pairs at distance 1, 2, 4 ... */
        float *part[64], **pp = n <= 64 ? part : malloc(sizeof(float *) * (size_t)n);
        if (!pp) st = pw_error(PW_ERR_NOMEM, "all-reduce: out of memory");
        for (int j = 0; pp && j < n; j++) pp[j] = j == k ? buf + lo : c->tmp + (int64_t)j * seg;
        for (int w = 1; pp && w < n; w *= 2)
            for (int a = 0; a + w < n; a += 2 * w) {
                float *restrict d = pp[a];
                const float *restrict q = pp[a + w];
                for (int64_t i = 0; i < hi - lo; i++) d[i] = d[i] + q[i];
            }
        if (pp && k != 0) memcpy(buf + lo, pp[0], (size_t)(hi - lo) * sizeof(float));
        if (pp != part) free(pp);
    }
    /* Gather: send our sum to everyone, receive theirs in place. */
    nr = 0;
    rc = MPI_SUCCESS;
    if (st == PW_OK) {
        pw_mpi_lock();
        for (int j = 0; j < n && rc == MPI_SUCCESS; j++) {
            if (j == k) continue;
            int64_t jlo, jhi;
            pw_ring_segment(L, n, j, &jlo, &jhi);
            fromp[nr] = j;
            rc = MPI_Irecv(buf + jlo, (int)(jhi - jlo), MPI_FLOAT, j, TAG_TG, c->comm, &c->req[nr++]);
        }
        for (int j = 0; j < n && rc == MPI_SUCCESS; j++) {
            if (j == k) continue;
            fromp[nr] = -1;
            rc = MPI_Isend(buf + lo, (int)(hi - lo), MPI_FLOAT, j, TAG_TG, c->comm, &c->req[nr++]);
        }
        if (rc != MPI_SUCCESS)
            for (int i = 0; i < nr - 1; i++) {
                MPI_Cancel(&c->req[i]);
                MPI_Request_free(&c->req[i]);
            }
        pw_mpi_unlock();
        st = rc != MPI_SUCCESS ? pw_mpi_error(rc, "all-reduce tree") : tree_wait(c, nr, fromp, abort,
                                                                               "all-reduce tree");
    }
    if (fromp != from) free(fromp);
    return st;
}

static pw_status mpi_allreduce(void *self, int member, const pw_span *spans, int n_spans,
                               const atomic_int *abort)
{
    (void)member;
    mpi_coll *c = self;
    int64_t L = pw_span_total(spans, n_spans);
    if (c->n == 1 || L == 0) return PW_OK;
    if (L > INT_MAX)
        return pw_error(PW_ERR_UNSUPPORTED, "all-reduce: a bucket of %lld floats is too large for MPI "
                        "(use more buckets)", (long long)L);
    float *buf;
    if (n_spans == 1) {
        buf = spans[0].data;
    } else {
        PW_CHECK(grow(&c->pack, &c->pack_cap, L));
        pack_spans(c->pack, spans, n_spans);
        buf = c->pack;
    }
    pw_status st;
    if (c->algo == PW_ALLREDUCE_MPI) {
        MPI_Request r;
        pw_mpi_lock();
        int rc = MPI_Iallreduce(MPI_IN_PLACE, buf, (int)L, MPI_FLOAT, MPI_SUM, c->comm, &r);
        pw_mpi_unlock();
        st = rc == MPI_SUCCESS ? pw_mpi_wait(&r, 1, NULL, abort, "MPI_Iallreduce")
                               : pw_mpi_error(rc, "MPI_Iallreduce");
    } else if (c->algo == PW_ALLREDUCE_RING) {
        st = ring(c, buf, L, abort);
    } else {
        st = tree(c, buf, L, abort);
    }
    if (st == PW_OK && n_spans != 1) unpack_spans(c->pack, spans, n_spans);
    return st;
}

static pw_status mpi_allgather_f64(void *self, int member, double v, double *out, const atomic_int *abort)
{
    (void)member;
    mpi_coll *c = self;
    MPI_Request r;
    double mine = v;
    pw_mpi_lock();
    int rc = MPI_Iallgather(&mine, 1, MPI_DOUBLE, out, 1, MPI_DOUBLE, c->comm, &r);
    pw_mpi_unlock();
    if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "MPI_Iallgather");
    return pw_mpi_wait(&r, 1, NULL, abort, "MPI_Iallgather");
}

static pw_status mpi_allgather_bytes(void *self, int member, const void *mine, int64_t bytes, void *out,
                                     const atomic_int *abort)
{
    (void)member;
    mpi_coll *c = self;
    if (bytes > INT_MAX)
        return pw_error(PW_ERR_UNSUPPORTED, "all-gather: %lld bytes are too many for MPI (use more buckets)",
                        (long long)bytes);
    if (c->n == 1) {
        if (bytes) memcpy(out, mine, (size_t)bytes);
        return PW_OK;
    }
    MPI_Request r;
    pw_mpi_lock();
    int rc = MPI_Iallgather(mine, (int)bytes, MPI_BYTE, out, (int)bytes, MPI_BYTE, c->comm, &r);
    pw_mpi_unlock();
    if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "MPI_Iallgather");
    atomic_store(&c->waiting, -1); /* any member: the watch (if set) blames the group */
    return coll_wait(c, &r, 1, abort, "MPI_Iallgather");
}

static int mpi_waiting_for(void *self, int member)
{
    (void)member;
    mpi_coll *c = self;
    return atomic_load(&c->waiting);
}

static const pw_coll_i mpi_tree_i = {
    .name = "mpi-tree", .allreduce = mpi_allreduce, .allgather_f64 = mpi_allgather_f64,
    .waiting_for = mpi_waiting_for, .allgather_bytes = mpi_allgather_bytes};
static const pw_coll_i mpi_ring_i = {
    .name = "mpi-ring", .allreduce = mpi_allreduce, .allgather_f64 = mpi_allgather_f64,
    .waiting_for = mpi_waiting_for, .allgather_bytes = mpi_allgather_bytes};
static const pw_coll_i mpi_iallreduce_i = {
    .name = "mpi-iallreduce", .allreduce = mpi_allreduce, .allgather_f64 = mpi_allgather_f64,
    .allgather_bytes = mpi_allgather_bytes};

pw_status pw_mpi_coll_init(MPI_Comm comm, pw_allreduce_algo algo, pw_coll *out)
{
    memset(out, 0, sizeof *out);
    mpi_coll *c = calloc(1, sizeof *c);
    if (!c) return pw_error(PW_ERR_NOMEM, "MPI collective: out of memory");
    c->comm = comm;
    c->algo = algo;
    atomic_init(&c->waiting, -1);
    pw_mpi_lock();
    MPI_Comm_size(comm, &c->n);
    MPI_Comm_rank(comm, &c->me);
    pw_mpi_unlock();
    out->vt = algo == PW_ALLREDUCE_MPI ? &mpi_iallreduce_i : algo == PW_ALLREDUCE_RING ? &mpi_ring_i : &mpi_tree_i;
    out->self = c;
    out->member = c->me;
    out->n_members = c->n;
    return PW_OK;
}

void pw_mpi_coll_watch(pw_coll *co, pw_mpi_watch_fn fn, void *arg)
{
    mpi_coll *c = co->self;
    c->watch = fn;
    c->watch_arg = arg;
}

void pw_mpi_coll_fini(pw_coll *co)
{
    if (!co || !co->self) return;
    mpi_coll *c = co->self;
    free(c->pack);
    free(c->tmp);
    free(c->req);
    free(c);
    co->self = NULL;
}

pw_status pw_mpi_coll_create(const void *comm, pw_allreduce_algo algo, pw_coll *out)
{
    if (!comm || !out) return pw_error(PW_ERR_INVALID_ARG, "pw_mpi_coll_create: NULL argument");
    return pw_mpi_coll_init(*(const MPI_Comm *)comm, algo, out);
}

void pw_mpi_coll_destroy(pw_coll *c) { pw_mpi_coll_fini(c); }
#else
typedef int pw_collective_mpi_unused; /* a build without MPI */
#endif
