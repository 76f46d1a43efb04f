/* pipewright — the MPI transport: initialisation, the process layout and
 * its communicators, non-blocking point-to-point for the engine, the
 * blocking world operations tools use between steps, and the heartbeat that
 * bounds every one of them (see transport.h).
 *
 * Heartbeat. A thread per process sends this process's progress board (a
 * 40-byte record) to every other process every HB_PERIOD_NS on a
 * communicator of its own, at most one send in flight per peer, and keeps
 * the last record received from each with its arrival time and the time its
 * content last changed. pw_transport_blame reads that table: a peer whose
 * records stopped coming is stopped or gone; a peer that waits for nobody
 * and whose record has not changed for the watchdog is hung in a
 * computation. The world operations are non-blocking requests polled
 * against the watchdog; when it expires they ask blame whom to name. */
#ifdef PW_HAVE_MPI
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "runtime/link.h"
#include "runtime/log.h"
#include "runtime/trace.h"
#include "runtime/transport-internal.h"

int pw_mpi_serialize;
static pthread_mutex_t mpi_mu = PTHREAD_MUTEX_INITIALIZER;

void pw_mpi_lock(void)
{
    if (pw_mpi_serialize) pthread_mutex_lock(&mpi_mu);
}
void pw_mpi_unlock(void)
{
    if (pw_mpi_serialize) pthread_mutex_unlock(&mpi_mu);
}

int pw_mpi_built(void) { return 1; }

pw_status pw_mpi_error(int rc, const char *what)
{
    char text[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, text, &len);
    return pw_error(PW_ERR_IO, "%s: MPI error: %s", what, text);
}

pw_status pw_mpi_wait(MPI_Request *reqs, int n, MPI_Status *sts, const atomic_int *abort, const char *what)
{
    for (int spin = 0;; spin++) {
        int flag = 0;
        pw_mpi_lock();
        int rc = MPI_Testall(n, reqs, &flag, sts ? sts : MPI_STATUSES_IGNORE);
        pw_mpi_unlock();
        if (rc != MPI_SUCCESS) return pw_mpi_error(rc, what);
        if (flag) return PW_OK;
        if (abort && atomic_load_explicit(abort, memory_order_relaxed))
            return pw_error(PW_ERR_TIMEOUT, "%s: aborted", what);
        /* Yield first (a neighbour on this host may need the core to send),
         * then poll every ~20 us: latency well under a millisecond without
         * burning a core that compute threads need. */
        if (spin < 64) {
            sched_yield();
        } else {
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        }
    }
}

/* ------------------------------------------------------------ the transport */

enum { HB_TAG = 1 };
#define HB_PERIOD_NS 100000000LL /* 100 ms: 10 small messages a second to each peer ... */
#define HB_TICK_NS 10000000LL    /* ... or sooner, after 10 ms, when the phase or the step changed */

/* One heartbeat: a snapshot of a process's pw_transport_state. */
typedef struct hb_rec {
    int32_t phase, wait_peer, act, mb;
    int32_t verdict, pad;  /* the world rank this process found stalled and is aborting
                              for, -1: none (see mt_blame) */
    int64_t step, progress;
} hb_rec;

typedef struct hb_peer {
    hb_rec rec;            /* (hb_mu) the last record received */
    int64_t seen_ns;       /* (hb_mu) when it arrived (creation time before the first) */
    int64_t changed_ns;    /* (hb_mu) when its content last changed */
    hb_rec rbuf, sbuf;     /* heartbeat thread only: the posted receive and send */
    MPI_Request rreq, sreq;
} hb_peer;

typedef struct mpi_transport {
    MPI_Comm all;          /* every process of the run, servers included */
    MPI_Comm world, replica_comm, stage_comm; /* world: the workers (or, on a server, the servers) */
    MPI_Comm tp_comm;      /* n_tp > 1: the T processes of this replica's stage */
    MPI_Comm ps_comm;      /* parameter-server messages (n_servers > 0), over `all` */
    int n_workers;         /* S x R x T: world ranks from n_workers on are servers */
    int finalize;          /* we initialised MPI */
    pw_coll stage_coll, replica_coll;
    pw_coll tp_inner;      /* n_tp > 1: the tree over tp_comm, watched (tp_watch) */
    int n_tp, tp_rank;
    int64_t tp_next_blame; /* tp_watch: when to ask blame next (0: not yet) */
    pw_link link;          /* a slow link for the stages' messages and the all-reduce (link.h) */
    pw_link_clock link_clock; /* this process's link: the worker's thread only (mt_isend) */
    pw_link_clock ps_clock;   /* its link for parameter-server messages (mt_ps_isend, under ps_clock_mu) */
    pthread_mutex_t ps_clock_mu;
    int world_rank, world_size, n_ranks; /* world_size: every process (the heartbeat's table) */
    double watchdog_s;
    pw_transport_state state;  /* this process's board (pw_transport.state points here) */
    MPI_Comm hb_comm;
    hb_peer *peers;        /* [world_size] */
    pthread_mutex_t hb_mu;
    pthread_t hb_thread;
    int hb_started;
    atomic_int hb_quit;
    atomic_llong hb_last_ns;   /* when the heartbeat thread last read its messages */
    atomic_int hb_failed;      /* the thread could not run: blame judges nobody */
    atomic_int verdict;        /* whom this process's blame named (-1: nobody yet) */
} mpi_transport;

/* ------------------------------------------------------------ heartbeat */

static hb_rec snapshot(mpi_transport *m)
{
    pw_transport_state *s = &m->state;
    return (hb_rec){.phase = atomic_load(&s->phase), .wait_peer = atomic_load(&s->wait_peer),
                    .act = atomic_load(&s->act), .mb = atomic_load(&s->mb), .step = atomic_load(&s->step),
                    .progress = atomic_load(&s->progress), .verdict = atomic_load(&m->verdict)};
}

