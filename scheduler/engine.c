/* pipewright — the event-driven engine: checking the configuration, planning
 * and allocating every buffer, starting and stopping the per-rank workers,
 * and running one step. The workers' event loop and the actions themselves
 * live in engine-worker.c; docs/engine.md explains the whole design.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/thread.h>

#include "runtime/log.h"
#include "scheduler/engine-internal.h"

/* libevent's locking must be switched on before the first event_base exists,
 * and once per process. */
static pthread_once_t evthread_once = PTHREAD_ONCE_INIT;
static int evthread_status = -1;
static void evthread_setup(void) { evthread_status = evthread_use_pthreads(); }

/* The "ranks share cores" notice is printed once per process, not per engine
 * (tests and sweeps create many). */
static atomic_flag share_notice_done = ATOMIC_FLAG_INIT;

#define DEFAULT_WATCHDOG_S 60.0

/* ------------------------------------------------------------- checks */

static size_t port_bytes(const pw_engine_chunk *ch, pw_port p)
{
    return ch->vt->port_bytes ? ch->vt->port_bytes(ch->self, p) : 0;
}

/* Shapes, report, chunks and every action's fields: everything the workers
 * index with is in range before a thread starts (the engine never trusts an
 * index it did not check). The schedule's semantics are the validator's job;
 * a worker still refuses out-of-order actions with a clear error. */
static pw_status check_config(const pw_engine_config *cfg)
{
    const pw_schedule *s = cfg->schedule;
    if (!s) return pw_error(PW_ERR_INVALID_ARG, "engine: config.schedule is NULL");
    PW_CHECK(pw_sched_check_shape(s));
    if (!s->lowered && s->n_ranks > 1)
        return pw_error(PW_ERR_INVALID_ARG,
                        "engine: the schedule is not lowered (run pw_schedule_lower, then "
                        "pw_schedule_validate)");
    const pw_schedule_report *rep = cfg->report;
    if (!rep || !rep->peak_inflight_chunk || !rep->peak_inflight)
        return pw_error(PW_ERR_INVALID_ARG,
                        "engine: config.report is missing (pass the report of pw_schedule_validate)");
    if (rep->n_ranks != s->n_ranks || rep->n_chunks != s->n_chunks)
        return pw_error(PW_ERR_INVALID_ARG,
                        "engine: the report is for %d ranks and %d chunks, the schedule has %d and %d",
                        rep->n_ranks, rep->n_chunks, s->n_ranks, s->n_chunks);
    for (int c = 0; c < s->n_chunks; c++)
        if (rep->peak_inflight_chunk[c] < 1 || rep->peak_inflight_chunk[c] > s->n_micro)
            return pw_error(PW_ERR_INVALID_ARG,
                            "engine: report gives chunk %d a peak of %d in-flight micro-batches "
                            "(must be 1..%d)", c, rep->peak_inflight_chunk[c], s->n_micro);
    if (!cfg->chunks) return pw_error(PW_ERR_INVALID_ARG, "engine: config.chunks is NULL");
    for (int c = 0; c < s->n_chunks; c++) {
        const pw_stage_i *vt = cfg->chunks[c].vt;
        if (!vt || !vt->forward || !vt->backward_input)
            return pw_error(PW_ERR_INVALID_ARG,
                            "engine: chunk %d has no stage vtable with forward and backward_input", c);
    }
    if (cfg->watchdog_s < 0 || cfg->watchdog_s != cfg->watchdog_s)
        return pw_error(PW_ERR_INVALID_ARG, "engine: watchdog_s must be >= 0 (got %g)", cfg->watchdog_s);
    for (int r = 0; r < s->n_ranks; r++) {
        const pw_rank_program *p = &s->ranks[r];
        if (p->n_actions < 0 || (p->n_actions > 0 && !p->actions))
            return pw_error(PW_ERR_INVALID_ARG, "engine: rank %d has a bad action list", r);
        for (int i = 0; i < p->n_actions; i++) {
            char why[160], desc[96];
            const pw_action *a = &p->actions[i];
            if (pw_sched_action_valid(s, r, a)) continue;
            pw_sched_action_ok(s, r, a, why, sizeof why);
            pw_sched_describe(s, r, a, desc, sizeof desc);
            return pw_error(PW_ERR_SCHEDULE, "engine: rank %d, position %d (%s): %s", r, i, desc, why);
        }
    }
    return PW_OK;
}

/* Reads every chunk's port sizes into ports[c].bytes and checks each link
 * agrees on both ends. */
