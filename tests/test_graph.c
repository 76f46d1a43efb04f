/* Tests for graph format v1 (graph/): parsing into the IR, repeat expansion,
 * tied parameters, cuts, a table of bad files with exact positions, the cost
 * model against hand-computed numbers, and robustness against truncated and
 * mutated input (run this binary under -DPW_SANITIZE=address too). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"

#define FIXTURE(name) PW_SOURCE_DIR "/tests/fixtures/graphs/" name

static pw_graph *parse_ok(const char *text, const char *file)
{
    pw_graph *g = NULL;
    pw_status st = pw_graph_parse_string(text, strlen(text), file, &g);
    cr_assert_eq(st, PW_OK, "parse failed: %s", pw_last_error());
    cr_assert_not_null(g);
    return g;
}

static pw_graph *parse_file_ok(const char *path)
{
    pw_graph *g = NULL;
    pw_status st = pw_graph_parse_file(path, &g);
    cr_assert_eq(st, PW_OK, "parse of %s failed: %s", path, pw_last_error());
    return g;
}

static int find_value(const pw_graph *g, const char *name)
{
    for (int i = 0; i < g->n_values; i++)
        if (strcmp(g->values[i].name, name) == 0) return i;
    cr_assert_fail("no value named '%s'", name);
    return -1;
}

static void expect_shape(const pw_shape *s, int ndim, const int64_t *d, const char *what)
{
    char buf[128];
    pw_shape want = pw_shape_make(ndim, d);
    cr_expect(pw_shape_equal(s, &want), "%s: shape %s, expected ndim %d", what,
              pw_shape_str(s, buf, sizeof buf), ndim);
}

static const pw_param *param(const pw_graph *g, const char *name)
{
    int i = pw_graph_find_param(g, name);
    cr_assert_geq(i, 0, "no parameter '%s'", name);
    return &g->params[i];
}

/* ------------------------------------------------------------------ good files */

Test(graph_parse, feature_tour_ir)
{
    pw_graph *g = parse_file_ok(FIXTURE("features.graph"));
    cr_expect_str_eq(g->name, "feature_tour");
    cr_expect_eq(g->n_nodes, 16);
    cr_expect_eq(g->n_values, 18);
    cr_expect_eq(g->n_params, 14);
    cr_expect_eq(g->n_cuts, 4);

    /* values, in order, with shapes */
    static const char *const names[] = {
        "x", "y", "h0", "fc1", "a1", "h", "n", "g2", "s", "blocks.0/f", "blocks.0/r",
        "blocks.1/f", "blocks.1/r", "blocks.2/f", "blocks.2/r", "t", "logits", "loss"};
    for (int i = 0; i < 18; i++) cr_expect_str_eq(g->values[i].name, names[i], "value %d", i);
    cr_expect_eq(g->input, 0);
    cr_expect_eq(g->label, 1);
    cr_expect_eq(g->loss, 17);
    expect_shape(&g->values[0].shape, 3, (int64_t[]){1, 28, 28}, "x");
    cr_expect_eq(g->values[0].dtype, PW_F32);
    cr_expect_eq(g->values[1].shape.ndim, 0);
    cr_expect_eq(g->values[1].dtype, PW_I32);
    expect_shape(&g->values[find_value(g, "h0")].shape, 1, (int64_t[]){784}, "h0");
    expect_shape(&g->values[find_value(g, "fc1")].shape, 1, (int64_t[]){256}, "fc1");
    expect_shape(&g->values[find_value(g, "blocks.2/r")].shape, 1, (int64_t[]){128}, "r");
    expect_shape(&g->values[find_value(g, "logits")].shape, 1, (int64_t[]){10}, "logits");
    cr_expect_eq(g->values[g->loss].shape.ndim, 0);
    cr_expect_eq(g->values[find_value(g, "h")].n_consumers, 2); /* layernorm and add */
    cr_expect_eq(g->values[g->loss].n_consumers, 0);
    cr_expect_eq(g->values[0].producer, -1);
    cr_expect_eq(g->values[find_value(g, "fc1")].producer, 1);
    cr_expect_eq(g->values[find_value(g, "fc1")].line, 9);
    cr_expect_eq(g->values[find_value(g, "fc1")].col, 1);

    /* nodes: ops, wiring through the repeat, scopes, cuts */
    static const pw_op_kind ops[] = {
        PW_OP_FLATTEN, PW_OP_LINEAR, PW_OP_RELU, PW_OP_LINEAR, PW_OP_LAYERNORM, PW_OP_GELU,
        PW_OP_ADD, PW_OP_LINEAR, PW_OP_RELU, PW_OP_LINEAR, PW_OP_RELU, PW_OP_LINEAR,
        PW_OP_RELU, PW_OP_LINEAR, PW_OP_LINEAR, PW_OP_SOFTMAX_XENT};
    for (int i = 0; i < 16; i++) {
        cr_expect_eq(g->nodes[i].op, ops[i], "node %d", i);
        cr_expect_eq(g->nodes[i].output, i + 2, "node %d output", i);
        int cut = i == 3 || i == 9 || i == 11 || i == 13;
        cr_expect_eq(g->nodes[i].cut_before, cut, "node %d cut", i);
    }
    cr_expect_eq(g->nodes[1].line, 9);
    cr_expect_eq(g->nodes[1].col, 7);
    cr_expect_str_eq(g->nodes[3].scope, "fc2");
    cr_expect_str_eq(g->nodes[7].scope, "blocks.0.f");
    cr_expect_str_eq(g->nodes[12].scope, "blocks.2.r");
    cr_expect_eq(g->nodes[7].inputs[0], find_value(g, "s"));          /* carried in */
    cr_expect_eq(g->nodes[9].inputs[0], find_value(g, "blocks.0/r")); /* previous result */
    cr_expect_eq(g->nodes[13].inputs[0], find_value(g, "blocks.2/r")); /* `out` */
    cr_expect_eq(g->nodes[6].n_inputs, 2);
    cr_expect_eq(g->nodes[6].inputs[0], find_value(g, "g2"));
    cr_expect_eq(g->nodes[6].inputs[1], find_value(g, "h"));
    cr_expect_eq(g->nodes[1].attrs.out, 256);
    cr_expect_eq(g->nodes[1].attrs.bias, 1);
    cr_expect_float_eq(g->nodes[4].attrs.eps, 1e-5f, 1e-12);

    /* parameters: names, shapes, init, decay, ownership, ties */
    const pw_param *w = param(g, "fc1.weight");
    expect_shape(&w->shape, 2, (int64_t[]){256, 784}, "fc1.weight");
    cr_expect_eq(w->init, PW_INIT_UNIFORM);
    cr_expect_float_eq(w->init_scale, 1.0f / 28.0f, 1e-7);
    cr_expect_eq(w->decay, 1);
    cr_expect_eq(w->n_uses, 1);
    cr_expect_eq(w->owner, 1);
    const pw_param *b = param(g, "fc1.bias");
    expect_shape(&b->shape, 1, (int64_t[]){256}, "fc1.bias");
    cr_expect_eq(b->decay, 0);
    cr_expect_float_eq(b->init_scale, 1.0f / 28.0f, 1e-7);
    expect_shape(&param(g, "fc2.weight")->shape, 2, (int64_t[]){128, 256}, "fc2.weight");
    cr_expect_eq(pw_graph_find_param(g, "h.weight"), -1); /* `as fc2` replaced the prefix */
    cr_expect_eq(param(g, "n.weight")->init, PW_INIT_ONES);
    cr_expect_eq(param(g, "n.bias")->init, PW_INIT_ZEROS);
    cr_expect_eq(param(g, "n.weight")->decay, 0);
    for (int i = 0; i < 3; i++) {
        char nm[64];
        snprintf(nm, sizeof nm, "blocks.%d.f.weight", i);
        expect_shape(&param(g, nm)->shape, 2, (int64_t[]){128, 128}, nm);
        cr_expect_eq(param(g, nm)->n_uses, i == 0 ? 2 : 1, "%s", nm);
        snprintf(nm, sizeof nm, "blocks.%d.f.bias", i);
        cr_expect_geq(pw_graph_find_param(g, nm), 0, "%s", nm);
    }
    /* node 13 reuses blocks.0.f.weight and has no bias */
    cr_expect_eq(g->nodes[13].n_params, 1);
    cr_expect_eq(g->nodes[13].params[0], pw_graph_find_param(g, "blocks.0.f.weight"));
    cr_expect_eq(g->nodes[13].attrs.bias, 0);
    cr_expect_eq(pw_graph_find_param(g, "t.weight"), -1);
    /* params in op order: weight then bias */
    cr_expect_eq(g->nodes[1].params[0], pw_graph_find_param(g, "fc1.weight"));
    cr_expect_eq(g->nodes[1].params[1], pw_graph_find_param(g, "fc1.bias"));
    pw_graph_destroy(g);
}