static void *hb_main(void *arg)
{
    mpi_transport *m = arg;
    const int W = m->world_size;
    hb_rec *got = calloc((size_t)W, sizeof *got);
    unsigned char *fresh = calloc((size_t)W, 1);
    if (!got || !fresh) {
        free(got);
        free(fresh);
        PW_WARN("MPI rank %d: no memory for the heartbeat; hangs of other processes will be named less "
                "precisely", m->world_rank);
        atomic_store(&m->hb_failed, 1);
        return NULL;
    }
    hb_rec sent = {.phase = -1};
    int64_t sent_ns = 0;
    while (!atomic_load(&m->hb_quit)) {
        const hb_rec mine = snapshot(m);
        int64_t t = pw_now_ns();
        /* What the others last heard should say where this process is, even
         * when it stops right after a change: send early on a new phase or
         * step (a step every few ms means at most one record per tick). */
        const int send = t - sent_ns >= HB_PERIOD_NS || mine.phase != sent.phase || mine.step != sent.step ||
                         mine.verdict != sent.verdict;
        if (send) {
            sent = mine;
            sent_ns = t;
        }
        memset(fresh, 0, (size_t)W);
        pw_mpi_lock();
        for (int p = 0; p < W; p++) {
            if (p == m->world_rank) continue;
            hb_peer *q = &m->peers[p];
            int flag = 0;
            /* A peer that stopped reading (SIGSTOP) holds our one send; we
             * skip it until the send completes instead of piling up more. */
            if (q->sreq != MPI_REQUEST_NULL) MPI_Test(&q->sreq, &flag, MPI_STATUS_IGNORE);
            if (send && q->sreq == MPI_REQUEST_NULL) {
                q->sbuf = mine;
                MPI_Isend(&q->sbuf, (int)sizeof q->sbuf, MPI_BYTE, p, HB_TAG, m->hb_comm, &q->sreq);
            }
            for (int k = 0; k < 16; k++) { /* drain what queued up; keep the newest */
                flag = 0;
                if (MPI_Test(&q->rreq, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS || !flag) break;
                got[p] = q->rbuf;
                fresh[p] = 1;
                MPI_Irecv(&q->rbuf, (int)sizeof q->rbuf, MPI_BYTE, p, HB_TAG, m->hb_comm, &q->rreq);
            }
        }
        pw_mpi_unlock();
        const int64_t now = pw_now_ns();
        atomic_store(&m->hb_last_ns, now);
        pthread_mutex_lock(&m->hb_mu);
        for (int p = 0; p < W; p++) {
            if (!fresh[p]) continue;
            hb_peer *q = &m->peers[p];
            if (memcmp(&q->rec, &got[p], sizeof got[p]) != 0) q->changed_ns = now;
            q->rec = got[p];
            q->seen_ns = now;
        }
        pthread_mutex_unlock(&m->hb_mu);
        nanosleep(&(struct timespec){0, HB_TICK_NS}, NULL);
    }
    free(got);
    free(fresh);
    return NULL;
}

static pw_status hb_start(mpi_transport *m)
{
    const int W = m->world_size;
    m->peers = calloc((size_t)W, sizeof *m->peers);
    if (!m->peers) return pw_error(PW_ERR_NOMEM, "MPI heartbeat: out of memory");
    pthread_mutex_init(&m->hb_mu, NULL);
    int rc = MPI_Comm_dup(m->all, &m->hb_comm);
    if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "MPI_Comm_dup (heartbeat)");
    const int64_t now = pw_now_ns();
    for (int p = 0; p < W; p++) {
        hb_peer *q = &m->peers[p];
        q->rec.wait_peer = PW_WAIT_NOBODY;
        q->rec.act = q->rec.mb = q->rec.verdict = -1;
        q->seen_ns = q->changed_ns = now;
        q->sreq = q->rreq = MPI_REQUEST_NULL;
        if (p == m->world_rank) continue;
        rc = MPI_Irecv(&q->rbuf, (int)sizeof q->rbuf, MPI_BYTE, p, HB_TAG, m->hb_comm, &q->rreq);
        if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "MPI_Irecv (heartbeat)");
    }
    rc = pthread_create(&m->hb_thread, NULL, hb_main, m);
    if (rc != 0) return pw_error(PW_ERR_NOMEM, "MPI heartbeat: cannot start its thread: %s", strerror(rc));
    m->hb_started = 1;
    return PW_OK;
}

static void hb_stop(mpi_transport *m)
{
    if (m->hb_started) {
        atomic_store(&m->hb_quit, 1);
        pthread_join(m->hb_thread, NULL);
        m->hb_started = 0;
    }
    if (!m->peers) return;
    for (int p = 0; p < m->world_size; p++) {
        hb_peer *q = &m->peers[p];
        if (q->rreq != MPI_REQUEST_NULL) {
            MPI_Cancel(&q->rreq);
            MPI_Wait(&q->rreq, MPI_STATUS_IGNORE);
        }
        /* Our last heartbeat completes (or is dropped) in the background. */
        if (q->sreq != MPI_REQUEST_NULL) MPI_Request_free(&q->sreq);
    }
    free(m->peers);
    m->peers = NULL;
    pthread_mutex_destroy(&m->hb_mu);
}

/* "MPI rank 3 (replica 1, stage 1)", with tensor parallelism "MPI rank 3
 * (replica 0, stage 1, tensor rank 1)", or, for a parameter server, "MPI
 * rank 4 (server 0)". */
static const char *who_is(const mpi_transport *m, int v, char *buf, size_t n)
{
    const int T = m->n_tp > 1 ? m->n_tp : 1, ps = v / T; /* ps: the pipeline process (replica, rank) */
    if (v >= m->n_workers) snprintf(buf, n, "MPI rank %d (server %d)", v, v - m->n_workers);
    else if (T > 1)
        snprintf(buf, n, "MPI rank %d (replica %d, stage %d, tensor rank %d)", v, ps / m->n_ranks, ps % m->n_ranks,
                 v % T);
    else snprintf(buf, n, "MPI rank %d (replica %d, stage %d)", v, v / m->n_ranks, v % m->n_ranks);
    return buf;
}

