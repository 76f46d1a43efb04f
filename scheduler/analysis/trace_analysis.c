/* pipewright — trace analysis: streaming (rank, step) reduction, bubble
 * accounting, idle attribution, the first-order imbalance model and the
 * critical path of one step. See trace_analysis.h for the definitions.
 *
 * Flow: pass 1 streams the file; events land in their (rank, step) group;
 * a group is reduced (swept into time classes, idle causes aggregated, the
 * rank's totals summed) once its rank is two steps further, and leaves a
 * small ta_rec: a step's window is known only when its last rank has been
 * read, and pipewright writes rank after rank. finish() orders the records
 * into steps, adds the idle between each rank's own span and the step's
 * window, and derives the median step and the bubble explanation. Pass 2
 * (trace_detail.c) seeks back to the detail step's events and sweeps them
 * again over the whole window, keeping segments, gaps and the critical path.
 * The types both files share are in trace_analysis_int.h.
 */
#include "scheduler/analysis/trace_analysis.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "scheduler/analysis/trace_analysis_int.h"
#include "scheduler/schedule.h"

/* ------------------------------------------------------------ containers */


/* qsort, memcpy and memmove without the undefined cases: NULL with n = 0. */
void ta_sort_n(void *base, size_t n, size_t size, int (*cmp)(const void *, const void *))
{
    if (n > 1) qsort(base, n, size, cmp);
}

void ta_copy_n(void *dst, const void *src, size_t bytes)
{
    if (bytes) memcpy(dst, src, bytes);
}

static uint64_t hash_bytes(const void *p, size_t n, uint64_t h)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    /* FNV's low bits depend only on the inputs' low bits, and the tables mask
     * the low bits: without a final mix, keys that differ in high bits pile
     * into long probe chains (a 64-rank simulated trace took minutes). */
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}
#define HASH_SEED 14695981039346656037ull

pw_status ta_oom(void) { return pw_error(PW_ERR_NOMEM, "trace analysis: out of memory"); }

/* Sums over steps and ranks. One time is below 2^63 ns (the reader bounds
 * ts and dur), but steps may overlap and ranks multiply: a sum that would
 * pass INT64_MAX saturates and sets s->overflow, which finish() reports. */
static inline void acc(ta *s, int64_t *d, int64_t x)
{
    if (__builtin_add_overflow(*d, x, d)) {
        *d = x > 0 ? INT64_MAX : INT64_MIN;
        s->overflow = 1;
    }
}

/* ------------------------------------------------------------ names */

/* Class of an event from its name and category. */
static int classify(const char *name, const char *cat, int8_t *wk)
{
    *wk = WK_NONE;
    if (!strcmp(name, "TP_ALLREDUCE") || !strcmp(cat, "tp")) return CLS_TP;
    if (!strncmp(name, "wait", 4) || !strcmp(cat, "wait")) {
        if (strstr(name, "RECV")) *wk = WK_RECV;
        else if (strstr(name, "ALLREDUCE") || strstr(name, "allreduce") || strstr(name, "all-reduce"))
            *wk = WK_ALLREDUCE;
        else *wk = WK_OTHER;
        return PW_TA_WAIT;
    }
    if (!strcmp(name, "F")) return PW_TA_F;
    if (!strcmp(name, "B")) return PW_TA_B;
    if (!strcmp(name, "W")) return PW_TA_W;
    if (!strcmp(name, "OPTIM")) return PW_TA_OPTIM;
    if (!strcmp(name, "step") || !strcmp(cat, "step")) return CLS_STEP;
    if (!strcmp(name, "ALLREDUCE")) {
        *wk = WK_ALLREDUCE;
        return PW_TA_COMM;
    }
    if (!strncmp(name, "SEND_", 5) || !strncmp(name, "RECV_", 5) || !strcmp(cat, "comm"))
        return PW_TA_COMM;
    return PW_TA_OTHER;
}

/* Names come from arbitrary traces and end up on terminals and in JSON:
 * control characters (escape sequences) become '?', and a name cut to fit
 * `n` is cut between UTF-8 characters. Returns `name` itself when it is
 * clean and fits, else a copy in buf. */
static const char *clean_name(const char *name, char *buf, size_t n)
{
    const unsigned char *p = (const unsigned char *)name;
    while (*p && *p >= 0x20 && *p != 0x7f) p++;
    if (!*p && (size_t)(p - (const unsigned char *)name) < n) return name;
    size_t i = 0;
    for (p = (const unsigned char *)name; *p && i + 1 < n; p++) buf[i++] = *p < 0x20 || *p == 0x7f ? '?' : (char)*p;
    if ((*p & 0xc0) == 0x80) {
        /* Cut inside a character: drop its bytes already copied. */
        while (i > 0 && ((unsigned char)buf[i - 1] & 0xc0) == 0x80) i--;
        if (i > 0) i--; /* its lead byte */
    }
    buf[i] = 0;
    return buf;
}

static int32_t intern(ta *s, const char *raw)
{
    char cleaned[512];
    const char *name = clean_name(raw, cleaned, sizeof cleaned);
    if (s->name_ht_cap < 2 * (s->n_names + 1)) {
        size_t cap = s->name_ht_cap ? 2 * s->name_ht_cap : 256;
        int32_t *ht = calloc(cap, sizeof *ht);
        if (!ht) return -1;
        for (size_t i = 0; i < s->n_names; i++) {
            uint64_t h = hash_bytes(s->names[i], strlen(s->names[i]), HASH_SEED);
            size_t j = h & (cap - 1);
            while (ht[j]) j = (j + 1) & (cap - 1);
            ht[j] = (int32_t)i + 1;
        }
        free(s->name_ht);
        s->name_ht = ht;
        s->name_ht_cap = cap;
    }
    size_t len = strlen(name);
    uint64_t h = hash_bytes(name, len, HASH_SEED);
    size_t j = h & (s->name_ht_cap - 1);
    while (s->name_ht[j]) {
        int32_t id = s->name_ht[j] - 1;
        if (!strcmp(s->names[id], name)) return id;
        j = (j + 1) & (s->name_ht_cap - 1);
    }
    if (s->n_names >= MAX_NAMES && s->id_other >= 0) return s->id_other;
    if (s->n_names >= s->cap_names) {
        size_t cap = s->cap_names ? 2 * s->cap_names : 64;
        char **p = realloc(s->names, cap * sizeof *p);
        if (!p) return -1;
        s->names = p;
        int8_t *c = realloc(s->name_cls, cap), *w = c ? realloc(s->name_wk, cap) : NULL;
        if (c) s->name_cls = c;
        if (!c || !w) return -1;
        s->name_wk = w;
        s->cap_names = cap;
    }
    char *copy = strdup(name);
    if (!copy) return -1;
    s->names[s->n_names] = copy;
    /* The class, when the name alone decides it (all of pipewright's). */
    int8_t wk, wk2;
    int c1 = classify(name, "", &wk), c2 = classify(name, "comm", &wk2);
    s->name_cls[s->n_names] = c1 == c2 && wk == wk2 && c1 != PW_TA_OTHER ? (int8_t)c1 : -1;
    s->name_wk[s->n_names] = wk;
    s->name_ht[j] = (int32_t)s->n_names + 1;
    return (int32_t)s->n_names++;
}

/* Class of an interned name with this event's category. */
static int class_of(const ta *s, int32_t id, const char *name, const char *cat, int8_t *wk)
{
    if (s->name_cls[id] >= 0) {
        *wk = s->name_wk[id];
        return s->name_cls[id];
    }
    return classify(name, cat, wk);
}

/* ------------------------------------------------------------ ranks */

static int rank_lookup(ta *s, int64_t pid, int64_t tid)
{
    if (s->last_rank >= 0 && s->last_pid == pid && s->last_tid == tid) return s->last_rank;
    if (s->rank_ht_cap < 2 * (s->n_ranks + 1)) {
        size_t cap = s->rank_ht_cap ? 2 * s->rank_ht_cap : 64;
        /* sort_ranks drops the table with every rank still in place: size it
         * for all of them, or the rehash below never finds a free slot. */
        while (cap < 2 * (s->n_ranks + 1)) cap *= 2;
        int32_t *ht = calloc(cap, sizeof *ht);
        if (!ht) return -1;
        for (size_t i = 0; i < s->n_ranks; i++) {
            int64_t key[2] = {s->ranks[i].pid, s->ranks[i].tid};
            size_t j = hash_bytes(key, sizeof key, HASH_SEED) & (cap - 1);
            while (ht[j]) j = (j + 1) & (cap - 1);
            ht[j] = (int32_t)i + 1;
        }
        free(s->rank_ht);
        s->rank_ht = ht;
        s->rank_ht_cap = cap;
    }
    int64_t key[2] = {pid, tid};
    size_t j = hash_bytes(key, sizeof key, HASH_SEED) & (s->rank_ht_cap - 1);
    while (s->rank_ht[j]) {
        int id = s->rank_ht[j] - 1;
        if (s->ranks[id].pid == pid && s->ranks[id].tid == tid) {
            s->last_rank = id;
            s->last_pid = pid;
            s->last_tid = tid;
            return id;
        }
        j = (j + 1) & (s->rank_ht_cap - 1);
    }
    if (s->detail) return -2; /* pass 2 never creates ranks */
    if (s->n_ranks >= (1u << 20)) return -1;
    if (s->n_ranks >= s->cap_ranks) {
        size_t cap = s->cap_ranks ? 2 * s->cap_ranks : 16;
        ta_rank *p = realloc(s->ranks, cap * sizeof *p);
        if (!p) return -1;
        s->ranks = p;
        s->cap_ranks = cap;
    }
    ta_rank *r = &s->ranks[s->n_ranks];
    memset(r, 0, sizeof *r);
    r->pid = pid;
    r->tid = tid;
    r->max_closed = -1;
    s->rank_ht[j] = (int32_t)s->n_ranks + 1;
    s->last_rank = (int)s->n_ranks;
    s->last_pid = pid;
    s->last_tid = tid;
    return (int)s->n_ranks++;
}

