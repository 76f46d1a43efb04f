/* pipewright — the training state at T > 1 tensor-parallel ranks (issue 16;
 * docs/parallelism.md, "Clipping at T > 1" and "Checkpoints"): gradient-norm
 * clipping whose global norm counts each split parameter's parts once and
 * each whole one once, against T = 1 and across stage counts and schedules
 * at one T; training-state checkpoints (--checkpoint-dir, --resume)
 * written at one T and resumed at another, AdamW state included; and a
 * running pipeline's cuts moved at T = 2 (pw_pipeline_repartition); the
 * error-feedback state of --compress (top-k, PowerSGD) in both. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "graph/graph.h"
#include "runtime/compress.h"
#include "runtime/safetensors.h"
#include "stages/ops/optim.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"
#include "stages/train/rebalance.h"
#include "stages/train/state.h"
#include "tests/tsan_criterion.h" /* runs under ThreadSanitizer (scripts/test.sh) */
#include "tests/tp_support.h"        /* MLP, GPT, parse, images, tokens */

#define TIMEOUT 180

/* Chunk boundaries no split value crosses (at T = 2), spread over the graph. */
static int tp_cuts(const pw_graph *g, int C, int *cuts)
{
    pw_graph *r = NULL;
    cr_assert_eq(pw_graph_tp_rank(g, 2, 0, &r), PW_OK, "%s", pw_last_error());
    int ok[1024] = {0}, n_ok = 0;
    for (int b = 1; b < g->n_nodes && b < 1024; b++) {
        int fine = 1;
        for (int i = b; i < g->n_nodes && fine; i++)
            for (int q = 0; q < g->nodes[i].n_inputs; q++) {
                const int v = g->nodes[i].inputs[q];
                if (r->values[v].tp_full && r->values[v].producer >= 0 && r->values[v].producer < b) fine = 0;
            }
        if (fine) ok[n_ok++] = b;
    }
    pw_graph_destroy(r);
    if (n_ok < C - 1) return 0;
    cuts[0] = 0;
    for (int c = 1; c < C; c++) cuts[c] = ok[(int64_t)c * n_ok / C];
    cuts[C] = g->n_nodes;
    for (int c = 1; c <= C; c++)
        if (cuts[c] <= cuts[c - 1]) return 0;
    return 1;
}

typedef struct run_cfg {
    int S, R, T, M;
    pw_schedule_kind kind;
    double clip;
    int post_validate;
    pw_optim_kind optim;
    int64_t batch;
    int overlap;                 /* > 1: pw_pipeline_steps with overlap_steps */
    const char *compress;        /* --compress (with replicas); NULL: none */
} run_cfg;

static int cuts_buf[64];

static pw_pipeline_config config(const pw_graph *g, const pw_dataset *d, const run_cfg *c)
{
    const int v = c->kind == PW_SCHEDULE_INTERLEAVED || c->kind == PW_SCHEDULE_ZB_V ? 2 : 1;
    cr_assert(tp_cuts(g, c->S * v, cuts_buf), "%s: no %d chunks without splitting a pair", g->name, c->S * v);
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = c->batch;
    pc.micro_batches = c->M;
    pc.replicas = c->R;
    pc.stages = c->S;
    pc.schedule = c->kind;
    pc.cuts = cuts_buf;
    pc.n_cuts = c->S * v + 1;
    pc.optim = pw_optim_defaults(c->optim);
    pc.optim.lr = c->optim == PW_OPTIM_ADAMW ? 3e-3f : 0.1f;
    pc.seed = 11;
    pc.shuffle = 1;
    pc.pin = 0;
    pc.watchdog_s = 120;
    pc.tensor_parallel = c->T;
    pc.clip_grad_norm = c->clip;
    pc.post_validate = c->post_validate;
    pc.overlap_steps = c->overlap;
    if (c->compress) cr_assert_eq(pw_compress_parse(c->compress, &pc.compress), PW_OK, "%s", pw_last_error());
    return pc;
}

static pw_pipeline *make(const pw_graph *g, const pw_dataset *d, const run_cfg *c)
{
    pw_pipeline_config pc = config(g, d, c);
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s S=%d R=%d T=%d %s: %s", g->name, c->S, c->R, c->T,
                 pw_schedule_kind_name(c->kind), pw_last_error());
    return pl;
}

