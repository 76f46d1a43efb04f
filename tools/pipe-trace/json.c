/* pipe-trace — the whole analysis as one JSON document (--json). Times are
 * microseconds (the trace's own unit), fractions are in [0, 1]; field names
 * follow docs/pipe-trace.md. Streamed: small members go through jansson one
 * at a time, the per-step table one step at a time, so the output of a
 * long trace is never held in memory whole. */
#include <jansson.h>
#include <stdint.h>
#include <string.h>

#include "pipe-trace.h"

static json_t *us(int64_t ns) { return json_real((double)ns / 1e3); }

/* Builders report allocation failure by returning NULL; json_object_set_new
 * and friends accept NULL values and fail, which `bad` collects. */
static int bad;
static void put(json_t *o, const char *k, json_t *v)
{
    if (!v || json_object_set_new(o, k, v) != 0) bad = 1;
}
static void push(json_t *a, json_t *v)
{
    if (!v || json_array_append_new(a, v) != 0) bad = 1;
}

static json_t *times_json(const pw_ta_times *t, double div)
{
    json_t *o = json_object();
    if (!o) return NULL;
#define T(k, v) put(o, k, json_real((double)(v) / 1e3 / div))
    T("step_us", t->window);
    T("F_us", t->busy[PW_TA_F]);
    T("B_us", t->busy[PW_TA_B]);
    T("W_us", t->busy[PW_TA_W]);
    T("optimizer_us", t->busy[PW_TA_OPTIM]);
    T("other_us", t->busy[PW_TA_OTHER]);
    T("comm_us", t->busy[PW_TA_COMM]);
    T("compute_us", t->compute);
    T("idle_us", t->idle);
    T("idle_warmup_us", t->idle_phase[PW_TA_WARMUP]);
    T("idle_steady_us", t->idle_phase[PW_TA_STEADY]);
    T("idle_cooldown_us", t->idle_phase[PW_TA_COOLDOWN]);
    T("wait_comm_us", t->wait_comm);
    T("wait_other_us", t->wait_other);
    T("exposed_allreduce_us", t->exposed_allreduce);
    T("tp_allreduce_us", t->tp_allreduce);
#undef T
    put(o, "n_F", json_integer(t->n_actions[0]));
    put(o, "n_B", json_integer(t->n_actions[1]));
    put(o, "n_W", json_integer(t->n_actions[2]));
    return o;
}

static const char *cause_kind(pw_ta_cause_kind k)
{
    switch (k) {
    case PW_CAUSE_WAIT: return "wait";
    case PW_CAUSE_UNTRACKED: return "untracked";
    case PW_CAUSE_NOT_STARTED: return "not_started";
    case PW_CAUSE_DONE: return "done";
    case PW_CAUSE_ABSENT: return "absent";
    }
    return "?";
}

static const char *path_kind(pw_ta_path_kind k)
{
    switch (k) {
    case PW_PATH_ACTION: return "action";
    case PW_PATH_HANDOFF: return "handoff";
    case PW_PATH_GAP: return "gap";
    case PW_PATH_START: return "start";
    }
    return "?";
}

static json_t *int_or_null(int v) { return v >= 0 ? json_integer(v) : json_null(); }
static json_t *frac_or_null(double v) { return v >= 0 ? json_real(v) : json_null(); }

