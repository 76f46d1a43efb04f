/* pipewright — the stage interface the scheduler drives.
 *
 * The scheduler knows nothing about layers. A stage chunk is an object plus
 * this vtable; the graph stage in stages/ (pw_graph_stage) is one
 * implementation, a framework author's own trainer can supply another.
 *
 *     static const pw_stage_i my_stage_i = {
 *         .name = "my-trainer",
 *         .forward = my_forward,
 *         .backward_input = my_backward_input,
 *         .backward_weight = my_backward_weight,   // optional
 *         .port_bytes = my_port_bytes,             // optional
 *         .bind = my_bind,                         // optional
 *     };
 *
 * Slots. Calls for one micro-batch use one activation `slot` (0 .. slots−1)
 * chosen by the engine; the slot keeps that micro-batch's stashed activations
 * from forward until its last backward (backward_input, or backward_weight
 * when the schedule splits W). A chunk needs as many slots as the validator's
 * peak in-flight count for it.
 *
 * Ports. Neighbouring chunks exchange one message per micro-batch in each
 * direction. The engine owns the message memory and hands it over between
 * chunks without copying: before each call it binds the buffers the call
 * reads or writes to the slot:
 *   forward(mb, slot):        ACT_IN (received, read-only) and ACT_OUT (to fill)
 *   backward_input(mb, slot): GRAD_OUT (received gradient of ACT_OUT, read-only)
 *                             and GRAD_IN (to fill: gradient of ACT_IN)
 *   backward_weight(mb, slot): the same bindings as backward_input, still valid
 * A bound buffer stays valid and unchanged until the chunk's last backward of
 * that micro-batch has returned. The first chunk has no ACT_IN/GRAD_IN, the
 * last no ACT_OUT/GRAD_OUT (port_bytes returns 0 for those).
 *
 * Data parallelism (optional slots; docs/distributed.md). With replicas the
 * engine sums each chunk's gradients across the replicas that hold it, in
 * the schedule's n_buckets buckets, before OPTIM:
 *   grad_bucket(b, n, spans, max)   which gradient floats form bucket b
 *                                   (required with replicas);
 *   backward_bucket(mb, slot, b, part)  lets bucket b's all-reduce start in
 *                                   the middle of the chunk's last backward:
 *                                   on that backward the engine calls it for
 *                                   b = 0 .. n−1 in order instead of
 *                                   backward_input + backward_weight (part
 *                                   PW_BWD_FULL, unsplit schedules) or
 *                                   backward_weight (PW_BWD_WEIGHT, split W);
 *                                   the calls together must do exactly what
 *                                   those would, and bucket b's gradients must
 *                                   be final when call b returns. So bucket 0
 *                                   holds the chunk's last layers;
 *   grad_bucket_rows(b, n, rows, max)  which of bucket b's spans are
 *                                   matrices (for PowerSGD compression,
 *                                   pw_engine_config.compress);
 *   grad_sumsq() / scale_grads(s)   global gradient-norm clipping.
 *   optimizer_try(step) /          post-validation (pw_engine_config
 *   optimizer_commit() /           .post_validate, docs/engine.md): the
 *   optimizer_undo()               optimizer step taken before the global
 *                                  norm is known, then kept or undone.
 *   zero_grads()                   a discarded step's gradients dropped
 *                                  (overlap_steps with post-validation).
 *
 * Asynchronous stages (optional slot `submitted`; docs/engine.md, "Pending
 * completions"). A stage whose work runs elsewhere (a GPU stream, a thread
 * pool) may return from forward / backward_input / backward_weight /
 * backward_bucket / optimizer_step before that work is done. Right after
 * each such call returns PW_OK the engine calls
 *     submitted(self, done, arg)
 * which returns 0 when the call's work is complete (the engine goes on as
 * for a synchronous stage) or 1 when it completes later: the stage then
 * calls done(arg, st, msg) exactly once, from any thread, when every effect
 * of the call is in place — the port buffers it fills (ACT_OUT, GRAD_IN)
 * written in host memory, gradients final for their bucket — with PW_OK,
 * or the failure and a message naming it (msg may be NULL; the engine
 * copies it before done returns). Until then the worker parks that action:
 * its loop keeps running (messages arrive, the watchdog names "the
 * completion of F of micro-batch 3"), and it calls nothing else of any
 * stage it drives — the next call, the sends after the action and the
 * release of the micro-batch's buffers all wait for done. A failed or
 * aborted step still waits for an outstanding completion before it ends,
 * because the stage may still be writing engine-owned buffers. A stage
 * without this slot is synchronous (costs nothing extra).
 */
#ifndef PW_SCHEDULER_STAGE_H
#define PW_SCHEDULER_STAGE_H

#include <stddef.h>

