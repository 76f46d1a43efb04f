/* pipe-trace — shared declarations of the tool's output modules (the
 * analysis itself is scheduler/analysis/trace_analysis.h). Not installed. */
#ifndef PW_TOOLS_PIPE_TRACE_H
#define PW_TOOLS_PIPE_TRACE_H

#include <stdio.h>

#include "scheduler/analysis/trace_analysis.h"

typedef struct pt_options {
    const char *trace;        /* TRACE.json ("-": stdin) */
    const char *compare;      /* --compare OTHER.json, or NULL */
    const char *svg;          /* --svg FILE, or NULL */
    const char *title;        /* --title TEXT for the SVG, or NULL */
    int json;                 /* --json */
    int color;                /* resolved: 1 colour, 0 plain */
    int width;                /* Gantt columns */
    int top;                  /* causes listed; 0 all */
    int gaps;                 /* --gaps: list every gap of the detail step */
    int path;                 /* --path: the critical path item by item */
    int skip;                 /* --skip N */
    long long step;           /* --step N, -1 median */
} pt_options;

/* report.c: the terminal report (tables, causes, critical path, Gantt). */
void pt_report(FILE *f, const pw_trace_analysis *a, const pt_options *o);
void pt_report_compare(FILE *f, const pw_trace_analysis *a, const pw_trace_analysis *b,
                       const pt_options *o);

/* svg.c: the detail step's timeline. 0 ok, -1 with errno set on a write error. */
int pt_svg_write(FILE *f, const pw_trace_analysis *a, const char *title);

/* svg.c: text content with XML's five specials escaped (control
 * characters other than tab dropped). */
void pt_xml_text(FILE *f, const char *s);

/* plot.c: loss and throughput curves of a metrics file (metrics_read.h) as
 * a standalone SVG: training loss and evaluation loss against the step, and
 * samples/s against the step. 0 ok, -1 with errno set on a write error. */
struct pw_metrics;
int pt_plot_write(FILE *f, const struct pw_metrics *m, const char *title);

/* json.c: the analysis as JSON (one document; `b` non-NULL: a comparison).
 * 0 ok, -1 on failure (message on stderr). */
int pt_json_write(FILE *f, const pw_trace_analysis *a, const pw_trace_analysis *b);

/* Shared helpers. */
double pt_ms(int64_t ns);
/* The label of rank r ("rank 0"), or "?" out of range. */
const char *pt_rank_label(const pw_trace_analysis *a, int r);
/* The short text of a detail event: "F3", "wait RECV_F mb 3", "OPTIM". */
void pt_event_text(const pw_ta_event *e, char *buf, size_t n);

#endif