/* ------------------------------------------------------------ causes */

static pw_ta_cause *cause_get(ta *s, ta_cause_key k)
{
    if (s->cause_ht_cap < 2 * (s->n_causes + 1)) {
        size_t cap = s->cause_ht_cap ? 2 * s->cause_ht_cap : 256;
        /* The table may have been dropped (cap 0) while causes remain: size it
         * for all of them, or the rehash below never finds a free slot. */
        while (cap < 2 * (s->n_causes + 1)) cap *= 2;
        int32_t *ht = calloc(cap, sizeof *ht);
        if (!ht) return NULL;
        for (size_t i = 0; i < s->n_causes; i++) {
            size_t j = hash_bytes(&s->cause_keys[i], sizeof k, HASH_SEED) & (cap - 1);
            while (ht[j]) j = (j + 1) & (cap - 1);
            ht[j] = (int32_t)i + 1;
        }
        free(s->cause_ht);
        s->cause_ht = ht;
        s->cause_ht_cap = cap;
    }
    size_t j = hash_bytes(&k, sizeof k, HASH_SEED) & (s->cause_ht_cap - 1);
    while (s->cause_ht[j]) {
        int32_t id = s->cause_ht[j] - 1;
        if (!memcmp(&s->cause_keys[id], &k, sizeof k)) return &s->causes[id];
        j = (j + 1) & (s->cause_ht_cap - 1);
    }
    if (s->n_causes >= s->cap_causes) {
        size_t cap = s->cap_causes ? 2 * s->cap_causes : 64;
        pw_ta_cause *c = realloc(s->causes, cap * sizeof *c);
        if (!c) return NULL;
        s->causes = c;
        ta_cause_key *kk = realloc(s->cause_keys, cap * sizeof *kk);
        if (!kk) return NULL;
        s->cause_keys = kk;
        s->cap_causes = cap;
    }
    pw_ta_cause *c = &s->causes[s->n_causes];
    memset(c, 0, sizeof *c);
    c->rank = k.rank;
    c->kind = (pw_ta_cause_kind)k.kind;
    c->what = k.what >= 0 ? s->names[k.what] : "";
    c->peer = k.peer;
    c->stage = k.stage;
    c->mb = k.mb;
    c->max_step = -1;
    s->cause_keys[s->n_causes] = k;
    s->cause_ht[j] = (int32_t)s->n_causes + 1;
    s->n_causes++;
    return c;
}

/* Adds one gap (a maximal idle run) of `len` ns. */
static int cause_add(ta *s, ta_cause_key k, const int64_t phase_ns[PW_TA_N_PHASES], int64_t len,
                     int64_t step, int new_gap)
{
    if (len <= 0) return 1;
    pw_ta_cause *c = cause_get(s, k);
    if (!c) return 0;
    acc(s, &c->total_ns, len);
    for (int p = 0; p < PW_TA_N_PHASES; p++) acc(s, &c->phase_ns[p], phase_ns[p]);
    c->n_gaps += new_gap;
    if (len > c->max_ns) {
        c->max_ns = len;
        c->max_step = step;
    }
    return 1;
}

/* Index of the first skipped step >= `step` (s->skip is kept sorted, so a
 * lookup is O(log n) however many steps --skip names). */
static size_t skip_lower(const ta *s, int64_t step)
{
    size_t lo = 0, hi = s->n_skip;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->skip[mid] < step) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static int step_skipped(const ta *s, int64_t step)
{
    size_t i = skip_lower(s, step);
    return i < s->n_skip && s->skip[i] == step;
}

/* ------------------------------------------------------------ the sweep */

static int phase_at(int64_t x, int64_t first_b, int64_t last_f)
{
    if (x < first_b) return PW_TA_WARMUP;
    if (x >= last_f) return PW_TA_COOLDOWN;
    return PW_TA_STEADY;
}

static int prio(int cls)
{
    switch (cls) {
    case PW_TA_F: case PW_TA_B: case PW_TA_W: case PW_TA_OPTIM: return 4;
    case PW_TA_WAIT: return 3;
    case PW_TA_COMM: return 2;
    case PW_TA_OTHER: return 1;
    default: return 0;
    }
}

/* Sort key of an event: start time, then position in the group (stable). */
typedef struct ta_key {
    int64_t t0;
    int idx;
} ta_key;

static int cmp_key(const void *x, const void *y)
{
    const ta_key *a = x, *b = y;
    if (a->t0 != b->t0) return a->t0 < b->t0 ? -1 : 1;
    return a->idx - b->idx;
}

static int cmp_i64(const void *x, const void *y)
{
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a > b) - (a < b);
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return 1;
    size_t nc = *cap ? *cap : 64;
    while (nc < need) nc *= 2;
    void *q = realloc(*p, nc * elem);
    if (!q) return 0;
    *p = q;
    *cap = nc;
    return 1;
}

/* A gap being built during the sweep. */
typedef struct ta_run {
    int open;
    ta_cause_key key;
    int64_t t0, t1;
    int64_t phase_ns[PW_TA_N_PHASES];
    int event, peer, phase;
} ta_run;

static void times_add(ta *s, pw_ta_times *d, const pw_ta_times *x)
{
    acc(s, &d->window, x->window);
    for (int c = 0; c <= PW_TA_COMM; c++) acc(s, &d->busy[c], x->busy[c]);
    acc(s, &d->compute, x->compute);
    acc(s, &d->idle, x->idle);
    for (int p = 0; p < PW_TA_N_PHASES; p++) acc(s, &d->idle_phase[p], x->idle_phase[p]);
    acc(s, &d->wait_comm, x->wait_comm);
    acc(s, &d->wait_other, x->wait_other);
    acc(s, &d->exposed_allreduce, x->exposed_allreduce);
    acc(s, &d->tp_allreduce, x->tp_allreduce);
    for (int k = 0; k < 3; k++) d->n_actions[k] += x->n_actions[k];
}

/* Ends the current gap and adds it to its cause. Edge gaps (NOT_STARTED,
 * DONE) wait for finish(), which joins them with the idle outside the rank's
 * span; pass 2 and skipped steps add nothing. 0 when out of memory. */
static int run_flush(ta *s, ta_run *run, int64_t step, int skipped)
{
    if (!run->open) return 1;
    run->open = 0;
    if (s->detail || skipped || run->key.kind == PW_CAUSE_NOT_STARTED || run->key.kind == PW_CAUSE_DONE)
        return 1;
    return cause_add(s, run->key, run->phase_ns, run->t1 - run->t0, step, 1);
}

/* Reduces rank r's group g. Pass 1: over the rank's own span, into a ta_rec
 * and the cause table. Pass 2 (s->detail): over the step window, into the
 * detail outputs. */
