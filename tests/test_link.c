/* Tests for the slow link and --allreduce auto's choice (runtime/link.h):
 * the link's arrival times follow the model; a throttled all-reduce gives
 * the same bytes as the one it wraps and takes at least its modelled link
 * time (no upper bound beyond a generous one: the machine is shared); an
 * abort ends its wait; auto picks by alpha + beta·bytes on hand-made
 * tables; when the hierarchical all-reduce matches the tree.
 *
 * Every test has the same .timeout (see test_collectives.c). */
#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/collective.h"
#include "runtime/link.h"
#include "runtime/trace.h" /* pw_now_ns */

#include "tests/tsan_criterion.h"

#define TIMEOUT 60

/* ------------------------------------------------------------ the model */

Test(link, clock_serialises_messages_and_adds_latency, .timeout = TIMEOUT)
{
    pw_link l = {.latency_s = 1e-3, .bandwidth = 1e6}; /* 1 ms, 1 MB/s */
    pw_link_clock c = {0};
    /* 1000 bytes at t = 0: leaves at 0, busy 1 ms, arrives at 2 ms. */
    cr_expect_eq(pw_link_clock_due(&c, &l, 0, 1000), 2000000);
    /* A second one at t = 0 waits for the link: leaves at 1 ms, arrives at 3 ms. */
    cr_expect_eq(pw_link_clock_due(&c, &l, 0, 1000), 3000000);
    /* Much later: the link is idle again. */
    cr_expect_eq(pw_link_clock_due(&c, &l, 10000000, 0), 11000000);
    pw_link off = {0};
    cr_expect_eq(pw_link_clock_due(&c, &off, 42, 1 << 20), 42);
    cr_expect_not(pw_link_on(&off));
    cr_expect_not(pw_link_on(NULL));
}

Test(link, allreduce_times_by_algorithm, .timeout = TIMEOUT)
{
    pw_link l = {.latency_s = 1e-4, .bandwidth = 1e8};
    const double b = 4e6; /* 4 MB over 4 members: 1 MB segments, 10 ms each */
    cr_expect_float_eq(pw_link_allreduce_s(&l, PW_ALLREDUCE_TREE, 4, 1, b), 2 * (3 * 0.01 + 1e-4), 1e-12);
    cr_expect_float_eq(pw_link_allreduce_s(&l, PW_ALLREDUCE_RING, 4, 1, b), 6 * (0.01 + 1e-4), 1e-12);
    cr_expect_float_eq(pw_link_allreduce_s(&l, PW_ALLREDUCE_MPI, 4, 1, b), 6 * (0.01 + 1e-4), 1e-12);
    /* Two hosts: only the leaders' exchange of half the bucket each way. */
    cr_expect_float_eq(pw_link_allreduce_s(&l, PW_ALLREDUCE_HIER, 4, 2, b), 2 * (0.02 + 1e-4), 1e-12);
    cr_expect_eq(pw_link_allreduce_s(&l, PW_ALLREDUCE_HIER, 4, 1, b), 0.0);
    cr_expect_eq(pw_link_allreduce_s(&l, PW_ALLREDUCE_TREE, 1, 1, b), 0.0);
}

/* ----------------------------------------------- a throttled all-reduce */

typedef struct job {
    pw_coll c;
    float *x;
    int64_t n;
    atomic_int *abort;
    pw_status st;
    double took_s;
} job;

static void *member(void *arg)
{
    job *j = arg;
    pw_span sp = {j->x, j->n};
    int64_t t0 = pw_now_ns();
    j->st = pw_coll_allreduce(&j->c, &sp, 1, j->abort);
    j->took_s = (double)(pw_now_ns() - t0) / 1e9;
    return NULL;
}

/* n members sum L floats, plainly and through the link; same bytes, and
 * the throttled call lasts at least its link time. */