/* "in training step 5 (F of micro-batch 1)", "in evaluation after step 12" */
static void describe(const hb_rec *r, const char *(*act_name)(int), char *buf, size_t n)
{
    const char *ph = pw_phase_name(r->phase);
    if (r->phase == PW_PHASE_STEP && r->act >= 0) {
        char act[24];
        if (act_name) snprintf(act, sizeof act, "%s", act_name(r->act));
        else snprintf(act, sizeof act, "action %d", r->act);
        if (r->mb >= 0) snprintf(buf, n, "in %s %lld (%s of micro-batch %d)", ph, (long long)r->step, act, r->mb);
        else snprintf(buf, n, "in %s %lld (%s)", ph, (long long)r->step, act);
    } else if (r->phase == PW_PHASE_STEP) {
        snprintf(buf, n, "in %s %lld", ph, (long long)r->step);
    } else if (r->phase == PW_PHASE_START) {
        snprintf(buf, n, "in %s", ph);
    } else {
        snprintf(buf, n, "%s %s after step %lld", r->phase == PW_PHASE_EPOCH ? "at the" : "in", ph,
                 (long long)r->step);
    }
}

/* The caller fails its wait and the job is aborted next: tell the others
 * whom this process found (the heartbeat sends a changed record within a
 * tick), and give that record a few ticks to leave before the abort. */
static int publish_verdict(mpi_transport *m, int culprit)
{
    if (atomic_exchange(&m->verdict, culprit) != culprit)
        nanosleep(&(struct timespec){0, 5 * HB_TICK_NS}, NULL);
    return culprit;
}

static int mt_blame(void *self, double stall_s, const char *(*act_name)(int), char *buf, size_t n)
{
    mpi_transport *m = self;
    const int W = m->world_size, me = m->world_rank;
    char who[96];
    if (!m->peers || atomic_load(&m->hb_failed)) {
        if (n) buf[0] = '\0';
        return -2; /* the wait fails after the watchdog, naming only whom it waited for */
    }
    const int64_t now = pw_now_ns(), stall = (int64_t)(stall_s * 1e9);
    /* Silence: several heartbeat periods late, and half the watchdog. */
    const int64_t silent = stall / 2 > 1000000000LL ? stall / 2 : 1000000000LL;
    int culprit = -1, busy_progressing = 0;
    int64_t worst = 0;
    char what[128];
    /* This process was itself stopped (Ctrl-Z, a frozen VM) or starved:
     * its table is old, so judge nobody until the heartbeat catches up. */
    if (now - atomic_load(&m->hb_last_ns) > HB_PERIOD_NS * 5) return -1;
    pthread_mutex_lock(&m->hb_mu);
    /* A process whose watchdog fired first has named the culprit and is
     * aborting the job (so its own heartbeat stops next): take its verdict
     * rather than blame it, so every message names the same rank. A verdict
     * naming this very process is stale (it is alive): ignored. */
    for (int p = 0; p < W; p++) {
        const int v = m->peers[p].rec.verdict;
        if (p == me || v < 0 || v >= W || v == me) continue;
        describe(&m->peers[v].rec, act_name, what, sizeof what);
        snprintf(buf, n, "%s stalled, as MPI rank %d found first; last heard here %s",
                 who_is(m, v, who, sizeof who), p, what);
        pthread_mutex_unlock(&m->hb_mu);
        return publish_verdict(m, v);
    }
    for (int p = 0; p < W; p++) {
        if (p == me || m->peers[p].rec.verdict >= 0) continue; /* aborting, not stalled */
        int64_t age = now - m->peers[p].seen_ns;
        if (age > silent && age > worst) worst = age, culprit = p;
    }
    if (culprit >= 0) {
        describe(&m->peers[culprit].rec, act_name, what, sizeof what);
        snprintf(buf, n, "%s stalled: no heartbeat from it for %.1f s (stopped, or its host is gone); last "
                 "heard %s", who_is(m, culprit, who, sizeof who), (double)worst / 1e9, what);
        pthread_mutex_unlock(&m->hb_mu);
        return publish_verdict(m, culprit);
    }
    /* Follow who waits for whom from here; the chain ends at the process
     * that is computing. */
    int cur = atomic_load(&m->state.wait_peer);
    for (int hops = 0; cur >= 0 && cur < W && cur != me && hops < W; hops++) {
        if (m->peers[cur].rec.wait_peer == PW_WAIT_NOBODY) break;
        cur = m->peers[cur].rec.wait_peer;
    }
    if (cur >= 0 && cur < W && cur != me && m->peers[cur].rec.wait_peer == PW_WAIT_NOBODY) {
        if (now - m->peers[cur].changed_ns > stall) culprit = cur;
        else busy_progressing = 1;
    }
    /* Otherwise (a collective, or a chain that loops back): any process
     * that waits for nobody and has not moved for the watchdog. */
    for (int p = 0; culprit < 0 && !busy_progressing && p < W; p++) {
        if (p == me || m->peers[p].rec.wait_peer != PW_WAIT_NOBODY) continue;
        int64_t idle = now - m->peers[p].changed_ns;
        if (idle > stall && idle > worst) worst = idle, culprit = p;
    }
    for (int p = 0; culprit < 0 && !busy_progressing && p < W; p++)
        busy_progressing = p != me && m->peers[p].rec.wait_peer == PW_WAIT_NOBODY;
    if (culprit >= 0) {
        describe(&m->peers[culprit].rec, act_name, what, sizeof what);
        snprintf(buf, n, "%s stalled %s: no progress for %.1f s and not waiting for any process",
                 who_is(m, culprit, who, sizeof who), what, (double)(now - m->peers[culprit].changed_ns) / 1e9);
    } else if (!busy_progressing) {
        snprintf(buf, n, "no process is computing: each waits for another (a deadlock)");
    }
    pthread_mutex_unlock(&m->hb_mu);
    if (culprit >= 0) return publish_verdict(m, culprit);
    return busy_progressing ? -1 : -2;
}

/* ------------------------------------------------- the tensor-parallel group */

/* The tensor-parallel all-reduces run inside a stage's compute (F, B, W on
 * the engine's worker), where the engine's watchdog cannot see them: the
 * tree's waits ask this. It publishes the member waited for (as a world
 * rank: a stage's T ranks are consecutive) so the others' blame follows
 * the chain here, and once a wait has passed the watchdog it asks blame
 * every 100 ms, as world_wait does: a stalled process fails the wait,
 * naming it; a chain that ends at a process still making progress goes
 * on. */
