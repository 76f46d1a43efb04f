/* pipewright — trace buffers and the Chrome Trace Event JSON writer. */
#include "runtime/trace.h"
#include "runtime/tmpfile.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct trace_track {
    pw_trace_event *ev;
    int64_t n, cap, dropped;
    char pad[64];            /* keep tracks' counters off each other's cache lines */
} trace_track;

struct pw_trace {
    int n_tracks;
    trace_track *tracks;
    int pid;               /* the "pid" of every event (pw_trace_set_pid) */
};

void pw_trace_set_pid(pw_trace *t, int pid)
{
    if (t) t->pid = pid > 0 ? pid : 0;
}

int64_t pw_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

pw_status pw_trace_create(int n_tracks, int64_t events_per_track, pw_trace **out)
{
    *out = NULL;
    if (n_tracks < 1 || events_per_track < 1 || events_per_track > (INT64_C(1) << 32))
        return pw_error(PW_ERR_INVALID_ARG, "trace: bad size (%d tracks x %" PRId64 " events)",
                        n_tracks, events_per_track);
    pw_trace *t = calloc(1, sizeof *t);
    if (!t) return pw_error(PW_ERR_NOMEM, "trace: out of memory");
    t->n_tracks = n_tracks;
    t->tracks = calloc((size_t)n_tracks, sizeof *t->tracks);
    if (!t->tracks) {
        free(t);
        return pw_error(PW_ERR_NOMEM, "trace: out of memory");
    }
    for (int i = 0; i < n_tracks; i++) {
        /* Allocated and touched now so recording never page-faults or mallocs. */
        t->tracks[i].ev = calloc((size_t)events_per_track, sizeof(pw_trace_event));
        if (!t->tracks[i].ev) {
            pw_trace_destroy(t);
            return pw_error(PW_ERR_NOMEM, "trace: cannot allocate %" PRId64 " events",
                            events_per_track);
        }
        t->tracks[i].cap = events_per_track;
    }
    *out = t;
    return PW_OK;
}

void pw_trace_destroy(pw_trace *t)
{
    if (!t) return;
    for (int i = 0; t->tracks && i < t->n_tracks; i++) free(t->tracks[i].ev);
    free(t->tracks);
    free(t);
}

pw_trace_event *pw_trace_push(pw_trace *t, int track)
{
    if (!t || track < 0 || track >= t->n_tracks) return NULL;
    trace_track *k = &t->tracks[track];
    if (k->n >= k->cap) {
        k->dropped++;
        return NULL;
    }
    pw_trace_event *e = &k->ev[k->n++];
    memset(e, 0, sizeof *e);
    e->chunk = e->mb = e->peer = -1;
    return e;
}

int64_t pw_trace_count(const pw_trace *t, int track)
{
    return t && track >= 0 && track < t->n_tracks ? t->tracks[track].n : 0;
}

const pw_trace_event *pw_trace_events(const pw_trace *t, int track)
{
    return t && track >= 0 && track < t->n_tracks ? t->tracks[track].ev : NULL;
}

int64_t pw_trace_dropped(const pw_trace *t, int track)
{
    return t && track >= 0 && track < t->n_tracks ? t->tracks[track].dropped : 0;
}

static const char *cat_name(int cat)
{
    switch (cat) {
    case PW_TRACE_COMPUTE: return "compute";
    case PW_TRACE_COMM: return "comm";
    case PW_TRACE_WAIT: return "wait";
    case PW_TRACE_STEP: return "step";
    case PW_TRACE_REBALANCE: return "rebalance";
    case PW_TRACE_TP: return "tp";
    default: return "other";
    }
}

/* JSON string body with escapes (names are ours, but paths are users'). */
void pw_trace_write_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
        if (*p == '"' || *p == '\\') fprintf(f, "\\%c", *p);
        else if (*p < 0x20) fprintf(f, "\\u%04x", *p);
        else fputc(*p, f);
    }
    fputc('"', f);
}

static void put_int_array(FILE *f, const int *v, int n)
{
    fputc('[', f);
    for (int i = 0; v && i < n; i++) fprintf(f, "%s%d", i ? ", " : "", v[i]);
    fputc(']', f);
}

/* The process's clock record (pw_trace_set_clock): set once at start-up,
 * before any trace is written, and only read after. */
static pw_trace_clock g_clock;
static int g_clock_set;

