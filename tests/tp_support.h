/* pipewright tests — what the tensor-parallel test programs share
 * (test_tensor_parallel.c, test_tp_state.c): the small MLP and GPT marked
 * for tensor parallelism, parsing with a Criterion assertion, and their data
 * sets. Header-only, static inline: each test file is its own program.
 */
#ifndef PW_TESTS_TP_SUPPORT_H
#define PW_TESTS_TP_SUPPORT_H

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graph/graph.h"
#include "stages/train/data.h"

/* The Fashion MLP's shape, smaller: the MLP pair split column then row.
 * Widths 37 and 19 do not divide by 2, 3 or 4. */
static const char *const MLP =
    "graph tp_mlp\n"
    "input image : f32[4, 6]\n"
    "label target : i32[]\n"
    "x = flatten(image)\n"
    "n = layernorm(x) as norm_in\n"
    "fc1 = linear(n, out=37, tp=column)\n"
    "h1 = relu(fc1)\n"
    "fc2 = linear(h1, out=19, tp=row)\n"
    "h2 = relu(fc2)\n"
    "logits = linear(h2, out=5) as head\n"
    "loss = softmax_cross_entropy(logits, target)\n";

/* The tiny GPT (tests/pipeline_support.h's, without dropout) split as
 * Megatron does: attention by heads (4 heads: 2 + 2 at T = 2, 1 + 1 + 2 at
 * T = 3), the MLPs column then row, the token embedding vocabulary-parallel
 * and the tied head column-parallel, so the cross-entropy is
 * vocabulary-parallel. */
static const char *const GPT =
    "graph tp_gpt\n"
    "input tokens : i32[16]\n"
    "label next : i32[16]\n"
    "tok = embedding(tokens, vocab=256, dim=32, tp=vocab) as wte\n"
    "pos = pos_embedding(tok, max=16) as wpe\n"
    "h = repeat 2 as h (x = pos) {\n"
    "  a   = layernorm(x) as ln_1\n"
    "  qkv = linear(a, out=96, tp=column) as attn.c_attn\n"
    "  att = causal_attention(qkv, heads=4)\n"
    "  o   = linear(att, out=32, tp=row) as attn.c_proj\n"
    "  x1  = add(x, o)\n"
    "  m   = layernorm(x1) as ln_2\n"
    "  fc  = linear(m, out=128, tp=column) as mlp.c_fc\n"
    "  g   = gelu(fc)\n"
    "  pr  = linear(g, out=32, tp=row) as mlp.c_proj\n"
    "  x2  = add(x1, pr)\n"
    "  return x2\n"
    "}\n"
    "hf = layernorm(h) as ln_f\n"
    "logits = linear(hf, out=256, bias=false, weight=wte.weight, tp=column) as lm_head\n"
    "loss = softmax_cross_entropy(logits, next)\n";

static inline pw_graph *parse(const char *text)
{
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_string(text, strlen(text), "tp.graph", &g), PW_OK, "%s", pw_last_error());
    return g;
}

static inline pw_dataset *images(void)
{
    pw_synthetic_config sc = {.n = 256, .sample_shape = {.ndim = 2, .d = {4, 6}}, .n_classes = 5, .seed = 3,
                              .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    return d;
}

static inline pw_dataset *tokens(void)
{
    char path[] = "/tmp/pw_tp_text_XXXXXX.txt";
    int fd = mkstemps(path, 4);
    cr_assert_geq(fd, 0);
    FILE *f = fdopen(fd, "w");
    cr_assert_not_null(f);
    for (int i = 0; i < 200; i++)
        fprintf(f, "%d: the quick brown fox jumps over the lazy dog %d times.\n", i, i * 7 % 13);
    fclose(f);
    pw_dataset *d = NULL;
    pw_status st = pw_dataset_load_text(path, 16, 1, &d);
    unlink(path);
    cr_assert_eq(st, PW_OK, "%s", pw_last_error());
    return d;
}

#endif
