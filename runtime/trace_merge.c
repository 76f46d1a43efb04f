/* pipewright — merging the per-process traces of a multi-process run into
 * one timeline (see trace_merge.h). Pass 1 reads each input up to its
 * metadata block and decides the order, the clock and whether the inputs
 * belong together; pass 2 streams each input's events out, shifted. */
#include "runtime/trace_merge.h"
#include "runtime/trace.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* What pass 1 keeps of an input. */
typedef struct mg_input {
    char *name;
    pw_trace_info info;          /* a deep copy: strings and arrays owned here */
    int64_t shift_ns;            /* added to every time of the input */
} mg_input;

/* An open-addressing set of 64-bit keys with a value each: the track that
 * owns (pid, tid) -> input, and the metadata events already written. */
typedef struct mg_set {
    uint64_t *key;
    int32_t *val;
    unsigned char *used;
    size_t cap, n;
} mg_set;

typedef struct mg {
    int n;
    mg_input *in;
    pw_trace_merge_report *rep;
    FILE *out;
    mg_set owner;                /* hash(pid, tid) -> input index; tid kept in tids */
    mg_set meta_seen;
    int64_t *tids;               /* owners' tids for the missing-rank note, pid 0 only */
    size_t n_tids, cap_tids;
} mg;

static pw_status mg_oom(void) { return pw_error(PW_ERR_NOMEM, "trace merge: out of memory"); }

static void add_note(pw_trace_merge_report *rep, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_note(pw_trace_merge_report *rep, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    char **p = realloc(rep->notes, (size_t)(rep->n_notes + 1) * sizeof *p);
    if (!p) return;
    rep->notes = p;
    if ((rep->notes[rep->n_notes] = strdup(buf))) rep->n_notes++;
}

/* ------------------------------------------------------------ key sets */

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static uint64_t hash_str(const char *s, uint64_t h)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) h = (h ^ *p) * 0x100000001b3u;
    return h;
}

/* Index of `key` in the set, or of the empty slot where it would go. */
static size_t set_slot(const mg_set *s, uint64_t key)
{
    size_t i = (size_t)mix64(key) & (s->cap - 1);
    while (s->used[i] && s->key[i] != key) i = (i + 1) & (s->cap - 1);
    return i;
}

/* Finds `key`; adds it with `val` when absent. *found says which; the
 * value stored is returned in *val_out. -1 out of memory. */
static int set_get_or_add(mg_set *s, uint64_t key, int32_t val, int *found, int32_t *val_out)
{
    if (2 * (s->n + 1) > s->cap) {
        size_t nc = s->cap ? 2 * s->cap : 64;
        mg_set g = {.key = calloc(nc, sizeof *g.key), .val = calloc(nc, sizeof *g.val), .used = calloc(nc, 1),
                    .cap = nc, .n = s->n};
        if (!g.key || !g.val || !g.used) {
            free(g.key), free(g.val), free(g.used);
            return -1;
        }
        for (size_t i = 0; i < s->cap; i++)
            if (s->used[i]) {
                size_t j = set_slot(&g, s->key[i]);
                g.used[j] = 1, g.key[j] = s->key[i], g.val[j] = s->val[i];
            }
        free(s->key), free(s->val), free(s->used);
        *s = g;
    }
    size_t i = set_slot(s, key);
    *found = s->used[i];
    if (!s->used[i]) {
        s->used[i] = 1, s->key[i] = key, s->val[i] = val;
        s->n++;
    }
    *val_out = s->val[i];
    return 0;
}

static void set_free(mg_set *s)
{
    free(s->key), free(s->val), free(s->used);
    memset(s, 0, sizeof *s);
}

/* ------------------------------------------------------------ pass 1 */

static void input_free(mg_input *in)
{
    free(in->name);
    free(in->info.schedule);
    free(in->info.graph);
    free(in->info.peak_inflight);
    free(in->info.measured_peak);
    free(in->info.costs);
}

