/* Tests: text generation through a pipeline's programs (stages/train/generate.h). */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graph/graph.h"
#include "stages/train/data.h"
#include "stages/train/generate.h"
#include "stages/train/pipeline.h"

static const char GPT[] =
    "graph gen_gpt\n"
    "input tokens : i32[16]\n"
    "label next : i32[16]\n"
    "tok = embedding(tokens, vocab=256, dim=32) as wte\n"
    "pos = pos_embedding(tok, max=16) as wpe\n"
    "h = repeat 2 as h (x = pos) {\n"
    "    a = layernorm(x) as ln_1\n"
    "    qkv = linear(a, out=96) as attn.c_attn\n"
    "    att = causal_attention(qkv, heads=2)\n"
    "    o = linear(att, out=32) as attn.c_proj\n"
    "    x1 = add(x, o)\n"
    "    m = layernorm(x1) as ln_2\n"
    "    fc = linear(m, out=64) as mlp.c_fc\n"
    "    g = gelu(fc)\n"
    "    pr = linear(g, out=32) as mlp.c_proj\n"
    "    x2 = add(x1, pr)\n"
    "    return x2\n"
    "}\n"
    "hf = layernorm(h) as ln_f\n"
    "logits = linear(hf, out=256, bias=false, weight=wte.weight) as lm_head\n"
    "loss = softmax_cross_entropy(logits, next)\n";

static char corpus[64];

static void setup(void)
{
    strcpy(corpus, "/tmp/pw_test_gen_XXXXXX");
    int fd = mkstemp(corpus);
    cr_assert_geq(fd, 0);
    FILE *f = fdopen(fd, "w");
    for (int i = 0; i < 400; i++) fputs(i % 2 ? "abcabcabc " : "xyz xyz ", f);
    fclose(f);
}

static void teardown(void) { unlink(corpus); }

TestSuite(generate, .init = setup, .fini = teardown, .timeout = 120);

/* Trains `steps` steps on `stages` stages and generates. */
static char *train_and_generate(int stages, pw_schedule_kind kind, int steps, const pw_generate_config *base)
{
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_string(GPT, sizeof GPT - 1, "gen.graph", &g), PW_OK, "%s", pw_last_error());
    pw_dataset *d = NULL;
    char spec[96];
    snprintf(spec, sizeof spec, "text:%s", corpus);
    cr_assert_eq(pw_dataset_from_spec_for_graph(spec, 1, g, &d), PW_OK, "%s", pw_last_error());
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = 8;
    pc.micro_batches = 4;
    pc.stages = stages;
    pc.schedule = kind;
    pc.pin = 0;
    pc.optim = pw_optim_defaults(PW_OPTIM_ADAMW);
    pc.optim.lr = 0.01f;
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    for (int i = 0; i < steps; i++) cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
    pw_generate_config gc = *base;
    gc.graph = g;
    char *text = NULL;
    cr_assert_eq(pw_generate(pl, &gc, &text), PW_OK, "%s", pw_last_error());
    /* Training still works after generation (ports unbound again). */
    cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
    pw_pipeline_destroy(pl);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
    return text;
}

Test(generate, deterministic_and_independent_of_stages_and_schedule)
{
    pw_generate_config gc = pw_generate_defaults();
    gc.prompt = "abc";
    gc.tokens = 30; /* longer than the context: the window slides */
    gc.temperature = 0.8;
    gc.top_k = 5;
    gc.seed = 11;
    char *a = train_and_generate(1, PW_SCHEDULE_1F1B, 30, &gc);
    char *b = train_and_generate(2, PW_SCHEDULE_1F1B, 30, &gc);
    char *c = train_and_generate(2, PW_SCHEDULE_ZB_V, 30, &gc);
    char *d = train_and_generate(1, PW_SCHEDULE_1F1B, 30, &gc);
    cr_assert_eq(strlen(a), 33);
    cr_assert(!strncmp(a, "abc", 3), "%s", a);
    cr_assert_str_eq(a, b);
    cr_assert_str_eq(a, c);
    cr_assert_str_eq(a, d);
    free(a);
    free(b);
    free(c);
    free(d);
}

Test(generate, greedy_learns_the_pattern)
{
    pw_generate_config gc = pw_generate_defaults();
    gc.prompt = "abcabc";
    gc.tokens = 6;
    gc.temperature = 0;
    char *a = train_and_generate(2, PW_SCHEDULE_1F1B, 150, &gc);
    cr_assert_eq(strlen(a), 12, "%s", a);
    /* After "abcabc" the corpus continues with "abc" or " ". */
    cr_assert(strchr("a ", a[6]), "'%s'", a);
    free(a);
}

Test(generate, refuses_bad_config_and_non_token_graphs)
{
    pw_graph *g = NULL;
    const char mlp[] = "graph m\ninput x : f32[4]\nlabel y : i32[]\nl = linear(x, out=3) as fc\n"
                       "loss = softmax_cross_entropy(l, y)\n";
    cr_assert_eq(pw_graph_parse_string(mlp, sizeof mlp - 1, "m.graph", &g), PW_OK, "%s", pw_last_error());
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_from_spec("synthetic:64:4:3", 1, &d), PW_OK, "%s", pw_last_error());
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = 8;
    pc.pin = 0;
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    pw_generate_config gc = pw_generate_defaults();
    char *text = NULL;
    cr_assert_eq(pw_generate(pl, &gc, &text), PW_ERR_INVALID_ARG); /* no graph */
    gc.graph = g;
    cr_assert_eq(pw_generate(pl, &gc, &text), PW_ERR_SHAPE);
    cr_assert(strstr(pw_last_error(), "i32"), "%s", pw_last_error());
    cr_assert_null(text);
    pw_pipeline_destroy(pl);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}