static pw_status read_ports(int C, const pw_engine_chunk *chunks, pw_echunk *ports)
{
    for (int c = 0; c < C; c++)
        for (int p = 0; p < PW_PORT_COUNT; p++)
            ports[c].bytes[p] = port_bytes(&chunks[c], (pw_port)p);
    /* The ends of the pipeline have no neighbour: whatever their port_bytes
     * says about those ports is ignored (stage.h asks for 0). */
    ports[0].bytes[PW_PORT_ACT_IN] = ports[0].bytes[PW_PORT_GRAD_IN] = 0;
    ports[C - 1].bytes[PW_PORT_ACT_OUT] = ports[C - 1].bytes[PW_PORT_GRAD_OUT] = 0;
    for (int c = 0; c + 1 < C; c++) {
        const size_t *a = ports[c].bytes, *b = ports[c + 1].bytes;
        if (a[PW_PORT_ACT_OUT] != b[PW_PORT_ACT_IN])
            return pw_error(PW_ERR_SHAPE,
                            "engine: chunk %d sends %zu-byte activations (port_bytes ACT_OUT) but "
                            "chunk %d expects %zu bytes (ACT_IN)",
                            c, a[PW_PORT_ACT_OUT], c + 1, b[PW_PORT_ACT_IN]);
        if (b[PW_PORT_GRAD_IN] != a[PW_PORT_GRAD_OUT])
            return pw_error(PW_ERR_SHAPE,
                            "engine: chunk %d sends %zu-byte gradients (port_bytes GRAD_IN) but "
                            "chunk %d expects %zu bytes (GRAD_OUT)",
                            c + 1, b[PW_PORT_GRAD_IN], c, a[PW_PORT_GRAD_OUT]);
    }
    return PW_OK;
}

/* -------------------------------------------------------- plan, allocate */

/* Buffers per link. An activation buffer of link c, mb m is handed out at
 * F(c, m) and returns when both c and c+1 have run their last backward of m;
 * until then chunk c or chunk c+1 holds a slot for m (a chunk drops its
 * buffer references before its slot, and c's last backward of m comes after
 * c+1's B of m). So the buffers out at any moment are at most the slots in use
 * on c plus those on c+1: peak[c] + peak[c+1]. A gradient buffer of the link
 * (handed out at B(c+1, m), read by c) is likewise covered by c's and c+1's
 * slots for m. Neither can exceed n_micro (one per micro-batch, and every
 * buffer is back at the end of each step). */
static int pool_size(const pw_engine *e, int link)
{
    int n = e->rep->peak_inflight_chunk[link] + e->rep->peak_inflight_chunk[link + 1];
    return n < e->M ? n : e->M;
}