static void *dup_array(const void *p, int n, size_t size, int *ok)
{
    if (!p || n <= 0) return NULL;
    void *q = malloc((size_t)n * size);
    if (q) memcpy(q, p, (size_t)n * size);
    else *ok = 0;
    return q;
}

/* Reads input i up to its metadata block (the whole input when it has none,
 * or has it after the events) and keeps a copy of the block. */
static pw_status read_head(pw_trace_merge_open_fn open, void *user, int i, mg_input *in)
{
    pw_trace_reader *rd = NULL;
    PW_CHECK(open(user, i, &rd));
    pw_status st = PW_OK;
    pw_trace_record ev;
    int more = 1;
    while (!pw_trace_reader_info(rd)->present && more)
        PW_CHECK_GOTO(pw_trace_reader_next(rd, &ev, &more), st, out);
    const pw_trace_info *info = pw_trace_reader_info(rd);
    int ok = 1;
    in->name = strdup(pw_trace_reader_name(rd));
    in->info = *info;
    in->info.schedule = strdup(info->schedule ? info->schedule : "");
    in->info.graph = strdup(info->graph ? info->graph : "");
    in->info.peak_inflight = dup_array(info->peak_inflight, info->n_peak_inflight, sizeof(int), &ok);
    in->info.measured_peak = dup_array(info->measured_peak, info->n_measured_peak, sizeof(int), &ok);
    in->info.costs = dup_array(info->costs, info->n_costs, sizeof *info->costs, &ok);
    if (!in->info.peak_inflight) in->info.n_peak_inflight = 0;
    if (!in->info.measured_peak) in->info.n_measured_peak = 0;
    if (!in->info.costs) in->info.n_costs = 0;
    if (!ok || !in->name || !in->info.schedule || !in->info.graph) st = mg_oom();
out:
    pw_trace_reader_close(rd);
    return st;
}

/* The first field in which two inputs' metadata differ, as "graph 'a' and
 * 'b'", or 0 when they agree. */
static int meta_differs(const pw_trace_info *a, const pw_trace_info *b, char *why, size_t n)
{
    if (strcmp(a->graph, b->graph))
        return snprintf(why, n, "graph '%.200s' and '%.200s'", a->graph, b->graph), 1;
    if (strcmp(a->schedule, b->schedule))
        return snprintf(why, n, "schedule '%.200s' and '%.200s'", a->schedule, b->schedule), 1;
    const struct { const char *what; int64_t x, y; } f[] = {
        {"ranks", a->ranks, b->ranks},
        {"stages", a->stages, b->stages},
        {"replicas", a->replicas, b->replicas},
        {"micro-batches", a->micro_batches, b->micro_batches},
        {"micro-batch size", a->micro_batch_size, b->micro_batch_size},
    };
    for (size_t i = 0; i < sizeof f / sizeof *f; i++)
        if (f[i].x != f[i].y)
            return snprintf(why, n, "%s %" PRId64 " and %" PRId64, f[i].what, f[i].x, f[i].y), 1;
    return 0;
}

typedef struct rank_idx {
    int world_rank, i;
} rank_idx;

static int cmp_rank_idx(const void *x, const void *y)
{
    const rank_idx *a = x, *b = y;
    if (a->world_rank != b->world_rank) return a->world_rank < b->world_rank ? -1 : 1;
    return a->i - b->i;
}

/* "2, 3 and 5": the ranks in [0, size) missing from `have` (ascending,
 * distinct), at most 8 named; *count all of them. */
static void list_missing(const int *have, int n, int size, char *buf, size_t cap, int *count)
{
    size_t len = 0;
    int shown = 0, j = 0;
    *count = 0;
    buf[0] = '\0';
    for (int r = 0; r < size; r++) {
        while (j < n && have[j] < r) j++;
        if (j < n && have[j] == r) continue;
        ++*count;
        if (shown < 8 && len < cap) len += (size_t)snprintf(buf + len, cap - len, "%s%d", shown ? ", " : "", r), shown++;
    }
    if (*count > shown && len < cap) snprintf(buf + len, cap - len, " and %d more", *count - shown);
}

