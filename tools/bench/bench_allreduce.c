/* bench_allreduce — all-reduce bandwidth of pipewright's collectives.
 *
 *   bench_allreduce [--members N] [--sizes 1,4,16,64,256] [--iters K]
 *       in one process: memcpy bandwidth of this machine, then the
 *       shared-memory tree and ring (runtime/collective.h) between N threads;
 *   mpirun -np N bench_allreduce [--sizes ...]
 *       the tree and the ring over MPI point-to-point against
 *       MPI_Iallreduce on the world (rank 0 prints).
 *   mpirun -np N bench_allreduce --auto [--sizes ...] [--link-bandwidth B]
 *                                [--link-latency S]
 *       every algorithm (tree, ring, mpi, hierarchical) and --allreduce
 *       auto at each size, optionally behind a slow link (runtime/link.h):
 *       the time of each, the fastest, auto's choice (from the alpha-beta
 *       lines it measured at start-up), then each algorithm's alpha-beta
 *       line fitted over the sizes and the crossovers between them.
 *       PW_TEST_HOSTS=0,0,1,1 makes "hosts" for the hierarchical one.
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
#include "runtime/link.h"
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

#ifdef PW_HAVE_MPI
/* --auto: every algorithm and auto's choice per size; alpha-beta fits. */
static int bench_mpi_auto(int *argc, char ***argv, const double *sizes, int n_sizes, int iters, pw_link link)
{
    int provided, rank, n;
    MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    MPI_Comm comm = MPI_COMM_WORLD;
    enum { NA = 4 };
    static const pw_allreduce_algo algos[NA] = {PW_ALLREDUCE_TREE, PW_ALLREDUCE_RING, PW_ALLREDUCE_MPI,
                                                PW_ALLREDUCE_HIER};
    static const char *const names[NA] = {"tree", "ring", "mpi", "hierarchical"};
    pw_coll c[NA], au;
    for (int a = 0; a < NA; a++)
        if (pw_mpi_coll_create_link(&comm, algos[a], &link, &c[a]) != PW_OK) {
            fprintf(stderr, "bench_allreduce: %s: %s\n", names[a], pw_last_error());
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
    if (pw_mpi_coll_create_link(&comm, PW_ALLREDUCE_AUTO, &link, &au) != PW_OK) {
        fprintf(stderr, "bench_allreduce: auto: %s\n", pw_last_error());
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    double t[16][NA + 1];
    if (rank == 0) {
        printf("MPI, %d processes; best of %d; link: ", n, iters);
        if (pw_link_on(&link)) printf("%.3g B/s, %.3g s per message\n", link.bandwidth, link.latency_s);
        else printf("none (this machine's memory)\n");
        printf("%10s %10s %10s %10s %10s %10s  %-13s %-13s\n", "size KB", "tree ms", "ring ms", "mpi ms",
               "hier ms", "auto ms", "fastest", "auto picks");
    }
    for (int si = 0; si < n_sizes; si++) {
        int64_t floats = (int64_t)(sizes[si] * 1e6 / 4);
        if (floats < 1) floats = 1;
        float *buf = alloc_floats(floats);
        if (!buf) MPI_Abort(MPI_COMM_WORLD, 1);
        /* Alternate the algorithms within the size: the machine is noisy. */
        for (int a = 0; a <= NA; a++) t[si][a] = time_mpi(a < NA ? &c[a] : &au, buf, floats, iters);
        const char *pick = "?";
        pw_mpi_coll_auto_choice(&au, (double)floats * 4, &pick);
        int best = 0;
        for (int a = 1; a < NA; a++)
            if (t[si][a] < t[si][best]) best = a;
        if (rank == 0) {
            printf("%10.1f", (double)floats * 4 / 1e3);
            for (int a = 0; a <= NA; a++) printf(" %10.3f", t[si][a] * 1e3);
            printf("  %-13s %-13s\n", names[best], pick);
            fflush(stdout);
        }
        free(buf);
    }
    /* The alpha-beta line of each algorithm over the sizes, least squares
     * in relative error (weights 1/t^2): the sizes span 4 KB .. 16 MB, and
     * plain least squares would let the largest decide alone. */
    pw_ab ab[NA];
    for (int a = 0; a < NA; a++) {
        double sw = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
        for (int si = 0; si < n_sizes; si++) {
            double x = sizes[si] * 1e6, y = t[si][a], w = 1.0 / (y * y);
            sw += w, sx += w * x, sy += w * y, sxx += w * x * x, sxy += w * x * y;
        }
        double d = sw * sxx - sx * sx;
        ab[a].beta = d > 0 ? (sw * sxy - sx * sy) / d : 0;
        ab[a].alpha = (sy - ab[a].beta * sx) / sw;
    }
    if (rank == 0) {
        printf("\nalpha-beta lines fitted over these sizes (t = alpha + beta x bytes; least squares in "
               "relative error):\n");
        for (int a = 0; a < NA; a++)
            printf("  %-13s alpha %9.1f us  beta %8.3f ns/byte (%.2f GB/s)\n", names[a], ab[a].alpha * 1e6,
                   ab[a].beta * 1e9, ab[a].beta > 0 ? 1e-9 / ab[a].beta : 0);
        printf("crossovers (where two lines meet, if at a positive size):\n");
        for (int a = 0; a < NA; a++)
            for (int b = a + 1; b < NA; b++) {
                double db = ab[a].beta - ab[b].beta;
                if (db == 0) continue;
                double x = (ab[b].alpha - ab[a].alpha) / db;
                if (x > 0)
                    printf("  %s / %s at %.1f KB (%s below, %s above)\n", names[a], names[b], x / 1e3,
                           ab[a].alpha < ab[b].alpha ? names[a] : names[b],
                           ab[a].alpha < ab[b].alpha ? names[b] : names[a]);
            }
    }
    pw_mpi_coll_destroy_link(&au);
    for (int a = 0; a < NA; a++) pw_mpi_coll_destroy_link(&c[a]);
    MPI_Finalize();
    return 0;
}
#endif

int main(int argc, char **argv)
{
    int members = 2, iters = 5, autob = 0, sizes_set = 0;
    double sizes[16] = {1, 4, 16, 64, 256};
    int n_sizes = 5;
    pw_link link = {0};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--members") && i + 1 < argc) members = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--auto")) autob = 1;
        else if (!strcmp(argv[i], "--link-bandwidth") && i + 1 < argc) link.bandwidth = atof(argv[++i]);
        else if (!strcmp(argv[i], "--link-latency") && i + 1 < argc) link.latency_s = atof(argv[++i]);
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--sizes") && i + 1 < argc) n_sizes = parse_sizes(argv[++i], sizes, 16), sizes_set = 1;
        else {
            fprintf(stderr, "usage: bench_allreduce [--members N] [--iters K] [--sizes MB,MB,...]\n"
                            "       mpirun -np N bench_allreduce [--iters K] [--sizes MB,...]\n"
                            "       mpirun -np N bench_allreduce --auto [--sizes MB,...] [--link-bandwidth B] "
                            "[--link-latency S]\n");
            return 2;
        }
    }
    if (autob && !sizes_set) { /* 4 KB .. 16 MB: where the lines cross */
        static const double fine[] = {0.004, 0.016, 0.064, 0.256, 1, 4, 16};
        n_sizes = (int)(sizeof fine / sizeof fine[0]);
        memcpy(sizes, fine, sizeof fine);
    }
    if (members < 1 || iters < 1 || n_sizes < 1 || link.bandwidth < 0 || link.latency_s < 0) {
        fprintf(stderr, "bench_allreduce: bad --members, --iters or --sizes\n");
        return 2;
    }
    if (pw_mpi_launched_size() > 1) {
#ifdef PW_HAVE_MPI
        if (autob) return bench_mpi_auto(&argc, &argv, sizes, n_sizes, iters, link);
        return bench_mpi(&argc, &argv, sizes, n_sizes, iters);
#else
        fprintf(stderr, "bench_allreduce: started by mpirun, but this build has no MPI\n");
        return 2;
#endif
    }
    if (autob) {
        fprintf(stderr, "bench_allreduce: --auto runs under mpirun (the algorithms are MPI's)\n");
        return 2;
    }
    bench_shm(members, sizes, n_sizes, iters, PW_COLL_TREE);
    bench_shm(members, sizes, n_sizes, iters, PW_COLL_RING);
    return 0;
}
