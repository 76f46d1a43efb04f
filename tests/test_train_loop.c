/* Tests: what a training loop of one's own takes from the library, as
 * pipeline-run does — the metrics log (runtime/metrics_log.h) and a
 * pipeline's (stages/train/pipeline_metrics.h), the checkpoint policy of
 * pw_state_writer_step / _finish, the run and layout a pipeline describes,
 * a resumed run's layout (pw_state_fit_layout), the figures summed over
 * processes, and a plan on this machine's devices through the backend
 * table (pw_plan_local_devices). */
#define _GNU_SOURCE /* nftw (tests/test_tmpdir.h) */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/metrics_log.h"
#include "runtime/metrics_read.h"
#include "stages/ops/backend.h"
#include "stages/plan/plan.h"
#include "stages/train/pipeline_metrics.h"
#include "stages/train/state.h"
#define PW_TEST_TMP_NAME "train_loop"
#define PW_TEST_SUITE train_loop
#include "tests/test_tmpdir.h"

#define TIMEOUT 120

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "%s", path);
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* ---- the log's format ---- */

Test(train_loop, metrics_log_writes_what_the_reader_reads, .timeout = TIMEOUT)
{
    const char *path = tmp_path("m.jsonl");
    pw_metrics_log *log = NULL;
    cr_assert_eq(pw_metrics_log_open(path, 2, &log), PW_OK, "%s", pw_last_error());
    const double busy[2] = {1.5, NAN};
    pw_metrics_step_rec r = {.step = 3, .epoch = 1, .loss = 0.25, .lr = 0.01f, .grad_norm = NAN,
                             .samples_per_s = 100, .tokens_per_s = 0, .step_ms = 10, .bubble_pct = 20,
                             .stage_busy_ms = busy, .n_stages = 2, .elapsed_s = 1};
    cr_assert_eq(pw_metrics_log_step(log, &r), PW_OK, "%s", pw_last_error());
    r.step = 4;
    r.tokens_per_s = 1600;
    cr_assert_eq(pw_metrics_log_step(log, &r), PW_OK, "%s", pw_last_error());
    pw_metrics_eval_rec e = {.step = 4, .epoch = 1, .loss = 1.0, .accuracy = 0.5, .unigram_entropy = 2.0,
                             .samples = 8, .eval_ms = 3, .elapsed_s = 2};
    cr_assert_eq(pw_metrics_log_eval(log, &e), PW_OK, "%s", pw_last_error());
    pw_metrics_log_close(log);
    const char *text = slurp(path);
    /* The lr with the fewest digits, null for what is not finite, no
     * tokens_per_s for data that is not tokens, a language model's eval. */
    cr_assert(strstr(text, "{\"type\":\"step\",\"step\":3,\"epoch\":1,\"loss\":0.25,\"lr\":0.01,\"grad_norm\":null,"
                           "\"samples_per_s\":100,\"step_ms\":10,\"bubble_pct\":20,\"stage_busy_ms\":[1.5,null],"
                           "\"elapsed_s\":1}\n"), "%s", text);
    cr_assert(strstr(text, "\"samples_per_s\":100,\"tokens_per_s\":1600,"), "%s", text);
    cr_assert(strstr(text, "{\"type\":\"eval\",\"step\":4,\"epoch\":1,\"loss\":1,\"accuracy\":null,"
                           "\"ppl\":2.71828183,\"token_accuracy\":0.5,\"unigram_entropy\":2,\"samples\":8,"), "%s", text);
    pw_metrics *m = NULL;
    cr_assert_eq(pw_metrics_read(path, &m), PW_OK, "%s", pw_last_error());
    cr_assert_eq(m->step_lines, 2);
    cr_assert_eq(m->eval_lines, 1);
    cr_assert_eq(m->series[PW_METRIC_LOSS].n, 2);
    cr_assert_eq(m->series[PW_METRIC_GRAD_NORM].n, 0); /* null: not measured */
    cr_assert_float_eq(m->series[PW_METRIC_LR].p[0].value, 0.01, 1e-9);
    pw_metrics_destroy(m);
}