Test(graph_parse, nested_repeat_names)
{
    pw_graph *g = parse_ok("input x : f32[8]\n"
                           "label y : i32[]\n"
                           "e = repeat 2 as enc (a = x) {\n"
                           "    l = repeat 3 as layers (b = a) {\n"
                           "        f = linear(b, out=8)\n"
                           "        cut\n"
                           "        return f\n"
                           "    }\n"
                           "    g = gelu(l)\n"
                           "    return g\n"
                           "}\n"
                           "z = linear(e, out=4)\n"
                           "loss = softmax_cross_entropy(z, y)\n",
                           "nested.graph");
    cr_expect_str_eq(g->name, "nested");
    cr_expect_eq(g->n_nodes, 2 * (3 + 1) + 2);
    cr_expect_eq(g->n_cuts, 6);
    cr_expect_geq(pw_graph_find_param(g, "enc.1.layers.0.f.weight"), 0);
    cr_expect_geq(pw_graph_find_param(g, "enc.0.layers.2.f.bias"), 0);
    cr_expect_eq(pw_graph_find_param(g, "layers.0.f.weight"), -1);
    int v = find_value(g, "enc.1.layers.2/f");
    int gv = find_value(g, "enc.1/g");
    cr_expect_eq(g->nodes[g->values[gv].producer].inputs[0], v);
    cr_expect_str_eq(g->nodes[g->values[v].producer].scope, "enc.1.layers.2.f");
    /* The outer carried value of iteration 1 is iteration 0's g. */
    int first_inner = g->values[find_value(g, "enc.1.layers.0/f")].producer;
    cr_expect_eq(g->nodes[first_inner].inputs[0], find_value(g, "enc.0/g"));
    pw_graph_destroy(g);
}

Test(graph_parse, attributes_and_shapes)
{
    pw_graph *g = parse_ok("graph shapes\n"
                           "input x : f32[2, 3, 4]\n"
                           "label y : i32[6]\n"
                           "r = reshape(x, shape=[6, -1])\n"
                           "n = layernorm(r, eps=1e-3) as norm\n"
                           "n2 = layernorm(n, eps=1)\n"
                           "l = linear(n2, out=5, bias=false)\n"
                           "f = flatten(l)\n"
                           "z = reshape(f, shape=[6, 5])\n"
                           "loss = softmax_cross_entropy(z, y)\n",
                           NULL);
    cr_expect_str_eq(g->name, "shapes");
    cr_expect_str_eq(g->file, "<string>");
    const pw_node *r = &g->nodes[0];
    expect_shape(&r->attrs.shape, 2, (int64_t[]){6, 4}, "reshape attrs (-1 resolved)");
    expect_shape(&g->values[r->output].shape, 2, (int64_t[]){6, 4}, "r");
    cr_expect_float_eq(g->nodes[1].attrs.eps, 1e-3f, 1e-12);
    cr_expect_float_eq(g->nodes[2].attrs.eps, 1.0f, 1e-12);
    expect_shape(&param(g, "norm.weight")->shape, 1, (int64_t[]){4}, "norm.weight");
    expect_shape(&g->values[find_value(g, "l")].shape, 2, (int64_t[]){6, 5}, "l");
    expect_shape(&param(g, "l.weight")->shape, 2, (int64_t[]){5, 4}, "l.weight");
    cr_expect_eq(pw_graph_find_param(g, "l.bias"), -1);
    cr_expect_float_eq(param(g, "l.weight")->init_scale, 0.5f, 1e-7);
    expect_shape(&g->values[find_value(g, "f")].shape, 1, (int64_t[]){30}, "f");
    pw_graph_destroy(g);
}

Test(graph_parse, lexical_details)
{
    /* BOM, CRLF, tabs, comments with UTF-8, blank lines, no final newline,
     * name defaults to the file's base name. */
    pw_graph *g = parse_ok("\xef\xbb\xbf# model — «UTF-8 is fine in comments» ✓\r\n"
                           "\r\n"
                           "input\tx : f32[3]   # trailing comment\r\n"
                           "label y : i32[]\n"
                           "attn.qkv = linear(x, out=3) as enc.layer_0.attn\n"
                           "loss = softmax_cross_entropy(attn.qkv, y)",
                           "dir/sub/my.model.graph");
    cr_expect_str_eq(g->name, "my.model");
    cr_expect_geq(pw_graph_find_param(g, "enc.layer_0.attn.weight"), 0);
    cr_expect_eq(find_value(g, "attn.qkv"), 2);
    pw_graph_destroy(g);
}

Test(graph_parse, examples_and_fixtures)
{
    pw_graph *g = parse_file_ok(PW_SOURCE_DIR "/examples/fashion_mlp.graph");
    cr_expect_str_eq(g->name, "fashion_mlp");
    cr_expect_eq(g->loss, g->n_values - 1);
    pw_graph_destroy(g);

    g = parse_file_ok(FIXTURE("gpt2_small.graph"));
    int64_t n = 0;
    for (int i = 0; i < g->n_params; i++) n += pw_shape_numel(&g->params[i].shape);
    cr_expect_eq(n, 176406528); /* see the comment in the fixture for the breakdown */
    cr_expect_eq(g->n_nodes, 1 + 12 * 9 + 3);
    cr_expect_geq(pw_graph_find_param(g, "h.11.mlp.c_proj.weight"), 0);
    cr_expect_geq(pw_graph_find_param(g, "h.0.attn.c_attn.bias"), 0);
    expect_shape(&param(g, "wte.weight")->shape, 2, (int64_t[]){768, 50257}, "wte");
    expect_shape(&g->values[find_value(g, "logits")].shape, 2, (int64_t[]){1024, 50257},
                 "logits");
    pw_graph_destroy(g);

    g = parse_file_ok(FIXTURE("gpt_shared.graph"));
    cr_expect_eq(param(g, "block0.attn.c_attn.weight")->n_uses, 6);
    cr_expect_eq(param(g, "block0.mlp.c_proj.weight")->n_uses, 6);
    cr_expect_eq(pw_graph_find_param(g, "blocks.0.attn.c_attn.weight"), -1);
    cr_expect_geq(pw_graph_find_param(g, "blocks.4.attn.c_attn.bias"), 0);
    cr_expect_eq(g->n_cuts, 2);
    pw_graph_destroy(g);
}

