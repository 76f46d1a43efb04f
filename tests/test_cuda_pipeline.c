/* pipewright — the stage program on the GPU through real pipelines
 * (stages/ops/backend.h, stages/ops/cuda/backend_cuda.c; docs/cuda.md).
 *
 * The one-stage GPU run is the oracle for the GPU (STYLE 9): 2- and 3-stage
 * pipelines on cuda:0 (several stages on one GPU, each with its own
 * streams and cuBLAS context) must give the same parameter bytes after
 * several steps, for 1F1B and ZB-H1 — on an MLP and on a small GPT whose
 * head is tied to its embedding across stages and which uses dropout. The
 * CPU is the oracle for the numbers: a GPU run stays within fp32 rounding
 * of the same run on the CPU. A checkpoint written from the GPU loads into
 * a CPU pipeline with the same bytes.
 *
 * Without a GPU (or without a driver) every test that needs one calls
 * cr_skip_test("no CUDA device: ..."); the tests of the refusals run
 * everywhere. Built without CUDA, the file is one skipped test. Criterion
 * runs each test in its own process, so each creates its CUDA context
 * itself (STYLE 10).
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <criterion/parameterized.h>

#ifndef PW_HAVE_CUDA

Test(cuda_pipeline, built_without_cuda)
{
    cr_skip_test("built without CUDA (no CUDA compiler when CMake configured this build)");
}

#else

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graph/graph.h"
#include "runtime/status.h"
#include "stages/ops/backend.h"
#include "stages/train/checkpoint.h"
#include "stages/ops/cuda/backend_cuda.h"
#include "stages/ops/cuda/device.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"
#include "stages/program/program.h"
#include "tests/pipeline_support.h"

/* One timeout for every test (see test_cuda_ops.c: Criterion 2.4.1 leaks a
 * record when tests of one binary run in parallel with different ones). */
#define TIMEOUT_S 180

static const char *MLP = "graph c_mlp\n" PW_TEST_MLP_BODY;

/* A small GPT with the head tied to wte (a tie across stages) and dropout. */
static const char *GPT = "graph c_gpt\n" PW_TEST_GPT_BODY;

/* The CUDA backend registered and device 0 present, or the test skips
 * with the runtime's reason ("no CUDA device: ..."). */
static void need_gpu(void)
{
    cr_assert_eq(pw_backend_register(pw_backend_cuda()), PW_OK, "%s", pw_last_error());
    int n = 0;
    if (pw_cuda_device_count(&n) != PW_OK) cr_skip_test("%s", pw_last_error());
}

static pw_graph *parse(const char *text) { return test_parse(text, "c.graph"); }

static pw_dataset *mlp_data(void)
{
    pw_synthetic_config sc = {.n = 256, .sample_shape = {.ndim = 2, .d = {4, 6}},
                              .n_classes = 5, .seed = 3, .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    return d;
}

static pw_dataset *gpt_data(const pw_graph *g)
{
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_from_spec_for_graph("text:fortunes", 1, g, &d), PW_OK, "%s",
                 pw_last_error());
    return d;
}

typedef struct run_cfg {
    const char *device;
    int stages;
    pw_schedule_kind kind;
    int micro_batches;
    int64_t batch;
    int steps;
    pw_optim_kind optim;
    int recompute;
    double clip;
    int replicas; /* 0: 1 */
} run_cfg;

typedef struct run_out {
    float *params;   /* every parameter, graph order, host copy */
    int64_t count;
    double last_loss;
} run_out;

static pw_pipeline *make(const pw_graph *g, const pw_dataset *d, const run_cfg *r)
{
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = r->batch;
    pc.micro_batches = r->micro_batches;
    pc.stages = r->stages;
    pc.schedule = r->kind;
    pc.partition = PW_PARTITION_FLOPS;
    pc.optim = pw_optim_defaults(r->optim);
    pc.seed = 7;
    pc.shuffle = 1;
    pc.pin = 0;
    pc.recompute = r->recompute;
    pc.clip_grad_norm = r->clip;
    pc.device = r->device;
    pc.replicas = r->replicas ? r->replicas : 1;
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    return pl;
}

static run_out run(const pw_graph *g, const pw_dataset *d, const run_cfg *r)
{
    pw_pipeline *pl = make(g, d, r);
    run_out o = {0};
    for (int s = 0; s < r->steps; s++) {
        pw_step_stats st;
        cr_assert_eq(pw_pipeline_step(pl, &st), PW_OK, "%s step %d: %s", r->device, s + 1,
                     pw_last_error());
        cr_assert(isfinite(st.loss), "%s step %d: loss %g", r->device, s + 1, st.loss);
        o.last_loss = st.loss;
    }
    o.params = test_pipeline_params(pl, g, &o.count);
    pw_pipeline_destroy(pl);
    return o;
}