Test(train_loop, metrics_log_an_unwritable_path_is_named, .timeout = TIMEOUT)
{
    pw_metrics_log *log = NULL;
    cr_assert_eq(pw_metrics_log_open("/nonexistent-dir/m.jsonl", 1, &log), PW_ERR_IO);
    cr_assert_null(log);
    cr_assert(strstr(pw_last_error(), "/nonexistent-dir/m.jsonl: "), "%s", pw_last_error());
    pw_pipeline_metrics *pm = NULL;
    cr_assert_eq(pw_pipeline_metrics_open("/nonexistent-dir/m.jsonl", 2, NULL, &pm), PW_ERR_IO);
    cr_assert_null(pm);
    /* No log: every call does nothing. */
    pw_step_stats s = {0};
    pw_eval_stats ev = {0};
    pw_pipeline_metrics_start(NULL, NULL);
    cr_assert_eq(pw_pipeline_metrics_step(NULL, NULL, &s, 1, 1), PW_OK);
    cr_assert_eq(pw_pipeline_metrics_eval(NULL, &s, &ev, -1, 1, 1), PW_OK);
}

/* ---- a pipeline of 2 stages x 2 replicas in one process ---- */

typedef struct fixture {
    const char *dir;
    pw_graph *g;
    pw_dataset *d;
    pw_pipeline_config pc;
    pw_pipeline *pl;
} fixture;

static void fixture_make(fixture *f)
{
    memset(f, 0, sizeof *f);
    f->dir = tmpdir();
    static const char *text = "graph loop_mlp\n"
                              "input x : f32[6]\n"
                              "label y : i32[]\n"
                              "h = linear(x, out=8) as fc1\n"
                              "a = relu(h)\n"
                              "logits = linear(a, out=3) as head\n"
                              "loss = softmax_cross_entropy(logits, y)\n";
    cr_assert_eq(pw_graph_parse_string(text, strlen(text), "t.graph", &f->g), PW_OK, "%s", pw_last_error());
    pw_synthetic_config sc = {.n = 64, .sample_shape = {.ndim = 1, .d = {6}}, .n_classes = 3, .seed = 1,
                              .noise = 1.0f};
    cr_assert_eq(pw_dataset_synthetic(&sc, &f->d), PW_OK, "%s", pw_last_error());
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = f->g;
    pc.train = f->d;
    pc.batch = 16; /* 4 steps per epoch */
    pc.micro_batches = 2;
    pc.stages = 2;
    pc.replicas = 2;
    pc.pin = 0;
    pc.seed = 3;
    pc.optim = pw_optim_defaults(PW_OPTIM_SGD);
    pc.optim.schedule = PW_LR_COSINE;
    pc.optim.decay_steps = 6;
    pc.optim.min_lr = pc.optim.lr / 10;
    f->pc = pc;
    cr_assert_eq(pw_pipeline_create(&f->pc, &f->pl), PW_OK, "%s", pw_last_error());
}

static void fixture_free(fixture *f)
{
    pw_pipeline_destroy(f->pl);
    pw_dataset_destroy(f->d);
    pw_graph_destroy(f->g);
}