/* ports[c].bytes: the port sizes read_ports found. */
static pw_status allocate(pw_engine *e, const pw_echunk *ports)
{
    const int R = e->R, C = e->C, M = e->M, L = C - 1;
    const size_t keys = (size_t)C * (size_t)M;

    /* Plan: bookkeeping in one arena, message bytes in another. */
    pw_arena_init(&e->book, "engine bookkeeping");
    pw_arena_init(&e->msgs, "engine message buffers");
    size_t o_workers = pw_arena_plan(&e->book, (size_t)R * sizeof(pw_worker));
    size_t o_chunks = pw_arena_plan(&e->book, (size_t)C * sizeof(pw_echunk));
    size_t n_slots = 0;
    for (int c = 0; c < C; c++) n_slots += (size_t)e->rep->peak_inflight_chunk[c];
    size_t o_slots = pw_arena_plan(&e->book, n_slots * sizeof(int));
    size_t o_mb = pw_arena_plan(&e->book, keys * sizeof(pw_mbstate));
    size_t o_mail = pw_arena_plan(&e->book, 2 * keys * sizeof(pw_mail));
    size_t o_pools = pw_arena_plan(&e->book, (size_t)(2 * (L > 0 ? L : 0)) * sizeof(pw_pool));
    size_t n_bufs = 0;
    size_t *o_data = NULL;
    if (L > 0) {
        o_data = calloc((size_t)(2 * L), sizeof *o_data);
        if (!o_data) return pw_error(PW_ERR_NOMEM, "engine: out of memory planning buffers");
    }
    for (int i = 0; i < 2 * L; i++) {
        int link = i < L ? i : i - L;
        size_t bytes = i < L ? ports[link].bytes[PW_PORT_ACT_OUT] : ports[link].bytes[PW_PORT_GRAD_OUT];
        int n = bytes ? pool_size(e, link) : 0;
        n_bufs += (size_t)n;
        /* 64-byte multiples keep every buffer of the pool aligned. */
        size_t stride = (bytes + PW_ARENA_ALIGN - 1) / PW_ARENA_ALIGN * PW_ARENA_ALIGN;
        o_data[i] = pw_arena_plan(&e->msgs, stride * (size_t)n);
        e->msg_bytes += (int64_t)(stride * (size_t)n);
    }
    size_t o_free = pw_arena_plan(&e->book, n_bufs * sizeof(int));
    size_t o_bufs = pw_arena_plan(&e->book, n_bufs * sizeof(pw_msgbuf));

    pw_status st = pw_arena_commit(&e->book);
    if (st == PW_OK) st = pw_arena_commit(&e->msgs);
    if (st != PW_OK) {
        free(o_data);
        return st;
    }

    /* Point. */
    e->workers = pw_arena_at(&e->book, o_workers);
    e->chunks = pw_arena_at(&e->book, o_chunks);
    e->mb = pw_arena_at(&e->book, o_mb);
    e->mail = pw_arena_at(&e->book, o_mail);
    e->pools = L > 0 ? pw_arena_at(&e->book, o_pools) : NULL;
    int *slots = pw_arena_at(&e->book, o_slots);
    int *free_idx = pw_arena_at(&e->book, o_free);
    pw_msgbuf *bufs = pw_arena_at(&e->book, o_bufs);
    for (int c = 0; c < C; c++) {
        pw_echunk *ch = &e->chunks[c];
        memcpy(ch->bytes, ports[c].bytes, sizeof ch->bytes);
        ch->n_slots = ch->n_free = e->rep->peak_inflight_chunk[c];
        ch->free_slots = slots;
        /* Slots pop from the end: slot 0 first. */
        for (int k = 0; k < ch->n_slots; k++) slots[k] = ch->n_slots - 1 - k;
        slots += ch->n_slots;
    }
    for (size_t k = 0; k < keys; k++) e->mb[k].slot = -1;
    for (int i = 0; i < 2 * L; i++) {
        pw_pool *p = &e->pools[i];
        int link = i < L ? i : i - L;
        p->link = link;
        p->grad = i >= L;
        p->bytes = p->grad ? ports[link].bytes[PW_PORT_GRAD_OUT] : ports[link].bytes[PW_PORT_ACT_OUT];
        p->n = p->top = p->bytes ? pool_size(e, link) : 0;
        p->free_idx = free_idx;
        p->bufs = bufs;
        size_t stride = (p->bytes + PW_ARENA_ALIGN - 1) / PW_ARENA_ALIGN * PW_ARENA_ALIGN;
        char *data = pw_arena_at(&e->msgs, o_data[i]);
        for (int k = 0; k < p->n; k++) {
            p->free_idx[k] = p->n - 1 - k;
            p->bufs[k].data = data + (size_t)k * stride;
            p->bufs[k].index = k;
            p->bufs[k].pool = p;
            atomic_init(&p->bufs[k].refs, 0);
        }
        pthread_mutex_init(&p->mu, NULL);
        free_idx += p->n;
        bufs += p->n;
    }
    free(o_data);
    return PW_OK;
}

/* ------------------------------------------------------------ pinning */

static void plan_pinning(pw_engine *e)
{
    if (pw_topology_load(&e->topo) != PW_OK) {
        PW_WARN("engine: %s; workers run unpinned", pw_last_error());
        e->topo = NULL;
        return;
    }
    if (pw_cpu_place_ranks(e->topo, e->R, &e->place) != PW_OK) {
        PW_WARN("engine: placement failed (%s); workers run unpinned", pw_last_error());
        hwloc_topology_destroy(e->topo);
        e->topo = NULL;
        e->place = NULL;
        return;
    }
    if (e->place->note[0] && !atomic_flag_test_and_set(&share_notice_done)) PW_WARN("%s", e->place->note);
}

/* ----------------------------------------------------------- lifecycle */