Test(graph_parse, large_repeat)
{
    pw_graph *g = parse_ok("input x : f32[4]\nlabel y : i32[]\n"
                           "o = repeat 20000 as b (v = x) {\n  r = relu(v)\n  return r\n}\n"
                           "l = linear(o, out=2)\nloss = softmax_cross_entropy(l, y)\n",
                           "big.graph");
    cr_expect_eq(g->n_nodes, 20002);
    cr_expect_str_eq(g->values[g->nodes[19999].output].name, "b.19999/r");
    pw_graph_destroy(g);
}

Test(graph_parse, api_edges)
{
    pw_graph *g = (pw_graph *)0x1;
    pw_graph_destroy(NULL);
    cr_expect_eq(pw_graph_parse_string("x", 1, "a", NULL), PW_ERR_INVALID_ARG);
    cr_expect_eq(pw_graph_parse_string(NULL, 3, "a", &g), PW_ERR_INVALID_ARG);
    cr_expect_null(g);
    cr_expect_eq(pw_graph_parse_file(NULL, &g), PW_ERR_INVALID_ARG);
    cr_expect_str_eq(pw_op_name(PW_OP_LINEAR), "linear");
    cr_expect_str_eq(pw_op_name(PW_OP_SOFTMAX_XENT), "softmax_cross_entropy");
    cr_expect_str_eq(pw_op_name(PW_OP_COUNT), "?");
    cr_expect_eq(pw_graph_find_param(NULL, "a"), -1);
}

Test(graph_parse, file_not_found)
{
    pw_graph *g = (pw_graph *)0x1;
    const char *path = PW_SOURCE_DIR "/tests/fixtures/graphs/does-not-exist.graph";
    cr_expect_eq(pw_graph_parse_file(path, &g), PW_ERR_IO);
    cr_expect_null(g);
    char want[1024];
    snprintf(want, sizeof want, "%s: No such file or directory", path);
    cr_expect_str_eq(pw_last_error(), want);
    cr_expect_eq(pw_graph_parse_file(PW_SOURCE_DIR "/tests", &g), PW_ERR_IO);
    cr_expect(strstr(pw_last_error(), "Is a directory") != NULL, "%s", pw_last_error());
}

Test(graph_parse, print_summary)
{
    pw_graph *g = parse_file_ok(FIXTURE("features.graph"));
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    pw_graph_print(g, f);
    fclose(f);
    cr_expect(strstr(buf, "graph feature_tour") != NULL, "%s", buf);
    cr_expect(strstr(buf, "linear") && strstr(buf, "fc1") && strstr(buf, "[784] -> [256]"),
              "%s", buf);
    cr_expect(strstr(buf, "200960") != NULL, "%s", buf);
    cr_expect(strstr(buf, "---- cut ----") != NULL, "%s", buf);
    cr_expect(strstr(buf, "blocks.2/r") != NULL, "%s", buf);
    cr_expect(strstr(buf, "total") != NULL, "%s", buf);
    free(buf);
    pw_graph_destroy(g);
}

/* ------------------------------------------------------------------ bad files */

#define HDR "input x : f32[4]\nlabel y : i32[]\n" /* lines 1-2 */
#define TAIL "l = linear(x, out=3)\nloss = softmax_cross_entropy(l, y)\n"

typedef struct bad_case {
    const char *name;
    const char *text;
    size_t len;          /* 0: strlen(text) */
    pw_status st;
    int line, col;
    const char *msg;     /* substring of the message after "error: " */
} bad_case;

