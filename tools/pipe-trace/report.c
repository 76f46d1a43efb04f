/* pipe-trace — the terminal report: summary, bubble explanation, per-rank
 * table, idle causes, critical path and a Unicode-block Gantt chart of the
 * detail step (ANSI colours on a terminal, distinct block shades otherwise). */
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "pipe-trace.h"

double pt_ms(int64_t ns) { return (double)ns / 1e6; }

const char *pt_rank_label(const pw_trace_analysis *a, int r)
{
    return r >= 0 && r < a->n_ranks ? a->ranks[r].label : "?";
}

void pt_event_text(const pw_ta_event *e, char *buf, size_t n)
{
    if (e->cls == PW_TA_WAIT) {
        if (e->mb >= 0) snprintf(buf, n, "%s mb %d", e->name, e->mb);
        else snprintf(buf, n, "%s", e->name);
    } else if (e->mb >= 0 && e->cls <= PW_TA_W) {
        snprintf(buf, n, "%s%d", e->name, e->mb);
    } else if (e->mb >= 0) {
        snprintf(buf, n, "%s mb %d", e->name, e->mb);
    } else {
        snprintf(buf, n, "%s", e->name);
    }
}

/* `s` cut to at most `cols` characters (UTF-8 aware, never splitting one)
 * and padded with spaces to exactly `cols` columns, into buf. Labels come
 * from traces (thread names) and may be any UTF-8. */
static const char *fit(const char *s, int cols, char *buf, size_t n)
{
    size_t i = 0;
    int w = 0;
    const unsigned char *p = (const unsigned char *)s;
    while (*p && w < cols) {
        int len = *p < 0x80 ? 1 : (*p >> 5) == 6 ? 2 : (*p >> 4) == 14 ? 3 : 4;
        if (i + (size_t)len + 1 >= n) break;
        for (int k = 0; k < len && *p; k++) buf[i++] = (char)*p++;
        w++;
    }
    while (w < cols && i + 1 < n) {
        buf[i++] = ' ';
        w++;
    }
    buf[i] = 0;
    return buf;
}

/* ------------------------------------------------------------ styling */

typedef struct style {
    const char *glyph;        /* plain mode */
    const char *fg, *bg;      /* ANSI colour mode */
} style;

static const style k_style[PW_TA_CLASS_COUNT] = {
    [PW_TA_F] = {"█", "\033[38;5;33m", "\033[48;5;33m\033[38;5;16m"},
    [PW_TA_B] = {"▓", "\033[38;5;34m", "\033[48;5;34m\033[38;5;16m"},
    [PW_TA_W] = {"▒", "\033[38;5;214m", "\033[48;5;214m\033[38;5;16m"},
    [PW_TA_OPTIM] = {"▚", "\033[38;5;135m", "\033[48;5;135m\033[38;5;16m"},
    [PW_TA_OTHER] = {"▞", "\033[38;5;37m", "\033[48;5;37m\033[38;5;16m"},
    [PW_TA_COMM] = {"┄", "\033[38;5;245m", "\033[48;5;245m\033[38;5;16m"},
    [PW_TA_WAIT] = {"░", "\033[38;5;203m", "\033[48;5;203m\033[38;5;16m"},
    [PW_TA_IDLE] = {" ", "", ""},
};
#define RESET "\033[0m"
#define BOLD "\033[1m"

static const char *glyph_colour(int cls) { return cls == PW_TA_IDLE ? " " : "█"; }

static const char *bold(const pt_options *o) { return o->color ? BOLD : ""; }
static const char *reset(const pt_options *o) { return o->color ? RESET : ""; }

/* ------------------------------------------------------------ summary */