/* Order, consistency, clocks: everything decided before an event is written. */
static pw_status plan(mg *m)
{
    pw_trace_merge_report *rep = m->rep;
    const int n = m->n;
    mg_input *in = m->in;
    char why[512];
    int n_meta = 0, n_clock = 0, n_wrank = 0;
    for (int i = 0; i < n; i++) {
        n_meta += in[i].info.present;
        n_clock += in[i].info.present && in[i].info.has_clock;
        n_wrank += in[i].info.present && in[i].info.has_clock && in[i].info.world_rank >= 0;
    }
    for (int i = 0; i < n; i++) rep->order[i] = i;
    /* Belonging together. */
    if (n_meta && n_meta < n) {
        int with = 0, without = 0;
        while (!in[with].info.present) with++;
        while (in[without].info.present) without++;
        return pw_error(PW_ERR_INVALID_ARG, "%s has pipewright metadata and %s has none: not the traces of one run",
                        in[with].name, in[without].name);
    }
    for (int i = 1; n_meta && i < n; i++)
        if (meta_differs(&in[0].info, &in[i].info, why, sizeof why))
            return pw_error(PW_ERR_INVALID_ARG, "%s and %s are not the traces of one run: %s", in[0].name,
                            in[i].name, why);
    for (int i = 1; i < n; i++)
        if (in[0].info.run_id[0] && in[i].info.run_id[0] && strcmp(in[0].info.run_id, in[i].info.run_id))
            return pw_error(PW_ERR_INVALID_ARG, "%s and %s come from different runs (run %s and run %s)",
                            in[0].name, in[i].name, in[0].info.run_id, in[i].info.run_id);
    /* World ranks: order by them, refuse one twice, name those missing. */
    if (n_wrank == n) {
        const int size = in[0].info.world_size;
        for (int i = 1; i < n; i++)
            if (in[i].info.world_size != size)
                return pw_error(PW_ERR_INVALID_ARG, "%s and %s are not the traces of one run: %d and %d processes",
                                in[0].name, in[i].name, size, in[i].info.world_size);
        rank_idx *ri = malloc((size_t)n * sizeof *ri);
        if (!ri) return mg_oom();
        for (int i = 0; i < n; i++) ri[i] = (rank_idx){in[i].info.world_rank, i};
        qsort(ri, (size_t)n, sizeof *ri, cmp_rank_idx);
        for (int i = 0; i < n; i++) rep->order[i] = ri[i].i;
        free(ri);
        for (int k = 1; k < n; k++) {
            const mg_input *a = &in[rep->order[k - 1]], *b = &in[rep->order[k]];
            if (a->info.world_rank == b->info.world_rank)
                return pw_error(PW_ERR_INVALID_ARG, "%s and %s are both MPI rank %d of the run (a file given twice?)",
                                a->name, b->name, a->info.world_rank);
        }
        int *have = malloc((size_t)n * sizeof *have), missing;
        if (!have) return mg_oom();
        for (int k = 0; k < n; k++) have[k] = in[rep->order[k]].info.world_rank; /* ascending */
        list_missing(have, n, size, why, sizeof why, &missing);
        free(have);
        if (missing)
            add_note(rep, "warning: no trace of MPI rank%s %s of the %d-process run among the %d file%s (from %s): "
                     "%s time counts as idle", missing > 1 ? "s" : "", why, size, n, n > 1 ? "s" : "", in[0].name,
                     missing > 1 ? "their" : "its");
    }
    /* Steps traced. */
    for (int i = 1; n_meta && i < n; i++)
        if (in[i].info.steps != in[0].info.steps) {
            add_note(rep, "warning: %s traced %" PRId64 " steps and %s %" PRId64 " (a process stopped early?)",
                     in[0].name, in[0].info.steps, in[i].name, in[i].info.steps);
            break;
        }
    /* Clocks. */
    if (n_clock == n && n > 0) {
        rep->clock = PW_MERGE_CLOCK_OFFSETS;
        int64_t lo = INT64_MAX;
        for (int i = 0; i < n; i++) {
            const pw_trace_info *f = &in[i].info;
            in[i].shift_ns = f->clock_t0_ns + f->clock_offset_ns; /* each in [-2^61, 2^62]: no overflow */
            if (in[i].shift_ns < lo) lo = in[i].shift_ns;
            if (f->clock_offset_ns != 0 && f->clock_rtt_ns > rep->max_rtt_ns) rep->max_rtt_ns = f->clock_rtt_ns;
            if (f->clock_same_host && f->world_rank > 0) {
                const int64_t e = f->clock_measured_ns < 0 ? -f->clock_measured_ns : f->clock_measured_ns;
                if (e > rep->max_estimate_ns) rep->max_estimate_ns = e;
            }
            int seen = 0;
            for (int j = 0; j < i && !seen; j++) seen = !strcmp(in[j].info.host, f->host);
            rep->n_hosts += !seen && f->host[0];
        }
        for (int i = 0; i < n; i++) in[i].shift_ns -= lo; /* < 2^63: the reader's bounds */
        int all_same = 1;
        for (int i = 0; i < n; i++) all_same &= in[i].info.clock_same_host;
        if (n > 1 && !all_same)
            add_note(rep, "note: %d processes on %d hosts: their clocks are put on MPI rank 0's with the offsets "
                     "measured at start-up (to within +-%.1f us, half the largest round trip)", n, rep->n_hosts,
                     (double)rep->max_rtt_ns / 2e3);
        else if (n > 1)
            add_note(rep, "note: the %d processes share MPI rank 0's host%s%s%s and its clock: their times line up "
                     "exactly", n, in[0].info.host[0] ? " (" : "", in[0].info.host, in[0].info.host[0] ? ")" : "");
    } else {
        rep->clock = PW_MERGE_CLOCK_AS_WRITTEN;
        if (n_clock > 0) {
            int with = 0, without = 0;
            while (!in[with].info.has_clock) with++;
            while (in[without].info.has_clock) without++;
            add_note(rep, "warning: %s records its clock and %s does not (written by an older pipewright?): the "
                     "files are merged with their times as written, each counting from its own first event",
                     in[with].name, in[without].name);
        } else if (n > 1) {
            add_note(rep, "note: none of the %d files records its clock (traces written before pipewright did, or "
                     "not by a process of an MPI run): they are merged with their times as written, assuming one "
                     "clock; pipeline-run's older per-rank traces each count from their own first event, so their "
                     "ranks are lined up on their first events", n);
        }
    }
    return PW_OK;
}

