/* pipewright — the event-driven engine: checking the configuration, planning
 * and allocating every buffer, starting and stopping the workers, and
 * running one step. The workers' event loop and the actions live in
 * engine-worker.c, gradient buckets and other processes in engine-comm.c;
 * docs/engine.md and docs/distributed.md explain the whole design.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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
/* The GPU-locality fallback is said once per process, not per pipeline. */
static atomic_flag gpu_fallback_done = ATOMIC_FLAG_INIT;

#define DEFAULT_WATCHDOG_S 60.0
#define MAX_REPLICAS (1 << 16)

void pw_eng_name(const pw_engine *e, int replica, int rank, char *buf, size_t n)
{
    if (e->t)
        snprintf(buf, n, "MPI rank %d = replica %d rank %d", pw_transport_world_of(e->t, replica, rank),
                 replica, rank);
    else if (e->NR > 1)
        snprintf(buf, n, "replica %d rank %d", replica, rank);
    else
        snprintf(buf, n, "rank %d", rank);
}

/* ------------------------------------------------------------- checks */

static size_t port_bytes(const pw_engine_chunk *ch, pw_port p)
{
    return ch->vt->port_bytes ? ch->vt->port_bytes(ch->self, p) : 0;
}

static int is_local(const pw_engine_config *cfg, int rank)
{
    return !cfg->transport || cfg->transport->rank == rank;
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
    const int NR = cfg->replicas ? cfg->replicas : 1;
    if (NR < 1 || NR > MAX_REPLICAS)
        return pw_error(PW_ERR_INVALID_ARG, "engine: replicas must be 1..%d (got %d)", MAX_REPLICAS,
                        cfg->replicas);
    if (NR > 1 && s->n_buckets < 1)
        return pw_error(PW_ERR_INVALID_ARG,
                        "engine: %d replicas need a schedule with all-reduce buckets (n_buckets >= 1)", NR);
    if (cfg->clip_grad_norm < 0 || cfg->clip_grad_norm != cfg->clip_grad_norm)
        return pw_error(PW_ERR_INVALID_ARG, "engine: clip_grad_norm must be >= 0 (got %g)",
                        cfg->clip_grad_norm);
    const pw_transport *t = cfg->transport;
    if (t) {
        if (!t->vt || t->n_ranks != s->n_ranks || t->n_replicas != NR || t->rank < 0 ||
            t->rank >= s->n_ranks || t->replica < 0 || t->replica >= NR)
            return pw_error(PW_ERR_INVALID_ARG,
                            "engine: the transport is laid out for %d ranks x %d replicas (this process "
                            "replica %d rank %d), the engine for %d x %d", t->n_ranks, t->n_replicas,
                            t->replica, t->rank, s->n_ranks, NR);
        if ((int64_t)2 * s->n_chunks * s->n_micro - 1 > t->max_tag)
            return pw_error(PW_ERR_UNSUPPORTED,
                            "engine: %d chunks x %d micro-batches need message tags up to %lld; the "
                            "transport allows %d", s->n_chunks, s->n_micro,
                            (long long)2 * s->n_chunks * s->n_micro - 1, t->max_tag);
    }
    if (!cfg->chunks) return pw_error(PW_ERR_INVALID_ARG, "engine: config.chunks is NULL");
    const int NRL = t ? 1 : NR;
    for (int k = 0; k < NRL; k++) {
        for (int c = 0; c < s->n_chunks; c++) {
            if (!is_local(cfg, pw_sched_rank_of(s, c))) continue;
            const pw_engine_chunk *ch = &cfg->chunks[(size_t)k * (size_t)s->n_chunks + (size_t)c];
            const pw_stage_i *vt = ch->vt;
            char who[32] = "";
            if (NRL > 1) snprintf(who, sizeof who, " of replica %d", k);
            if (!vt || !vt->forward || !vt->backward_input)
                return pw_error(PW_ERR_INVALID_ARG,
                                "engine: chunk %d%s has no stage vtable with forward and backward_input",
                                c, who);
            if (NR > 1 && cfg->compress && cfg->compress->kind != PW_COMPRESS_NONE && cfg->span_mem)
                return pw_error(PW_ERR_UNSUPPORTED, "engine: gradient compression needs the gradients in "
                                "host memory (chunk %d%s computes on a device)", c, who);
            if (NR > 1 && !vt->grad_bucket)
                return pw_error(PW_ERR_INVALID_ARG,
                                "engine: chunk %d%s has no grad_bucket: %d replicas cannot sum its "
                                "gradients", c, who, NR);
            if (cfg->clip_grad_norm > 0 && (!vt->grad_sumsq || !vt->scale_grads))
                return pw_error(PW_ERR_INVALID_ARG,
                                "engine: chunk %d%s has no grad_sumsq/scale_grads: cannot clip the "
                                "gradient norm", c, who);
            if (cfg->clip_grad_norm > 0 && cfg->post_validate && vt->optimizer_step &&
                (!vt->optimizer_try || !vt->optimizer_commit || !vt->optimizer_undo))
                return pw_error(PW_ERR_INVALID_ARG,
                                "engine: chunk %d%s has no optimizer_try/_commit/_undo: cannot "
                                "post-validate its optimizer step", c, who);
            if (cfg->overlap_steps && cfg->clip_grad_norm > 0 && cfg->post_validate && !vt->zero_grads)
                return pw_error(PW_ERR_INVALID_ARG,
                                "engine: chunk %d%s has no zero_grads: cannot overlap post-validated "
                                "steps (a step started on rolled-back parameters is dropped)", c, who);
        }
    }
    if (cfg->overlap_steps && t)
        return pw_error(PW_ERR_UNSUPPORTED,
                        "engine: overlap_steps runs in one process only (not with a transport yet)");
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

/* Reads every local chunk's port sizes into ports[k*C + c].bytes and checks
 * each link agrees on both ends. A chunk in another process takes its sizes
 * from its local neighbour (the transport checks every message's size). */
static pw_status read_ports(const pw_engine_config *cfg, int NRL, int C, pw_echunk *ports)
{
    const pw_schedule *s = cfg->schedule;
    for (int k = 0; k < NRL; k++) {
        const pw_engine_chunk *chunks = cfg->chunks + (size_t)k * (size_t)C;
        pw_echunk *pk = ports + (size_t)k * (size_t)C;
        for (int c = 0; c < C; c++)
            if (is_local(cfg, pw_sched_rank_of(s, c)))
                for (int p = 0; p < PW_PORT_COUNT; p++) pk[c].bytes[p] = port_bytes(&chunks[c], (pw_port)p);
        for (int c = 0; c < C; c++) {
            if (is_local(cfg, pw_sched_rank_of(s, c))) continue;
            if (c > 0 && is_local(cfg, pw_sched_rank_of(s, c - 1))) {
                pk[c].bytes[PW_PORT_ACT_IN] = pk[c - 1].bytes[PW_PORT_ACT_OUT];
                pk[c].bytes[PW_PORT_GRAD_IN] = pk[c - 1].bytes[PW_PORT_GRAD_OUT];
            }
            if (c + 1 < C && is_local(cfg, pw_sched_rank_of(s, c + 1))) {
                pk[c].bytes[PW_PORT_ACT_OUT] = pk[c + 1].bytes[PW_PORT_ACT_IN];
                pk[c].bytes[PW_PORT_GRAD_OUT] = pk[c + 1].bytes[PW_PORT_GRAD_IN];
            }
        }
        /* The ends of the pipeline have no neighbour: whatever their
         * port_bytes says about those ports is ignored (stage.h asks for 0). */
        pk[0].bytes[PW_PORT_ACT_IN] = pk[0].bytes[PW_PORT_GRAD_IN] = 0;
        pk[C - 1].bytes[PW_PORT_ACT_OUT] = pk[C - 1].bytes[PW_PORT_GRAD_OUT] = 0;
        for (int c = 0; c + 1 < C; c++) {
            const size_t *a = pk[c].bytes, *b = pk[c + 1].bytes;
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
 * buffer is back at the end of each step). Across processes each end has its
 * own pool and holds fewer: its own slots and at most one posted receive. */
static int pool_size(const pw_engine *e, int link)
{
    int n = e->rep->peak_inflight_chunk[link] + e->rep->peak_inflight_chunk[link + 1];
    n = n < e->M ? n : e->M;
    /* Overlapping steps: the two ends of a link are at most one step apart
     * (c cannot finish step n+1 before c+1 has run every backward of it),
     * so at most two steps' buffers are out at once. */
    return e->overlap ? 2 * n : n;
}

static int link_is_local(const pw_engine *e, int link)
{
    return pw_eng_is_local(e, pw_eng_rank_of(e, link)) || pw_eng_is_local(e, pw_eng_rank_of(e, link + 1));
}

/* The position of each chunk's last backward (B, or W when split) in its
 * rank's program: where its gradients become final. */
static void find_last_backwards(pw_engine *e)
{
    const pw_action_kind final = e->split_w ? PW_ACT_W : PW_ACT_B;
    for (int c = 0; c < e->C; c++) e->last_bwd[c] = -1;
    for (int r = 0; r < e->S; r++) {
        const pw_rank_program *p = &e->s->ranks[r];
        for (int i = 0; i < p->n_actions; i++)
            if (p->actions[i].kind == final) e->last_bwd[p->actions[i].chunk] = i;
    }
}

/* ports[k*C + c].bytes: the port sizes read_ports found. */
static pw_status allocate(pw_engine *e, const pw_engine_config *cfg, const pw_echunk *ports)
{
    const int NRL = e->NRL, NW = e->NW, C = e->C, M = e->M, L = C - 1, NB = e->NB, S = e->S;
    const size_t keys = (size_t)NRL * (size_t)C * (size_t)M;
    const size_t n_pools = (size_t)NRL * (size_t)(2 * (L > 0 ? L : 0));

    /* Plan: bookkeeping in one arena, message bytes in another. */
    pw_arena_init(&e->book, "engine bookkeeping");
    pw_arena_init(&e->msgs, "engine message buffers");
    size_t o_workers = pw_arena_plan(&e->book, (size_t)NW * sizeof(pw_worker));
    size_t o_ids = pw_arena_plan(&e->book, (size_t)NW * (size_t)e->V * sizeof(int));
    size_t o_chunks = pw_arena_plan(&e->book, (size_t)NRL * (size_t)C * sizeof(pw_echunk));
    size_t n_slots = 0;
    for (int c = 0; c < C; c++) n_slots += (size_t)e->rep->peak_inflight_chunk[c];
    size_t o_slots = pw_arena_plan(&e->book, (size_t)NRL * n_slots * sizeof(int));
    size_t o_mb = pw_arena_plan(&e->book, keys * sizeof(pw_mbstate));
    size_t o_mail = pw_arena_plan(&e->book, 2 * keys * sizeof(pw_mail));
    size_t o_pools = pw_arena_plan(&e->book, n_pools * sizeof(pw_pool));
    size_t o_last = pw_arena_plan(&e->book, (size_t)C * sizeof(int));
    /* Per worker: pending sends (transport), the job ring and the norms. */
    int max_sends = 0;
    for (int r = 0; r < S; r++) {
        int n = 0;
        for (int i = 0; i < e->s->ranks[r].n_actions; i++) {
            pw_action_kind k = e->s->ranks[r].actions[i].kind;
            n += k == PW_ACT_SEND_F || k == PW_ACT_SEND_B;
        }
        if (n > max_sends) max_sends = n;
    }
    const int jobs_cap = e->V * (NB > 0 ? NB : 0) + 2;
    size_t o_pending = pw_arena_plan(&e->book, e->t ? (size_t)NW * (size_t)max_sends * sizeof(struct pw_pending) : 0);
    size_t o_jobs = pw_arena_plan(&e->book, e->use_comm ? (size_t)NW * (size_t)jobs_cap * sizeof(pw_job) : 0);
    size_t o_norms = pw_arena_plan(&e->book, e->use_comm ? (size_t)NW * (size_t)S * sizeof(double) : 0);
    /* Buckets and their spans, as the stages describe them. */
    size_t n_buckets = e->bucketed ? (size_t)NRL * (size_t)C * (size_t)NB : 0, n_spans = 0;
    int *span_count = NULL;
    if (n_buckets) {
        span_count = calloc(n_buckets, sizeof *span_count);
        if (!span_count) return pw_error(PW_ERR_NOMEM, "engine: out of memory planning buckets");
        for (int k = 0; k < NRL; k++)
            for (int c = 0; c < C; c++) {
                if (!pw_eng_is_local(e, pw_eng_rank_of(e, c))) continue;
                const pw_engine_chunk *ch = &cfg->chunks[(size_t)k * (size_t)C + (size_t)c];
                for (int b = 0; b < NB; b++) {
                    int n = ch->vt->grad_bucket(ch->self, b, NB, NULL, 0);
                    if (n < 0) {
                        free(span_count);
                        return pw_error(PW_ERR_INVALID_ARG, "engine: chunk %d's grad_bucket(%d) returned %d",
                                        c, b, n);
                    }
                    span_count[((size_t)k * (size_t)C + (size_t)c) * (size_t)NB + (size_t)b] = n;
                    n_spans += (size_t)n;
                }
            }
    }
    size_t o_buckets = pw_arena_plan(&e->book, n_buckets * sizeof(pw_bucket));
    size_t o_spans = pw_arena_plan(&e->book, n_spans * sizeof(pw_span));

    size_t n_bufs = 0;
    size_t *o_data = NULL;
    if (n_pools > 0) {
        o_data = calloc(n_pools, sizeof *o_data);
        if (!o_data) {
            free(span_count);
            return pw_error(PW_ERR_NOMEM, "engine: out of memory planning buffers");
        }
    }
    for (size_t i = 0; i < n_pools; i++) {
        const size_t k = i / (size_t)(2 * L), j = i % (size_t)(2 * L);
        const int link = j < (size_t)L ? (int)j : (int)j - L;
        const pw_echunk *pk = ports + k * (size_t)C;
        size_t bytes = j < (size_t)L ? pk[link].bytes[PW_PORT_ACT_OUT] : pk[link].bytes[PW_PORT_GRAD_OUT];
        int n = bytes && link_is_local(e, link) ? pool_size(e, link) : 0;
        n_bufs += (size_t)n;
        /* 64-byte multiples keep every buffer of the pool aligned. */
        size_t stride = (bytes + PW_ARENA_ALIGN - 1) / PW_ARENA_ALIGN * PW_ARENA_ALIGN;
        o_data[i] = pw_arena_plan(&e->msgs, stride * (size_t)n);
        e->msg_bytes += (int64_t)(stride * (size_t)n);
    }
    size_t o_free = pw_arena_plan(&e->book, n_bufs * sizeof(int));
    size_t o_bufs = pw_arena_plan(&e->book, n_bufs * sizeof(pw_msgbuf));

    pw_status st = pw_arena_commit(&e->book);
    e->span_mem = cfg->span_mem;
    if (!cfg->transport) e->link = cfg->link;
    if (st == PW_OK && cfg->msg_alloc && e->msgs.size) {
        e->msg_alloc = cfg->msg_alloc;
        e->msg_free = cfg->msg_free;
        e->msg_arg = cfg->msg_arg;
        void *base = NULL;
        st = cfg->msg_alloc(cfg->msg_arg, e->msgs.size, &base);
        e->msgs.base = st == PW_OK ? base : NULL;
        if (st != PW_OK) e->msg_alloc = NULL;
    } else if (st == PW_OK) {
        st = pw_arena_commit(&e->msgs);
    }
    if (st != PW_OK) {
        free(o_data);
        free(span_count);
        return st;
    }

    /* Point. */
    e->workers = pw_arena_at(&e->book, o_workers);
    e->chunks = pw_arena_at(&e->book, o_chunks);
    e->mb = pw_arena_at(&e->book, o_mb);
    e->mail = pw_arena_at(&e->book, o_mail);
    e->pools = n_pools ? pw_arena_at(&e->book, o_pools) : NULL;
    e->last_bwd = pw_arena_at(&e->book, o_last);
    e->buckets = n_buckets ? pw_arena_at(&e->book, o_buckets) : NULL;
    find_last_backwards(e);
    int *ids = pw_arena_at(&e->book, o_ids);
    for (int i = 0; i < NW; i++) {
        pw_worker *w = &e->workers[i];
        w->e = e;
        w->lrep = e->t ? 0 : i / S;
        w->rank = e->t ? e->t->rank : i % S;
        w->replica = e->t ? e->t->replica : w->lrep;
        w->gid = w->replica * S + w->rank;
        w->n_chunks = e->V;
        w->chunk_ids = ids + (size_t)i * (size_t)e->V;
        for (int l = 0; l < e->V; l++) w->chunk_ids[l] = pw_sched_chunk_at(e->s, w->rank, l);
        if (e->t) {
            w->pending = (struct pw_pending *)pw_arena_at(&e->book, o_pending) + (size_t)i * (size_t)max_sends;
            w->max_pending = max_sends;
        }
        if (e->use_comm) {
            w->jobs = (pw_job *)pw_arena_at(&e->book, o_jobs) + (size_t)i * (size_t)jobs_cap;
            w->jobs_cap = jobs_cap;
            w->norm_vals = (double *)pw_arena_at(&e->book, o_norms) + (size_t)i * (size_t)S;
        }
    }
    int *slots = pw_arena_at(&e->book, o_slots);
    for (int k = 0; k < NRL; k++)
        for (int c = 0; c < C; c++) {
            pw_echunk *ch = pw_eng_chunk(e, k, c);
            memcpy(ch->bytes, ports[(size_t)k * (size_t)C + (size_t)c].bytes, sizeof ch->bytes);
            ch->n_slots = ch->n_free = e->rep->peak_inflight_chunk[c];
            ch->free_slots = slots;
            /* Slots pop from the end: slot 0 first. */
            for (int j = 0; j < ch->n_slots; j++) slots[j] = ch->n_slots - 1 - j;
            slots += ch->n_slots;
        }
    for (size_t k = 0; k < keys; k++) e->mb[k].slot = -1;
    int *free_idx = pw_arena_at(&e->book, o_free);
    pw_msgbuf *bufs = pw_arena_at(&e->book, o_bufs);
    for (size_t i = 0; i < n_pools; i++) {
        const size_t k = i / (size_t)(2 * L), j = i % (size_t)(2 * L);
        pw_pool *p = &e->pools[i];
        int link = j < (size_t)L ? (int)j : (int)j - L;
        const pw_echunk *pk = ports + k * (size_t)C;
        p->link = link;
        p->grad = j >= (size_t)L;
        p->bytes = p->grad ? pk[link].bytes[PW_PORT_GRAD_OUT] : pk[link].bytes[PW_PORT_ACT_OUT];
        p->n = p->top = p->bytes && link_is_local(e, link) ? pool_size(e, link) : 0;
        p->free_idx = free_idx;
        p->bufs = bufs;
        size_t stride = (p->bytes + PW_ARENA_ALIGN - 1) / PW_ARENA_ALIGN * PW_ARENA_ALIGN;
        char *data = pw_arena_at(&e->msgs, o_data[i]);
        for (int b = 0; b < p->n; b++) {
            p->free_idx[b] = p->n - 1 - b;
            p->bufs[b].data = data + (size_t)b * stride;
            p->bufs[b].index = b;
            p->bufs[b].pool = p;
            atomic_init(&p->bufs[b].refs, 0);
        }
        pthread_mutex_init(&p->mu, NULL);
        p->init = 1;
        free_idx += p->n;
        bufs += p->n;
    }
    pw_span *spans = pw_arena_at(&e->book, o_spans);
    for (size_t i = 0; i < n_buckets; i++) {
        const int k = (int)(i / ((size_t)C * (size_t)NB)), c = (int)(i / (size_t)NB % (size_t)C),
                  b = (int)(i % (size_t)NB);
        pw_bucket *bk = &e->buckets[i];
        bk->spans = spans;
        bk->n_spans = span_count[i];
        if (bk->n_spans > 0) {
            const pw_engine_chunk *ch = &cfg->chunks[(size_t)k * (size_t)C + (size_t)c];
            ch->vt->grad_bucket(ch->self, b, NB, spans, bk->n_spans);
            bk->floats = pw_span_total(spans, bk->n_spans);
            if (bk->floats > 0 && e->compress.kind != PW_COMPRESS_NONE) {
                int64_t *rows = calloc((size_t)bk->n_spans, sizeof *rows);
                if (rows && ch->vt->grad_bucket_rows) ch->vt->grad_bucket_rows(ch->self, b, NB, rows, bk->n_spans);
                pw_status zs = rows ? pw_compressor_create(&e->compress, spans, rows, bk->n_spans, &bk->z)
                                    : pw_error(PW_ERR_NOMEM, "out of memory");
                free(rows);
                if (zs != PW_OK) {
                    free(o_data);
                    free(span_count);
                    return pw_error_prefix(zs, "engine: chunk %d, bucket %d: ", c, b);
                }
            }
        }
        spans += bk->n_spans;
    }
    free(o_data);
    free(span_count);
    return PW_OK;
}

/* One shared-memory ring per chunk (its R replicas) and, for clipping, one
 * group per replica (its S ranks). */
static pw_status make_groups(pw_engine *e)
{
    if (e->t || !e->use_comm) return PW_OK;
    if (e->bucketed) {
        e->groups = calloc((size_t)e->C, sizeof *e->groups);
        if (!e->groups) return pw_error(PW_ERR_NOMEM, "engine: out of memory");
        for (int c = 0; c < e->C; c++) {
            PW_CHECK(pw_shm_group_create(e->NR, &e->groups[c]));
            pw_shm_group_set_memory(e->groups[c], e->span_mem);
        }
        if (pw_link_on(&e->link)) {
            e->slow_colls = calloc((size_t)e->C * (size_t)e->NR, sizeof *e->slow_colls);
            if (!e->slow_colls) return pw_error(PW_ERR_NOMEM, "engine: out of memory");
            for (int c = 0; c < e->C; c++)
                for (int r = 0; r < e->NR; r++) {
                    pw_coll m = pw_shm_group_member(e->groups[c], r);
                    PW_CHECK(pw_coll_throttle_create(&m, &e->link, PW_ALLREDUCE_TREE, 1,
                                                     &e->slow_colls[(size_t)c * (size_t)e->NR + (size_t)r]));
                }
        }
    }
    if (e->clip > 0) {
        e->norm_groups = calloc((size_t)e->NRL, sizeof *e->norm_groups);
        if (!e->norm_groups) return pw_error(PW_ERR_NOMEM, "engine: out of memory");
        for (int k = 0; k < e->NRL; k++) PW_CHECK(pw_shm_group_create(e->S, &e->norm_groups[k]));
    }
    return PW_OK;
}

/* ------------------------------------------------------------ pinning */

/* Workers on GPUs (cfg->gpu_pci, one process): each binds to the cores near
 * its rank's GPU, found by bus id in this machine's topology with its I/O
 * devices. 1 when e->place is set that way; 0 to use the CPU rule (with one
 * warning per process when a GPU is not in the topology). */
static int plan_gpu_pinning(pw_engine *e, const pw_engine_config *cfg)
{
    if (pw_topology_load_spec("this", &e->topo) != PW_OK) return 0;
    if (pw_cpu_place_gpus(e->topo, e->NW, cfg->gpu_pci, &e->place) == PW_OK) {
        if (e->place->note[0] && !atomic_flag_test_and_set(&share_notice_done)) PW_WARN("%s", e->place->note);
        if (pw_log_enabled(PW_LOG_INFO, PW_SUB_TOPO))
            for (int i = 0; i < e->NW; i++) {
                char *list = NULL;
                hwloc_bitmap_list_asprintf(&list, e->place->cpusets[i]);
                PW_INFO(PW_SUB_TOPO, "engine worker %d: GPU %s, binds near it to PU %s", i, cfg->gpu_pci[i],
                        list ? list : "?");
                free(list);
            }
        return 1;
    }
    if (!atomic_flag_test_and_set(&gpu_fallback_done))
        PW_WARN("engine: %s; workers bind by the CPU rule instead of near their GPUs", pw_last_error());
    hwloc_topology_destroy(e->topo);
    e->topo = NULL;
    e->place = NULL;
    return 0;
}

static void plan_pinning(pw_engine *e, const pw_engine_config *cfg)
{
    if (!e->t && cfg->gpu_pci && plan_gpu_pinning(e, cfg)) return;
    if (pw_topology_load(&e->topo) != PW_OK) {
        PW_WARN("engine: %s; workers run unpinned", pw_last_error());
        e->topo = NULL;
        return;
    }
    /* With a transport, this process's worker takes its place among the
     * run's processes on this host: host rank l of L is placed as rank l of
     * L threads would be (core l, round-robin when L exceeds the cores), so
     * the processes of one host never pile onto one core. When mpirun
     * (--bind-to core, its default for 2 processes) or taskset has bound the
     * process already, the worker keeps that binding (it inherits the
     * process's). pw_transport_host_place is also the pipeline's rule for
     * binding stage memory. */
    int n = e->NW;
    e->place_first = 0;
    if (e->t && pw_transport_host_place(e->t, e->topo, &e->place_first, &n)) {
        if (pw_log_enabled(PW_LOG_INFO, PW_SUB_TOPO)) {
            hwloc_bitmap_t bound = hwloc_bitmap_alloc();
            char *list = NULL;
            if (bound && hwloc_get_cpubind(e->topo, bound, HWLOC_CPUBIND_PROCESS) == 0)
                hwloc_bitmap_list_asprintf(&list, bound);
            PW_INFO(PW_SUB_TOPO, "MPI rank %d (host rank %d of %d): already bound to PU %s (mpirun or "
                    "taskset); the worker keeps that binding", e->t->world_rank, e->t->local_rank, n,
                    list ? list : "?");
            free(list);
            hwloc_bitmap_free(bound);
        }
        hwloc_topology_destroy(e->topo);
        e->topo = NULL;
        return;
    }
    /* In one process: the stages × replicas placement `--plan` prints
     * (replicas spread over packages, neighbouring stages on neighbouring
     * cores); under a transport, this process's host rank among n. */
    pw_status pst = e->t ? pw_cpu_place_ranks(e->topo, n, &e->place)
                         : pw_cpu_place_pipeline(e->topo, e->S, e->NRL, &e->place);
    if (pst != PW_OK) {
        PW_WARN("engine: placement failed (%s); workers run unpinned", pw_last_error());
        hwloc_topology_destroy(e->topo);
        e->topo = NULL;
        e->place = NULL;
        return;
    }
    /* Under a transport, once per host. */
    if (e->place->note[0] && (!e->t || e->t->local_rank == 0) && !atomic_flag_test_and_set(&share_notice_done))
        PW_WARN("%s", e->place->note);
    if (e->t && pw_log_enabled(PW_LOG_INFO, PW_SUB_TOPO)) {
        char *list = NULL;
        hwloc_bitmap_list_asprintf(&list, e->place->cpusets[e->place_first]);
        PW_INFO(PW_SUB_TOPO, "MPI rank %d (host rank %d of %d): the worker binds to core %d of %d (PU %s)",
                e->t->world_rank, e->t->local_rank, n, e->place->core[e->place_first], e->place->n_cores,
                list ? list : "?");
        free(list);
    }
}

/* ----------------------------------------------------------- lifecycle */

static pw_status start_workers(pw_engine *e)
{
    for (int i = 0; i < e->NW; i++) {
        pw_worker *w = &e->workers[i];
        w->wait_dir = -1;
        pthread_mutex_init(&w->mbox_mu, NULL);
        w->mbox_init = 1;
        w->grad_norm = -1.0;
        for (int l = 0; l < w->n_chunks; l++) w->n_slots += pw_eng_chunk(e, w->lrep, w->chunk_ids[l])->n_slots;
        if (e->check) {
            PW_CHECK(pw_schedule_checker_create(e->s, w->rank, e->rep->peak_inflight[w->rank], &w->checker));
        }
        if (e->t || pw_link_on(&e->link)) {
            /* The poll timer needs microseconds: epoll's own timeout has
             * millisecond steps, a timerfd does not. */
            struct event_config *ec = event_config_new();
            if (ec) {
                event_config_set_flag(ec, EVENT_BASE_FLAG_PRECISE_TIMER);
                w->base = event_base_new_with_config(ec);
                event_config_free(ec);
            }
        } else {
            w->base = event_base_new();
        }
        if (!w->base)
            return pw_error(PW_ERR_INTERNAL, "engine: libevent cannot create an event base for worker %d", i);
        w->wake = event_new(w->base, -1, 0, pw_eng_wake_cb, w);
        w->quit = event_new(w->base, -1, 0, pw_eng_quit_cb, w);
        w->watchdog = event_new(w->base, -1, EV_PERSIST, pw_eng_watchdog_cb, w);
        if (e->t || pw_link_on(&e->link)) w->poll = event_new(w->base, -1, EV_PERSIST, pw_eng_poll_cb, w);
        if (!w->wake || !w->quit || !w->watchdog || ((e->t || pw_link_on(&e->link)) && !w->poll) ||
            event_add(w->watchdog, &e->watchdog_tv) != 0)
            return pw_error(PW_ERR_INTERNAL, "engine: libevent cannot create worker %d's events", i);
        if (e->use_comm) PW_CHECK(pw_eng_comm_start(e, w));
    }
    for (int i = 0; i < e->NW; i++) {
        pw_worker *w = &e->workers[i];
        int rc = pthread_create(&w->thread, NULL, pw_eng_worker_main, w);
        if (rc != 0)
            return pw_error(PW_ERR_NOMEM, "engine: cannot start the worker thread of rank %d: %s", w->rank,
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
    e->S = s->n_ranks;
    e->C = s->n_chunks;
    e->M = s->n_micro;
    e->V = s->chunks_per_rank;
    e->NB = s->n_buckets;
    e->split_w = s->split_w;
    e->NR = cfg->replicas ? cfg->replicas : 1;
    e->t = cfg->transport;
    e->NRL = e->t ? 1 : e->NR;
    e->NW = e->t ? 1 : e->NR * e->S;
    e->clip = cfg->clip_grad_norm;
    e->post_validate = cfg->post_validate && e->clip > 0; /* nothing global to validate otherwise */
    e->overlap = cfg->overlap_steps != 0;
    e->bucketed = e->NR > 1;
    if (cfg->compress && e->bucketed) e->compress = *cfg->compress;
    e->use_comm = e->bucketed || (e->clip > 0 && e->S > 1);
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
    pw_echunk *ports = calloc((size_t)e->NRL * (size_t)e->C, sizeof *ports);
    if (!ports) {
        st = pw_error(PW_ERR_NOMEM, "engine: out of memory");
        goto fail;
    }
    st = read_ports(cfg, e->NRL, e->C, ports);
    if (st == PW_OK) st = allocate(e, cfg, ports);
    free(ports);
    if (st != PW_OK) goto fail;
    for (int k = 0; k < e->NRL; k++)
        for (int c = 0; c < e->C; c++) {
            pw_echunk *ch = pw_eng_chunk(e, k, c);
            ch->rank = pw_sched_rank_of(s, c);
            if (!pw_eng_is_local(e, ch->rank)) continue;
            ch->vt = cfg->chunks[(size_t)k * (size_t)e->C + (size_t)c].vt;
            ch->self = cfg->chunks[(size_t)k * (size_t)e->C + (size_t)c].self;
        }
    PW_CHECK_GOTO(make_groups(e), st, fail);

    if (cfg->pin) plan_pinning(e, cfg);
    if (e->t && e->t->state) e->t->state->act_name = pw_eng_action_name; /* before the workers start */
    PW_CHECK_GOTO(start_workers(e), st, fail);
    PW_INFO(PW_SUB_SCHED, "engine: %d ranks x %d replicas (%d workers here), %d chunks, %d micro-batches, "
            "%d buckets, %lld message bytes%s", e->S, e->NR, e->NW, e->C, e->M, e->NB,
            (long long)e->msg_bytes, e->check ? ", checker on" : "");
    *out = e;
    return PW_OK;
fail:
    pw_engine_destroy(e);
    return st;
}

void pw_eng_free(pw_engine *e)
{
    if (e->workers) {
        for (int i = 0; i < e->NW; i++) {
            pw_worker *w = &e->workers[i];
            if (w->watchdog) event_free(w->watchdog);
            if (w->poll) event_free(w->poll);
            if (w->wake) event_free(w->wake);
            if (w->quit) event_free(w->quit);
            if (w->base) event_base_free(w->base);
            pw_schedule_checker_destroy(w->checker);
            pw_eng_comm_free(w);
            if (w->mbox_init) pthread_mutex_destroy(&w->mbox_mu);
        }
    }
    for (size_t i = 0; e->pools && i < (size_t)e->NRL * (size_t)(2 * (e->C - 1)); i++)
        if (e->pools[i].init) pthread_mutex_destroy(&e->pools[i].mu);
    for (size_t i = 0; e->buckets && i < (size_t)e->NRL * (size_t)e->C * (size_t)e->NB; i++)
        pw_compressor_destroy(e->buckets[i].z);
    for (size_t i = 0; e->slow_colls && i < (size_t)e->C * (size_t)e->NR; i++)
        pw_coll_throttle_destroy(&e->slow_colls[i]);
    free(e->slow_colls);
    for (int c = 0; e->groups && c < e->C; c++) pw_shm_group_destroy(e->groups[c]);
    free(e->groups);
    for (int k = 0; e->norm_groups && k < e->NRL; k++) pw_shm_group_destroy(e->norm_groups[k]);
    free(e->norm_groups);
    pw_cpu_placement_destroy(e->place);
    if (e->topo) hwloc_topology_destroy(e->topo);
    if (e->msg_alloc) {
        if (e->msgs.base && e->msg_free) e->msg_free(e->msg_arg, e->msgs.base);
        e->msgs.base = NULL;
    } else {
        pw_arena_release(&e->msgs);
    }
    pw_arena_release(&e->book);
    if (e->sync_init) {
        pthread_cond_destroy(&e->cv);
        pthread_mutex_destroy(&e->mu);
    }
    free(e);
}

void pw_engine_message_memory(const pw_engine *e, void **base, size_t *bytes)
{
    long pg = sysconf(_SC_PAGESIZE);
    size_t page = pg > 0 ? (size_t)pg : 4096;
    *base = e->msg_alloc ? NULL : e->msgs.base; /* host memory only */
    *bytes = *base && e->msgs.size ? (e->msgs.size + page - 1) / page * page : 0;
}

void pw_engine_destroy(pw_engine *e)
{
    if (!e) return;
    if (!e->workers) {
        pw_eng_free(e);
        return;
    }
    /* Collectives in flight give up once abort is set; the communication
     * threads then leave. */
    atomic_store(&e->abort, 1);
    for (int i = 0; i < e->NW; i++) pw_eng_comm_stop(&e->workers[i]);
    for (int i = 0; i < e->NW; i++)
        if (e->workers[i].started) event_active(e->workers[i].quit, 0, 0);
    /* Mark-then-free: a worker that had not left a failed step when
     * run_step gave up on it is still inside a stage callback and uses this
     * memory. Such workers are detached, and the last owner to let go (one
     * of them, leaving its loop, or this call) frees the engine. */
    int n_orphans = 0;
    pthread_mutex_lock(&e->mu);
    if (e->stragglers) {
        int64_t epoch = atomic_load(&e->epoch);
        for (int i = 0; i < e->NW; i++) {
            pw_worker *w = &e->workers[i];
            if (w->started && w->stopped_epoch != epoch) {
                w->orphan = 1;
                n_orphans++;
            }
        }
        e->orphan_refs = n_orphans + 1;
    }
    pthread_mutex_unlock(&e->mu);
    for (int i = 0; i < e->NW; i++) {
        pw_worker *w = &e->workers[i];
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
    char who[64];
    for (int k = 0; k < e->NRL; k++) {
        const int replica = e->t ? e->t->replica : k;
        for (int c = 0; c < e->C; c++) {
            const pw_echunk *ch = pw_eng_chunk(e, k, c);
            if (!pw_eng_is_local(e, ch->rank) || ch->n_free == ch->n_slots) continue;
            pw_eng_name(e, replica, ch->rank, who, sizeof who);
            for (int m = 0; m < e->M; m++)
                if (pw_eng_mb(e, k, c, m)->slot >= 0)
                    return pw_error(PW_ERR_SCHEDULE,
                                    "engine: step %lld ended with micro-batch %d still in flight on "
                                    "chunk %d (%s): its last backward never ran",
                                    (long long)step, m, c, who);
            return pw_error(PW_ERR_INTERNAL, "engine: chunk %d lost an activation slot in step %lld", c,
                            (long long)step);
        }
        for (int d = 0; d < 2; d++)
            for (int c = 0; c < e->C; c++)
                for (int m = 0; m < e->M; m++) {
                    const pw_mail *mail = pw_eng_mail(e, k, d, c, m);
                    if (!mail->arrived && !mail->posted) continue;
                    int src = d == PW_DIR_F ? c - 1 : c + 1;
                    char from[64];
                    pw_eng_name(e, replica, pw_eng_rank_of(e, src), from, sizeof from);
                    pw_eng_name(e, replica, pw_eng_rank_of(e, c), who, sizeof who);
                    return pw_error(PW_ERR_SCHEDULE,
                                    "engine: step %lld ended with an unreceived message: %s of "
                                    "micro-batch %d from chunk %d (%s) to chunk %d (%s)",
                                    (long long)step, d == PW_DIR_F ? "SEND_F" : "SEND_B", m, src, from, c,
                                    who);
                }
    }
    for (size_t i = 0; e->pools && i < (size_t)e->NRL * (size_t)(2 * (e->C - 1)); i++) {
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

/* One run: steps first .. first+n-1, back to back on each worker (n > 1
 * only with overlap). *n_done: the steps that stand. */
static pw_status run(pw_engine *e, int64_t first, int n, int *n_done)
{
    int64_t step = first;
    *n_done = 0;
    pthread_mutex_lock(&e->mu);
    if (e->failed) {
        pw_status err = e->err;
        char msg[PW_ENGINE_ERRMSG];
        memcpy(msg, e->err_msg, sizeof msg);
        pthread_mutex_unlock(&e->mu);
        return pw_error(err, "engine stopped by an earlier failure (destroy it): %s", msg);
    }
    e->n_stopped = 0;
    e->run_first = first;
    e->run_n = n;
    atomic_store(&e->step, step);
    int64_t epoch = atomic_fetch_add(&e->epoch, 1) + 1;
    pthread_mutex_unlock(&e->mu);

    for (int i = 0; i < e->NW; i++) event_active(e->workers[i].wake, 0, 0);

    pthread_mutex_lock(&e->mu);
    int have_deadline = 0;
    struct timespec deadline;
    while (e->n_stopped < e->NW) {
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
        char note[128] = "";
        if (e->n_stopped < e->NW) {
            e->stragglers = 1;
            for (int i = 0; i < e->NW; i++)
                if (e->workers[i].stopped_epoch != epoch) {
                    char who[64];
                    pw_eng_name(e, e->workers[i].replica, e->workers[i].rank, who, sizeof who);
                    snprintf(note, sizeof note, " (%s did not stop: still inside a stage callback)", who);
                    break;
                }
        }
        st = pw_error(e->err, "%s%s", e->err_msg, note);
    } else if ((st = audit_step(e, first + n - 1)) != PW_OK) {
        e->failed = 1;
        e->err = st;
        snprintf(e->err_msg, sizeof e->err_msg, "%s", pw_last_error());
    }
    /* Every worker saw the same verdicts, so all stand at the same step. A
     * straggler (still inside a callback after a failure) counts none: its
     * figures are its own until it stops. */
    int done = n;
    for (int i = 0; i < e->NW; i++) {
        const int ok = e->workers[i].stopped_epoch == epoch ? e->workers[i].steps_ok : 0;
        if (ok < done) done = ok;
    }
    if (st == PW_OK)
        for (int i = 0; i < e->NW; i++)
            if (e->workers[i].steps_ok != done) {
                e->failed = 1;
                e->err = st = pw_error(PW_ERR_INTERNAL, "engine: the workers disagree on where run %lld..%lld "
                                       "stands (%d and %d steps)", (long long)first,
                                       (long long)(first + n - 1), done, e->workers[i].steps_ok);
                snprintf(e->err_msg, sizeof e->err_msg, "%s", pw_last_error());
                break;
            }
    *n_done = done;
    pthread_mutex_unlock(&e->mu);
    return st;
}

pw_status pw_engine_run_step(pw_engine *e, int64_t step)
{
    if (!e) return pw_error(PW_ERR_INVALID_ARG, "pw_engine_run_step: engine is NULL");
    if (step < 1) return pw_error(PW_ERR_INVALID_ARG, "pw_engine_run_step: step %lld (steps count from 1)", (long long)step);
    int done;
    return run(e, step, 1, &done);
}

pw_status pw_engine_run_steps(pw_engine *e, int64_t first, int n, int *n_done)
{
    int dummy;
    if (!n_done) n_done = &dummy;
    *n_done = 0;
    if (!e) return pw_error(PW_ERR_INVALID_ARG, "pw_engine_run_steps: engine is NULL");
    if (first < 1 || n < 1)
        return pw_error(PW_ERR_INVALID_ARG, "pw_engine_run_steps: steps %lld..%lld (steps count from 1, n >= 1)",
                        (long long)first, (long long)first + n - 1);
    if (e->overlap) return run(e, first, n, n_done);
    for (int i = 0; i < n; i++) {
        int done;
        PW_CHECK(run(e, first + i, 1, &done));
        (*n_done)++;
    }
    return PW_OK;
}

/* -------------------------------------------------------------- figures */

void pw_engine_rank_stats_get(const pw_engine *e, int rank, pw_engine_rank_stats *out)
{
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!e) return;
    const pw_worker *w = NULL;
    for (int i = 0; i < e->NW; i++)
        if (e->workers[i].gid == rank) w = &e->workers[i];
    if (!w) return;
    pw_engine *m = (pw_engine *)e; /* the mutex orders us after the step's writes */
    pthread_mutex_lock(&m->mu);
    out->slots = w->n_slots;
    out->peak_slots_used = w->peak;
    out->busy_s = (double)w->busy_ns / 1e9;
    out->wait_s = (double)w->wait_ns / 1e9;
    out->total_s = (double)w->total_ns / 1e9;
    out->actions = w->actions;
    out->allreduce_s = (double)w->coll_ns / 1e9;
    out->allreduce_wait_s = (double)w->coll_wait_ns / 1e9;
    out->rollbacks = w->rollbacks;
    out->allreduce_bytes = w->coll_bytes;
    out->allreduce_wire_bytes = w->coll_wire_bytes;
    pthread_mutex_unlock(&m->mu);
}

int pw_engine_chunk_peak(const pw_engine *e, int chunk)
{
    if (!e || chunk < 0 || chunk >= e->C) return -1;
    pw_engine *m = (pw_engine *)e;
    pthread_mutex_lock(&m->mu);
    int p = m->chunks[chunk].peak;
    pthread_mutex_unlock(&m->mu);
    return p;
}

pw_compressor *pw_engine_compressor(pw_engine *e, int k, int chunk, int bucket)
{
    if (!e || !e->buckets || k < 0 || k >= e->NRL || chunk < 0 || chunk >= e->C || bucket < 0 || bucket >= e->NB)
        return NULL;
    return e->buckets[((size_t)k * (size_t)e->C + (size_t)chunk) * (size_t)e->NB + (size_t)bucket].z;
}

double pw_engine_grad_norm(const pw_engine *e)
{
    if (!e || e->clip <= 0) return -1.0;
    pw_engine *m = (pw_engine *)e;
    pthread_mutex_lock(&m->mu);
    double n = -1.0;
    for (int i = 0; i < e->NW; i++)
        if (e->workers[i].lrep == 0) {
            n = e->workers[i].grad_norm;
            break;
        }
    pthread_mutex_unlock(&m->mu);
    return n;
}

int64_t pw_engine_message_bytes(const pw_engine *e) { return e ? e->msg_bytes : 0; }