static pw_status tp_watch(void *arg, int64_t waited_ns, int member)
{
    mpi_transport *m = arg;
    atomic_store(&m->state.wait_peer, member >= 0 ? m->world_rank - m->tp_rank + member : PW_WAIT_ALL);
    if (waited_ns < (int64_t)(m->watchdog_s * 1e9)) {
        m->tp_next_blame = 0;
        return PW_OK;
    }
    const int64_t now = pw_now_ns();
    if (now < m->tp_next_blame) return PW_OK;
    m->tp_next_blame = now + 100000000LL;
    char why[400], me[96];
    if (mt_blame(m, m->watchdog_s, m->state.act_name, why, sizeof why) == -1) return PW_OK;
    return pw_error(PW_ERR_TIMEOUT, "%s%s%s waited %.1f s for the tensor-parallel all-reduce of its stage", why,
                    why[0] ? "; " : "", who_is(m, m->world_rank, me, sizeof me), (double)waited_ns / 1e9);
}

/* The endpoint handed out (pw_transport.tp_coll): the watched tree, then
 * "no longer waiting" and a unit of progress on the board. */
static pw_status tp_allreduce(void *self, int member, const pw_span *spans, int n_spans, const atomic_int *abort)
{
    mpi_transport *m = self;
    pw_status st = m->tp_inner.vt->allreduce(m->tp_inner.self, member, spans, n_spans, abort);
    atomic_store(&m->state.wait_peer, PW_WAIT_NOBODY);
    atomic_fetch_add(&m->state.progress, 1);
    return st;
}

static pw_status tp_allgather_f64(void *self, int member, double v, double *out, const atomic_int *abort)
{
    mpi_transport *m = self;
    return m->tp_inner.vt->allgather_f64(m->tp_inner.self, member, v, out, abort);
}

/* The gradient norm's parts and a checkpoint's split tensors (stages/train):
 * MPI_Iallgather, between steps or in OPTIM; the board says this process
 * waits for the group meanwhile. */
static pw_status tp_allgather_bytes(void *self, int member, const void *mine, int64_t bytes, void *out,
                                    const atomic_int *abort)
{
    mpi_transport *m = self;
    atomic_store(&m->state.wait_peer, PW_WAIT_ALL);
    pw_status st = m->tp_inner.vt->allgather_bytes(m->tp_inner.self, member, mine, bytes, out, abort);
    atomic_store(&m->state.wait_peer, PW_WAIT_NOBODY);
    atomic_fetch_add(&m->state.progress, 1);
    return st;
}

static int tp_waiting_for(void *self, int member)
{
    mpi_transport *m = self;
    return m->tp_inner.vt->waiting_for(m->tp_inner.self, member);
}

static const pw_coll_i tp_coll_i = {
    .name = "mpi-tree (tensor-parallel)", .allreduce = tp_allreduce, .allgather_f64 = tp_allgather_f64,
    .waiting_for = tp_waiting_for, .allgather_bytes = tp_allgather_bytes};

/* Polls reqs until they complete, publishing that this process waits for
 * `peer`. Once the watchdog has passed, asks blame every 100 ms: a stalled
 * process (or a deadlock) fails the wait, naming it; a chain that ends at a
 * process still making progress goes on waiting. */
static pw_status world_wait(mpi_transport *m, MPI_Request *reqs, int n, MPI_Status *sts, int peer,
                            const char *what)
{
    atomic_store(&m->state.wait_peer, peer);
    const int64_t t0 = pw_now_ns();
    int64_t check = t0 + (int64_t)(m->watchdog_s * 1e9);
    pw_status st = PW_OK;
    for (int spin = 0;; spin++) {
        int flag = 0;
        pw_mpi_lock();
        int rc = MPI_Testall(n, reqs, &flag, sts ? sts : MPI_STATUSES_IGNORE);
        pw_mpi_unlock();
        if (rc != MPI_SUCCESS) {
            st = pw_mpi_error(rc, what);
            break;
        }
        if (flag) break;
        if (spin < 64) {
            sched_yield();
            continue;
        }
        nanosleep(&(struct timespec){0, 50000}, NULL);
        int64_t now = pw_now_ns();
        if (now < check) continue;
        char why[400];
        if (mt_blame(m, m->watchdog_s, m->state.act_name, why, sizeof why) == -1) {
            check = now + 100000000LL;
            continue;
        }
        char me[96];
        st = pw_error(PW_ERR_TIMEOUT, "%s%s%s waited %.1f s for %s", why, why[0] ? "; " : "",
                      who_is(m, m->world_rank, me, sizeof me), (double)(now - t0) / 1e9, what);
        break;
    }
    atomic_store(&m->state.wait_peer, PW_WAIT_NOBODY);
    atomic_fetch_add(&m->state.progress, 1);
    return st;
}

static MPI_Request *req_of(pw_treq *r) { return (MPI_Request *)(void *)r->opaque; }

static pw_status mt_isend(void *self, int to, int tag, const void *buf, size_t bytes, pw_treq *req)
{
    mpi_transport *m = self;
    if (bytes > INT_MAX) return pw_error(PW_ERR_UNSUPPORTED, "MPI send of %zu bytes (max %d)", bytes, INT_MAX);
    req->bytes = SIZE_MAX;
    req->due_ns = 0;
    if (pw_link_on(&m->link)) {
        /* A slow link: the send is posted when the model says the message
         * arrives (mt_test posts it); MPI's order per (peer, tag) is kept,
         * since one link's arrival times never decrease. */
        req->due_ns = pw_link_clock_due(&m->link_clock, &m->link, pw_now_ns(), bytes);
        req->held_buf = buf;
        req->held_bytes = bytes;
        req->held_to = to;
        req->held_tag = tag;
        req->held_ps = 0;
        *req_of(req) = MPI_REQUEST_NULL;
        return PW_OK;
    }
    pw_mpi_lock();
    int rc = MPI_Isend(buf, (int)bytes, MPI_BYTE, to, tag, m->replica_comm, req_of(req));
    pw_mpi_unlock();
    return rc == MPI_SUCCESS ? PW_OK : pw_mpi_error(rc, "MPI_Isend");
}

