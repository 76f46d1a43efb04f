/* pipewright — the stage interface the scheduler drives.
 *
 * The scheduler knows nothing about layers. A stage is an object plus this
 * vtable; the graph executor in stages/ (pw_program) is one implementation, a
 * framework author's own trainer can supply another.
 *
 *     static const pw_stage_i my_stage_i = {
 *         .name = "my-trainer",
 *         .forward = my_forward,
 *         .backward_input = my_backward_input,
 *         .backward_weight = my_backward_weight,   // optional
 *     };
 *
 * Calls for one micro-batch use one activation `slot` (0 .. slots−1) chosen by
 * the scheduler; the slot keeps that micro-batch's stashed activations from
 * forward until its backward (or backward_weight, when split) has run. The
 * number of slots a stage needs is the validator's peak in-flight count.
 */
#ifndef PW_SCHEDULER_STAGE_H
#define PW_SCHEDULER_STAGE_H

#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_stage_i {
    const char *name;
    /* Run the forward of micro-batch `mb` with inputs already in `slot`. */
    pw_status (*forward)(void *self, int mb, int slot);
    /* Gradient with respect to the stage's inputs (and, when backward_weight
     * is NULL, also the weights: the full backward). */
    pw_status (*backward_input)(void *self, int mb, int slot);
    /* (optional) Gradient with respect to the weights, accumulated in
     * micro-batch order. NULL: backward_input does it. */
    pw_status (*backward_weight)(void *self, int mb, int slot);
    /* (optional) Apply the optimizer after all micro-batches of `step`. */
    pw_status (*optimizer_step)(void *self, long step);
} pw_stage_i;

#ifdef __cplusplus
}
#endif
#endif