static pw_status reduce(ta *s, int r, ta_group *g)
{
    const size_t n = g->n;
    ta_ev *ev = g->ev;
    if (n == 0) return PW_OK;
    if (!grow((void **)&s->order, &s->cap_order, n, sizeof(int)) ||
        !grow((void **)&s->keys, &s->cap_keys, n, sizeof(ta_key)) ||
        !grow((void **)&s->bounds, &s->cap_bounds, 2 * n + 2, sizeof(int64_t)) ||
        !grow((void **)&s->active, &s->cap_active, n, sizeof(int)))
        return ta_oom();
    int *ord = s->order;
    int sorted = 1;
    for (size_t i = 0; i < n; i++) {
        s->keys[i] = (ta_key){ev[i].t0, (int)i};
        if (i && ev[i].t0 < ev[i - 1].t0) sorted = 0;
    }
    if (!sorted) ta_sort_n(s->keys, n, sizeof *s->keys, cmp_key); /* writers usually emit in order */
    for (size_t i = 0; i < n; i++) ord[i] = s->keys[i].idx;

    int64_t st0 = INT64_MAX, st1 = INT64_MIN, e0 = INT64_MAX, e1 = INT64_MIN;
    int64_t first_b = INT64_MAX, first_w = INT64_MAX, last_f = INT64_MIN, tp_ns = 0;
    for (size_t i = 0; i < n; i++) {
        const ta_ev *e = &ev[i];
        if (e->cls == CLS_STEP) {
            if (e->t0 < st0) st0 = e->t0;
            if (e->t1 > st1) st1 = e->t1;
            continue;
        }
        if (e->cls == CLS_TP) { /* inside an F, B or W: its time on its own line */
            tp_ns += e->t1 - e->t0;
            continue;
        }
        if (e->t0 < e0) e0 = e->t0;
        if (e->t1 > e1) e1 = e->t1;
        if (e->cls == PW_TA_B && e->t0 < first_b) first_b = e->t0;
        if (e->cls == PW_TA_W && e->t0 < first_w) first_w = e->t0;
        if (e->cls == PW_TA_F && e->t1 > last_f) last_f = e->t1;
    }
    if (first_b == INT64_MAX) first_b = first_w;
    /* The rank's span: its step event(s), stretched over any event outside. */
    int64_t a0 = st0 <= e0 ? st0 : e0, a1 = st1 >= e1 ? st1 : e1;
    if (a0 == INT64_MAX) return PW_OK; /* cannot happen: n > 0 */
    int64_t w0 = s->detail ? s->win_t0 : a0, w1 = s->detail ? s->win_t1 : a1;
    if (w0 > a0) w0 = a0;
    if (w1 < a1) w1 = a1;
    const int has_events = e0 != INT64_MAX;

    /* Elementary intervals. */
    size_t nb = 0;
    int64_t *bd = s->bounds;
    bd[nb++] = w0;
    for (size_t i = 0; i < n; i++) { /* in order, so usually already sorted */
        const ta_ev *e = &ev[ord[i]];
        if (e->cls == CLS_STEP || e->cls == CLS_TP) continue;
        bd[nb++] = e->t0;
        bd[nb++] = e->t1;
    }
    bd[nb++] = w1;
    int bd_sorted = 1;
    for (size_t i = 1; i < nb && bd_sorted; i++) bd_sorted = bd[i - 1] <= bd[i];
    if (!bd_sorted) ta_sort_n(bd, nb, sizeof *bd, cmp_i64);
    size_t u = 0;
    for (size_t i = 0; i < nb; i++)
        if (u == 0 || bd[i] != bd[u - 1]) bd[u++] = bd[i];
    nb = u;

    pw_ta_times times;
    memset(&times, 0, sizeof times);
    pw_ta_times *t = &times;
    t->tp_allreduce = tp_ns;
    int64_t head_ns = 0, tail_ns = 0;
    const int skipped = !s->detail && step_skipped(s, g->step);

    ta_detail_rank *dr = s->detail ? &s->drank[r] : NULL;
    if (dr) {
        /* The rank's events in start order; segments index into them. */
        dr->ev = calloc(n, sizeof *dr->ev);
        if (!dr->ev) return ta_oom();
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            const ta_ev *e = &ev[ord[i]];
            if (e->cls == CLS_STEP || e->cls == CLS_TP) continue;
            pw_ta_event *o = &dr->ev[k];
            o->rank = r;
            o->cls = (pw_ta_class)e->cls;
            o->name = s->names[e->name];
            o->stage = e->stage;
            o->mb = e->mb;
            o->peer = e->peer;
            o->t0 = e->t0;
            o->t1 = e->t1;
            o->bytes = e->bytes;
            ord[k++] = ord[i]; /* keep only non-step events, same order */
        }
        dr->n_ev = k;
    }

    ta_run run = {0};
    size_t na = 0, next = 0;
    int *act = s->active;
    int last_seg_cls = -1, last_seg_event = -2, last_seg_phase = -2;
    pw_status st = PW_OK;

    for (size_t b = 0; b + 1 < nb; b++) {
        const int64_t x = bd[b], y = bd[b + 1], len = y - x;
        /* Enter events starting at or before x; drop the finished ones. */
        const size_t n_ord = dr ? dr->n_ev : n;
        while (next < n_ord && ev[ord[next]].t0 <= x) {
            if (ev[ord[next]].cls != CLS_STEP && ev[ord[next]].cls != CLS_TP) act[na++] = (int)next;
            next++;
        }
        size_t k = 0;
        for (size_t i = 0; i < na; i++)
            if (ev[ord[act[i]]].t1 > x) act[k++] = act[i];
        na = k;
        /* The winner: highest priority, then the innermost (latest start). */
        int win = -1;
        for (size_t i = 0; i < na; i++) {
            const ta_ev *e = &ev[ord[act[i]]];
            if (win < 0) {
                win = act[i];
                continue;
            }
            const ta_ev *w = &ev[ord[win]];
            int pe = prio(e->cls), pw = prio(w->cls);
            if (pe > pw || (pe == pw && e->t0 >= w->t0)) win = act[i];
        }
        const ta_ev *we = win >= 0 ? &ev[ord[win]] : NULL;
        int cls = we ? we->cls : PW_TA_IDLE;
        int phase = -1;
        if (cls <= PW_TA_COMM) {
            t->busy[cls] += len;
            if (cls == PW_TA_COMM && we->wk == WK_ALLREDUCE) t->exposed_allreduce += len;
            if (!run_flush(s, &run, g->step, skipped)) return ta_oom();
        } else {
            phase = phase_at(x, first_b, last_f);
            t->idle_phase[phase] += len;
            ta_cause_key key = {.rank = r, .what = -1, .peer = -1, .stage = -1, .mb = -1};
            int gap_event = -1, gap_peer = -1;
            if (cls == PW_TA_WAIT) {
                if (we->wk == WK_RECV) t->wait_comm += len;
                else if (we->wk == WK_ALLREDUCE) t->exposed_allreduce += len;
                else t->wait_other += len;
                key.kind = PW_CAUSE_WAIT;
                key.what = we->name;
                key.peer = we->peer;
                key.stage = we->stage;
                key.mb = we->mb;
                gap_event = win;
                gap_peer = we->peer;
            } else if (!has_events || x < e0) {
                key.kind = PW_CAUSE_NOT_STARTED;
                head_ns += len;
            } else if (x >= e1) {
                key.kind = PW_CAUSE_DONE;
                tail_ns += len;
                gap_peer = s->detail ? s->win_last_rank : -1;
            } else {
                key.kind = PW_CAUSE_UNTRACKED;
                /* the next event to start is the action the rank idled before */
                if (next < n_ord) {
                    key.what = ev[ord[next]].name;
                    gap_event = (int)next;
                }
            }
            int same = run.open && !memcmp(&run.key, &key, sizeof key) && run.t1 == x;
            if (!same) {
                if (!run_flush(s, &run, g->step, skipped)) return ta_oom();
                memset(&run, 0, sizeof run);
                run.open = 1;
                run.key = key;
                run.t0 = x;
                run.event = gap_event;
                run.peer = gap_peer;
                run.phase = phase;
                if (dr) {
                    if (!grow((void **)&dr->gap, &dr->cap_gap, dr->n_gap + 1, sizeof *dr->gap)) return ta_oom();
                    pw_ta_gap *gp = &dr->gap[dr->n_gap++];
                    gp->rank = r;
                    gp->t0 = x;
                    gp->kind = (pw_ta_cause_kind)key.kind;
                    gp->event = gap_event;
                    gp->peer = gap_peer;
                    gp->phase = phase;
                }
            }
            run.t1 = y;
            run.phase_ns[phase] += len;
            if (dr) dr->gap[dr->n_gap - 1].t1 = y;
        }
        if (dr) {
            int seg_event = win;
            if (cls == last_seg_cls && seg_event == last_seg_event && phase == last_seg_phase && dr->n_seg) {
                dr->seg[dr->n_seg - 1].t1 = y;
            } else {
                if (!grow((void **)&dr->seg, &dr->cap_seg, dr->n_seg + 1, sizeof *dr->seg)) return ta_oom();
                pw_ta_segment *sg = &dr->seg[dr->n_seg++];
                sg->t0 = x;
                sg->t1 = y;
                sg->cls = (pw_ta_class)cls;
                sg->event = seg_event;
                sg->phase = phase;
                last_seg_cls = cls;
                last_seg_event = seg_event;
                last_seg_phase = phase;
            }
        }
    }
    if (!run_flush(s, &run, g->step, skipped)) return ta_oom();

    if (s->detail) return st;

    for (size_t i = 0; i < n; i++) {
        if (ev[i].cls == PW_TA_F) t->n_actions[0]++;
        else if (ev[i].cls == PW_TA_B) t->n_actions[1]++;
        else if (ev[i].cls == PW_TA_W) t->n_actions[2]++;
    }
    for (int c = 0; c < PW_TA_N_COMPUTE; c++) t->compute += t->busy[c];
    if (t->n_actions[0] > s->max_f) s->max_f = t->n_actions[0];
    if (!skipped) times_add(s, &s->ranks[r].total, t);
    ta_rec rec = {
        .step = g->step, .t0 = a0, .t1 = a1, .head_ns = head_ns, .tail_ns = tail_ns, .compute = t->compute,
        .off0 = g->off0, .line0 = g->line0, .off1 = g->off1, .full = -1, .rank = r,
        .tail_phase = (int8_t)phase_at(a1, first_b, last_f),
    };
    if (s->cfg->per_step) {
        VEC_PUSH(s->full, s->n_full, s->cap_full, fail);
        s->full[s->n_full] = *t;
        rec.full = (int64_t)s->n_full++;
    }
    VEC_PUSH(s->recs, s->n_recs, s->cap_recs, fail);
    s->recs[s->n_recs++] = rec;
    return PW_OK;