static pw_status mt_irecv(void *self, int from, int tag, void *buf, size_t bytes, pw_treq *req)
{
    mpi_transport *m = self;
    if (bytes > INT_MAX) return pw_error(PW_ERR_UNSUPPORTED, "MPI receive of %zu bytes (max %d)", bytes, INT_MAX);
    req->bytes = bytes;
    req->due_ns = 0; /* receives are never held back */
    pw_mpi_lock();
    int rc = MPI_Irecv(buf, (int)bytes, MPI_BYTE, from, tag, m->replica_comm, req_of(req));
    pw_mpi_unlock();
    return rc == MPI_SUCCESS ? PW_OK : pw_mpi_error(rc, "MPI_Irecv");
}

static int mt_test(void *self, pw_treq *req)
{
    mpi_transport *m = self;
    int flag = 0;
    MPI_Status st;
    if (req->due_ns) {
        if (pw_now_ns() < req->due_ns) return 0;
        req->due_ns = 0;
        pw_mpi_lock();
        int rc = MPI_Isend(req->held_buf, (int)req->held_bytes, MPI_BYTE, req->held_to, req->held_tag,
                           req->held_ps ? m->ps_comm : m->replica_comm, req_of(req));
        pw_mpi_unlock();
        if (rc != MPI_SUCCESS) {
            pw_mpi_error(rc, "MPI_Isend (held back by the slow link)");
            return -1;
        }
    }
    pw_mpi_lock();
    int rc = MPI_Test(req_of(req), &flag, &st);
    pw_mpi_unlock();
    if (rc != MPI_SUCCESS) {
        pw_mpi_error(rc, "MPI_Test");
        return -1;
    }
    if (!flag) return 0;
    if (req->bytes != SIZE_MAX) {
        int got = 0;
        MPI_Get_count(&st, MPI_BYTE, &got);
        if ((size_t)got != req->bytes) {
            pw_error(PW_ERR_SHAPE, "a message of %d bytes arrived where %zu were expected (the "
                     "stages' ports disagree)", got, req->bytes);
            return -1;
        }
    }
    return 1;
}

/* Parameter-server messages: any two processes of the run, by world rank. */
static pw_status mt_ps_isend(void *self, int to, int tag, const void *buf, size_t bytes, pw_treq *req)
{
    mpi_transport *m = self;
    if (m->ps_comm == MPI_COMM_NULL) return pw_error(PW_ERR_INVALID_ARG, "MPI: the run has no servers");
    if (bytes > INT_MAX) return pw_error(PW_ERR_UNSUPPORTED, "MPI send of %zu bytes (max %d)", bytes, INT_MAX);
    req->bytes = SIZE_MAX;
    req->due_ns = 0;
    if (pw_link_on(&m->link)) {
        /* A slow link: held back as mt_isend's (mt_test posts it on ps_comm),
         * on the process's own clock for these messages: workers push from
         * their communication thread and greet from the training thread,
         * hence the mutex. */
        pthread_mutex_lock(&m->ps_clock_mu);
        req->due_ns = pw_link_clock_due(&m->ps_clock, &m->link, pw_now_ns(), bytes);
        pthread_mutex_unlock(&m->ps_clock_mu);
        req->held_buf = buf;
        req->held_bytes = bytes;
        req->held_to = to;
        req->held_tag = tag;
        req->held_ps = 1;
        *req_of(req) = MPI_REQUEST_NULL;
        return PW_OK;
    }
    pw_mpi_lock();
    int rc = MPI_Isend(buf, (int)bytes, MPI_BYTE, to, tag, m->ps_comm, req_of(req));
    pw_mpi_unlock();
    return rc == MPI_SUCCESS ? PW_OK : pw_mpi_error(rc, "MPI_Isend (parameter server)");
}

static pw_status mt_ps_irecv(void *self, int from, int tag, void *buf, size_t bytes, pw_treq *req)
{
    mpi_transport *m = self;
    if (m->ps_comm == MPI_COMM_NULL) return pw_error(PW_ERR_INVALID_ARG, "MPI: the run has no servers");
    if (bytes > INT_MAX) return pw_error(PW_ERR_UNSUPPORTED, "MPI receive of %zu bytes (max %d)", bytes, INT_MAX);
    req->bytes = bytes;
    req->due_ns = 0;
    pw_mpi_lock();
    int rc = MPI_Irecv(buf, (int)bytes, MPI_BYTE, from, tag, m->ps_comm, req_of(req));
    pw_mpi_unlock();
    return rc == MPI_SUCCESS ? PW_OK : pw_mpi_error(rc, "MPI_Irecv (parameter server)");
}

static void mt_cancel(void *self, pw_treq *req)
{
    (void)self;
    pw_mpi_lock();
    if (*req_of(req) != MPI_REQUEST_NULL) {
        MPI_Cancel(req_of(req));
        MPI_Request_free(req_of(req));
    }
    pw_mpi_unlock();
}

/* The world operations: non-blocking requests, waited for by world_wait. */
static pw_status mt_send(void *self, int to, int tag, const void *buf, size_t bytes)
{
    mpi_transport *m = self;
    if (bytes > INT_MAX) return pw_error(PW_ERR_UNSUPPORTED, "MPI send of %zu bytes (max %d)", bytes, INT_MAX);
    MPI_Request r;
    pw_mpi_lock();
    int rc = MPI_Isend(buf, (int)bytes, MPI_BYTE, to, tag, m->world, &r);
    pw_mpi_unlock();
    if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "MPI_Isend");
    char what[96];
    snprintf(what, sizeof what, "MPI rank %d to take a message of %zu bytes", to, bytes);
    return world_wait(m, &r, 1, NULL, to, what);
}