static pw_status start_workers(pw_engine *e)
{
    for (int r = 0; r < e->R; r++) {
        pw_worker *w = &e->workers[r];
        w->e = e;
        w->rank = r;
        w->wait_dir = -1;
        pthread_mutex_init(&w->mbox_mu, NULL);
        for (int c = r; c < e->C; c += e->R) w->n_slots += e->chunks[c].n_slots;
        if (e->check) {
            PW_CHECK(pw_schedule_checker_create(e->s, r, e->rep->peak_inflight[r], &w->checker));
        }
        w->base = event_base_new();
        if (!w->base) return pw_error(PW_ERR_INTERNAL, "engine: libevent cannot create an event base for rank %d", r);
        w->wake = event_new(w->base, -1, 0, pw_eng_wake_cb, w);
        w->quit = event_new(w->base, -1, 0, pw_eng_quit_cb, w);
        w->watchdog = event_new(w->base, -1, EV_PERSIST, pw_eng_watchdog_cb, w);
        if (!w->wake || !w->quit || !w->watchdog || event_add(w->watchdog, &e->watchdog_tv) != 0)
            return pw_error(PW_ERR_INTERNAL, "engine: libevent cannot create rank %d's events", r);
    }
    for (int r = 0; r < e->R; r++) {
        pw_worker *w = &e->workers[r];
        int rc = pthread_create(&w->thread, NULL, pw_eng_worker_main, w);
        if (rc != 0)
            return pw_error(PW_ERR_NOMEM, "engine: cannot start the worker thread of rank %d: %s", r,
                            strerror(rc));
        w->started = 1;
    }
    return PW_OK;
}

pw_status pw_engine_create(const pw_engine_config *cfg, pw_engine **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_engine_create: out is NULL");
    *out = NULL;
    if (!cfg) return pw_error(PW_ERR_INVALID_ARG, "pw_engine_create: config is NULL");
    PW_CHECK(check_config(cfg));
    pthread_once(&evthread_once, evthread_setup);
    if (evthread_status != 0)
        return pw_error(PW_ERR_UNSUPPORTED, "engine: libevent has no pthreads locking (evthread_use_pthreads failed)");

    pw_engine *e = calloc(1, sizeof *e);
    if (!e) return pw_error(PW_ERR_NOMEM, "engine: out of memory");
    const pw_schedule *s = cfg->schedule;
    e->s = s;
    e->rep = cfg->report;
    e->R = s->n_ranks;
    e->C = s->n_chunks;
    e->M = s->n_micro;
    e->V = s->chunks_per_rank;
    e->split_w = s->split_w;
    e->trace = cfg->trace;
    const char *env = getenv("PW_DEBUG_CHECK");
    e->check = cfg->check || (env && strcmp(env, "1") == 0);
    double wd = cfg->watchdog_s > 0 ? cfg->watchdog_s : DEFAULT_WATCHDOG_S;
    e->watchdog_ns = (int64_t)(wd * 1e9);
    /* The timer checks four times per watchdog period, at least once a second. */
    double period = wd / 4 < 1.0 ? wd / 4 : 1.0;
    e->watchdog_tv.tv_sec = (time_t)period;
    e->watchdog_tv.tv_usec = (suseconds_t)((period - (double)(time_t)period) * 1e6);
    if (e->watchdog_tv.tv_sec == 0 && e->watchdog_tv.tv_usec < 1000) e->watchdog_tv.tv_usec = 1000;
    atomic_init(&e->epoch, 0);
    atomic_init(&e->step, 0);
    atomic_init(&e->abort, 0);

    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, &ca);
    pthread_condattr_destroy(&ca);
    e->sync_init = 1;

    /* Port sizes first: they size the message pools. */
    pw_status st;
    pw_echunk *ports = calloc((size_t)e->C, sizeof *ports);
    if (!ports) {
        st = pw_error(PW_ERR_NOMEM, "engine: out of memory");
        goto fail;
    }
    st = read_ports(e->C, cfg->chunks, ports);
    if (st == PW_OK) st = allocate(e, ports);
    free(ports);
    if (st != PW_OK) goto fail;
    for (int c = 0; c < e->C; c++) {
        e->chunks[c].vt = cfg->chunks[c].vt;
        e->chunks[c].self = cfg->chunks[c].self;
        e->chunks[c].rank = pw_sched_rank_of(s, c);
    }

    if (cfg->pin) plan_pinning(e);
    PW_CHECK_GOTO(start_workers(e), st, fail);
    PW_INFO(PW_SUB_SCHED, "engine: %d ranks, %d chunks, %d micro-batches, %lld message bytes%s",
            e->R, e->C, e->M, (long long)e->msg_bytes, e->check ? ", checker on" : "");
    *out = e;
    return PW_OK;
fail:
    pw_engine_destroy(e);
    return st;
}

