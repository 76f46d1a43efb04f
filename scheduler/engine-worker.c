/* pipewright — the engine's worker: one thread per rank running its own
 * libevent loop, and the actions it executes (F, B, W, SEND, RECV,
 * ALLREDUCE, OPTIM).
 *
 * Everything here runs inside event callbacks on the rank's thread, and
 * nothing blocks: a RECV whose message has not arrived records the wait start
 * and returns to the loop (the rank "parks"); the sender's deliver() wakes it
 * with event_active() on its wake event. The only locks are short critical
 * sections (a mailbox, a buffer pool, the engine mutex at step end).
 *
 * The step loop allocates nothing: slots, buffers and mailbox entries were
 * all planned in pw_engine_create (engine.c).
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "runtime/log.h"
#include "scheduler/engine-internal.h"

/* exec() outcomes besides PW_OK. */
enum { EXEC_OK = 0, EXEC_PARKED, EXEC_FAILED };

/* -------------------------------------------------------------- helpers */

static inline int rank_of(const pw_engine *e, int chunk) { return pw_sched_rank_of(e->s, chunk); }

static inline void trace_ev(pw_worker *w, const char *name, int cat, int chunk, int mb, int peer,
                            int64_t bytes, int64_t t0, int64_t t1)
{
    pw_trace_event *ev = pw_trace_push(w->e->trace, w->rank);
    if (!ev) return; /* full track: the trace counts the drop */
    ev->name = name;
    ev->cat = cat;
    ev->chunk = chunk;
    ev->mb = mb;
    ev->peer = peer;
    ev->step = atomic_load_explicit(&w->e->step, memory_order_relaxed);
    ev->bytes = bytes;
    ev->t0_ns = t0;
    ev->t1_ns = t1;
}

/* Records the first failure of the step and stops every worker: each polls
 * `abort` before its next action, and parked ones are woken to see it. */
static void engine_fail(pw_engine *e, pw_status st, const char *msg)
{
    pthread_mutex_lock(&e->mu);
    if (e->err == PW_OK) {
        e->err = st;
        snprintf(e->err_msg, sizeof e->err_msg, "%s", msg);
        pthread_cond_signal(&e->cv); /* run_step starts its straggler grace period */
    }
    pthread_mutex_unlock(&e->mu);
    atomic_store(&e->abort, 1);
    for (int r = 0; r < e->R; r++) event_active(e->workers[r].wake, 0, 0);
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
    engine_fail(w->e, st, msg);
    return EXEC_FAILED;
}

/* A failure about action (kind, chunk, mb): "rank R (chunk C), F of
 * micro-batch M: why". */
