/* pipewright — zb-auto: the Zero Bubble paper's automatic schedules (Qi et
 * al., "Zero Bubble Pipeline Parallelism", ICLR 2024, §3.2: ZB-1p, ZB-2p),
 * built by a greedy list scheduler of our own over the stages' F, B and W
 * times and the message time, under a limit on the activations a rank holds.
 *
 * One chunk per rank (looping placement), W split from B. The order is built
 * on a clock of whole nanoseconds: each rank, whenever it is free, runs the
 * first of these that can start now —
 *   1. its next B, once its F has run and the output gradient has arrived
 *      (B is what the previous rank waits for);
 *   2. its next F, once its input has arrived, if fewer than `memory_limit`
 *      micro-batches are in flight on the rank (F to W: W still reads the
 *      stash);
 *   3. its oldest pending W (nobody waits for W: it fills what would be a
 *      bubble, and frees a slot)
 * — and otherwise waits for the next input. With F = B = W and a limit of
 * 2p − 1 or more this is ZB-H2's order (every rank busy without a gap from
 * its first action to its last once m >= 2p − 1); with a limit of p the
 * warm-up fills only p slots and W runs as soon as memory asks for it, as in
 * ZB-H1. With unequal stages the same rules place W where the measured times
 * leave gaps, which is what the paper's heuristic does.
 *
 * The greedy cannot deadlock with a limit >= 1: the last rank's B is ready
 * as soon as its F has run, and every rank that waits for a B waits for one
 * whose F it has already sent downstream (the tests replay every p <= 8,
 * m <= 16 and limit 1 .. 2p through the validator).
 *
 * Ranks are advanced in order of their clocks (a binary heap of (time,
 * rank)), so when a rank decides at time t every action that ends by t on
 * another rank is already placed; a rank with nothing ready sleeps until a
 * neighbour places the action it waits for. O(actions · log p). */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "scheduler/schedule-internal.h"

int pw_sched_auto_check(const pw_schedule_config *cfg, char *why, size_t n)
{
    if (cfg->memory_limit < 0) {
        snprintf(why, n, "zb-auto needs memory_limit >= 1 micro-batch in flight (0 means 2p; got %d)",
                 cfg->memory_limit);
        return -1;
    }
    const pw_schedule_costs *c = cfg->costs;
    if (!c) return 0;
    if (!c->f || !c->b || !c->w) {
        snprintf(why, n, "zb-auto costs: f, b and w must each list the %d stages' times", cfg->n_stages);
        return -1;
    }
    if (!(c->comm >= 0.0) || !isfinite(c->comm) || c->comm > 1e6) {
        snprintf(why, n, "zb-auto costs: comm must be a time in seconds >= 0 (got %g)", c->comm);
        return -1;
    }
    for (int r = 0; r < cfg->n_stages; r++) {
        const double x[3] = {c->f[r], c->b[r], c->w[r]};
        for (int k = 0; k < 3; k++)
            if (!(x[k] >= 0.0) || !isfinite(x[k]) || x[k] > 1e6) {
                snprintf(why, n, "zb-auto costs: stage %d: %c must be a time in seconds >= 0 (got %g)",
                         r, "fbw"[k], x[k]);
                return -1;
            }
    }
    return 0;
}

pw_status pw_schedule_memory_limit_parse(const char *text, int n_stages, int *out)
{
    if (!text || !out || n_stages < 1)
        return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_memory_limit_parse: bad argument");
    char *end = NULL;
    long v = strtol(text, &end, 10);
    long long slots = v;
    if (end != text && (*end == 'p' || *end == 'P') && end[1] == '\0')
        slots = (long long)v * n_stages;
    else if (end == text || *end != '\0')
        slots = -1;
    if (slots < 1 || slots > INT_MAX)
        return pw_error(PW_ERR_INVALID_ARG, "memory limit '%s': expected a count of micro-batches in "
                        "flight (e.g. 12) or a multiple of the stages (1p, 2p)", text);
    *out = (int)slots;
    return PW_OK;
}

/* ------------------------------------------------------------ the greedy */

typedef struct heap_item {
    int64_t t;
    int r;
} heap_item;

typedef struct heap {
    heap_item *a;
    size_t n, cap;
} heap;

static int before(heap_item x, heap_item y) { return x.t < y.t || (x.t == y.t && x.r < y.r); }

