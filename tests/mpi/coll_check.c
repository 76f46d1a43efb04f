/* coll_check — the MPI all-reduces against their documented orders, float
 * for float. Started by tests/mpi/mpi_driver.c as
 *
 *     [PW_TEST_HOSTS=...] mpirun -np N coll_check [--link-bandwidth B --link-latency S]
 *
 * Every process builds every member's gradients (a pure function of the
 * member, the round and the index), so each can compute the expected sums
 * itself: the in-process tree and ring (runtime/collective.h, N threads of
 * this process) and, for the hierarchical all-reduce, the tree of the
 * hosts' trees (its documented order, from the hosts PW_TEST_HOSTS names).
 * Then it runs each MPI algorithm (runtime/link.h's endpoint, behind the
 * slow link when one is given) on its own member's copy — several spans,
 * lengths not divisible by N, an empty span — and compares every float:
 *
 *   tree -> the in-process tree;   ring -> the in-process ring;
 *   hierarchical -> its order (and the tree when pw_hier_matches_tree);
 *   auto -> the tree;   mpi -> the tree for N = 2 (else not checked).
 *
 * Exit 0 when all agree on every process, 1 otherwise (rank 0 prints). */
#include <mpi.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/collective.h"
#include "runtime/link.h"
#include "runtime/transport.h"

enum { NSP = 4, ROUNDS = 2 };
static const int64_t span_len[NSP] = {1001, 0, 37, 4099}; /* 5137 floats */
#define TOTAL (1001 + 0 + 37 + 4099)

static float value(int member, int round, int64_t i)
{
    /* Values whose sums round differently in different orders. */
    uint32_t h = (uint32_t)(member * 2654435761u) ^ (uint32_t)(round * 40503u) ^ (uint32_t)(i * 2246822519u);
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    return ((float)(h & 0xffffff) / (float)0x1000000 - 0.5f) * (float)(1 << (member % 5)) * 1e-3f;
}

/* ------------------------------------------- in-process references */

typedef struct ref_job {
    pw_shm_group *g;
    int k;
    float *x; /* [TOTAL] */
} ref_job;

static void *ref_member(void *arg)
{
    ref_job *j = arg;
    pw_coll c = pw_shm_group_member(j->g, j->k);
    pw_span sp[NSP];
    int64_t off = 0;
    for (int s = 0; s < NSP; s++) {
        sp[s] = (pw_span){j->x + off, span_len[s]};
        off += span_len[s];
    }
    if (pw_coll_allreduce(&c, sp, NSP, NULL) != PW_OK) j->x = NULL;
    return NULL;
}

/* out[TOTAL]: the in-process `algo` over n members' round `round`. */
static int shm_reference(int n, int round, pw_coll_algo algo, float *out)
{
    pw_shm_group *g;
    if (pw_shm_group_create(n, &g) != PW_OK) return 0;
    pw_shm_group_set_algo(g, algo);
    ref_job *jobs = calloc((size_t)n, sizeof *jobs);
    pthread_t *th = calloc((size_t)n, sizeof *th);
    for (int k = 0; k < n; k++) {
        jobs[k] = (ref_job){.g = g, .k = k, .x = malloc(sizeof(float) * TOTAL)};
        for (int64_t i = 0; i < TOTAL; i++) jobs[k].x[i] = value(k, round, i);
        pthread_create(&th[k], NULL, ref_member, &jobs[k]);
    }
    int ok = 1;
    for (int k = 0; k < n; k++) pthread_join(th[k], NULL);
    for (int k = 0; k < n; k++) ok &= jobs[k].x != NULL;
    if (ok) memcpy(out, jobs[0].x, sizeof(float) * TOTAL);
    for (int k = 0; k < n; k++) free(jobs[k].x);
    free(jobs);
    free(th);
    pw_shm_group_destroy(g);
    return ok;
}

/* The pairwise tree over parts[0..m) (collective.h's order), in parts[0]. */
static void tree_sum(float **parts, int m)
{
    for (int w = 1; w < m; w *= 2)
        for (int a = 0; a + w < m; a += 2 * w)
            for (int64_t i = 0; i < TOTAL; i++) parts[a][i] = parts[a][i] + parts[a + w][i];
}

/* The hierarchical order: each host's members (in member order) by the
 * tree, then the hosts (ordered by their first member) by the tree. */
static void hier_reference(int n, const int *host_of, int round, float *out)
{
    float **host_sum = calloc((size_t)n, sizeof *host_sum);
    int hosts = 0;
    for (int first = 0; first < n; first++) {
        int seen = 0;
        for (int j = 0; j < first; j++) seen |= host_of[j] == host_of[first];
        if (seen) continue;
        float **parts = calloc((size_t)n, sizeof *parts);
        int m = 0;
        for (int k = first; k < n; k++)
            if (host_of[k] == host_of[first]) {
                parts[m] = malloc(sizeof(float) * TOTAL);
                for (int64_t i = 0; i < TOTAL; i++) parts[m][i] = value(k, round, i);
                m++;
            }
        tree_sum(parts, m);
        host_sum[hosts++] = parts[0];
        for (int j = 1; j < m; j++) free(parts[j]);
        free(parts);
    }
    tree_sum(host_sum, hosts);
    memcpy(out, host_sum[0], sizeof(float) * TOTAL);
    for (int h = 0; h < hosts; h++) free(host_sum[h]);
    free(host_sum);
}