static pw_status mt_recv(void *self, int from, int tag, void *buf, size_t bytes)
{
    mpi_transport *m = self;
    if (bytes > INT_MAX) return pw_error(PW_ERR_UNSUPPORTED, "MPI receive of %zu bytes (max %d)", bytes, INT_MAX);
    MPI_Status st;
    MPI_Request r;
    pw_mpi_lock();
    int rc = MPI_Irecv(buf, (int)bytes, MPI_BYTE, from, tag, m->world, &r);
    pw_mpi_unlock();
    if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "MPI_Irecv");
    char what[96];
    snprintf(what, sizeof what, "a message of %zu bytes from MPI rank %d", bytes, from);
    PW_CHECK(world_wait(m, &r, 1, &st, from, what));
    int got = 0;
    MPI_Get_count(&st, MPI_BYTE, &got);
    if ((size_t)got != bytes)
        return pw_error(PW_ERR_SHAPE, "MPI rank %d sent %d bytes, %zu expected", from, got, bytes);
    return PW_OK;
}

static pw_status mt_allgather(void *self, const void *mine, size_t bytes, void *all)
{
    mpi_transport *m = self;
    if (bytes > INT_MAX) return pw_error(PW_ERR_UNSUPPORTED, "MPI all-gather of %zu bytes", bytes);
    MPI_Request r;
    pw_mpi_lock();
    int rc = MPI_Iallgather(mine, (int)bytes, MPI_BYTE, all, (int)bytes, MPI_BYTE, m->world, &r);
    pw_mpi_unlock();
    if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "MPI_Iallgather");
    return world_wait(m, &r, 1, NULL, PW_WAIT_ALL, "an all-gather of every process");
}

static pw_status mt_barrier(void *self)
{
    mpi_transport *m = self;
    MPI_Request r;
    pw_mpi_lock();
    int rc = MPI_Ibarrier(m->world, &r);
    pw_mpi_unlock();
    if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "MPI_Ibarrier");
    return world_wait(m, &r, 1, NULL, PW_WAIT_ALL, "a barrier of every process");
}

static void mt_abort(void *self, int code)
{
    mpi_transport *m = self;
    MPI_Abort(m ? m->all : MPI_COMM_WORLD, code);
}

static void mt_destroy(void *self)
{
    mpi_transport *m = self;
    if (!m) return;
    pw_mpi_coll_unbuild(&m->stage_coll);
    pw_mpi_coll_fini(&m->replica_coll);
    pw_mpi_coll_fini(&m->tp_inner);
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) hb_stop(m);
    if (!fin) {
        if (m->hb_comm != MPI_COMM_NULL) MPI_Comm_free(&m->hb_comm);
        if (m->stage_comm != MPI_COMM_NULL) MPI_Comm_free(&m->stage_comm);
        if (m->tp_comm != MPI_COMM_NULL) MPI_Comm_free(&m->tp_comm);
        if (m->replica_comm != MPI_COMM_NULL) MPI_Comm_free(&m->replica_comm);
        if (m->ps_comm != MPI_COMM_NULL) MPI_Comm_free(&m->ps_comm);
        if (m->world != MPI_COMM_NULL) MPI_Comm_free(&m->world);
        if (m->all != MPI_COMM_NULL) MPI_Comm_free(&m->all);
        if (m->finalize) MPI_Finalize();
    }
    pthread_mutex_destroy(&m->ps_clock_mu);
    free(m);
}

/* ------------------------------------------------------------ clock */

enum { CLOCK_TAG = 2, CLOCK_ROUNDS = 8 };

typedef struct clock_reply {
    int64_t t0_ns;         /* rank 0's pw_now_ns() when it answered */
    uint64_t run_id;
} clock_reply;

static uint64_t draw_run_id(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t z = ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) ^ ((uint64_t)getpid() << 40);
    z += 0x9e3779b97f4a7c15u; /* splitmix64's finaliser: nearby times give unrelated ids */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

/* Measures this process's clock against world rank 0's for its traces
 * (pw_trace_set_clock; pw_trace_merge applies it). Rank 0 answers
 * CLOCK_ROUNDS pings from each other rank in turn with its pw_now_ns(); a
 * rank keeps the round with the shortest round trip, where rank 0's reading
 * is pinned best: offset = T0 - (t_send + t_recv) / 2, within +-rtt/2. A
 * rank on rank 0's host shares its CLOCK_MONOTONIC, so its offset is 0 and
 * the estimate is only recorded (a check of the method). The waits are
 * world_wait's, bounded by the watchdog; the hb_comm tag keeps the pings
 * apart from heartbeats and from the tools' world messages. */
static pw_status clock_sync(mpi_transport *m, int same_host)
{
    pw_trace_clock c = {.world_rank = m->world_rank, .world_size = m->n_workers, .same_host = same_host};
    gethostname(c.host, sizeof c.host - 1);
    char what[96];
    int rc = MPI_SUCCESS;
    if (m->world_rank == 0) {
        c.run_id = draw_run_id();
        for (int w = 1; w < m->world_size; w++)
            for (int k = 0; k < CLOCK_ROUNDS; k++) {
                int64_t ping;
                MPI_Request r;
                pw_mpi_lock();
                rc = MPI_Irecv(&ping, (int)sizeof ping, MPI_BYTE, w, CLOCK_TAG, m->hb_comm, &r);
                pw_mpi_unlock();
                if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "MPI_Irecv (clock)");
                snprintf(what, sizeof what, "a clock ping from MPI rank %d", w);
                PW_CHECK(world_wait(m, &r, 1, NULL, w, what));
                const clock_reply rep = {.t0_ns = pw_now_ns(), .run_id = c.run_id};
                pw_mpi_lock();
                rc = MPI_Isend(&rep, (int)sizeof rep, MPI_BYTE, w, CLOCK_TAG, m->hb_comm, &r);
                pw_mpi_unlock();
                if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "MPI_Isend (clock)");
                snprintf(what, sizeof what, "MPI rank %d to take a clock reply", w);
                PW_CHECK(world_wait(m, &r, 1, NULL, w, what));
            }
    } else {
        c.rtt_ns = INT64_MAX;
        snprintf(what, sizeof what, "MPI rank 0's clock reply");
        for (int k = 0; k < CLOCK_ROUNDS; k++) {
            clock_reply rep;
            MPI_Request r[2];
            const int64_t t1 = pw_now_ns();
            pw_mpi_lock();
            rc = MPI_Irecv(&rep, (int)sizeof rep, MPI_BYTE, 0, CLOCK_TAG, m->hb_comm, &r[0]);
            if (rc == MPI_SUCCESS) rc = MPI_Isend(&t1, (int)sizeof t1, MPI_BYTE, 0, CLOCK_TAG, m->hb_comm, &r[1]);
            pw_mpi_unlock();
            if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "MPI_Isend (clock)");
            PW_CHECK(world_wait(m, r, 2, NULL, 0, what));
            const int64_t t2 = pw_now_ns();
            if (t2 - t1 < c.rtt_ns) {
                c.rtt_ns = t2 - t1;
                c.measured_ns = rep.t0_ns - (t1 + (t2 - t1) / 2);
            }
            c.run_id = rep.run_id;
        }
        c.offset_ns = same_host ? 0 : c.measured_ns;
    }
    pw_trace_set_clock(&c);
    PW_INFO(PW_SUB_COMM, "MPI rank %d on %s: clock offset to rank 0 %+.3f us (%s; estimate %+.3f us, round trip "
            "%.3f us); run %016llx", c.world_rank, c.host, (double)c.offset_ns / 1e3,
            m->world_rank == 0 ? "rank 0 itself" : same_host ? "its host" : "measured", (double)c.measured_ns / 1e3,
            (double)c.rtt_ns / 1e3, (unsigned long long)c.run_id);
    return PW_OK;
}

