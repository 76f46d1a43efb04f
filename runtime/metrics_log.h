/* pipewright — a training metrics log: JSON Lines, one object per training
 * step and one per evaluation (the format pipeline-run --metrics writes and
 * runtime/metrics_read.h reads; docs/pipeline-run.md, "Metrics log").
 *
 *     pw_metrics_log *log;
 *     PW_CHECK(pw_metrics_log_open("metrics.jsonl", 4, &log)); // created or truncated; up to 4 stages
 *     for each step:
 *         pw_metrics_step_rec r = {.step = s, .epoch = 1, .loss = loss, .lr = lr,
 *                                  .grad_norm = NAN, .samples_per_s = ..., .step_ms = ...,
 *                                  .bubble_pct = NAN, .elapsed_s = ...};
 *         PW_CHECK(pw_metrics_log_step(log, &r));      // one line, in one write(2)
 *     pw_metrics_log_close(log);
 *
 * Each line is formatted whole and handed to the kernel in one write(2), so
 * whatever ends the run (a signal, an error, a kill) leaves the file complete
 * up to its last line: a reader may follow it while it grows. It is not an
 * atomic temp file renamed at the end for that reason. JSON has no NaN or
 * infinity: a value that is not finite is written as null (a figure not
 * measured, such as the gradient norm without clipping). Numbers are written
 * with 9 significant digits (stage busy times with 6), the learning rate
 * with the fewest digits that read back as the same float ("0.01").
 *
 * A custom trainer writes its own figures with these calls; a pw_pipeline's
 * are measured and written by stages/train/pipeline_metrics.h.
 *
 * Ownership and threads: the log owns its file descriptor and line buffer,
 * freed by close. One log is used by one thread at a time; different logs
 * share nothing.
 */
#ifndef PW_RUNTIME_METRICS_LOG_H
#define PW_RUNTIME_METRICS_LOG_H

#include <stdint.h>

#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_metrics_log pw_metrics_log;

/* {"type":"step", ...}: the figures of one optimizer step. */
typedef struct pw_metrics_step_rec {
    int64_t step;              /* optimizer steps done, from 1 */
    int64_t epoch;             /* the step's epoch, from 1 */
    double loss;               /* training loss of the step */
    float lr;                  /* the learning rate the step used */
    double grad_norm;          /* global gradient norm before clipping; NaN: not measured */
    double samples_per_s;      /* the step's throughput */
    double tokens_per_s;       /* > 0 (or not finite): written; <= 0: the key is left out
                                  (data that is not tokens) */
    double step_ms;            /* wall time of the step */
    double bubble_pct;         /* idle share of the step, 0..100 */
    const double *stage_busy_ms; /* [n_stages] each stage's busy time in the step */
    int n_stages;
    double elapsed_s;          /* since training started */
} pw_metrics_step_rec;

/* {"type":"eval", ...}: an evaluation of the held-out split after `step`. */
typedef struct pw_metrics_eval_rec {
    int64_t step, epoch;
    double loss;               /* mean loss */
    double accuracy;           /* 0..1; a language model's per-token argmax accuracy */
    double unigram_entropy;    /* >= 0: a language model (nats): "accuracy" is null and
                                  the line has ppl = e^loss, token_accuracy and
                                  unigram_entropy; < 0: a classifier */
    int64_t samples;
    double eval_ms;
    double elapsed_s;
} pw_metrics_eval_rec;

/* {"type":"rebalance", ...}: the cut points moved after `step`
 * (stages/train/rebalance.h, docs/partition.md). */
typedef struct pw_metrics_move_rec {
    int64_t step;
    int forced;                /* asked for (--rebalance-at), not decided */
    int revert;                /* back to the cuts before the last move, which measured slower
                                  (with refine: back to the refinement's fastest cuts) */
    int refine;                /* a measured refinement step (docs/partition.md) */
    const int *old_cuts, *new_cuts; /* [n_cuts] each */
    int n_cuts;
    double predicted_gain;     /* fraction of the step; NaN: none (forced) */
    double step_ms_before;     /* measured before the move; NaN: none */
    double predicted_step_ms;  /* NaN: none */
    double move_ms;            /* what the move took */
    int64_t moved_bytes;       /* parameters and optimizer state that changed owner */
} pw_metrics_move_rec;

/* {"type":"rebalance_gain", ...}: a move's gain measured a window later. */
typedef struct pw_metrics_move_gain_rec {
    int64_t step, move_step;
    double step_ms_before, step_ms_after, measured_gain;
} pw_metrics_move_gain_rec;

/* Creates (or truncates) the file at `path`. PW_ERR_IO "PATH: reason" when it
 * cannot; PW_ERR_NOMEM. `max_stages` bounds n_stages of the step records
 * (the line buffer is sized once, here). */
pw_status pw_metrics_log_open(const char *path, int max_stages, pw_metrics_log **out);
/* Appends one line. PW_ERR_IO "PATH: write failed: reason"; the file then
 * ends at its last complete line. */
pw_status pw_metrics_log_step(pw_metrics_log *log, const pw_metrics_step_rec *r);
pw_status pw_metrics_log_eval(pw_metrics_log *log, const pw_metrics_eval_rec *r);
/* n_cuts at most max_stages + 1 of open. */
pw_status pw_metrics_log_move(pw_metrics_log *log, const pw_metrics_move_rec *r);
pw_status pw_metrics_log_move_gain(pw_metrics_log *log, const pw_metrics_move_gain_rec *r);
/* Closes the file and frees the log. Accepts NULL. */
void pw_metrics_log_close(pw_metrics_log *log);

#ifdef __cplusplus
}
#endif
#endif
