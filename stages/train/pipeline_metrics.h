/* pipewright — a pw_pipeline's metrics log: each step's loss, learning rate,
 * gradient norm, throughput, bubble and per-stage busy time, and each
 * evaluation, measured from the pipeline and written as JSON Lines
 * (runtime/metrics_log.h; what pipeline-run --metrics writes).
 *
 *     pw_pipeline_metrics *mx;
 *     PW_CHECK(pw_pipeline_metrics_open("metrics.jsonl", S, transport, &mx)); // before the data: fails early
 *     ... create the pipeline pl ...
 *     pw_pipeline_metrics_start(mx, pl);                  // the busy counters' origin
 *     for each step:
 *         t0 = now; PW_CHECK(pw_pipeline_step(pl, &s)); dt = now - t0;
 *         PW_CHECK(pw_pipeline_metrics_step(mx, pl, &s, dt, now - start));
 *     pw_pipeline_metrics_close(mx);
 *
 * Multi-process runs (a transport): every process calls open, start and
 * step at the same step (step gathers each process's busy time and bubble:
 * a collective); world rank 0 creates and writes the file, the others hold
 * no file. stage_busy_ms then lists replica 0's stages and bubble_pct is the
 * mean over the processes. In one process the stages are replica 0's.
 *
 * Every function accepts a NULL log and then does nothing (returns PW_OK),
 * so a trainer calls them whether or not a log was asked for.
 *
 * Ownership and threads: the log borrows the transport (it must outlive the
 * log) and owns its file; the pipeline is only read, between steps, on the
 * thread that steps it. One thread uses a log at a time.
 */
#ifndef PW_STAGES_PIPELINE_METRICS_H
#define PW_STAGES_PIPELINE_METRICS_H

#include "runtime/metrics_log.h"
#include "runtime/status.h"
#include "runtime/transport.h"
#include "stages/train/pipeline.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_pipeline_metrics pw_pipeline_metrics;

/* A log of a pipeline of `stages` stages at `path` (created or truncated on
 * world rank 0). `transport`: the pipeline's (NULL in one process).
 * PW_ERR_IO "PATH: reason", PW_ERR_NOMEM. */
pw_status pw_pipeline_metrics_open(const char *path, int stages, const pw_transport *transport,
                                   pw_pipeline_metrics **out);
/* Before the first step of this run: where the stages' busy counters stand. */
void pw_pipeline_metrics_start(pw_pipeline_metrics *m, pw_pipeline *pl);
/* After pw_pipeline_step filled `s`, which took step_s seconds inside
 * pw_pipeline_step; elapsed_s since training started. Writes the step's
 * line (tokens_per_s too for token data: the pipeline's training set has
 * i32 inputs). Collective under a transport. Errors: the transport's (a
 * stalled or lost process), PW_ERR_IO from the write. */
pw_status pw_pipeline_metrics_step(pw_pipeline_metrics *m, pw_pipeline *pl, const pw_step_stats *s, double step_s,
                                   double elapsed_s);
/* After an evaluation `ev` at step s->step, which took eval_s seconds.
 * `unigram_entropy` >= 0 marks a language model (pw_dataset_unigram_entropy
 * of the held-out split): its line has perplexity and token accuracy
 * instead of accuracy. Not collective: only world rank 0 writes. */
pw_status pw_pipeline_metrics_eval(pw_pipeline_metrics *m, const pw_step_stats *s, const pw_eval_stats *ev,
                                   double unigram_entropy, double eval_s, double elapsed_s);
/* The log this process writes (world rank 0's), for records of other kinds
 * (pw_metrics_log_move after a re-partition); NULL on the other processes
 * and for a NULL `m`. Owned by `m`. */
pw_metrics_log *pw_pipeline_metrics_log(pw_pipeline_metrics *m);
/* Accepts NULL. */
void pw_pipeline_metrics_close(pw_pipeline_metrics *m);

#ifdef __cplusplus
}
#endif
#endif
