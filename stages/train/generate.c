/* pipewright — text generation through a pipeline's programs (generate.h). */
#include "stages/train/generate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"
#include "runtime/rng.h"
#include "stages/program/program.h"

pw_generate_config pw_generate_defaults(void)
{
    pw_generate_config c;
    memset(&c, 0, sizeof c);
    c.tokens = 200;
    c.temperature = 1.0;
    c.seed = 1;
    return c;
}

#define MAX_PROGS 256

/* Samples from logits[0..V) (row of the last real position). */
static int sample(const float *logits, int V, const pw_generate_config *cfg, uint64_t key, int64_t i,
                  double *probs, int *order)
{
    int best = 0;
    for (int v = 1; v < V; v++)
        if (logits[v] > logits[best]) best = v;
    if (cfg->temperature <= 0) return best;
    /* The top k by value (ties: lower id first), by a selection over the order. */
    for (int v = 0; v < V; v++) order[v] = v;
    int k = cfg->top_k > 0 && cfg->top_k < V ? cfg->top_k : V;
    for (int a = 0; a < k; a++) {
        int m = a;
        for (int b = a + 1; b < V; b++)
            if (logits[order[b]] > logits[order[m]]) m = b;
        int tmp = order[a];
        order[a] = order[m];
        order[m] = tmp;
    }
    double mx = logits[order[0]], sum = 0;
    for (int a = 0; a < k; a++) {
        probs[a] = exp(((double)logits[order[a]] - mx) / cfg->temperature);
        sum += probs[a];
    }
    double u = (double)pw_rng_uniform(key, (uint64_t)i) * sum, acc = 0;
    for (int a = 0; a < k; a++) {
        acc += probs[a];
        if (u < acc) return order[a];
    }
    return order[k - 1];
}