void pw_trace_set_clock(const pw_trace_clock *c)
{
    if (c) g_clock = *c;
    g_clock.host[sizeof g_clock.host - 1] = '\0';
    g_clock_set = c != NULL;
}

int pw_trace_get_clock(pw_trace_clock *out)
{
    if (g_clock_set && out) *out = g_clock;
    return g_clock_set;
}

static void write_clock(FILE *f, const pw_trace_clock *c, int64_t t0_ns)
{
    fprintf(f, ", \"clock\": {\"t0_ns\": %" PRId64 ", \"world_rank\": %d, \"world_size\": %d, "
            "\"offset_ns\": %" PRId64 ", \"measured_offset_ns\": %" PRId64 ", \"rtt_ns\": %" PRId64
            ", \"same_host\": %s, \"host\": ", t0_ns, c->world_rank, c->world_size, c->offset_ns,
            c->measured_ns, c->rtt_ns, c->same_host ? "true" : "false");
    pw_trace_write_string(f, c->host);
    fprintf(f, ", \"run\": \"%016" PRIx64 "\"}", c->run_id);
}

void pw_trace_write_meta(FILE *f, const pw_trace_meta *m, int64_t dropped, const pw_trace_clock *clock,
                         int64_t t0_ns)
{
    fprintf(f, "\"pipewright\": {\"version\": 1, \"schedule\": ");
    pw_trace_write_string(f, m->schedule);
    fprintf(f, ", \"graph\": ");
    pw_trace_write_string(f, m->graph);
    fprintf(f, ", \"ranks\": %d, \"stages\": %d", m->n_ranks, m->n_chunks);
    if (m->n_micro > 0) fprintf(f, ", \"micro_batches\": %d", m->n_micro); /* a merged generic block may lack it */
    fprintf(f, ", \"replicas\": %d, \"micro_batch_size\": %" PRId64 ", \"steps\": %" PRId64
            ", \"theory_bubble\": %.6f", m->n_replicas > 0 ? m->n_replicas : 1, m->micro_batch, m->steps,
            m->theory_bubble);
    if (m->peak_inflight) {
        fprintf(f, ", \"peak_inflight\": ");
        put_int_array(f, m->peak_inflight, m->n_ranks);
    }
    if (m->measured_peak) {
        fprintf(f, ", \"measured_peak\": ");
        put_int_array(f, m->measured_peak, m->n_ranks);
    }
    if (m->costs) {
        fprintf(f, ", \"stage_costs\": [");
        for (int c = 0; c < m->n_chunks; c++) {
            const pw_trace_stage_cost *k = &m->costs[c];
            fprintf(f, "%s{\"stage\": %d, \"nodes\": [%d, %d], \"flops_fwd\": %.6g, "
                    "\"flops_bwd_input\": %.6g, \"flops_bwd_weight\": %.6g, \"param_bytes\": %"
                    PRId64 ", \"act_bytes\": %" PRId64 "}", c ? ", " : "", c, k->node_begin,
                    k->node_end, k->flops_fwd, k->flops_bwd_input, k->flops_bwd_weight,
                    k->param_bytes, k->act_bytes);
        }
        fputc(']', f);
    }
    if (clock) write_clock(f, clock, t0_ns);
    fprintf(f, ", \"dropped_events\": %" PRId64 "}", dropped);
}

