/* pipewright — a reader of training metrics files: the JSON Lines that
 * `pipeline-run --metrics FILE` writes, one object a line:
 *
 *     {"type":"step","step":N,"epoch":E,"loss":x,"lr":x,"grad_norm":x,"samples_per_s":x,
 *      "step_ms":x,"bubble_pct":x,"stage_busy_ms":[s0,s1,...]}
 *     {"type":"eval","step":N,"epoch":E,"loss":x,"accuracy":x or null}
 *
 *     pw_metrics *m;
 *     if (pw_metrics_read("metrics.jsonl", &m) != PW_OK) {
 *         fprintf(stderr, "%s\n", pw_last_error());   // "metrics.jsonl:7: ..."
 *         return 1;
 *     }
 *     for (int64_t i = 0; i < m->series[PW_METRIC_LOSS].n; i++) use(m->series[PW_METRIC_LOSS].p[i]);
 *     pw_metrics_destroy(m);
 *
 * What it accepts. Lines of other types and members it does not know are
 * ignored (counted); blank lines are skipped. A line that is not a JSON
 * object, a "type" that is not a string, a step or eval line without an
 * integer "step" >= 0, or a known member of the wrong type ("loss": "x") is
 * an error PW_ERR_PARSE "FILE:LINE: what", and nothing is returned. A value
 * that is not finite (NaN, Infinity — JSON has neither, but writers print
 * them — or null where a number belongs) is skipped: that point is left out
 * of its series and `notes` says how many were and where the first was.
 * pipeline-run also writes null for what it did not measure (grad_norm
 * without clipping, a language model's accuracy), so null counts as not
 * finite only for "loss", "samples_per_s" and an eval line's "loss"; in the
 * other members it just means no value.
 *
 * Bounds. Lines are read one at a time (at most 1 MiB each: longer is an
 * error); memory holds 16 bytes per value kept, never a size read from the
 * file. Fuzzed by tests/fuzz/fuzz_metrics.c. Thread safety: none shared.
 */
#ifndef PW_RUNTIME_METRICS_READ_H
#define PW_RUNTIME_METRICS_READ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PW_METRICS_MAX_LINE (1 << 20)

/* The series kept, in file order. */
typedef enum pw_metric {
    PW_METRIC_LOSS = 0,       /* step lines: "loss" (training loss of the step) */
    PW_METRIC_LR,             /* "lr" */
    PW_METRIC_GRAD_NORM,      /* "grad_norm" */
    PW_METRIC_SAMPLES_PER_S,  /* "samples_per_s" */
    PW_METRIC_STEP_MS,        /* "step_ms" */
    PW_METRIC_BUBBLE_PCT,     /* "bubble_pct" */
    PW_METRIC_EVAL_LOSS,      /* eval lines: "loss" */
    PW_METRIC_EVAL_ACCURACY,  /* eval lines: "accuracy" */
    PW_METRIC_COUNT
} pw_metric;

typedef struct pw_metrics_point {
    int64_t step;
    double value;             /* finite */
} pw_metrics_point;

typedef struct pw_metrics_series {
    int64_t n;
    pw_metrics_point *p;      /* [n] */
} pw_metrics_series;

typedef struct pw_metrics {
    char *file;
    int64_t lines;            /* lines read, blank ones included */
    int64_t step_lines, eval_lines;
    int64_t ignored_lines;    /* objects of another "type", or without one */
    int64_t nonfinite;        /* values skipped as not finite */
    pw_metrics_series series[PW_METRIC_COUNT];
    int n_notes;
    char **notes;             /* "metrics.jsonl: 2 values were not finite ..." */
} pw_metrics;

/* Reads the file at `path` ("-": stdin). PW_ERR_IO when it cannot be read. */
pw_status pw_metrics_read(const char *path, pw_metrics **out);
/* Reads an open stream, named `name` in messages (the caller closes it). */
pw_status pw_metrics_read_stream(FILE *f, const char *name, pw_metrics **out);
/* Reads the `size` bytes at `data` (nothing is copied or kept). */
pw_status pw_metrics_read_memory(const void *data, size_t size, const char *name, pw_metrics **out);
void pw_metrics_destroy(pw_metrics *m); /* accepts NULL */

/* "loss", "lr", ..., "eval loss", "eval accuracy". */
const char *pw_metric_name(pw_metric k);

#ifdef __cplusplus
}
#endif
#endif
