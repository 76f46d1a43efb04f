/* pipewright — schedule validator: the per-rank invariant checker and the
 * symbolic replay of all ranks together.
 *
 * The checker (pw_schedule_checker) knows one rank: it holds, for each of the
 * rank's (chunk, mb), which of F, B, W, RECV_F, RECV_B, SEND_F, SEND_B have
 * run, and enforces the local rules (F before B before W, inputs received
 * before use, in-flight bound). The engine runs it behind PW_DEBUG_CHECK=1.
 *
 * The replay runs one checker per rank as a concurrent program: a rank runs
 * until its next action is a receive whose message has not been sent, then
 * parks; a send wakes the one rank that can be parked on it. Every action is
 * therefore visited once — O(total actions + n_chunks × n_micro) — and when
 * the work list empties with ranks still parked, those ranks are deadlocked
 * and the waits-for chain between them is the cycle we report. A rank's
 * final OPTIM runs after all that, once every send is known to be matched.
 */
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "scheduler/schedule-internal.h"
#include "scheduler/schedule.h"

/* What has happened to one (chunk, mb) on its rank. */
enum {
    ST_F = 1 << 0,
    ST_B = 1 << 1,
    ST_W = 1 << 2,
    ST_RF = 1 << 3,
    ST_RB = 1 << 4,
    ST_SF = 1 << 5,
    ST_SB = 1 << 6,
};

struct pw_schedule_checker {
    const pw_schedule *s;
    int rank;
    int bound;              /* in-flight limit; 0: unchecked */
    int64_t pos;            /* actions fed this step */
    int optim_done;
    int inflight, peak_inflight;    /* F done, last backward not yet */
    int w_pending, peak_w_pending;  /* B done, W not yet (split only) */
    int64_t n_sends, n_recvs;
    int *chunk_inflight;    /* [v] */
    int *chunk_peak;        /* [v] */
    int *final_done;        /* [v] micro-batches whose last backward ran */
    uint8_t *state;         /* [v][n_micro] ST_* bits */
    uint8_t *ar_done;       /* [v][n_buckets] */
};

/* ------------------------------------------------------------- checker */

static size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

static size_t checker_mem_size(const pw_schedule *s)
{
    size_t v = (size_t)s->chunks_per_rank;
    return align16(3 * v * sizeof(int)) + align16(v * (size_t)s->n_micro) +
           align16(v * (size_t)s->n_buckets);
}

static void checker_reset(pw_schedule_checker *c)
{
    size_t v = (size_t)c->s->chunks_per_rank;
    c->pos = 0;
    c->optim_done = 0;
    c->inflight = c->w_pending = 0;
    c->n_sends = c->n_recvs = 0;
    memset(c->chunk_inflight, 0, v * sizeof(int));
    memset(c->final_done, 0, v * sizeof(int));
    memset(c->state, 0, v * (size_t)c->s->n_micro);
    memset(c->ar_done, 0, v * (size_t)c->s->n_buckets);
}

/* Lays the checker's arrays out in `mem` (checker_mem_size bytes). */
static void checker_init(pw_schedule_checker *c, const pw_schedule *s, int rank, int bound,
                         void *mem)
{
    size_t v = (size_t)s->chunks_per_rank;
    char *p = mem;
    memset(c, 0, sizeof *c);
    c->s = s;
    c->rank = rank;
    c->bound = bound;
    c->chunk_inflight = (int *)p;
    c->chunk_peak = c->chunk_inflight + v;
    c->final_done = c->chunk_peak + v;
    p += align16(3 * v * sizeof(int));
    c->state = (uint8_t *)p;
    p += align16(v * (size_t)s->n_micro);
    c->ar_done = (uint8_t *)p;
    memset(c->chunk_peak, 0, v * sizeof(int));
    checker_reset(c);
}

