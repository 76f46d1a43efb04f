/* pipewright — the engine's worker: one thread per (replica, rank) running
 * its own libevent loop, and the actions it executes (F, B, W, SEND, RECV,
 * ALLREDUCE, OPTIM).
 *
 * Everything here runs inside event callbacks on the worker's thread, and
 * nothing blocks: a RECV whose message has not arrived records the wait start
 * and returns to the loop (the worker "parks"); the sender's deliver() wakes
 * it with event_active() on its wake event. OPTIM parks the same way until
 * the communication thread has finished the rank's all-reduces
 * (engine-comm.c), and a compute action parks while an asynchronous stage's
 * call is pending (stage.h "Asynchronous stages"; run_call): its done
 * function wakes the worker the same way, from whatever thread completes
 * the work. The only locks are short critical sections (a mailbox, a buffer
 * pool, the job queue, the engine mutex at step end).
 *
 * The step loop allocates nothing: slots, buffers, mailbox entries and
 * buckets were all planned in pw_engine_create (engine.c).
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "runtime/log.h"
#include "scheduler/engine-internal.h"

/* exec() outcomes besides PW_OK. */
enum { EXEC_OK = 0, EXEC_PARKED, EXEC_FAILED };

/* -------------------------------------------------------------- helpers */

static inline int rank_of(const pw_engine *e, int chunk) { return pw_sched_rank_of(e->s, chunk); }

pw_trace_event *pw_eng_trace(pw_worker *w, const char *name, int cat, int chunk, int mb, int peer,
                             int64_t bytes, int64_t t0, int64_t t1)
{
    pw_trace_event *ev = pw_trace_push(w->e->trace, w->gid);
    if (!ev) return NULL; /* full track: the trace counts the drop */
    ev->name = name;
    ev->cat = cat;
    ev->chunk = chunk;
    ev->mb = mb;
    ev->peer = peer;
    ev->step = w->step;
    ev->bytes = bytes;
    ev->t0_ns = t0;
    ev->t1_ns = t1;
    ev->wire_bytes = 0;
    return ev;
}

/* The trace track of the worker that runs `chunk` in w's replica. */
static inline int peer_track(const pw_worker *w, int chunk)
{
    return w->replica * w->e->S + rank_of(w->e, chunk);
}

/* Records the first failure of the step and stops every worker: each polls
 * `abort` before its next action, and parked ones are woken to see it. */
void pw_eng_fail(pw_engine *e, pw_status st, const char *msg)
{
    pthread_mutex_lock(&e->mu);
    if (e->err == PW_OK) {
        e->err = st;
        snprintf(e->err_msg, sizeof e->err_msg, "%s", msg);
        pthread_cond_signal(&e->cv); /* run_step starts its straggler grace period */
    }
    pthread_mutex_unlock(&e->mu);
    atomic_store(&e->abort, 1);
    for (int i = 0; i < e->NW; i++) event_active(e->workers[i].wake, 0, 0);
}

/* pw_error messages are thread-local: format the text here, on the failing
 * thread, into the engine's buffer; run_step re-raises it on its caller. */