static void header(FILE *f, const pw_trace_analysis *a, const pt_options *o)
{
    fprintf(f, "%spipe-trace: %s%s\n", bold(o), a->file, reset(o));
    if (a->has_meta) {
        const pw_trace_info *m = &a->meta;
        fprintf(f, "  graph %s, schedule %s, %d rank%s (%d stage%s x %d replica%s), %d micro-batches",
                *m->graph ? m->graph : "?", *m->schedule ? m->schedule : "?", m->ranks, m->ranks == 1 ? "" : "s",
                m->stages, m->stages == 1 ? "" : "s", m->replicas, m->replicas == 1 ? "" : "s", m->micro_batches);
        if (m->micro_batch_size) fprintf(f, " of %" PRId64, m->micro_batch_size);
        fprintf(f, ", %" PRId64 " steps traced\n", m->steps);
    } else {
        fprintf(f, "  generic Chrome trace: %d thread%s, %" PRId64 " events\n", a->n_ranks,
                a->n_ranks == 1 ? "" : "s", a->n_events);
    }
    if (a->n_analysed > 0) {
        fprintf(f, "  %" PRId64 " step%s analysed", a->n_analysed, a->n_analysed == 1 ? "" : "s");
        if (a->n_steps > a->n_analysed) fprintf(f, " (first %" PRId64 " skipped)", a->n_steps - a->n_analysed);
        fprintf(f, "; step time median %.3f ms (step %" PRId64 "), mean %.3f, min %.3f, max %.3f ms\n",
                pt_ms(a->step_ns_median), a->median_step, pt_ms(a->step_ns_mean), pt_ms(a->step_ns_min),
                pt_ms(a->step_ns_max));
    } else {
        fprintf(f, "  no steps to analyse\n");
    }
}

static void bubble_section(FILE *f, const pw_trace_analysis *a, const pt_options *o)
{
    if (a->bubble < 0) return;
    fprintf(f, "\n%sBubble%s: measured %s%.1f%%%s", bold(o), reset(o), bold(o), 100 * a->bubble, reset(o));
    if (a->theory >= 0) fprintf(f, ", theory %.1f%% (%s)", 100 * a->theory, a->theory_source);
    if (a->model_bubble_optim >= 0) fprintf(f, ", stage-time model %.1f%%", 100 * a->model_bubble_optim);
    fprintf(f, "\n  %s\n", a->explanation);
}

/* ------------------------------------------------------------ per rank */

static void times_row(FILE *f, const char *label, const pw_ta_times *t, double div, double bubble)
{
    char lb[64];
    fprintf(f, "  %s %8.3f %7.3f %7.3f %7.3f %7.3f %7.3f | %7.3f %7.3f %7.3f %7.3f | %7.3f %7.3f | %5.1f%%\n",
            fit(label, 10, lb, sizeof lb), pt_ms(t->window) / div, pt_ms(t->busy[PW_TA_F]) / div, pt_ms(t->busy[PW_TA_B]) / div,
            pt_ms(t->busy[PW_TA_W]) / div, pt_ms(t->busy[PW_TA_OPTIM] + t->busy[PW_TA_OTHER]) / div,
            pt_ms(t->busy[PW_TA_COMM]) / div, pt_ms(t->idle) / div, pt_ms(t->idle_phase[PW_TA_WARMUP]) / div,
            pt_ms(t->idle_phase[PW_TA_STEADY]) / div, pt_ms(t->idle_phase[PW_TA_COOLDOWN]) / div,
            pt_ms(t->wait_comm) / div, pt_ms(t->exposed_allreduce) / div, 100 * bubble);
}

static void rank_table(FILE *f, const pw_trace_analysis *a, const pt_options *o)
{
    if (a->n_analysed == 0 || a->n_ranks == 0) return;
    const double div = (double)a->n_analysed;
    fprintf(f, "\n%sPer rank%s, mean per step (ms)\n", bold(o), reset(o));
    fprintf(f, "  %-10s %8s %7s %7s %7s %7s %7s | %7s %7s %7s %7s | %7s %7s | %6s\n", "", "step", "F", "B", "W",
            "optim", "comm", "idle", "warm-up", "steady", "cool-dn", "recv-wt", "allred", "bubble");
    for (int r = 0; r < a->n_ranks; r++) times_row(f, a->ranks[r].label, &a->ranks[r].total, div, a->ranks[r].bubble);
    times_row(f, "all ranks", &a->total, div, a->bubble);
    if (a->has_meta && a->meta.n_peak_inflight == a->n_ranks && a->meta.n_measured_peak == a->n_ranks) {
        fprintf(f, "  peak in-flight activations (predicted / measured):");
        for (int r = 0; r < a->n_ranks; r++)
            fprintf(f, " %s %d/%d", a->ranks[r].label, a->meta.peak_inflight[r], a->meta.measured_peak[r]);
        fputc('\n', f);
    }
}

