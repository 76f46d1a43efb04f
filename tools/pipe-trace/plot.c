/* pipe-trace --plot — loss and throughput curves of a metrics file
 * (`pipeline-run --metrics`, runtime/metrics_read.h) as one standalone SVG:
 * the upper panel is training loss against the step with the evaluation
 * losses as points, the lower one samples/s against the step. Hand-written
 * SVG 1.1 (axes, ticks, grid, legend; no scripts, no fonts to load), so it
 * renders on GitHub and in a browser as it is. */
#include <inttypes.h>
#include <math.h>
#include <string.h>

#include "pipe-trace.h"
#include "runtime/metrics_read.h"

#define PL_W 960.0
#define PL_LEFT 84.0
#define PL_RIGHT 32.0
#define PL_TOP 70.0
#define PL_PANEL_H 250.0
#define PL_GAP 74.0
#define PL_BOTTOM 52.0
#define PL_MAX_TICKS 12
#define PL_BIG 1e300 /* values are clamped to +-PL_BIG so that spans stay finite */

/* A panel: its box on the page and the data range it shows. */
typedef struct pl_box {
    double x0, y0, w, h;
    double xlo, xhi, xstep;
    double ylo, yhi, ystep;
} pl_box;

static double clampd(double v) { return v > PL_BIG ? PL_BIG : v < -PL_BIG ? -PL_BIG : v; }

static double pl_nice(double raw)
{
    double p = pow(10, floor(log10(raw)));
    if (raw / p < 1.5) return p;
    if (raw / p < 3.5) return 2 * p;
    if (raw / p < 7.5) return 5 * p;
    return 10 * p;
}

/* Widens [lo, hi] to whole ticks of a 1-2-5 step, about five of them. A
 * flat or tiny range is widened around its value first, so the step stays
 * well above the values' rounding (the tick loop is bounded anyway). */
static void nice_range(double lo, double hi, double min_step, double *tlo, double *thi, double *step)
{
    lo = clampd(lo), hi = clampd(hi);
    if (!(hi > lo)) {
        const double d = fabs(lo) > 1e-100 ? fabs(lo) * 0.1 : 1;
        lo -= d, hi += d;
    }
    if (hi - lo < fabs(lo) * 1e-9 || hi - lo < fabs(hi) * 1e-9) {
        const double d = fmax(fabs(lo), fabs(hi)) * 1e-6;
        lo -= d, hi += d;
    }
    if (!(hi - lo >= 1e-200)) { /* subnormal spans: a flat line around the value */
        const double c = lo / 2 + hi / 2;
        lo = c - 1, hi = c + 1;
    }
    double s = pl_nice((hi - lo) / 5);
    if (!(s > 0) || !isfinite(s)) s = 1;
    if (s < min_step) s = min_step;
    *step = s;
    *tlo = floor(lo / s) * s;
    *thi = ceil(hi / s) * s;
    if (!(*thi > *tlo)) *thi = *tlo + s;
}

static double px_x(const pl_box *b, double x) { return b->x0 + b->w * (clampd(x) - b->xlo) / (b->xhi - b->xlo); }
static double px_y(const pl_box *b, double y) { return b->y0 + b->h - b->h * (clampd(y) - b->ylo) / (b->yhi - b->ylo); }

/* A tick label: as many decimals as the step needs, %g for large or tiny. */
static void fmt_tick(char *buf, size_t n, double v, double step)
{
    if (fabs(v) < step * 1e-9) v = 0;
    if (v != 0 && (fabs(v) >= 1e6 || fabs(v) < 1e-4)) {
        snprintf(buf, n, "%.3g", v);
        return;
    }
    int dec = step >= 1 ? 0 : (int)ceil(-log10(step) - 1e-9);
    if (dec > 6) dec = 6;
    snprintf(buf, n, "%.*f", dec, v);
}