static json_t *meta_json(const pw_trace_analysis *a)
{
    if (!a->has_meta) return json_null();
    const pw_trace_info *m = &a->meta;
    json_t *o = json_object();
    if (!o) return NULL;
    put(o, "schedule", json_string(m->schedule));
    put(o, "graph", json_string(m->graph));
    put(o, "ranks", json_integer(m->ranks));
    put(o, "stages", json_integer(m->stages));
    put(o, "micro_batches", json_integer(m->micro_batches));
    put(o, "replicas", json_integer(m->replicas));
    put(o, "micro_batch_size", json_integer(m->micro_batch_size));
    put(o, "steps", json_integer(m->steps));
    put(o, "theory_bubble", frac_or_null(m->theory_bubble));
    put(o, "dropped_events", json_integer(m->dropped_events));
    json_t *pk = json_array(), *mp = json_array();
    for (int i = 0; pk && i < m->n_peak_inflight; i++) push(pk, json_integer(m->peak_inflight[i]));
    for (int i = 0; mp && i < m->n_measured_peak; i++) push(mp, json_integer(m->measured_peak[i]));
    put(o, "peak_inflight", pk);
    put(o, "measured_peak", mp);
    json_t *c = json_null();
    if (m->has_clock && (c = json_object())) {
        put(c, "t0_ns", json_integer(m->clock_t0_ns));
        put(c, "world_rank", int_or_null(m->world_rank));
        put(c, "world_size", json_integer(m->world_size));
        put(c, "offset_ns", json_integer(m->clock_offset_ns));
        put(c, "measured_offset_ns", json_integer(m->clock_measured_ns));
        put(c, "rtt_ns", m->clock_rtt_ns >= 0 ? json_integer(m->clock_rtt_ns) : json_null());
        put(c, "same_host", json_boolean(m->clock_same_host));
        put(c, "host", json_string(m->host));
        put(c, "run", json_string(m->run_id));
    }
    put(o, "clock", c);
    return o;
}