/* ------------------------------------------------------------ causes */

static void cause_section(FILE *f, const pw_trace_analysis *a, const pt_options *o)
{
    if (a->n_causes == 0) return;
    int64_t idle = a->total.idle;
    int n = o->top > 0 && o->top < a->n_causes ? o->top : a->n_causes;
    fprintf(f, "\n%sIdle by cause%s (analysed steps, largest first", bold(o), reset(o));
    if (n < a->n_causes) fprintf(f, "; top %d of %d, --top 0 lists all", n, a->n_causes);
    fprintf(f, ")\n  %10s %6s %6s %20s  %-10s %s\n", "total ms", "share", "gaps", "largest ms (step)", "rank",
            "cause [phase]");
    for (int i = 0; i < n; i++) {
        const pw_ta_cause *c = &a->causes[i];
        char what[160], largest[48];
        pw_ta_cause_format(c, what, sizeof what);
        int ph = 0;
        for (int p = 1; p < PW_TA_N_PHASES; p++)
            if (c->phase_ns[p] > c->phase_ns[ph]) ph = p;
        snprintf(largest, sizeof largest, "%.3f (%" PRId64 ")", pt_ms(c->max_ns), c->max_step);
        char lb[64];
        fprintf(f, "  %10.3f %5.1f%% %6" PRId64 " %20s  %s %s [%s]\n", pt_ms(c->total_ns),
                idle > 0 ? 100.0 * (double)c->total_ns / (double)idle : 0.0, c->n_gaps, largest,
                fit(pt_rank_label(a, c->rank), 10, lb, sizeof lb), what, pw_ta_phase_name(ph));
    }
}

/* ------------------------------------------------------------ critical path */

static void path_section(FILE *f, const pw_trace_analysis *a, const pt_options *o)
{
    const pw_ta_detail *d = &a->detail;
    if (d->step < 0 || d->n_path == 0) return;
    const int R = a->n_ranks;
    int64_t *per_rank = calloc((size_t)R + 1, sizeof *per_rank);
    if (!per_rank) return;
    int hops = 0;
    for (int i = 0; i < d->n_path; i++) {
        const pw_ta_path_item *p = &d->path[i];
        if (p->kind == PW_PATH_ACTION && d->events[p->event].cls < PW_TA_N_COMPUTE) per_rank[p->rank] += p->t1 - p->t0;
        if (p->kind == PW_PATH_HANDOFF) hops++;
    }
    fprintf(f, "\n%sCritical path%s of step %" PRId64 ": %.3f ms = compute %.3f (", bold(o), reset(o), d->step,
            pt_ms(d->t1 - d->t0), pt_ms(d->path_compute_ns));
    int first = 1;
    for (int r = 0; r < R; r++) {
        if (!per_rank[r]) continue;
        fprintf(f, "%s%s %.3f", first ? "" : ", ", a->ranks[r].label, pt_ms(per_rank[r]));
        first = 0;
    }
    fprintf(f, ") + other actions and waits %.3f + hand-offs %.3f (%d) + gaps %.3f\n",
            pt_ms(d->path_ns[PW_PATH_ACTION] - d->path_compute_ns), pt_ms(d->path_ns[PW_PATH_HANDOFF]), hops,
            pt_ms(d->path_ns[PW_PATH_GAP] + d->path_ns[PW_PATH_START]));
    free(per_rank);
    if (o->path) {
        fprintf(f, "  %10s %9s  %-10s %s\n", "start ms", "ms", "rank", "item");
        for (int i = 0; i < d->n_path; i++) {
            const pw_ta_path_item *p = &d->path[i];
            char txt[160];
            switch (p->kind) {
            case PW_PATH_ACTION: pt_event_text(&d->events[p->event], txt, sizeof txt); break;
            case PW_PATH_HANDOFF:
                snprintf(txt, sizeof txt, "hand-off from %s (%s)", pt_rank_label(a, p->from_rank),
                         d->events[p->event].name);
                break;
            case PW_PATH_GAP: snprintf(txt, sizeof txt, "untracked gap"); break;
            case PW_PATH_START: snprintf(txt, sizeof txt, "step start"); break;
            }
            char lb[64];
            fprintf(f, "  %10.3f %9.3f  %s %s\n", pt_ms(p->t0 - d->t0), pt_ms(p->t1 - p->t0),
                    fit(pt_rank_label(a, p->rank), 10, lb, sizeof lb), txt);
        }
        return;
    }
    /* Compact chain: compute actions, a rank change at each hand-off. */
    fprintf(f, "  ");
    int col = 2, cur_rank = -1;
    for (int i = 0; i < d->n_path; i++) {
        const pw_ta_path_item *p = &d->path[i];
        char tok[96];
        if (p->kind == PW_PATH_ACTION && d->events[p->event].cls != PW_TA_COMM) {
            char ev[64];
            pt_event_text(&d->events[p->event], ev, sizeof ev);
            if (p->rank != cur_rank) snprintf(tok, sizeof tok, "%s[r%d] %s", cur_rank < 0 ? "" : "=> ", p->rank, ev);
            else snprintf(tok, sizeof tok, "%s", ev);
            cur_rank = p->rank;
        } else {
            continue;
        }
        int len = (int)strlen(tok) + 1;
        if (col + len > o->width && col > 2) {
            fprintf(f, "\n  ");
            col = 2;
        }
        fprintf(f, "%s ", tok);
        col += len;
    }
    fprintf(f, "\n  (--path lists every item with its time)\n");
}