static const pw_transport_i mpi_transport_i = {
    .name = "mpi",
    .isend = mt_isend,
    .irecv = mt_irecv,
    .test = mt_test,
    .send = mt_send,
    .recv = mt_recv,
    .allgather = mt_allgather,
    .barrier = mt_barrier,
    .abort = mt_abort,
    .destroy = mt_destroy,
    .blame = mt_blame,
    .ps_isend = mt_ps_isend,
    .ps_irecv = mt_ps_irecv,
    .cancel = mt_cancel,
};

static const char *level_name(int l)
{
    switch (l) {
    case MPI_THREAD_SINGLE: return "single";
    case MPI_THREAD_FUNNELED: return "funneled";
    case MPI_THREAD_SERIALIZED: return "serialized";
    default: return "multiple";
    }
}

pw_status pw_mpi_transport_create(int *argc, char ***argv, const pw_mpi_config *cfg, pw_transport **out)
{
    if (!out || !cfg) return pw_error(PW_ERR_INVALID_ARG, "pw_mpi_transport_create: NULL argument");
    *out = NULL;
    const int S = cfg->n_ranks, R = cfg->n_replicas, K = cfg->n_servers;
    const int T = cfg->n_tensor > 1 ? cfg->n_tensor : 1;
    if (S < 1 || R < 1 || K < 0 || cfg->n_tensor < 0)
        return pw_error(PW_ERR_INVALID_ARG, "MPI: %d stages x %d replicas x %d tensor-parallel ranks, %d servers",
                        S, R, cfg->n_tensor, K);
    pw_transport *t = calloc(1, sizeof *t);
    mpi_transport *m = calloc(1, sizeof *m);
    if (!t || !m) {
        free(t);
        free(m);
        return pw_error(PW_ERR_NOMEM, "MPI transport: out of memory");
    }
    m->all = m->world = m->replica_comm = m->stage_comm = m->tp_comm = m->hb_comm = m->ps_comm = MPI_COMM_NULL;
    pthread_mutex_init(&m->ps_clock_mu, NULL); /* destroyed by mt_destroy */
    atomic_init(&m->state.phase, PW_PHASE_START);
    atomic_init(&m->state.step, 0);
    atomic_init(&m->state.progress, 0);
    atomic_init(&m->state.wait_peer, PW_WAIT_NOBODY);
    atomic_init(&m->verdict, -1);
    atomic_init(&m->state.act, -1);
    atomic_init(&m->state.mb, -1);
    atomic_init(&m->hb_quit, 0);
    atomic_init(&m->hb_last_ns, pw_now_ns());
    atomic_init(&m->hb_failed, 0);
    m->watchdog_s = cfg->watchdog_s > 0 ? cfg->watchdog_s : 60.0;
    t->state = &m->state;
    t->watchdog_s = m->watchdog_s;
    t->vt = &mpi_transport_i;
    t->self = m;
    pw_status st = PW_OK;
    int inited = 0, provided = MPI_THREAD_SINGLE, rc;
    MPI_Initialized(&inited);
    if (!inited) {
        rc = MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
        if (rc != MPI_SUCCESS) {
            free(m);
            free(t);
            return pw_mpi_error(rc, "MPI_Init_thread");
        }
        m->finalize = 1;
    } else {
        MPI_Query_thread(&provided);
    }
    if (provided < MPI_THREAD_SERIALIZED) {
        st = pw_error(PW_ERR_UNSUPPORTED, "MPI grants thread level '%s'; pipewright needs at least "
                      "'serialized' (its worker and communication threads call MPI)", level_name(provided));
        goto fail;
    }
    pw_mpi_serialize = provided < MPI_THREAD_MULTIPLE;
    int all_size = 0;
    MPI_Comm_dup(MPI_COMM_WORLD, &m->all);
    MPI_Comm_set_errhandler(m->all, MPI_ERRORS_RETURN);
    MPI_Comm_rank(m->all, &t->world_rank);
    MPI_Comm_size(m->all, &all_size);
    if (all_size != S * R * T + K) {
        char servers[48] = "", tensor[48] = "";
        if (K > 0) snprintf(servers, sizeof servers, " + --servers %d", K);
        if (T > 1) snprintf(tensor, sizeof tensor, " x --tensor-parallel %d", T);
        st = pw_error(PW_ERR_INVALID_ARG, "mpirun started %d process%s, but --stages %d x --replicas %d%s%s "
                      "needs %d (one per %sstage of each replica%s)", all_size, all_size == 1 ? "" : "es", S, R,
                      tensor, servers, S * R * T + K, T > 1 ? "tensor-parallel rank of each " : "",
                      K > 0 ? ", then one per server" : "");
        goto fail;
    }
    t->n_ranks = S;
    t->n_replicas = R;
    t->n_servers = K;
    t->n_tp = T;
    m->n_tp = T;
    m->world_rank = t->world_rank;
    m->world_size = all_size;
    m->n_workers = S * R * T;
    m->n_ranks = S;
    const int is_server = t->world_rank >= S * R * T;
    t->server = is_server ? t->world_rank - S * R * T : -1;
    if (K > 0) {
        /* The tools' world operations stay among the workers (servers have
         * their own); the servers are the last K world ranks. */
        if ((rc = MPI_Comm_dup(m->all, &m->ps_comm)) != MPI_SUCCESS ||
            (rc = MPI_Comm_split(m->all, is_server, t->world_rank, &m->world)) != MPI_SUCCESS) {
            st = pw_mpi_error(rc, "MPI_Comm_split (servers)");
            goto fail;
        }
        MPI_Comm_set_errhandler(m->ps_comm, MPI_ERRORS_RETURN);
    } else {
        MPI_Comm_dup(m->all, &m->world);
    }
    MPI_Comm_set_errhandler(m->world, MPI_ERRORS_RETURN);
    MPI_Comm_size(m->world, &t->world_size);
    /* w = (replica · S + rank) · T + tp (transport.h, "Layout") */
    t->replica = is_server ? -1 : t->world_rank / T / S;
    t->rank = is_server ? -1 : t->world_rank / T % S;
    t->tp_rank = is_server ? -1 : t->world_rank % T;
    m->tp_rank = t->tp_rank;
    if (!is_server &&
        ((rc = MPI_Comm_split(m->world, t->replica * T + t->tp_rank, t->rank, &m->replica_comm)) != MPI_SUCCESS ||
         (rc = MPI_Comm_split(m->world, t->rank * T + t->tp_rank, t->replica, &m->stage_comm)) != MPI_SUCCESS ||
         (T > 1 && (rc = MPI_Comm_split(m->world, t->replica * S + t->rank, t->tp_rank, &m->tp_comm)) !=
                       MPI_SUCCESS))) {
        st = pw_mpi_error(rc, "MPI_Comm_split");
        goto fail;
    }
    if (!is_server) {
        MPI_Comm_set_errhandler(m->replica_comm, MPI_ERRORS_RETURN);
        MPI_Comm_set_errhandler(m->stage_comm, MPI_ERRORS_RETURN);
        if (T > 1) MPI_Comm_set_errhandler(m->tp_comm, MPI_ERRORS_RETURN);
    }
    MPI_Comm node;
    int rank0_here = t->world_rank == 0; /* world rank 0 shares this host (its clock) */
    if (MPI_Comm_split_type(m->all, MPI_COMM_TYPE_SHARED, t->world_rank, MPI_INFO_NULL, &node) ==
        MPI_SUCCESS) {
        MPI_Comm_rank(node, &t->local_rank);
        MPI_Comm_size(node, &t->local_size);
        MPI_Group wg, ng;
        int zero = 0, in_node = MPI_UNDEFINED;
        if (MPI_Comm_group(m->all, &wg) == MPI_SUCCESS) {
            if (MPI_Comm_group(node, &ng) == MPI_SUCCESS) {
                MPI_Group_translate_ranks(wg, 1, &zero, ng, &in_node);
                MPI_Group_free(&ng);
            }
            MPI_Group_free(&wg);
        }
        rank0_here = in_node != MPI_UNDEFINED;
        MPI_Comm_free(&node);
    } else {
        t->local_rank = 0;
        t->local_size = 1;
    }
    int *ub = NULL, flag = 0;
    MPI_Comm_get_attr(m->world, MPI_TAG_UB, &ub, &flag);
    t->max_tag = flag && ub ? *ub : 32767;
    m->link = (pw_link){.latency_s = cfg->link_latency_s, .bandwidth = cfg->link_bandwidth};
    char algo_desc[64] = "none (a parameter server)";
    if (!is_server) {
        PW_CHECK_GOTO(pw_mpi_coll_build(m->stage_comm, cfg->allreduce, &m->link, &m->stage_coll, algo_desc,
                                        sizeof algo_desc), st, fail);
        PW_CHECK_GOTO(pw_mpi_coll_init(m->replica_comm, PW_ALLREDUCE_RING, &m->replica_coll), st, fail);
        if (T > 1) {
            /* The tree whatever --allreduce says: the in-process group's
             * order, so the bytes match one process (stages/ops/tp.h). */
            PW_CHECK_GOTO(pw_mpi_coll_init(m->tp_comm, PW_ALLREDUCE_TREE, &m->tp_inner), st, fail);
            pw_mpi_coll_watch(&m->tp_inner, tp_watch, m);
            t->tp_coll = (pw_coll){.vt = &tp_coll_i, .self = m, .member = t->tp_rank, .n_members = T};
        }
    }
    t->stage_coll = m->stage_coll;
    t->replica_coll = m->replica_coll;
    PW_CHECK_GOTO(hb_start(m), st, fail);
    PW_CHECK_GOTO(clock_sync(m, rank0_here), st, fail);
    char lib[MPI_MAX_LIBRARY_VERSION_STRING] = "MPI";
    int len = 0;
    MPI_Get_library_version(lib, &len);
    lib[strcspn(lib, ",\n")] = '\0';
    snprintf(t->desc, sizeof t->desc, "%s, %s all-reduce, thread level %s", lib,
             cfg->allreduce == PW_ALLREDUCE_MPI ? "MPI_Iallreduce" : algo_desc, level_name(provided));
    PW_INFO(PW_SUB_COMM, "MPI rank %d: replica %d rank %d tensor rank %d of %d, host rank %d of %d (%s)",
            t->world_rank, t->replica, t->rank, t->tp_rank, T, t->local_rank, t->local_size, t->desc);
    *out = t;
    return PW_OK;
fail:
    mt_destroy(m);
    free(t);
    return st;
}
#else
typedef int pw_transport_mpi_unused; /* a build without MPI */
#endif