static json_t *analysis_json(const pw_trace_analysis *a)
{
    json_t *o = json_object();
    if (!o) return NULL;
    const double na = a->n_analysed > 0 ? (double)a->n_analysed : 1;
    put(o, "file", json_string(a->file));
    put(o, "format", json_string(a->has_meta ? "pipewright" : "chrome"));
    put(o, "meta", meta_json(a));
    json_t *notes = json_array();
    for (int i = 0; notes && i < a->n_notes; i++) push(notes, json_string(a->notes[i]));
    put(o, "notes", notes);
    json_t *moves = json_array();
    for (int i = 0; moves && i < a->n_moves; i++) {
        const pw_ta_move *m = &a->moves[i];
        push(moves, json_pack("{s:I, s:o, s:o, s:I, s:o, s:o}", "step", (json_int_t)m->step, "start_us", us(m->t0),
                              "dur_us", us(m->t1 - m->t0), "bytes", (json_int_t)m->bytes, "step_us_before",
                              us(m->step_ns_before), "step_us_after", us(m->step_ns_after)));
    }
    put(o, "moves", moves);
    if (a->allreduce_n > 0)
        put(o, "allreduce", json_pack("{s:I, s:I, s:I, s:b, s:f}", "buckets", (json_int_t)a->allreduce_n,
                                      "bytes", (json_int_t)a->allreduce_bytes, "wire_bytes",
                                      (json_int_t)a->allreduce_wire_bytes, "compressed", a->allreduce_compressed,
                                      "ratio", a->allreduce_wire_bytes > 0 ? (double)a->allreduce_bytes /
                                      (double)a->allreduce_wire_bytes : 0.0));
    if (a->tp_allreduce_n > 0)
        put(o, "tp_allreduce", json_pack("{s:I, s:I}", "sums", (json_int_t)a->tp_allreduce_n, "bytes",
                                         (json_int_t)a->tp_allreduce_bytes));
    put(o, "events", json_integer(a->n_events));
    put(o, "events_used", json_integer(a->n_used));
    put(o, "ranks_n", json_integer(a->n_ranks));
    put(o, "micro_batches", json_integer(a->micro_batches));
    put(o, "steps_total", json_integer(a->n_steps));
    put(o, "steps_analysed", json_integer(a->n_analysed));
    json_t *st = json_object();
    if (st && a->n_analysed > 0) {
        put(st, "median_us", us(a->step_ns_median));
        put(st, "mean_us", us(a->step_ns_mean));
        put(st, "min_us", us(a->step_ns_min));
        put(st, "max_us", us(a->step_ns_max));
        put(st, "median_step", json_integer(a->median_step));
    }
    put(o, "step_time", st);

    json_t *b = json_object();
    if (b) {
        put(b, "measured", frac_or_null(a->bubble));
        put(b, "theory", frac_or_null(a->theory));
        put(b, "theory_source", json_string(a->theory_source));
        put(b, "model", frac_or_null(a->model_bubble));
        put(b, "model_with_optimizer", frac_or_null(a->model_bubble_optim));
        if (a->model_bubble >= 0) {
            json_t *p = json_object();
            if (p) {
                if (a->theory >= 0 && a->bubble >= 0) put(p, "total", json_real(100 * (a->bubble - a->theory)));
                if (a->theory >= 0) put(p, "imbalance", json_real(a->points_imbalance));
                put(p, "optimizer", json_real(a->points_optimizer));
                put(p, "overhead", json_real(a->points_overhead));
                put(p, "comm_actions", json_real(a->points_comm_actions));
            }
            put(b, "points", p);
            put(b, "imbalance_ratio", json_real(a->imbalance_ratio));
            put(b, "slow_rank", int_or_null(a->slow_rank));
            put(b, "fast_rank", int_or_null(a->fast_rank));
        }
        put(b, "explanation", json_string(a->explanation));
    }
    put(o, "bubble", b);

    json_t *ranks = json_array();
    for (int r = 0; ranks && r < a->n_ranks; r++) {
        const pw_ta_rank *k = &a->ranks[r];
        json_t *x = json_object();
        if (!x) { bad = 1; break; }
        put(x, "rank", json_integer(r));
        put(x, "pid", json_integer(k->pid));
        put(x, "tid", json_integer(k->tid));
        put(x, "label", json_string(k->label));
        put(x, "bubble", json_real(k->bubble));
        put(x, "compute_per_micro_batch_us", json_real(k->compute_per_mb_ns / 1e3));
        put(x, "mean_per_step", times_json(&k->total, na));
        put(x, "total", times_json(&k->total, 1));
        push(ranks, x);
    }
    put(o, "ranks", ranks);
    put(o, "total", times_json(&a->total, 1));

    json_t *causes = json_array();
    for (int i = 0; causes && i < a->n_causes; i++) {
        const pw_ta_cause *c = &a->causes[i];
        json_t *x = json_object();
        if (!x) { bad = 1; break; }
        char text[192];
        pw_ta_cause_format(c, text, sizeof text);
        put(x, "rank", json_integer(c->rank));
        put(x, "kind", json_string(cause_kind(c->kind)));
        put(x, "what", json_string(c->what));
        put(x, "peer", int_or_null(c->peer));
        put(x, "stage", int_or_null(c->stage));
        put(x, "mb", int_or_null(c->mb));
        put(x, "text", json_string(text));
        put(x, "total_us", us(c->total_ns));
        put(x, "share_of_idle", json_real(a->total.idle > 0 ? (double)c->total_ns / (double)a->total.idle : 0));
        put(x, "gaps", json_integer(c->n_gaps));
        put(x, "largest_us", us(c->max_ns));
        put(x, "largest_step", json_integer(c->max_step));
        put(x, "warmup_us", us(c->phase_ns[PW_TA_WARMUP]));
        put(x, "steady_us", us(c->phase_ns[PW_TA_STEADY]));
        put(x, "cooldown_us", us(c->phase_ns[PW_TA_COOLDOWN]));
        push(causes, x);
    }
    put(o, "causes", causes);

    const pw_ta_detail *d = &a->detail;
    if (d->step < 0) {
        put(o, "detail", json_null());
        return o;
    }
    json_t *dj = json_object();
    if (!dj) return o;
    put(dj, "step", json_integer(d->step));
    put(dj, "chosen_by", json_string(d->requested ? "--step" : "median duration"));
    put(dj, "start_us", us(d->t0));
    put(dj, "time_us", us(d->t1 - d->t0));
    json_t *evs = json_array();
    for (int i = 0; evs && i < d->n_events; i++) {
        const pw_ta_event *e = &d->events[i];
        json_t *x = json_object();
        if (!x) { bad = 1; break; }
        put(x, "rank", json_integer(e->rank));
        put(x, "name", json_string(e->name));
        put(x, "class", json_string(pw_ta_class_name(e->cls)));
        put(x, "stage", int_or_null(e->stage));
        put(x, "mb", int_or_null(e->mb));
        put(x, "peer", int_or_null(e->peer));
        put(x, "start_us", us(e->t0 - d->t0));
        put(x, "dur_us", us(e->t1 - e->t0));
        push(evs, x);
    }
    put(dj, "events", evs);
    json_t *gaps = json_array();
    for (int i = 0; gaps && i < d->n_gaps; i++) {
        const pw_ta_gap *g = &d->gaps[i];
        json_t *x = json_object();
        if (!x) { bad = 1; break; }
        char text[192];
        pw_ta_gap_format(a, g, text, sizeof text);
        put(x, "rank", json_integer(g->rank));
        put(x, "start_us", us(g->t0 - d->t0));
        put(x, "dur_us", us(g->t1 - g->t0));
        put(x, "phase", json_string(pw_ta_phase_name(g->phase)));
        put(x, "kind", json_string(cause_kind(g->kind)));
        put(x, "event", int_or_null(g->event));
        put(x, "peer", int_or_null(g->peer));
        put(x, "cause", json_string(text));
        push(gaps, x);
    }
    put(dj, "gaps", gaps);
    json_t *cp = json_object(), *items = json_array();
    if (cp && items) {
        put(cp, "length_us", us(d->t1 - d->t0));
        put(cp, "compute_us", us(d->path_compute_ns));
        put(cp, "actions_us", us(d->path_ns[PW_PATH_ACTION]));
        put(cp, "handoffs_us", us(d->path_ns[PW_PATH_HANDOFF]));
        put(cp, "gaps_us", us(d->path_ns[PW_PATH_GAP] + d->path_ns[PW_PATH_START]));
        for (int i = 0; i < d->n_path; i++) {
            const pw_ta_path_item *p = &d->path[i];
            json_t *x = json_object();
            if (!x) { bad = 1; break; }
            put(x, "kind", json_string(path_kind(p->kind)));
            put(x, "rank", json_integer(p->rank));
            if (p->kind == PW_PATH_HANDOFF) put(x, "from_rank", json_integer(p->from_rank));
            put(x, "event", int_or_null(p->event));
            put(x, "start_us", us(p->t0 - d->t0));
            put(x, "dur_us", us(p->t1 - p->t0));
            push(items, x);
        }
        put(cp, "items", items);
    } else {
        json_decref(items);
    }
    put(dj, "critical_path", cp);
    put(o, "detail", dj);
    return o;
}

