/* pipewright — moving a running pipeline's cuts between steps (dynamic load
 * balancing, docs/partition.md "Rebalancing a running pipeline").
 *
 *     pw_pipeline *pl;                       // training, step after step
 *     double busy[S];
 *     PW_CHECK(pw_pipeline_rank_busy(pl, busy));   // what each rank computed
 *     ... choose new cuts (stages/plan/rebalance.h decides) ...
 *     pw_repartition_info info;
 *     if (pw_pipeline_repartition(&pl, cuts, C + 1, &info) != PW_OK && !info.kept)
 *         return 1;                          // a process was lost: end the run
 *     // pl is the new pipeline: same step, same parameters and optimizer
 *     // state, nodes moved to other chunks; training goes on bit-identically
 *
 * What a move is. At a step boundary nothing is in flight: no activation,
 * no gradient (the optimizer has zeroed them, the group sums are consumed).
 * What a chunk carries from one step to the next is its parameters and
 * their optimizer state, the same data a training-state checkpoint holds
 * (stages/train/state.h); everything else (dropout masks, the sampler's
 * order, the learning rate) is a function of the seed and the step. A move
 * builds a second pipeline with the new cuts (schedule, programs, message
 * buffers, engine: pw_pipeline_create's work, with the same configuration),
 * copies every parameter and its optimizer state into it from the old one
 * (and --compress topk|powersgd's error-feedback state into its
 * compressors, per replica, parameter and use; not at T > 1, where it
 * starts again from zero), and then frees the old one. Results do not depend on the cuts (pipeline.h),
 * so the run stays bit-identical to one that never moved.
 *
 * Under a transport (mpirun) each process builds its own new chunks; the
 * processes agree that every one succeeded (an all-gather) before any state
 * moves; a parameter that changes process travels from the lowest pipeline
 * rank that held it to each rank that now needs it, in one global order
 * (parameter, then receiving rank) of blocking world sends and receives, so
 * every send meets its receive (no deadlock) and every wait is bounded by
 * the watchdog (a lost process ends the move with PW_ERR_TIMEOUT naming it).
 * The error-feedback state follows in the same way, (parameter, use) by
 * (parameter, use), from the rank whose chunk held the use's node to the
 * rank whose chunk holds it now.
 *
 * All or nothing. On any error *pl is unchanged and the old pipeline intact
 * in this process; info->kept says whether every process kept it (the run
 * may go on with the old cuts: a build that failed somewhere, a move that
 * was refused) or the run cannot go on (a message between processes was
 * lost). During a move both pipelines exist: the peak memory is the two
 * layouts' (docs/partition.md, "What a move costs").
 *
 * The trace (if any) passes to the new pipeline, with one event per
 * worker of this process: name "rebalance", category PW_TRACE_REBALANCE,
 * spanning the move (runtime/trace.h). Engine statistics
 * (pw_engine_rank_stats, pw_pipeline_stage_stats) start again from zero.
 *
 * Thread-safety: the training thread only, between steps; under a
 * transport every process at the same step with the same cuts.
 */
#ifndef PW_STAGES_TRAIN_REBALANCE_H
#define PW_STAGES_TRAIN_REBALANCE_H

#include <stdint.h>

#include "runtime/status.h"
#include "stages/train/pipeline.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_repartition_info {
    double seconds;           /* the move's wall time on this process */
    int64_t bytes_local;      /* parameter + optimizer bytes (and --compress's error-feedback
                                 state's) copied within this process */
    int64_t bytes_sent;       /* ... sent to other processes (transport) */
    int64_t bytes_received;   /* ... received from them */
    int kept;                 /* after an error: 1 when every process still runs the old
                                 pipeline and the run may go on; 0 when it cannot */
} pw_repartition_info;

/* Moves the chunk boundaries of *pl to cuts[0 .. n_cuts) (pw_pipeline_config.cuts'
 * layout: 0 = cuts[0] < ... < cuts[C] = node count, C = the pipeline's
 * chunks) at the current step boundary. PW_OK: *pl is a new pipeline (the
 * old one is destroyed; pointers into its programs are stale). Errors
 * (*pl unchanged): PW_ERR_INVALID_ARG for cuts of another length or out of
 * order; the build's error (PW_ERR_NOMEM, ...) naming the process under
 * MPI; the transport's (PW_ERR_TIMEOUT) when a process is lost. */
pw_status pw_pipeline_repartition(pw_pipeline **pl, const int *cuts, int n_cuts, pw_repartition_info *info);

/* Each pipeline rank's busy seconds (time inside the compute callbacks: F,
 * B, W and the optimizer, as the engine times them and the trace shows)
 * since this pipeline object was created, into busy[0 .. stages): the
 * largest over the replicas. Under a transport every process must call it
 * (an all-gather). */
pw_status pw_pipeline_rank_busy(pw_pipeline *pl, double *busy);

/* Test hook, read once: PW_TEST_SLOW=RANK:FACTOR[@STEP][/EVERY][,...] makes every
 * compute callback of the chunks on pipeline rank RANK (every replica)
 * take FACTOR times as long, from training step STEP on (default 1), by
 * sleeping (FACTOR − 1) × the callback's time after it: a slower device or
 * a core shared with another job. wRANK (e.g. w1:3) names one process of
 * an MPI run, world rank RANK, instead: one slow worker. /EVERY slows only
 * steps STEP, STEP + EVERY, ... (a straggler now and then). Results are
 * unchanged. Returns the factor in force for pipeline rank `rank` at
 * `step` (1 without the variable); pw_test_slow_factor_world for a world rank. */
double pw_test_slow_factor(int rank, int64_t step);
double pw_test_slow_factor_world(int world_rank, int64_t step);

#ifdef __cplusplus
}
#endif
#endif