Test(train_loop, pipeline_metrics_one_line_per_step_with_the_pipelines_figures, .timeout = TIMEOUT)
{
    fixture f;
    fixture_make(&f);
    char path[128];
    snprintf(path, sizeof path, "%s/m.jsonl", f.dir);
    pw_pipeline_metrics *mx = NULL;
    cr_assert_eq(pw_pipeline_metrics_open(path, 2, NULL, &mx), PW_OK, "%s", pw_last_error());
    pw_pipeline_metrics_start(mx, f.pl);
    pw_step_stats s;
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(pw_pipeline_step(f.pl, &s), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_pipeline_metrics_step(mx, f.pl, &s, 0.5, 1.0 + i), PW_OK, "%s", pw_last_error());
    }
    pw_eval_stats ev = {.loss = 1.25, .accuracy = 0.5, .samples = 64};
    cr_assert_eq(pw_pipeline_metrics_eval(mx, &s, &ev, -1, 0.002, 4), PW_OK, "%s", pw_last_error());
    pw_pipeline_metrics_close(mx);
    pw_metrics *m = NULL;
    cr_assert_eq(pw_metrics_read(path, &m), PW_OK, "%s", pw_last_error());
    cr_assert_eq(m->step_lines, 3);
    cr_assert_eq(m->eval_lines, 1);
    /* The lr of each step from the pipeline's schedule; batch / step time. */
    for (int i = 0; i < 3; i++) {
        cr_assert_eq((float)m->series[PW_METRIC_LR].p[i].value, pw_optim_lr_at(&f.pc.optim, i + 1), "step %d", i + 1);
        cr_assert_float_eq(m->series[PW_METRIC_SAMPLES_PER_S].p[i].value, 32.0, 1e-9);
    }
    cr_assert_neq(m->series[PW_METRIC_LR].p[0].value, m->series[PW_METRIC_LR].p[2].value); /* the schedule moves */
    cr_assert_eq(m->series[PW_METRIC_GRAD_NORM].n, 0); /* no clipping: not measured */
    cr_assert_float_eq(m->series[PW_METRIC_LOSS].p[2].value, s.loss, 1e-8 * fabs(s.loss)); /* 9 digits */
    pw_metrics_destroy(m);
    const char *text = slurp(path);
    cr_assert(strstr(text, "\"eval_ms\":2,"), "%s", text);
    cr_assert_null(strstr(text, "tokens_per_s"), "%s", text); /* not token data */
    fixture_free(&f);
}

Test(train_loop, pipeline_figures_planned_bytes_sum_every_chunk_of_every_replica, .timeout = TIMEOUT)
{
    fixture f;
    fixture_make(&f);
    double planned = -1, want = 0;
    cr_assert_eq(pw_pipeline_planned_bytes(f.pl, &planned), PW_OK, "%s", pw_last_error());
    for (int c = 0; c < pw_pipeline_n_chunks(f.pl); c++) {
        pw_pipeline_stage_stats ss;
        pw_pipeline_stage_stats_get(f.pl, c, &ss);
        cr_assert_gt(ss.memory, 0);
        want += (double)ss.memory;
    }
    cr_assert_eq(planned, 2 * want); /* two replicas */
    pw_pipeline_process_stats all[1];
    cr_assert_eq(pw_pipeline_gather_process_stats(f.pl, all), PW_ERR_INVALID_ARG); /* no transport */
    fixture_free(&f);
}

/* ---- checkpoints on a policy ---- */

typedef struct reports {
    int n;
    int64_t steps[16];
} reports;

static void note_report(const pw_state_done *d, void *arg)
{
    reports *r = arg;
    if (r->n < 16) r->steps[r->n] = d->step;
    r->n++;
}

/* Runs `steps` steps of f with a writer of policy `every` (foreground: each
 * save completes at once), resumed from `resumed` when not NULL; the steps
 * reported go to *r. */
static void run_with_writer(fixture *f, const char *sub, int64_t every, const pw_state *resumed, int64_t from,
                            int64_t steps, reports *r)
{
    char ck[128];
    snprintf(ck, sizeof ck, "%s/%s", f->dir, sub);
    pw_state_config sc = {.dir = ck, .keep = 0, .foreground = 1, .every = every, .graph = f->g,
                          .run = pw_state_run_of(&f->pc, "synthetic:64:6:3"), .layout = pw_state_layout_of(f->pl),
                          .resumed = resumed};
    pw_state_writer *w = NULL;
    cr_assert_eq(pw_state_writer_create(&sc, &w), PW_OK, "%s", pw_last_error());
    memset(r, 0, sizeof *r);
    pw_step_stats s = {.step = from};
    for (int64_t i = from; i < steps; i++) {
        cr_assert_eq(pw_pipeline_step(f->pl, &s), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_state_writer_step(w, f->pl, &s, steps, note_report, r), PW_OK, "%s", pw_last_error());
    }
    cr_assert_eq(pw_state_writer_finish(w, f->pl, s.step, note_report, r), PW_OK, "%s", pw_last_error());
    pw_state_writer_destroy(w);
}