/* ------------------------------------------------------------ pass 2 */

static void put_time(FILE *f, const char *key, int64_t ns)
{
    fprintf(f, ", \"%s\": %" PRId64 ".%03d", key, ns / 1000, (int)(ns % 1000));
}

/* One event, shifted by `shift` ns (the caller checked the bounds). */
static void write_event(FILE *f, const pw_trace_record *ev, int64_t shift)
{
    fputc('{', f);
    const char *sep = "";
    if (ev->has & PW_TREC_NAME) {
        fputs("\"name\": ", f);
        pw_trace_write_string(f, ev->name);
        sep = ", ";
    }
    if (ev->has & PW_TREC_CAT) {
        fprintf(f, "%s\"cat\": ", sep);
        pw_trace_write_string(f, ev->cat);
        sep = ", ";
    }
    /* The reader keeps ph's first byte; anything but printable ASCII (a UTF-8
     * lead byte alone would be invalid) becomes "?", a phase nobody reads. */
    char ph[2] = {ev->ph, 0};
    if (ev->ph && (ev->ph < 0x20 || ev->ph > 0x7e || ev->ph == '"' || ev->ph == '\\')) ph[0] = '?';
    fprintf(f, "%s\"ph\": \"%s\"", sep, ph);
    if (ev->has & PW_TREC_PID) fprintf(f, ", \"pid\": %" PRId64, ev->pid);
    if (ev->has & PW_TREC_TID) fprintf(f, ", \"tid\": %" PRId64, ev->tid);
    if (ev->has & PW_TREC_TS) put_time(f, "ts", ev->ts_ns + shift);
    if (ev->has & PW_TREC_DUR) put_time(f, "dur", ev->dur_ns);
    const unsigned args = PW_TREC_STEP | PW_TREC_STAGE | PW_TREC_MB | PW_TREC_PEER | PW_TREC_BYTES | PW_TREC_ARG_NAME |
                          PW_TREC_WIRE_BYTES;
    if (ev->has & args) {
        fputs(", \"args\": {", f);
        sep = "";
        if (ev->has & PW_TREC_STEP) fprintf(f, "\"step\": %" PRId64, ev->step), sep = ", ";
        if (ev->has & PW_TREC_STAGE) fprintf(f, "%s\"stage\": %d", sep, (int)ev->stage), sep = ", ";
        if (ev->has & PW_TREC_MB) fprintf(f, "%s\"mb\": %d", sep, (int)ev->mb), sep = ", ";
        if (ev->has & PW_TREC_PEER) fprintf(f, "%s\"peer\": %d", sep, (int)ev->peer), sep = ", ";
        if (ev->has & PW_TREC_BYTES) fprintf(f, "%s\"bytes\": %" PRId64, sep, ev->bytes), sep = ", ";
        if (ev->has & PW_TREC_WIRE_BYTES) fprintf(f, "%s\"wire_bytes\": %" PRId64, sep, ev->wire_bytes), sep = ", ";
        if (ev->has & PW_TREC_ARG_NAME) {
            fprintf(f, "%s\"name\": ", sep);
            pw_trace_write_string(f, ev->arg_name);
        }
        fputc('}', f);
    }
    fputc('}', f);
}