static void throttled_case(int n, int64_t L, pw_link l, pw_allreduce_algo algo)
{
    pw_shm_group *g[2];
    float *x[2][4];
    for (int v = 0; v < 2; v++) {
        cr_assert_eq(pw_shm_group_create(n, &g[v]), PW_OK);
        pw_shm_group_set_algo(g[v], algo == PW_ALLREDUCE_RING ? PW_COLL_RING : PW_COLL_TREE);
        for (int k = 0; k < n; k++) {
            x[v][k] = malloc(sizeof(float) * (size_t)L);
            for (int64_t i = 0; i < L; i++) x[v][k][i] = (float)(0.1 * (k + 1) + 1e-3 * (double)(i % 97));
        }
    }
    job jobs[2][4];
    pthread_t th[2][4];
    for (int v = 0; v < 2; v++) {
        for (int k = 0; k < n; k++) {
            pw_coll m = pw_shm_group_member(g[v], k);
            jobs[v][k] = (job){.x = x[v][k], .n = L};
            if (v == 0) jobs[v][k].c = m;
            else cr_assert_eq(pw_coll_throttle_create(&m, &l, algo, 1, &jobs[v][k].c), PW_OK);
            pthread_create(&th[v][k], NULL, member, &jobs[v][k]);
        }
        for (int k = 0; k < n; k++) pthread_join(th[v][k], NULL);
    }
    const double want = pw_link_allreduce_s(&l, algo, n, 1, (double)L * sizeof(float));
    for (int k = 0; k < n; k++) {
        cr_expect_eq(jobs[0][k].st, PW_OK);
        cr_expect_eq(jobs[1][k].st, PW_OK);
        cr_expect_eq(memcmp(x[0][k], x[1][k], sizeof(float) * (size_t)L), 0, "member %d: throttling changed the sum", k);
        cr_expect_geq(jobs[1][k].took_s, want, "member %d took %.4f s, the link alone needs %.4f s", k,
                      jobs[1][k].took_s, want);
        cr_expect_lt(jobs[1][k].took_s, want + 5.0, "member %d took %.3f s for a %.3f s link", k, jobs[1][k].took_s,
                     want);
        pw_coll_throttle_destroy(&jobs[1][k].c);
        free(x[0][k]);
        free(x[1][k]);
    }
    pw_shm_group_destroy(g[0]);
    pw_shm_group_destroy(g[1]);
}

Test(link, throttled_tree_same_bytes_and_at_least_the_link_time, .timeout = TIMEOUT)
{
    /* 3 members, 300 K floats (1.2 MB) at 50 MB/s + 2 ms: 2·(2·0.4 MB/50 MB/s + 2 ms) = 36 ms. */
    throttled_case(3, 300000, (pw_link){.latency_s = 2e-3, .bandwidth = 50e6}, PW_ALLREDUCE_TREE);
}

Test(link, throttled_ring_same_bytes_and_at_least_the_link_time, .timeout = TIMEOUT)
{
    throttled_case(4, 100003, (pw_link){.latency_s = 1e-3, .bandwidth = 20e6}, PW_ALLREDUCE_RING);
    throttled_case(2, 7, (pw_link){.latency_s = 5e-3, .bandwidth = 0}, PW_ALLREDUCE_RING); /* latency only */
}

Test(link, abort_ends_the_links_wait, .timeout = TIMEOUT)
{
    pw_shm_group *g;
    cr_assert_eq(pw_shm_group_create(1, &g), PW_OK);
    pw_coll m = pw_shm_group_member(g, 0), slow;
    pw_link l = {.latency_s = 30.0}; /* far longer than the test */
    cr_assert_eq(pw_coll_throttle_create(&m, &l, PW_ALLREDUCE_TREE, 1, &slow), PW_OK);
    atomic_int abort;
    atomic_init(&abort, 1);
    float x[4] = {1, 2, 3, 4};
    pw_span sp = {x, 4};
    /* One member: no link time. */
    cr_expect_eq(pw_coll_allreduce(&slow, &sp, 1, &abort), PW_OK);
    int64_t t0 = pw_now_ns();
    cr_expect_eq(pw_link_sleep_until(t0 + 30000000000LL, &abort, "test"), PW_ERR_TIMEOUT);
    cr_expect_lt(pw_now_ns() - t0, 1000000000LL);
    pw_coll_throttle_destroy(&slow);
    pw_shm_group_destroy(g);
}

/* ---------------------------------------------------------------- auto */

Test(link, auto_picks_by_alpha_beta, .timeout = TIMEOUT)
{
    /* A: low latency, slow; B: high latency, fast. Crossover at
     * (100e-6 - 10e-6) / (1e-9 - 0.25e-9) = 120000 bytes. */
    const pw_ab t[2] = {{10e-6, 1e-9}, {100e-6, 0.25e-9}};
    cr_expect_eq(pw_ab_pick(t, NULL, 2, 1000), 0);
    cr_expect_eq(pw_ab_pick(t, NULL, 2, 119000), 0);
    cr_expect_eq(pw_ab_pick(t, NULL, 2, 121000), 1);
    cr_expect_eq(pw_ab_pick(t, NULL, 2, 1e9), 1);
    const int usable[2] = {1, 0};
    cr_expect_eq(pw_ab_pick(t, usable, 2, 1e9), 0);
    const int none[2] = {0, 0};
    cr_expect_eq(pw_ab_pick(t, none, 2, 1e9), -1);
    /* A tie goes to the first. */
    const pw_ab same[3] = {{1e-5, 1e-9}, {1e-5, 1e-9}, {2e-5, 1e-9}};
    cr_expect_eq(pw_ab_pick(same, NULL, 3, 4096), 0);
    /* Three lines: each wins a range. */
    const pw_ab three[3] = {{5e-6, 4e-9}, {20e-6, 1e-9}, {200e-6, 0.1e-9}};
    cr_expect_eq(pw_ab_pick(three, NULL, 3, 1000), 0);
    cr_expect_eq(pw_ab_pick(three, NULL, 3, 50000), 1);
    cr_expect_eq(pw_ab_pick(three, NULL, 3, 1e7), 2);
}