static pw_status fail(const pw_schedule_checker *c, const pw_action *a, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static pw_status fail(const pw_schedule_checker *c, const pw_action *a, const char *fmt, ...)
{
    char desc[128], why[512];
    va_list ap;
    pw_sched_describe(c->s, c->rank, a, desc, sizeof desc);
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    return pw_error(PW_ERR_SCHEDULE, "rank %d, position %lld (%s): %s", c->rank,
                    (long long)c->pos, desc, why);
}

/* "mb 3", or "chunk 5 mb 3" when the rank holds several chunks. */
static const char *what(const pw_schedule *s, int chunk, int mb, char *buf, size_t n)
{
    if (s->chunks_per_rank == 1) snprintf(buf, n, "mb %d", mb);
    else snprintf(buf, n, "chunk %d mb %d", chunk, mb);
    return buf;
}

static inline int remote(const pw_schedule *s, int c, int dir)
{
    int n = c + dir;
    return n >= 0 && n < s->n_chunks && pw_sched_rank_of(s, n) != pw_sched_rank_of(s, c);
}

static inline uint8_t *state_of(pw_schedule_checker *c, int chunk, int mb)
{
    return &c->state[(size_t)pw_sched_local(c->s, chunk) * (size_t)c->s->n_micro + (size_t)mb];
}

/* The last backward of a micro-batch (B, or W when split) frees its stash. */
static void release(pw_schedule_checker *c, int lc)
{
    c->inflight--;
    c->chunk_inflight[lc]--;
    c->final_done[lc]++;
}

pw_status pw_schedule_checker_step(pw_schedule_checker *c, const pw_action *a)
{
    const pw_schedule *s = c->s;
    const int C = s->n_chunks, M = s->n_micro;
    char why[200], w[48];
    if (!pw_sched_action_valid(s, c->rank, a) && pw_sched_action_ok(s, c->rank, a, why, sizeof why) != 0)
        return fail(c, a, "%s", why);
    if (c->optim_done) {
        if (a->kind == PW_ACT_OPTIM) return fail(c, a, "second OPTIM (once per rank)");
        return fail(c, a, "action after OPTIM (OPTIM must be the rank's last action)");
    }
    const int ch = a->chunk, mb = a->mb;
    const int lc = ch >= 0 ? pw_sched_local(s, ch) : -1;
    uint8_t *st = a->kind == PW_ACT_OPTIM || a->kind == PW_ACT_ALLREDUCE ? NULL
                                                                        : state_of(c, ch, mb);
    switch (a->kind) {
    case PW_ACT_F:
        if (*st & ST_F) return fail(c, a, "duplicate F: %s already ran its F", what(s, ch, mb, w, sizeof w));
        if (ch > 0) {
            if (!remote(s, ch, -1)) {
                if (!(*state_of(c, ch - 1, mb) & ST_F))
                    return fail(c, a, "F needs the output of chunk %d, whose F for mb %d has not run yet",
                                ch - 1, mb);
            } else if (!(*st & ST_RF)) {
                return fail(c, a,
                            "missing receive: F needs its input from rank %d, but no RECV_F %s comes before it",
                            pw_sched_rank_of(s, ch - 1), what(s, ch, mb, w, sizeof w));
            }
        }
        *st |= ST_F;
        c->inflight++;
        c->chunk_inflight[lc]++;
        if (c->inflight > c->peak_inflight) c->peak_inflight = c->inflight;
        if (c->chunk_inflight[lc] > c->chunk_peak[lc]) c->chunk_peak[lc] = c->chunk_inflight[lc];
        if (c->bound > 0 && c->inflight > c->bound)
            return fail(c, a, "%d micro-batches in flight, above the bound of %d", c->inflight,
                        c->bound);
        break;
    case PW_ACT_B:
        if (*st & ST_B) return fail(c, a, "duplicate B: %s already ran its B", what(s, ch, mb, w, sizeof w));
        if (!(*st & ST_F)) return fail(c, a, "B before its F (F %s has not run)", what(s, ch, mb, w, sizeof w));
        if (ch < C - 1) {
            if (!remote(s, ch, +1)) {
                if (!(*state_of(c, ch + 1, mb) & ST_B))
                    return fail(c, a, "B needs the gradient of chunk %d, whose B for mb %d has not run yet",
                                ch + 1, mb);
            } else if (!(*st & ST_RB)) {
                return fail(c, a,
                            "missing receive: B needs the output gradient from rank %d, but no RECV_B %s comes before it",
                            pw_sched_rank_of(s, ch + 1), what(s, ch, mb, w, sizeof w));
            }
        }
        *st |= ST_B;
        if (s->split_w) {
            if (++c->w_pending > c->peak_w_pending) c->peak_w_pending = c->w_pending;
        } else {
            release(c, lc);
        }
        break;
    case PW_ACT_W:
        if (!s->split_w) return fail(c, a, "W in a schedule that does not split W (split_w=0)");
        if (*st & ST_W) return fail(c, a, "duplicate W: %s already ran its W", what(s, ch, mb, w, sizeof w));
        if (!(*st & ST_B)) return fail(c, a, "W before its B (B %s has not run)", what(s, ch, mb, w, sizeof w));
        *st |= ST_W;
        c->w_pending--;
        release(c, lc);
        break;
    case PW_ACT_SEND_F:
        if (ch == C - 1) return fail(c, a, "SEND_F from the last stage: its output has no consumer");
        if (!remote(s, ch, +1))
            return fail(c, a, "chunk %d runs on this rank too: the hand-over is local, not a message", ch + 1);
        if (*st & ST_SF) return fail(c, a, "duplicate SEND_F");
        if (!(*st & ST_F)) return fail(c, a, "SEND_F before the F that produces it");
        *st |= ST_SF;
        c->n_sends++;
        break;
    case PW_ACT_RECV_F:
        if (ch == 0) return fail(c, a, "RECV_F into chunk 0: the first stage has no producer");
        if (!remote(s, ch, -1))
            return fail(c, a, "chunk %d runs on this rank too: the hand-over is local, not a message", ch - 1);
        if (*st & ST_RF) return fail(c, a, "duplicate RECV_F");
        *st |= ST_RF;
        c->n_recvs++;
        break;
    case PW_ACT_SEND_B:
        if (ch == 0) return fail(c, a, "SEND_B from chunk 0: the first stage's input gradient has no consumer");
        if (!remote(s, ch, -1))
            return fail(c, a, "chunk %d runs on this rank too: the hand-over is local, not a message", ch - 1);
        if (*st & ST_SB) return fail(c, a, "duplicate SEND_B");
        if (!(*st & ST_B)) return fail(c, a, "SEND_B before the B that produces it");
        *st |= ST_SB;
        c->n_sends++;
        break;
    case PW_ACT_RECV_B:
        if (ch == C - 1) return fail(c, a, "RECV_B into the last stage: it has no downstream gradient");
        if (!remote(s, ch, +1))
            return fail(c, a, "chunk %d runs on this rank too: the hand-over is local, not a message", ch + 1);
        if (*st & ST_RB) return fail(c, a, "duplicate RECV_B");
        *st |= ST_RB;
        c->n_recvs++;
        break;
    case PW_ACT_ALLREDUCE: {
        uint8_t *ar = &c->ar_done[(size_t)lc * (size_t)s->n_buckets + (size_t)mb];
        if (*ar) return fail(c, a, "duplicate ALLREDUCE of bucket %d", mb);
        if (c->final_done[lc] < M)
            return fail(c, a, "ALLREDUCE before the chunk's last backward (%d of %d micro-batches done)",
                        c->final_done[lc], M);
        *ar = 1;
        break;
    }
    case PW_ACT_OPTIM:
        for (int l = 0; l < s->chunks_per_rank; l++) {
            int chunk = pw_sched_chunk_at(s, c->rank, l);
            if (c->final_done[l] < M)
                return fail(c, a, "OPTIM before the last backward of chunk %d (%d of %d micro-batches done)",
                            chunk, c->final_done[l], M);
            for (int b = 0; b < s->n_buckets; b++)
                if (!c->ar_done[(size_t)l * (size_t)s->n_buckets + (size_t)b])
                    return fail(c, a, "OPTIM before ALLREDUCE of bucket %d of chunk %d", b, chunk);
        }
        c->optim_done = 1;
        break;
    default:
        return fail(c, a, "unknown action kind %d", (int)a->kind); /* action_ok caught it */
    }
    c->pos++;
    return PW_OK;
}

static pw_status finish_check(pw_schedule_checker *c)
{
    const pw_schedule *s = c->s;
    const int M = s->n_micro, R = c->rank;
    char w[48];
    static const struct { uint8_t bit; const char *name; } need[] = {
        {ST_F, "F"}, {ST_B, "B"}, {ST_W, "W"},
    };
    if (!c->optim_done) {
        for (int l = 0; l < s->chunks_per_rank; l++) {
            int ch = pw_sched_chunk_at(s, R, l);
            for (int m = 0; m < M; m++) {
                uint8_t st = c->state[(size_t)l * (size_t)M + (size_t)m];
                for (int k = 0; k < 2 + s->split_w; k++)
                    if (!(st & need[k].bit))
                        return pw_error(PW_ERR_SCHEDULE, "rank %d, at the end: %s never runs %s", R,
                                        what(s, ch, m, w, sizeof w), need[k].name);
            }
            for (int b = 0; b < s->n_buckets; b++)
                if (!c->ar_done[(size_t)l * (size_t)s->n_buckets + (size_t)b])
                    return pw_error(PW_ERR_SCHEDULE,
                                    "rank %d, at the end: bucket %d of chunk %d is never all-reduced",
                                    R, b, ch);
        }
        return pw_error(PW_ERR_SCHEDULE, "rank %d, at the end: no OPTIM (every rank ends with one)", R);
    }
    for (int l = 0; l < s->chunks_per_rank; l++) {
        int ch = pw_sched_chunk_at(s, R, l);
        for (int m = 0; m < M; m++) {
            uint8_t st = c->state[(size_t)l * (size_t)M + (size_t)m];
            if (remote(s, ch, +1) && !(st & ST_SF))
                return pw_error(PW_ERR_SCHEDULE,
                                "rank %d, at the end: the F output of %s is never sent to rank %d (no SEND_F)",
                                R, what(s, ch, m, w, sizeof w), pw_sched_rank_of(s, ch + 1));
            if (remote(s, ch, -1) && !(st & ST_SB))
                return pw_error(PW_ERR_SCHEDULE,
                                "rank %d, at the end: the B gradient of %s is never sent to rank %d (no SEND_B)",
                                R, what(s, ch, m, w, sizeof w), pw_sched_rank_of(s, ch - 1));
        }
    }
    return PW_OK;
}

pw_status pw_schedule_checker_finish(pw_schedule_checker *c)
{
    if (!c) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_checker_finish: checker is NULL");
    pw_status st = finish_check(c);
    checker_reset(c);
    return st;
}

pw_status pw_schedule_checker_create(const pw_schedule *s, int rank, int inflight_bound,
                                     pw_schedule_checker **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_checker_create: out is NULL");
    *out = NULL;
    if (!s) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_checker_create: schedule is NULL");
    PW_CHECK(pw_sched_check_shape(s));
    if (rank < 0 || rank >= s->n_ranks)
        return pw_error(PW_ERR_INVALID_ARG, "schedule checker: rank %d out of range (0..%d)", rank,
                        s->n_ranks - 1);
    if (inflight_bound < 0)
        return pw_error(PW_ERR_INVALID_ARG, "schedule checker: negative in-flight bound %d",
                        inflight_bound);
    size_t head = align16(sizeof(pw_schedule_checker));
    pw_schedule_checker *c = malloc(head + checker_mem_size(s));
    if (!c) return pw_error(PW_ERR_NOMEM, "schedule checker: out of memory");
    checker_init(c, s, rank, inflight_bound, (char *)c + head);
    *out = c;
    return PW_OK;
}

void pw_schedule_checker_destroy(pw_schedule_checker *c) { free(c); }

/* --------------------------------------------------------------- replay */

enum { RANK_READY = 0, RANK_BLOCKED, RANK_DONE };

typedef struct replay {
    const pw_schedule *s;
    pw_schedule_checker *ck;  /* [n_ranks] */
    int *pc;                  /* [n_ranks] next action */
    uint8_t *status;          /* [n_ranks] RANK_* */
    pw_action *wait;          /* [n_ranks] the receive a blocked rank waits on
                               * (a copy: wake() stays in this small array) */
    uint32_t *time;           /* [n_ranks] unit-cost clock */
    int *stack;               /* [n_ranks] ranks ready to run */
    int *chain;               /* [n_ranks] deadlock analysis */
    int64_t *offset;          /* [n_ranks] first action's index in `start` */
    uint32_t *sf_time;        /* [n_chunks][n_micro] when SEND_F ran */
    uint32_t *sb_time;        /* [n_chunks][n_micro] when SEND_B ran */
} replay;

/* The sender rank and chunk of a receive, or -1 when the receive is malformed
 * (the checker then says why). */
static int sender_chunk(const pw_schedule *s, int rank, const pw_action *a)
{
    if (!pw_sched_action_valid(s, rank, a)) return -1;
    int dir = a->kind == PW_ACT_RECV_F ? -1 : +1;
    if (!remote(s, a->chunk, dir)) return -1;
    return a->chunk + dir;
}

/* 1 with *t set when the message a receive waits for has been sent, 0 when
 * not yet, -1 when the receive is malformed. */
static int message_ready(replay *rp, int rank, const pw_action *a, uint32_t *t)
{
    const pw_schedule *s = rp->s;
    int sc = sender_chunk(s, rank, a);
    if (sc < 0) return -1;
    pw_schedule_checker *snd = &rp->ck[pw_sched_rank_of(s, sc)];
    size_t key = (size_t)sc * (size_t)s->n_micro + (size_t)a->mb;
    uint8_t bit = a->kind == PW_ACT_RECV_F ? ST_SF : ST_SB;
    if (!(*state_of(snd, sc, a->mb) & bit)) return 0;
    *t = a->kind == PW_ACT_RECV_F ? rp->sf_time[key] : rp->sb_time[key];
    return 1;
}

/* A send to (kind, chunk, mb) on `dst`: wake dst if it is parked on exactly
 * that receive. */
static void wake(replay *rp, int *sp, int dst, pw_action_kind kind, int chunk, int mb)
{
    if (rp->status[dst] != RANK_BLOCKED) return;
    const pw_action *w = &rp->wait[dst];
    if (w->kind == kind && w->chunk == chunk && w->mb == mb) {
        rp->status[dst] = RANK_READY;
        rp->stack[(*sp)++] = dst;
        /* dst runs soon, from a part of the action array nobody touched
         * lately: start fetching it now (this halves the replay at scale). */
        const pw_action *next = &rp->s->ranks[dst].actions[rp->pc[dst]];
        __builtin_prefetch(next);
        __builtin_prefetch(next + 5);
    }
}

/* Builds the deadlock message: follow "waits for" from the first parked rank
 * until it reaches a rank that finished (reached its final OPTIM or its end:
 * an unmatched receive) or repeats (a cycle, which is what we print). */
static pw_status report_deadlock(replay *rp)
{
    const pw_schedule *s = rp->s;
    int n_blocked = 0, first = -1;
    for (int r = 0; r < s->n_ranks; r++) {
        rp->chain[r] = -1;
        if (rp->status[r] == RANK_BLOCKED) {
            n_blocked++;
            if (first < 0) first = r;
        }
    }
    PW_ASSERT(first >= 0);
    int len = 0, cur = first, *order = rp->stack; /* the work list is empty now */
    char desc[128];
    for (;;) {
        rp->chain[cur] = len;
        order[len++] = cur;
        const pw_action *a = &s->ranks[cur].actions[rp->pc[cur]];
        int peer = pw_sched_rank_of(s, sender_chunk(s, cur, a));
        if (rp->status[peer] == RANK_DONE) {
            pw_sched_describe(s, cur, a, desc, sizeof desc);
            return pw_error(PW_ERR_SCHEDULE,
                            "rank %d, position %d (%s): unmatched receive: rank %d finished without sending it",
                            cur, rp->pc[cur], desc, peer);
        }
        if (rp->chain[peer] >= 0) {
            /* The cycle is order[chain[peer] .. len-1]. */
            char msg[1800];
            size_t used = (size_t)snprintf(msg, sizeof msg, "deadlock:");
            int from = rp->chain[peer], shown = 0;
            for (int i = from; i < len; i++) {
                int r = order[i];
                const pw_action *ra = &s->ranks[r].actions[rp->pc[r]];
                char item[200];
                pw_sched_describe(s, r, ra, desc, sizeof desc);
                int k = snprintf(item, sizeof item, "%s rank %d at position %d (%s) waits",
                                 i == from ? "" : ";", r, rp->pc[r], desc);
                if (used + (size_t)k + 48 >= sizeof msg) break;
                memcpy(msg + used, item, (size_t)k + 1);
                used += (size_t)k;
                shown++;
            }
            if (shown < len - from)
                used += (size_t)snprintf(msg + used, sizeof msg - used, "; ... %d more in the cycle",
                                         len - from - shown);
            if (n_blocked > len - from)
                snprintf(msg + used, sizeof msg - used, " (%d ranks blocked in all)", n_blocked);
            return pw_error(PW_ERR_SCHEDULE, "%s", msg);
        }
        cur = peer;
    }
}

/* Every send must have been received: a receive can only complete once its
 * send ran, so fewer receives than sends means some send is left over. */
static pw_status report_unmatched_send(replay *rp)
{
    const pw_schedule *s = rp->s;
    for (int r = 0; r < s->n_ranks; r++) {
        const pw_rank_program *p = &s->ranks[r];
        for (int i = 0; i < p->n_actions; i++) {
            const pw_action *a = &p->actions[i];
            if (a->kind != PW_ACT_SEND_F && a->kind != PW_ACT_SEND_B) continue;
            int dc = a->chunk + (a->kind == PW_ACT_SEND_F ? 1 : -1);
            int dr = pw_sched_rank_of(s, dc);
            uint8_t bit = a->kind == PW_ACT_SEND_F ? ST_RF : ST_RB;
            if (*state_of(&rp->ck[dr], dc, a->mb) & bit) continue;
            char desc[128], w[48];
            pw_sched_describe(s, r, a, desc, sizeof desc);
            return pw_error(PW_ERR_SCHEDULE,
                            "rank %d, position %d (%s): unmatched send: rank %d never receives it (no %s %s)",
                            r, i, desc, dr, a->kind == PW_ACT_SEND_F ? "RECV_F" : "RECV_B",
                            what(s, dc, a->mb, w, sizeof w));
        }
    }
    return pw_error(PW_ERR_INTERNAL, "validator: send and receive counts differ but every send matched");
}

static pw_status run(replay *rp, uint32_t *start, int64_t *busy_out)
{
    const pw_schedule *s = rp->s;
    const int n = s->n_ranks;
    const size_t M = (size_t)s->n_micro;
    int sp = 0, done = 0;
    int64_t busy = 0;
    for (int r = n - 1; r >= 0; r--) rp->stack[sp++] = r; /* rank 0 runs first */
    while (sp > 0) {
        int r = rp->stack[--sp];
        pw_schedule_checker *ck = &rp->ck[r];
        const pw_rank_program *prog = &s->ranks[r];
        int i = rp->pc[r];
        uint32_t t = rp->time[r];
        for (; i < prog->n_actions; i++) {
            const pw_action *a = &prog->actions[i];
            uint32_t msg_t = 0;
            /* A final OPTIM is the step's barrier: it runs after the replay,
             * once every send has been matched (see pw_sched_replay). */
            if (a->kind == PW_ACT_OPTIM && i == prog->n_actions - 1) break;
            if ((a->kind == PW_ACT_RECV_F || a->kind == PW_ACT_RECV_B) &&
                message_ready(rp, r, a, &msg_t) == 0)
                break; /* park: the matching send wakes us */
            PW_CHECK(pw_schedule_checker_step(ck, a));
            if (a->kind == PW_ACT_RECV_F || a->kind == PW_ACT_RECV_B) {
                if (msg_t > t) t = msg_t;
            }
            if (start) start[rp->offset[r] + i] = t;
            switch (a->kind) {
            case PW_ACT_F:
            case PW_ACT_B:
            case PW_ACT_W:
                t++;
                busy++;
                break;
            case PW_ACT_SEND_F:
                rp->sf_time[(size_t)a->chunk * M + (size_t)a->mb] = t;
                wake(rp, &sp, pw_sched_rank_of(s, a->chunk + 1), PW_ACT_RECV_F, a->chunk + 1, a->mb);
                break;
            case PW_ACT_SEND_B:
                rp->sb_time[(size_t)a->chunk * M + (size_t)a->mb] = t;
                wake(rp, &sp, pw_sched_rank_of(s, a->chunk - 1), PW_ACT_RECV_B, a->chunk - 1, a->mb);
                break;
            default:
                break;
            }
        }
        rp->pc[r] = i;
        rp->time[r] = t;
        if (i == prog->n_actions ||
            (i == prog->n_actions - 1 && prog->actions[i].kind == PW_ACT_OPTIM)) {
            rp->status[r] = RANK_DONE;
            done++;
        } else {
            rp->status[r] = RANK_BLOCKED;
            rp->wait[r] = prog->actions[i];
        }
    }
    if (done < n) return report_deadlock(rp);
    *busy_out = busy;
    return PW_OK;
}

/* ------------------------------------------------------ incomplete shapes
 *
 * The replay keeps dense state per (chunk, micro-batch) and per (chunk,
 * bucket): about 9 bytes per chunk and micro-batch in all. A schedule that
 * can validate has at least one F per (chunk, micro-batch) and one ALLREDUCE
 * per (chunk, bucket), so for it that state is O(actions). A shape far larger
 * than its actions (an 11-byte CSV naming micro-batch 1218364 of chunk 726
 * asked for 8 GB) cannot validate: it is reported from its actions alone,
 * naming the first missing F or ALLREDUCE of the first rank that lacks one,
 * as the end-of-replay check would. Below DENSE_SLACK state entries the
 * replay runs anyway, so small unfinished schedules get the replay's own
 * first error (an order mistake before the missing action). */
#define DENSE_SLACK 65536

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* Called when the shape's (chunk, micro-batch) and (chunk, bucket) pairs
 * outnumber the actions, so some rank lacks an F or an ALLREDUCE. Memory:
 * one key per action of that rank. */
static pw_status report_incomplete(const pw_schedule *s)
{
    const int v = s->chunks_per_rank, M = s->n_micro, NB = s->n_buckets;
    for (int r = 0; r < s->n_ranks; r++) {
        const pw_rank_program *p = &s->ranks[r];
        for (int pass = 0; pass < 2; pass++) {
            const pw_action_kind kind = pass == 0 ? PW_ACT_F : PW_ACT_ALLREDUCE;
            const int per = pass == 0 ? M : NB;
            int64_t have = 0;
            for (int i = 0; i < p->n_actions; i++)
                have += p->actions[i].kind == kind && pw_sched_action_valid(s, r, &p->actions[i]);
            if (have >= (int64_t)v * per) continue;
            int64_t *key = malloc((size_t)(have ? have : 1) * sizeof *key), n = 0;
            if (!key) return pw_error(PW_ERR_NOMEM, "validator: cannot allocate %lld keys", (long long)have);
            for (int i = 0; i < p->n_actions; i++) {
                const pw_action *a = &p->actions[i];
                if (a->kind == kind && pw_sched_action_valid(s, r, a))
                    key[n++] = (int64_t)pw_sched_local(s, a->chunk) * per + a->mb;
            }
            qsort(key, (size_t)n, sizeof *key, cmp_i64);
            int64_t miss = 0; /* the first key of 0, 1, ... not in the sorted list */
            for (int64_t i = 0; i < n && key[i] <= miss; i++)
                if (key[i] == miss) miss++;
            free(key);
            const int ch = pw_sched_chunk_at(s, r, (int)(miss / per)), k = (int)(miss % per);
            char w[48];
            if (kind == PW_ACT_F)
                return pw_error(PW_ERR_SCHEDULE, "rank %d, at the end: %s never runs F (the rank has "
                                "%lld F actions for its %d chunk%s x %d micro-batches)", r,
                                what(s, ch, k, w, sizeof w), (long long)have, v, v == 1 ? "" : "s", M);
            return pw_error(PW_ERR_SCHEDULE, "rank %d, at the end: bucket %d of chunk %d is never "
                            "all-reduced (the rank has %lld ALLREDUCE actions for %d chunk%s x %d "
                            "buckets)", r, k, ch, (long long)have, v, v == 1 ? "" : "s", NB);
        }
    }
    return pw_error(PW_ERR_INTERNAL, "validator: the shape outnumbers the actions, yet no rank "
                    "lacks an F or an ALLREDUCE");
}

pw_status pw_sched_replay(const pw_schedule *s, pw_schedule_report *rep, uint32_t *start)
{
    PW_CHECK(pw_sched_check_shape(s));
    const int n = s->n_ranks;
    int64_t total = 0;
    for (int r = 0; r < n; r++) {
        if (s->ranks[r].n_actions < 0 || (s->ranks[r].n_actions > 0 && !s->ranks[r].actions))
            return pw_error(PW_ERR_INVALID_ARG, "schedule: rank %d has a bad action list", r);
        total += s->ranks[r].n_actions;
    }
    /* Unit-cost clocks never exceed the number of actions. */
    if (total >= (int64_t)UINT32_MAX)
        return pw_error(PW_ERR_UNSUPPORTED, "validator: %lld actions exceed the replay's clock",
                        (long long)total);

    /* Size the state by the actions (see report_incomplete). */
    const uint64_t pairs = (uint64_t)s->n_chunks * ((uint64_t)s->n_micro + (uint64_t)s->n_buckets);
    if (pairs > (uint64_t)total + DENSE_SLACK) return report_incomplete(s);

    /* Plan every array, then one allocation. */
    size_t keys = (size_t)s->n_chunks * (size_t)s->n_micro, cmem = checker_mem_size(s), size = 0;
    size_t o_ck = size;     size += align16((size_t)n * sizeof(pw_schedule_checker));
    size_t o_cmem = size;   size += (size_t)n * cmem;
    size_t o_off = size;    size += align16((size_t)n * sizeof(int64_t));
    size_t o_pc = size;     size += align16((size_t)n * sizeof(int));
    size_t o_stack = size;  size += align16((size_t)n * sizeof(int));
    size_t o_chain = size;  size += align16((size_t)n * sizeof(int));
    size_t o_time = size;   size += align16((size_t)n * sizeof(uint32_t));
    size_t o_wait = size;   size += align16((size_t)n * sizeof(pw_action));
    size_t o_sf = size;     size += align16(keys * sizeof(uint32_t));
    size_t o_sb = size;     size += align16(keys * sizeof(uint32_t));
    size_t o_status = size; size += align16((size_t)n);
    char *block = malloc(size);
    if (!block) return pw_error(PW_ERR_NOMEM, "validator: cannot allocate %zu bytes", size);
    replay rp = {
        .s = s,
        .ck = (pw_schedule_checker *)(block + o_ck),
        .offset = (int64_t *)(block + o_off),
        .pc = (int *)(block + o_pc),
        .stack = (int *)(block + o_stack),
        .chain = (int *)(block + o_chain),
        .time = (uint32_t *)(block + o_time),
        .wait = (pw_action *)(block + o_wait),
        .sf_time = (uint32_t *)(block + o_sf),
        .sb_time = (uint32_t *)(block + o_sb),
        .status = (uint8_t *)(block + o_status),
    };
    int64_t off = 0;
    for (int r = 0; r < n; r++) {
        checker_init(&rp.ck[r], s, r, 0, block + o_cmem + (size_t)r * cmem);
        rp.offset[r] = off;
        off += s->ranks[r].n_actions;
        rp.pc[r] = 0;
        rp.time[r] = 0;
        rp.status[r] = RANK_READY;
    }

    int64_t busy = 0;
    pw_status st = run(&rp, start, &busy);
    if (st != PW_OK) goto out;

    int64_t sends = 0, recvs = 0;
    for (int r = 0; r < n; r++) {
        sends += rp.ck[r].n_sends;
        recvs += rp.ck[r].n_recvs;
    }
    if (sends != recvs) {
        st = report_unmatched_send(&rp);
        goto out;
    }
    /* Every message has met its receiver; now the final OPTIMs, whose own
     * check needs every backward and all-reduce of the rank done. Checking
     * sends first makes a leftover send the reported cause rather than the
     * incomplete rank it left behind. */
    for (int r = 0; r < n; r++) {
        for (int i = rp.pc[r]; i < s->ranks[r].n_actions; i++) {
            st = pw_schedule_checker_step(&rp.ck[r], &s->ranks[r].actions[i]);
            if (st != PW_OK) goto out;
            if (start) start[rp.offset[r] + i] = rp.time[r];
        }
    }
    if (rep) {
        uint32_t makespan = 0;
        for (int r = 0; r < n; r++) {
            const pw_schedule_checker *c = &rp.ck[r];
            rep->peak_inflight[r] = c->peak_inflight;
            rep->peak_stages[r] = (double)c->peak_inflight / (double)s->chunks_per_rank;
            rep->peak_w_pending[r] = c->peak_w_pending;
            for (int l = 0; l < s->chunks_per_rank; l++)
                rep->peak_inflight_chunk[pw_sched_chunk_at(s, r, l)] = c->chunk_peak[l];
            if (rp.time[r] > makespan) makespan = rp.time[r];
        }
        rep->n_ranks = n;
        rep->n_chunks = s->n_chunks;
        rep->n_actions = total;
        rep->n_messages = sends;
        rep->makespan = makespan;
        rep->bubble = makespan ? 1.0 - (double)busy / ((double)n * (double)makespan) : 0.0;
    }
    for (int r = 0; r < n; r++) {
        st = pw_schedule_checker_finish(&rp.ck[r]);
        if (st != PW_OK) goto out;
    }
out:
    free(block);
    return st;
}

/* ------------------------------------------------------------- validate */

pw_status pw_schedule_validate(const pw_schedule *s, pw_schedule_report **out)
{
    if (out) *out = NULL;
    if (!s) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_validate: schedule is NULL");
    PW_CHECK(pw_sched_check_shape(s));
    pw_schedule_report *rep = NULL;
    if (out) {
        size_t n = (size_t)s->n_ranks, c = (size_t)s->n_chunks;
        /* One block: the report, peak_stages (doubles first, for their
         * alignment), then the int arrays. */
        rep = calloc(1, sizeof *rep + n * sizeof(double) + (2 * n + c) * sizeof(int));
        if (!rep) return pw_error(PW_ERR_NOMEM, "validator: cannot allocate the report");
        rep->peak_stages = (double *)(rep + 1);
        rep->peak_inflight = (int *)(rep->peak_stages + n);
        rep->peak_w_pending = rep->peak_inflight + n;
        rep->peak_inflight_chunk = rep->peak_w_pending + n;
    }
    pw_status st = pw_sched_replay(s, rep, NULL);
    if (st != PW_OK) {
        free(rep);
        return st;
    }
    if (out) *out = rep;
    return PW_OK;
}

void pw_schedule_report_destroy(pw_schedule_report *rep) { free(rep); }
