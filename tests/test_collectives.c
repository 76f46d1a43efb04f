/* Tests for the in-process collectives (runtime/collective.h): the shared-
 * memory tree and ring sum in exactly the documented orders for every member count,
 * length and span layout; it can be used round after round; a member that
 * never comes cannot hang the others once abort is raised.
 *
 * Every test has the same .timeout: Criterion reports a spurious leak under
 * LeakSanitizer when timeouts differ within a file. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runtime/collective.h"

#define TIMEOUT 60
#define MAXN 6

/* ------------------------------------------------- ThreadSanitizer builds */

#include "tests/tsan_criterion.h" /* runs under ThreadSanitizer */

typedef struct member_job {
    pw_shm_group *g;
    int k, rounds;
    pw_span *spans[8];   /* per round */
    int n_spans[8];
    atomic_int *abort;
    pw_status st;
    double gathered[MAXN];
    int gather;          /* also run an allgather after each allreduce */
} member_job;

static void *member_main(void *arg)
{
    member_job *j = arg;
    pw_coll c = pw_shm_group_member(j->g, j->k);
    j->st = PW_OK;
    for (int r = 0; r < j->rounds && j->st == PW_OK; r++) {
        j->st = pw_coll_allreduce(&c, j->spans[r], j->n_spans[r], j->abort);
        if (j->st == PW_OK && j->gather)
            j->st = pw_coll_allgather_f64(&c, 100.0 * r + j->k, j->gathered, j->abort);
        if (j->st == PW_OK && j->gather)
            for (int m = 0; m < c.n_members; m++)
                if (j->gathered[m] != 100.0 * r + m) j->st = PW_ERR_INTERNAL;
    }
    return NULL;
}

static uint32_t rng_state = 12345;
static uint32_t rnd(void)
{
    rng_state = rng_state * 1664525u + 1013904223u;
    return rng_state >> 8;
}
static float rnd_float(void) { return ((float)(rnd() % 2000001) - 1000000.0f) / 3777.0f; }

/* Cuts `data[L]` into a random list of spans (some empty). */
static int random_spans(float *data, int64_t L, pw_span *out, int max)
{
    int n = 0;
    int64_t at = 0;
    while (at < L && n < max - 1) {
        int64_t len = (int64_t)(rnd() % 7);
        if (len > L - at) len = L - at;
        out[n++] = (pw_span){data + at, len};
        at += len;
    }
    out[n++] = (pw_span){data + at, L - at};
    return n;
}

/* Element i of the tree's result: pairs at distance 1, 2, 4 ... in member
 * order (collective.h), written out as a recursion over halves of a
 * power-of-two range rather than the implementation's loop. */
static float tree_sum(float *const *g, int lo, int width, int n, int64_t i)
{
    if (width == 1) return g[lo][i];
    int half = width / 2;
    if (lo + half >= n) return tree_sum(g, lo, half, n, i); /* the right half is absent */
    return tree_sum(g, lo, half, n, i) + tree_sum(g, lo + half, half, n, i);
}

/* Element i of the result: for the ring, segment j of i summed left to
 * right from member j around the ring (collective.h). */
static float expected(pw_coll_algo algo, float *const *g, int n, int64_t L, int64_t i)
{
    if (algo == PW_COLL_TREE) {
        int width = 1;
        while (width < n) width *= 2;
        return tree_sum(g, 0, width, n, i);
    }
    int j = 0;
    for (int s = 0; s < n; s++) {
        int64_t lo, hi;
        pw_ring_segment(L, n, s, &lo, &hi);
        if (i >= lo && i < hi) j = s;
    }
    float acc = g[j][i];
    for (int t = 1; t < n; t++) acc = acc + g[(j + t) % n][i];
    return acc;
}

static void check_order(pw_coll_algo algo)
{
    static const int64_t lengths[] = {0, 1, 2, 5, 17, 1000, 4099};
    for (int n = 1; n <= 5; n++)
        for (size_t li = 0; li < sizeof lengths / sizeof lengths[0]; li++) {
            const int64_t L = lengths[li];
            const int rounds = 3;
            pw_shm_group *g;
            cr_assert_eq(pw_shm_group_create(n, &g), PW_OK);
            pw_shm_group_set_algo(g, algo);
            float *data[MAXN][3], *orig[MAXN][3];
            pw_span spans[MAXN][3][64];
            member_job jobs[MAXN];
            pthread_t th[MAXN];
            memset(jobs, 0, sizeof jobs);
            for (int k = 0; k < n; k++) {
                jobs[k].g = g;
                jobs[k].k = k;
                jobs[k].rounds = rounds;
                jobs[k].gather = 1;
                for (int r = 0; r < rounds; r++) {
                    data[k][r] = malloc((size_t)(L + 1) * sizeof(float));
                    orig[k][r] = malloc((size_t)(L + 1) * sizeof(float));
                    for (int64_t i = 0; i < L; i++) data[k][r][i] = orig[k][r][i] = rnd_float();
                    jobs[k].n_spans[r] = random_spans(data[k][r], L, spans[k][r], 64);
                    jobs[k].spans[r] = spans[k][r];
                }
            }
            for (int k = 0; k < n; k++) pthread_create(&th[k], NULL, member_main, &jobs[k]);
            for (int k = 0; k < n; k++) pthread_join(th[k], NULL);
            for (int k = 0; k < n; k++) cr_assert_eq(jobs[k].st, PW_OK, "n=%d L=%lld member %d: %s", n,
                                                      (long long)L, k, pw_status_str(jobs[k].st));
            for (int r = 0; r < rounds; r++) {
                float *g_r[MAXN];
                for (int k = 0; k < n; k++) g_r[k] = orig[k][r];
                for (int64_t i = 0; i < L; i++) {
                    float want = expected(algo, g_r, n, L, i);
                    for (int k = 0; k < n; k++)
                        cr_assert(memcmp(&data[k][r][i], &want, 4) == 0,
                                  "n=%d L=%lld round %d member %d element %lld: %.9g, expected %.9g", n,
                                  (long long)L, r, k, (long long)i, data[k][r][i], want);
                }
            }
            for (int k = 0; k < n; k++)
                for (int r = 0; r < rounds; r++) {
                    free(data[k][r]);
                    free(orig[k][r]);
                }
            pw_shm_group_destroy(g);
        }
}