void pw_eng_free(pw_engine *e)
{
    if (e->workers) {
        for (int r = 0; r < e->R; r++) {
            pw_worker *w = &e->workers[r];
            if (w->watchdog) event_free(w->watchdog);
            if (w->wake) event_free(w->wake);
            if (w->quit) event_free(w->quit);
            if (w->base) event_base_free(w->base);
            pw_schedule_checker_destroy(w->checker);
            if (w->e) pthread_mutex_destroy(&w->mbox_mu);
        }
    }
    for (int i = 0; e->pools && i < 2 * (e->C - 1); i++) pthread_mutex_destroy(&e->pools[i].mu);
    pw_cpu_placement_destroy(e->place);
    if (e->topo) hwloc_topology_destroy(e->topo);
    pw_arena_release(&e->msgs);
    pw_arena_release(&e->book);
    if (e->sync_init) {
        pthread_cond_destroy(&e->cv);
        pthread_mutex_destroy(&e->mu);
    }
    free(e);
}

void pw_engine_destroy(pw_engine *e)
{
    if (!e) return;
    if (!e->workers) {
        pw_eng_free(e);
        return;
    }
    for (int r = 0; r < e->R; r++)
        if (e->workers[r].started) event_active(e->workers[r].quit, 0, 0);
    /* Mark-then-free: a worker that had not left a failed step when
     * run_step gave up on it is still inside a stage callback and uses this
     * memory. Such workers are detached, and the last owner to let go (one
     * of them, leaving its loop, or this call) frees the engine. */
    int n_orphans = 0;
    pthread_mutex_lock(&e->mu);
    if (e->stragglers) {
        int64_t epoch = atomic_load(&e->epoch);
        for (int r = 0; r < e->R; r++) {
            pw_worker *w = &e->workers[r];
            if (w->started && w->stopped_epoch != epoch) {
                w->orphan = 1;
                n_orphans++;
            }
        }
        e->orphan_refs = n_orphans + 1;
    }
    pthread_mutex_unlock(&e->mu);
    for (int r = 0; r < e->R; r++) {
        pw_worker *w = &e->workers[r];
        if (!w->started) continue;
        if (w->orphan) pthread_detach(w->thread);
        else pthread_join(w->thread, NULL);
    }
    if (n_orphans) {
        PW_WARN("engine: %d worker(s) still inside a stage callback; the engine is freed when they return",
                n_orphans);
        pthread_mutex_lock(&e->mu);
        int last = --e->orphan_refs == 0;
        pthread_mutex_unlock(&e->mu);
        if (!last) return;
    }
    pw_eng_free(e);
}

/* -------------------------------------------------------------- a step */

/* End-of-step invariant (STYLE §14), run on the caller's thread once every
 * worker has stopped: each micro-batch has left every chunk (slots free),
 * every buffer is back in its pool and every message was received. A
 * validated schedule always satisfies it; a hand-written one that skips a
 * backward or a receive gets named here instead of failing obscurely in the
 * next step. */
static pw_status audit_step(pw_engine *e, int64_t step)
{
    for (int c = 0; c < e->C; c++) {
        const pw_echunk *ch = &e->chunks[c];
        if (ch->n_free == ch->n_slots) continue;
        for (int m = 0; m < e->M; m++)
            if (pw_eng_mb(e, c, m)->slot >= 0)
                return pw_error(PW_ERR_SCHEDULE,
                                "engine: step %lld ended with micro-batch %d still in flight on "
                                "chunk %d (rank %d): its last backward never ran",
                                (long long)step, m, c, ch->rank);
        return pw_error(PW_ERR_INTERNAL, "engine: chunk %d lost an activation slot in step %lld", c,
                        (long long)step);
    }
    for (int d = 0; d < 2; d++)
        for (int c = 0; c < e->C; c++)
            for (int m = 0; m < e->M; m++)
                if (pw_eng_mail(e, d, c, m)->arrived) {
                    int src = d == PW_DIR_F ? c - 1 : c + 1;
                    return pw_error(PW_ERR_SCHEDULE,
                                    "engine: step %lld ended with an unreceived message: %s of "
                                    "micro-batch %d from chunk %d (rank %d) to chunk %d (rank %d)",
                                    (long long)step, d == PW_DIR_F ? "SEND_F" : "SEND_B", m, src,
                                    e->chunks[src].rank, c, e->chunks[c].rank);
                }
    for (int i = 0; e->pools && i < 2 * (e->C - 1); i++) {
        const pw_pool *p = &e->pools[i];
        if (p->top != p->n)
            return pw_error(PW_ERR_INTERNAL,
                            "engine: step %lld ended with %d of %d %s buffers of link %d->%d not returned",
                            (long long)step, p->n - p->top, p->n, p->grad ? "gradient" : "activation",
                            p->link, p->link + 1);
    }
    return PW_OK;
}