static int heap_push(heap *h, int64_t t, int r)
{
    if (h->n == h->cap) {
        size_t cap = h->cap ? 2 * h->cap : 64;
        heap_item *a = realloc(h->a, cap * sizeof *a);
        if (!a) return -1;
        h->a = a;
        h->cap = cap;
    }
    size_t i = h->n++;
    heap_item x = {t, r};
    while (i > 0 && before(x, h->a[(i - 1) / 2])) {
        h->a[i] = h->a[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->a[i] = x;
    return 0;
}

static heap_item heap_pop(heap *h)
{
    heap_item top = h->a[0], x = h->a[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && before(h->a[c + 1], h->a[c])) c++;
        if (!before(h->a[c], x)) break;
        h->a[i] = h->a[c];
        i = c;
    }
    if (h->n) h->a[i] = x;
    return top;
}

#define NOT_YET INT64_MAX /* an action not placed yet */

typedef struct auto_rank {
    int f, b, w;        /* next micro-batch of each kind */
    int64_t free_at;    /* its last placed action ends */
    int64_t first;      /* its first action starts (-1: none yet) */
} auto_rank;

typedef struct greedy {
    int S, M, limit;
    int prefer_w;                /* 1: a pending W goes before a ready F once the
                                  * rank has run its first B */
    int taper;                   /* 1: before its first B, rank r fills only
                                  * limit − r slots (ZB-H1's warm-up shape) */
    int f_first;                 /* 1: a ready F goes before a ready B (1F1B's
                                  * steady order: the next micro-batch enters
                                  * the pipeline as early as possible) */
    int fit_w;                   /* 1: a W fills a gap only if it ends by the
                                  * time the next input already placed lands
                                  * (else the rank waits for it, and the W
                                  * goes later): a W that overruns delays the
                                  * B the previous rank waits for */
    int64_t *cf, *cb, *cw, comm; /* [S] ns */
    auto_rank *rk;               /* [S] */
    int64_t *end_f, *end_b;      /* [S][M] ns; NOT_YET */
    heap h;
    /* (optional) A given order to time instead of choosing one: rank r's
     * compute actions, 3M of them (a handcrafted schedule as a candidate). */
    const pw_action *const *fixed;
    int *done;                   /* [S] actions placed, with `fixed` */
} greedy;

/* When rank r's next B and next F could start (NOT_YET: their input is not
 * placed yet; F also NOT_YET while memory is full or every F has run). */
static int64_t b_ready_at(const greedy *g, int r)
{
    const auto_rank *k = &g->rk[r];
    if (k->b >= k->f) return NOT_YET;
    int64_t own = g->end_f[(size_t)r * g->M + k->b];
    if (r + 1 == g->S) return own;
    int64_t in = g->end_b[(size_t)(r + 1) * g->M + k->b];
    return in == NOT_YET ? NOT_YET : (in + g->comm > own ? in + g->comm : own);
}

static int64_t f_ready_at(const greedy *g, int r)
{
    const auto_rank *k = &g->rk[r];
    int cap = g->fixed ? g->M : g->limit; /* a given order keeps its own memory */
    if (g->taper && k->b == 0 && cap - r >= 1) cap -= r;
    if (k->f >= g->M || k->f - k->w >= cap) return NOT_YET;
    if (r == 0) return 0;
    int64_t in = g->end_f[(size_t)(r - 1) * g->M + k->f];
    return in == NOT_YET ? NOT_YET : in + g->comm;
}

/* Rank r is free at t: places its next action, or schedules its next try. */
static int decide(greedy *g, int r, int64_t t, pw_action **pos)
{
    auto_rank *k = &g->rk[r];
    int64_t tf = f_ready_at(g, r), tb = b_ready_at(g, r);
    if (g->fixed) { /* only the order's next action may run */
        pw_action_kind next = g->fixed[r][g->done[r]].kind;
        if (next != PW_ACT_F) tf = NOT_YET;
        if (next != PW_ACT_B) tb = NOT_YET;
        if (next == PW_ACT_W) tb = tf = t; /* its B has run: ready now */
    }
    const int run_f = tf <= t && !(g->prefer_w && k->b > 0 && k->w < k->b);
    const int64_t next_in = tb < tf ? tb : tf; /* the earliest input placed */
    pw_action a;
    int64_t d;
    if (g->fixed && g->fixed[r][g->done[r]].kind == PW_ACT_W) {
        a = (pw_action){PW_ACT_W, r, k->w++};
        d = g->cw[r];
    } else if (tb <= t && !(g->f_first && run_f)) {
        a = (pw_action){PW_ACT_B, r, k->b};
        d = g->cb[r];
        g->end_b[(size_t)r * g->M + k->b++] = t + d;
        /* The rank before may be asleep waiting for this gradient. */
        if (r > 0 && g->rk[r - 1].b == a.mb && heap_push(&g->h, t + d + g->comm, r - 1)) return -1;
    } else if (run_f) {
        a = (pw_action){PW_ACT_F, r, k->f};
        d = g->cf[r];
        g->end_f[(size_t)r * g->M + k->f++] = t + d;
        if (r + 1 < g->S && g->rk[r + 1].f == a.mb && heap_push(&g->h, t + d + g->comm, r + 1)) return -1;
    } else if (!g->fixed && k->w < k->b && !(g->fit_w && k->f - k->w < g->limit && next_in > t && next_in < NOT_YET &&
                                t + g->cw[r] > next_in)) {
        a = (pw_action){PW_ACT_W, r, k->w++};
        d = g->cw[r];
    } else {
        /* Idle: try again when the earliest input already placed lands;
         * with none placed, sleep until the neighbour places it. */
        PW_ASSERT(next_in > t);
        return next_in != NOT_YET ? heap_push(&g->h, next_in, r) : 0;
    }
    *pos[r]++ = a;
    if (g->fixed) g->done[r]++;
    if (k->first < 0) k->first = t;
    k->free_at = t + d;
    return k->w == g->M ? 0 : heap_push(&g->h, t + d, r);
}

static int64_t to_ns(double sec) { return llround(sec * 1e9); }

/* One run of the greedy with the given rules; *span and *makespan in ns. */
static pw_status run_greedy(const pw_schedule *s, const pw_schedule_config *cfg, int variant,
                            const pw_action *const *fixed, pw_action **pos, int64_t *span,
                            int64_t *makespan)
{
    const int S = s->n_ranks, M = s->n_micro;
    if (fixed) variant = 0; /* a given order has no rules to vary */
    greedy g = {.S = S, .M = M, .limit = cfg->memory_limit > 0 ? cfg->memory_limit : 2 * S,
                .prefer_w = variant & 1, .taper = (variant >> 1) & 1, .f_first = (variant >> 2) & 1,
                .fit_w = (variant >> 3) & 1, .fixed = fixed};
    if (g.limit > M) g.limit = M;
    const size_t keys = (size_t)S * (size_t)M;
    g.cf = malloc(3 * (size_t)S * sizeof *g.cf);
    g.rk = malloc((size_t)S * sizeof *g.rk);
    g.end_f = malloc(2 * keys * sizeof *g.end_f);
    if (!g.cf || !g.rk || !g.end_f) {
        free(g.cf);
        free(g.rk);
        free(g.end_f);
        return pw_error(PW_ERR_NOMEM, "zb-auto: cannot allocate the %d x %d build clock", S, M);
    }
    g.done = calloc((size_t)S, sizeof *g.done);
    if (!g.done) {
        free(g.cf);
        free(g.rk);
        free(g.end_f);
        return pw_error(PW_ERR_NOMEM, "zb-auto: out of memory");
    }
    g.cb = g.cf + S;
    g.cw = g.cb + S;
    g.end_b = g.end_f + keys;
    const pw_schedule_costs *c = cfg->costs;
    for (int r = 0; r < S; r++) {
        g.cf[r] = c ? to_ns(c->f[r]) : 1000000000;
        g.cb[r] = c ? to_ns(c->b[r]) : 1000000000;
        g.cw[r] = c ? to_ns(c->w[r]) : 1000000000;
        g.rk[r] = (auto_rank){.first = -1};
    }
    g.comm = c ? to_ns(c->comm) : 0;
    for (size_t i = 0; i < 2 * keys; i++) g.end_f[i] = NOT_YET;

    pw_status st = PW_OK;
    for (int r = 0; r < S && st == PW_OK; r++)
        if (heap_push(&g.h, 0, r)) st = pw_error(PW_ERR_NOMEM, "zb-auto: out of memory");
    while (st == PW_OK && g.h.n > 0) {
        heap_item x = heap_pop(&g.h);
        const auto_rank *k = &g.rk[x.r];
        /* Stale: the rank acted since this try was queued, or is done. */
        if (x.t < k->free_at || k->w == M) continue;
        if (decide(&g, x.r, x.t, pos)) st = pw_error(PW_ERR_NOMEM, "zb-auto: out of memory");
    }
    int64_t longest = 0, last = 0;
    for (int r = 0; r < S && st == PW_OK; r++) {
        const auto_rank *k = &g.rk[r];
        PW_ASSERT(k->f == M && k->b == M && k->w == M); /* the greedy never deadlocks (above) */
        if (k->free_at - k->first > longest) longest = k->free_at - k->first;
        if (k->free_at > last) last = k->free_at;
    }
    *span = longest;
    *makespan = last;
    free(g.h.a);
    free(g.done);
    free(g.cf);
    free(g.rk);
    free(g.end_f);
    return st;
}

/* The greedy's rules have variants, four switches (W before F once a rank's
 * backward has started; a ZB-H1-shaped warm-up; F before B; W only where it
 * fits before the next input): none is best for every memory limit and set
 * of times (with F = B = W, B first is ZB-H2 at 2p, F first with the memory
 * limit forcing W is ZB-H1 at p). The handcrafted orders that fit the limit
 * (ZB-H1: min(p, m) in flight, ZB-H2: min(2p − 1, m)) are candidates too,
 * timed on the same clock. The candidate with the shortest span — the period
 * of overlapped steps, the paper's measure — wins; ties go to the shorter
 * step, then to the earlier candidate. The winner is built once more into
 * pos. */
#define N_VARIANTS 16

/* ZB-H1's or ZB-H2's compute order for s's shape, or NULL when it holds
 * more than the limit (or cannot be built). */
static pw_schedule *handcrafted(const pw_schedule *s, int limit, pw_schedule_kind kind)
{
    const int p = s->n_ranks, m = s->n_micro;
    int need = kind == PW_SCHEDULE_ZB_H1 ? p : 2 * p - 1;
    if ((need < m ? need : m) > limit) return NULL;
    pw_schedule_config c = {.kind = kind, .n_stages = p, .n_micro = m};
    pw_schedule *h = NULL;
    if (pw_schedule_generate(&c, &h) != PW_OK) pw_clear_error();
    return h;
}

pw_status pw_sched_gen_zb_auto(const pw_schedule *s, const pw_schedule_config *cfg, pw_action **pos,
                               int64_t *span)
{
    const int S = s->n_ranks;
    const int limit = cfg->memory_limit > 0 ? cfg->memory_limit : 2 * S;
    const size_t per_rank = 3 * (size_t)s->n_micro;
    pw_action *scratch = malloc((size_t)S * per_rank * sizeof *scratch);
    pw_action **tmp = malloc((size_t)S * sizeof *tmp);
    const pw_action **order = malloc(2 * (size_t)S * sizeof *order);
    pw_schedule *hand[2] = {handcrafted(s, limit, PW_SCHEDULE_ZB_H1),
                            handcrafted(s, limit, PW_SCHEDULE_ZB_H2)};
    pw_status st = PW_OK;
    if (!scratch || !tmp || !order) st = pw_error(PW_ERR_NOMEM, "zb-auto: cannot allocate %d ranks x %zu "
                                                  "actions", S, per_rank);
    for (int h = 0; h < 2 && st == PW_OK; h++)
        for (int r = 0; r < S; r++) order[h * S + r] = hand[h] ? hand[h]->ranks[r].actions : NULL;
    int best = -1;
    int64_t best_span = 0, best_make = 0, sp = 0, mk = 0;
    for (int v = 0; v < N_VARIANTS + 2 && st == PW_OK; v++) {
        const pw_action *const *fixed = v < N_VARIANTS ? NULL : order + (size_t)(v - N_VARIANTS) * S;
        if (fixed && !hand[v - N_VARIANTS]) continue;
        for (int r = 0; r < S; r++) tmp[r] = scratch + (size_t)r * per_rank;
        st = run_greedy(s, cfg, v, fixed, tmp, &sp, &mk);
        if (st == PW_OK && (best < 0 || sp < best_span || (sp == best_span && mk < best_make))) {
            best = v;
            best_span = sp;
            best_make = mk;
        }
    }
    if (st == PW_OK)
        st = run_greedy(s, cfg, best, best < N_VARIANTS ? NULL : order + (size_t)(best - N_VARIANTS) * S,
                        pos, &sp, &mk);
    if (span) *span = sp;
    free(scratch);
    free(tmp);
    free(order);
    pw_schedule_destroy(hand[0]);
    pw_schedule_destroy(hand[1]);
    return st;
}