fail:
    return ta_oom();
}

/* ------------------------------------------------------------ ingest */

static void group_free(ta_group *g)
{
    free(g->ev);
    memset(g, 0, sizeof *g);
}

/* Reduces and frees rank r's open group i. */
pw_status ta_close_group(ta *s, int r, size_t i)
{
    ta_rank *rk = &s->ranks[r];
    ta_group g = rk->open[i];
    if (i + 1 < rk->n_open) memmove(&rk->open[i], &rk->open[i + 1], (rk->n_open - i - 1) * sizeof g);
    rk->n_open--;
    pw_status st = reduce(s, r, &g);
    if (!s->detail && g.step > rk->max_closed) rk->max_closed = g.step;
    group_free(&g);
    return st;
}

static pw_status add_event(ta *s, int r, const ta_ev *e, int64_t step, int64_t off0, int64_t line0,
                           int64_t off1)
{
    ta_rank *rk = &s->ranks[r];
    if (s->detail && step != s->a->detail.step) return PW_OK;
    /* The first skip_steps distinct steps, in trace order. */
    if (!s->detail && s->n_skip < (size_t)s->cfg->skip_steps && !step_skipped(s, step)) {
        VEC_PUSH(s->skip, s->n_skip, s->cap_skip, fail);
        size_t at = skip_lower(s, step); /* writers emit steps in order: usually the end */
        memmove(&s->skip[at + 1], &s->skip[at], (s->n_skip - at) * sizeof *s->skip);
        s->skip[at] = step;
        s->n_skip++;
    }
    size_t i = 0;
    while (i < rk->n_open && rk->open[i].step < step) i++;
    if (i == rk->n_open || rk->open[i].step != step) {
        if (!s->detail && step <= rk->max_closed) {
            s->n_late++;
            return PW_OK;
        }
        VEC_PUSH(rk->open, rk->n_open, rk->cap_open, fail);
        memmove(&rk->open[i + 1], &rk->open[i], (rk->n_open - i) * sizeof *rk->open);
        rk->n_open++;
        memset(&rk->open[i], 0, sizeof rk->open[i]);
        rk->open[i].step = step;
        rk->open[i].off0 = off0;
        rk->open[i].line0 = line0;
    }
    ta_group *g = &rk->open[i];
    VEC_PUSH(g->ev, g->n, g->cap, fail);
    g->ev[g->n++] = *e;
    if (off0 < g->off0) {
        g->off0 = off0;
        g->line0 = line0;
    }
    if (off1 > g->off1) g->off1 = off1;
    /* A rank two steps further has finished this one (writers emit a rank's
     * events in step order; the step event comes last). */
    while (rk->n_open && rk->open[0].step <= step - 2) PW_CHECK(ta_close_group(s, r, 0));
    return PW_OK;
fail:
    return ta_oom();
}

/* One worker's "rebalance" event: a new move, or another worker's view of
 * the same one (the longest span, the most bytes). */
static pw_status add_move(pw_trace_analysis *a, const pw_trace_record *rec)
{
    const int64_t step = rec->has & PW_TREC_STEP ? rec->step : 0;
    const int64_t t1 = rec->dur_ns > INT64_MAX - rec->ts_ns ? INT64_MAX : rec->ts_ns + rec->dur_ns;
    for (int i = 0; i < a->n_moves; i++) {
        pw_ta_move *m = &a->moves[i];
        if (m->step != step) continue;
        if (rec->ts_ns < m->t0) m->t0 = rec->ts_ns;
        if (t1 > m->t1) m->t1 = t1;
        if (rec->bytes > m->bytes) m->bytes = rec->bytes;
        return PW_OK;
    }
    pw_ta_move *m = realloc(a->moves, (size_t)(a->n_moves + 1) * sizeof *m);
    if (!m) return ta_oom();
    a->moves = m;
    a->moves[a->n_moves++] = (pw_ta_move){.step = step, .t0 = rec->ts_ns, .t1 = t1,
                                          .bytes = rec->bytes > 0 ? rec->bytes : 0};
    return PW_OK;
}

static int by_move_step(const void *x, const void *y)
{
    return cmp_i64(&((const pw_ta_move *)x)->step, &((const pw_ta_move *)y)->step);
}

/* Median step time of the steps numbered in (from, to]; 0 when none. */
static int64_t median_step_ns(const pw_trace_analysis *a, int64_t from, int64_t to)
{
    int64_t *v = malloc(sizeof *v * (size_t)(a->n_steps + 1)), n = 0;
    if (!v) return 0;
    for (int64_t i = 0; i < a->n_steps; i++)
        if (a->steps[i].step > from && a->steps[i].step <= to) v[n++] = a->steps[i].t1 - a->steps[i].t0;
    qsort(v, (size_t)n, sizeof *v, cmp_i64);
    const int64_t m = n == 0 ? 0 : n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
    free(v);
    return m;
}

/* Each move's step times before and after it. */
static void moves_finish(pw_trace_analysis *a)
{
    if (a->n_moves > 1) qsort(a->moves, (size_t)a->n_moves, sizeof *a->moves, by_move_step);
    for (int i = 0; i < a->n_moves; i++) {
        const int64_t prev = i > 0 ? a->moves[i - 1].step : INT64_MIN;
        const int64_t next = i + 1 < a->n_moves ? a->moves[i + 1].step : INT64_MAX;
        a->moves[i].step_ns_before = median_step_ns(a, prev, a->moves[i].step);
        a->moves[i].step_ns_after = median_step_ns(a, a->moves[i].step, next);
    }
}

pw_status ta_ingest(ta *s, const pw_trace_record *rec)
{
    if (!s->detail) s->a->n_events++;
    if (rec->has & PW_TREC_BAD_ARGS && !s->detail) s->n_bad_args++;
    if (rec->ph == 'M') {
        if (!s->detail && !strcmp(rec->name, "thread_name") && rec->has & PW_TREC_ARG_NAME) {
            int r = rank_lookup(s, rec->pid, rec->tid);
            if (r < 0) return ta_oom();
            char cleaned[sizeof s->ranks[r].label];
            const char *l = clean_name(rec->arg_name, cleaned, sizeof cleaned);
            memcpy(s->ranks[r].label, l, strlen(l) + 1);
            s->ranks[r].has_label = 1;
        }
        return PW_OK;
    }
    if (rec->ph != 'X' && rec->ph != 'B' && rec->ph != 'E') {
        if (!s->detail) s->n_other_ph++;
        return PW_OK;
    }
    if (rec->ph == 'X' && !strcmp(rec->cat, "rebalance")) /* between steps: no part of one */
        return s->detail ? PW_OK : add_move(s->a, rec);
    int r = rank_lookup(s, rec->pid, rec->tid);
    if (r == -2) return PW_OK;
    if (r < 0) return ta_oom();
    ta_rank *rk = &s->ranks[r];
    rk->has_events = 1;
    int64_t step = rec->has & PW_TREC_STEP ? rec->step : 0;
    if (rec->ph == 'B') {
        VEC_PUSH(rk->bstack, rk->n_b, rk->cap_b, fail);
        ta_bopen *b = &rk->bstack[rk->n_b++];
        b->t0 = rec->ts_ns;
        b->off = rec->offset;
        b->line = rec->line;
        b->step = step;
        b->name = intern(s, rec->name);
        if (b->name < 0) return ta_oom();
        b->cls = (int8_t)class_of(s, b->name, rec->name, rec->cat, &b->wk);
        b->stage = rec->stage;
        b->mb = rec->mb;
        b->peer = rec->peer;
        return PW_OK;
    }
    ta_ev e;
    int64_t off0 = rec->offset, line0 = rec->line;
    if (rec->ph == 'E') {
        if (rk->n_b == 0) {
            if (!s->detail) s->n_unmatched_e++;
            return PW_OK;
        }
        ta_bopen *b = &rk->bstack[--rk->n_b];
        e.t0 = b->t0;
        e.t1 = rec->ts_ns >= b->t0 ? rec->ts_ns : b->t0;
        e.name = b->name;
        e.cls = b->cls;
        e.wk = b->wk;
        e.stage = b->stage;
        e.mb = b->mb;
        e.peer = b->peer;
        e.bytes = 0;
        step = b->step;
        off0 = b->off;
        line0 = b->line;
    } else {
        e.t0 = rec->ts_ns;
        if (rec->dur_ns > INT64_MAX - rec->ts_ns) e.t1 = INT64_MAX;
        else e.t1 = rec->ts_ns + rec->dur_ns;
        e.name = intern(s, rec->name);
        if (e.name < 0) return ta_oom();
        e.cls = (int8_t)class_of(s, e.name, rec->name, rec->cat, &e.wk);
        e.stage = rec->stage;
        e.mb = rec->mb;
        e.peer = rec->peer;
        e.bytes = rec->bytes;
    }
    if (!s->detail) {
        s->n_x++;
        if (e.cls == CLS_STEP) s->n_step_events++;
        if (rec->ph == 'X' ? (rec->has & PW_TREC_STEP) : step != 0) s->n_with_step++;
        else s->n_without_step++;
        s->a->n_used++;
        if (rec->ph == 'X' && rec->bytes > 0 && !strcmp(rec->name, "ALLREDUCE")) {
            pw_trace_analysis *a = s->a;
            a->allreduce_n++;
            a->allreduce_bytes += rec->bytes;
            a->allreduce_wire_bytes += rec->has & PW_TREC_WIRE_BYTES ? rec->wire_bytes : rec->bytes;
            if (rec->has & PW_TREC_WIRE_BYTES) a->allreduce_compressed = 1;
        }
        if (e.cls == CLS_TP) {
            s->a->tp_allreduce_n++;
            s->a->tp_allreduce_bytes += rec->ph == 'X' ? rec->bytes : 0;
        }
    }
    return add_event(s, r, &e, step, off0, line0, rec->offset);
fail:
    return ta_oom();
}