static const bad_case bad_cases[] = {
    /* names and ops */
    {"unknown op", HDR "h = linaer(x, out=3)\n", 0, PW_ERR_PARSE, 3, 5,
     "unknown op 'linaer'; did you mean 'linear'?"},
    {"unknown op far", HDR "h = conv2d(x)\n", 0, PW_ERR_PARSE, 3, 5, "unknown op 'conv2d'"},
    {"undefined", HDR "h = relu(zz)\n", 0, PW_ERR_PARSE, 3, 10, "undefined value 'zz'"},
    {"undefined typo", HDR "hidden = relu(x)\nq = relu(hiden)\n", 0, PW_ERR_PARSE, 4, 10,
     "undefined value 'hiden'; did you mean 'hidden'?"},
    {"cycle", HDR "a = relu(b)\nb = relu(a)\n" TAIL, 0, PW_ERR_PARSE, 3, 10,
     "undefined value 'b' (values must be defined before use; cycles are not allowed; 'b' is "
     "defined at 4:1)"},
    {"self reference", HDR "a = add(x, a)\n", 0, PW_ERR_PARSE, 3, 12,
     "cycles are not allowed"},
    {"redefinition", HDR "h = relu(x)\nh = relu(h)\n", 0, PW_ERR_PARSE, 4, 1,
     "value 'h' already defined at 3:1"},
    {"redefine input", HDR "x = relu(x)\n", 0, PW_ERR_PARSE, 3, 1,
     "value 'x' already defined at 1:7"},
    {"alias", HDR "z = x\n", 0, PW_ERR_PARSE, 3, 6, "expected '(' after op name 'x'"},
    {"arity", HDR "s = add(x)\n", 0, PW_ERR_PARSE, 3, 10, "add takes 2 arguments, got 1"},
    {"arity many", HDR "s = relu(x, x)\n", 0, PW_ERR_PARSE, 3, 13, "relu takes 1 argument, got 2"},
    {"positional after attr", HDR "h = linear(out=3, x)\n", 0, PW_ERR_PARSE, 3, 19,
     "positional argument after attributes"},
    /* attributes */
    {"unknown attr", HDR "h = linear(x, out=3, outt=4)\n", 0, PW_ERR_PARSE, 3, 22,
     "linear has no attribute 'outt'; did you mean 'out'?"},
    {"attr on relu", HDR "h = relu(x, alpha=2)\n", 0, PW_ERR_PARSE, 3, 13,
     "relu has no attribute 'alpha' (it takes none)"},
    {"attr kind", HDR "h = linear(x, out=3.5)\n", 0, PW_ERR_PARSE, 3, 19,
     "linear: attribute 'out' must be an integer, got a number"},
    {"attr bool", HDR "h = linear(x, out=3, bias=1)\n", 0, PW_ERR_PARSE, 3, 27,
     "attribute 'bias' must be true or false, got an integer"},
    {"attr missing", HDR "h = linear(x)\n", 0, PW_ERR_PARSE, 3, 5,
     "linear: missing required attribute 'out'"},
    {"attr duplicate", HDR "h = linear(x, out=3, out=4)\n", 0, PW_ERR_PARSE, 3, 22,
     "duplicate attribute 'out' (first given at 3:15)"},
    {"out zero", HDR "h = linear(x, out=0)\n", 0, PW_ERR_SHAPE, 3, 19,
     "linear: 'out' must be between 1 and 2^40, got 0"},
    {"eps negative", HDR "n = layernorm(x, eps=-1)\n", 0, PW_ERR_PARSE, 3, 22,
     "layernorm: 'eps' must be a positive f32 number, got -1"},
    {"eps underflow", HDR "n = layernorm(x, eps=1e-60)\n", 0, PW_ERR_PARSE, 3, 22,
     "'eps' must be a positive f32 number"},
    {"reshape numel", HDR "h = reshape(x, shape=[3])\n", 0, PW_ERR_SHAPE, 3, 22,
     "reshape: cannot reshape [4] (4 elements) into [3]"},
    {"reshape two -1", HDR "h = reshape(x, shape=[-1, -1])\n", 0, PW_ERR_SHAPE, 3, 22,
     "at most one dimension may be -1"},
    {"reshape ndim", HDR "h = reshape(x, shape=[1, 1, 1, 1, 1, 1, 4])\n", 0, PW_ERR_SHAPE, 3,
     22, "reshape: too many dimensions (7; the limit is 6)"},
    {"list too long", HDR "h = reshape(x, shape=[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,4])\n", 0,
     PW_ERR_PARSE, 3, 55, "list too long"},
    /* shapes and dtypes */
    {"add shapes", "input x : f32[128]\nlabel y : i32[]\na = linear(x, out=64)\ns = add(x, a)\n",
     0, PW_ERR_SHAPE, 4, 5, "add: shapes [128] and [64] differ"},
    {"dtype", "input x : i32[4]\nlabel y : i32[]\nh = relu(x)\n", 0, PW_ERR_SHAPE, 3, 10,
     "relu: expects f32 input, got i32"},
    {"linear scalar", "input x : f32[]\nlabel y : i32[]\nh = linear(x, out=2)\n", 0,
     PW_ERR_SHAPE, 3, 12, "linear: input must have at least 1 dimension, got []"},
    {"unknown dtype", "input x : f16[4]\n", 0, PW_ERR_PARSE, 1, 11,
     "unknown dtype 'f16' (expected f32 or i32)"},
    {"label dtype", "input x : f32[4]\nlabel y : f32[]\n", 0, PW_ERR_SHAPE, 2, 11,
     "label must have dtype i32, got f32"},
    {"dim zero", "input x : f32[4, 0]\n", 0, PW_ERR_SHAPE, 1, 18,
     "dimension must be positive, got 0"},
    {"dim negative", "input x : f32[-4]\n", 0, PW_ERR_SHAPE, 1, 15, "dimension must be positive"},
    {"numel overflow", "input x : f32[1048576, 1048576, 2]\n", 0, PW_ERR_SHAPE, 1, 14,
     "shape has more than 2^40 elements"},
    {"too many dims", "input x : f32[1,1,1,1,1,1,1]\n", 0, PW_ERR_SHAPE, 1, 27,
     "too many dimensions (the limit is 6)"},
    {"int overflow", "input x : f32[99999999999999999999]\n", 0, PW_ERR_PARSE, 1, 15,
     "integer literal '99999999999999999999' is too large"},
    {"malformed number", "input x : f32[4a]\n", 0, PW_ERR_PARSE, 1, 15, "malformed number '4a'"},
    {"weight too big", "input x : f32[1048576]\nlabel y : i32[]\nh = linear(x, out=1048577)\n",
     0, PW_ERR_SHAPE, 3, 19, "linear: weight [1048577, 1048576] would have more than 2^40"},
    {"missing bracket", "input x : f32\n", 0, PW_ERR_PARSE, 1, 14,
     "expected '[' after the dtype (write f32[] for a scalar), got end of line"},
    /* declarations, loss, label */
    {"no input", "label y : i32[]\n", 0, PW_ERR_PARSE, 1, 1, "graph has no 'input' declaration"},
    {"empty file", "", 0, PW_ERR_PARSE, 1, 1, "graph has no 'input' declaration"},
    {"two inputs", "input x : f32[4]\ninput z : f32[4]\n", 0, PW_ERR_PARSE, 2, 1,
     "more than one 'input' declaration (the first is 'x' at 1:1"},
    {"two labels", HDR "label z : i32[]\n", 0, PW_ERR_PARSE, 3, 1,
     "more than one 'label' declaration"},
    {"no loss", HDR "h = relu(x)\n", 0, PW_ERR_PARSE, 1, 1, "graph has no loss"},
    {"two losses",
     HDR "l = linear(x, out=3)\na = softmax_cross_entropy(l, y)\nb = softmax_cross_entropy(l, y)\n",
     0, PW_ERR_PARSE, 5, 5, "more than one loss (the first is at 4:5"},
    {"labels not the label", HDR "l = linear(x, out=3)\nloss = softmax_cross_entropy(l, x)\n", 0,
     PW_ERR_PARSE, 4, 33, "softmax_cross_entropy: labels must be the label 'y', got 'x'"},
    {"loss without label", "input x : f32[4]\nl = linear(x, out=3)\nloss = softmax_cross_entropy(l, l)\n",
     0, PW_ERR_PARSE, 3, 33, "needs a 'label' declaration"},
    {"label elsewhere", HDR "h = flatten(y)\n", 0, PW_ERR_PARSE, 3, 13,
     "label 'y' can only be used as the labels argument of softmax_cross_entropy"},
    {"labels shape", "input x : f32[4]\nlabel y : i32[2]\n" TAIL, 0, PW_ERR_SHAPE, 4, 33,
     "labels shape [2] does not match logits [3] (expected [])"},
    {"loss as input", HDR TAIL "z = relu(loss)\n", 0, PW_ERR_PARSE, 5, 10,
     "the loss 'loss' cannot be used as an input"},
    {"unused value", HDR "u = relu(x)\n" TAIL, 0, PW_ERR_PARSE, 3, 1,
     "value 'u' is never used (every value must contribute to the loss)"},
    {"unused input", "input x : f32[4]\nlabel y : i32[]\ninput2 = linear(x, out=3)\n"
     "loss = softmax_cross_entropy(input2, y)\n", 0, PW_OK, 0, 0, NULL},
    /* parameters */
    {"param clash", HDR "a = linear(x, out=4) as p\nb = linear(a, out=4) as p\n", 0,
     PW_ERR_PARSE, 4, 25, "parameter 'p.weight' already exists (created at 3:5)"},
    {"tie shape", HDR "a = linear(x, out=8)\nb = linear(a, out=8, weight=a.weight)\n", 0,
     PW_ERR_SHAPE, 4, 29,
     "linear: cannot reuse 'a.weight': it has shape [8, 4] but this linear needs [8, 8]"},
    {"tie missing", HDR "a = linear(x, out=8, weight=nope.weight)\n", 0, PW_ERR_PARSE, 3, 29,
     "no parameter named 'nope.weight' to reuse"},
    {"tie later", HDR "a = linear(x, out=4, weight=b.weight)\nb = linear(a, out=4)\n", 0,
     PW_ERR_PARSE, 3, 29, "must be created by an earlier node"},
    /* statements and structure */
    {"graph not first", HDR "graph foo\n", 0, PW_ERR_PARSE, 3, 1,
     "'graph' must be the first statement"},
    {"return at top", HDR "return x\n", 0, PW_ERR_PARSE, 3, 1, "'return' outside a repeat body"},
    {"keyword name", "input as : f32[1]\n", 0, PW_ERR_PARSE, 1, 7,
     "'as' is a keyword and cannot be used as the input's name"},
    {"stray keyword", HDR "as = relu(x)\n", 0, PW_ERR_PARSE, 3, 1, "expected a statement, got 'as'"},
    {"junk after stmt", HDR "h = relu(x) relu\n", 0, PW_ERR_PARSE, 3, 13,
     "expected end of line after the statement, got 'relu'"},
    {"unclosed paren", HDR "h = relu(x\n", 0, PW_ERR_PARSE, 3, 11,
     "expected ',' or ')', got end of line"},
    {"stray brace", HDR "}\n", 0, PW_ERR_PARSE, 3, 1, "'}' without a matching repeat '{'"},
    {"cut first", HDR "cut\n" TAIL, 0, PW_ERR_PARSE, 3, 1,
     "'cut' before the first node would leave the first stage empty"},
    {"cut last", HDR TAIL "cut\n", 0, PW_ERR_PARSE, 5, 1, "'cut' must be followed by a node"},
    {"two cuts", HDR "h = relu(x)\ncut\n  cut\n", 0, PW_ERR_PARSE, 5, 3,
     "two 'cut' markers with no node between them (the first is at 4:1)"},
    /* repeat */
    {"unterminated brace", HDR "o = repeat 2 (b = x) {\n  h = relu(b)\n", 0, PW_ERR_PARSE, 3, 22,
     "unterminated '{': the repeat body has no closing '}'"},
    {"no return", HDR "o = repeat 2 (b = x) {\n  h = relu(b)\n}\n", 0, PW_ERR_PARSE, 5, 1,
     "repeat body must end with 'return VALUE'"},
    {"stmt after return", HDR "o = repeat 2 (b = x) {\n  return b\n  h = relu(b)\n}\n", 0,
     PW_ERR_PARSE, 5, 3, "statement after 'return'"},
    {"count zero", HDR "o = repeat 0 (b = x) {\n  return b\n}\n", 0, PW_ERR_PARSE, 3, 12,
     "repeat count must be between 1 and 100000, got 0"},
    {"count big", HDR "o = repeat 100001 (b = x) {\n  return b\n}\n", 0, PW_ERR_PARSE, 3, 12,
     "repeat count must be between 1 and 100000, got 100001"},
    {"count negative", HDR "o = repeat -2 (b = x) {\n  return b\n}\n", 0, PW_ERR_PARSE, 3, 12,
     "got -2"},
    {"brace on next line", HDR "o = repeat 2 (b = x)\n{\n", 0, PW_ERR_PARSE, 3, 21,
     "expected '{', got end of line"},
    {"input in body", HDR "o = repeat 2 (b = x) {\n  input z : f32[1]\n  return b\n}\n", 0,
     PW_ERR_PARSE, 4, 3, "'input' is not allowed inside a repeat body"},
    {"carry shadows", HDR "o = repeat 2 (x = x) {\n  return x\n}\n", 0, PW_ERR_PARSE, 3, 15,
     "value 'x' already defined at 1:7"},
    {"body shadows", HDR "o = repeat 2 (b = x) {\n  x = relu(b)\n  return x\n}\n", 0,
     PW_ERR_PARSE, 4, 3, "value 'x' already defined at 1:7"},
    {"body local not visible", HDR "o = repeat 2 (b = x) {\n  r = relu(b)\n  return r\n}\n"
     "z = relu(r)\n", 0, PW_ERR_PARSE, 7, 10, "undefined value 'r'"},
    {"iteration error", HDR "o = repeat 2 (b = x) {\n  s = add(b, x)\n  f = linear(s, out=8)\n"
     "  return f\n}\n", 0, PW_ERR_SHAPE, 4, 7,
     "add: shapes [8] and [4] differ (in repeat iteration o.1)"},
    {"repeat path reuse", HDR "o = repeat 2 as blk (b = x) {\n  r = relu(b)\n  return r\n}\n"
     "p = repeat 2 as blk (c = o) {\n  r = relu(c)\n  return r\n}\n", 0, PW_ERR_PARSE, 7, 17,
     "repeat path 'blk' is already used by the repeat at 3:17"},
    {"param clash in body", HDR "o = repeat 2 (b = x) {\n  f = linear(b, out=4) as p\n"
     "  g = linear(f, out=4) as p\n  return g\n}\n", 0, PW_ERR_PARSE, 5, 27,
     "parameter 'o.0.p.weight' already exists (created at 4:7); use 'as PATH'"},
    /* transformer ops */
    {"embedding of floats", HDR "e = embedding(x, vocab=4, dim=2)\n", 0, PW_ERR_SHAPE, 3, 15,
     "embedding: tokens must be i32, got f32"},
    {"embedding vocab zero", "input t : i32[4]\nlabel y : i32[4]\ne = embedding(t, vocab=0, dim=2)\n",
     0, PW_ERR_SHAPE, 3, 24, "embedding: 'vocab' must be between 1 and 2^31 - 1, got 0"},
    {"embedding no dim", "input t : i32[4]\nlabel y : i32[4]\ne = embedding(t, vocab=3)\n", 0,
     PW_ERR_PARSE, 3, 5, "embedding: missing required attribute 'dim'"},
    {"embedding tie shape", "input t : i32[4]\nlabel y : i32[4]\ne = embedding(t, vocab=5, dim=2)\n"
     "f = embedding(t, vocab=2, dim=5, weight=e.weight)\n", 0, PW_ERR_SHAPE, 4, 41,
     "embedding: cannot reuse 'e.weight': it has shape [5, 2] but this embedding needs [2, 5]"},
    {"head tie shape", "input t : i32[4]\nlabel y : i32[4]\ne = embedding(t, vocab=5, dim=2)\n"
     "l = linear(e, out=2, bias=false, weight=e.weight)\n", 0, PW_ERR_SHAPE, 4, 41,
     "linear: cannot reuse 'e.weight': it has shape [5, 2] but this linear needs [2, 2]"},
    {"pos_embedding rank", HDR "p = pos_embedding(x)\n", 0, PW_ERR_SHAPE, 3, 19,
     "pos_embedding: input must be [T, D] (positions, width), got [4]"},
    {"pos_embedding max", "input x : f32[4, 2]\nlabel y : i32[4]\np = pos_embedding(x, max=3)\n",
     0, PW_ERR_SHAPE, 3, 26, "pos_embedding: 4 positions do not fit a table of max=3"},
    {"attention width", "input x : f32[4, 8]\nlabel y : i32[4]\na = causal_attention(x, heads=1)\n",
     0, PW_ERR_SHAPE, 3, 22, "causal_attention: last dimension 8 is not 3·D"},
    {"attention heads", "input x : f32[4, 6]\nlabel y : i32[4]\na = causal_attention(x, heads=4)\n",
     0, PW_ERR_SHAPE, 3, 31, "causal_attention: width D = 2 is not a multiple of heads = 4"},
    {"attention rank", HDR "a = causal_attention(x, heads=1)\n", 0, PW_ERR_SHAPE, 3, 22,
     "causal_attention: input must be [T, 3·D]"},
    {"attention no heads", "input x : f32[4, 6]\nlabel y : i32[4]\na = causal_attention(x)\n",
     0, PW_ERR_PARSE, 3, 5, "causal_attention: missing required attribute 'heads'"},
    {"dropout p one", HDR "d = dropout(x, p=1)\n", 0, PW_ERR_PARSE, 3, 18,
     "dropout: 'p' must be in [0, 1), got 1"},
    {"dropout p negative", HDR "d = dropout(x, p=-0.5)\n", 0, PW_ERR_PARSE, 3, 18,
     "dropout: 'p' must be in [0, 1), got -0.5"},
    /* issue 13: infinite, overflowing and absurd values */
    {"dropout p inf", HDR "d = dropout(x, p=1e999)\n", 0, PW_ERR_PARSE, 3, 18,
     "dropout: 'p' must be in [0, 1), got inf"},
    {"eps inf", HDR "n = layernorm(x, eps=1e999)\n", 0, PW_ERR_PARSE, 3, 22,
     "layernorm: 'eps' must be a positive f32 number, got inf"},
    {"eps underflows f32", HDR "n = layernorm(x, eps=1e-50)\n", 0, PW_ERR_PARSE, 3, 22,
     "layernorm: 'eps' must be a positive f32 number"},
    {"int over int64", HDR "h = linear(x, out=99999999999999999999)\n", 0, PW_ERR_PARSE, 3, 19,
     "integer literal '99999999999999999999' is too large"},
    {"negative int64 max", HDR "h = linear(x, out=-9223372036854775807)\n", 0, PW_ERR_SHAPE, 3, 19,
     "linear: 'out' must be between 1 and 2^40"},
    {"reshape product overflows", HDR "r = reshape(x, shape=[4611686018427387904, 4, -1])\n", 0,
     PW_ERR_SHAPE, 3, 22, "reshape: dimension 0 must be positive (or -1)"},
    {"reshape product over 2^40", HDR "r = reshape(x, shape=[1048576, 1048576, 1048576])\n", 0,
     PW_ERR_SHAPE, 3, 22, "reshape: cannot reshape [4] (4 elements) into"},
    {"dims product overflows int64", "input x : f32[1099511627776, 1099511627776, 1099511627776]\n",
     0, PW_ERR_SHAPE, 1, 14, "shape has more than 2^40 elements"},
    {"heads over 2^40", "input x : f32[4, 24]\nlabel y : i32[4]\n"
     "a = causal_attention(x, heads=2199023255552)\n", 0, PW_ERR_SHAPE, 3, 31,
     "causal_attention: 'heads' must be between 1 and 2^40"},
    {"attention T x T x heads over 2^40", "input x : f32[2097152, 3]\nlabel y : i32[2097152]\n"
     "a = causal_attention(x, heads=1)\n", 0, PW_ERR_SHAPE, 3, 22,
     "heads × T × T attention weights would have more than 2^40 elements"},
    {"repeat count absurd", HDR "o = repeat 99999999999999999 (b = x) {\n  return b\n}\n", 0,
     PW_ERR_PARSE, 3, 12, "repeat count must be between 1 and 100000"},
    {"unknown op lists ops", HDR "h = conv2d(x)\n", 0, PW_ERR_PARSE, 3, 5,
     "causal_attention, dropout)"},
    /* bytes */
    {"NUL", "input x : f32[4]\0\n", 18, PW_ERR_PARSE, 1, 17, "unexpected character NUL"},
    {"bad UTF-8 in comment", "input x : f32[4] # \xff\n", 0, PW_ERR_PARSE, 1, 20,
     "unexpected character (byte 0xff is not valid UTF-8)"},
    {"truncated UTF-8", "input x : f32[4] # \xe2\x9c\n", 0, PW_ERR_PARSE, 1, 20,
     "not valid UTF-8"},
    {"non-ASCII name", "input \xc3\xa9 : f32[4]\n", 0, PW_ERR_PARSE, 1, 7,
     "unexpected character U+00E9 (only ASCII is allowed outside comments)"},
    {"control", "input x\x07 : f32[4]\n", 0, PW_ERR_PARSE, 1, 8,
     "unexpected character 0x07 (control character)"},
    {"control in comment", "# a\x1b[0m\n", 0, PW_ERR_PARSE, 1, 4, "unexpected character 0x1b"},
    {"punct", HDR "h = relu(x) @\n", 0, PW_ERR_PARSE, 3, 13, "unexpected character '@'"},
    {"tabs count one", HDR "\t\th = relu(zz)\n", 0, PW_ERR_PARSE, 3, 12, "undefined value 'zz'"},
};