pw_status pw_trace_write(const pw_trace *t, const char *path, const pw_trace_meta *m)
{
    char tmp[4096];
    if (pw_tmpfile_name(path, tmp, sizeof tmp) != 0)
        return pw_error(PW_ERR_INVALID_ARG, "trace: path too long: %s", path);
    /* Registered before it exists, so an interrupted run (pipeline-run's
     * signal handler) unlinks it wherever the signal lands. */
    const int tmp_slot = pw_tmpfile_register(tmp);
    const int fd = pw_tmpfile_create(tmp_slot, tmp);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f) {
        if (fd >= 0) {
            close(fd);
            unlink(tmp);
        }
        pw_tmpfile_forget(tmp_slot);
        return pw_error(PW_ERR_IO, "%s: %s", tmp, strerror(errno));
    }

    int64_t t_base = INT64_MAX;
    for (int r = 0; r < t->n_tracks; r++)
        for (int64_t i = 0; i < t->tracks[r].n; i++)
            if (t->tracks[r].ev[i].t0_ns < t_base) t_base = t->tracks[r].ev[i].t0_ns;
    if (t_base == INT64_MAX) t_base = 0;

    int64_t dropped = 0;
    for (int r = 0; r < t->n_tracks; r++) dropped += t->tracks[r].dropped;
    pw_trace_clock clock;
    const int has_clock = pw_trace_get_clock(&clock);
    fprintf(f, "{\"displayTimeUnit\": \"ns\",\n");
    pw_trace_write_meta(f, m, dropped, has_clock ? &clock : NULL, t_base);
    fprintf(f, ",\n\"traceEvents\": [\n");
    const int pid = t->pid;
    if (pid == 0) {
        fprintf(f, "{\"name\": \"process_name\", \"ph\": \"M\", \"pid\": 0, \"tid\": 0, "
                "\"args\": {\"name\": \"pipewright\"}}");
        for (int r = 0; r < t->n_tracks; r++)
            fprintf(f, ",\n{\"name\": \"thread_name\", \"ph\": \"M\", \"pid\": 0, \"tid\": %d, "
                    "\"args\": {\"name\": \"rank %d\"}}", r, r);
    } else {
        fprintf(f, "{\"name\": \"process_name\", \"ph\": \"M\", \"pid\": %d, \"tid\": 0, "
                "\"args\": {\"name\": \"pipewright tensor rank %d\"}}", pid, pid);
        for (int r = 0; r < t->n_tracks; r++)
            fprintf(f, ",\n{\"name\": \"thread_name\", \"ph\": \"M\", \"pid\": %d, \"tid\": %d, "
                    "\"args\": {\"name\": \"rank %d tp %d\"}}", pid, r, r, pid);
    }
    for (int r = 0; r < t->n_tracks; r++) {
        for (int64_t i = 0; i < t->tracks[r].n; i++) {
            const pw_trace_event *e = &t->tracks[r].ev[i];
            /* Microseconds with ns precision, as Chrome's format wants. */
            fprintf(f, ",\n{\"name\": ");
            pw_trace_write_string(f, e->name);
            fprintf(f, ", \"cat\": \"%s\", \"ph\": \"X\", \"pid\": %d, \"tid\": %d, \"ts\": %.3f, "
                    "\"dur\": %.3f, \"args\": {\"step\": %" PRId64, cat_name(e->cat), pid, r,
                    (double)(e->t0_ns - t_base) / 1e3, (double)(e->t1_ns - e->t0_ns) / 1e3,
                    e->step);
            if (e->chunk >= 0) fprintf(f, ", \"stage\": %d", e->chunk);
            if (e->mb >= 0) fprintf(f, ", \"mb\": %d", e->mb);
            if (e->peer >= 0) fprintf(f, ", \"peer\": %d", e->peer);
            if (e->bytes) fprintf(f, ", \"bytes\": %" PRId64, e->bytes);
            if (e->wire_bytes) fprintf(f, ", \"wire_bytes\": %" PRId64, e->wire_bytes);
            fprintf(f, "}}");
        }
    }
    fprintf(f, "\n]}\n");
    int bad = ferror(f);
    if (fflush(f) != 0) bad = 1;
    if (fsync(fileno(f)) != 0) bad = 1;
    if (fclose(f) != 0) bad = 1;
    if (bad) {
        int err = errno;
        unlink(tmp);
        pw_tmpfile_forget(tmp_slot);
        return pw_error(PW_ERR_IO, "%s: cannot write trace: %s", path, strerror(err));
    }
    if (rename(tmp, path) != 0) {
        int err = errno;
        unlink(tmp);
        pw_tmpfile_forget(tmp_slot);
        return pw_error(PW_ERR_IO, "%s: %s", path, strerror(err));
    }
    pw_tmpfile_forget(tmp_slot);
    return PW_OK;
}

void pw_trace_rank_path(const char *path, int world_rank, char *out, size_t n)
{
    if (world_rank < 0) {
        snprintf(out, n, "%s", path);
        return;
    }
    const char *dot = strrchr(path, '.');
    const char *slash = strrchr(path, '/');
    if (dot && (!slash || dot > slash))
        snprintf(out, n, "%.*s.rank%d%s", (int)(dot - path), path, world_rank, dot);
    else
        snprintf(out, n, "%s.rank%d", path, world_rank);
}