static void write_head(mg *m)
{
    FILE *f = m->out;
    const mg_input *first = &m->in[m->rep->order[0]];
    const pw_trace_info *in = &first->info;
    fputs("{\"displayTimeUnit\": \"ns\"", f);
    if (!in->present) {
        fputs(",\n\"traceEvents\": [", f);
        return;
    }
    /* Each process's measured peak sits at its own rank's entries (the
     * others are 0 in its file): take every entry from the file of that
     * world rank, or, without world ranks, the largest. */
    const int R = in->ranks;
    int *measured = NULL, all = 1;
    for (int i = 0; i < m->n; i++) all &= m->in[i].info.n_measured_peak == R;
    if (all && (measured = calloc((size_t)R, sizeof *measured))) {
        for (int i = 0; i < m->n; i++) {
            const pw_trace_info *x = &m->in[i].info;
            if (x->world_rank >= 0 && x->world_rank < R) {
                measured[x->world_rank] = x->measured_peak[x->world_rank];
            } else {
                for (int r = 0; r < R; r++)
                    if (x->measured_peak[r] > measured[r]) measured[r] = x->measured_peak[r];
            }
        }
    }
    int64_t dropped = 0, steps = 0;
    for (int i = 0; i < m->n; i++) {
        const int64_t d = m->in[i].info.dropped_events;
        dropped = d > INT64_MAX - dropped ? INT64_MAX : dropped + d;
        if (m->in[i].info.steps > steps) steps = m->in[i].info.steps;
    }
    pw_trace_meta meta = {
        .schedule = in->schedule, .graph = in->graph, .n_ranks = in->ranks, .n_chunks = in->stages,
        .n_micro = in->micro_batches, .n_replicas = in->replicas, .micro_batch = in->micro_batch_size,
        .steps = steps, .theory_bubble = in->theory_bubble >= 0 ? in->theory_bubble : -1.0,
        /* The writer writes ranks (stages) entries: arrays of another length
         * (a hand-made file) are left out rather than padded. */
        .peak_inflight = in->n_peak_inflight == R ? in->peak_inflight : NULL, .measured_peak = measured,
        .costs = in->n_costs == in->stages ? in->costs : NULL,
    };
    fputs(",\n", f);
    pw_trace_write_meta(f, &meta, dropped, NULL, 0);
    free(measured);
    fputs(",\n\"traceEvents\": [", f);
}