Test(train_loop, state_loop_saves_on_the_policy_and_the_last_step_once, .timeout = TIMEOUT)
{
    fixture f;
    fixture_make(&f);
    reports r;
    run_with_writer(&f, "every2", 2, NULL, 0, 5, &r); /* steps 2 and 4, then the end: 5 */
    cr_assert_eq(r.n, 3);
    cr_assert_eq(r.steps[0], 2);
    cr_assert_eq(r.steps[1], 4);
    cr_assert_eq(r.steps[2], 5);
    run_with_writer(&f, "epoch", -1, NULL, 5, 9, &r); /* 4 steps per epoch: step 8, the end is 9 */
    cr_assert_eq(r.n, 2);
    cr_assert_eq(r.steps[0], 8);
    cr_assert_eq(r.steps[1], 9);
    run_with_writer(&f, "last", 4, NULL, 9, 12, &r); /* due at 12, the last step: written once, by finish */
    cr_assert_eq(r.n, 1);
    cr_assert_eq(r.steps[0], 12);
    /* A run resumed at its last step writes nothing more. */
    char ck[128];
    snprintf(ck, sizeof ck, "%s/last", f.dir);
    pw_state *st = NULL;
    cr_assert_eq(pw_state_open(ck, &st), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_state_get_meta(st)->step, 12);
    run_with_writer(&f, "last", 4, st, 12, 12, &r);
    cr_assert_eq(r.n, 0);
    /* The run and layout the pipeline describes were recorded. */
    const pw_state_meta *m = pw_state_get_meta(st);
    cr_assert_eq(m->run.micro_batch, 4);
    cr_assert_eq(m->run.batch, 16);
    cr_assert_str_eq(m->run.data, "synthetic:64:6:3");
    cr_assert_eq(m->layout.stages, 2);
    cr_assert_eq(m->layout.replicas, 2);
    cr_assert_eq(m->layout.micro_batches, 2);
    cr_assert_eq(m->layout.processes, 1);
    cr_assert_str_eq(m->layout.schedule, "1f1b");
    pw_state_run run = pw_state_run_of(&f.pc, "synthetic:64:6:3");
    cr_assert_eq(pw_state_check(st, f.g, &run), PW_OK, "%s", pw_last_error());
    run.batch = 32;
    cr_assert_eq(pw_state_check(st, f.g, &run), PW_ERR_FORMAT);
    pw_state_close(st);
    fixture_free(&f);
}

Test(train_loop, state_loop_a_resumed_layout_keeps_the_micro_batch_size, .timeout = TIMEOUT)
{
    pw_state_meta m;
    memset(&m, 0, sizeof m);
    m.run.micro_batch = 4;
    /* One process, 1 replica: batch 32 of micro-batches of 4 is 8 micro-batches. */
    int R = 1, M = 1, fixed = 0;
    cr_assert_eq(pw_state_fit_layout(&m, 1, 2, 32, 0, &R, &M, &fixed), PW_OK, "%s", pw_last_error());
    cr_assert_eq(R, 1);
    cr_assert_eq(M, 8);
    cr_assert_eq(fixed, 1);
    /* Given micro-batches stay. */
    R = 2, M = 2, fixed = 1;
    cr_assert_eq(pw_state_fit_layout(&m, 1, 2, 32, 0, &R, &M, &fixed), PW_OK, "%s", pw_last_error());
    cr_assert_eq(M, 2);
    /* Elastic: 8 processes of 2 stages take 4 replicas, 2 micro-batches each. */
    R = 2, M = 2, fixed = 1;
    cr_assert_eq(pw_state_fit_layout(&m, 8, 2, 32, 0, &R, &M, &fixed), PW_OK, "%s", pw_last_error());
    cr_assert_eq(R, 4);
    cr_assert_eq(M, 2);
    /* 6 processes of 2 stages: 3 replicas do not split a batch of 32. */
    R = 2, M = 2, fixed = 1;
    cr_assert_eq(pw_state_fit_layout(&m, 6, 2, 32, 0, &R, &M, &fixed), PW_ERR_INVALID_ARG);
    cr_assert_eq(R, 3);
}