/* ------------------------------------------------------------ gaps */

static void gap_section(FILE *f, const pw_trace_analysis *a, const pt_options *o)
{
    const pw_ta_detail *d = &a->detail;
    if (!o->gaps || d->step < 0) return;
    fprintf(f, "\n%sIdle gaps of step %" PRId64 "%s (%d)\n", bold(o), d->step, reset(o), d->n_gaps);
    fprintf(f, "  %-10s %10s %9s  %-9s %s\n", "rank", "start ms", "ms", "phase", "cause");
    for (int i = 0; i < d->n_gaps; i++) {
        const pw_ta_gap *g = &d->gaps[i];
        char what[192];
        pw_ta_gap_format(a, g, what, sizeof what);
        char lb[64];
        fprintf(f, "  %s %10.3f %9.3f  %-9s %s\n", fit(pt_rank_label(a, g->rank), 10, lb, sizeof lb),
                pt_ms(g->t0 - d->t0), pt_ms(g->t1 - g->t0), pw_ta_phase_name(g->phase), what);
    }
}

/* ------------------------------------------------------------ Gantt */

static void gantt(FILE *f, const pw_trace_analysis *a, const pt_options *o)
{
    const pw_ta_detail *d = &a->detail;
    if (d->step < 0 || d->t1 <= d->t0 || a->n_ranks == 0) return;
    int label_w = 4;
    for (int r = 0; r < a->n_ranks; r++) {
        int l = 0; /* characters, not bytes */
        for (const unsigned char *p = (const unsigned char *)a->ranks[r].label; *p; p++) l += (*p & 0xc0) != 0x80;
        if (l > label_w) label_w = l;
    }
    if (label_w > 16) label_w = 16;
    int cols = o->width - label_w - 5;
    if (cols < 10) cols = 10;
    const double span = (double)(d->t1 - d->t0), dt = span / cols;
    const pw_ta_step *sp = NULL;
    for (int64_t i = 0; i < a->n_steps; i++)
        if (a->steps[i].step == d->step) sp = &a->steps[i];
    fprintf(f, "\n%sStep %" PRId64 "%s (%s): %.3f ms", bold(o), d->step, reset(o),
            d->requested ? "--step" : "median duration", pt_ms(d->t1 - d->t0));
    if (sp) fprintf(f, ", bubble %.1f%%", 100 * sp->bubble);
    fprintf(f, "; one column = %.3f ms\n", dt / 1e6);

    int *cls = malloc((size_t)cols * sizeof *cls), *evi = malloc((size_t)cols * sizeof *evi);
    double *cover = malloc((size_t)cols * PW_TA_CLASS_COUNT * sizeof *cover);
    if (!cls || !evi || !cover) goto out;
    for (int r = 0; r < a->n_ranks; r++) {
        /* Each column shows the class that covers most of it. */
        memset(cover, 0, (size_t)cols * PW_TA_CLASS_COUNT * sizeof *cover);
        for (int c = 0; c < cols; c++) evi[c] = -1;
        double *best_ev = calloc((size_t)cols, sizeof *best_ev);
        if (!best_ev) goto out;
        for (int i = 0; i < d->n_segments[r]; i++) {
            const pw_ta_segment *s = &d->segments[r][i];
            double x0 = (double)(s->t0 - d->t0) / dt, x1 = (double)(s->t1 - d->t0) / dt;
            for (int c = (int)floor(x0); c < cols && c < (int)ceil(x1); c++) {
                if (c < 0) continue;
                double lo = x0 > c ? x0 : c, hi = x1 < c + 1 ? x1 : c + 1;
                if (hi <= lo) continue;
                cover[c * PW_TA_CLASS_COUNT + s->cls] += hi - lo;
                if (s->event >= 0 && s->cls <= PW_TA_W && hi - lo > best_ev[c]) {
                    best_ev[c] = hi - lo;
                    evi[c] = s->event;
                }
            }
        }
        free(best_ev);
        for (int c = 0; c < cols; c++) {
            int bc = PW_TA_IDLE;
            double bv = 0;
            for (int k = 0; k < PW_TA_CLASS_COUNT; k++) {
                /* prefer compute on ties: thin actions stay visible */
                double v = cover[c * PW_TA_CLASS_COUNT + k] + (k < PW_TA_N_COMPUTE ? 1e-9 : 0);
                if (v > bv) {
                    bv = v;
                    bc = k;
                }
            }
            if (bv < 1e-6) bc = PW_TA_IDLE;
            cls[c] = bc;
            if (bc > PW_TA_W) evi[c] = -1;
        }
        /* Micro-batch numbers on runs of one F/B/W event wide enough. */
        char *digit = calloc((size_t)cols, 1);
        if (!digit) goto out;
        for (int c = 0; c < cols;) {
            int e = evi[c], c1 = c + 1;
            while (c1 < cols && evi[c1] == e && cls[c1] == cls[c]) c1++;
            if (e >= 0 && d->events[e].mb >= 0) {
                char txt[16];
                int len = snprintf(txt, sizeof txt, "%d", d->events[e].mb);
                if (len < c1 - c) { /* leave at least one glyph of the class visible */
                    int at = c + (c1 - c - len) / 2;
                    for (int k = 0; k < len; k++) digit[at + k] = txt[k];
                }
            }
            c = c1;
        }
        char lb[96];
        fprintf(f, "  %s │", fit(a->ranks[r].label, label_w, lb, sizeof lb));
        int prev = -1, prev_digit = -1;
        for (int c = 0; c < cols; c++) {
            const style *st = &k_style[cls[c]];
            if (o->color) {
                int is_digit = digit[c] != 0;
                if (cls[c] != prev || is_digit != prev_digit) {
                    fputs(RESET, f);
                    fputs(is_digit ? st->bg : st->fg, f);
                    prev = cls[c];
                    prev_digit = is_digit;
                }
                if (is_digit) fputc(digit[c], f);
                else fputs(glyph_colour(cls[c]), f);
            } else {
                if (digit[c]) fputc(digit[c], f);
                else fputs(st->glyph, f);
            }
        }
        if (o->color) fputs(RESET, f);
        fputs("│\n", f);
        free(digit);
    }
    /* Time axis: ticks at 0, 1/4, 1/2, 3/4 and the end, where they fit. */
    {
        char *axis = malloc((size_t)cols + 32);
        if (!axis) goto out;
        memset(axis, ' ', (size_t)cols + 31);
        axis[cols + 31] = 0;
        int used_to = -1;
        for (int k = 0; k <= 4; k++) {
            char txt[32];
            int len = snprintf(txt, sizeof txt, k == 4 ? "%.3f ms" : "%.3f", pt_ms(d->t1 - d->t0) * k / 4);
            int at = (int)((double)cols * k / 4) - (k == 4 ? len - 1 : k ? len / 2 : 0);
            if ((used_to >= 0 && at <= used_to) || at < 0 || at + len > cols + 31) continue;
            memcpy(axis + at, txt, (size_t)len);
            used_to = at + len;
        }
        int end = cols + 31;
        while (end > 0 && axis[end - 1] == ' ') end--;
        axis[end] = 0;
        fprintf(f, "  %-*s  %s\n", label_w, "", axis);
        free(axis);
    }
out:
    free(cls);
    free(evi);
    free(cover);
}