/* Streams input k's events out. */
static pw_status copy_events(mg *m, pw_trace_merge_open_fn open, void *user, int k, int *first)
{
    mg_input *in = &m->in[k];
    pw_trace_reader *rd = NULL;
    PW_CHECK(open(user, k, &rd));
    pw_status st = PW_OK;
    pw_trace_record ev;
    int more = 1;
    int64_t count = 0;
    for (;;) {
        PW_CHECK_GOTO(pw_trace_reader_next(rd, &ev, &more), st, out);
        if (!more) break;
        count++;
        int found;
        int32_t owner;
        if (ev.ph == 'M') {
            /* Every pipewright file names every track: write each name once. */
            uint64_t key = hash_str(ev.name, hash_str(ev.arg_name, mix64((uint64_t)ev.pid) ^ (uint64_t)ev.tid));
            if (set_get_or_add(&m->meta_seen, key, k, &found, &owner) != 0) {
                st = mg_oom();
                goto out;
            }
            if (found) continue;
        } else if ((ev.ph == 'X' || ev.ph == 'B' || ev.ph == 'E') && (ev.has & PW_TREC_TID)) {
            uint64_t key = mix64((uint64_t)ev.pid) * 31u ^ (uint64_t)ev.tid;
            if (set_get_or_add(&m->owner, key, k, &found, &owner) != 0) {
                st = mg_oom();
                goto out;
            }
            if (found && owner != k) {
                st = pw_error(PW_ERR_INVALID_ARG, "%s and %s both hold events of track %" PRId64 " (pid %" PRId64
                              "): the same rank twice, or traces of different runs", m->in[owner].name, in->name,
                              ev.tid, ev.pid);
                goto out;
            }
            if (!found && ev.pid == 0 && ev.tid >= 0) {
                if (m->n_tids == m->cap_tids) {
                    size_t nc = m->cap_tids ? 2 * m->cap_tids : 16;
                    int64_t *p = realloc(m->tids, nc * sizeof *p);
                    if (!p) {
                        st = mg_oom();
                        goto out;
                    }
                    m->tids = p, m->cap_tids = nc;
                }
                m->tids[m->n_tids++] = ev.tid;
            }
        }
        if ((ev.has & PW_TREC_TS) && ev.ts_ns > PW_TRACE_MAX_NS - in->shift_ns) {
            st = pw_error(PW_ERR_INVALID_ARG, "%s:line %" PRId64 ": event %" PRId64 ": its clock offset puts it at "
                          "%.0f us, past the %" PRId64 " us a trace may hold (clocks of different runs?)", in->name,
                          ev.line, count, ((double)ev.ts_ns + (double)in->shift_ns) / 1e3, PW_TRACE_MAX_US);
            goto out;
        }
        fputs(*first ? "\n" : ",\n", m->out);
        *first = 0;
        write_event(m->out, &ev, in->shift_ns);
        m->rep->events++;
    }
out:
    pw_trace_reader_close(rd);
    return st;
}

static int cmp_i64(const void *x, const void *y)
{
    const int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a > b) - (a < b);
}