static int fail(pw_worker *w, pw_status st, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(pw_worker *w, pw_status st, const char *fmt, ...)
{
    char msg[PW_ENGINE_ERRMSG];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pw_eng_fail(w->e, st, msg);
    return EXEC_FAILED;
}

/* A failure about action (kind, chunk, mb): "rank R (chunk C), F of
 * micro-batch M: why" (with replicas "replica K rank R (chunk C), ..."). */
static int fail_at(pw_worker *w, pw_status st, const char *kind, int chunk, int mb, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static int fail_at(pw_worker *w, pw_status st, const char *kind, int chunk, int mb, const char *fmt, ...)
{
    char why[PW_ENGINE_ERRMSG - 192], who[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    pw_eng_name(w->e, w->replica, w->rank, who, sizeof who);
    return fail(w, st, "%s (chunk %d), %s of micro-batch %d: %s", who, chunk, kind, mb, why);
}

/* ------------------------------------------------------ stage calls */

/* One stage call of an action: forward / backward_input / backward_weight
 * (fn), a bucket of the last backward, or the optimizer. */
enum { CALL_MB = 0, CALL_BUCKET, CALL_OPTIM };
typedef struct stage_call {
    int how;
    pw_status (*fn)(void *, int, int); /* CALL_MB */
    int slot;
    int bucket;                        /* CALL_BUCKET */
    pw_bwd_part part;
    long step;                         /* CALL_OPTIM */
} stage_call;

/* pw_stage_done_fn of every asynchronous stage call (any thread). The
 * wake-up is issued under mbox_mu: once the worker has seen `done_fired` it
 * may finish the step and the engine may be destroyed, so nothing of w is
 * touched after the unlock. */
static void stage_done(void *arg, pw_status st, const char *msg)
{
    pw_worker *w = arg;
    int64_t t1 = pw_now_ns();
    pthread_mutex_lock(&w->mbox_mu);
    w->done_st = st;
    snprintf(w->done_msg, sizeof w->done_msg, "%s", msg ? msg : "");
    w->done_t1 = t1;
    w->done_fired = 1;
    event_active(w->wake, 0, 0);
    pthread_mutex_unlock(&w->mbox_mu);
}

static int call_failed(pw_worker *w, pw_status st, const char *msg, const char *kind, int chunk, int mb,
                       const stage_call *c)
{
    if (!msg[0]) msg = pw_status_str(st);
    if (c->how == CALL_BUCKET) return fail_at(w, st, kind, chunk, mb, "bucket %d: %s", c->bucket, msg);
    if (c->how == CALL_OPTIM) {
        char who[64];
        pw_eng_name(w->e, w->replica, w->rank, who, sizeof who);
        return fail(w, st, "%s (chunk %d), OPTIM of step %ld: %s", who, chunk, c->step, msg);
    }
    return fail_at(w, st, kind, chunk, mb, "%s", msg);
}

/* The pending call has completed when its done has fired: EXEC_OK (or
 * EXEC_FAILED with its error), EXEC_PARKED while it has not. */
static int finish_pending(pw_worker *w, const char *kind, int chunk, int mb, const stage_call *c)
{
    char msg[sizeof w->done_msg];
    pthread_mutex_lock(&w->mbox_mu);
    const int fired = w->done_fired;
    const pw_status st = w->done_st;
    int64_t t1 = w->done_t1;
    if (fired) {
        w->done_fired = 0;
        memcpy(msg, w->done_msg, sizeof msg);
    }
    pthread_mutex_unlock(&w->mbox_mu);
    if (!fired) return EXEC_PARKED;
    w->call_pending = 0;
    if (t1 < w->pend_t0) t1 = w->pend_t0; /* done before submitted returned */
    w->busy_ns += t1 - w->pend_t0;        /* the stage's device was busy with it */
    w->act_t1 = t1;
    if (st != PW_OK) return call_failed(w, st, msg, kind, chunk, mb, c);
    w->calls_done++;
    return EXEC_OK;
}

/* Runs call number k (0, 1, ...) of actions[pc] on `chunk`, timing it as
 * busy time, unless it has completed already (the action re-enters after
 * each completion). EXEC_OK: complete; EXEC_PARKED: submitted to an
 * asynchronous stage and not yet done (the worker parks; stage_done wakes
 * it); EXEC_FAILED. */
static int run_call(pw_worker *w, int k, const char *kind, int chunk, int mb, const stage_call *c)
{
    if (k < w->calls_done) return EXEC_OK;
    if (w->call_pending) return finish_pending(w, kind, chunk, mb, c);
    /* A failed step issues nothing more (a pending call was waited for). */
    if (k > 0 && atomic_load_explicit(&w->e->abort, memory_order_relaxed)) return EXEC_FAILED;
    pw_echunk *ch = pw_eng_chunk(w->e, w->lrep, chunk);
    pw_clear_error(); /* a callback that fails without a message must not show a stale one */
    int64_t t0 = pw_now_ns();
    pw_status st;
    switch (c->how) {
    case CALL_MB: st = c->fn(ch->self, mb, c->slot); break;
    case CALL_BUCKET: st = ch->vt->backward_bucket(ch->self, mb, c->slot, c->bucket, c->part); break;
    default: st = ch->vt->optimizer_step(ch->self, c->step); break;
    }
    int64_t t1 = pw_now_ns();
    w->busy_ns += t1 - t0;
    if (st != PW_OK) return call_failed(w, st, pw_last_error(), kind, chunk, mb, c);
    if (ch->vt->submitted && ch->vt->submitted(ch->self, stage_done, w)) {
        w->call_pending = 1;
        w->pending_chunk = chunk;
        w->pend_t0 = t1;
        w->resumed = 1; /* re-entries skip the action's prologue and the checker */
        return finish_pending(w, kind, chunk, mb, c);
    }
    w->act_t1 = 0;
    w->calls_done++;
    return EXEC_OK;
}

/* The part of the last backward that finishes bucket b, then its start
 * (bucket starts are idempotent: re-entries repeat them harmlessly). */
static int call_bucket(pw_worker *w, const char *kind, int chunk, int mb, int slot, int b, pw_bwd_part part)
{
    stage_call c = {.how = CALL_BUCKET, .slot = slot, .bucket = b, .part = part};
    int rc = run_call(w, b, kind, chunk, mb, &c);
    if (rc != EXEC_OK) return rc;
    pw_eng_bucket_start(w, chunk, b);
    return EXEC_OK;
}

static int call_stage(pw_worker *w, int k, pw_status (*fn)(void *, int, int), const char *kind, int chunk,
                      int mb, int slot)
{
    stage_call c = {.how = CALL_MB, .fn = fn, .slot = slot};
    return run_call(w, k, kind, chunk, mb, &c);
}

static int bind_port(pw_worker *w, int chunk, int mb, const char *kind, int slot, pw_port port,
                     const pw_msgbuf *b)
{
    static const char *const names[PW_PORT_COUNT] = {"ACT_IN", "ACT_OUT", "GRAD_OUT", "GRAD_IN"};
    pw_echunk *ch = pw_eng_chunk(w->e, w->lrep, chunk);
    if (!ch->vt->bind || !ch->bytes[port]) return EXEC_OK;
    pw_clear_error();
    pw_status st = ch->vt->bind(ch->self, slot, port, b->data);
    if (st == PW_OK) return EXEC_OK;
    return fail_at(w, st, kind, chunk, mb, "binding %s of slot %d: %s", names[port], slot,
                   pw_last_error()[0] ? pw_last_error() : pw_status_str(st));
}

/* ------------------------------------------------------------- buffers */

pw_msgbuf *pw_eng_pool_get(pw_pool *p, int refs)
{
    pw_msgbuf *b = NULL;
    pthread_mutex_lock(&p->mu);
    if (p->top > 0) b = &p->bufs[p->free_idx[--p->top]];
    pthread_mutex_unlock(&p->mu);
    if (b) atomic_store_explicit(&b->refs, refs, memory_order_relaxed);
    return b;
}

void pw_eng_buf_put(pw_msgbuf *b)
{
    if (!b) return;
    /* acq_rel: the last reader's accesses happen before the buffer's next
     * owner writes it (the pool mutex then carries the order on). */
    if (atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) != 1) return;
    pw_pool *p = b->pool;
    pthread_mutex_lock(&p->mu);
    p->free_idx[p->top++] = b->index;
    pthread_mutex_unlock(&p->mu);
}

/* A buffer for a message this worker produces. Producer and consumer each
 * drop one reference after their own last backward of the micro-batch (a
 * send to another process stands in for the consumer). A pool that looks
 * empty may only be waiting for sends to other processes to be tested. */
static pw_msgbuf *pool_get_out(pw_worker *w, pw_pool *p)
{
    pw_msgbuf *b = pw_eng_pool_get(p, 2);
    if (!b && w->e->t && pw_eng_progress_sends(w) >= 0) b = pw_eng_pool_get(p, 2);
    if (b && w->wait_t0 && w->wait_kind == PW_WAIT_SENDS) { /* parked for it (pool_wait) */
        w->wait_ns += pw_now_ns() - w->wait_t0;
        w->wait_t0 = 0;
        w->wait_kind = PW_WAIT_NONE;
    }
    return b;
}

/* No buffer for a message this worker produces. Under a transport, while
 * sends to other processes are in flight, the pool is only waiting for
 * their receivers, which may lag (a loaded machine, a process handling a
 * signal): the action parks, the poll timer tests the sends and drives the
 * worker again, and the watchdog covers the wait. Otherwise the schedule's
 * buffer count was wrong. */
static int pool_wait(pw_worker *w, const char *kind, int chunk, int mb, const pw_pool *p)
{
    if (w->e->t && w->n_pending > 0) {
        if (!w->wait_t0) w->wait_t0 = pw_now_ns();
        w->wait_kind = PW_WAIT_SENDS;
        return EXEC_PARKED;
    }
    return fail_at(w, PW_ERR_INTERNAL, kind, chunk, mb,
                   "%s buffer pool of link %d->%d exhausted (%d buffers of %zu bytes); the "
                   "report's peak_inflight_chunk understates this schedule",
                   p->grad ? "gradient" : "activation", p->link, p->link + 1, p->n, p->bytes);
}

/* The last backward of (chunk, mb) has returned: the chunk drops its buffer
 * references, then its slot (in that order: see pool_size in engine.c).
 * Runs once per (chunk, mb) and step (F, B and W each refuse to run twice). */
static void release_mb(pw_worker *w, int chunk, pw_mbstate *st)
{
    pw_echunk *ch = pw_eng_chunk(w->e, w->lrep, chunk);
    pw_eng_buf_put(st->act_in);
    pw_eng_buf_put(st->act_out);
    pw_eng_buf_put(st->grad_out);
    pw_eng_buf_put(st->grad_in);
    /* The pointers stay: a SEND_B after the last backward, or the previous
     * chunk's local B, still hands grad_in over, and the consumer's
     * reference (counted at pool_get) keeps it out of the pool until then. */
    ch->free_slots[ch->n_free++] = st->slot;
    ch->in_use--;
    w->in_use--;
    st->slot = -1;
    st->done |= PW_MB_REL;
}

/* -------------------------------------------------------------- compute */

/* F's bookkeeping before its call (once per action, not on re-entries). */
static int forward_prologue(pw_worker *w, int c, int m)
{
    pw_engine *e = w->e;
    pw_echunk *ch = pw_eng_chunk(e, w->lrep, c);
    pw_mbstate *st = pw_eng_mb(e, w->lrep, c, m);
    if (st->done & PW_MB_F) return fail_at(w, PW_ERR_SCHEDULE, "F", c, m, "its F runs twice");
    pw_msgbuf *in = NULL, *out = NULL;
    if (c > 0) {
        if (rank_of(e, c - 1) == w->rank) {
            /* Local hand-over: read chunk c-1's output of this micro-batch. */
            pw_mbstate *prev = pw_eng_mb(e, w->lrep, c - 1, m);
            if (!(prev->done & PW_MB_F))
                return fail_at(w, PW_ERR_SCHEDULE, "F", c, m,
                               "needs the output of chunk %d, whose F has not run", c - 1);
            in = prev->act_out;
        } else {
            if (!(st->done & PW_MB_RF))
                return fail_at(w, PW_ERR_SCHEDULE, "F", c, m, "its input was not received (no RECV_F before it)");
            in = st->act_in;
        }
    }
    if (ch->n_free == 0) {
        return fail_at(w, PW_ERR_INTERNAL, "F", c, m,
                       "no free activation slot (all %d in use; the report's "
                       "peak_inflight_chunk[%d] understates this schedule)", ch->n_slots, c);
    }
    if (c < e->C - 1) {
        pw_pool *p = pw_eng_act_pool(e, w->lrep, c);
        if (p->bytes && !(out = pool_get_out(w, p))) return pool_wait(w, "F", c, m, p);
    }
    int slot = ch->free_slots[--ch->n_free];
    if (++ch->in_use > ch->peak) ch->peak = ch->in_use;
    if (++w->in_use > w->peak) w->peak = w->in_use;
    st->slot = slot;
    st->act_in = in;
    st->act_out = out;
    st->done |= PW_MB_F;
    if (in && bind_port(w, c, m, "F", slot, PW_PORT_ACT_IN, in) != EXEC_OK) return EXEC_FAILED;
    if (out && bind_port(w, c, m, "F", slot, PW_PORT_ACT_OUT, out) != EXEC_OK) return EXEC_FAILED;
    return EXEC_OK;
}

static int do_forward(pw_worker *w, int c, int m)
{
    if (!w->resumed) {
        const int rc = forward_prologue(w, c, m); /* parks while its output buffer is in flight */
        if (rc != EXEC_OK) return rc;
    }
    pw_echunk *ch = pw_eng_chunk(w->e, w->lrep, c);
    return call_stage(w, 0, ch->vt->forward, "F", c, m, pw_eng_mb(w->e, w->lrep, c, m)->slot);
}

/* Whether this action is chunk c's last backward of the step with replicas:
 * its gradients become final here and their buckets start. */
static int is_last_backward(const pw_worker *w, int c)
{
    return w->e->bucketed && w->e->last_bwd[c] == w->pc;
}

/* Starts every bucket of chunk c (a chunk without backward_bucket, once its
 * whole last backward has returned). */
static void start_all_buckets(pw_worker *w, int c)
{
    for (int b = 0; b < w->e->NB; b++) pw_eng_bucket_start(w, c, b);
}

/* B's bookkeeping before its calls (once per action). */
static int backward_prologue(pw_worker *w, int c, int m)
{
    pw_engine *e = w->e;
    pw_mbstate *st = pw_eng_mb(e, w->lrep, c, m);
    if (!(st->done & PW_MB_F)) return fail_at(w, PW_ERR_SCHEDULE, "B", c, m, "B before its F");
    if (st->done & PW_MB_B) return fail_at(w, PW_ERR_SCHEDULE, "B", c, m, "its B runs twice");
    pw_msgbuf *gout = NULL, *gin = NULL;
    if (c < e->C - 1) {
        if (rank_of(e, c + 1) == w->rank) {
            pw_mbstate *next = pw_eng_mb(e, w->lrep, c + 1, m);
            if (!(next->done & PW_MB_B))
                return fail_at(w, PW_ERR_SCHEDULE, "B", c, m,
                               "needs the gradient of chunk %d, whose B has not run", c + 1);
            gout = next->grad_in;
        } else {
            if (!(st->done & PW_MB_RB))
                return fail_at(w, PW_ERR_SCHEDULE, "B", c, m, "its output gradient was not received (no RECV_B before it)");
            gout = st->grad_out;
        }
    }
    if (c > 0) {
        pw_pool *p = pw_eng_grad_pool(e, w->lrep, c - 1);
        if (p->bytes && !(gin = pool_get_out(w, p))) return pool_wait(w, "B", c, m, p);
    }
    st->grad_out = gout;
    st->grad_in = gin;
    st->done |= PW_MB_B;
    if (gout && bind_port(w, c, m, "B", st->slot, PW_PORT_GRAD_OUT, gout) != EXEC_OK) return EXEC_FAILED;
    if (gin && bind_port(w, c, m, "B", st->slot, PW_PORT_GRAD_IN, gin) != EXEC_OK) return EXEC_FAILED;
    return EXEC_OK;
}

static int do_backward(pw_worker *w, int c, int m)
{
    pw_engine *e = w->e;
    pw_echunk *ch = pw_eng_chunk(e, w->lrep, c);
    pw_mbstate *st = pw_eng_mb(e, w->lrep, c, m);
    if (!w->resumed) {
        const int rc = backward_prologue(w, c, m); /* parks while its gradient buffer is in flight */
        if (rc != EXEC_OK) return rc;
    }
    const int last = !e->split_w && is_last_backward(w, c);
    int rc;
    if (last && ch->vt->backward_bucket) {
        /* The full backward bucket by bucket, each all-reduce started as
         * soon as its gradients are final. */
        for (int b = 0; b < e->NB; b++)
            if ((rc = call_bucket(w, "B", c, m, st->slot, b, PW_BWD_FULL)) != EXEC_OK) return rc;
        release_mb(w, c, st);
        return EXEC_OK;
    }
    if ((rc = call_stage(w, 0, ch->vt->backward_input, "B", c, m, st->slot)) != EXEC_OK) return rc;
    if (e->split_w) return EXEC_OK;
    /* The full backward: the weight half right after, same bindings. */
    if (ch->vt->backward_weight &&
        (rc = call_stage(w, 1, ch->vt->backward_weight, "B", c, m, st->slot)) != EXEC_OK)
        return rc;
    release_mb(w, c, st);
    if (last) start_all_buckets(w, c);
    return EXEC_OK;
}

/* W's checks before its calls (once per action). */
static int weight_prologue(pw_worker *w, int c, int m)
{
    pw_engine *e = w->e;
    pw_mbstate *st = pw_eng_mb(e, w->lrep, c, m);
    if (!e->split_w) return fail_at(w, PW_ERR_SCHEDULE, "W", c, m, "W in a schedule that does not split W");
    if (!(st->done & PW_MB_B)) return fail_at(w, PW_ERR_SCHEDULE, "W", c, m, "W before its B");
    if (st->done & PW_MB_W) return fail_at(w, PW_ERR_SCHEDULE, "W", c, m, "its W runs twice");
    st->done |= PW_MB_W;
    return EXEC_OK;
}

static int do_weight(pw_worker *w, int c, int m)
{
    pw_engine *e = w->e;
    pw_echunk *ch = pw_eng_chunk(e, w->lrep, c);
    pw_mbstate *st = pw_eng_mb(e, w->lrep, c, m);
    if (!w->resumed && weight_prologue(w, c, m) != EXEC_OK) return EXEC_FAILED;
    const int last = is_last_backward(w, c);
    int rc;
    if (last && ch->vt->backward_bucket) {
        for (int b = 0; b < e->NB; b++)
            if ((rc = call_bucket(w, "W", c, m, st->slot, b, PW_BWD_WEIGHT)) != EXEC_OK) return rc;
    } else if (ch->vt->backward_weight &&
               (rc = call_stage(w, 0, ch->vt->backward_weight, "W", c, m, st->slot)) != EXEC_OK) {
        return rc;
    }
    release_mb(w, c, st);
    if (last && !ch->vt->backward_bucket) start_all_buckets(w, c);
    return EXEC_OK;
}

/* Waits (parked, through the loop) for the rank's all-reduces and the
 * gradient norm, then runs the optimizer of every chunk of the rank. */
static int do_optim(pw_worker *w)
{
    pw_engine *e = w->e;
    int rc = pw_eng_comm_before_optim(w);
    if (rc > 0) return EXEC_PARKED;
    if (rc < 0) return EXEC_FAILED;
    /* Post-validation: the step was taken and validated before the norm
     * came (engine-comm.c); only a rolled-back one runs again here. */
    if (e->post_validate && !w->redo) return EXEC_OK;
    long step = (long)w->step;
    if (w->calls_done == 0 && !w->call_pending) w->act_t0 = pw_now_ns();
    for (int l = 0; l < w->n_chunks; l++) {
        const int c = w->chunk_ids[l];
        pw_echunk *ch = pw_eng_chunk(e, w->lrep, c);
        if (!ch->vt->optimizer_step) {
            if (l == w->calls_done) w->calls_done++; /* keeps call k = chunk l */
            continue;
        }
        stage_call call = {.how = CALL_OPTIM, .step = step};
        rc = run_call(w, l, "OPTIM", c, -1, &call);
        if (rc != EXEC_OK) return rc;
    }
    if (e->trace)
        pw_eng_trace(w, "OPTIM", PW_TRACE_COMPUTE, -1, -1, -1, 0, w->act_t0,
                     w->act_t1 ? w->act_t1 : pw_now_ns());
    return EXEC_OK;
}

/* -------------------------------------------------------- communication */

/* Puts a message in the receiving worker's mailbox under key (dir, chunk,
 * mb) and wakes it if it is parked on exactly this key. Never blocks beyond
 * the mailbox's short critical section. */
static int deliver(pw_worker *w, const char *kind, int src_chunk, int dir, int chunk, int mb,
                   pw_msgbuf *buf)
{
    pw_engine *e = w->e;
    pw_worker *dst = pw_eng_worker(e, w->lrep, rank_of(e, chunk));
    pw_mail *mail = pw_eng_mail(e, w->lrep, dir, chunk, mb);
    int wake = 0, dup = 0;
    /* Behind a slow link the receiver may take it only once it "arrives"
     * (its poll timer retries the receive). */
    const int64_t due = pw_link_on(&e->link) ? pw_link_clock_due(&w->link_clock, &e->link, pw_now_ns(),
                                                                  buf && buf->pool ? buf->pool->bytes : 0) : 0;
    pthread_mutex_lock(&dst->mbox_mu);
    if (mail->arrived) {
        dup = 1;
    } else {
        mail->buf = buf;
        mail->due_ns = due;
        mail->arrived = 1;
        if (dst->wait_dir == dir && dst->wait_chunk == chunk && dst->wait_mb == mb) {
            dst->wait_dir = -1;
            wake = 1;
        }
    }
    pthread_mutex_unlock(&dst->mbox_mu);
    if (dup) return fail_at(w, PW_ERR_SCHEDULE, kind, src_chunk, mb, "the message was already sent this step");
    if (wake) event_active(dst->wake, 0, 0);
    return EXEC_OK;
}

static int do_send(pw_worker *w, const pw_action *a)
{
    pw_engine *e = w->e;
    const int c = a->chunk, m = a->mb;
    pw_mbstate *st = pw_eng_mb(e, w->lrep, c, m);
    const char *kind = pw_action_kind_name(a->kind);
    int64_t t0 = e->trace ? pw_now_ns() : 0;
    int dst_chunk, dir, rc;
    pw_msgbuf *buf;
    size_t bytes;
    if (a->kind == PW_ACT_SEND_F) {
        if (c == e->C - 1) return fail_at(w, PW_ERR_SCHEDULE, kind, c, m, "SEND_F from the last chunk");
        if (!(st->done & PW_MB_F)) return fail_at(w, PW_ERR_SCHEDULE, kind, c, m, "SEND_F before its F");
        dst_chunk = c + 1;
        dir = PW_DIR_F;
        buf = st->act_out;
        bytes = pw_eng_chunk(e, w->lrep, c)->bytes[PW_PORT_ACT_OUT];
    } else {
        if (c == 0) return fail_at(w, PW_ERR_SCHEDULE, kind, c, m, "SEND_B from chunk 0");
        if (!(st->done & PW_MB_B)) return fail_at(w, PW_ERR_SCHEDULE, kind, c, m, "SEND_B before its B");
        dst_chunk = c - 1;
        dir = PW_DIR_B;
        buf = st->grad_in;
        bytes = pw_eng_chunk(e, w->lrep, c)->bytes[PW_PORT_GRAD_IN];
    }
    if (pw_eng_is_local(e, rank_of(e, dst_chunk)))
        rc = deliver(w, kind, c, dir, dst_chunk, m, buf);
    else
        rc = pw_eng_remote_send(w, kind, c, dir, dst_chunk, m, buf, bytes) < 0 ? EXEC_FAILED : EXEC_OK;
    if (rc != EXEC_OK) return rc;
    if (e->trace)
        pw_eng_trace(w, kind, PW_TRACE_COMM, c, m, peer_track(w, dst_chunk), (int64_t)bytes, t0, pw_now_ns());
    return EXEC_OK;
}

/* Takes the message for this receive, or parks: records the wait start,
 * publishes the key the worker waits on and returns to the loop. */
static int do_recv(pw_worker *w, const pw_action *a)
{
    pw_engine *e = w->e;
    const int c = a->chunk, m = a->mb;
    const int dir = a->kind == PW_ACT_RECV_F ? PW_DIR_F : PW_DIR_B;
    const char *kind = pw_action_kind_name(a->kind);
    const int src_chunk = dir == PW_DIR_F ? c - 1 : c + 1;
    if (src_chunk < 0 || src_chunk >= e->C)
        return fail_at(w, PW_ERR_SCHEDULE, kind, c, m, "the chunk has no neighbour on that side");
    pw_msgbuf *buf = NULL;
    int arrived;
    if (pw_eng_is_local(e, rank_of(e, src_chunk))) {
        pw_mail *mail = pw_eng_mail(e, w->lrep, dir, c, m);
        pthread_mutex_lock(&w->mbox_mu);
        arrived = mail->arrived && (!mail->due_ns || pw_now_ns() >= mail->due_ns);
        if (arrived) {
            buf = mail->buf;
            mail->buf = NULL;
            mail->arrived = 0;
            w->wait_dir = -1;
        } else {
            w->wait_dir = dir;
            w->wait_chunk = c;
            w->wait_mb = m;
        }
        pthread_mutex_unlock(&w->mbox_mu);
    } else {
        arrived = pw_eng_remote_recv(w, kind, dir, c, m, &buf);
        if (arrived < 0) return EXEC_FAILED;
    }
    int64_t now = (e->trace || w->wait_t0 || !arrived) ? pw_now_ns() : 0;
    if (!arrived) {
        if (!w->wait_t0) w->wait_t0 = now;
        w->wait_kind = PW_WAIT_RECV;
        return EXEC_PARKED;
    }
    if (w->wait_t0) {
        w->wait_ns += now - w->wait_t0;
        if (e->trace)
            pw_eng_trace(w, dir == PW_DIR_F ? "wait RECV_F" : "wait RECV_B", PW_TRACE_WAIT, c, m,
                         peer_track(w, src_chunk), 0, w->wait_t0, now);
        w->wait_t0 = 0;
        w->wait_kind = PW_WAIT_NONE;
    }
    if (w->checker && pw_schedule_checker_step(w->checker, a) != PW_OK)
        return fail(w, PW_ERR_SCHEDULE, "%s", pw_last_error());
    pw_mbstate *st = pw_eng_mb(e, w->lrep, c, m);
    if (dir == PW_DIR_F) {
        st->act_in = buf;
        st->done |= PW_MB_RF;
    } else {
        st->grad_out = buf;
        st->done |= PW_MB_RB;
    }
    if (e->trace) {
        size_t bytes = pw_eng_chunk(e, w->lrep, c)->bytes[dir == PW_DIR_F ? PW_PORT_ACT_IN : PW_PORT_GRAD_OUT];
        pw_eng_trace(w, kind, PW_TRACE_COMM, c, m, peer_track(w, src_chunk), (int64_t)bytes, now, pw_now_ns());
    }
    return EXEC_OK;
}

/* ------------------------------------------------------------ one action */

static int exec(pw_worker *w, const pw_action *a)
{
    pw_engine *e = w->e;
    if (a->kind == PW_ACT_RECV_F || a->kind == PW_ACT_RECV_B) return do_recv(w, a);
    /* Overlap with post-validation: the previous step's optimistic update
     * is validated before the rank's first gradient of this step lands
     * (its forwards have run on the optimistic parameters meanwhile). */
    if (w->verdict && (a->kind == PW_ACT_B || a->kind == PW_ACT_W || a->kind == PW_ACT_OPTIM)) {
        int rc = pw_eng_comm_verdict(w);
        if (rc > 0) return EXEC_PARKED;
        if (rc < 0) return EXEC_FAILED;
    }
    /* The checker sees each action before it runs (receives: once arrived;
     * an OPTIM that parked: once). */
    if (!w->resumed && w->checker && pw_schedule_checker_step(w->checker, a) != PW_OK)
        return fail(w, PW_ERR_SCHEDULE, "%s", pw_last_error());
    /* An action re-entered after an asynchronous completion keeps the time
     * of its first entry. */
    if (!w->resumed) w->act_t0 = e->trace ? pw_now_ns() : 0;
    int rc;
    switch (a->kind) {
    case PW_ACT_F: rc = do_forward(w, a->chunk, a->mb); break;
    case PW_ACT_B: rc = do_backward(w, a->chunk, a->mb); break;
    case PW_ACT_W: rc = do_weight(w, a->chunk, a->mb); break;
    case PW_ACT_SEND_F:
    case PW_ACT_SEND_B: return do_send(w, a); /* traces itself */
    case PW_ACT_ALLREDUCE:
        if (e->bucketed) {
            /* Usually already started by the chunk's last backward; the
             * bucket's ALLREDUCE event spans its run (pushed at OPTIM). */
            pw_eng_bucket_start(w, a->chunk, a->mb);
            return EXEC_OK;
        }
        rc = EXEC_OK; /* one replica: nothing to reduce */
        break;
    case PW_ACT_OPTIM:
        rc = do_optim(w); /* traces itself, after its waits */
        if (rc == EXEC_PARKED) w->resumed = 1;
        return rc;
    default: return fail(w, PW_ERR_INTERNAL, "rank %d: action kind %d", w->rank, (int)a->kind);
    }
    if (rc == EXEC_OK && e->trace) /* ends at the completion of its last asynchronous call */
        pw_eng_trace(w, pw_action_kind_name(a->kind),
                     a->kind == PW_ACT_ALLREDUCE ? PW_TRACE_COMM : PW_TRACE_COMPUTE, a->chunk, a->mb, -1,
                     0, w->act_t0, w->act_t1 ? w->act_t1 : pw_now_ns());
    return rc;
}

/* ---------------------------------------------------------- step and loop */

/* With a transport, the worker keeps this process's progress board current
 * (runtime/transport.h): the action it runs, a progress tick per action,
 * and, while parked, the process it waits for. The watchdogs of the other
 * processes follow these "waits for" links to the one that is stuck. */
static void publish_action(pw_worker *w, const pw_action *a)
{
    pw_transport_state *s = w->e->t->state;
    if (!s) return;
    atomic_store_explicit(&s->act, (int)a->kind, memory_order_relaxed);
    atomic_store_explicit(&s->mb, a->mb, memory_order_relaxed);
    atomic_store_explicit(&s->wait_peer, PW_WAIT_NOBODY, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->progress, 1, memory_order_relaxed);
}

static void publish_park(pw_worker *w)
{
    pw_engine *e = w->e;
    int peer = PW_WAIT_ALL; /* a collective or pending sends: several processes */
    if (w->call_pending) {
        peer = PW_WAIT_NOBODY; /* our own stage is working */
    } else if (w->wait_kind == PW_WAIT_RECV) {
        const pw_action *a = &e->s->ranks[w->rank].actions[w->pc];
        int src = a->kind == PW_ACT_RECV_F ? a->chunk - 1 : a->chunk + 1;
        peer = pw_transport_world_of(e->t, w->replica, rank_of(e, src));
    }
    pw_transport_waiting(e->t, peer);
}

const char *pw_eng_action_name(int kind) { return pw_action_kind_name((pw_action_kind)kind); }

/* The step of the stage calls this thread makes (pw_engine_current_step). */
static _Thread_local int64_t tls_step;

int64_t pw_engine_current_step(void) { return tls_step; }

static void begin_step(pw_worker *w)
{
    pw_engine *e = w->e;
    tls_step = w->step;
    w->running = 1;
    w->pc = 0;
    w->wait_t0 = 0;
    w->wait_kind = PW_WAIT_NONE;
    w->resumed = 0;
    w->optim_phase = 0;
    if (!w->verdict) w->tried = 0; /* else: the previous step's, awaiting their verdict */
    w->redo = 0;
    w->flushing = 0;
    w->calls_done = 0;
    w->act_t1 = 0;
    for (int l = 0; l < w->n_chunks; l++) {
        pw_mbstate *row = pw_eng_mb(e, w->lrep, w->chunk_ids[l], 0);
        for (int m = 0; m < e->M; m++) {
            memset(&row[m], 0, sizeof row[m]);
            row[m].slot = -1;
        }
    }
    pw_eng_comm_begin_step(w, w->verdict);
    if (w->poll) {
        struct timeval tv = {0, PW_ENG_POLL_US};
        event_add(w->poll, &tv);
    }
    w->step_t0 = pw_now_ns();
}

/* The step's own figures and trace event, once its actions are done (or
 * it was left). */
static void close_step(pw_worker *w)
{
    pw_engine *e = w->e;
    int64_t now = pw_now_ns();
    if (w->wait_t0) { /* stopped while parked */
        w->wait_ns += now - w->wait_t0;
        w->wait_t0 = 0;
    }
    w->total_ns += now - w->step_t0;
    if (e->trace) pw_eng_trace(w, "step", PW_TRACE_STEP, -1, -1, -1, 0, w->step_t0, now);
}

/* Leaves the run (finished, failed or aborted) exactly once per run. */
static void end_step(pw_worker *w)
{
    pw_engine *e = w->e;
    if (!w->running) return;
    /* A run failed (or aborted) in the step after an optimistic one whose
     * verdict is pending: take the verdict if the norm is in (every rank
     * that shared it then settles that step alike; its gradients are
     * intact: this rank has not run a backward since), else undo it: that
     * step no longer stands. */
    if (w->verdict && pw_eng_comm_verdict_or(w, 0) != 0 && w->steps_ok > 0) w->steps_ok--;
    pw_eng_optim_abandon(w);
    w->verdict = 0;
    w->running = 0;
    if (w->poll) event_del(w->poll);
    close_step(w);
    if (e->t && e->t->state) { /* the rest of the step is the caller's (tied sums, the loss) */
        atomic_store_explicit(&e->t->state->act, -1, memory_order_relaxed);
        pw_transport_waiting(e->t, PW_WAIT_NOBODY);
    }
    pthread_mutex_lock(&e->mu);
    w->stopped_epoch = w->epoch;
    if (++e->n_stopped == e->NW) pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

/* Runs the worker's actions from pc until the list ends, a receive or OPTIM
 * parks, or the step fails. Every wake-up lands here; it is idempotent. */
void pw_eng_drive(pw_worker *w)
{
    pw_engine *e = w->e;
    int64_t epoch = atomic_load_explicit(&e->epoch, memory_order_acquire);
    if (epoch != w->epoch) {
        w->epoch = epoch;
        pthread_mutex_lock(&e->mu);
        w->step = e->run_first;
        w->last_step = e->run_first + e->run_n - 1;
        pthread_mutex_unlock(&e->mu);
        w->steps_ok = 0;
        w->verdict = 0;
        w->discard = 0;
        begin_step(w);
    }
    if (!w->running) return;
    const pw_rank_program *prog = &e->s->ranks[w->rank];
next_step:
    while (w->pc < prog->n_actions) {
        /* A failed step is left at once, unless a stage call is pending: the
         * stage may still write engine-owned buffers, so its completion is
         * waited for (run_call issues nothing more). */
        if (atomic_load_explicit(&e->abort, memory_order_relaxed) && !w->call_pending) {
            end_step(w);
            return;
        }
        if (e->t && !w->wait_t0 && !w->call_pending) { /* a new action, not a parked one's re-entry */
            publish_action(w, &prog->actions[w->pc]);
            /* PW_TEST_HANG=RANK:step:STEP: hang inside the step, at the
             * rank's first backward (mid-step, messages in flight). */
            if (prog->actions[w->pc].kind == PW_ACT_B)
                pw_transport_test_point(e->t, "step", w->step);
        }
        int rc = exec(w, &prog->actions[w->pc]);
        if (rc == EXEC_PARKED) {
            if (e->t) publish_park(w);
            return;
        }
        if (rc != EXEC_OK) {
            end_step(w);
            return;
        }
        w->resumed = 0;
        w->calls_done = 0;
        w->act_t1 = 0;
        w->pc++;
        w->actions++;
    }
    if (atomic_load_explicit(&e->abort, memory_order_relaxed)) {
        end_step(w);
        return;
    }
    /* Sends to other processes must complete before the step ends: their
     * buffers go back to the pools. */
    if (w->n_pending > 0) {
        if (pw_eng_progress_sends(w) < 0) {
            end_step(w);
            return;
        }
        if (w->n_pending > 0) {
            if (!w->flushing) {
                w->flushing = 1;
                w->wait_t0 = pw_now_ns();
                w->wait_kind = PW_WAIT_SENDS;
                pw_transport_waiting(e->t, PW_WAIT_ALL);
            }
            return;
        }
    }
    if (w->flushing) {
        w->wait_ns += pw_now_ns() - w->wait_t0;
        w->wait_t0 = 0;
        w->flushing = 0;
    }
    if (w->checker && pw_schedule_checker_finish(w->checker) != PW_OK) {
        fail(w, PW_ERR_SCHEDULE, "%s", pw_last_error());
        end_step(w);
        return;
    }
    if (!w->discard) w->steps_ok++;
    /* Overlap: straight on into the run's next step; the others may still
     * be in this one (their messages to us are keyed by micro-batch, and a
     * step-n+1 message for a key can only be sent once ours of step n was
     * received: see docs/engine.md, "Steps that overlap"). */
    if (w->step < w->last_step && !atomic_load_explicit(&e->abort, memory_order_relaxed)) {
        if (w->poll) event_del(w->poll);
        close_step(w);
        w->step++;
        begin_step(w);
        goto next_step;
    }
    end_step(w);
}

void pw_eng_wake_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    pw_eng_drive(arg);
}

void pw_eng_quit_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    pw_worker *w = arg;
    event_base_loopbreak(w->base);
}

/* Fails the step when this worker has been parked on the same thing for
 * longer than watchdog_s, naming what it waits for and from whom. */
void pw_eng_watchdog_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    pw_worker *w = arg;
    pw_engine *e = w->e;
    if (!w->running || (!w->wait_t0 && !w->call_pending)) return;
    int64_t waited = pw_now_ns() - (w->call_pending ? w->pend_t0 : w->wait_t0);
    if (waited < e->watchdog_ns || atomic_load(&e->abort)) return;
    /* Across processes, name the process the run is stuck on first (the
     * one we wait for may itself only be waiting); keep waiting while the
     * chain of waits ends at a process that still makes progress. */
    char stuck[512] = "";
    if (e->t && !w->call_pending) {
        char why[480];
        int c = pw_transport_blame(e->t, (double)e->watchdog_ns / 1e9, pw_eng_action_name, why, sizeof why);
        if (c == -1) return;
        if (why[0]) snprintf(stuck, sizeof stuck, "%s; ", why);
    }
    char who[64], from[64];
    pw_eng_name(e, w->replica, w->rank, who, sizeof who);
    const double secs = (double)waited / 1e9;
    if (w->call_pending) {
        /* The step fails, but the worker leaves it only once the stage
         * reports the completion (it may still write the buffers). */
        const pw_action *a = &e->s->ranks[w->rank].actions[w->pc];
        const pw_echunk *ch = pw_eng_chunk(e, w->lrep, w->pending_chunk);
        if (a->kind == PW_ACT_OPTIM)
            fail(w, PW_ERR_TIMEOUT, "%s (chunk %d): waited %.1f s for the completion of OPTIM of step %lld "
                 "(submitted to stage '%s')", who, w->pending_chunk, secs,
                 (long long)w->step, ch->vt->name ? ch->vt->name : "?");
        else
            fail(w, PW_ERR_TIMEOUT, "%s (chunk %d): waited %.1f s for the completion of %s of micro-batch %d "
                 "(submitted to stage '%s')", who, w->pending_chunk, secs, pw_action_kind_name(a->kind),
                 a->mb, ch->vt->name ? ch->vt->name : "?");
        return;
    }
    if (w->wait_kind == PW_WAIT_SENDS) {
        fail(w, PW_ERR_TIMEOUT, "%s%s: waited %.1f s for %d message(s) to other processes to be taken", stuck,
             who, secs, w->n_pending);
        end_step(w);
        return;
    }
    if (w->wait_kind == PW_WAIT_BUCKET || w->wait_kind == PW_WAIT_NORM) {
        char there[128] = "";
        if (w->wait_kind == PW_WAIT_BUCKET && e->groups) {
            int n = pw_shm_group_joined(e->groups[w->wait_key_chunk], w->replica, NULL);
            snprintf(there, sizeof there, " (%d of %d there)", n, e->NR);
        } else if (w->wait_kind == PW_WAIT_BUCKET && e->t && e->t->stage_coll.vt->waiting_for) {
            int m = e->t->stage_coll.vt->waiting_for(e->t->stage_coll.self, e->t->stage_coll.member);
            if (m >= 0) {
                pw_eng_name(e, m, w->rank, from, sizeof from);
                snprintf(there, sizeof there, " (waiting for %s)", from);
            }
        }
        if (w->wait_kind == PW_WAIT_BUCKET)
            fail(w, PW_ERR_TIMEOUT, "%s%s (chunk %d): waited %.1f s for the all-reduce of gradient bucket %d "
                 "across %d replicas%s", stuck, who, w->wait_key_chunk, secs, w->wait_key_bucket, e->NR, there);
        else
            fail(w, PW_ERR_TIMEOUT, "%s%s: waited %.1f s for the global gradient norm from the %d ranks of "
                 "replica %d", stuck, who, secs, e->S, w->replica);
        end_step(w);
        return;
    }
    const pw_action *a = &e->s->ranks[w->rank].actions[w->pc];
    const int dir = a->kind == PW_ACT_RECV_F ? PW_DIR_F : PW_DIR_B;
    int src = dir == PW_DIR_F ? a->chunk - 1 : a->chunk + 1;
    if (pw_eng_is_local(e, rank_of(e, src))) {
        pthread_mutex_lock(&w->mbox_mu);
        int arrived = pw_eng_mail(e, w->lrep, dir, a->chunk, a->mb)->arrived;
        pthread_mutex_unlock(&w->mbox_mu);
        if (arrived) return; /* its wake-up is queued behind us */
    }
    pw_eng_name(e, w->replica, rank_of(e, src), from, sizeof from);
    fail(w, PW_ERR_TIMEOUT, "%s%s (chunk %d): waited %.1f s for %s of micro-batch %d from %s (chunk %d)",
         stuck, who, a->chunk, secs, pw_action_kind_name(a->kind), a->mb, from, src);
    end_step(w);
}

