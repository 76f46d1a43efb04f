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
 */
#ifndef PW_STAGES_OPTIM_H
#define PW_STAGES_OPTIM_H

#include <stdint.h>

#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pw_optim_kind { PW_OPTIM_SGD = 0, PW_OPTIM_ADAMW } pw_optim_kind;

typedef struct pw_optim_config {
    pw_optim_kind kind;
    float lr;
    float momentum;      /* SGD */
    float weight_decay;
    float beta1, beta2;  /* AdamW */
    float eps;           /* AdamW */
} pw_optim_config;

pw_optim_config pw_optim_defaults(pw_optim_kind kind);
/* "sgd" / "adamw" -> kind; PW_ERR_INVALID_ARG otherwise. */
pw_status pw_optim_parse_kind(const char *s, pw_optim_kind *out);
const char *pw_optim_name(pw_optim_kind kind);
/* Floats of state per parameter element: SGD 1 (momentum buffer), AdamW 2. */
int pw_optim_state_floats(pw_optim_kind kind);

/* One update of n elements. `step` counts from 1. `state` holds
 * pw_optim_state_floats() × n floats, zero before the first step. */
void pw_optim_update(const pw_optim_config *c, int64_t step, float *p, const float *g,
                     float *state, int64_t n, int decay);

#ifdef __cplusplus
}
#endif
#endif