Test(graph_errors, table)
{
    for (size_t i = 0; i < sizeof bad_cases / sizeof bad_cases[0]; i++) {
        const bad_case *c = &bad_cases[i];
        pw_graph *g = (pw_graph *)0x1;
        size_t len = c->len ? c->len : strlen(c->text);
        pw_status st = pw_graph_parse_string(c->text, len, "bad.graph", &g);
        cr_expect_eq(st, c->st, "[%s] status %s, expected %s (%s)", c->name, pw_status_str(st),
                     pw_status_str(c->st), pw_last_error());
        if (c->st == PW_OK) {
            pw_graph_destroy(g);
            continue;
        }
        cr_expect_null(g, "[%s] *out must be NULL on error", c->name);
        char prefix[64];
        snprintf(prefix, sizeof prefix, "bad.graph:%d:%d: error: ", c->line, c->col);
        const char *msg = pw_last_error();
        cr_expect(strncmp(msg, prefix, strlen(prefix)) == 0, "[%s] got '%s', expected prefix '%s'",
                  c->name, msg, prefix);
        cr_expect(strstr(msg, c->msg) != NULL, "[%s] got '%s', expected to contain '%s'",
                  c->name, msg, c->msg);
    }
}

static void expect_error(const char *text, size_t len, pw_status want, const char *prefix,
                         const char *sub)
{
    pw_graph *g = NULL;
    pw_status st = pw_graph_parse_string(text, len, "gen.graph", &g);
    cr_expect_eq(st, want, "status %s (%s)", pw_status_str(st), pw_last_error());
    cr_expect_null(g);
    cr_expect(strncmp(pw_last_error(), prefix, strlen(prefix)) == 0, "got '%s', expected '%s'",
              pw_last_error(), prefix);
    cr_expect(strstr(pw_last_error(), sub) != NULL, "got '%s', expected '%s'", pw_last_error(),
              sub);
}

