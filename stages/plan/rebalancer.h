/* pipewright — when and where to move a running pipeline's cuts: the
 * decision half of dynamic load balancing (the move itself is
 * stages/train/rebalance.h; docs/partition.md, "Rebalancing a running
 * pipeline").
 *
 *     pw_rebalancer_config rc = pw_rebalancer_defaults();
 *     rc.plan = plan_cfg;                 // graph, micro-batches, optimizer, budget (plan.h)
 *     rc.schedule = sched; rc.report = rep;   // the pipeline's
 *     pw_rebalancer *rb;
 *     PW_CHECK(pw_rebalancer_create(&rc, cuts, &rb));
 *     for each step:
 *         train; busy[r] = rank r's compute seconds in the step (max over replicas)
 *         pw_rebalance_decision d;
 *         PW_CHECK(pw_rebalancer_observe(rb, step, busy, step_seconds, &d));
 *         if (d.move && pw_pipeline_repartition(&pl, d.new_cuts, d.n_cuts, &info) == PW_OK)
 *             pw_rebalancer_moved(rb, step, d.new_cuts, pw_pipeline_schedule(pl),
 *                                 pw_pipeline_report(pl));
 *         if (d.measured) report d.measured_gain of the move at d.measured_step;
 *     pw_rebalancer_destroy(rb);
 *
 * What is measured. Each rank's busy time per step (F, B, W and its
 * optimizer update, the engine's timers: what the trace shows as compute),
 * and the step's wall time, over a window of steps (the first step after a
 * start or a move is left out: it pays one-time costs); the window's
 * median per rank.
 *
 * The model. The planner's cost of each node (FLOPs at a nominal rate, or
 * a profile's measured op times: plan.balance / plan.profile) predicts
 * each rank's busy time for its chunks; the measured time over the
 * predicted is the rank's speed (a slower core, a shared one, a device
 * whose real op costs differ from their FLOPs). With every chunk on its
 * rank's measured speed, the partitioner (graph/partition.h) finds the
 * best contiguous cuts within the memory budget, and the simulator
 * (scheduler/simulate.h) predicts one step of the pipeline's schedule on
 * the current and on the new cuts. The predicted gain is 1 − new / current.
 *
 * When a move is proposed. Mode AUTO: when a window is full, at least
 * min_interval steps after the last move, the predicted gain is at least
 * min_gain, and the window before proposed nearly the same cuts (every
 * cut within a sixteenth of the graph's nodes; one unlucky window, or a
 * contended machine where each window wants something else, does not move
 * layers; the move goes to the second window's cuts). A move whose
 * measured gain falls below half of min_gain doubles the interval before
 * the next (up to 16 times); one that delivers resets it.
 * Mode EVERY: every `every` steps (the window is those
 * steps) with the same gain test. Never a move whose chunks' memory
 * (parameters, gradients, optimizer state, activations, buffers: the
 * planner's figures) exceeds a rank's budget. A proposal that the pipeline
 * then fails to make is simply not reported as moved.
 *
 * Measured gain. After a move the next full window's median step time,
 * beside the median of the window that decided it: 1 − after / before,
 * reported once (decision.measured). AUTO undoes a move whose measured
 * gain is below −min_gain (the step got slower by more than a move must
 * gain) at once: the decision moves back to the cuts before it
 * (decision.revert), and the rejected cuts are not proposed again for 8
 * intervals. A revert is never itself reverted.
 *
 * Measured refinement (AUTO, one chunk per rank). The model can land a
 * node or two from the fastest cut (its per-rank speed is one number). A
 * move of the model that stands is followed, once the window that
 * measured it has the model wanting no further move, by trials
 * (decision.refine): one node across the boundary between the stage whose
 * measured busy time is the largest and its less busy neighbour — the
 * bottleneck giving a node first, then taking one (its other boundary
 * only when neither is possible there). A trial whose window's median
 * step time beats the best measured cuts' by more than min_gain becomes
 * the best, and the trials go on from it (the refinement walks); one that
 * does not is left for the
 * next neighbour, or, with none left, for the best cuts (refine + revert).
 * At most 5 trials after a move of the model; cuts measured since the last
 * jump are not tried again. Every full window's median is remembered for
 * its cuts (16 cuts, for 32 intervals or to the next jump), and the model
 * does not move to remembered cuts that measured no faster than the
 * current ones by min_gain: the refinement's result is not undone by the
 * model that it corrected.
 *
 * Window restart (AUTO, windows over 3 steps). When the last 3 step times
 * all lie on one side of the last full window's median by more than 15 %
 * of it and 4 of its spreads (1.4826 × the median absolute deviation),
 * the step time has jumped (a stage slowed, or its slowdown ended): the
 * window starts again with those 3 steps (decision.restarted), and what
 * came from before the jump is dropped: the proposal waiting to be
 * confirmed, the doubled interval, the rejected and remembered cuts, a
 * gain being measured and a refinement. Until the first full window after
 * a start or a move there is no reference: a move's own change of the
 * step time is no jump. The interval since the last move still holds.
 *
 * Thread-safety: one thread. Under mpirun every process observes the same
 * gathered figures and so takes the same decisions.
 */