/* After a failure, how long run_step waits for the other workers to leave
 * the step before it returns anyway (a worker inside a stage callback that
 * never returns cannot be interrupted). */
static double straggler_grace_s(const pw_engine *e)
{
    double wd = (double)e->watchdog_ns / 1e9;
    return wd > 2.0 ? wd : 2.0;
}

pw_status pw_engine_run_step(pw_engine *e, int64_t step)
{
    if (!e) return pw_error(PW_ERR_INVALID_ARG, "pw_engine_run_step: engine is NULL");
    if (step < 1) return pw_error(PW_ERR_INVALID_ARG, "pw_engine_run_step: step %lld (steps count from 1)", (long long)step);
    pthread_mutex_lock(&e->mu);
    if (e->failed) {
        pw_status err = e->err;
        char msg[PW_ENGINE_ERRMSG];
        memcpy(msg, e->err_msg, sizeof msg);
        pthread_mutex_unlock(&e->mu);
        return pw_error(err, "engine stopped by an earlier failure (destroy it): %s", msg);
    }
    e->n_stopped = 0;
    atomic_store(&e->step, step);
    int64_t epoch = atomic_fetch_add(&e->epoch, 1) + 1;
    pthread_mutex_unlock(&e->mu);

    for (int r = 0; r < e->R; r++) event_active(e->workers[r].wake, 0, 0);

    pthread_mutex_lock(&e->mu);
    int have_deadline = 0;
    struct timespec deadline;
    while (e->n_stopped < e->R) {
        if (e->err == PW_OK) {
            pthread_cond_wait(&e->cv, &e->mu);
            continue;
        }
        if (!have_deadline) {
            clock_gettime(CLOCK_MONOTONIC, &deadline);
            double g = straggler_grace_s(e);
            deadline.tv_sec += (time_t)g;
            deadline.tv_nsec += (long)((g - (double)(time_t)g) * 1e9);
            if (deadline.tv_nsec >= 1000000000L) {
                deadline.tv_sec++;
                deadline.tv_nsec -= 1000000000L;
            }
            have_deadline = 1;
        }
        if (pthread_cond_timedwait(&e->cv, &e->mu, &deadline) == ETIMEDOUT) break;
    }
    pw_status st = PW_OK;
    if (e->err != PW_OK) {
        e->failed = 1;
        char note[96] = "";
        if (e->n_stopped < e->R) {
            e->stragglers = 1;
            for (int r = 0; r < e->R; r++)
                if (e->workers[r].stopped_epoch != epoch) {
                    snprintf(note, sizeof note, " (rank %d did not stop: still inside a stage callback)", r);
                    break;
                }
        }
        st = pw_error(e->err, "%s%s", e->err_msg, note);
    } else if ((st = audit_step(e, step)) != PW_OK) {
        e->failed = 1;
        e->err = st;
        snprintf(e->err_msg, sizeof e->err_msg, "%s", pw_last_error());
    }
    pthread_mutex_unlock(&e->mu);
    return st;
}

/* -------------------------------------------------------------- figures */

void pw_engine_rank_stats_get(const pw_engine *e, int rank, pw_engine_rank_stats *out)
{
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!e || rank < 0 || rank >= e->R) return;
    pw_engine *m = (pw_engine *)e; /* the mutex orders us after the step's writes */
    pthread_mutex_lock(&m->mu);
    const pw_worker *w = &e->workers[rank];
    out->slots = w->n_slots;
    out->peak_slots_used = w->peak;
    out->busy_s = (double)w->busy_ns / 1e9;
    out->wait_s = (double)w->wait_ns / 1e9;
    out->total_s = (double)w->total_ns / 1e9;
    out->actions = w->actions;
    pthread_mutex_unlock(&m->mu);
}

int pw_engine_chunk_peak(const pw_engine *e, int chunk)
{
    if (!e || chunk < 0 || chunk >= e->C) return -1;
    pw_engine *m = (pw_engine *)e;
    pthread_mutex_lock(&m->mu);
    int p = e->chunks[chunk].peak;
    pthread_mutex_unlock(&m->mu);
    return p;
}

int64_t pw_engine_message_bytes(const pw_engine *e) { return e ? e->msg_bytes : 0; }
