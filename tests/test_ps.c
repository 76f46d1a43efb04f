/* The parameter server's pieces that run in one process (stages/train/ps.h):
 * the sharding of parameters over servers, and the refusals. The servers
 * themselves run under mpirun: tests/mpi/mpi_driver.c (PW_MPI_ONLY=ps). */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "pipewright.h"

static const char *MLP = "graph t\n"
                         "input x : f32[16]\n"
                         "label y : i32[]\n"
                         "a = linear(x, out=64)\n"
                         "b = relu(a)\n"
                         "c = linear(b, out=32)\n"
                         "d = relu(c)\n"
                         "e = linear(d, out=4)\n"
                         "loss = softmax_cross_entropy(e, y)\n";

static pw_graph *parse(const char *text)
{
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_string(text, strlen(text), "t.graph", &g), PW_OK, "%s", pw_last_error());
    return g;
}

/* Every parameter on one server in range; the same answer twice; the
 * servers' bytes within the largest parameter of each other (greedy by
 * bytes, largest first). */
Test(ps, assign_balances_by_bytes)
{
    pw_graph *g = parse(MLP);
    cr_assert_eq(g->n_params, 6);
    for (int K = 1; K <= 8; K++) {
        int a[6], b[6];
        pw_ps_assign(g, K, a);
        pw_ps_assign(g, K, b);
        cr_assert_arr_eq(a, b, sizeof a, "K=%d: not deterministic", K);
        int64_t load[8] = {0}, biggest = 0;
        for (int p = 0; p < g->n_params; p++) {
            cr_assert(a[p] >= 0 && a[p] < K, "K=%d: parameter %d on server %d", K, p, a[p]);
            const int64_t bytes = pw_shape_numel(&g->params[p].shape) * 4;
            load[a[p]] += bytes;
            if (bytes > biggest) biggest = bytes;
        }
        int64_t lo = INT64_MAX, hi = 0;
        for (int k = 0; k < K; k++) {
            if (load[k] < lo) lo = load[k];
            if (load[k] > hi) hi = load[k];
        }
        cr_assert(hi - lo <= biggest, "K=%d: servers hold %lld to %lld bytes", K, (long long)lo, (long long)hi);
    }
    /* K = 2: the 64x16 and 32x64 weights (4 KiB, 8 KiB) go to different servers. */
    int a[6];
    pw_ps_assign(g, 2, a);
    int w1 = -1, w2 = -1;
    for (int p = 0; p < g->n_params; p++) {
        if (!strcmp(g->params[p].name, "a.weight")) w1 = a[p];
        if (!strcmp(g->params[p].name, "c.weight")) w2 = a[p];
    }
    cr_assert(w1 >= 0 && w2 >= 0 && w1 != w2, "a.weight on %d, c.weight on %d", w1, w2);
    pw_graph_destroy(g);
}

/* Without a transport that has the servers, a pipeline refuses them with
 * a message saying what is missing; a staleness without servers too. */
Test(ps, pipeline_needs_servers)
{
    pw_graph *g = parse(MLP);
    pw_synthetic_config sc0 = {.n = 64, .sample_shape = {.ndim = 1, .d = {16}}, .n_classes = 4, .seed = 3,
                               .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc0, &d), PW_OK, "%s", pw_last_error());
    pw_pipeline_config c = pw_pipeline_defaults();
    c.graph = g;
    c.train = d;
    c.batch = 16;
    c.replicas = 2;
    c.pin = 0;
    c.ps_servers = 1;
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&c, &pl), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "--servers 1"), "%s", pw_last_error());
    c.ps_servers = 0;
    c.ps_staleness = 2;
    cr_assert_eq(pw_pipeline_create(&c, &pl), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "staleness"), "%s", pw_last_error());
    pw_ps_server_config sc = {.graph = g};
    cr_assert_eq(pw_ps_serve(&sc), PW_ERR_INVALID_ARG);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* PW_TEST_SLOW's one-process form (wN: world rank N) and its /EVERY, used
 * to measure staleness with a slowed worker; read once per process (each
 * Criterion test is a process of its own). */