pw_status pw_generate(pw_pipeline *pl, const pw_generate_config *cfg, char **out)
{
    *out = NULL;
    if (!pl || !cfg || !cfg->graph || cfg->tokens < 0 || cfg->top_k < 0 || !(cfg->temperature >= 0))
        return pw_error(PW_ERR_INVALID_ARG, "generate: bad config (a graph, tokens >= 0, temperature >= 0, "
                        "top-k >= 0)");
    const pw_graph *g = cfg->graph;
    const pw_value *in = &g->values[g->input];
    if (in->dtype != PW_I32 || in->shape.ndim != 1)
        return pw_error(PW_ERR_SHAPE, "generate: %s: the input '%s' is not i32 [T] tokens", g->file ? g->file : g->name,
                        in->name);
    const int64_t T = in->shape.d[0];
    /* The logits: what the loss reads first, [T, V]. */
    int logits = -1;
    for (int i = 0; i < g->n_nodes; i++)
        if (g->nodes[i].output == g->loss && g->nodes[i].n_inputs >= 1) logits = g->nodes[i].inputs[0];
    const pw_value *lv = logits >= 0 ? &g->values[logits] : NULL;
    if (!lv || lv->dtype != PW_F32 || lv->shape.ndim != 2 || lv->shape.d[0] != T)
        return pw_error(PW_ERR_SHAPE, "generate: %s: the loss does not read logits [%lld, V]",
                        g->file ? g->file : g->name, (long long)T);
    const int V = (int)lv->shape.d[1];

    /* Programs in stage order; marks where a stage ends (its ports get links). */
    const int S = pw_pipeline_n_chunks(pl); /* chunk order = node order */
    pw_program *progs[MAX_PROGS];
    int stage_end[MAX_PROGS]; /* progs[i] is the last piece of its stage */
    int n = 0;
    for (int s = 0; s < S; s++) {
        int k = pw_pipeline_programs(pl, 0, s, progs + n, MAX_PROGS - n);
        if (k <= 0)
            return pw_error(PW_ERR_INVALID_ARG, "generate: stage %d of %d holds no program here (generation runs "
                            "in one process)", s, S);
        if (n + k > MAX_PROGS) return pw_error(PW_ERR_INVALID_ARG, "generate: more than %d programs", MAX_PROGS);
        for (int j = 0; j < k; j++) stage_end[n + j] = j == k - 1;
        n += k;
    }
    pw_status st = PW_OK;
    void *link[MAX_PROGS] = {0};
    unsigned char *text = NULL;
    double *probs = malloc((size_t)V * sizeof *probs);
    int *order = malloc((size_t)V * sizeof *order);
    const char *prompt = cfg->prompt && *cfg->prompt ? cfg->prompt : "\n";
    const size_t plen = strlen(prompt);
    text = malloc(plen + (size_t)cfg->tokens + 1);
    if (!probs || !order || !text) {
        st = pw_error(PW_ERR_NOMEM, "generate: out of memory");
        goto out;
    }
    memcpy(text, prompt, plen);
    int64_t len = (int64_t)plen;
    for (int i = 0; i + 1 < n; i++) {
        if (!stage_end[i]) continue;
        size_t b = pw_program_port_bytes(progs[i], PW_PORT_ACT_OUT);
        if (posix_memalign(&link[i], 64, b ? b : 64) != 0) {
            link[i] = NULL;
            st = pw_error(PW_ERR_NOMEM, "generate: out of memory");
            goto out;
        }
        PW_CHECK_GOTO(pw_program_bind_port(progs[i], 0, PW_PORT_ACT_OUT, link[i]), st, out);
        PW_CHECK_GOTO(pw_program_bind_port(progs[i + 1], 0, PW_PORT_ACT_IN, link[i]), st, out);
    }
    const uint64_t key = pw_rng_key(cfg->seed, "generate");
    for (int64_t t = 0; t < cfg->tokens; t++) {
        const int64_t w = len < T ? len : T; /* real positions in the window */
        const unsigned char *src = text + len - w;
        float *lg = NULL;
        for (int i = 0; i < n; i++) {
            int32_t *x = pw_program_value(progs[i], g->input, 0);
            if (x) {
                for (int64_t p = 0; p < T; p++) x[p] = p < w ? (int32_t)src[p] : 0;
            }
            if (g->label >= 0) {
                int32_t *y = pw_program_value(progs[i], g->label, 0);
                if (y) memset(y, 0, (size_t)pw_shape_numel(&g->values[g->label].shape) * sizeof *y);
            }
            PW_CHECK_GOTO(pw_program_forward_eval(progs[i], 0, 1), st, out);
            if (pw_program_has_loss(progs[i])) lg = pw_program_value(progs[i], logits, 0);
        }
        if (!lg) {
            st = pw_error(PW_ERR_INTERNAL, "generate: no program holds the logits '%s'", lv->name);
            goto out;
        }
        int tok = sample(lg + (size_t)(w - 1) * (size_t)V, V, cfg, key, (uint64_t)t, probs, order);
        text[len++] = (unsigned char)(tok & 0xff);
    }
    text[len] = '\0';
    *out = (char *)text;
    text = NULL;
out:
    for (int i = 0; i + 1 < n; i++) {
        if (!link[i]) continue;
        pw_program_bind_port(progs[i], 0, PW_PORT_ACT_OUT, NULL);
        pw_program_bind_port(progs[i + 1], 0, PW_PORT_ACT_IN, NULL);
        free(link[i]);
    }
    free(text);
    free(probs);
    free(order);
    return st;
}

pw_status pw_generate_dataset(const pw_graph *g, pw_dataset **out)
{
    *out = NULL;
    const pw_value *in = &g->values[g->input];
    if (in->dtype != PW_I32 || in->shape.ndim != 1)
        return pw_error(PW_ERR_SHAPE, "%s: --generate needs a graph whose input is i32 [T] tokens; '%s' is not",
                        g->file ? g->file : g->name, in->name);
    const int64_t T = in->shape.d[0];
    pw_dataset *d = calloc(1, sizeof *d);
    if (!d) return pw_error(PW_ERR_NOMEM, "out of memory");
    d->n = 1;
    d->sample_shape = in->shape;
    d->sample_numel = T;
    d->x_dtype = PW_I32;
    if (g->label >= 0) d->label_shape = g->values[g->label].shape;
    d->label_numel = T;
    d->n_classes = 256;
    d->n_tokens = 256;
    d->text = calloc((size_t)T + 1, 1);
    d->text_len = T + 1;
    d->stride = T;
    d->name = strdup("generate");
    if (!d->text || !d->name) {
        pw_dataset_destroy(d);
        return pw_error(PW_ERR_NOMEM, "out of memory");
    }
    *out = d;
    return PW_OK;
}