#include "runtime/collective.h"
#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pw_port {
    PW_PORT_ACT_IN = 0,   /* activations from the previous chunk */
    PW_PORT_ACT_OUT,      /* activations for the next chunk */
    PW_PORT_GRAD_OUT,     /* gradient of ACT_OUT, from the next chunk */
    PW_PORT_GRAD_IN,      /* gradient of ACT_IN, for the previous chunk */
    PW_PORT_COUNT
} pw_port;

/* What a backward_bucket call computes. */
typedef enum pw_bwd_part {
    PW_BWD_FULL = 0,      /* input and weight gradients of the bucket's part */
    PW_BWD_WEIGHT,        /* weight gradients only (the schedule splits W) */
} pw_bwd_part;

/* How an asynchronous stage reports completion (see "Asynchronous stages"):
 * callable from any thread, exactly once per pending call. */
typedef void (*pw_stage_done_fn)(void *arg, pw_status st, const char *msg);

typedef struct pw_stage_i {
    const char *name;
    /* Run the forward of micro-batch `mb` in `slot`. The first chunk loads
     * its own inputs and the last its labels (the same sampler everywhere). */
    pw_status (*forward)(void *self, int mb, int slot);
    /* Gradient with respect to the chunk's inputs (and, when backward_weight
     * is NULL or the schedule does not split W, also the weights). */
    pw_status (*backward_input)(void *self, int mb, int slot);
    /* (optional) Gradient with respect to the weights, accumulated in
     * micro-batch order. */
    pw_status (*backward_weight)(void *self, int mb, int slot);
    /* (optional) Apply the optimizer after all micro-batches of `step`
     * (counting from 1) and zero the gradients. */
    pw_status (*optimizer_step)(void *self, long step);
    /* (optional) Bytes per micro-batch of a port's message; 0 = no port. */
    size_t (*port_bytes)(void *self, pw_port port);
    /* (optional) Point a port of `slot` at engine-owned memory of
     * port_bytes() bytes, 64-byte aligned. */
    pw_status (*bind)(void *self, int slot, pw_port port, void *buf);

    /* (optional) Data parallelism: writes up to max_spans spans of bucket
     * `bucket` (0 .. n_buckets−1) of the chunk's gradients into `spans` and
     * returns how many it has (possibly 0: an empty bucket). Called once per
     * bucket at engine creation; the floats must stay where they are. Every
     * replica must describe buckets of equal sizes. */
    int (*grad_bucket)(void *self, int bucket, int n_buckets, pw_span *spans, int max_spans);
    /* (optional) The part of the backward of `mb` whose gradients form
     * bucket `bucket` (see "Data parallelism" above). */
    pw_status (*backward_bucket)(void *self, int mb, int slot, int bucket, pw_bwd_part part);
    /* (optional) Sum of the squares of the chunk's gradients, in double, in
     * a fixed order (after the all-reduce; for --clip-grad-norm). */
    double (*grad_sumsq)(void *self);
    /* (optional) Multiplies every gradient of the chunk by `scale`. */
    void (*scale_grads)(void *self, float scale);
    /* (optional) Asynchronous completion of the call that just returned
     * PW_OK: 0 = complete now, 1 = done(arg, ...) follows once (see
     * "Asynchronous stages" above). */
    int (*submitted)(void *self, pw_stage_done_fn done, void *arg);
    /* (optional) Post-validation. optimizer_try does what optimizer_step
     * does (the same checks, the same bits) but keeps the gradients and a
     * copy of the parameters and optimizer state; then the engine calls
     * exactly one of optimizer_commit (zero the gradients: the step stands)
     * and optimizer_undo (parameters and state back; the gradients stay,
     * so scale_grads and optimizer_step can redo the step). All three
     * complete inside the call (submitted is not asked). */
    pw_status (*optimizer_try)(void *self, long step);
    pw_status (*optimizer_commit)(void *self);
    pw_status (*optimizer_undo)(void *self);
    /* (optional) With gradient compression that uses shapes (PowerSGD,
     * runtime/compress.h): for each span grad_bucket reports for `bucket`,
     * in the same order, rows[i] > 0 when span i is a rows × (n / rows)
     * matrix, row-major (a weight (out, in); a tensor of more dimensions as
     * (dim 0, the rest)), or 0 for a vector. Writes up to max entries.
     * Without it every span is a vector. */
    void (*grad_bucket_rows)(void *self, int bucket, int n_buckets, int64_t *rows, int max);
    /* (optional) Zeroes the chunk's gradients: a step whose work the engine
     * discards (pw_engine_config.overlap_steps with post-validation: the
     * step had started on parameters that were then rolled back). Completes
     * inside the call. */
    pw_status (*zero_grads)(void *self);
} pw_stage_i;

#ifdef __cplusplus
}
#endif
#endif
