/* pipewright — trace analysis, pass 2: the detail step. Seeks back to the
 * chosen step's events, sweeps them again over the whole step window keeping
 * segments and gaps, then walks the critical path backwards from the step's
 * last event. Pass 1 and the definitions: trace_analysis.c / .h.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "scheduler/analysis/trace_analysis_int.h"

/* ------------------------------------------------------------ critical path */

/* Latest event of rank r ending at or before `t` (skipping `not`), or -1.
 * `first`/`count` delimit the rank's events (sorted by start). */
static int latest_before(const pw_ta_event *ev, int first, int count, int64_t t, const unsigned char *seen)
{
    int lo = first, hi = first + count; /* first index with t0 > t */
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (ev[mid].t0 <= t) lo = mid + 1;
        else hi = mid;
    }
    int best = -1;
    for (int i = lo - 1, scanned = 0; i >= first && scanned < 4096; i--, scanned++) {
        if (seen[i] || ev[i].t1 > t) continue;
        if (best < 0 || ev[i].t1 > ev[best].t1) best = i;
        if (best >= 0 && ev[i].t1 < ev[best].t0) break; /* nothing later can end after best */
    }
    return best;
}

static pw_status critical_path(ta *s)
{
    pw_ta_detail *d = &s->a->detail;
    const int R = s->a->n_ranks;
    if (d->n_events == 0) return PW_OK;
    int *first = calloc((size_t)R + 1, sizeof *first);
    unsigned char *seen = calloc((size_t)d->n_events, 1);
    size_t cap = 64, n = 0;
    pw_ta_path_item *it = malloc(cap * sizeof *it);
    if (!first || !seen || !it) {
        free(first);
        free(seen);
        free(it);
        return ta_oom();
    }
    for (int i = 0; i < d->n_events; i++) first[d->events[i].rank + 1]++;
    for (int r = 0; r < R; r++) first[r + 1] += first[r];
#define PUSH_ITEM(k, rk, fr, e, a0, a1)                                                \
    do {                                                                               \
        if (n == cap) {                                                                \
            pw_ta_path_item *_p = realloc(it, 2 * cap * sizeof *it);                   \
            if (!_p) goto nomem;                                                       \
            it = _p;                                                                   \
            cap *= 2;                                                                  \
        }                                                                              \
        it[n++] = (pw_ta_path_item){(k), (rk), (fr), (e), (a0), (a1)};                 \
    } while (0)
    /* Start from the action that ends last. */
    int cur = -1;
    for (int i = 0; i < d->n_events; i++) {
        if (d->events[i].cls == PW_TA_WAIT) continue;
        if (cur < 0 || d->events[i].t1 > d->events[cur].t1) cur = i;
    }
    int64_t frontier = d->t1;
    if (cur >= 0 && d->events[cur].t1 < frontier) {
        PUSH_ITEM(PW_PATH_GAP, d->events[cur].rank, -1, -1, d->events[cur].t1, frontier);
        frontier = d->events[cur].t1;
    }
    for (int guard = 0; cur >= 0 && guard <= d->n_events; guard++) {
        const pw_ta_event *e = &d->events[cur];
        seen[cur] = 1;
        int64_t a1 = e->t1 < frontier ? e->t1 : frontier, a0 = e->t0 < a1 ? e->t0 : a1;
        PUSH_ITEM(PW_PATH_ACTION, e->rank, -1, cur, a0, a1);
        frontier = a0;
        const int r = e->rank;
        int pred = latest_before(d->events, first[r], first[r + 1] - first[r], frontier, seen);
        /* Across a wait for a message: jump to the sender. */
        while (pred >= 0 && d->events[pred].cls == PW_TA_WAIT) {
            const pw_ta_event *w = &d->events[pred];
            seen[pred] = 1;
            int p = w->peer, prod = -1;
            if (p >= 0 && p < R && p != r) {
                int want_dir = strstr(w->name, "RECV_F") ? 'F' : strstr(w->name, "RECV_B") ? 'B' : 0;
                for (int i = first[p]; i < first[p + 1]; i++) {
                    const pw_ta_event *q = &d->events[i];
                    if (seen[i] || q->t1 > w->t1 || q->cls == PW_TA_WAIT) continue;
                    int match = 0;
                    if (want_dir && q->mb == w->mb && !strncmp(q->name, "SEND_", 5) && q->name[5] == want_dir)
                        match = 2;
                    else if (want_dir && q->mb == w->mb && q->name[0] == want_dir && !q->name[1])
                        match = 1;
                    if (match && (prod < 0 || match > 1 || q->t1 > d->events[prod].t1)) {
                        prod = i;
                        if (match == 2) break;
                    }
                }
                if (prod < 0) prod = latest_before(d->events, first[p], first[p + 1] - first[p], w->t1, seen);
            }
            if (prod < 0) {
                /* A wait on nothing we can see (data, all-reduce): it is on the path. */
                int64_t b1 = w->t1 < frontier ? w->t1 : frontier, b0 = w->t0 < b1 ? w->t0 : b1;
                PUSH_ITEM(PW_PATH_ACTION, r, -1, pred, b0, b1);
                frontier = b0;
                pred = latest_before(d->events, first[r], first[r + 1] - first[r], frontier, seen);
                continue;
            }
            int64_t h0 = d->events[prod].t1 < frontier ? d->events[prod].t1 : frontier;
            PUSH_ITEM(PW_PATH_HANDOFF, r, p, pred, h0, frontier);
            frontier = h0;
            cur = prod;
            goto next_action;
        }
        if (pred < 0) break;
        if (d->events[pred].t1 < frontier) {
            PUSH_ITEM(PW_PATH_GAP, r, -1, -1, d->events[pred].t1, frontier);
            frontier = d->events[pred].t1;
        }
        cur = pred;
        continue;
    next_action:;
    }
    {
        int r0 = n ? it[n - 1].rank : 0;
        if (frontier > d->t0) PUSH_ITEM(PW_PATH_START, r0, -1, -1, d->t0, frontier);
    }
    /* Reverse into time order and sum by kind. */
    for (size_t i = 0; i < n / 2; i++) {
        pw_ta_path_item tmp = it[i];
        it[i] = it[n - 1 - i];
        it[n - 1 - i] = tmp;
    }
    for (size_t i = 0; i < n; i++) {
        d->path_ns[it[i].kind] += it[i].t1 - it[i].t0;
        if (it[i].kind == PW_PATH_ACTION && d->events[it[i].event].cls < PW_TA_N_COMPUTE)
            d->path_compute_ns += it[i].t1 - it[i].t0;
    }
    d->path = it;
    d->n_path = (int)n;
    free(first);
    free(seen);
    return PW_OK;
#undef PUSH_ITEM
nomem:
    free(first);
    free(seen);
    free(it);
    return ta_oom();
}

