/* pipe-trace — SVG timeline of the detail step: a row per rank, F/B/W and
 * the optimizer in distinct colours with micro-batch numbers on the bars,
 * send/recv actions grey, waits hatched red, untracked idle light grey, the
 * critical path outlined with its hand-offs as arrows, a time axis and a
 * legend. Plain SVG 1.1, no scripts, so it renders on GitHub and in docs. */
#include <inttypes.h>
#include <math.h>
#include <string.h>

#include "pipe-trace.h"

#define SVG_W 1200.0
#define LEFT 96.0
#define RIGHT 24.0
#define TOP 64.0
#define ROW_H 34.0
#define BAR_H 24.0

static const char *k_fill[PW_TA_CLASS_COUNT] = {
    [PW_TA_F] = "#4e79a7", [PW_TA_B] = "#59a14f", [PW_TA_W] = "#f28e2b", [PW_TA_OPTIM] = "#b07aa1",
    [PW_TA_OTHER] = "#76b7b2", [PW_TA_COMM] = "#9d9d9d", [PW_TA_WAIT] = "url(#wait)", [PW_TA_IDLE] = "#e9e9e9",
};

/* Text content with XML's five specials escaped (pipe-trace.h). */
void pt_xml_text(FILE *f, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '&': fputs("&amp;", f); break;
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '"': fputs("&quot;", f); break;
        case '\'': fputs("&apos;", f); break;
        default:
            if ((unsigned char)*s >= 0x20 || *s == '\t') fputc(*s, f);
        }
    }
}

static double nice_step(double span_ms, int want)
{
    double raw = span_ms / want, p = pow(10, floor(log10(raw)));
    if (raw / p < 1.5) return p;
    if (raw / p < 3.5) return 2 * p;
    if (raw / p < 7.5) return 5 * p;
    return 10 * p;
}

