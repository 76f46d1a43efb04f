/* bench_allreduce — all-reduce bandwidth of pipewright's collectives.
 *
 *   bench_allreduce [--members N] [--sizes 1,4,16,64,256] [--iters K]
 *       in one process: memcpy bandwidth of this machine, then the
 *       shared-memory tree and ring (runtime/collective.h) between N threads;
 *   mpirun -np N bench_allreduce [--sizes ...]
 *       the tree and the ring over MPI point-to-point against
 *       MPI_Iallreduce on the world (rank 0 prints).
 *
 * Figures per size, as nccl-tests defines them: time per all-reduce (best
 * of K), algorithm bandwidth = bytes / time, bus bandwidth = algbw ×
 * 2(n−1)/n (what each member actually moves; comparable with memcpy).
 * Sizes are in MB (10^6 bytes) of float32 per member. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runtime/collective.h"
#include "runtime/transport.h"
#ifdef PW_HAVE_MPI
#include <mpi.h>
#endif

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int parse_sizes(const char *s, double *out, int max)
{
    int n = 0;
    while (s && *s && n < max) {
        char *end;
        double v = strtod(s, &end);
        if (end == s || v <= 0) return -1;
        out[n++] = v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

static float *alloc_floats(int64_t n)
{
    float *p = NULL;
    if (posix_memalign((void **)&p, 64, (size_t)(n > 0 ? n : 1) * sizeof(float)) != 0) return NULL;
    for (int64_t i = 0; i < n; i++) p[i] = (float)(i % 1000) * 0.001f; /* touch every page */
    return p;
}

/* ------------------------------------------------------------ memcpy */