static int fail_at(pw_worker *w, pw_status st, const char *kind, int chunk, int mb, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static int fail_at(pw_worker *w, pw_status st, const char *kind, int chunk, int mb, const char *fmt, ...)
{
    char why[PW_ENGINE_ERRMSG - 128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    return fail(w, st, "rank %d (chunk %d), %s of micro-batch %d: %s", w->rank, chunk, kind, mb, why);
}

/* Runs one stage callback, timing it as busy time. */
static int call_stage(pw_worker *w, pw_status (*fn)(void *, int, int), const char *kind, int chunk,
                      int mb, int slot)
{
    pw_echunk *ch = &w->e->chunks[chunk];
    pw_clear_error(); /* a callback that fails without a message must not show a stale one */
    int64_t t0 = pw_now_ns();
    pw_status st = fn(ch->self, mb, slot);
    w->busy_ns += pw_now_ns() - t0;
    if (st == PW_OK) return EXEC_OK;
    const char *msg = pw_last_error();
    return fail_at(w, st, kind, chunk, mb, "%s", msg[0] ? msg : pw_status_str(st));
}

static int bind_port(pw_worker *w, int chunk, int mb, const char *kind, int slot, pw_port port,
                     const pw_msgbuf *b)
{
    static const char *const names[PW_PORT_COUNT] = {"ACT_IN", "ACT_OUT", "GRAD_OUT", "GRAD_IN"};
    pw_echunk *ch = &w->e->chunks[chunk];
    if (!ch->vt->bind || !ch->bytes[port]) return EXEC_OK;
    pw_clear_error();
    pw_status st = ch->vt->bind(ch->self, slot, port, b->data);
    if (st == PW_OK) return EXEC_OK;
    return fail_at(w, st, kind, chunk, mb, "binding %s of slot %d: %s", names[port], slot,
                   pw_last_error()[0] ? pw_last_error() : pw_status_str(st));
}

/* ------------------------------------------------------------- buffers */

static pw_msgbuf *pool_get(pw_pool *p)
{
    pw_msgbuf *b = NULL;
    pthread_mutex_lock(&p->mu);
    if (p->top > 0) b = &p->bufs[p->free_idx[--p->top]];
    pthread_mutex_unlock(&p->mu);
    /* Producer and consumer each drop one reference after their own last
     * backward of the micro-batch. */
    if (b) atomic_store_explicit(&b->refs, 2, memory_order_relaxed);
    return b;
}

static void buf_put(pw_msgbuf *b)
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

static int pool_exhausted(pw_worker *w, const char *kind, int chunk, int mb, const pw_pool *p)
{
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
    pw_echunk *ch = &w->e->chunks[chunk];
    buf_put(st->act_in);
    buf_put(st->act_out);
    buf_put(st->grad_out);
    buf_put(st->grad_in);
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

static int do_forward(pw_worker *w, int c, int m)
{
    pw_engine *e = w->e;
    pw_echunk *ch = &e->chunks[c];
    pw_mbstate *st = pw_eng_mb(e, c, m);
    if (st->done & PW_MB_F) return fail_at(w, PW_ERR_SCHEDULE, "F", c, m, "its F runs twice");
    pw_msgbuf *in = NULL, *out = NULL;
    if (c > 0) {
        if (rank_of(e, c - 1) == w->rank) {
            /* Local hand-over: read chunk c-1's output of this micro-batch. */
            pw_mbstate *prev = pw_eng_mb(e, c - 1, m);
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
        pw_pool *p = pw_eng_act_pool(e, c);
        if (p->bytes && !(out = pool_get(p))) return pool_exhausted(w, "F", c, m, p);
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
    return call_stage(w, ch->vt->forward, "F", c, m, slot);
}

static int do_backward(pw_worker *w, int c, int m)
{
    pw_engine *e = w->e;
    pw_echunk *ch = &e->chunks[c];
    pw_mbstate *st = pw_eng_mb(e, c, m);
    if (!(st->done & PW_MB_F)) return fail_at(w, PW_ERR_SCHEDULE, "B", c, m, "B before its F");
    if (st->done & PW_MB_B) return fail_at(w, PW_ERR_SCHEDULE, "B", c, m, "its B runs twice");
    pw_msgbuf *gout = NULL, *gin = NULL;
    if (c < e->C - 1) {
        if (rank_of(e, c + 1) == w->rank) {
            pw_mbstate *next = pw_eng_mb(e, c + 1, m);
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
        pw_pool *p = pw_eng_grad_pool(e, c - 1);
        if (p->bytes && !(gin = pool_get(p))) return pool_exhausted(w, "B", c, m, p);
    }
    st->grad_out = gout;
    st->grad_in = gin;
    st->done |= PW_MB_B;
    if (gout && bind_port(w, c, m, "B", st->slot, PW_PORT_GRAD_OUT, gout) != EXEC_OK) return EXEC_FAILED;
    if (gin && bind_port(w, c, m, "B", st->slot, PW_PORT_GRAD_IN, gin) != EXEC_OK) return EXEC_FAILED;
    if (call_stage(w, ch->vt->backward_input, "B", c, m, st->slot) != EXEC_OK) return EXEC_FAILED;
    if (e->split_w) return EXEC_OK;
    /* The full backward: the weight half right after, same bindings. */
    if (ch->vt->backward_weight &&
        call_stage(w, ch->vt->backward_weight, "B", c, m, st->slot) != EXEC_OK)
        return EXEC_FAILED;
    release_mb(w, c, st);
    return EXEC_OK;
}

static int do_weight(pw_worker *w, int c, int m)
{
    pw_engine *e = w->e;
    pw_echunk *ch = &e->chunks[c];
    pw_mbstate *st = pw_eng_mb(e, c, m);
    if (!e->split_w) return fail_at(w, PW_ERR_SCHEDULE, "W", c, m, "W in a schedule that does not split W");
    if (!(st->done & PW_MB_B)) return fail_at(w, PW_ERR_SCHEDULE, "W", c, m, "W before its B");
    if (st->done & PW_MB_W) return fail_at(w, PW_ERR_SCHEDULE, "W", c, m, "its W runs twice");
    st->done |= PW_MB_W;
    if (ch->vt->backward_weight &&
        call_stage(w, ch->vt->backward_weight, "W", c, m, st->slot) != EXEC_OK)
        return EXEC_FAILED;
    release_mb(w, c, st);
    return EXEC_OK;
}

static int do_optim(pw_worker *w)
{
    pw_engine *e = w->e;
    long step = (long)atomic_load_explicit(&e->step, memory_order_relaxed);
    for (int c = w->rank; c < e->C; c += e->R) {
        pw_echunk *ch = &e->chunks[c];
        if (!ch->vt->optimizer_step) continue;
        pw_clear_error();
        int64_t t0 = pw_now_ns();
        pw_status st = ch->vt->optimizer_step(ch->self, step);
        w->busy_ns += pw_now_ns() - t0;
        if (st != PW_OK)
            return fail(w, st, "rank %d (chunk %d), OPTIM of step %ld: %s", w->rank, c, step,
                        pw_last_error()[0] ? pw_last_error() : pw_status_str(st));
    }
    return EXEC_OK;
}

/* -------------------------------------------------------- communication */

/* Puts a message in the receiving rank's mailbox under key (dir, chunk, mb)
 * and wakes that rank if it is parked on exactly this key. Never blocks
 * beyond the mailbox's short critical section. */
static int deliver(pw_worker *w, const char *kind, int src_chunk, int dir, int chunk, int mb,
                   pw_msgbuf *buf)
{
    pw_engine *e = w->e;
    pw_worker *dst = &e->workers[rank_of(e, chunk)];
    pw_mail *mail = pw_eng_mail(e, dir, chunk, mb);
    int wake = 0, dup = 0;
    pthread_mutex_lock(&dst->mbox_mu);
    if (mail->arrived) {
        dup = 1;
    } else {
        mail->buf = buf;
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
    pw_mbstate *st = pw_eng_mb(e, c, m);
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
        bytes = e->chunks[c].bytes[PW_PORT_ACT_OUT];
    } else {
        if (c == 0) return fail_at(w, PW_ERR_SCHEDULE, kind, c, m, "SEND_B from chunk 0");
        if (!(st->done & PW_MB_B)) return fail_at(w, PW_ERR_SCHEDULE, kind, c, m, "SEND_B before its B");
        dst_chunk = c - 1;
        dir = PW_DIR_B;
        buf = st->grad_in;
        bytes = e->chunks[c].bytes[PW_PORT_GRAD_IN];
    }
    if ((rc = deliver(w, kind, c, dir, dst_chunk, m, buf)) != EXEC_OK) return rc;
    if (e->trace) trace_ev(w, kind, PW_TRACE_COMM, c, m, rank_of(e, dst_chunk), (int64_t)bytes, t0, pw_now_ns());
    return EXEC_OK;
}

/* Takes the message for this receive, or parks: records the wait start,
 * publishes the key the rank waits on and returns to the loop. */
static int do_recv(pw_worker *w, const pw_action *a)
{
    pw_engine *e = w->e;
    const int c = a->chunk, m = a->mb;
    const int dir = a->kind == PW_ACT_RECV_F ? PW_DIR_F : PW_DIR_B;
    const char *kind = pw_action_kind_name(a->kind);
    const int src_chunk = dir == PW_DIR_F ? c - 1 : c + 1;
    if (src_chunk < 0 || src_chunk >= e->C)
        return fail_at(w, PW_ERR_SCHEDULE, kind, c, m, "the chunk has no neighbour on that side");
    pw_mail *mail = pw_eng_mail(e, dir, c, m);
    pw_msgbuf *buf = NULL;
    int arrived;
    pthread_mutex_lock(&w->mbox_mu);
    arrived = mail->arrived;
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
    int64_t now = (e->trace || w->wait_t0 || !arrived) ? pw_now_ns() : 0;
    if (!arrived) {
        if (!w->wait_t0) w->wait_t0 = now;
        return EXEC_PARKED;
    }
    if (w->wait_t0) {
        w->wait_ns += now - w->wait_t0;
        if (e->trace)
            trace_ev(w, dir == PW_DIR_F ? "wait RECV_F" : "wait RECV_B", PW_TRACE_WAIT, c, m,
                     rank_of(e, src_chunk), 0, w->wait_t0, now);
        w->wait_t0 = 0;
    }
    if (w->checker && pw_schedule_checker_step(w->checker, a) != PW_OK)
        return fail(w, PW_ERR_SCHEDULE, "%s", pw_last_error());
    pw_mbstate *st = pw_eng_mb(e, c, m);
    if (dir == PW_DIR_F) {
        st->act_in = buf;
        st->done |= PW_MB_RF;
    } else {
        st->grad_out = buf;
        st->done |= PW_MB_RB;
    }
    if (e->trace) {
        size_t bytes = e->chunks[c].bytes[dir == PW_DIR_F ? PW_PORT_ACT_IN : PW_PORT_GRAD_OUT];
        trace_ev(w, kind, PW_TRACE_COMM, c, m, rank_of(e, src_chunk), (int64_t)bytes, now, pw_now_ns());
    }
    return EXEC_OK;
}

/* ------------------------------------------------------------ one action */

static int exec(pw_worker *w, const pw_action *a)
{
    pw_engine *e = w->e;
    if (a->kind == PW_ACT_RECV_F || a->kind == PW_ACT_RECV_B) return do_recv(w, a);
    /* The checker sees each action before it runs (receives: once arrived). */
    if (w->checker && pw_schedule_checker_step(w->checker, a) != PW_OK)
        return fail(w, PW_ERR_SCHEDULE, "%s", pw_last_error());
    int64_t t0 = e->trace ? pw_now_ns() : 0;
    int rc;
    switch (a->kind) {
    case PW_ACT_F: rc = do_forward(w, a->chunk, a->mb); break;
    case PW_ACT_B: rc = do_backward(w, a->chunk, a->mb); break;
    case PW_ACT_W: rc = do_weight(w, a->chunk, a->mb); break;
    case PW_ACT_SEND_F:
    case PW_ACT_SEND_B: return do_send(w, a); /* traces itself */
    case PW_ACT_ALLREDUCE: rc = EXEC_OK; break; /* one replica: nothing to reduce yet */
    case PW_ACT_OPTIM: rc = do_optim(w); break;
    default: return fail(w, PW_ERR_INTERNAL, "rank %d: action kind %d", w->rank, (int)a->kind);
    }
    if (rc == EXEC_OK && e->trace)
        trace_ev(w, pw_action_kind_name(a->kind),
                 a->kind == PW_ACT_ALLREDUCE ? PW_TRACE_COMM : PW_TRACE_COMPUTE, a->chunk, a->mb, -1,
                 0, t0, pw_now_ns());
    return rc;
}

/* ---------------------------------------------------------- step and loop */

static void begin_step(pw_worker *w)
{
    pw_engine *e = w->e;
    w->running = 1;
    w->pc = 0;
    w->wait_t0 = 0;
    for (int c = w->rank; c < e->C; c += e->R) {
        pw_mbstate *row = pw_eng_mb(e, c, 0);
        for (int m = 0; m < e->M; m++) {
            memset(&row[m], 0, sizeof row[m]);
            row[m].slot = -1;
        }
    }
    w->step_t0 = pw_now_ns();
}

/* Leaves the step (finished, failed or aborted) exactly once per step. */
static void end_step(pw_worker *w)
{
    pw_engine *e = w->e;
    if (!w->running) return;
    w->running = 0;
    int64_t now = pw_now_ns();
    if (w->wait_t0) { /* stopped while parked */
        w->wait_ns += now - w->wait_t0;
        w->wait_t0 = 0;
    }
    w->total_ns += now - w->step_t0;
    if (e->trace) trace_ev(w, "step", PW_TRACE_STEP, -1, -1, -1, 0, w->step_t0, now);
    pthread_mutex_lock(&e->mu);
    w->stopped_epoch = w->epoch;
    if (++e->n_stopped == e->R) pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

/* Runs the rank's actions from pc until the list ends, a receive parks, or
 * the step fails. Every wake-up lands here; it is idempotent. */
static void drive(pw_worker *w)
{
    pw_engine *e = w->e;
    int64_t epoch = atomic_load_explicit(&e->epoch, memory_order_acquire);
    if (epoch != w->epoch) {
        w->epoch = epoch;
        begin_step(w);
    }
    if (!w->running) return;
    const pw_rank_program *prog = &e->s->ranks[w->rank];
    while (w->pc < prog->n_actions) {
        if (atomic_load_explicit(&e->abort, memory_order_relaxed)) {
            end_step(w);
            return;
        }
        int rc = exec(w, &prog->actions[w->pc]);
        if (rc == EXEC_PARKED) return;
        if (rc != EXEC_OK) {
            end_step(w);
            return;
        }
        w->pc++;
        w->actions++;
    }
    if (w->checker && pw_schedule_checker_finish(w->checker) != PW_OK)
        fail(w, PW_ERR_SCHEDULE, "%s", pw_last_error());
    end_step(w);
}

void pw_eng_wake_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    drive(arg);
}

void pw_eng_quit_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    pw_worker *w = arg;
    event_base_loopbreak(w->base);
}

/* Fails the step when this rank has been parked on the same receive for
 * longer than watchdog_s, naming what it waits for and from whom. */
void pw_eng_watchdog_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    pw_worker *w = arg;
    pw_engine *e = w->e;
    if (!w->running || !w->wait_t0) return;
    int64_t waited = pw_now_ns() - w->wait_t0;
    if (waited < e->watchdog_ns || atomic_load(&e->abort)) return;
    const pw_action *a = &e->s->ranks[w->rank].actions[w->pc];
    const int dir = a->kind == PW_ACT_RECV_F ? PW_DIR_F : PW_DIR_B;
    pthread_mutex_lock(&w->mbox_mu);
    int arrived = pw_eng_mail(e, dir, a->chunk, a->mb)->arrived;
    pthread_mutex_unlock(&w->mbox_mu);
    if (arrived) return; /* its wake-up is queued behind us */
    int src = dir == PW_DIR_F ? a->chunk - 1 : a->chunk + 1;
    fail(w, PW_ERR_TIMEOUT, "rank %d (chunk %d): waited %.1f s for %s of micro-batch %d from rank %d (chunk %d)",
         w->rank, a->chunk, (double)waited / 1e9, pw_action_kind_name(a->kind), a->mb, rank_of(e, src),
         src);
    end_step(w);
}

void *pw_eng_worker_main(void *arg)
{
    pw_worker *w = arg;
    pw_engine *e = w->e;
    if (e->place) {
        char who[48];
        snprintf(who, sizeof who, "engine rank %d", w->rank);
        pw_cpu_bind_thread(e->topo, e->place->cpusets[w->rank], who);
    }
    /* The loop lives until destroy's quit event, idle between steps (the
     * watchdog timer keeps it non-empty anyway). */
    event_base_loop(w->base, EVLOOP_NO_EXIT_ON_EMPTY);
    /* Destroyed while this worker was stuck in a callback: the last owner
     * frees the engine (see pw_engine_destroy). */
    pthread_mutex_lock(&e->mu);
    int last = w->orphan && --e->orphan_refs == 0;
    pthread_mutex_unlock(&e->mu);
    if (last) pw_eng_free(e);
    return NULL;
}