/* Without world ranks: tracks 0 .. ranks-1 that no input has events of. */
static void note_missing_tracks(mg *m)
{
    const mg_input *first = &m->in[m->rep->order[0]];
    if (!first->info.present || first->info.has_clock || m->n < 2) return; /* with clocks plan() named them */
    if (m->n_tids) qsort(m->tids, m->n_tids, sizeof *m->tids, cmp_i64); /* tids is NULL without */
    /* Tracks 0 .. ranks-1 as ints (tids past that cannot be missing ranks). */
    const int R = first->info.ranks;
    int *have = malloc((m->n_tids ? m->n_tids : 1) * sizeof *have), n = 0;
    if (!have) return;
    for (size_t j = 0; j < m->n_tids; j++)
        if (m->tids[j] < R) have[n++] = (int)m->tids[j];
    char buf[256];
    int missing;
    list_missing(have, n, R, buf, sizeof buf, &missing);
    free(have);
    if (missing)
        add_note(m->rep, "warning: the %d files hold no events of rank%s %s of the %d the metadata names: %s time "
                 "counts as idle", m->n, missing > 1 ? "s" : "", buf, R, missing > 1 ? "their" : "its");
}

/* ------------------------------------------------------------ entry points */

pw_status pw_trace_merge(int n, pw_trace_merge_open_fn open, void *user, FILE *out, pw_trace_merge_report *rep)
{
    if (!rep) return pw_error(PW_ERR_INVALID_ARG, "pw_trace_merge: NULL report");
    memset(rep, 0, sizeof *rep);
    if (n < 1 || !open || !out) return pw_error(PW_ERR_INVALID_ARG, "pw_trace_merge: %d inputs", n);
    rep->n_inputs = n;
    mg m = {.n = n, .rep = rep, .out = out};
    m.in = calloc((size_t)n, sizeof *m.in);
    rep->order = calloc((size_t)n, sizeof *rep->order);
    pw_status st = PW_OK;
    if (!m.in || !rep->order) {
        st = mg_oom();
        goto out;
    }
    for (int i = 0; i < n; i++) PW_CHECK_GOTO(read_head(open, user, i, &m.in[i]), st, out);
    PW_CHECK_GOTO(plan(&m), st, out);
    write_head(&m);
    int first = 1;
    for (int k = 0; k < n; k++) PW_CHECK_GOTO(copy_events(&m, open, user, rep->order[k], &first), st, out);
    fputs("\n]}\n", out);
    note_missing_tracks(&m);
    if (ferror(out)) st = pw_error(PW_ERR_IO, "trace merge: cannot write the merged trace: %s", strerror(errno));
out:
    for (int i = 0; m.in && i < n; i++) input_free(&m.in[i]);
    free(m.in);
    set_free(&m.owner);
    set_free(&m.meta_seen);
    free(m.tids);
    return st;
}

typedef struct files_ctx {
    const char *const *paths;
} files_ctx;

static pw_status open_file(void *user, int i, pw_trace_reader **out)
{
    const files_ctx *c = user;
    return pw_trace_reader_open(c->paths[i], out);
}

pw_status pw_trace_merge_files(const char *const *paths, int n, FILE *out, pw_trace_merge_report *rep)
{
    if (rep) memset(rep, 0, sizeof *rep);
    for (int i = 0; paths && i < n; i++)
        if (!strcmp(paths[i], "-"))
            return pw_error(PW_ERR_INVALID_ARG, "trace merge: stdin ('-') cannot be merged (each input is read "
                            "twice): name the files");
    files_ctx c = {.paths = paths};
    return pw_trace_merge(n, open_file, &c, out, rep);
}

void pw_trace_merge_report_free(pw_trace_merge_report *rep)
{
    if (!rep) return;
    for (int i = 0; i < rep->n_notes; i++) free(rep->notes[i]);
    free(rep->notes);
    free(rep->order);
    memset(rep, 0, sizeof *rep);
}