Test(graph_errors, long_names)
{
    char text[1024];
    char name[300];
    memset(name, 'a', 256);
    name[256] = '\0';
    snprintf(text, sizeof text, HDR "%s = relu(x)\n", name);
    expect_error(text, strlen(text), PW_ERR_PARSE, "gen.graph:3:1: error: ",
                 "name too long (256 characters; the limit is 255)");
    /* 255 is fine */
    name[255] = '\0';
    snprintf(text, sizeof text, HDR "%s = linear(x, out=2)\nloss = softmax_cross_entropy(%s, y)\n",
             name, name);
    pw_graph *g = parse_ok(text, "ok.graph");
    pw_graph_destroy(g);
    /* a very long line of spaces then garbage */
    size_t n = 200000;
    char *big = malloc(n + 8);
    memset(big, ' ', n);
    memcpy(big + n, "@\n", 2);
    expect_error(big, n + 2, PW_ERR_PARSE, "gen.graph:1:200001: error: ", "unexpected character '@'");
    free(big);
}

Test(graph_errors, nesting_depth)
{
    /* 16 nested repeats parse; a 17th is refused at its `repeat` keyword. */
    for (int depth = 16; depth <= 17; depth++) {
        char text[8192];
        size_t off = (size_t)snprintf(text, sizeof text, HDR);
        for (int i = 0; i < depth; i++) {
            char prev[16];
            snprintf(prev, sizeof prev, i ? "c%d" : "x", i - 1);
            off += (size_t)snprintf(text + off, sizeof text - off,
                                    "v%d = repeat 1 (c%d = %s) {\n", i, i, prev);
        }
        off += (size_t)snprintf(text + off, sizeof text - off, "r = relu(c%d)\nreturn r\n",
                                depth - 1);
        for (int i = depth - 1; i >= 0; i--) {
            off += (size_t)snprintf(text + off, sizeof text - off, "}\n");
            if (i > 0) off += (size_t)snprintf(text + off, sizeof text - off, "return v%d\n", i);
        }
        snprintf(text + off, sizeof text - off,
                 "l = linear(v0, out=3)\nloss = softmax_cross_entropy(l, y)\n");
        if (depth == 16) {
            pw_graph *g = parse_ok(text, "deep.graph");
            cr_expect_eq(g->n_nodes, 3);
            cr_expect_str_eq(g->values[g->nodes[0].output].name,
                             "v0.0.v1.0.v2.0.v3.0.v4.0.v5.0.v6.0.v7.0.v8.0.v9.0.v10.0.v11.0."
                             "v12.0.v13.0.v14.0.v15.0/r");
            cr_expect_geq(pw_graph_find_param(g, "v0.0.v1.0.v2.0.v3.0.v4.0.v5.0.v6.0.v7.0.v8.0."
                                                 "v9.0.v10.0.v11.0.v12.0.v13.0.v14.0.v15.0.r."
                                                 "weight"), -1);
            pw_graph_destroy(g);
        } else {
            expect_error(text, strlen(text), PW_ERR_PARSE, "gen.graph:19:7: error: ",
                         "repeats nested too deeply (the limit is 16)");
        }
    }
}