/* ------------------------------------------------------------ pass 2 */

typedef struct ta_range {
    int64_t off0, line0, off1;
} ta_range;

static int cmp_range(const void *x, const void *y)
{
    const ta_range *a = x, *b = y;
    return (a->off0 > b->off0) - (a->off0 < b->off0);
}

pw_status ta_detail_pass(ta *s)
{
    pw_trace_analysis *a = s->a;
    pw_ta_detail *d = &a->detail;
    const int R = a->n_ranks;
    int64_t want = s->cfg->detail_step;
    d->step = -1;
    if (want >= 0) {
        int found = 0;
        for (int64_t i = 0; i < a->n_steps; i++) found |= a->steps[i].step == want;
        if (!found) {
            if (a->n_steps == 0) return pw_error(PW_ERR_INVALID_ARG, "%s: no steps in the trace (asked for step %" PRId64 ")", a->file, want);
            return pw_error(PW_ERR_INVALID_ARG, "%s: step %" PRId64 " is not in the trace (steps %" PRId64 "-%" PRId64 ")",
                            a->file, want, a->steps[0].step, a->steps[a->n_steps - 1].step);
        }
        d->requested = 1;
    } else {
        want = a->median_step;
        if (want < 0) return PW_OK;
    }
    const pw_ta_step *sp = NULL;
    for (int64_t i = 0; i < a->n_steps; i++)
        if (a->steps[i].step == want) sp = &a->steps[i];
    d->step = want;
    d->t0 = sp->t0;
    d->t1 = sp->t1;
    s->win_t0 = sp->t0;
    s->win_t1 = sp->t1;
    s->win_last_rank = sp->last_rank;

    /* The file ranges holding the step's events, merged. */
    ta_range *rg = malloc((s->n_recs ? s->n_recs : 1) * sizeof *rg);
    if (!rg) return ta_oom();
    size_t nr = 0;
    for (size_t i = 0; i < s->n_recs; i++)
        if (s->recs[i].step == want) rg[nr++] = (ta_range){s->recs[i].off0, s->recs[i].line0, s->recs[i].off1};
    ta_sort_n(rg, nr, sizeof *rg, cmp_range);
    size_t m = 0;
    for (size_t i = 0; i < nr; i++) {
        if (m && rg[i].off0 <= rg[m - 1].off1) {
            if (rg[i].off1 > rg[m - 1].off1) rg[m - 1].off1 = rg[i].off1;
        } else {
            rg[m++] = rg[i];
        }
    }
    s->drank = calloc((size_t)R ? (size_t)R : 1, sizeof *s->drank);
    if (!s->drank) {
        free(rg);
        return ta_oom();
    }
    s->detail = 1;
    for (size_t r = 0; r < s->n_ranks; r++) s->ranks[r].n_b = 0;
    pw_status st = PW_OK;
    for (size_t i = 0; i < m && st == PW_OK; i++) {
        st = pw_trace_reader_seek(s->rd, rg[i].off0, rg[i].line0);
        pw_trace_record rec;
        int more = 1;
        while (st == PW_OK) {
            st = pw_trace_reader_next(s->rd, &rec, &more);
            if (st != PW_OK || !more || rec.offset > rg[i].off1) break;
            st = ta_ingest(s, &rec);
            if (rec.offset == rg[i].off1) break; /* the range's last event */
        }
    }
    free(rg);
    for (size_t r = 0; r < s->n_ranks && st == PW_OK; r++)
        while (s->ranks[r].n_open && st == PW_OK) st = ta_close_group(s, (int)r, 0);
    PW_CHECK(st);

    /* Concatenate the ranks' outputs, rebasing event indices. A rank without
     * events in the step gets one idle segment and one gap: count those
     * gaps here, so the array is sized once for every rank. */
    size_t ne = 0, ng = 0;
    for (int r = 0; r < R; r++) {
        ne += s->drank[r].n_ev;
        ng += s->drank[r].n_gap + (s->drank[r].n_seg == 0 && d->t1 > d->t0);
    }
    d->events = calloc(ne ? ne : 1, sizeof *d->events);
    d->gaps = calloc(ng ? ng : 1, sizeof *d->gaps);
    d->n_segments = calloc((size_t)R ? (size_t)R : 1, sizeof *d->n_segments);
    d->segments = calloc((size_t)R ? (size_t)R : 1, sizeof *d->segments);
    if (!d->events || !d->gaps || !d->n_segments || !d->segments) return ta_oom();
    size_t be = 0;
    for (int r = 0; r < R; r++) {
        ta_detail_rank *dr = &s->drank[r];
        ta_copy_n(d->events + be, dr->ev, dr->n_ev * sizeof *dr->ev);
        for (size_t i = 0; i < dr->n_gap; i++) {
            pw_ta_gap g = dr->gap[i];
            if (g.event >= 0) g.event += (int)be;
            d->gaps[d->n_gaps++] = g;
        }
        if (dr->n_seg == 0 && d->t1 > d->t0) {
            /* A rank without events: one idle segment, one gap. */
            dr->seg = calloc(1, sizeof *dr->seg);
            if (!dr->seg) return ta_oom();
            dr->seg[0] = (pw_ta_segment){d->t0, d->t1, PW_TA_IDLE, -1, PW_TA_WARMUP};
            dr->n_seg = 1;
            PW_ASSERT((size_t)d->n_gaps < ng);
            d->gaps[d->n_gaps++] = (pw_ta_gap){r, d->t0, d->t1, PW_CAUSE_ABSENT, -1, -1, PW_TA_WARMUP};
        }
        for (size_t i = 0; i < dr->n_seg; i++)
            if (dr->seg[i].event >= 0) dr->seg[i].event += (int)be;
        d->segments[r] = dr->seg;
        d->n_segments[r] = (int)dr->n_seg;
        dr->seg = NULL;
        be += dr->n_ev;
    }
    d->n_events = (int)ne;
    return critical_path(s);
}
