/* pipeline-run --rebalance auto|every:N|off and --rebalance-at: after each
 * step, measure the ranks' compute time (stages/train/rebalance.h), ask the
 * rebalancer whether to move the cuts (stages/plan/rebalancer.h), move them
 * (pw_pipeline_repartition), and say so on the progress output. Under
 * mpirun every process takes part (the stage times are gathered); world
 * rank 0 decides and its decision is gathered by all, so every process
 * moves at the same step to the same cuts. docs/pipeline-run.md. */
#ifndef PW_TOOLS_PIPELINE_RUN_REBALANCE_H
#define PW_TOOLS_PIPELINE_RUN_REBALANCE_H

#include <stdint.h>

#include "runtime/transport.h"
#include "stages/plan/plan.h"
#include "stages/plan/profile.h"
#include "stages/train/pipeline.h"

typedef struct pr_rebalance_config {
    const char *mode;            /* --rebalance: auto, every:N, off (NULL: off) */
    double min_gain;             /* --rebalance-gain, a fraction (0: 0.05) */
    const char *forced;          /* --rebalance-at STEP:C1,C2,...[/STEP:...] (NULL: none) */
    pw_plan_config plan;         /* the run's model (graph, stages, micro-batches, optimizer,
                                    recompute, grad groups, replicas, memory budget) */
    const pw_profile *profile;   /* (optional) op times; else measured here when deciding */
    const pw_transport *t;       /* (optional) mpirun */
    int quiet;
} pr_rebalance_config;

/* What happened after a step, for --metrics. */
typedef struct pr_rebalance_event {
    int moved;                   /* 1: the cuts moved after this step */
    int forced;                  /* ... by --rebalance-at */
    int revert;                  /* ... back to the cuts before the last move, which
                                    measured slower (pw_rebalance_decision.revert) */
    int refine;                  /* ... a measured refinement step (a neighbouring cut on
                                    trial; with revert: back to the best measured) */
    int measured;                /* 1: the gain of an earlier move is measured now */
    int64_t step;                /* the step after which the move was made */
    int n_cuts;
    int old_cuts[257], new_cuts[257];
    double predicted_gain, predicted_step_s, measured_step_s;
    double move_s;               /* the move's wall time */
    int64_t bytes;               /* parameter and optimizer bytes this process moved */
    double measured_gain, before_s, after_s;
    int64_t measured_of;         /* the step of the move that was measured */
} pr_rebalance_event;

typedef struct pr_rebalance pr_rebalance;

/* Parses the flags against the pipeline (cuts of its chunk count). 0, or
 * the exit status after the message (2: bad flags). *out is NULL when
 * neither flag asks for anything. */
int pr_rebalance_open(const pr_rebalance_config *cfg, pw_pipeline *pl, pr_rebalance **out);
/* After training step `step` (step_s seconds): may replace *pl. 0, or 1
 * after the message (the run ends). */
int pr_rebalance_step(pr_rebalance *r, pw_pipeline **pl, int64_t step, double step_s, pr_rebalance_event *ev);
void pr_rebalance_close(pr_rebalance *r); /* accepts NULL */

#endif