Test(collectives, tree_sums_in_the_documented_order, .timeout = TIMEOUT) { check_order(PW_COLL_TREE); }

Test(collectives, ring_sums_in_the_documented_order, .timeout = TIMEOUT) { check_order(PW_COLL_RING); }

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct raiser {
    atomic_int *flag;
    int ms;
} raiser;

static void *raise_later(void *arg)
{
    raiser *r = arg;
    struct timespec ts = {r->ms / 1000, (long)(r->ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    atomic_store(r->flag, 1);
    return NULL;
}

Test(collectives, absent_member_cannot_hang_the_others, .timeout = TIMEOUT)
{
    pw_shm_group *g;
    cr_assert_eq(pw_shm_group_create(3, &g), PW_OK);
    atomic_int abort_flag;
    atomic_init(&abort_flag, 0);
    float buf[2][100] = {{0}};
    pw_span spans[2][1] = {{{buf[0], 100}}, {{buf[1], 100}}};
    member_job jobs[2];
    memset(jobs, 0, sizeof jobs);
    pthread_t th[3];
    for (int k = 0; k < 2; k++) {
        jobs[k] = (member_job){.g = g, .k = k, .rounds = 1, .abort = &abort_flag};
        jobs[k].spans[0] = spans[k];
        jobs[k].n_spans[0] = 1;
    }
    double t0 = now_s();
    for (int k = 0; k < 2; k++) pthread_create(&th[k], NULL, member_main, &jobs[k]);
    /* Member 2 never comes; someone raises abort after 200 ms. */
    raiser r = {&abort_flag, 200};
    pthread_create(&th[2], NULL, raise_later, &r);
    for (int k = 0; k < 3; k++) pthread_join(th[k], NULL);
    double took = now_s() - t0;
    cr_assert_eq(jobs[0].st, PW_ERR_TIMEOUT);
    cr_assert_eq(jobs[1].st, PW_ERR_TIMEOUT);
    cr_assert_lt(took, 2.0, "the members took %.2f s to give up", took);
    cr_assert_geq(pw_shm_group_joined(g, 0, NULL), 2);
    pw_shm_group_destroy(g);
}

Test(collectives, members_disagreeing_on_length_are_refused, .timeout = TIMEOUT)
{
    pw_shm_group *g;
    cr_assert_eq(pw_shm_group_create(2, &g), PW_OK);
    float a[10] = {0}, b[12] = {0};
    pw_span sa = {a, 10}, sb = {b, 12};
    member_job jobs[2];
    memset(jobs, 0, sizeof jobs);
    jobs[0] = (member_job){.g = g, .k = 0, .rounds = 1};
    jobs[0].spans[0] = &sa;
    jobs[0].n_spans[0] = 1;
    jobs[1] = (member_job){.g = g, .k = 1, .rounds = 1};
    jobs[1].spans[0] = &sb;
    jobs[1].n_spans[0] = 1;
    pthread_t th[2];
    for (int k = 0; k < 2; k++) pthread_create(&th[k], NULL, member_main, &jobs[k]);
    for (int k = 0; k < 2; k++) pthread_join(th[k], NULL);
    cr_assert_eq(jobs[0].st, PW_ERR_SHAPE);
    cr_assert_eq(jobs[1].st, PW_ERR_SHAPE);
    pw_shm_group_destroy(g);
}

Test(collectives, bad_arguments, .timeout = TIMEOUT)
{
    pw_shm_group *g = NULL;
    cr_assert_eq(pw_shm_group_create(0, &g), PW_ERR_INVALID_ARG);
    cr_assert_null(g);
    pw_shm_group_destroy(NULL);
    pw_span s[2] = {{NULL, 3}, {NULL, 4}};
    cr_assert_eq(pw_span_total(s, 2), 7);
    int64_t lo, hi;
    pw_ring_segment(10, 3, 2, &lo, &hi);
    cr_assert(lo == 6 && hi == 10);
}