Test(graph_errors, node_limit, .timeout = 300)
{
    const char *text = HDR "o = repeat 100000 (a = x) {\n"
                           "  p = repeat 100000 (b = a) {\n    r = relu(b)\n    return r\n  }\n"
                           "  return p\n}\n" TAIL;
    expect_error(text, strlen(text), PW_ERR_PARSE, "gen.graph:5:9: error: ",
                 "graph too large: more than 1048576 nodes after repeat expansion");
}

/* issue 13: nested repeats whose bodies make no node still expand (here
 * 10^10 iterations); the expansion is bounded like the node count. */
Test(graph_errors, empty_repeat_expansion_is_bounded, .timeout = 300)
{
    const char *text = HDR "o = repeat 100000 (a = x) {\n"
                           "  p = repeat 100000 (b = a) {\n    return b\n  }\n"
                           "  return p\n}\n" TAIL;
    expect_error(text, strlen(text), PW_ERR_PARSE, "gen.graph:4:3: error: ",
                 "graph too large: more than 1048576 repeat iterations that make no node");
}

/* issue 13: 16 nested repeats of 255-character paths make names of ~4 KiB
 * per value; 2^20 nodes of them would take gigabytes. The names' total is
 * bounded before they are allocated. */
Test(graph_errors, name_bytes_are_bounded, .timeout = 300)
{
    char name[256];
    memset(name, 'n', 255);
    name[255] = '\0';
    size_t cap = 64 << 10, off = 0;
    char *text = malloc(cap);
    cr_assert_not_null(text);
    off += (size_t)snprintf(text + off, cap - off, "%s", HDR);
    for (int d = 0; d < 16; d++) { /* lines 3-18 */
        char init[16] = "x";
        if (d) snprintf(init, sizeof init, "c%d", d - 1);
        off += (size_t)snprintf(text + off, cap - off, "v%d = repeat %d as %s (c%d = %s) {\n", d,
                                d == 15 ? 100000 : 1, name, d, init);
    }
    off += (size_t)snprintf(text + off, cap - off, "r = relu(c15)\nreturn r\n}\n");
    for (int d = 14; d >= 0; d--)
        off += (size_t)snprintf(text + off, cap - off, "return v%d\n}\n", d + 1);
    snprintf(text + off, cap - off, "%s", TAIL);
    expect_error(text, strlen(text), PW_ERR_PARSE, "gen.graph:19:5: error: ",
                 "graph too large: its names would take more than 256 MiB");
    free(text);
}

/* issue 13: the attention cost is closed-form (O(1) per node), equal to
 * summing the kernel's row blocks one by one. */
Test(graph_cost, attention_blocks_closed_form)
{
    static const int Ts[] = {1, 31, 32, 33, 64, 100, 1000, 4097};
    for (size_t k = 0; k < sizeof Ts / sizeof Ts[0]; k++) {
        int T = Ts[k];
        char text[256];
        snprintf(text, sizeof text,
                 "input x : f32[%d, 24]\nlabel y : i32[%d]\na = causal_attention(x, heads=2)\n"
                 "l = linear(a, out=3)\nloss = softmax_cross_entropy(l, y)\n", T, T);
        pw_graph *g = parse_ok(text, "att.graph");
        pw_op_cost c;
        cr_assert_eq(pw_graph_node_cost(g, 0, &c), PW_OK);
        double cells = 0;
        for (int r0 = 0; r0 < T; r0 += PW_ATTENTION_BLOCK) {
            int rn = T - r0 < PW_ATTENTION_BLOCK ? T - r0 : PW_ATTENTION_BLOCK;
            cells += (double)rn * (double)(r0 + rn);
        }
        double D = 8, H = 2, tri = (double)T * (T + 1) / 2;
        cr_expect_eq(c.flops_fwd, 2 * (2 * cells * D) + 5 * H * tri, "T=%d", T);
        cr_expect_eq(c.flops_bwd_input, 4 * (2 * cells * D) + 5 * H * tri, "T=%d", T);
        pw_graph_destroy(g);
    }
}

/* ------------------------------------------------------------------ costs */