static void steps(pw_pipeline *pl, int n, const run_cfg *c, double *norms)
{
    if (c->overlap > 1) { /* one engine run whose steps overlap (no norms per step) */
        cr_assert_eq(pw_pipeline_steps(pl, n, NULL), PW_OK, "T=%d S=%d: %s", c->T, c->S, pw_last_error());
        return;
    }
    for (int s = 0; s < n; s++) {
        cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "T=%d S=%d: %s", c->T, c->S, pw_last_error());
        if (norms) norms[s] = pw_pipeline_grad_norm(pl);
    }
}

static void tmp_file(char *path)
{
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    close(fd);
}

/* Trains n steps and saves the parameters (gathered over the ranks). */
static void run_to(const pw_graph *g, const pw_dataset *d, const run_cfg *c, int n, const char *path, double *norms)
{
    pw_pipeline *pl = make(g, d, c);
    steps(pl, n, c, norms);
    cr_assert_eq(pw_pipeline_save(pl, path, NULL), PW_OK, "%s", pw_last_error());
    pw_pipeline_destroy(pl);
}

/* Compares every tensor of file a with b's: bit for bit (tol < 0), or each
 * element within tol of b's largest; with `allowed` > 0 that many elements
 * in all may differ by more, but never by more than `most` (AdamW's few
 * near-zero gradients: docs/parallelism.md). Returns the largest
 * difference. */
static double compare(const char *a, const char *b, double tol, double allowed, double most, const char *what)
{
    pw_safetensors *fa = NULL, *fb = NULL;
    cr_assert_eq(pw_safetensors_open(a, &fa), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_safetensors_open(b, &fb), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_safetensors_count(fa), pw_safetensors_count(fb), "%s: tensor counts differ", what);
    double worst = 0;
    int64_t beyond = 0, total = 0;
    for (int i = 0; i < pw_safetensors_count(fb); i++) {
        pw_st_tensor tb, ta;
        cr_assert_eq(pw_safetensors_at(fb, i, &tb), PW_OK);
        cr_assert_eq(pw_safetensors_get(fa, tb.name, &ta), PW_OK, "%s: '%s' missing", what, tb.name);
        cr_assert(pw_shape_equal(&ta.shape, &tb.shape), "%s: '%s' has another shape", what, tb.name);
        const float *x = ta.data, *y = tb.data;
        const int64_t n = (int64_t)(tb.nbytes / sizeof(float));
        total += n;
        if (tol < 0) {
            cr_expect_eq(memcmp(x, y, tb.nbytes), 0, "%s: '%s' differs", what, tb.name);
            continue;
        }
        double m = 0;
        for (int64_t j = 0; j < n; j++) m = fmax(m, fabs((double)y[j]));
        for (int64_t j = 0; j < n; j++) {
            const double dd = fabs((double)x[j] - (double)y[j]);
            worst = fmax(worst, dd);
            if (dd > tol * fmax(m, 1.0)) {
                beyond++;
                cr_expect_leq(dd, most, "%s: '%s'[%lld] differs by %.3g", what, tb.name, (long long)j, dd);
            }
        }
    }
    cr_expect_leq((double)beyond, allowed * (double)total, "%s: %lld of %lld elements beyond %g", what,
                  (long long)beyond, (long long)total, tol);
    pw_safetensors_close(fa);
    pw_safetensors_close(fb);
    return worst;
}

/* The largest difference between the files' tensors (same names). */
static double max_diff(const char *a, const char *b)
{
    pw_safetensors *fa = NULL, *fb = NULL;
    cr_assert_eq(pw_safetensors_open(a, &fa), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_safetensors_open(b, &fb), PW_OK, "%s", pw_last_error());
    double worst = 0;
    for (int i = 0; i < pw_safetensors_count(fb); i++) {
        pw_st_tensor tb, ta;
        cr_assert_eq(pw_safetensors_at(fb, i, &tb), PW_OK);
        cr_assert_eq(pw_safetensors_get(fa, tb.name, &ta), PW_OK);
        const float *x = ta.data, *y = tb.data;
        for (size_t j = 0; j < tb.nbytes / sizeof(float); j++) worst = fmax(worst, fabs((double)x[j] - (double)y[j]));
    }
    pw_safetensors_close(fa);
    pw_safetensors_close(fb);
    return worst;
}