Test(link, ab_fit_through_two_points, .timeout = TIMEOUT)
{
    pw_ab ab = pw_ab_fit(4096, 30e-6 + 4096 * 2e-9, 4194304, 30e-6 + 4194304 * 2e-9);
    cr_expect_float_eq(ab.alpha, 30e-6, 1e-12);
    cr_expect_float_eq(ab.beta, 2e-9, 1e-18);
    /* Noise that makes the big call faster: beta clamps to 0, alpha to the small time. */
    ab = pw_ab_fit(4096, 50e-6, 4194304, 40e-6);
    cr_expect_eq(ab.beta, 0.0);
    cr_expect_float_eq(ab.alpha, 50e-6, 1e-15);
}

/* An auto endpoint with a hand-made table sends each bucket to the
 * candidate the table picks (candidates here count their calls). */
static int calls[2];
static pw_status count_allreduce(void *self, int member, const pw_span *spans, int n_spans, const atomic_int *abort)
{
    (void)member, (void)spans, (void)n_spans, (void)abort;
    calls[(int)(intptr_t)self]++;
    return PW_OK;
}
static pw_status count_allgather(void *self, int member, double v, double *out, const atomic_int *abort)
{
    (void)self, (void)member, (void)abort;
    out[0] = v;
    return PW_OK;
}
static const pw_coll_i count_i = {.name = "count", .allreduce = count_allreduce, .allgather_f64 = count_allgather};

Test(link, auto_routes_buckets_by_the_table, .timeout = TIMEOUT)
{
    pw_coll cand[2] = {{.vt = &count_i, .self = (void *)0, .n_members = 1},
                       {.vt = &count_i, .self = (void *)1, .n_members = 1}};
    const char *names[2] = {"a", "b"};
    const pw_ab table[2] = {{10e-6, 1e-9}, {100e-6, 0.25e-9}};
    pw_coll au;
    cr_assert_eq(pw_coll_auto_create(&(pw_coll_auto_cfg){.cands = cand, .names = names, .table = table, .n = 2},
                                     &au), PW_OK);
    cr_expect_eq(pw_coll_auto_choice(&au, 4 * 1000), 0);
    cr_expect_eq(pw_coll_auto_choice(&au, 4 * 1e6), 1);
    float x[1000] = {0};
    pw_span small = {x, 1000}, big = {x, 1000000};
    calls[0] = calls[1] = 0;
    cr_expect_eq(pw_coll_allreduce(&au, &small, 1, NULL), PW_OK);
    cr_expect_eq(calls[0], 1);
    cr_expect_eq(calls[1], 0);
    cr_expect_eq(pw_coll_allreduce(&au, &big, 1, NULL), PW_OK); /* the counter reads no floats */
    cr_expect_eq(calls[1], 1);
    /* Measuring replaces the table with member 0's lines (here: ours). */
    cr_expect_eq(pw_coll_auto_measure(&au, 256, 4096, 2, NULL), PW_OK);
    pw_coll_auto_destroy(&au);
}

/* ------------------------------------------------------- hierarchical */

Test(link, hierarchical_matches_the_tree_for_contiguous_power_of_two_hosts, .timeout = TIMEOUT)
{
    static const struct {
        int n, host[8], same;
    } cases[] = {
        {4, {0, 0, 1, 1}, 1},          /* 2 + 2 */
        {3, {0, 0, 1}, 1},             /* 2 + 1: the last may hold fewer */
        {3, {0, 1, 1}, 0},             /* 1 + 2: the last holds more */
        {4, {0, 1, 0, 1}, 0},          /* not contiguous (--map-by node) */
        {6, {0, 0, 0, 1, 1, 1}, 0},    /* 3 + 3: not a power of two */
        {5, {0, 0, 0, 0, 1}, 1},       /* 4 + 1 */
        {8, {0, 0, 1, 1, 2, 2, 3, 3}, 1},
        {8, {0, 0, 0, 0, 1, 1, 2, 2}, 0}, /* 4 + 2 + 2 */
        {3, {0, 0, 0}, 1},             /* one host: the tree itself */
        {3, {0, 1, 2}, 1},             /* a host each: the tree across hosts */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        cr_expect_eq(pw_hier_matches_tree(cases[i].host, cases[i].n), cases[i].same, "case %zu", i);
}