/* ---- a plan on this machine's devices ---- */

static pw_status fake_info(int device, pw_device_info *out)
{
    if (device < 0 || device > 1) return pw_error(PW_ERR_INVALID_ARG, "fakegpu: no device %d", device);
    snprintf(out->name, sizeof out->name, "Fake GPU %d", device);
    out->total_memory = 8LL << 30;
    out->free_memory = (int64_t)(device + 1) << 30;
    return PW_OK;
}

static pw_status fake_pci(int device, char *buf, size_t n)
{
    snprintf(buf, n, "0000:%02x:00.0", 0x10 + device);
    return PW_OK;
}

static int fake_count(void) { return 2; }

/* A backend with `open` has devices by index (it runs no program here). */
static pw_status fake_open(int device, pw_math math, const char *who, const size_t bytes[PW_MEM_COUNT], void **ctx,
                           void *base[PW_MEM_COUNT])
{
    (void)device, (void)math, (void)bytes, (void)ctx, (void)base;
    return pw_error(PW_ERR_UNSUPPORTED, "%s: fakegpu runs no programs", who);
}

Test(train_loop, plan_local_describes_the_devices_through_the_backend_table, .timeout = TIMEOUT)
{
    static pw_backend_i fake;
    fake = pw_backend_cpu_i;
    fake.name = "fakegpu";
    fake.device_memory = 1;
    fake.open = fake_open;
    fake.device_count = fake_count;
    fake.device_info = fake_info;
    fake.device_pci = fake_pci;
    cr_assert_eq(pw_backend_register(&fake), PW_OK, "%s", pw_last_error());
    pw_plan_config pc = pw_plan_defaults();
    pw_plan_local *l = NULL;
    /* The CPU: nothing to describe. */
    cr_assert_eq(pw_plan_local_devices("cpu", &pc, &l), PW_OK, "%s", pw_last_error());
    cr_assert_null(l);
    cr_assert_null(pc.gpu_list);
    cr_assert_eq(pw_plan_local_devices("fakegpu", &pc, &l), PW_OK, "%s", pw_last_error());
    cr_assert_not_null(l);
    cr_assert_eq(pc.n_gpu_list, 2);
    cr_assert_not_null(pc.topology);
    cr_assert_str_eq(pc.topology_name, "this machine");
    cr_assert_str_eq(pc.gpu_list[1].name, "fakegpu1");
    cr_assert_str_eq(pc.gpu_list[1].model, "Fake GPU 1");
    cr_assert_str_eq(pc.gpu_list[1].pci, "0000:11:00.0");
    cr_assert_eq(pc.gpu_list[1].memory, 2LL << 30);
    pw_plan_local_destroy(l);
    /* One device of the two. */
    pc = pw_plan_defaults();
    cr_assert_eq(pw_plan_local_devices("fakegpu:1", &pc, &l), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pc.n_gpu_list, 1);
    cr_assert_str_eq(pc.gpu_list[0].name, "fakegpu1");
    pw_plan_local_destroy(l);
    /* A device the backend does not have: its error, and pc unchanged. */
    pc = pw_plan_defaults();
    cr_assert_eq(pw_plan_local_devices("fakegpu:5", &pc, &l), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "fakegpu: no device 5"), "%s", pw_last_error());
    cr_assert_null(l);
    cr_assert_null(pc.gpu_list);
    cr_assert_null(pc.topology);
}