/* Frame, grid, ticks and labels of a panel. */
static void axes(FILE *f, const pl_box *b, const char *xlabel, const char *ylabel)
{
    char t[64];
    fprintf(f, "<g class=\"axes\" font-size=\"11\" fill=\"#333\">\n");
    for (int k = 0; k <= PL_MAX_TICKS; k++) {
        const double v = b->ylo + k * b->ystep;
        if (v > b->yhi + b->ystep * 1e-6) break;
        const double y = px_y(b, v);
        fmt_tick(t, sizeof t, v, b->ystep);
        fprintf(f, "  <line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e4e4e4\"/>"
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>"
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n",
                b->x0, y, b->x0 + b->w, y, b->x0 - 5, y, b->x0, y, b->x0 - 8, y + 4, t);
    }
    for (int k = 0; k <= PL_MAX_TICKS; k++) {
        const double v = b->xlo + k * b->xstep;
        if (v > b->xhi + b->xstep * 1e-6) break;
        const double x = px_x(b, v);
        fmt_tick(t, sizeof t, v, b->xstep);
        fprintf(f, "  <line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e4e4e4\"/>"
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>"
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n",
                x, b->y0, x, b->y0 + b->h, x, b->y0 + b->h, x, b->y0 + b->h + 5, x, b->y0 + b->h + 18, t);
    }
    fprintf(f, "  <rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#333\"/>\n",
            b->x0, b->y0, b->w, b->h);
    fprintf(f, "  <text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"12\">%s</text>\n",
            b->x0 + b->w / 2, b->y0 + b->h + 38, xlabel);
    fprintf(f, "  <text transform=\"translate(%.1f %.1f) rotate(-90)\" text-anchor=\"middle\" font-size=\"12\">%s"
            "</text>\n</g>\n", b->x0 - 58, b->y0 + b->h / 2, ylabel);
}

static long column(const pl_box *b, int64_t step) { return (long)floor(px_x(b, (double)step)); }

/* The series as one polyline. Consecutive points that fall in one pixel
 * column are reduced to their first, lowest, highest and last (in file
 * order), so a million steps draw as about 4 points a column and look the
 * same. */
static void polyline(FILE *f, const pw_metrics_series *s, const pl_box *b, const char *cls, const char *colour)
{
    if (s->n == 0) return;
    fprintf(f, "<polyline class=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" stroke-linejoin=\"round\" "
            "points=\"", cls, colour);
    const char *sep = "";
    for (int64_t i = 0; i < s->n;) {
        const long col = column(b, s->p[i].step);
        int64_t j = i, lo = i, hi = i;
        while (j + 1 < s->n && column(b, s->p[j + 1].step) == col) {
            j++;
            if (s->p[j].value < s->p[lo].value) lo = j;
            if (s->p[j].value > s->p[hi].value) hi = j;
        }
        int64_t keep[4] = {i, lo < hi ? lo : hi, lo < hi ? hi : lo, j};
        for (int k = 0; k < 4; k++) {
            if (k && keep[k] == keep[k - 1]) continue;
            const pw_metrics_point *p = &s->p[keep[k]];
            fprintf(f, "%s%.1f,%.1f", sep, px_x(b, (double)p->step), px_y(b, p->value));
            sep = " ";
        }
        i = j + 1;
    }
    fputs("\"/>\n", f);
}

static void range_of(const pw_metrics_series *s, double *lo, double *hi, int64_t *slo, int64_t *shi)
{
    for (int64_t i = 0; i < s->n; i++) {
        if (s->p[i].value < *lo) *lo = s->p[i].value;
        if (s->p[i].value > *hi) *hi = s->p[i].value;
        if (s->p[i].step < *slo) *slo = s->p[i].step;
        if (s->p[i].step > *shi) *shi = s->p[i].step;
    }
}

static void no_data(FILE *f, const pl_box *b, const char *what)
{
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" fill=\"#888\">no %s in the file</text>\n",
            b->x0 + b->w / 2, b->y0 + b->h / 2, what);
}