#ifndef PW_STAGES_PLAN_REBALANCER_H
#define PW_STAGES_PLAN_REBALANCER_H

#include <stdint.h>

#include "runtime/status.h"
#include "scheduler/schedule.h"
#include "stages/plan/plan.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pw_rebalance_mode {
    PW_REBALANCE_OFF = 0,
    PW_REBALANCE_AUTO,       /* decide after every full window */
    PW_REBALANCE_EVERY,      /* decide every `every` steps */
} pw_rebalance_mode;

typedef struct pw_rebalancer_config {
    pw_rebalance_mode mode;
    int every;                      /* EVERY: steps between decisions (>= 2) */
    int window;                     /* AUTO: steps measured per decision (0: 8) */
    int min_interval;               /* AUTO: steps from a move to the next (0: 2 × window) */
    double min_gain;                /* predicted step-time gain a move needs (0: 0.05) */
    pw_plan_config plan;            /* the model: graph, micro_batches, micro_batch_size,
                                       balance (+ profile), optim, recompute, grad_groups,
                                       replicas, memory_budget (per rank) */
    const pw_schedule *schedule;    /* the pipeline's, lowered and validated (borrowed: a
                                       move replaces it, see pw_rebalancer_moved) */
    const pw_schedule_report *report; /* its validation report (activation slots) */
} pw_rebalancer_config;

/* Mode OFF, everything else 0 (the defaults above). */
pw_rebalancer_config pw_rebalancer_defaults(void);

/* "auto", "off", "every:N" (N >= 2). PW_ERR_INVALID_ARG naming the text. */
pw_status pw_rebalance_parse(const char *s, pw_rebalance_mode *mode, int *every);

typedef struct pw_rebalancer pw_rebalancer;

/* `cuts`: the pipeline's chunk boundaries now (n_chunks + 1). */
pw_status pw_rebalancer_create(const pw_rebalancer_config *cfg, const int *cuts, pw_rebalancer **out);
void pw_rebalancer_destroy(pw_rebalancer *rb); /* accepts NULL */

typedef struct pw_rebalance_decision {
    int decided;                    /* 1: a window was evaluated at this step */
    int move;                       /* 1: move to new_cuts now */
    int n_cuts;                     /* chunks + 1 */
    const int *old_cuts, *new_cuts; /* valid until the next call on the rebalancer */
    double measured_step_s;         /* the window's median step time */
    double predicted_step_s;        /* that time × simulated(new) / simulated(current) */
    double predicted_gain;          /* 1 − simulated(new) / simulated(current) */
    const double *rank_busy_s;      /* [stages] the window's median busy time per rank */
    const double *rank_speed;       /* [stages] measured speed relative to the model */
    char why[256];                  /* with decided: why it moves or not */
    int measured;                   /* 1: the gain of the last move is measured now */
    int64_t measured_step;          /* the step after which that move was made */
    double measured_gain;           /* 1 − median step after / median step before */
    double measured_before_s, measured_after_s;
    int revert;                     /* 1 (with move): new_cuts are the cuts before the last
                                       move, which measured slower by more than min_gain, or
                                       (with refine) the refinement's best cuts */
    int refine;                     /* 1 (with move): a measured refinement step: a
                                       neighbouring cut on trial, or (with revert) back to
                                       the best cuts measured; predicted_gain is NaN and
                                       predicted_step_s the best cuts' measured step time */
    int restarted;                  /* 1: the step time jumped; the window starts again
                                       with the steps after the jump (why says from what) */
} pw_rebalance_decision;

/* After training step `step`: busy[stages] each rank's compute seconds in
 * it, step_s its wall time. Fills *d (move = 0 unless a move is due). */
pw_status pw_rebalancer_observe(pw_rebalancer *rb, int64_t step, const double *busy, double step_s,
                                pw_rebalance_decision *d);

/* The pipeline moved to `cuts` after `step` (the proposal, or a forced
 * move): a new window starts, and the move's gain will be measured. The
 * new pipeline's schedule and report (the same content, other objects)
 * replace the config's. */
void pw_rebalancer_moved(pw_rebalancer *rb, int64_t step, const int *cuts, const pw_schedule *schedule,
                         const pw_schedule_report *report);

#ifdef __cplusplus
}
#endif
#endif
