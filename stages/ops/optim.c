/* pipewright — SGD and AdamW updates (PyTorch semantics, fp32). */
#include "stages/ops/optim.h"
#include "stages/ops/cpu/vec.h"

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

static const char *const schedule_names[] = {"constant", "cosine", "linear"};

pw_status pw_lr_schedule_parse(const char *s, pw_lr_schedule *out)
{
    for (int i = 0; i < 3; i++)
        if (!strcmp(s, schedule_names[i])) {
            *out = (pw_lr_schedule)i;
            return PW_OK;
        }
    return pw_error(PW_ERR_INVALID_ARG, "unknown lr schedule '%s' (want constant, cosine or linear)",
                    s);
}

const char *pw_lr_schedule_name(pw_lr_schedule s)
{
    return (unsigned)s < 3 ? schedule_names[s] : "?";
}

float pw_optim_lr_at(const pw_optim_config *c, int64_t step)
{
    const int64_t W = c->warmup_steps > 0 ? c->warmup_steps : 0;
    if (step <= W) return (float)((double)c->lr * (double)step / (double)W);
    if (c->schedule == PW_LR_CONSTANT || c->decay_steps <= W) return c->lr;
    double p = (double)(step - W) / (double)(c->decay_steps - W);
    if (p > 1.0) p = 1.0;
    const double hi = c->lr, lo = c->min_lr;
    if (c->schedule == PW_LR_COSINE)
        return (float)(lo + (hi - lo) * 0.5 * (1.0 + cos(3.14159265358979323846 * p)));
    return (float)(hi + (lo - hi) * p);
}

int pw_optim_state_floats(pw_optim_kind kind) { return kind == PW_OPTIM_SGD ? 1 : 2; }

/* Every element's update depends on that element alone, so a tensor cut
 * into ranges (pw_optim_update_range, the CPU backend's team) gives the
 * same bits as one call; VEC_FOR vectorises each loop without changing an
 * element's arithmetic. */
static void sgd_range(const pw_optim_config *c, int64_t step, float *restrict p,
                      const float *restrict g, float *restrict buf, int64_t n, int decay)
{
    const float lr = pw_optim_lr_at(c, step), mu = c->momentum, wd = decay ? c->weight_decay : 0.0f;
    if (mu == 0.0f) {
        VEC_FOR(i, n, p[i] -= lr * (g[i] + wd * p[i]););
        return;
    }
    if (step == 1) {
        VEC_FOR(i, n, float gi = g[i] + wd * p[i]; buf[i] = gi; p[i] -= lr * gi;);
        return;
    }
    VEC_FOR(i, n, float gi = g[i] + wd * p[i]; buf[i] = mu * buf[i] + gi; p[i] -= lr * buf[i];);
}

/* m, v: the two halves of the state (first and second moments). sqrtf
 * vectorises because CMakeLists.txt builds this file with -fno-math-errno
 * (sqrt is exact in IEEE arithmetic either way; only errno differs). */
static void adamw_range(const pw_optim_config *c, int64_t step, float *restrict p,
                        const float *restrict g, float *restrict m, float *restrict v, int64_t n,
                        int decay)
{
    const float b1 = c->beta1, b2 = c->beta2, lr = pw_optim_lr_at(c, step), eps = c->eps;
    const float decay_mul = decay ? 1.0f - lr * c->weight_decay : 1.0f;
    /* Bias corrections in double: (1 − β2ᵗ) loses precision in float for small t. */
    const float bc1 = (float)(1.0 - pow(b1, (double)step));
    const float bc2_sqrt = (float)sqrt(1.0 - pow(b2, (double)step));
    const float step_size = lr / bc1;
    VEC_FOR(i, n, float gi = g[i];
            m[i] = b1 * m[i] + (1.0f - b1) * gi;
            v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
            float denom = sqrtf(v[i]) / bc2_sqrt + eps;
            p[i] = p[i] * decay_mul - step_size * m[i] / denom;);
}

void pw_optim_update_range(const pw_optim_config *c, int64_t step, float *p, const float *g,
                           float *state, int64_t n, int64_t lo, int64_t hi, int decay)
{
    if (lo < 0) lo = 0;
    if (hi > n) hi = n;
    if (hi <= lo) return;
    if (c->kind == PW_OPTIM_SGD) sgd_range(c, step, p + lo, g + lo, state + lo, hi - lo, decay);
    else adamw_range(c, step, p + lo, g + lo, state + lo, state + n + lo, hi - lo, decay);
}

void pw_optim_update(const pw_optim_config *c, int64_t step, float *p, const float *g,
                     float *state, int64_t n, int decay)
{
    pw_optim_update_range(c, step, p, g, state, n, 0, n, decay);
}