/* ------------------------------------------------------------ clipping */

/* Clipping that triggers every step: at T = 2 and 3 the global norm and
 * the parameters are T = 1's within 1e-6 (SGD), and at T = 2 the same bits
 * for every stage count and schedule, post-validated or not, and with
 * replicas (the GPT's tie crosses chunks at S > 1: the norm is then taken
 * after the tie's sum, in pipeline.c). */
static void clip_matrix(const char *text, pw_dataset *d, int64_t batch, int n)
{
    pw_graph *g = parse(text);
    double norms1[8], normsT[8];
    char probe[] = "/tmp/pw_tps_c0_XXXXXX", ref[] = "/tmp/pw_tps_c1_XXXXXX", free_run[] = "/tmp/pw_tps_c2_XXXXXX",
         two[] = "/tmp/pw_tps_c3_XXXXXX", got[] = "/tmp/pw_tps_c4_XXXXXX";
    char *paths[] = {probe, ref, free_run, two, got};
    for (int i = 0; i < 5; i++) tmp_file(paths[i]);
    /* The unclipped norm (a clip that never triggers measures it). */
    run_cfg c = {1, 1, 1, 4, PW_SCHEDULE_1F1B, 1e9, 0, PW_OPTIM_SGD, batch, 0, NULL};
    run_to(g, d, &c, n, probe, norms1);
    const double clip = 0.5 * norms1[0];
    c.clip = clip;
    run_to(g, d, &c, n, ref, norms1);
    for (int s = 0; s < n; s++) cr_assert_gt(norms1[s], clip, "step %d: clipping at %g must trigger", s + 1, clip);
    c.clip = 0;
    run_to(g, d, &c, n, free_run, NULL);
    const double unclipped = max_diff(free_run, ref);
    cr_assert_gt(unclipped, 1e-4, "clipping changed nothing: the test below proves nothing");
    c.clip = clip;
    for (int T = 2; T <= 3; T++) {
        c.T = T;
        run_to(g, d, &c, n, T == 2 ? two : got, normsT);
        for (int s = 0; s < n; s++)
            cr_expect_leq(fabs(normsT[s] - norms1[s]), 1e-6 * norms1[s], "%s T=%d step %d: norm %.9g, T=1 %.9g",
                          g->name, T, s + 1, normsT[s], norms1[s]);
        char what[96];
        snprintf(what, sizeof what, "%s clipped: T=%d against T=1", g->name, T);
        const double w = compare(T == 2 ? two : got, ref, 1e-6, 0, 0, what);
        double dn = 0;
        for (int st = 0; st < n; st++) dn = fmax(dn, fabs(normsT[st] - norms1[st]) / norms1[st]);
        cr_log_info("%s: largest difference %.3g, norms within %.3g relative", what, w, dn);
    }
    static const run_cfg layouts[] = {
        {2, 1, 2, 4, PW_SCHEDULE_1F1B, 0, 0, PW_OPTIM_SGD, 0, 0, NULL},
        {2, 1, 2, 4, PW_SCHEDULE_GPIPE, 0, 0, PW_OPTIM_SGD, 0, 0, NULL},
        {2, 1, 2, 4, PW_SCHEDULE_ZB_H1, 0, 1, PW_OPTIM_SGD, 0, 0, NULL},
        {3, 1, 2, 4, PW_SCHEDULE_1F1B, 0, 1, PW_OPTIM_SGD, 0, 0, NULL},
        {2, 1, 2, 4, PW_SCHEDULE_INTERLEAVED, 0, 0, PW_OPTIM_SGD, 0, 0, NULL},
        {1, 1, 2, 4, PW_SCHEDULE_1F1B, 0, 1, PW_OPTIM_SGD, 0, 0, NULL},
        {2, 2, 2, 2, PW_SCHEDULE_1F1B, 0, 0, PW_OPTIM_SGD, 0, 0, NULL},
        {2, 1, 2, 4, PW_SCHEDULE_1F1B, 0, 1, PW_OPTIM_SGD, 0, 2, NULL}, /* post-validated steps that overlap */
    };
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
        run_cfg l = layouts[i];
        l.clip = clip;
        l.batch = batch;
        run_to(g, d, &l, n, got, normsT);
        char what[128];
        snprintf(what, sizeof what, "%s clipped T=2: S=%d R=%d %s%s%s against S=1", g->name, l.S, l.R,
                 pw_schedule_kind_name(l.kind), l.post_validate ? " post-validated" : "",
                 l.overlap > 1 ? ", overlapping steps" : "");
        compare(got, two, -1, 0, 0, what);
    }
    for (int i = 0; i < 5; i++) unlink(paths[i]);
    pw_graph_destroy(g);
}