/* Same bytes, or the first few differing elements and the max error. */
static void expect_same_bytes(const run_out *a, const run_out *b, const char *what)
{
    cr_assert_eq(a->count, b->count);
    if (memcmp(a->params, b->params, (size_t)a->count * sizeof(float)) == 0) return;
    int shown = 0;
    double worst = 0;
    for (int64_t i = 0; i < a->count; i++) {
        double e = fabs((double)a->params[i] - (double)b->params[i]);
        if (e > worst || a->params[i] != b->params[i]) worst = e > worst ? e : worst;
        if (a->params[i] != b->params[i] && shown < 5) {
            cr_log_error("%s: param[%lld] %.9g vs %.9g", what, (long long)i, a->params[i], b->params[i]);
            shown++;
        }
    }
    cr_assert_fail("%s: parameters differ (max abs error %g)", what, worst);
}

/* max |a − b| / max |a| over the parameters: how far b is from a, normalised. */
static double norm_diff(const run_out *a, const run_out *b)
{
    double worst = 0, scale = 0;
    for (int64_t i = 0; i < a->count; i++) {
        double e = fabs((double)a->params[i] - (double)b->params[i]);
        if (e > worst) worst = e;
        if (fabs(a->params[i]) > scale) scale = fabs(a->params[i]);
    }
    return scale > 0 ? worst / scale : worst;
}

/* ---------------------------------------------------------------- GPU == GPU */

typedef struct case_t {
    pw_schedule_kind kind;
    int stages;
    int gpt;
} case_t;

ParameterizedTestParameters(cuda_pipeline, stages_equal_one_stage)
{
    static case_t cases[8];
    int n = 0;
    for (int gpt = 0; gpt < 2; gpt++)
        for (int k = 0; k < 2; k++)
            for (int s = 2; s <= 3; s++)
                cases[n++] = (case_t){k ? PW_SCHEDULE_ZB_H1 : PW_SCHEDULE_1F1B, s, gpt};
    return cr_make_param_array(case_t, cases, (size_t)n);
}