/* ------------------------------------------------------------ finish */

static void note(pw_trace_analysis *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(pw_trace_analysis *a, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    char **p = realloc(a->notes, (size_t)(a->n_notes + 1) * sizeof *p);
    if (!p) return;
    a->notes = p;
    if ((a->notes[a->n_notes] = strdup(buf))) a->n_notes++;
}

static int cmp_rec(const void *x, const void *y)
{
    const ta_rec *a = x, *b = y;
    if (a->step != b->step) return a->step < b->step ? -1 : 1;
    return a->rank - b->rank;
}

static int cmp_rank(const void *x, const void *y)
{
    const ta_rank *a = x, *b = y;
    if (a->pid != b->pid) return a->pid < b->pid ? -1 : 1;
    return (a->tid > b->tid) - (a->tid < b->tid);
}

static int cmp_cause(const void *x, const void *y)
{
    const pw_ta_cause *a = x, *b = y;
    if (a->total_ns != b->total_ns) return a->total_ns > b->total_ns ? -1 : 1;
    if (a->rank != b->rank) return a->rank - b->rank;
    if (a->kind != b->kind) return (int)a->kind - (int)b->kind;
    if (a->mb != b->mb) return a->mb - b->mb;
    return strcmp(a->what, b->what);
}


/* Keeps the ranks that have events (and, in a pipewright trace, ranks
 * 0..R-1 of the metadata even without any), ordered by (pid, tid), and
 * renumbers what holds a rank index. Threads a generic trace only names
 * (thread_name metadata) are no ranks. */
static pw_status sort_ranks(ta *s, int meta_ranks)
{
    const size_t R = s->n_ranks;
    ta_rank *sorted = malloc((R ? R : 1) * sizeof *sorted);
    int *map = malloc((R ? R : 1) * sizeof *map);
    if (!sorted || !map) {
        free(sorted);
        free(map);
        return ta_oom();
    }
    size_t kept = 0;
    for (size_t i = 0; i < R; i++) {
        ta_rank *k = &s->ranks[i];
        k->new_index = (int)i; /* the old index, for now */
        map[i] = -1;
        if (k->has_events || (s->a->has_meta && k->pid == 0 && k->tid >= 0 && k->tid < meta_ranks)) {
            sorted[kept++] = *k;
        } else {
            free(k->bstack);
            free(k->open);
        }
    }
    ta_sort_n(sorted, kept, sizeof *sorted, cmp_rank);
    for (size_t i = 0; i < kept; i++) map[sorted[i].new_index] = (int)i;
    ta_copy_n(s->ranks, sorted, kept * sizeof *sorted);
    s->n_ranks = kept;
    for (size_t i = 0; i < kept; i++) s->ranks[i].new_index = (int)i;
    for (size_t i = 0; i < s->n_recs; i++) s->recs[i].rank = map[s->recs[i].rank];
    for (size_t i = 0; i < s->n_causes; i++) {
        s->causes[i].rank = map[s->causes[i].rank];
        s->cause_keys[i].rank = s->causes[i].rank;
    }
    free(sorted);
    free(map);
    /* Both hashes are keyed by index: rebuild them (lazily for causes). */
    free(s->cause_ht);
    s->cause_ht = NULL;
    s->cause_ht_cap = 0;
    free(s->rank_ht);
    s->rank_ht = NULL;
    s->rank_ht_cap = 0;
    s->last_rank = -1;
    for (size_t i = 0; i < kept; i++)
        if (rank_lookup(s, s->ranks[i].pid, s->ranks[i].tid) < 0) return ta_oom();
    return PW_OK;
}

static int cmp_step_dur(const void *x, const void *y)
{
    const pw_ta_step *a = *(pw_ta_step *const *)x, *b = *(pw_ta_step *const *)y;
    int64_t da = a->t1 - a->t0, db = b->t1 - b->t0;
    if (da != db) return da < db ? -1 : 1;
    return (a->step > b->step) - (a->step < b->step);
}

/* Longest first, then the earliest step. */
static int cmp_step_longest(const void *x, const void *y)
{
    const pw_ta_step *a = *(pw_ta_step *const *)x, *b = *(pw_ta_step *const *)y;
    int64_t da = a->t1 - a->t0, db = b->t1 - b->t0;
    if (da != db) return da > db ? -1 : 1;
    return (a->step > b->step) - (a->step < b->step);
}

/* The first-order bubble model and the explanation of measured vs theory. */
static void explain(ta *s)
{
    pw_trace_analysis *a = s->a;
    const int R = a->n_ranks;
    char *ex = a->explanation;
    size_t cap = sizeof a->explanation, len = 0;
#define EX(...)                                                                        \
    do {                                                                               \
        if (len < cap) {                                                               \
            int _k = snprintf(ex + len, cap - len, __VA_ARGS__);                       \
            if (_k > 0) len += (size_t)_k;                                             \
        }                                                                              \
    } while (0)
    a->model_bubble = a->model_bubble_optim = -1;
    a->slow_rank = a->fast_rank = -1;
    if (a->bubble < 0) {
        EX("no steps to measure");
        return;
    }
    /* The model: each rank spends tf per micro-batch forward and tb backward
     * (B + W); a stage that is slower sets the pace of the steady state. */
    const int m = a->micro_batches;
    const char *sched = a->has_meta ? a->meta.schedule : "";
    /* The schedule room says which kinds have a stage-time model, and of
     * which shape; a name that is no kind has none. */
    pw_schedule_kind kind;
    pw_schedule_model model = PW_SCHEDULE_MODEL_NONE;
    if (pw_schedule_kind_parse(sched, &kind) == PW_OK) model = pw_schedule_kind_model(kind);
    else pw_clear_error();
    const int gpipe = model == PW_SCHEDULE_MODEL_FILL_DRAIN;
    const int known = model != PW_SCHEDULE_MODEL_NONE;
    int model_ok = known && a->meta.stages == R && R >= 1 && m >= 1 && a->n_analysed > 0;
    double sum_t = 0, max_t = 0, sum_f = 0, max_f = 0, sum_b = 0, max_b = 0, sum_o = 0, max_o = 0;
    double min_t = INFINITY, min_f = INFINITY, min_b = INFINITY;
    int slow_f = -1, fast_f = -1, slow_b = -1, fast_b = -1;
    for (int r = 0; model_ok && r < R; r++) {
        const pw_ta_times *t = &a->ranks[r].total;
        if (t->n_actions[0] == 0 || t->n_actions[1] + t->n_actions[2] == 0) {
            model_ok = 0;
            break;
        }
        double tf = (double)t->busy[PW_TA_F] / (double)t->n_actions[0];
        double nb = (double)(t->n_actions[1] ? t->n_actions[1] : t->n_actions[2]);
        double tb = (double)(t->busy[PW_TA_B] + t->busy[PW_TA_W]) / nb;
        double o = (double)t->busy[PW_TA_OPTIM] / (double)a->n_analysed;
        a->ranks[r].compute_per_mb_ns = tf + tb;
        sum_f += tf;
        sum_b += tb;
        sum_t += tf + tb;
        sum_o += o;
        if (tf > max_f) {
            max_f = tf;
            slow_f = r;
        }
        if (tb > max_b) {
            max_b = tb;
            slow_b = r;
        }
        if (tf < min_f) {
            min_f = tf;
            fast_f = r;
        }
        if (tb < min_b) {
            min_b = tb;
            fast_b = r;
        }
        if (o > max_o) max_o = o;
        if (tf + tb > max_t) {
            max_t = tf + tb;
            a->slow_rank = r;
        }
        if (tf + tb < min_t) {
            min_t = tf + tb;
            a->fast_rank = r;
        }
    }
    double T = a->theory;
    if (model_ok && max_t > 0) {
        double w0 = gpipe ? sum_f + (m - 1) * max_f + sum_b + (m - 1) * max_b : sum_t + (m - 1) * max_t;
        double w1 = w0 + max_o;
        a->model_bubble = 1.0 - m * sum_t / (R * w0);
        a->model_bubble_optim = 1.0 - (m * sum_t + sum_o) / (R * w1);
        a->imbalance_ratio = min_t > 0 ? max_t / min_t : 0;
    }
    const double X = a->bubble;
    a->points_comm_actions = a->total.window > 0 ? 100.0 * (double)a->total.busy[PW_TA_COMM] / (double)a->total.window : 0;
    if (T >= 0) EX("measured %.1f%% vs theory %.1f%%: %+.1f points", 100 * X, 100 * T, 100 * (X - T));
    else if (!a->has_meta) EX("measured %.1f%%; no theory and no stage model without pipewright metadata", 100 * X);
    else EX("measured %.1f%%; no theory for this schedule", 100 * X);
    if (a->model_bubble < 0) {
        if (!a->has_meta) return;
        else if (!known) EX(" (the stage-time model covers GPipe and 1F1B, not '%s')", sched);
        else EX(" (stage-time model unavailable: needs F and B events on every rank of one replica)");
        return;
    }
    a->points_optimizer = 100 * (a->model_bubble_optim - a->model_bubble);
    a->points_overhead = 100 * (X - a->model_bubble_optim);
    if (T >= 0) {
        a->points_imbalance = 100 * (a->model_bubble - T);
        EX(" = imbalance %+.1f", a->points_imbalance);
    } else {
        a->points_imbalance = 0;
        EX("; the stage-time model predicts %.1f%% from", 100 * a->model_bubble);
    }
    const double ratio = a->imbalance_ratio;
    const double rf = min_f > 0 ? max_f / min_f : 0, rb = min_b > 0 ? max_b / min_b : 0;
    if (gpipe && (rf >= 1.05 || rb >= 1.05)) {
        /* GPipe's forward and backward phases are each paced by their own
         * slowest stage, so the two imbalances add up. */
        EX(" (F: rank %d takes %.2fx as long as rank %d; B: rank %d takes %.2fx as long as rank %d)",
           slow_f, rf, fast_f, slow_b, rb, fast_b);
    } else if (ratio >= 1.05) {
        EX(" (rank %d computes %.2fx as long per micro-batch as rank %d: %.3f vs %.3f ms)",
           a->slow_rank, ratio, a->fast_rank, max_t / 1e6, min_t / 1e6);
    } else {
        EX(" (stages balanced: slowest/fastest %.2fx)", ratio);
    }
    EX(" + optimizer %+.1f + communication and scheduling %+.1f (send/recv actions %.1f, waits and gaps "
       "beyond the stage-time model %+.1f)",
       a->points_optimizer, a->points_overhead, a->points_comm_actions,
       a->points_overhead - a->points_comm_actions);
#undef EX
}

static pw_status check_overflow(const ta *s)
{
    if (!s->overflow) return PW_OK;
    return pw_error(PW_ERR_PARSE, "%s: the steps' times add up past 2^63 ns (292 years of rank time): "
                    "\"ts\"/\"dur\" values too far apart to analyse", s->a->file);
}

static pw_status finish(ta *s)
{
    pw_trace_analysis *a = s->a;
    /* Close everything still open. */
    for (size_t r = 0; r < s->n_ranks; r++) {
        s->n_unclosed_b += (int64_t)s->ranks[r].n_b;
        s->ranks[r].n_b = 0;
        while (s->ranks[r].n_open) PW_CHECK(ta_close_group(s, (int)r, 0));
    }
    /* A pipewright trace has ranks 0..R-1 even when one never recorded. The
     * count comes from the file: memory (a rank per step in each loop below)
     * must follow the events, so at most 64 more ranks than events. */
    int meta_ranks = a->has_meta ? a->meta.ranks : 0;
    if (meta_ranks > a->n_events + 64) {
        note(a, "the metadata says %d ranks but the trace has %" PRId64 " events: only ranks 0-%" PRId64
             " without events are counted", meta_ranks, a->n_events, a->n_events + 63);
        meta_ranks = (int)(a->n_events + 64);
    }
    for (int r = 0; r < meta_ranks; r++)
        if (rank_lookup(s, 0, r) == -1) return ta_oom();
    PW_CHECK(sort_ranks(s, meta_ranks));
    const int R = (int)s->n_ranks;
    a->n_ranks = R;
    a->ranks = calloc(R ? (size_t)R : 1, sizeof *a->ranks);
    if (!a->ranks) return ta_oom();
    for (int r = 0; r < R; r++) {
        pw_ta_rank *o = &a->ranks[r];
        o->pid = s->ranks[r].pid;
        o->tid = s->ranks[r].tid;
        if (a->has_meta && o->pid == 0) snprintf(o->label, sizeof o->label, "rank %" PRId64, o->tid);
        else if (s->ranks[r].has_label) snprintf(o->label, sizeof o->label, "%s", s->ranks[r].label);
        else snprintf(o->label, sizeof o->label, "pid %" PRId64 " tid %" PRId64, o->pid, o->tid);
    }

    /* Steps: windows first (every rank's span), then each rank's idle
     * outside its own span, the edge gaps' causes and the step's bubble. */
    ta_sort_n(s->recs, s->n_recs, sizeof *s->recs, cmp_rec);
    int64_t n_steps = 0;
    for (size_t i = 0; i < s->n_recs; i++)
        if (i == 0 || s->recs[i].step != s->recs[i - 1].step) n_steps++;
    a->steps = calloc(n_steps ? (size_t)n_steps : 1, sizeof *a->steps);
    if (!a->steps) return ta_oom();
    a->n_steps = n_steps;
    /* The per-(rank, step) table has ranks x steps entries; a sparse trace
     * (many ranks and many steps, few events in each) would make it
     * quadratic in the events, so it is kept only while it is not much
     * larger than the (rank, step) pairs that have events. */
    int per_step = s->cfg->per_step;
    if (per_step && (uint64_t)R * (uint64_t)n_steps > 16 * (uint64_t)s->n_recs + 4096) {
        per_step = 0;
        note(a, "the per-(rank, step) table is left out: %d ranks x %" PRId64 " steps, but only %zu of those "
             "pairs have events", R, n_steps, s->n_recs);
    }
    int64_t k = -1;
    for (size_t i = 0; i < s->n_recs; i++) {
        const ta_rec *rc = &s->recs[i];
        if (i == 0 || rc->step != s->recs[i - 1].step) {
            pw_ta_step *sp = &a->steps[++k];
            sp->step = rc->step;
            sp->t0 = INT64_MAX;
            sp->t1 = INT64_MIN;
            sp->analysed = !step_skipped(s, rc->step);
            if (per_step && !(sp->ranks = calloc((size_t)R, sizeof(pw_ta_rank_step)))) return ta_oom();
        }
        pw_ta_step *sp = &a->steps[k];
        if (rc->t0 < sp->t0) sp->t0 = rc->t0;
        if (rc->t1 > sp->t1) {
            sp->t1 = rc->t1;
            sp->last_rank = rc->rank;
        }
    }
    /* Each step's ranks with events (its records, by rank); a rank's idle in
     * the steps where it has none is what is left of the summed windows
     * once its present steps are taken out, so the work follows the records,
     * not ranks x steps. */
    pw_ta_step **by_w = NULL;
    int64_t *present_w = calloc(R ? (size_t)R : 1, sizeof *present_w); /* sum of W, analysed present steps, W > 0 */
    int64_t *present_n = calloc(R ? (size_t)R : 1, sizeof *present_n); /* their count */
    if (!present_w || !present_n) {
        free(present_w);
        free(present_n);
        return ta_oom();
    }
    int64_t sum_w = 0, n_pos = 0; /* analysed steps with W > 0 */
    size_t ri = 0;
    for (int64_t si = 0; si < n_steps; si++) {
        pw_ta_step *sp = &a->steps[si];
        const int64_t W = sp->t1 - sp->t0;
        int64_t compute = 0;
        if (sp->analysed && W > 0) {
            acc(s, &sum_w, W);
            n_pos++;
        }
        for (; ri < s->n_recs && s->recs[ri].step == sp->step; ri++) {
            const ta_rec *rc = &s->recs[ri];
            const int r = rc->rank;
            pw_ta_times *tot = &s->ranks[r].total;
            const int64_t head = rc->t0 - sp->t0, tail = sp->t1 - rc->t1;
            acc(s, &compute, rc->compute);
            if (sp->analysed) {
                if (W > 0) {
                    acc(s, &present_w[r], W);
                    present_n[r]++;
                }
                acc(s, &tot->idle_phase[PW_TA_WARMUP], head);
                acc(s, &tot->idle_phase[rc->tail_phase], tail);
                ta_cause_key kh = {r, PW_CAUSE_NOT_STARTED, -1, -1, -1, -1};
                int64_t ph[PW_TA_N_PHASES] = {head + rc->head_ns, 0, 0};
                if (!cause_add(s, kh, ph, head + rc->head_ns, sp->step, 1)) goto nomem;
                ta_cause_key kt = {r, PW_CAUSE_DONE, -1, -1, -1, -1};
                int64_t pt[PW_TA_N_PHASES] = {0, 0, 0};
                pt[rc->tail_phase] = tail + rc->tail_ns;
                if (!cause_add(s, kt, pt, tail + rc->tail_ns, sp->step, 1)) goto nomem;
            }
            if (sp->ranks) {
                pw_ta_rank_step *rs = &sp->ranks[r];
                rs->present = 1;
                rs->t0 = rc->t0;
                rs->t1 = rc->t1;
                rs->t = s->full[rc->full];
                rs->t.window = W;
                rs->t.idle_phase[PW_TA_WARMUP] += head;
                rs->t.idle_phase[rc->tail_phase] += tail;
                rs->t.idle = W - rs->t.compute - rs->t.busy[PW_TA_COMM];
            }
        }
        if (sp->ranks) /* the table is small enough to visit whole */
            for (int r = 0; r < R; r++) {
                pw_ta_times *t = &sp->ranks[r].t;
                if (!sp->ranks[r].present) t->window = t->idle = t->idle_phase[PW_TA_WARMUP] = W;
            }
        sp->bubble = W > 0 && R > 0 ? 1.0 - (double)compute / ((double)R * (double)W) : 0;
    }
    int64_t n_absent = (int64_t)R * n_steps - (int64_t)s->n_recs;
    /* Every rank spans every analysed window; where it has no events the
     * window is warm-up idle with cause ABSENT, one gap per such step. */
    for (int r = 0; r < R; r++) {
        pw_ta_times *tot = &s->ranks[r].total;
        acc(s, &tot->window, sum_w);
        const int64_t absent_w = sum_w - present_w[r], absent_n = n_pos - present_n[r];
        if (absent_n <= 0) continue;
        acc(s, &tot->idle_phase[PW_TA_WARMUP], absent_w);
        if (!by_w) {
            /* Analysed steps, longest first (earliest on ties): a rank's
             * longest absent step is the first one it has no record in. */
            by_w = malloc((size_t)n_pos * sizeof *by_w);
            if (!by_w) goto nomem;
            int64_t j = 0;
            for (int64_t si = 0; si < n_steps; si++)
                if (a->steps[si].analysed && a->steps[si].t1 > a->steps[si].t0) by_w[j++] = &a->steps[si];
            ta_sort_n(by_w, (size_t)n_pos, sizeof *by_w, cmp_step_longest);
        }
        const pw_ta_step *longest = NULL;
        for (int64_t j = 0; j < n_pos && !longest; j++) {
            ta_rec key = {.step = by_w[j]->step, .rank = r};
            if (!bsearch(&key, s->recs, s->n_recs, sizeof *s->recs, cmp_rec)) longest = by_w[j];
        }
        PW_ASSERT(longest); /* absent_n > 0 */
        ta_cause_key key = {r, PW_CAUSE_ABSENT, -1, -1, -1, -1};
        pw_ta_cause *c = cause_get(s, key);
        if (!c) goto nomem;
        c->total_ns = absent_w;
        c->phase_ns[PW_TA_WARMUP] = absent_w;
        c->n_gaps = absent_n;
        c->max_ns = longest->t1 - longest->t0;
        c->max_step = longest->step;
    }
    free(by_w);
    free(present_w);
    free(present_n);
    free(s->full);
    s->full = NULL;
    s->n_full = s->cap_full = 0;
    PW_CHECK(check_overflow(s));

    /* Totals over analysed steps. */
    for (int r = 0; r < R; r++) {
        pw_ta_times *t = &s->ranks[r].total;
        t->idle = t->window - t->compute - t->busy[PW_TA_COMM];
        a->ranks[r].total = *t;
        times_add(s, &a->total, t);
        a->ranks[r].bubble = t->window > 0 ? 1.0 - (double)t->compute / (double)t->window : 0;
    }
    a->bubble = a->total.window > 0 ? 1.0 - (double)a->total.compute / (double)a->total.window : -1;
    pw_ta_step **by_dur = malloc((n_steps ? (size_t)n_steps : 1) * sizeof *by_dur);
    if (!by_dur) return ta_oom();
    int64_t na = 0, sum = 0;
    for (int64_t si = 0; si < n_steps; si++) {
        pw_ta_step *sp = &a->steps[si];
        if (!sp->analysed) continue;
        by_dur[na++] = sp;
        acc(s, &sum, sp->t1 - sp->t0);
    }
    a->n_analysed = na;
    if (check_overflow(s) != PW_OK) {
        free(by_dur);
        return PW_ERR_PARSE;
    }
    a->median_step = -1;
    if (na > 0) {
        ta_sort_n(by_dur, (size_t)na, sizeof *by_dur, cmp_step_dur);
        const pw_ta_step *med = by_dur[(na - 1) / 2];
        a->median_step = med->step;
        a->step_ns_median = med->t1 - med->t0;
        a->step_ns_min = by_dur[0]->t1 - by_dur[0]->t0;
        a->step_ns_max = by_dur[na - 1]->t1 - by_dur[na - 1]->t0;
        a->step_ns_mean = sum / na;
    }
    free(by_dur);

    /* Micro-batches per step: the metadata's, else the most F any rank ran. */
    a->micro_batches = a->has_meta ? a->meta.micro_batches : 0;
    if (a->micro_batches <= 0) a->micro_batches = s->max_f < INT32_MAX ? (int)s->max_f : INT32_MAX;

    /* Theory. */
    a->theory = -1;
    a->theory_source = "none";
    if (a->has_meta && a->meta.theory_bubble >= 0) {
        a->theory = a->meta.theory_bubble;
        a->theory_source = "metadata";
    } else if (a->has_meta) {
        double th = pw_schedule_named_bubble(a->meta.schedule, a->meta.stages, a->micro_batches);
        if (th >= 0 && th < 1) {
            a->theory = th;
            a->theory_source = "formula";
        }
    }

    /* Causes, largest first. */
    ta_sort_n(s->causes, s->n_causes, sizeof *s->causes, cmp_cause);
    free(s->cause_ht);
    s->cause_ht = NULL;
    s->cause_ht_cap = 0;
    size_t nc = 0;
    for (size_t i = 0; i < s->n_causes; i++)
        if (s->causes[i].total_ns > 0) s->causes[nc++] = s->causes[i];
    a->causes = s->causes;
    a->n_causes = (int)nc;
    s->causes = NULL;
    s->n_causes = s->cap_causes = 0;

    explain(s);

    /* What could not be computed. */
    if (!a->has_meta)
        note(a, "no pipewright metadata: schedule theory and attribution by stage unavailable");
    if (a->has_meta && a->theory < 0)
        note(a, "no theoretical bubble for schedule '%s'", a->meta.schedule);
    if (a->has_meta && a->meta.dropped_events > 0)
        note(a, "the writer dropped %" PRId64 " events (trace buffers full): the last steps are incomplete",
             a->meta.dropped_events);
    if (s->n_x == 0) note(a, "no complete (\"X\") or begin/end events: nothing to analyse");
    if (s->n_x > 0 && s->n_with_step == 0)
        note(a, "events carry no args.step: the whole trace is analysed as one step (step 0)");
    else if (s->n_without_step > 0)
        note(a, "%" PRId64 " events carry no args.step: analysed as step 0", s->n_without_step);
    if (s->n_x > 0 && s->n_step_events == 0)
        note(a, "no \"step\" events: each rank's step spans its first to its last event");
    if (s->n_late > 0)
        note(a, "%" PRId64 " events came after their rank had moved two steps on and were ignored "
             "(events out of step order)", s->n_late);
    if (s->n_bad_args > 0)
        note(a, "%" PRId64 " events had args.step/stage/mb/peer/bytes of the wrong type (ignored)", s->n_bad_args);
    if (s->n_other_ph > 0)
        note(a, "%" PRId64 " events of other phases (instant, counter, flow, ...) ignored", s->n_other_ph);
    if (s->n_unmatched_e > 0) note(a, "%" PRId64 " \"E\" events without a \"B\" ignored", s->n_unmatched_e);
    if (s->n_unclosed_b > 0) note(a, "%" PRId64 " \"B\" events never ended ignored", s->n_unclosed_b);
    if (n_absent > 0) note(a, "%" PRId64 " (rank, step) pairs have no events: counted as idle", n_absent);
    if (a->has_meta && R > a->meta.ranks)
        note(a, "the trace has %d threads but the metadata says %d ranks", R, a->meta.ranks);
    if (a->has_meta && a->meta.replicas > 1)
        note(a, "%d replicas: the theory is per pipeline; exposed all-reduce is measured per rank",
             a->meta.replicas);
    if (*pw_trace_reader_note(s->rd)) note(a, "%s", pw_trace_reader_note(s->rd));
    return PW_OK;
nomem:
    free(by_w);
    free(present_w);
    free(present_n);
    return ta_oom();
}

/* ------------------------------------------------------------ entry points */

static void ta_free(ta *s)
{
    for (size_t i = 0; i < s->n_ranks; i++) {
        for (size_t j = 0; j < s->ranks[i].n_open; j++) group_free(&s->ranks[i].open[j]);
        free(s->ranks[i].open);
        free(s->ranks[i].bstack);
    }
    free(s->ranks);
    free(s->rank_ht);
    free(s->recs);
    free(s->full);
    free(s->causes);
    free(s->cause_keys);
    free(s->cause_ht);
    free(s->skip);
    free(s->bounds);
    free(s->active);
    free(s->order);
    free(s->keys);
    free(s->name_cls);
    free(s->name_wk);
    free(s->name_ht);
    if (s->drank) {
        for (size_t r = 0; r < s->n_ranks; r++) {
            free(s->drank[r].ev);
            free(s->drank[r].seg);
            free(s->drank[r].gap);
        }
        free(s->drank);
    }
    /* names belong to the analysis (priv) */
}

/* What the library keeps beside an analysis's public fields: every
 * pw_trace_analysis is the head of one of these (handed out by pointer
 * only). */
typedef struct ta_priv {
    pw_trace_analysis pub;      /* first: a pw_trace_analysis * points here */
    char **names;               /* the interned names the figures point at */
    size_t n_names;
} ta_priv;

static pw_status copy_meta(pw_trace_analysis *a, const pw_trace_info *in)
{
    a->meta = *in;
    a->meta.schedule = strdup(in->schedule ? in->schedule : "");
    a->meta.graph = strdup(in->graph ? in->graph : "");
    a->meta.peak_inflight = NULL;
    a->meta.measured_peak = NULL;
    a->meta.costs = NULL;
    if (!a->meta.schedule || !a->meta.graph) return ta_oom();
#define DUP(field, count)                                                              \
    if (in->field && in->count > 0) {                                                  \
        a->meta.field = malloc((size_t)in->count * sizeof *in->field);                 \
        if (!a->meta.field) return ta_oom();                                              \
        memcpy(a->meta.field, in->field, (size_t)in->count * sizeof *in->field);       \
    } else {                                                                           \
        a->meta.count = 0;                                                             \
    }
    DUP(peak_inflight, n_peak_inflight)
    DUP(measured_peak, n_measured_peak)
    DUP(costs, n_costs)
#undef DUP
    return PW_OK;
}

pw_status pw_trace_analyze_reader(pw_trace_reader *rd, const pw_trace_analysis_config *cfg,
                                  pw_trace_analysis **out)
{
    *out = NULL;
    pw_trace_analysis_config def = PW_TRACE_ANALYSIS_DEFAULTS;
    if (!cfg) cfg = &def;
    if (cfg->skip_steps < 0) return pw_error(PW_ERR_INVALID_ARG, "skip_steps must be >= 0 (got %d)", cfg->skip_steps);
    ta s;
    memset(&s, 0, sizeof s);
    s.cfg = cfg;
    s.rd = rd;
    s.last_rank = -1;
    s.id_other = -1;
    ta_priv *priv = calloc(1, sizeof *priv);
    pw_status st = PW_OK;
    if (!priv) return ta_oom();
    pw_trace_analysis *a = &priv->pub;
    a->detail.step = -1;
    a->bubble = a->theory = a->model_bubble = a->model_bubble_optim = -1;
    a->slow_rank = a->fast_rank = -1;
    a->median_step = -1;
    a->theory_source = "none";
    s.a = a;
    a->file = strdup(pw_trace_reader_name(rd));
    if (!a->file) {
        st = ta_oom();
        goto fail;
    }
    if ((s.id_other = intern(&s, "(other)")) < 0 || (s.id_step = intern(&s, "step")) < 0) {
        st = ta_oom();
        goto fail;
    }
    for (int i = 0; cfg->notes && i < cfg->n_notes; i++)
        if (cfg->notes[i]) note(a, "%s", cfg->notes[i]);
    pw_trace_record rec;
    int more = 1;
    for (;;) {
        PW_CHECK_GOTO(pw_trace_reader_next(rd, &rec, &more), st, fail);
        if (!more) break;
        PW_CHECK_GOTO(ta_ingest(&s, &rec), st, fail);
    }
    const pw_trace_info *info = pw_trace_reader_info(rd);
    a->has_meta = info->present;
    PW_CHECK_GOTO(copy_meta(a, info), st, fail);
    if (info->present && info->has_clock && info->world_size > 1)
        note(a, "one process's trace of a %d-process run (MPI rank %d): the other ranks' events are in their own "
             "files (pipe-trace RUN.rank*.json analyses them as one run)", info->world_size, info->world_rank);
    PW_CHECK_GOTO(finish(&s), st, fail);
    moves_finish(a);
    if (!cfg->no_detail) PW_CHECK_GOTO(ta_detail_pass(&s), st, fail);
    priv->names = s.names;
    priv->n_names = s.n_names;
    s.names = NULL;
    ta_free(&s);
    *out = a;
    return PW_OK;
fail:
    priv->names = s.names;
    priv->n_names = s.n_names;
    ta_free(&s);
    pw_trace_analysis_destroy(a);
    return st;
}

pw_status pw_trace_analyze(const char *path, const pw_trace_analysis_config *cfg, pw_trace_analysis **out)
{
    *out = NULL;
    pw_trace_reader *rd;
    PW_CHECK(pw_trace_reader_open(path, &rd));
    pw_status st = pw_trace_analyze_reader(rd, cfg, out);
    pw_trace_reader_close(rd);
    return st;
}

void pw_trace_analysis_destroy(pw_trace_analysis *a)
{
    if (!a) return;
    ta_priv *priv = (ta_priv *)a;
    for (size_t i = 0; i < priv->n_names; i++) free(priv->names[i]);
    free(priv->names);
    free(a->file);
    free(a->moves);
    free(a->meta.schedule);
    free(a->meta.graph);
    free(a->meta.peak_inflight);
    free(a->meta.measured_peak);
    free(a->meta.costs);
    for (int i = 0; i < a->n_notes; i++) free(a->notes[i]);
    free(a->notes);
    free(a->ranks);
    for (int64_t i = 0; i < a->n_steps; i++) free(a->steps[i].ranks);
    free(a->steps);
    free(a->causes);
    pw_ta_detail *d = &a->detail;
    free(d->events);
    if (d->segments)
        for (int r = 0; r < a->n_ranks; r++) free(d->segments[r]);
    free(d->segments);
    free(d->n_segments);
    free(d->gaps);
    free(d->path);
    free(a);
}

/* ------------------------------------------------------------ names */

const char *pw_ta_class_name(pw_ta_class c)
{
    static const char *n[] = {"F", "B", "W", "optimizer", "other", "comm", "wait", "idle"};
    return (unsigned)c < PW_TA_CLASS_COUNT ? n[c] : "?";
}

const char *pw_ta_phase_name(int phase)
{
    static const char *n[] = {"warm-up", "steady", "cool-down"};
    return phase >= 0 && phase < PW_TA_N_PHASES ? n[phase] : "-";
}

static int fmt_wait(char *buf, size_t n, const char *what, int stage, int mb, int peer)
{
    char st[32] = "", m[32] = "", p[32] = "";
    if (mb >= 0) snprintf(m, sizeof m, " mb %d", mb);
    if (stage >= 0) snprintf(st, sizeof st, " (stage %d)", stage);
    if (peer >= 0) snprintf(p, sizeof p, " from rank %d", peer);
    return snprintf(buf, n, "%s%s%s%s", what, m, st, p);
}

int pw_ta_cause_format(const pw_ta_cause *c, char *buf, size_t n)
{
    switch (c->kind) {
    case PW_CAUSE_WAIT: return fmt_wait(buf, n, c->what, c->stage, c->mb, c->peer);
    case PW_CAUSE_UNTRACKED:
        return *c->what ? snprintf(buf, n, "untracked gap before %s", c->what)
                        : snprintf(buf, n, "untracked gap");
    case PW_CAUSE_NOT_STARTED: return snprintf(buf, n, "before the rank's first action");
    case PW_CAUSE_DONE: return snprintf(buf, n, "done: the step ends with a slower rank");
    case PW_CAUSE_ABSENT: return snprintf(buf, n, "no events for this rank in the step");
    }
    return snprintf(buf, n, "?");
}

int pw_ta_gap_format(const pw_trace_analysis *a, const pw_ta_gap *g, char *buf, size_t n)
{
    const pw_ta_event *e = g->event >= 0 && g->event < a->detail.n_events ? &a->detail.events[g->event] : NULL;
    switch (g->kind) {
    case PW_CAUSE_WAIT:
        if (e) return fmt_wait(buf, n, e->name, e->stage, e->mb, e->peer);
        return snprintf(buf, n, "wait");
    case PW_CAUSE_UNTRACKED:
        if (e && e->mb >= 0) return snprintf(buf, n, "untracked gap before %s mb %d", e->name, e->mb);
        if (e) return snprintf(buf, n, "untracked gap before %s", e->name);
        return snprintf(buf, n, "untracked gap");
    case PW_CAUSE_NOT_STARTED: return snprintf(buf, n, "before the rank's first action");
    case PW_CAUSE_DONE:
        if (g->peer >= 0 && g->peer < a->n_ranks)
            return snprintf(buf, n, "done: the step ends when %s finishes", a->ranks[g->peer].label);
        return snprintf(buf, n, "done: the step ends with a slower rank");
    case PW_CAUSE_ABSENT: return snprintf(buf, n, "no events for this rank in the step");
    }
    return snprintf(buf, n, "?");
}