Test(tp_state, clipping_mlp, .timeout = TIMEOUT)
{
    pw_dataset *d = images();
    clip_matrix(MLP, d, 32, 3);
    pw_dataset_destroy(d);
}

Test(tp_state, clipping_gpt, .timeout = TIMEOUT)
{
    pw_dataset *d = tokens();
    clip_matrix(GPT, d, 8, 2);
    pw_dataset_destroy(d);
}

/* ------------------------------------------------------------ checkpoints */

/* The one checkpoint under dir (step-NNNNNNNN), its safetensors files. */
static int ckpt_files(const char *dir, char files[4][512])
{
    char step[512];
    DIR *dd = opendir(dir);
    cr_assert_not_null(dd, "%s", dir);
    struct dirent *e;
    step[0] = 0;
    while ((e = readdir(dd)))
        if (!strncmp(e->d_name, "step-", 5)) snprintf(step, sizeof step, "%s/%s", dir, e->d_name);
    closedir(dd);
    cr_assert(step[0], "no checkpoint in %s", dir);
    int n = 0;
    dd = opendir(step);
    cr_assert_not_null(dd);
    while ((e = readdir(dd)) && n < 4) {
        const size_t len = strlen(e->d_name);
        if (len > 12 && !strcmp(e->d_name + len - 12, ".safetensors"))
            snprintf(files[n++], 512, "%s/%s", step, e->d_name);
    }
    closedir(dd);
    return n;
}

static void save_state(pw_pipeline *pl, const pw_graph *g, const pw_dataset *d, const run_cfg *c, const char *dir,
                       int64_t step)
{
    pw_pipeline_config pc = config(g, d, c);
    pw_state_config sc = {.dir = dir, .foreground = 1, .graph = g, .run = pw_state_run_of(&pc, "tokens"),
                          .layout = pw_state_layout_of(pl)};
    pw_state_writer *w = NULL;
    cr_assert_eq(pw_state_writer_create(&sc, &w), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_state_writer_save(w, pl, step), PW_OK, "T=%d: %s", c->T, pw_last_error());
    pw_state_done done;
    int completed = 1;
    while (completed) cr_assert_eq(pw_state_writer_poll(w, 1, &done, &completed), PW_OK, "%s", pw_last_error());
    pw_state_writer_destroy(w);
}

/* Restores the checkpoint under dir into pl; with --compress its
 * error-feedback state too, why (optional) saying why not. */
static void resume_why(pw_pipeline *pl, const pw_graph *g, const pw_dataset *d, const run_cfg *c, const char *dir,
                       char *why, size_t why_n)
{
    pw_pipeline_config pc = config(g, d, c);
    pw_state_run run = pw_state_run_of(&pc, "tokens");
    pw_state *s = NULL;
    cr_assert_eq(pw_state_open(dir, &s), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_state_check(s, g, &run), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_state_restore(s, pl, c->R), PW_OK, "T=%d: %s", c->T, pw_last_error());
    if (why) cr_assert_eq(pw_state_restore_compress(s, pl, why, why_n), PW_OK, "T=%d: %s", c->T, pw_last_error());
    pw_state_close(s);
}

static void resume(pw_pipeline *pl, const pw_graph *g, const pw_dataset *d, const run_cfg *c, const char *dir)
{
    resume_why(pl, g, d, c, dir, NULL, 0);
}

/* AdamW, 2 steps at T = a, a checkpoint, 2 more at T = b, against 4 steps
 * at T = b unbroken: the same bits when a = b (resuming is exact), within
 * AdamW's T tolerance otherwise. The checkpoint written at a, restored at
 * b and written again is the same tensors bit for bit (parameters and
 * both moments: the parts tile the full tensors exactly). */