ParameterizedTest(case_t *c, cuda_pipeline, stages_equal_one_stage, .timeout = TIMEOUT_S)
{
    need_gpu();
    pw_graph *g = parse(c->gpt ? GPT : MLP);
    pw_dataset *d = c->gpt ? gpt_data(g) : mlp_data();
    run_cfg one = {.device = "cuda:0", .stages = 1, .kind = PW_SCHEDULE_1F1B, .micro_batches = 4,
                   .batch = 16, .steps = 3, .optim = PW_OPTIM_ADAMW};
    run_cfg many = one;
    many.stages = c->stages;
    many.kind = c->kind;
    run_out a = run(g, d, &one), b = run(g, d, &many);
    char what[96];
    snprintf(what, sizeof what, "%s, %d stages, %s on cuda:0 vs 1 stage", c->gpt ? "GPT" : "MLP",
             c->stages, pw_schedule_kind_name(c->kind));
    expect_same_bytes(&a, &b, what);
    cr_expect_eq(a.last_loss, b.last_loss, "%s: loss %.17g vs %.17g", what, a.last_loss, b.last_loss);
    free(a.params);
    free(b.params);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* Recompute on the GPU: the same bytes as without it. */
Test(cuda_pipeline, recompute_is_bit_identical, .timeout = TIMEOUT_S)
{
    need_gpu();
    pw_graph *g = parse(GPT);
    pw_dataset *d = gpt_data(g);
    run_cfg r = {.device = "cuda:0", .stages = 2, .kind = PW_SCHEDULE_ZB_H1, .micro_batches = 4,
                 .batch = 16, .steps = 2, .optim = PW_OPTIM_ADAMW};
    run_out a = run(g, d, &r);
    r.recompute = 1;
    run_out b = run(g, d, &r);
    expect_same_bytes(&a, &b, "GPT on cuda:0, recompute vs not");
    free(a.params);
    free(b.params);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* Clipping (through host copies of the gradients) on the GPU: 3 stages
 * give one stage's bytes; the GPT's tie makes the pipeline clip after the
 * engine's step, the MLP lets the engine clip. */
Test(cuda_pipeline, clipping_is_bit_identical_across_stages, .timeout = TIMEOUT_S)
{
    need_gpu();
    for (int gpt = 0; gpt < 2; gpt++) {
        pw_graph *g = parse(gpt ? GPT : MLP);
        pw_dataset *d = gpt ? gpt_data(g) : mlp_data();
        run_cfg r = {.device = "cuda:0", .stages = 1, .kind = PW_SCHEDULE_1F1B, .micro_batches = 4,
                     .batch = 16, .steps = 3, .optim = PW_OPTIM_ADAMW, .clip = 0.05};
        run_out a = run(g, d, &r);
        r.stages = 3;
        run_out b = run(g, d, &r);
        expect_same_bytes(&a, &b, gpt ? "GPT clipped on cuda:0, 3 stages vs 1" : "MLP clipped on cuda:0, 3 stages vs 1");
        free(a.params);
        free(b.params);
        pw_dataset_destroy(d);
        pw_graph_destroy(g);
    }
}

/* ---------------------------------------------------------------- GPU ≈ CPU */

Test(cuda_pipeline, close_to_cpu, .timeout = TIMEOUT_S)
{
    need_gpu();
    for (int gpt = 0; gpt < 2; gpt++) {
        pw_graph *g = parse(gpt ? GPT : MLP);
        pw_dataset *d = gpt ? gpt_data(g) : mlp_data();
        /* SGD: an update is lr × the gradient, so fp32-rounding differences
         * in the gradients stay that small (Adam's first steps are about
         * lr × sign(g) and would magnify them near zero). */
        run_cfg r = {.device = "cpu", .stages = 2, .kind = PW_SCHEDULE_1F1B, .micro_batches = 4,
                     .batch = 16, .steps = 3, .optim = PW_OPTIM_SGD};
        run_out cpu = run(g, d, &r);
        r.device = "cuda:0";
        run_out gpu = run(g, d, &r);
        double rel = norm_diff(&cpu, &gpu);
        cr_log_info("%s: GPU vs CPU max |dp| / max |p| = %.3g, loss %.9g vs %.9g", gpt ? "GPT" : "MLP",
                    rel, gpu.last_loss, cpu.last_loss);
        cr_expect_lt(rel, 1e-4, "%s: GPU parameters differ from the CPU's by %g (normalised)",
                     gpt ? "GPT" : "MLP", rel);
        cr_expect_lt(fabs(gpu.last_loss - cpu.last_loss), 1e-4 * fabs(cpu.last_loss) + 1e-6,
                     "%s: loss %.9g on the GPU, %.9g on the CPU", gpt ? "GPT" : "MLP", gpu.last_loss,
                     cpu.last_loss);
        free(cpu.params);
        free(gpu.params);
        pw_dataset_destroy(d);
        pw_graph_destroy(g);
    }
}

/* Data-parallel replicas on the GPU: the engine's all-reduce sums the
 * device gradients with kernels in the ring's order, so 2 replicas give the
 * same bytes on 2 stages as on 1 (as on the CPU), and stay within fp32
 * rounding of the CPU's replicas. The GPT adds the tied head and clipping. */
Test(cuda_pipeline, replicas, .timeout = TIMEOUT_S)
{
    need_gpu();
    for (int gpt = 0; gpt < 2; gpt++) {
        pw_graph *g = parse(gpt ? GPT : MLP);
        pw_dataset *d = gpt ? gpt_data(g) : mlp_data();
        run_cfg r = {.device = "cuda:0", .stages = 1, .kind = PW_SCHEDULE_1F1B, .micro_batches = 2,
                     .batch = 16, .steps = 3, .optim = PW_OPTIM_SGD, .replicas = 2,
                     .clip = 0.5};
        run_out one = run(g, d, &r);
        r.stages = 2;
        run_out two = run(g, d, &r);
        char what[96];
        snprintf(what, sizeof what, "%s, 2 replicas on cuda:0: 2 stages vs 1", gpt ? "GPT" : "MLP");
        expect_same_bytes(&one, &two, what);
        r.device = "cpu";
        run_out cpu = run(g, d, &r);
        double rel = norm_diff(&cpu, &two);
        cr_log_info("%s, 2 replicas x 2 stages: GPU vs CPU max |dp| / max |p| = %.3g", gpt ? "GPT" : "MLP",
                    rel);
        cr_expect_lt(rel, 1e-4, "%s: GPU replicas differ from the CPU's by %g (normalised)",
                     gpt ? "GPT" : "MLP", rel);
        free(one.params);
        free(two.params);
        free(cpu.params);
        pw_dataset_destroy(d);
        pw_graph_destroy(g);
    }
}

/* A checkpoint written from the GPU holds the GPU's bytes and loads into a
 * CPU pipeline (and back onto the GPU) unchanged. */
Test(cuda_pipeline, checkpoint_round_trip, .timeout = TIMEOUT_S)
{
    need_gpu();
    pw_graph *g = parse(MLP);
    pw_dataset *d = mlp_data();
    run_cfg r = {.device = "cuda:0", .stages = 2, .kind = PW_SCHEDULE_1F1B, .micro_batches = 2,
                 .batch = 16, .steps = 2, .optim = PW_OPTIM_ADAMW};
    pw_pipeline *gpu = make(g, d, &r);
    for (int s = 0; s < r.steps; s++) cr_assert_eq(pw_pipeline_step(gpu, NULL), PW_OK, "%s", pw_last_error());
    char path[64];
    snprintf(path, sizeof path, "/tmp/pw_cuda_ckpt_%d.safetensors", (int)getpid());
    cr_assert_eq(pw_pipeline_save(gpu, path, NULL), PW_OK, "%s", pw_last_error());
    run_out want = {0};
    want.params = test_pipeline_params(gpu, g, &want.count);

    run_cfg rc = r;
    rc.device = "cpu";
    rc.stages = 3;
    pw_pipeline *cpu = make(g, d, &rc);
    cr_assert_eq(pw_pipeline_load(cpu, path, NULL), PW_OK, "%s", pw_last_error());
    run_out got = {0};
    got.params = test_pipeline_params(cpu, g, &got.count);
    expect_same_bytes(&want, &got, "checkpoint from cuda:0 into a CPU pipeline");

    pw_pipeline *gpu2 = make(g, d, &r);
    cr_assert_eq(pw_pipeline_load(gpu2, path, NULL), PW_OK, "%s", pw_last_error());
    run_out back = {0};
    back.params = test_pipeline_params(gpu2, g, &back.count);
    expect_same_bytes(&want, &back, "checkpoint back onto cuda:0");

    pw_eval_stats es;
    cr_assert_eq(pw_pipeline_evaluate(gpu2, d, &es), PW_OK, "%s", pw_last_error());
    cr_expect(isfinite(es.loss), "evaluation on cuda:0: loss %g", es.loss);

    unlink(path);
    free(want.params);
    free(got.params);
    free(back.params);
    pw_pipeline_destroy(gpu);
    pw_pipeline_destroy(gpu2);
    pw_pipeline_destroy(cpu);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ---------------------------------------------------------------- refusals */

/* Runs everywhere: without a device, a CUDA pipeline is refused at create
 * with the runtime's reason (with one, the test has nothing to check). */
Test(cuda_pipeline, no_device_is_a_clear_error, .timeout = TIMEOUT_S)
{
    cr_assert_eq(pw_backend_register(pw_backend_cuda()), PW_OK, "%s", pw_last_error());
    int n = 0;
    if (pw_cuda_device_count(&n) == PW_OK) cr_skip_test("a CUDA device is present (%d)", n);
    pw_graph *g = parse(MLP);
    pw_dataset *d = mlp_data();
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = 16;
    pc.micro_batches = 2;
    pc.stages = 2;
    pc.pin = 0;
    pc.device = "cuda:0";
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_ERR_UNSUPPORTED);
    cr_assert_null(pl);
    cr_expect(strstr(pw_last_error(), "no CUDA device") != NULL, "message: %s", pw_last_error());
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* Runs everywhere: device strings are checked; without a GPU, replicas on
 * CUDA fail as cleanly as everything else ("no CUDA device"). */
Test(cuda_pipeline, unsupported_and_bad_devices, .timeout = TIMEOUT_S)
{
    cr_assert_eq(pw_backend_register(pw_backend_cuda()), PW_OK, "%s", pw_last_error());
    pw_graph *g = parse(MLP);
    pw_dataset *d = mlp_data();
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = 16;
    pc.micro_batches = 2;
    pc.stages = 2;
    pc.pin = 0;
    pc.device = "cuda";
    pc.replicas = 2;
    pw_pipeline *pl = NULL;
    int n = 0;
    if (pw_cuda_device_count(&n) != PW_OK) {
        cr_expect_eq(pw_pipeline_create(&pc, &pl), PW_ERR_UNSUPPORTED);
        cr_expect_null(pl);
        cr_expect(strstr(pw_last_error(), "no CUDA device") != NULL, "message: %s", pw_last_error());
    }
    const pw_backend_i *be;
    int idx;
    cr_expect_eq(pw_backend_find("cuda:x", &be, &idx), PW_ERR_INVALID_ARG);
    cr_expect_eq(pw_backend_find("gpu", &be, &idx), PW_ERR_INVALID_ARG);
    cr_expect_eq(pw_backend_find("cpu:1", &be, &idx), PW_ERR_INVALID_ARG);
    cr_assert_eq(pw_backend_find("cuda:3", &be, &idx), PW_OK, "%s", pw_last_error());
    cr_expect_str_eq(be->name, "cuda");
    cr_expect_eq(idx, 3);
    cr_assert_eq(pw_backend_find(NULL, &be, &idx), PW_OK);
    cr_expect_str_eq(be->name, "cpu");
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

#endif