static void legend(FILE *f, const pt_options *o)
{
    static const int order[] = {PW_TA_F, PW_TA_B, PW_TA_W, PW_TA_OPTIM, PW_TA_OTHER, PW_TA_COMM, PW_TA_WAIT, PW_TA_IDLE};
    static const char *names[] = {"F", "B", "W", "optimizer", "other", "send/recv", "waiting", "idle"};
    fprintf(f, "  legend:");
    for (size_t i = 0; i < sizeof order / sizeof *order; i++) {
        const style *st = &k_style[order[i]];
        if (order[i] == PW_TA_IDLE) {
            fprintf(f, "  '%s' %s", " ", names[i]);
        } else if (o->color) {
            fprintf(f, "  %s%s%s %s", st->fg, "█", RESET, names[i]);
        } else {
            fprintf(f, "  %s %s", st->glyph, names[i]);
        }
    }
    fprintf(f, "; digits: micro-batch\n");
}

static void notes(FILE *f, const pw_trace_analysis *a, const pt_options *o)
{
    if (a->n_notes == 0) return;
    fprintf(f, "\n%sNotes%s\n", bold(o), reset(o));
    for (int i = 0; i < a->n_notes; i++) fprintf(f, "  - %s\n", a->notes[i]);
}

/* Re-partitions (pipeline-run --rebalance): when, what they moved, and the
 * step time before and after. */