/* One member of a streamed object: `"key": value` (v is consumed). */
static int member(FILE *f, int *first, const char *key, json_t *v)
{
    if (!v) bad = 1;
    json_t *k = json_string(key);
    int rc = !v || !k;
    if (!rc) {
        fputs(*first ? "\n " : ",\n ", f);
        rc |= json_dumpf(k, f, JSON_ENCODE_ANY) != 0;
        fputs(": ", f);
        rc |= json_dumpf(v, f, JSON_ENCODE_ANY | JSON_COMPACT | JSON_REAL_PRECISION(12) | JSON_PRESERVE_ORDER) != 0;
    }
    *first = 0;
    json_decref(k);
    json_decref(v);
    if (rc) bad = 1;
    return rc ? -1 : 0;
}

static json_t *step_json(const pw_trace_analysis *a, const pw_ta_step *s)
{
    json_t *x = json_object(), *rs = s->ranks ? json_array() : NULL;
    if (!x) return NULL;
    put(x, "step", json_integer(s->step));
    put(x, "analysed", json_boolean(s->analysed));
    put(x, "start_us", us(s->t0));
    put(x, "time_us", us(s->t1 - s->t0));
    put(x, "bubble", json_real(s->bubble));
    put(x, "last_rank", json_integer(s->last_rank));
    for (int r = 0; s->ranks && rs && r < a->n_ranks; r++) {
        json_t *t = times_json(&s->ranks[r].t, 1);
        if (t) {
            put(t, "present", json_boolean(s->ranks[r].present));
            put(t, "start_us", us(s->ranks[r].t0));
            put(t, "end_us", us(s->ranks[r].t1));
        }
        push(rs, t);
    }
    if (s->ranks) put(x, "ranks", rs);
    return x;
}