static int compare(const char *what, const float *got, const float *want, int rank)
{
    for (int64_t i = 0; i < TOTAL; i++)
        if (memcmp(&got[i], &want[i], sizeof(float)) != 0) {
            fprintf(stderr, "FAIL: rank %d: %s: element %lld is %.9g, expected %.9g\n", rank, what, (long long)i,
                    (double)got[i], (double)want[i]);
            return 0;
        }
    return 1;
}

int main(int argc, char **argv)
{
    int provided, rank, n;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    pw_link link = {0};
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--link-bandwidth")) link.bandwidth = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--link-latency")) link.latency_s = atof(argv[i + 1]);
    }
    int *host_of = calloc((size_t)n, sizeof *host_of);
    const char *hosts = getenv("PW_TEST_HOSTS");
    for (int k = 0; k < n; k++) host_of[k] = 0;
    for (int k = 0; hosts && *hosts && k < n; k++) {
        char *end;
        host_of[k] = (int)strtol(hosts, &end, 10);
        hosts = *end == ',' ? end + 1 : end;
    }
    const int hier_is_tree = pw_hier_matches_tree(host_of, n);
    MPI_Comm comm = MPI_COMM_WORLD;
    static const pw_allreduce_algo algos[] = {PW_ALLREDUCE_TREE, PW_ALLREDUCE_RING, PW_ALLREDUCE_HIER,
                                              PW_ALLREDUCE_AUTO, PW_ALLREDUCE_MPI};
    static const char *const names[] = {"tree", "ring", "hierarchical", "auto", "mpi"};
    float *tree = malloc(sizeof(float) * TOTAL), *ring = malloc(sizeof(float) * TOTAL);
    float *hier = malloc(sizeof(float) * TOTAL), *x = malloc(sizeof(float) * TOTAL);
    int ok = 1, checked = 0;
    for (size_t a = 0; a < sizeof algos / sizeof algos[0]; a++) {
        if (algos[a] == PW_ALLREDUCE_MPI && n != 2) continue; /* the library's order */
        pw_coll c;
        if (pw_mpi_coll_create_link(&comm, algos[a], &link, &c) != PW_OK) {
            fprintf(stderr, "FAIL: rank %d: %s: %s\n", rank, names[a], pw_last_error());
            ok = 0;
            continue;
        }
        for (int round = 0; round < ROUNDS; round++) {
            if (!shm_reference(n, round, PW_COLL_TREE, tree) || !shm_reference(n, round, PW_COLL_RING, ring)) {
                fprintf(stderr, "FAIL: rank %d: the in-process reference failed\n", rank);
                ok = 0;
                break;
            }
            hier_reference(n, host_of, round, hier);
            for (int64_t i = 0; i < TOTAL; i++) x[i] = value(rank, round, i);
            pw_span sp[NSP];
            int64_t off = 0;
            for (int s = 0; s < NSP; s++) {
                sp[s] = (pw_span){x + off, span_len[s]};
                off += span_len[s];
            }
            if (pw_coll_allreduce(&c, sp, NSP, NULL) != PW_OK) {
                fprintf(stderr, "FAIL: rank %d: %s: %s\n", rank, names[a], pw_last_error());
                ok = 0;
                break;
            }
            char what[96];
            snprintf(what, sizeof what, "%s, round %d", names[a], round);
            switch (algos[a]) {
            case PW_ALLREDUCE_RING: ok &= compare(what, x, ring, rank); break;
            case PW_ALLREDUCE_HIER:
                ok &= compare(what, x, hier, rank);
                if (hier_is_tree) ok &= compare("hierarchical against the tree", x, tree, rank);
                break;
            default: ok &= compare(what, x, tree, rank); break;
            }
            checked++;
        }
        pw_mpi_coll_destroy_link(&c);
    }
    /* The references differ where they should (else the check proves little). */
    int differ = memcmp(tree, ring, sizeof(float) * TOTAL) != 0;
    int hier_differs = memcmp(tree, hier, sizeof(float) * TOTAL) != 0;
    int all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (rank == 0)
        printf("%s: %d processes, hosts %s (hierarchical %s the tree%s), link %g B/s %g s: %d checks%s\n",
               all_ok ? "ok" : "FAIL", n, getenv("PW_TEST_HOSTS") ? getenv("PW_TEST_HOSTS") : "(one)",
               hier_is_tree ? "is" : "is not",
               hier_is_tree ? "" : hier_differs ? ": its sums differ" : ": yet its sums agree here",
               link.bandwidth, link.latency_s, checked,
               n > 2 ? (differ ? "; the tree and the ring differ, as documented" : "; the tree and the ring agree here")
                     : "");
    free(tree);
    free(ring);
    free(hier);
    free(x);
    free(host_of);
    MPI_Finalize();
    return all_ok ? 0 : 1;
}