static void moves_section(FILE *f, const pw_trace_analysis *a, const pt_options *o)
{
    if (a->n_moves == 0) return;
    fprintf(f, "\n%sRe-partitions%s (the cuts moved between steps)\n", bold(o), reset(o));
    for (int i = 0; i < a->n_moves; i++) {
        const pw_ta_move *m = &a->moves[i];
        fprintf(f, "  after step %lld: %.2f MiB in %.1f ms", (long long)m->step, (double)m->bytes / 1048576.0,
                (double)(m->t1 - m->t0) / 1e6);
        if (m->step_ns_before > 0 && m->step_ns_after > 0)
            fprintf(f, "; median step %.2f ms before, %.2f ms after (%+.1f%%)", (double)m->step_ns_before / 1e6,
                    (double)m->step_ns_after / 1e6,
                    100.0 * ((double)m->step_ns_after / (double)m->step_ns_before - 1.0));
        fprintf(f, "\n");
    }
}

/* Gradient all-reduce across replicas: the bytes before and after
 * compression (pipeline-run --compress) and the time the step waited for it. */
static void allreduce_section(FILE *f, const pw_trace_analysis *a, const pt_options *o)
{
    if (a->allreduce_n == 0) return;
    const double na = a->n_analysed > 0 ? (double)a->n_analysed : 1;
    fprintf(f, "\n%sGradient all-reduce%s: %lld buckets, %.3f MiB of fp32 gradients", bold(o), reset(o),
            (long long)a->allreduce_n, (double)a->allreduce_bytes / 1048576.0);
    if (a->allreduce_compressed)
        fprintf(f, ", %.3f MiB on the wire after compression (ratio %.2fx)",
                (double)a->allreduce_wire_bytes / 1048576.0,
                a->allreduce_wire_bytes > 0 ? (double)a->allreduce_bytes / (double)a->allreduce_wire_bytes : 0.0);
    else
        fprintf(f, ", uncompressed");
    fprintf(f, "\n  exposed all-reduce time %.3f ms per step (all ranks; the rest overlapped the backward)\n",
            pt_ms(a->total.exposed_allreduce) / na);
}