int pt_svg_write(FILE *f, const pw_trace_analysis *a, const char *title)
{
    const pw_ta_detail *d = &a->detail;
    const int R = a->n_ranks > 0 ? a->n_ranks : 1;
    const double plot_w = SVG_W - LEFT - RIGHT;
    const double span = d->step >= 0 && d->t1 > d->t0 ? (double)(d->t1 - d->t0) : 1.0;
    const double axis_y = TOP + R * ROW_H + 6, legend_y = axis_y + 42, height = legend_y + 30;
#define X(t) (LEFT + plot_w * ((double)((t) - d->t0) / span))
#define ROW(r) (TOP + (r) * ROW_H)

    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
               "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
               "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"12\">\n",
            SVG_W, height, SVG_W, height);
    fprintf(f, "<defs>\n"
               "  <pattern id=\"wait\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" "
               "patternTransform=\"rotate(45)\"><rect width=\"6\" height=\"6\" fill=\"#fbe3e1\"/>"
               "<line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"6\" stroke=\"#e15759\" stroke-width=\"2.5\"/></pattern>\n"
               "  <marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"6\" "
               "markerHeight=\"6\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#222\"/></marker>\n"
               "</defs>\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");

    /* Title and subtitle. */
    fprintf(f, "<text x=\"%.0f\" y=\"24\" font-size=\"16\" font-weight=\"bold\">", LEFT);
    if (title) {
        pt_xml_text(f, title);
    } else if (a->has_meta) {
        char t[512];
        snprintf(t, sizeof t, "%s — %s, %d stages, %d micro-batches", *a->meta.graph ? a->meta.graph : "?",
                 *a->meta.schedule ? a->meta.schedule : "?", a->meta.stages, a->meta.micro_batches);
        pt_xml_text(f, t);
    } else {
        pt_xml_text(f, a->file);
    }
    fprintf(f, "</text>\n<text x=\"%.0f\" y=\"44\" fill=\"#444\">", LEFT);
    if (d->step >= 0) {
        const pw_ta_step *sp = NULL;
        for (int64_t i = 0; i < a->n_steps; i++)
            if (a->steps[i].step == d->step) sp = &a->steps[i];
        char t[256];
        int n = snprintf(t, sizeof t, "step %" PRId64 " (%s): %.3f ms", d->step,
                         d->requested ? "chosen" : "median duration", pt_ms(d->t1 - d->t0));
        if (sp && n > 0 && (size_t)n < sizeof t)
            n += snprintf(t + n, sizeof t - (size_t)n, ", bubble %.1f%%", 100 * sp->bubble);
        if (a->theory >= 0 && n > 0 && (size_t)n < sizeof t)
            snprintf(t + n, sizeof t - (size_t)n, " (theory %.1f%%)", 100 * a->theory);
        pt_xml_text(f, t);
    } else {
        pt_xml_text(f, "no step to draw");
    }
    fprintf(f, "</text>\n");

    /* Rows. */
    for (int r = 0; r < a->n_ranks && d->step >= 0; r++) {
        const double y = ROW(r) + (ROW_H - BAR_H) / 2;
        fprintf(f, "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\" dominant-baseline=\"middle\">", LEFT - 8,
                y + BAR_H / 2);
        pt_xml_text(f, a->ranks[r].label);
        fprintf(f, "</text>\n<g>\n");
        for (int i = 0; i < d->n_segments[r]; i++) {
            const pw_ta_segment *s = &d->segments[r][i];
            /* Merge the next segments of the same event (phase splits). */
            int64_t t1 = s->t1;
            while (i + 1 < d->n_segments[r] && d->segments[r][i + 1].cls == s->cls &&
                   d->segments[r][i + 1].event == s->event && d->segments[r][i + 1].t0 == t1)
                t1 = d->segments[r][++i].t1;
            double x0 = X(s->t0), x1 = X(t1), w = x1 - x0;
            if (w <= 0) continue;
            fprintf(f, "  <rect x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" height=\"%.0f\" fill=\"%s\"", x0, y, w, BAR_H,
                    k_fill[s->cls]);
            if (s->cls <= PW_TA_OTHER && w > 2) fprintf(f, " stroke=\"white\" stroke-width=\"0.5\"");
            fprintf(f, "><title>");
            char tip[192];
            if (s->event >= 0) {
                pt_event_text(&d->events[s->event], tip, sizeof tip);
                pt_xml_text(f, tip);
                if (d->events[s->event].peer >= 0) fprintf(f, " (rank %d)", d->events[s->event].peer);
            } else {
                fprintf(f, "idle (%s)", pw_ta_phase_name(s->phase));
            }
            fprintf(f, ": %.3f ms</title></rect>\n", pt_ms(t1 - s->t0));
            const pw_ta_event *e = s->event >= 0 ? &d->events[s->event] : NULL;
            if (e && e->mb >= 0 && s->cls <= PW_TA_W) {
                int digits = e->mb >= 100 ? 3 : e->mb >= 10 ? 2 : 1;
                if (w >= 7.5 * digits + 3)
                    fprintf(f, "  <text x=\"%.2f\" y=\"%.1f\" text-anchor=\"middle\" dominant-baseline=\"middle\" "
                               "fill=\"white\" font-size=\"11\">%d</text>\n",
                            x0 + w / 2, y + BAR_H / 2 + 0.5, e->mb);
            }
        }
        fprintf(f, "</g>\n");
    }

    /* Critical path: outlined actions and hand-off arrows. */
    if (d->step >= 0 && d->n_path > 0) {
        fprintf(f, "<g fill=\"none\" stroke=\"#222\" stroke-width=\"1.6\">\n");
        for (int i = 0; i < d->n_path; i++) {
            const pw_ta_path_item *p = &d->path[i];
            const double y = ROW(p->rank) + (ROW_H - BAR_H) / 2;
            if (p->kind == PW_PATH_ACTION && X(p->t1) - X(p->t0) > 0.5) {
                fprintf(f, "  <rect x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" height=\"%.0f\"/>\n", X(p->t0), y - 1,
                        X(p->t1) - X(p->t0), BAR_H + 2);
            } else if (p->kind == PW_PATH_HANDOFF && p->from_rank >= 0) {
                const double yf = ROW(p->from_rank) + ROW_H / 2, yt = ROW(p->rank) + ROW_H / 2;
                fprintf(f, "  <line x1=\"%.2f\" y1=\"%.1f\" x2=\"%.2f\" y2=\"%.1f\" marker-end=\"url(#arrow)\"/>\n",
                        X(p->t0), yf + (yt > yf ? BAR_H / 2 : -BAR_H / 2), X(p->t1),
                        yt - (yt > yf ? BAR_H / 2 : -BAR_H / 2));
            } else if ((p->kind == PW_PATH_GAP || p->kind == PW_PATH_START) && X(p->t1) - X(p->t0) > 0.5) {
                fprintf(f, "  <line x1=\"%.2f\" y1=\"%.1f\" x2=\"%.2f\" y2=\"%.1f\" stroke-dasharray=\"3 2\"/>\n",
                        X(p->t0), y + BAR_H / 2, X(p->t1), y + BAR_H / 2);
            }
        }
        fprintf(f, "</g>\n");
    }

    /* Axis. */
    fprintf(f, "<g stroke=\"#555\" fill=\"#333\" font-size=\"11\">\n  <line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" "
               "y2=\"%.1f\"/>\n", LEFT, axis_y, LEFT + plot_w, axis_y);
    if (d->step >= 0) {
        const double span_ms = span / 1e6, stp = nice_step(span_ms, 10);
        for (int k = 0; k * stp <= span_ms * (1 + 1e-9) && k < 1000; k++) {
            double x = LEFT + plot_w * (k * stp / span_ms);
            fprintf(f, "  <line x1=\"%.2f\" y1=\"%.1f\" x2=\"%.2f\" y2=\"%.1f\"/>\n", x, axis_y, x, axis_y + 5);
            fprintf(f, "  <text x=\"%.2f\" y=\"%.1f\" text-anchor=\"middle\" stroke=\"none\">%g</text>\n", x,
                    axis_y + 18, k * stp);
        }
        fprintf(f, "  <text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\" stroke=\"none\">ms</text>\n", LEFT - 8,
                axis_y + 18);
    }
    fprintf(f, "</g>\n");

    /* Legend. */
    static const struct { int cls; const char *name; } items[] = {
        {PW_TA_F, "F (forward)"}, {PW_TA_B, "B (backward)"}, {PW_TA_W, "W (weight grad)"},
        {PW_TA_OPTIM, "optimizer"}, {PW_TA_COMM, "send/recv"}, {PW_TA_WAIT, "waiting for a message"},
        {PW_TA_IDLE, "idle"},
    };
    double x = LEFT;
    fprintf(f, "<g>\n");
    for (size_t i = 0; i < sizeof items / sizeof *items; i++) {
        fprintf(f, "  <rect x=\"%.1f\" y=\"%.1f\" width=\"14\" height=\"14\" fill=\"%s\"/>\n", x, legend_y - 11,
                k_fill[items[i].cls]);
        fprintf(f, "  <text x=\"%.1f\" y=\"%.1f\">%s</text>\n", x + 19, legend_y, items[i].name);
        x += 19 + 7.0 * (double)strlen(items[i].name) + 18;
    }
    fprintf(f, "  <rect x=\"%.1f\" y=\"%.1f\" width=\"14\" height=\"14\" fill=\"none\" stroke=\"#222\" "
               "stroke-width=\"1.6\"/>\n  <text x=\"%.1f\" y=\"%.1f\">critical path (arrows: hand-offs)</text>\n",
            x, legend_y - 11, x + 19, legend_y);
    fprintf(f, "</g>\n</svg>\n");
#undef X
#undef ROW
    return ferror(f) ? -1 : 0;
}