Test(tp_state, checkpoints_resume_at_any_T, .timeout = TIMEOUT)
{
    pw_graph *g = parse(GPT);
    pw_dataset *d = tokens();
    char root[] = "/tmp/pw_tps_ck_XXXXXX";
    cr_assert_not_null(mkdtemp(root));
    char unbroken[4][600], got[600];
    for (int T = 1; T <= 3; T++) {
        const run_cfg c = {2, 1, T, 4, PW_SCHEDULE_1F1B, 0, 0, PW_OPTIM_ADAMW, 8, 0, NULL};
        snprintf(unbroken[T], sizeof unbroken[T], "%s/unbroken%d.safetensors", root, T);
        run_to(g, d, &c, 4, unbroken[T], NULL);
    }
    snprintf(got, sizeof got, "%s/got.safetensors", root);
    static const int pairs[][2] = {{2, 2}, {2, 1}, {2, 3}, {1, 2}, {3, 2}, {1, 3}};
    for (size_t k = 0; k < sizeof pairs / sizeof pairs[0]; k++) {
        const int a = pairs[k][0], b = pairs[k][1];
        /* different stage counts on the two sides too */
        const run_cfg ca = {2, 1, a, 4, PW_SCHEDULE_1F1B, 0, 0, PW_OPTIM_ADAMW, 8, 0, NULL};
        const run_cfg cb = {k % 2 ? 1 : 3, 1, b, 4, PW_SCHEDULE_ZB_H1, 0, 0, PW_OPTIM_ADAMW, 8, 0, NULL};
        char d1[600], d2[600];
        snprintf(d1, sizeof d1, "%s/a%zu", root, k);
        snprintf(d2, sizeof d2, "%s/b%zu", root, k);
        pw_pipeline *pa = make(g, d, &ca);
        steps(pa, 2, &ca, NULL);
        save_state(pa, g, d, &ca, d1, 2);
        pw_pipeline_destroy(pa);
        pw_pipeline *pb = make(g, d, &cb);
        resume(pb, g, d, &cb, d1);
        save_state(pb, g, d, &cb, d2, 2);
        char fa[4][512], fb[4][512];
        const int na = ckpt_files(d1, fa), nb = ckpt_files(d2, fb);
        cr_assert_eq(na, 2, "a model file and an optimizer file");
        cr_assert_eq(nb, na);
        for (int i = 0; i < na; i++) {
            char what[160];
            snprintf(what, sizeof what, "written at T=%d, restored at T=%d and written: %s", a, b,
                     strrchr(fa[i], '/') + 1);
            const char *twin = strcmp(strrchr(fa[i], '/'), strrchr(fb[0], '/')) ? fb[1] : fb[0];
            compare(twin, fa[i], -1, 0, 0, what);
        }
        steps(pb, 2, &cb, NULL);
        cr_assert_eq(pw_pipeline_save(pb, got, NULL), PW_OK, "%s", pw_last_error());
        pw_pipeline_destroy(pb);
        char what[128];
        snprintf(what, sizeof what, "AdamW: 2 steps at T=%d, resumed at T=%d for 2, against 4 at T=%d", a, b, b);
        if (a == b) compare(got, unbroken[b], -1, 0, 0, what);
        else cr_log_info("%s: largest difference %.3g", what,
                         compare(got, unbroken[b], 1e-6, 0.01, 4 * 3e-3, what)); /* 1 %, lr x steps */
    }
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    cr_assert_eq(system(cmd), 0);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ------------------------------------------------------------ moving cuts */

/* Moves a 2-stage pipeline's cut to other boundaries: three chunks' worth
 * of them, the first (it must move). Returns the new cut. */
static int move_to_other_cuts(pw_pipeline **pl, const pw_graph *g)
{
    int three[4];
    cr_assert(tp_cuts(g, 3, three));
    int cuts[3] = {0, three[1], g->n_nodes};
    cr_assert_neq(cuts[1], pw_pipeline_partition(*pl)->begin[1], "the move must move");
    pw_repartition_info info;
    cr_assert_eq(pw_pipeline_repartition(pl, cuts, 3, &info), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_pipeline_partition(*pl)->begin[1], cuts[1]);
    return cuts[1];
}

/* pw_pipeline_repartition at T = 2 in one process (docs/parallelism.md,
 * "Moving the cuts at T > 1"): the GPT on 2 stages, AdamW with clipping,
 * moved after step 2 to other cuts and after step 3 to a cut inside an
 * attention pair (moved to the nearest boundary outside it, as a first
 * partition's cut is): after 5 steps the bytes of the unbroken run. Every
 * rank's parts and optimizer state move, so any rank's left behind would
 * show here. */
Test(tp_state, repartition_at_T2, .timeout = TIMEOUT)
{
    pw_graph *g = parse(GPT);
    pw_dataset *d = tokens();
    char ref[] = "/tmp/pw_tps_rb0_XXXXXX", got[] = "/tmp/pw_tps_rb1_XXXXXX";
    tmp_file(ref);
    tmp_file(got);
    const run_cfg c = {2, 1, 2, 4, PW_SCHEDULE_1F1B, 0.05, 0, PW_OPTIM_ADAMW, 8, 0, NULL};
    run_to(g, d, &c, 5, ref, NULL);
    pw_pipeline *pl = make(g, d, &c);
    steps(pl, 2, &c, NULL);
    const int first = move_to_other_cuts(&pl, g);
    steps(pl, 1, &c, NULL);
    /* a cut between an attention's c_attn (column) and its c_proj (row) */
    int att = -1; /* the second block's attention: qkv, split, comes into it */
    for (int i = 0; i < g->n_nodes; i++)
        if (g->nodes[i].op == PW_OP_CAUSAL_ATTENTION) att = i;
    cr_assert_gt(att, first, "the second attention lies after the first cut");
    int cuts[3] = {0, att, g->n_nodes};
    pw_repartition_info info;
    cr_assert_eq(pw_pipeline_repartition(&pl, cuts, 3, &info), PW_OK, "%s", pw_last_error());
    const int at = pw_pipeline_partition(pl)->begin[1];
    cr_assert(at != att && at >= att - 3 && at <= att + 3, "the cut inside the pair went to %d (asked %d)", at, att);
    steps(pl, 2, &c, NULL);
    cr_assert_eq(pw_pipeline_save(pl, got, NULL), PW_OK, "%s", pw_last_error());
    pw_pipeline_destroy(pl);
    compare(got, ref, -1, 0, 0, "T=2, moved twice, against the unbroken run");
    unlink(ref);
    unlink(got);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ------------------------------------------------------------ --compress */

/* The checkpoint file of `kind` ("compress") under dir. */
static void ckpt_file(const char *dir, const char *kind, char *out)
{
    char files[4][512];
    const int n = ckpt_files(dir, files);
    out[0] = 0;
    for (int i = 0; i < n; i++)
        if (!strncmp(strrchr(files[i], '/') + 1, kind, strlen(kind))) snprintf(out, 512, "%.500s", files[i]);
    cr_assert(out[0], "no %s file under %s", kind, dir);
}

/* Whether a tensor of file `path` has a name ending in `tail`. */
static int has_tensor_ending(const char *path, const char *tail)
{
    pw_safetensors *f = NULL;
    cr_assert_eq(pw_safetensors_open(path, &f), PW_OK, "%s", pw_last_error());
    int found = 0;
    for (int i = 0; i < pw_safetensors_count(f) && !found; i++) {
        pw_st_tensor t;
        cr_assert_eq(pw_safetensors_at(f, i, &t), PW_OK);
        const size_t n = strlen(t.name), k = strlen(tail);
        found = n >= k && !strcmp(t.name + n - k, tail);
    }
    pw_safetensors_close(f);
    return found;
}

/* PowerSGD's residuals written at T = 2 (`two`: "<name>.residual") and
 * written again at T (`got`: the same names at T > 1; at T = 1 "<name>",
 * the residual then Q): the same floats. */
static void same_residuals(const char *got, const char *two, int T, const char *mode)
{
    pw_safetensors *fa = NULL, *fb = NULL;
    cr_assert_eq(pw_safetensors_open(got, &fa), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_safetensors_open(two, &fb), PW_OK, "%s", pw_last_error());
    int n = 0;
    for (int i = 0; i < pw_safetensors_count(fb); i++) {
        pw_st_tensor tb, ta;
        cr_assert_eq(pw_safetensors_at(fb, i, &tb), PW_OK);
        const char *dot = strstr(tb.name, ".residual");
        if (!dot) continue;
        char name[512];
        snprintf(name, sizeof name, "%.*s", T > 1 ? (int)strlen(tb.name) : (int)(dot - tb.name), tb.name);
        if (T == 1 && pw_safetensors_get(fa, name, &ta) != PW_OK) continue; /* uncompressed at T = 1 */
        cr_assert_eq(pw_safetensors_get(fa, name, &ta), PW_OK, "%s at T=%d: no '%s'", mode, T, name);
        cr_assert_geq(ta.nbytes, tb.nbytes, "%s at T=%d: '%s' is short", mode, T, name);
        cr_expect_eq(memcmp(ta.data, tb.data, tb.nbytes), 0, "%s: '%s' restored at T=%d differs", mode, name, T);
        n++;
    }
    cr_assert_gt(n, 0, "%s at T=%d: no residual compared", mode, T);
    cr_log_info("%s: %d residuals written at T=2 restored at T=%d", mode, n, T);
    pw_safetensors_close(fa);
    pw_safetensors_close(fb);
}

/* --compress at T = 2 with 2 replicas (docs/distributed.md, "The
 * error-feedback state is in checkpoints and moves with the cuts"): the
 * GPT (every kind of split, the tied table) 2 steps on 2 stages, a
 * checkpoint, resumed on 3 stages for 2 more: the bytes of 4 unbroken steps
 * on 3. Resumed without the state (from zero) it differs, so the state is
 * what makes it exact. The state restored and written again is the same
 * tensors; top-k's (a residual per element, gathered into the full tensor)
 * restores at T = 1 and T = 3 to the same tensors too, PowerSGD's to the
 * same residuals (its Q is per tensor rank: the seed's there). */
static void compressed_resume(const char *mode)
{
    pw_graph *g = parse(GPT);
    pw_dataset *d = tokens();
    const int topk = !strncmp(mode, "topk", 4);
    char root[] = "/tmp/pw_tps_z_XXXXXX";
    cr_assert_not_null(mkdtemp(root));
    char unbroken[600], got[600], fresh[600], d1[600], d2[600], z1[512], z2[512];
    snprintf(unbroken, sizeof unbroken, "%s/unbroken.safetensors", root);
    snprintf(got, sizeof got, "%s/got.safetensors", root);
    snprintf(fresh, sizeof fresh, "%s/fresh.safetensors", root);
    const run_cfg ca = {2, 2, 2, 2, PW_SCHEDULE_1F1B, 0, 0, PW_OPTIM_SGD, 8, 0, mode};
    const run_cfg cb = {3, 2, 2, 2, PW_SCHEDULE_ZB_H1, 0, 0, PW_OPTIM_SGD, 8, 0, mode};
    run_to(g, d, &cb, 4, unbroken, NULL);
    snprintf(d1, sizeof d1, "%s/a", root);
    pw_pipeline *pa = make(g, d, &ca);
    steps(pa, 2, &ca, NULL);
    save_state(pa, g, d, &ca, d1, 2);
    pw_pipeline_destroy(pa);
    ckpt_file(d1, "compress", z1);
    /* the tied table's second use, replica 1 (its residual; PowerSGD's Q of tensor rank 1 too) */
    cr_assert(has_tensor_ending(z1, topk ? "wte.weight.compress.replica1.use1" : "wte.weight.compress.replica1.use1.residual"),
              "%s: %s lacks the tied table's state", mode, z1);
    cr_assert(topk || has_tensor_ending(z1, "wte.weight.compress.replica1.use1.Q.T2.rank1"), "%s: no Q of rank 1", mode);
    for (int with = 1; with >= 0; with--) {
        pw_pipeline *pb = make(g, d, &cb);
        char why[600] = "";
        if (with) {
            resume_why(pb, g, d, &cb, d1, why, sizeof why);
            cr_assert_eq(why[0], 0, "%s at T=2: the state is not restored: %s", mode, why);
            snprintf(d2, sizeof d2, "%s/b", root);
            save_state(pb, g, d, &cb, d2, 2);
            ckpt_file(d2, "compress", z2);
            compare(z2, z1, -1, 0, 0, "the compression state restored at T=2 and written again");
        } else {
            resume(pb, g, d, &cb, d1);
        }
        steps(pb, 2, &cb, NULL);
        cr_assert_eq(pw_pipeline_save(pb, with ? got : fresh, NULL), PW_OK, "%s", pw_last_error());
        pw_pipeline_destroy(pb);
    }
    char what[128];
    snprintf(what, sizeof what, "%s at T=2, R=2: resumed with its state against the unbroken run", mode);
    compare(got, unbroken, -1, 0, 0, what);
    cr_assert_gt(max_diff(fresh, unbroken), 0, "%s: the state from zero changes nothing: the test proves nothing",
                 mode);
    /* At another T. */
    for (int T = 1; T <= 3; T += 2) {
        const run_cfg cc = {2, 2, T, 2, PW_SCHEDULE_1F1B, 0, 0, PW_OPTIM_SGD, 8, 0, mode};
        pw_pipeline *pc = make(g, d, &cc);
        char why[600] = "", dT[600], zT[512];
        resume_why(pc, g, d, &cc, d1, why, sizeof why);
        if (topk) {
            cr_assert_eq(why[0], 0, "%s written at T=2, at T=%d: not restored: %s", mode, T, why);
            snprintf(dT, sizeof dT, "%s/T%d", root, T);
            save_state(pc, g, d, &cc, dT, 2);
            ckpt_file(dT, "compress", zT);
            snprintf(what, sizeof what, "%s written at T=2, restored at T=%d and written", mode, T);
            compare(zT, z1, -1, 0, 0, what);
        } else { /* the residuals restored, Q from the seed */
            cr_assert_eq(why[0], 0, "%s written at T=2, at T=%d: not restored: %s", mode, T, why);
            snprintf(dT, sizeof dT, "%s/T%d", root, T);
            save_state(pc, g, d, &cc, dT, 2);
            ckpt_file(dT, "compress", zT);
            same_residuals(zT, z1, T, mode);
            if (T == 1) { /* and back: T = 1's tensors (residual then Q) restored at T = 2 */
                pw_pipeline *p2 = make(g, d, &ca);
                char d12[600], z12[512];
                resume_why(p2, g, d, &ca, dT, why, sizeof why);
                cr_assert_eq(why[0], 0, "%s written at T=1, at T=2: not restored: %s", mode, why);
                snprintf(d12, sizeof d12, "%s/T1to2", root);
                save_state(p2, g, d, &ca, d12, 2);
                ckpt_file(d12, "compress", z12);
                same_residuals(z12, z1, 2, mode);
                pw_pipeline_destroy(p2);
            }
        }
        pw_pipeline_destroy(pc);
    }
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    cr_assert_eq(system(cmd), 0);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

Test(tp_state, compress_topk_resume_at_T2, .timeout = TIMEOUT) { compressed_resume("topk:0.1"); }

Test(tp_state, compress_powersgd_resume_at_T2, .timeout = TIMEOUT) { compressed_resume("powersgd:2"); }

/* A move of the cuts at T = 2 with --compress and 2 replicas: every tensor
 * rank's part of the state moves with its use's node, so after 4 steps
 * (moved after 2) the bytes of the unbroken run; without it (the state
 * restarted from zero at the move) they differ. */
static void compressed_move(const char *mode)
{
    pw_graph *g = parse(GPT);
    pw_dataset *d = tokens();
    char ref[] = "/tmp/pw_tps_zm0_XXXXXX", got[] = "/tmp/pw_tps_zm1_XXXXXX";
    tmp_file(ref);
    tmp_file(got);
    const run_cfg c = {2, 2, 2, 2, PW_SCHEDULE_1F1B, 0, 0, PW_OPTIM_SGD, 8, 0, mode};
    run_to(g, d, &c, 4, ref, NULL);
    pw_pipeline *pl = make(g, d, &c);
    steps(pl, 2, &c, NULL);
    move_to_other_cuts(&pl, g);
    steps(pl, 2, &c, NULL);
    cr_assert_eq(pw_pipeline_save(pl, got, NULL), PW_OK, "%s", pw_last_error());
    pw_pipeline_destroy(pl);
    char what[128];
    snprintf(what, sizeof what, "%s at T=2, R=2: moved after step 2, against the unbroken run", mode);
    compare(got, ref, -1, 0, 0, what);
    unlink(ref);
    unlink(got);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

Test(tp_state, compress_topk_move_at_T2, .timeout = TIMEOUT) { compressed_move("topk:0.1"); }

Test(tp_state, compress_powersgd_move_at_T2, .timeout = TIMEOUT) { compressed_move("powersgd:2"); }