void *pw_eng_worker_main(void *arg)
{
    pw_worker *w = arg;
    pw_engine *e = w->e;
    if (e->place) {
        char who[64];
        snprintf(who, sizeof who, "engine worker %d", w->gid);
        int slot = e->t ? e->place_first : (int)(w - e->workers);
        pw_cpu_bind_thread(e->topo, e->place->cpusets[slot], who);
    }
    /* The loop lives until destroy's quit event, idle between steps (the
     * watchdog timer keeps it non-empty anyway). */
    event_base_loop(w->base, EVLOOP_NO_EXIT_ON_EMPTY);
    /* Destroyed after a failed step that a stage call never completed
     * (only a straggler, hence an orphan, can be here): the stage still
     * holds stage_done's argument, so keep the engine until it reports. */
    while (w->call_pending) {
        pthread_mutex_lock(&w->mbox_mu);
        int fired = w->done_fired;
        pthread_mutex_unlock(&w->mbox_mu);
        if (fired) break;
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    /* Destroyed while this worker was stuck in a callback: the last owner
     * frees the engine (see pw_engine_destroy). */
    pthread_mutex_lock(&e->mu);
    int last = w->orphan && --e->orphan_refs == 0;
    pthread_mutex_unlock(&e->mu);
    if (last) pw_eng_free(e);
    return NULL;
}