/* Tensor parallelism's cross-rank sums (TP_ALLREDUCE events): time inside
 * F, B and W, on its own line per rank. */
static void tp_section(FILE *f, const pw_trace_analysis *a, const pt_options *o)
{
    if (a->tp_allreduce_n == 0) return;
    const double na = a->n_analysed > 0 ? (double)a->n_analysed : 1;
    fprintf(f, "\n%sTensor-parallel all-reduce%s: %lld sums, %.3f MiB (inside F, B and W; counted in their time "
            "above)\n", bold(o), reset(o), (long long)a->tp_allreduce_n, (double)a->tp_allreduce_bytes / 1048576.0);
    for (int r = 0; r < a->n_ranks; r++) {
        const pw_ta_times *t = &a->ranks[r].total;
        if (t->tp_allreduce == 0) continue;
        fprintf(f, "  %-10s %8.3f ms per step, %5.1f%% of its compute\n", a->ranks[r].label,
                pt_ms(t->tp_allreduce) / na, t->compute > 0 ? 100.0 * (double)t->tp_allreduce / (double)t->compute : 0.0);
    }
}

void pt_report(FILE *f, const pw_trace_analysis *a, const pt_options *o)
{
    header(f, a, o);
    bubble_section(f, a, o);
    rank_table(f, a, o);
    cause_section(f, a, o);
    path_section(f, a, o);
    gap_section(f, a, o);
    gantt(f, a, o);
    if (a->detail.step >= 0) legend(f, o);
    moves_section(f, a, o);
    allreduce_section(f, a, o);
    tp_section(f, a, o);
    notes(f, a, o);
}

/* ------------------------------------------------------------ compare */

static void cmp_row(FILE *f, const char *what, double x, double y, const char *unit, int points)
{
    fprintf(f, "  %-28s %12.3f %12.3f %+12.3f", what, x, y, y - x);
    if (points) fprintf(f, " points\n");
    else if (x > 0) fprintf(f, " %s (%+.1f%%)\n", unit, 100 * (y - x) / x);
    else fprintf(f, " %s\n", unit);
}

