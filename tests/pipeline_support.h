/* pipewright tests — what the pipeline test programs share: the small MLP
 * and GPT graphs they train, parsing with a Criterion assertion, and reading
 * a pipeline's parameters back in graph order. Header-only, static: each
 * test file is its own program.
 */
#ifndef PW_TESTS_PIPELINE_SUPPORT_H
#define PW_TESTS_PIPELINE_SUPPORT_H

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"
#include "stages/train/pipeline.h"
#include "stages/program/program.h"

/* After a "graph NAME\n" line. 11 nodes; h1 is used again after the cut, so
 * with four stages a value crosses several boundaries. */
#define PW_TEST_MLP_BODY                                                                 \
    "input image : f32[4, 6]\n"                                                          \
    "label target : i32[]\n"                                                             \
    "x = flatten(image)\n"                                                               \
    "fc1 = linear(x, out=24)\n"                                                          \
    "n1 = layernorm(fc1)\n"                                                              \
    "h1 = gelu(n1)\n"                                                                    \
    "fc2 = linear(h1, out=24)\n"                                                         \
    "h2 = relu(fc2)\n"                                                                   \
    "fc3 = linear(h2, out=24)\n"                                                         \
    "h3 = relu(fc3)\n"                                                                   \
    "r = add(h3, h1)\n"                                                                  \
    "logits = linear(r, out=5) as head\n"                                                \
    "loss = softmax_cross_entropy(logits, target)\n"

/* After a "graph NAME\n" line. A small GPT: the head tied to wte (a tie
 * across stages), dropout, attention. */
#define PW_TEST_GPT_BODY                                                                 \
    "input tokens : i32[16]\n"                                                           \
    "label next : i32[16]\n"                                                             \
    "tok = embedding(tokens, vocab=256, dim=32) as wte\n"                                \
    "pos = pos_embedding(tok, max=16) as wpe\n"                                          \
    "x0  = dropout(pos, p=0.1)\n"                                                        \
    "h = repeat 2 as h (x = x0) {\n"                                                     \
    "  a   = layernorm(x) as ln_1\n"                                                     \
    "  qkv = linear(a, out=96) as attn.c_attn\n"                                         \
    "  att = causal_attention(qkv, heads=4)\n"                                           \
    "  o   = linear(att, out=32) as attn.c_proj\n"                                       \
    "  x1  = add(x, o)\n"                                                                \
    "  m   = layernorm(x1) as ln_2\n"                                                    \
    "  fc  = linear(m, out=128) as mlp.c_fc\n"                                           \
    "  g   = gelu(fc)\n"                                                                 \
    "  pr  = linear(g, out=32) as mlp.c_proj\n"                                          \
    "  pd  = dropout(pr, p=0.1)\n"                                                       \
    "  x2  = add(x1, pd)\n"                                                              \
    "  return x2\n"                                                                      \
    "}\n"                                                                                \
    "hf = layernorm(h) as ln_f\n"                                                        \
    "logits = linear(hf, out=256, bias=false, weight=wte.weight) as lm_head\n"           \
    "loss = softmax_cross_entropy(logits, next)\n"

/* Parses `text` (named `file` in messages); the test fails on an error. */
static inline pw_graph *test_parse(const char *text, const char *file)
{
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_string(text, strlen(text), file, &g), PW_OK, "%s", pw_last_error());
    return g;
}

/* Every parameter in graph order, read through pw_program_param_read (a
 * host copy, also of device memory) from the first program of `replica`
 * holding it (with replicas a chunk is several programs, one per bucket). */
static inline float *test_replica_params(pw_pipeline *pl, int replica, const pw_graph *g, int64_t *count)
{
    int64_t total = 0;
    for (int i = 0; i < g->n_params; i++) total += pw_shape_numel(&g->params[i].shape);
    float *out = calloc((size_t)total + 1, sizeof(float));
    cr_assert_not_null(out);
    int64_t off = 0;
    for (int i = 0; i < g->n_params; i++) {
        int found = 0;
        for (int s = 0; s < pw_pipeline_n_chunks(pl) && !found; s++) {
            pw_program *progs[16];
            int np = pw_pipeline_programs(pl, replica, s, progs, 16);
            for (int q = 0; q < np && q < 16 && !found; q++) {
                pw_program *p = progs[q];
                for (int j = 0; j < pw_program_n_params(p) && !found; j++) {
                    pw_program_param pp;
                    pw_program_param_at(p, j, &pp);
                    if (pp.graph_param != i) continue;
                    cr_assert_eq(pw_program_param_read(p, j, PW_PARAM_DATA, 0, out + off), PW_OK, "%s",
                                 pw_last_error());
                    found = 1;
                }
            }
        }
        cr_assert(found, "parameter %s held by no stage of replica %d", g->params[i].name, replica);
        off += pw_shape_numel(&g->params[i].shape);
    }
    *count = total;
    return out;
}

/* The same for replica 0 (every replica holds the same bytes). */
static inline float *test_pipeline_params(pw_pipeline *pl, const pw_graph *g, int64_t *count)
{
    return test_replica_params(pl, 0, g, count);
}

#endif
