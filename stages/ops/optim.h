/* pipewright — optimizers: SGD (momentum, weight decay) and AdamW.
 *
 * An optimizer updates a list of parameter tensors in place from their
 * accumulated gradients. State (momentum, Adam moments) is owned by the caller
 * and planned with the rest of the stage's memory: pw_optim_state_floats()
 * says how many floats per parameter element to reserve.
 *
 *     pw_optim_config oc = pw_optim_defaults(PW_OPTIM_ADAMW);
 *     oc.lr = 1e-3f;
 *     for each tensor t: pw_optim_update(&oc, step, t.p, t.g, t.state, t.n, t.decay);
 *
 * Semantics match PyTorch's torch.optim.SGD and torch.optim.AdamW:
 *   SGD:   g' = g + wd·p (decayed tensors); buf = μ·buf + g' (buf = g' at step 1);
 *          p -= lr·buf   (p -= lr·g' when μ = 0)
 *   AdamW: p -= lr·wd·p (decayed tensors); m = β1·m + (1−β1)·g;
 *          v = β2·v + (1−β2)·g²; p -= lr · (m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε)
 * Which tensors decay is a property of the parameter (pw_param.decay).
 *
 * Learning-rate schedule. The lr of step t (counting from 1) is a pure
 * function of the config and t, pw_optim_lr_at(), so every stage and replica
 * that runs step t uses the same value and the pipeline stays bit-identical
 * to one stage:
 *   warm-up (t ≤ W):  lr · t / W                   (W = warmup_steps; none if 0)
 *   then, with p = (t − W) / (decay_steps − W) clamped to [0, 1]:
 *     constant:  lr
 *     cosine:    min_lr + (lr − min_lr) · (1 + cos(π p)) / 2
 *     linear:    lr + (min_lr − lr) · p
 * computed in double, rounded once to float. Steps past decay_steps stay at
 * min_lr; decay_steps ≤ warmup_steps (0 included) means no decay. The
 * defaults (constant, no warm-up) leave lr untouched.
 *
 * Ownership and threads: pure functions of the config and the step, callable
 * from any thread; pw_optim_update updates the caller's arrays in place, so
 * concurrent calls must touch disjoint arrays. Names are static strings.
 */
#ifndef PW_STAGES_OPTIM_H
#define PW_STAGES_OPTIM_H

#include <stdint.h>

#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pw_optim_kind { PW_OPTIM_SGD = 0, PW_OPTIM_ADAMW } pw_optim_kind;
typedef enum pw_lr_schedule { PW_LR_CONSTANT = 0, PW_LR_COSINE, PW_LR_LINEAR } pw_lr_schedule;

typedef struct pw_optim_config {
    pw_optim_kind kind;
    float lr;
    float momentum;      /* SGD */
    float weight_decay;
    float beta1, beta2;  /* AdamW (defaults 0.9, 0.999) */
    float eps;           /* AdamW (default 1e-8); the exact float32 update:
                            docs/api.md, "Reproducing the math" */
    pw_lr_schedule schedule; /* after the warm-up (default constant) */
    int64_t warmup_steps;    /* linear warm-up over steps 1..warmup_steps (0: none) */
    int64_t decay_steps;     /* cosine/linear reach min_lr at this step (the run's length) */
    float min_lr;            /* cosine/linear end value (default 0) */
} pw_optim_config;

pw_optim_config pw_optim_defaults(pw_optim_kind kind);
/* "sgd" / "adamw" -> kind; PW_ERR_INVALID_ARG otherwise. */
pw_status pw_optim_parse_kind(const char *s, pw_optim_kind *out);
const char *pw_optim_name(pw_optim_kind kind);
/* "constant" / "cosine" / "linear" -> schedule; PW_ERR_INVALID_ARG otherwise. */
pw_status pw_lr_schedule_parse(const char *s, pw_lr_schedule *out);
const char *pw_lr_schedule_name(pw_lr_schedule s);
/* The learning rate of step `step` (from 1) under c's schedule; c->lr itself
 * for the default constant schedule without warm-up. */
float pw_optim_lr_at(const pw_optim_config *c, int64_t step);
/* Floats of state per parameter element: SGD 1 (momentum buffer), AdamW 2. */
int pw_optim_state_floats(pw_optim_kind kind);

/* One update of n elements at learning rate pw_optim_lr_at(c, step). `step`
 * counts from 1. `state` holds pw_optim_state_floats() × n floats, zero
 * before the first step. */
void pw_optim_update(const pw_optim_config *c, int64_t step, float *p, const float *g,
                     float *state, int64_t n, int decay);
/* Elements [lo, hi) of that update (clamped to [0, n)): every element
 * depends on its own p, g and state only, so cutting a tensor into ranges,
 * updated in any order or on any threads, gives exactly the bits of one
 * pw_optim_update (the CPU backend spreads them over its thread team). */
void pw_optim_update_range(const pw_optim_config *c, int64_t step, float *p, const float *g,
                           float *state, int64_t n, int64_t lo, int64_t hi, int decay);

#ifdef __cplusplus
}
#endif
#endif