Test(graph_cost, hand_computed)
{
    pw_graph *g = parse_file_ok(FIXTURE("features.graph"));
    pw_op_cost c;

    /* flatten: a view, no FLOPs, nothing stashed; its output is 784 floats */
    cr_assert_eq(pw_graph_node_cost(g, 0, &c), PW_OK);
    cr_expect_eq(c.flops_fwd, 0);
    cr_expect_eq(c.act_bytes, 0);
    cr_expect_eq(c.out_bytes, 784 * 4);

    /* fc1: 784 -> 256 with bias, one row */
    pw_graph_node_cost(g, 1, &c);
    cr_expect_eq(c.flops_fwd, 2.0 * 784 * 256 + 256);
    cr_expect_eq(c.flops_bwd_input, 2.0 * 784 * 256);
    cr_expect_eq(c.flops_bwd_weight, 2.0 * 784 * 256 + 256);
    cr_expect_eq(c.param_bytes, (784 * 256 + 256) * 4);
    cr_expect_eq(c.act_bytes, 256 * 4);
    cr_expect_eq(c.out_bytes, 256 * 4);

    /* relu over 256 */
    pw_graph_node_cost(g, 2, &c);
    cr_expect_eq(c.flops_fwd, 256);
    cr_expect_eq(c.flops_bwd_input, 256);
    cr_expect_eq(c.flops_bwd_weight, 0);

    /* layernorm over 128: 8/10/4 per element, stats 2 floats per row */
    pw_graph_node_cost(g, 4, &c);
    cr_expect_eq(c.flops_fwd, 8 * 128);
    cr_expect_eq(c.flops_bwd_input, 10 * 128);
    cr_expect_eq(c.flops_bwd_weight, 4 * 128);
    cr_expect_eq(c.param_bytes, 2 * 128 * 4);
    cr_expect_eq(c.act_bytes, 128 * 4 + 2 * 4);

    /* gelu: 8 fwd, 12 bwd per element */
    pw_graph_node_cost(g, 5, &c);
    cr_expect_eq(c.flops_fwd, 8 * 128);
    cr_expect_eq(c.flops_bwd_input, 12 * 128);

    /* add: 1 per element forward, gradient passes through (0) */
    pw_graph_node_cost(g, 6, &c);
    cr_expect_eq(c.flops_fwd, 128);
    cr_expect_eq(c.flops_bwd_input, 0);
    cr_expect_eq(c.flops_bwd_weight, 0);

    /* tied linear without bias: FLOPs yes, parameter bytes no */
    pw_graph_node_cost(g, 13, &c);
    cr_expect_eq(c.flops_fwd, 2.0 * 128 * 128);
    cr_expect_eq(c.flops_bwd_weight, 2.0 * 128 * 128);
    cr_expect_eq(c.param_bytes, 0);

    /* softmax cross-entropy over 10 classes: 5 fwd, 3 bwd per logit; keeps probs */
    pw_graph_node_cost(g, 15, &c);
    cr_expect_eq(c.flops_fwd, 50);
    cr_expect_eq(c.flops_bwd_input, 30);
    cr_expect_eq(c.out_bytes, 4);
    cr_expect_eq(c.act_bytes, 4 + 10 * 4);

    cr_expect_eq(pw_graph_node_cost(g, 16, &c), PW_ERR_INVALID_ARG);
    cr_expect_eq(pw_graph_node_cost(g, -1, &c), PW_ERR_INVALID_ARG);

    /* totals: forward summed by hand; params counted once though one is tied */
    pw_op_cost t;
    pw_graph_total_cost(g, &t);
    cr_expect_eq(t.flops_fwd, 401664.0 + 256 + 65664 + 1024 + 1024 + 128 +
                                  3 * (32896 + 128) + 32768 + 2570 + 50);
    int64_t pbytes = 0;
    for (int i = 0; i < g->n_params; i++) pbytes += pw_shape_numel(&g->params[i].shape) * 4;
    cr_expect_eq(t.param_bytes, pbytes);
    cr_expect_eq(pbytes, (200704 + 256 + 32768 + 128 + 256 + 3 * (16384 + 128) + 1280 + 10) * 4);
    pw_graph_destroy(g);
}

Test(graph_cost, rows)
{
    /* linear and the loss act on the last dim; leading dims are rows */
    pw_graph *g = parse_ok("input x : f32[4, 8]\nlabel y : i32[4]\n"
                           "l = linear(x, out=3)\nloss = softmax_cross_entropy(l, y)\n",
                           "rows.graph");
    pw_op_cost c;
    pw_graph_node_cost(g, 0, &c);
    cr_expect_eq(c.flops_fwd, 2.0 * 4 * 8 * 3 + 4 * 3);
    cr_expect_eq(c.flops_bwd_input, 2.0 * 4 * 8 * 3);
    cr_expect_eq(c.param_bytes, (8 * 3 + 3) * 4);
    cr_expect_eq(c.out_bytes, 4 * 3 * 4);
    pw_graph_node_cost(g, 1, &c);
    cr_expect_eq(c.flops_fwd, 5.0 * 4 * 3);
    cr_expect_eq(c.flops_bwd_input, 3.0 * 4 * 3);
    cr_expect_eq(c.act_bytes, 4 + 4 * 3 * 4);
    pw_graph_destroy(g);

    g = parse_ok("input x : f32[6, 5]\nlabel y : i32[6]\n"
                 "n = layernorm(x)\nloss = softmax_cross_entropy(n, y)\n", "ln.graph");
    pw_graph_node_cost(g, 0, &c);
    cr_expect_eq(c.act_bytes, 30 * 4 + 2 * 6 * 4);
    pw_graph_destroy(g);
}

/* ------------------------------------------------------------------ robustness */

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "%s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    cr_assert_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    buf[n] = '\0';
    *len = (size_t)n;
    return buf;
}

/* Parses and, on success, exercises everything that reads the IR. */
static void parse_any(const char *text, size_t len)
{
    pw_graph *g = (pw_graph *)0x1;
    pw_status st = pw_graph_parse_string(text, len, "fuzz.graph", &g);
    cr_assert(st == PW_OK || st == PW_ERR_PARSE || st == PW_ERR_SHAPE,
              "unexpected status %s: %s", pw_status_str(st), pw_last_error());
    if (st != PW_OK) {
        cr_assert_null(g);
        cr_assert(strncmp(pw_last_error(), "fuzz.graph:", 11) == 0 &&
                      strstr(pw_last_error(), ": error: ") != NULL,
                  "bad message '%s'", pw_last_error());
        return;
    }
    cr_assert_not_null(g);
    pw_op_cost t;
    pw_graph_total_cost(g, &t);
    FILE *f = fopen("/dev/null", "w");
    pw_graph_print(g, f);
    fclose(f);
    cr_assert_geq(g->input, 0);
    cr_assert_geq(g->loss, 0);
    pw_graph_destroy(g);
}

Test(graph_fuzz, every_prefix, .timeout = 300)
{
    static const char *const files[] = {FIXTURE("features.graph"), FIXTURE("gpt_shared.graph"),
                                        PW_SOURCE_DIR "/examples/tiny_gpt.graph"};
    for (size_t f = 0; f < sizeof files / sizeof files[0]; f++) {
        size_t len;
        char *text = slurp(files[f], &len);
        for (size_t n = 0; n <= len; n++) {
            /* a private copy so ASan catches any read past `n` */
            char *copy = malloc(n ? n : 1);
            memcpy(copy, text, n);
            parse_any(copy, n);
            free(copy);
        }
        free(text);
    }
}

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

Test(graph_fuzz, random_mutations, .timeout = 300)
{
    static const char interesting[] = "{}()[]=,:-#.\n\t 0123456789e_axyr\0\xff\xc3";
    size_t len;
    char *text = slurp(FIXTURE("features.graph"), &len);
    uint64_t seed = 20240601;
    int ok = 0, errors = 0;
    for (int iter = 0; iter < 4000; iter++) {
        char *m = malloc(len + 16);
        size_t n = len;
        memcpy(m, text, len);
        int edits = 1 + (int)(rng_next(&seed) % 4);
        for (int e = 0; e < edits; e++) {
            uint64_t r = rng_next(&seed);
            size_t at = (size_t)(r % (n ? n : 1));
            unsigned char byte = (r >> 32) & 1 ? (unsigned char)(r >> 40)
                                               : (unsigned char)interesting[(r >> 40) %
                                                                            (sizeof interesting - 1)];
            switch ((r >> 56) % 3) {
            case 0: /* replace */
                if (n) m[at] = (char)byte;
                break;
            case 1: /* insert */
                memmove(m + at + 1, m + at, n - at);
                m[at] = (char)byte;
                n++;
                break;
            case 2: /* delete */
                if (n) {
                    memmove(m + at, m + at + 1, n - at - 1);
                    n--;
                }
                break;
            }
            if (n + 1 >= len + 16) break;
        }
        char *exact = malloc(n ? n : 1);
        memcpy(exact, m, n);
        free(m);
        pw_graph *g = NULL;
        pw_status st = pw_graph_parse_string(exact, n, "fuzz.graph", &g);
        if (st == PW_OK) {
            ok++;
            pw_graph_destroy(g);
        } else {
            errors++;
        }
        parse_any(exact, n);
        free(exact);
    }
    free(text);
    /* Some mutations must survive (e.g. in comments) and most must fail. */
    cr_expect_gt(ok, 0);
    cr_expect_gt(errors, ok);
}