Test(ps, slow_hook_per_process)
{
    setenv("PW_TEST_SLOW", "w3:2@2/3,1:5", 1);
    cr_assert_eq(pw_test_slow_factor_world(3, 1), 1.0);
    cr_assert_eq(pw_test_slow_factor_world(3, 2), 2.0);
    cr_assert_eq(pw_test_slow_factor_world(3, 3), 1.0);
    cr_assert_eq(pw_test_slow_factor_world(3, 5), 2.0);
    cr_assert_eq(pw_test_slow_factor_world(2, 2), 1.0);
    cr_assert_eq(pw_test_slow_factor_world(1, 2), 1.0, "a pipeline rank's entry is not a world rank's");
    cr_assert_eq(pw_test_slow_factor(1, 1), 5.0);
    cr_assert_eq(pw_test_slow_factor(3, 2), 1.0, "a world rank's entry is not a pipeline rank's");
}

/* --staleness-lr inverse (Zhang et al. 2016) on hand-made versions: the
 * update that makes version `step` from gradients computed on read[k] has
 * staleness tau_k = step - read[k]; the learning rate is divided by their
 * mean. A synchronous step (every tau 1) is exactly 1.0, so the bits of a
 * synchronous run stay; none is always 1.0. */
Test(ps, stale_lr_inverse_divides_by_mean_staleness)
{
    const int64_t sync2[2] = {9, 9}, mixed[2] = {8, 9}, four[4] = {6, 6, 6, 6}, three[3] = {5, 9, 7};
    cr_assert_eq(pw_ps_stale_lr_factor(PW_PS_STALE_LR_INVERSE, 10, sync2, 2), 1.0);
    cr_assert_eq(pw_ps_stale_lr_factor(PW_PS_STALE_LR_INVERSE, 10, mixed, 2), 2.0 / 3.0); /* tau 2, 1 */
    cr_assert_eq(pw_ps_stale_lr_factor(PW_PS_STALE_LR_INVERSE, 10, four, 4), 0.25);       /* tau 4 x 4 */
    cr_assert_eq(pw_ps_stale_lr_factor(PW_PS_STALE_LR_INVERSE, 10, three, 3), 1.0 / 3.0); /* tau 5, 1, 3 */
    cr_assert_eq(pw_ps_stale_lr_factor(PW_PS_STALE_LR_INVERSE, 1, (const int64_t[]){0}, 1), 1.0);
    cr_assert_eq(pw_ps_stale_lr_factor(PW_PS_STALE_LR_INVERSE, 7, (const int64_t[]){2}, 1), 0.2);
    for (int R = 1; R <= 4; R++) cr_assert_eq(pw_ps_stale_lr_factor(PW_PS_STALE_LR_NONE, 10, four, R), 1.0);
    /* The factor the server puts on the learning rate: an SGD step at
     * lr × factor moves the parameter by exactly that (lr 0.5, tau 2, 2). */
    pw_optim_config oc = pw_optim_defaults(PW_OPTIM_SGD);
    oc.lr = 0.5f;
    oc.momentum = 0.0f;
    oc.lr = (float)(oc.lr * pw_ps_stale_lr_factor(PW_PS_STALE_LR_INVERSE, 5, (const int64_t[]){3, 3}, 2));
    float p = 1.0f, g = 1.0f, st = 0.0f;
    pw_optim_update(&oc, 5, &p, &g, &st, 1, 0);
    cr_assert_eq(p, 0.75f, "%g", (double)p);
    pw_ps_stale_lr r = PW_PS_STALE_LR_NONE;
    cr_assert_eq(pw_ps_stale_lr_parse("inverse", &r), PW_OK);
    cr_assert_eq(r, PW_PS_STALE_LR_INVERSE);
    cr_assert_str_eq(pw_ps_stale_lr_name(r), "inverse");
    cr_assert_eq(pw_ps_stale_lr_parse("none", &r), PW_OK);
    cr_assert_eq(r, PW_PS_STALE_LR_NONE);
    cr_assert_eq(pw_ps_stale_lr_parse("sqrt", &r), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "--staleness-lr: 'sqrt'"), "%s", pw_last_error());
    pw_ps_server_config zero = {0}; /* the default */
    cr_assert_eq(zero.staleness_lr, PW_PS_STALE_LR_INVERSE);
}