void pt_report_compare(FILE *f, const pw_trace_analysis *a, const pw_trace_analysis *b, const pt_options *o)
{
    fprintf(f, "%spipe-trace: A = %s, B = %s%s\n", bold(o), a->file, b->file, reset(o));
    const char *sa = a->has_meta ? a->meta.schedule : "?", *sb = b->has_meta ? b->meta.schedule : "?";
    fprintf(f, "  %-28s %12.12s %12.12s %12s\n", "", "A", "B", "B - A");
    fprintf(f, "  %-28s %12.12s %12.12s\n", "schedule", sa, sb);
    fprintf(f, "  %-28s %12d %12d\n", "ranks", a->n_ranks, b->n_ranks);
    fprintf(f, "  %-28s %12d %12d\n", "micro-batches", a->micro_batches, b->micro_batches);
    fprintf(f, "  %-28s %12" PRId64 " %12" PRId64 "\n", "steps analysed", a->n_analysed, b->n_analysed);
    cmp_row(f, "step time median (ms)", pt_ms(a->step_ns_median), pt_ms(b->step_ns_median), "ms", 0);
    cmp_row(f, "step time mean (ms)", pt_ms(a->step_ns_mean), pt_ms(b->step_ns_mean), "ms", 0);
    cmp_row(f, "bubble measured (%)", 100 * a->bubble, 100 * b->bubble, "", 1);
    if (a->theory >= 0 && b->theory >= 0) cmp_row(f, "bubble theory (%)", 100 * a->theory, 100 * b->theory, "", 1);
    const double na = a->n_analysed ? (double)a->n_analysed : 1, nb = b->n_analysed ? (double)b->n_analysed : 1;
    const pw_ta_times *ta = &a->total, *tb = &b->total;
    cmp_row(f, "compute, all ranks (ms/step)", pt_ms(ta->compute) / na, pt_ms(tb->compute) / nb, "ms", 0);
    cmp_row(f, "idle, all ranks (ms/step)", pt_ms(ta->idle) / na, pt_ms(tb->idle) / nb, "ms", 0);
    cmp_row(f, "  warm-up", pt_ms(ta->idle_phase[0]) / na, pt_ms(tb->idle_phase[0]) / nb, "ms", 0);
    cmp_row(f, "  steady-state", pt_ms(ta->idle_phase[1]) / na, pt_ms(tb->idle_phase[1]) / nb, "ms", 0);
    cmp_row(f, "  cool-down", pt_ms(ta->idle_phase[2]) / na, pt_ms(tb->idle_phase[2]) / nb, "ms", 0);
    cmp_row(f, "recv waits (ms/step)", pt_ms(ta->wait_comm) / na, pt_ms(tb->wait_comm) / nb, "ms", 0);
    cmp_row(f, "exposed all-reduce (ms/step)", pt_ms(ta->exposed_allreduce) / na, pt_ms(tb->exposed_allreduce) / nb, "ms", 0);
    int R = a->n_ranks > b->n_ranks ? a->n_ranks : b->n_ranks;
    fprintf(f, "\n%sPer rank%s, mean per step (ms): compute / idle / bubble\n", bold(o), reset(o));
    fprintf(f, "  %-10s %26s %26s %16s\n", "", "A", "B", "B - A idle");
    for (int r = 0; r < R; r++) {
        const pw_ta_rank *x = r < a->n_ranks ? &a->ranks[r] : NULL, *y = r < b->n_ranks ? &b->ranks[r] : NULL;
        char ca[64] = "-", cb[64] = "-";
        if (x) snprintf(ca, sizeof ca, "%8.3f %8.3f %6.1f%%", pt_ms(x->total.compute) / na, pt_ms(x->total.idle) / na, 100 * x->bubble);
        if (y) snprintf(cb, sizeof cb, "%8.3f %8.3f %6.1f%%", pt_ms(y->total.compute) / nb, pt_ms(y->total.idle) / nb, 100 * y->bubble);
        char lb[64];
        fprintf(f, "  %s %26s %26s", fit(x ? x->label : y->label, 10, lb, sizeof lb), ca, cb);
        if (x && y) fprintf(f, " %+12.3f ms", pt_ms(y->total.idle) / nb - pt_ms(x->total.idle) / na);
        fputc('\n', f);
    }
    fprintf(f, "\n  A: %s\n  B: %s\n", a->explanation, b->explanation);
    for (int k = 0; k < 2; k++) {
        const pw_trace_analysis *x = k ? b : a;
        if (x->n_causes == 0) continue;
        fprintf(f, "\n%sLargest idle causes of %s%s\n", bold(o), k ? "B" : "A", reset(o));
        int n = x->n_causes < 5 ? x->n_causes : 5;
        for (int i = 0; i < n; i++) {
            char what[160];
            pw_ta_cause_format(&x->causes[i], what, sizeof what);
            char lb[64];
            fprintf(f, "  %10.3f ms/step  %s %s\n", pt_ms(x->causes[i].total_ns) / (k ? nb : na),
                    fit(pt_rank_label(x, x->causes[i].rank), 10, lb, sizeof lb), what);
        }
    }
    if (a->n_notes || b->n_notes) {
        fprintf(f, "\n%sNotes%s\n", bold(o), reset(o));
        for (int i = 0; i < a->n_notes; i++) fprintf(f, "  - A: %s\n", a->notes[i]);
        for (int i = 0; i < b->n_notes; i++) fprintf(f, "  - B: %s\n", b->notes[i]);
    }
}
