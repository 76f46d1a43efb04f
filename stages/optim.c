/* pipewright — SGD and AdamW updates (PyTorch semantics, fp32). */
#include "stages/optim.h"

#include <math.h>
#include <string.h>

pw_optim_config pw_optim_defaults(pw_optim_kind kind)
{
    pw_optim_config c;
    memset(&c, 0, sizeof c);
    c.kind = kind;
    if (kind == PW_OPTIM_SGD) {
        c.lr = 0.05f;
        c.momentum = 0.9f;
        c.weight_decay = 0.0f;
    } else {
        c.lr = 1e-3f;
        c.weight_decay = 0.01f;
        c.beta1 = 0.9f;
        c.beta2 = 0.999f;
        c.eps = 1e-8f;
    }
    return c;
}

pw_status pw_optim_parse_kind(const char *s, pw_optim_kind *out)
{
    if (!strcmp(s, "sgd")) *out = PW_OPTIM_SGD;
    else if (!strcmp(s, "adamw")) *out = PW_OPTIM_ADAMW;
    else return pw_error(PW_ERR_INVALID_ARG, "unknown optimizer '%s' (want sgd or adamw)", s);
    return PW_OK;
}

const char *pw_optim_name(pw_optim_kind kind)
{
    return kind == PW_OPTIM_SGD ? "sgd" : "adamw";
}

int pw_optim_state_floats(pw_optim_kind kind) { return kind == PW_OPTIM_SGD ? 1 : 2; }

static void sgd_update(const pw_optim_config *c, int64_t step, float *p, const float *g,
                       float *buf, int64_t n, int decay)
{
    const float lr = c->lr, mu = c->momentum, wd = decay ? c->weight_decay : 0.0f;
    if (mu == 0.0f) {
        for (int64_t i = 0; i < n; i++) p[i] -= lr * (g[i] + wd * p[i]);
        return;
    }
    if (step == 1) {
        for (int64_t i = 0; i < n; i++) {
            float gi = g[i] + wd * p[i];
            buf[i] = gi;
            p[i] -= lr * gi;
        }
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i] + wd * p[i];
        buf[i] = mu * buf[i] + gi;
        p[i] -= lr * buf[i];
    }
}

static void adamw_update(const pw_optim_config *c, int64_t step, float *p, const float *g,
                         float *state, int64_t n, int decay)
{
    float *m = state, *v = state + n;
    const float b1 = c->beta1, b2 = c->beta2, lr = c->lr, eps = c->eps;
    const float decay_mul = decay ? 1.0f - lr * c->weight_decay : 1.0f;
    /* Bias corrections in double: (1 − β2ᵗ) loses precision in float for small t. */
    const float bc1 = (float)(1.0 - pow(b1, (double)step));
    const float bc2_sqrt = (float)sqrt(1.0 - pow(b2, (double)step));
    const float step_size = lr / bc1;
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        m[i] = b1 * m[i] + (1.0f - b1) * gi;
        v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
        float denom = sqrtf(v[i]) / bc2_sqrt + eps;
        p[i] = p[i] * decay_mul - step_size * m[i] / denom;
    }
}

void pw_optim_update(const pw_optim_config *c, int64_t step, float *p, const float *g,
                     float *state, int64_t n, int decay)
{
    if (c->kind == PW_OPTIM_SGD) sgd_update(c, step, p, g, state, n, decay);
    else adamw_update(c, step, p, g, state, n, decay);
}