int pt_plot_write(FILE *f, const pw_metrics *m, const char *title)
{
    const pw_metrics_series *loss = &m->series[PW_METRIC_LOSS], *eval = &m->series[PW_METRIC_EVAL_LOSS],
                            *sps = &m->series[PW_METRIC_SAMPLES_PER_S];
    const double height = PL_TOP + 2 * PL_PANEL_H + PL_GAP + PL_BOTTOM;
    /* One step axis for both panels. */
    int64_t slo = INT64_MAX, shi = INT64_MIN;
    double llo = INFINITY, lhi = -INFINITY, tlo = INFINITY, thi = -INFINITY;
    range_of(loss, &llo, &lhi, &slo, &shi);
    range_of(eval, &llo, &lhi, &slo, &shi);
    range_of(sps, &tlo, &thi, &slo, &shi);
    if (slo > shi) slo = 0, shi = 1;
    if (llo > lhi) llo = 0, lhi = 1;
    if (tlo > thi) tlo = 0, thi = 1;
    if (tlo > 0) tlo = 0; /* throughput from zero: the first (warm-up) step is slow anyway */
    pl_box top = {.x0 = PL_LEFT, .y0 = PL_TOP, .w = PL_W - PL_LEFT - PL_RIGHT, .h = PL_PANEL_H};
    nice_range((double)slo, (double)shi, 1, &top.xlo, &top.xhi, &top.xstep);
    nice_range(llo, lhi, 0, &top.ylo, &top.yhi, &top.ystep);
    pl_box low = top;
    low.y0 = PL_TOP + PL_PANEL_H + PL_GAP;
    nice_range(tlo, thi, 0, &low.ylo, &low.yhi, &low.ystep);

    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
               "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
               "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"12\">\n"
               "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
            PL_W, height, PL_W, height);
    fprintf(f, "<text x=\"%.0f\" y=\"24\" font-size=\"16\" font-weight=\"bold\">", PL_LEFT);
    if (title) {
        pt_xml_text(f, title);
    } else {
        fputs("Training curves: ", f);
        pt_xml_text(f, m->file);
    }
    fputs("</text>\n", f);
    char sub[512];
    int len = snprintf(sub, sizeof sub, "%" PRId64 " steps, %" PRId64 " evaluations", m->step_lines, m->eval_lines);
    if (loss->n && len > 0 && (size_t)len < sizeof sub)
        len += snprintf(sub + len, sizeof sub - (size_t)len, "; last loss %.4g (step %" PRId64 ")",
                        loss->p[loss->n - 1].value, loss->p[loss->n - 1].step);
    if (eval->n && len > 0 && (size_t)len < sizeof sub)
        len += snprintf(sub + len, sizeof sub - (size_t)len, ", last eval loss %.4g (step %" PRId64 ")",
                        eval->p[eval->n - 1].value, eval->p[eval->n - 1].step);
    if (m->nonfinite && len > 0 && (size_t)len < sizeof sub)
        snprintf(sub + len, sizeof sub - (size_t)len, "; %" PRId64 " non-finite values left out", m->nonfinite);
    fprintf(f, "<text x=\"%.0f\" y=\"44\" fill=\"#555\">", PL_LEFT);
    pt_xml_text(f, sub);
    fputs("</text>\n", f);

    /* Loss. */
    axes(f, &top, "step", "loss");
    if (!loss->n && !eval->n) no_data(f, &top, "finite loss values");
    polyline(f, loss, &top, "loss", "#4e79a7");
    if (eval->n) {
        fputs("<g class=\"eval_loss\" fill=\"#f28e2b\" stroke=\"white\" stroke-width=\"1\">\n", f);
        for (int64_t i = 0; i < eval->n; i++)
            fprintf(f, "  <circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\"><title>step %" PRId64 ": eval loss %.6g</title>"
                    "</circle>\n", px_x(&top, (double)eval->p[i].step), px_y(&top, eval->p[i].value),
                    eval->p[i].step, eval->p[i].value);
        fputs("</g>\n", f);
    }
    /* Legend, top right inside the panel. */
    const double lx = top.x0 + top.w - 150, ly = top.y0 + 16;
    fprintf(f, "<g class=\"legend\" font-size=\"11\">\n"
               "  <rect x=\"%.1f\" y=\"%.1f\" width=\"142\" height=\"%d\" fill=\"white\" fill-opacity=\"0.85\" "
               "stroke=\"#ccc\"/>\n"
               "  <line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#4e79a7\" stroke-width=\"2\"/>"
               "<text x=\"%.1f\" y=\"%.1f\">training loss</text>\n",
            lx - 6, ly - 12, eval->n ? 40 : 22, lx, ly, lx + 22, ly, lx + 28, ly + 4);
    if (eval->n)
        fprintf(f, "  <circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"#f28e2b\"/><text x=\"%.1f\" y=\"%.1f\">"
                "evaluation loss</text>\n", lx + 11, ly + 18, lx + 28, ly + 22);
    fputs("</g>\n", f);

    /* Throughput. */
    axes(f, &low, "step", "samples/s");
    if (!sps->n) no_data(f, &low, "finite samples/s values");
    polyline(f, sps, &low, "samples_per_s", "#59a14f");
    fputs("</svg>\n", f);
    return ferror(f) ? -1 : 0;
}