static double memcpy_gbs(int64_t bytes, int iters)
{
    char *a = malloc((size_t)bytes), *b = malloc((size_t)bytes);
    if (!a || !b) return 0;
    memset(a, 1, (size_t)bytes);
    memset(b, 2, (size_t)bytes);
    double best = 1e300;
    for (int i = 0; i < iters; i++) {
        double t0 = now_s();
        memcpy(b, a, (size_t)bytes);
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    volatile char sink = b[bytes / 2];
    (void)sink;
    free(a);
    free(b);
    return (double)bytes / best / 1e9;
}

/* ------------------------------------------------ in-process tree, ring */

typedef struct member {
    pw_shm_group *g;
    int k, iters;
    float *buf;
    int64_t n;
    pthread_barrier_t *bar;
    double best;
} member;

static void *member_main(void *arg)
{
    member *m = arg;
    pw_coll c = pw_shm_group_member(m->g, m->k);
    pw_span sp = {m->buf, m->n};
    m->best = 1e300;
    for (int i = 0; i < m->iters + 1; i++) {
        pthread_barrier_wait(m->bar);
        double t0 = now_s();
        if (pw_coll_allreduce(&c, &sp, 1, NULL) != PW_OK) {
            fprintf(stderr, "bench_allreduce: %s\n", pw_last_error());
            exit(1);
        }
        pthread_barrier_wait(m->bar); /* the slowest member ends the collective */
        double dt = now_s() - t0;
        if (i > 0 && dt < m->best) m->best = dt; /* the first is a warm-up */
    }
    return NULL;
}

static void bench_shm(int n, const double *sizes, int n_sizes, int iters, pw_coll_algo algo)
{
    printf("in-process %s (shared memory), %d members (threads); best of %d\n",
           algo == PW_COLL_TREE ? "tree" : "ring", n, iters);
    printf("%10s %12s %14s %14s %14s\n", "size MB", "time ms", "algbw GB/s", "busbw GB/s", "memcpy GB/s");
    for (int si = 0; si < n_sizes; si++) {
        int64_t floats = (int64_t)(sizes[si] * 1e6 / 4);
        pw_shm_group *g;
        if (pw_shm_group_create(n, &g) != PW_OK) return;
        pw_shm_group_set_algo(g, algo);
        pthread_barrier_t bar;
        pthread_barrier_init(&bar, NULL, (unsigned)n);
        member *m = calloc((size_t)n, sizeof *m);
        pthread_t *th = calloc((size_t)n, sizeof *th);
        for (int k = 0; k < n; k++) {
            m[k] = (member){.g = g, .k = k, .iters = iters, .buf = alloc_floats(floats), .n = floats, .bar = &bar};
            if (!m[k].buf) {
                fprintf(stderr, "bench_allreduce: out of memory at %g MB\n", sizes[si]);
                exit(1);
            }
        }
        for (int k = 0; k < n; k++) pthread_create(&th[k], NULL, member_main, &m[k]);
        for (int k = 0; k < n; k++) pthread_join(th[k], NULL);
        double t = 0;
        for (int k = 0; k < n; k++)
            if (m[k].best > t) t = m[k].best;
        double bytes = (double)floats * 4, alg = bytes / t / 1e9;
        printf("%10.0f %12.3f %14.2f %14.2f %14.2f\n", sizes[si], t * 1e3, alg, alg * 2.0 * (n - 1) / n,
               memcpy_gbs((int64_t)bytes, 5));
        fflush(stdout);
        for (int k = 0; k < n; k++) free(m[k].buf);
        free(m);
        free(th);
        pthread_barrier_destroy(&bar);
        pw_shm_group_destroy(g);
    }
}

/* ---------------------------------------------------------------- MPI */

#ifdef PW_HAVE_MPI
static double time_mpi(pw_coll *c, float *buf, int64_t n, int iters)
{
    pw_span sp = {buf, n};
    double best = 1e300;
    for (int i = 0; i < iters + 1; i++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = now_s();
        if (pw_coll_allreduce(c, &sp, 1, NULL) != PW_OK) {
            fprintf(stderr, "bench_allreduce: %s\n", pw_last_error());
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        MPI_Barrier(MPI_COMM_WORLD);
        double dt = now_s() - t0, worst;
        MPI_Allreduce(&dt, &worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        if (i > 0 && worst < best) best = worst;
    }
    return best;
}

static int bench_mpi(int *argc, char ***argv, const double *sizes, int n_sizes, int iters)
{
    int provided, rank, n;
    MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    MPI_Comm comm = MPI_COMM_WORLD;
    pw_coll tree, ring, lib;
    if (pw_mpi_coll_create(&comm, PW_ALLREDUCE_TREE, &tree) != PW_OK ||
        pw_mpi_coll_create(&comm, PW_ALLREDUCE_RING, &ring) != PW_OK ||
        pw_mpi_coll_create(&comm, PW_ALLREDUCE_MPI, &lib) != PW_OK) {
        fprintf(stderr, "bench_allreduce: %s\n", pw_last_error());
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    if (rank == 0) {
        printf("MPI, %d processes; best of %d; busbw = algbw x 2(n-1)/n\n", n, iters);
        printf("%10s %12s %12s %12s %12s %12s %14s %14s\n", "size MB", "tree ms", "ring ms", "Iallred ms",
               "tree busbw", "ring busbw", "Iallred busbw", "memcpy GB/s");
    }
    for (int si = 0; si < n_sizes; si++) {
        int64_t floats = (int64_t)(sizes[si] * 1e6 / 4);
        float *buf = alloc_floats(floats);
        if (!buf) MPI_Abort(MPI_COMM_WORLD, 1);
        double tt = time_mpi(&tree, buf, floats, iters);
        double tr = time_mpi(&ring, buf, floats, iters), tl = time_mpi(&lib, buf, floats, iters);
        double bytes = (double)floats * 4, f = 2.0 * (n - 1) / n;
        double mc = rank == 0 ? memcpy_gbs((int64_t)bytes, 3) : 0;
        if (rank == 0) {
            printf("%10.0f %12.3f %12.3f %12.3f %12.2f %12.2f %14.2f %14.2f\n", sizes[si], tt * 1e3, tr * 1e3,
                   tl * 1e3, bytes / tt / 1e9 * f, bytes / tr / 1e9 * f, bytes / tl / 1e9 * f, mc);
            fflush(stdout);
        }
        free(buf);
    }
    pw_mpi_coll_destroy(&tree);
    pw_mpi_coll_destroy(&ring);
    pw_mpi_coll_destroy(&lib);
    MPI_Finalize();
    return 0;
}
#endif

int main(int argc, char **argv)
{
    int members = 2, iters = 5;
    double sizes[16] = {1, 4, 16, 64, 256};
    int n_sizes = 5;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--members") && i + 1 < argc) members = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--sizes") && i + 1 < argc) n_sizes = parse_sizes(argv[++i], sizes, 16);
        else {
            fprintf(stderr, "usage: bench_allreduce [--members N] [--iters K] [--sizes MB,MB,...]\n"
                            "       mpirun -np N bench_allreduce [--iters K] [--sizes MB,...]\n");
            return 2;
        }
    }
    if (members < 1 || iters < 1 || n_sizes < 1) {
        fprintf(stderr, "bench_allreduce: bad --members, --iters or --sizes\n");
        return 2;
    }
    if (pw_mpi_launched_size() > 1) {
#ifdef PW_HAVE_MPI
        return bench_mpi(&argc, &argv, sizes, n_sizes, iters);
#else
        fprintf(stderr, "bench_allreduce: started by mpirun, but this build has no MPI\n");
        return 2;
#endif
    }
    bench_shm(members, sizes, n_sizes, iters, PW_COLL_TREE);
    bench_shm(members, sizes, n_sizes, iters, PW_COLL_RING);
    return 0;
}