/* The analysis as one JSON object, streamed member by member: the per-step
 * table of a long trace is written one step at a time, never held whole. */
static void write_analysis(FILE *f, const pw_trace_analysis *a)
{
    json_t *o = analysis_json(a);
    int first = 1;
    fputc('{', f);
    const char *key;
    json_t *v;
    void *tmp;
    json_object_foreach_safe(o, tmp, key, v) {
        if (!strcmp(key, "detail")) break; /* steps come before the detail */
        member(f, &first, key, json_incref(v));
    }
    fputs(first ? "\n \"steps\": [" : ",\n \"steps\": [", f);
    first = 0;
    for (int64_t i = 0; i < a->n_steps; i++) {
        json_t *x = step_json(a, &a->steps[i]);
        if (!x) {
            bad = 1;
            break;
        }
        fputs(i ? ",\n  " : "\n  ", f);
        if (json_dumpf(x, f, JSON_COMPACT | JSON_REAL_PRECISION(12) | JSON_PRESERVE_ORDER) != 0) bad = 1;
        json_decref(x);
    }
    fputs(a->n_steps ? "\n ]" : "]", f);
    member(f, &first, "detail", json_incref(json_object_get(o, "detail")));
    fputs("\n}", f);
    json_decref(o);
}

int pt_json_write(FILE *f, const pw_trace_analysis *a, const pw_trace_analysis *b)
{
    bad = 0;
    if (!b) {
        write_analysis(f, a);
    } else {
        fputs("{\n\"a\": ", f);
        write_analysis(f, a);
        fputs(",\n\"b\": ", f);
        write_analysis(f, b);
        json_t *diff = json_object();
        if (diff) {
            put(diff, "step_time_median_us", us(b->step_ns_median - a->step_ns_median));
            if (a->bubble >= 0 && b->bubble >= 0) put(diff, "bubble_points", json_real(100 * (b->bubble - a->bubble)));
            json_t *rk = json_array();
            int R = a->n_ranks < b->n_ranks ? a->n_ranks : b->n_ranks;
            double na = a->n_analysed ? (double)a->n_analysed : 1, nb = b->n_analysed ? (double)b->n_analysed : 1;
            for (int r = 0; rk && r < R; r++) {
                json_t *x = json_object();
                if (!x) {
                    bad = 1;
                    break;
                }
                put(x, "rank", json_integer(r));
                put(x, "compute_per_step_us", json_real(((double)b->ranks[r].total.compute / nb -
                                                         (double)a->ranks[r].total.compute / na) / 1e3));
                put(x, "idle_per_step_us", json_real(((double)b->ranks[r].total.idle / nb -
                                                      (double)a->ranks[r].total.idle / na) / 1e3));
                put(x, "bubble_points", json_real(100 * (b->ranks[r].bubble - a->ranks[r].bubble)));
                push(rk, x);
            }
            put(diff, "ranks", rk);
        }
        fputs(",\n\"diff\": ", f);
        if (!diff || json_dumpf(diff, f, JSON_COMPACT | JSON_REAL_PRECISION(12) | JSON_PRESERVE_ORDER) != 0) bad = 1;
        json_decref(diff);
        fputs("\n}", f);
    }
    fputc('\n', f);
    if (bad) {
        fprintf(stderr, "pipe-trace: out of memory (or an invalid string) building the JSON\n");
        return -1;
    }
    return ferror(f) ? -1 : 0;
}
