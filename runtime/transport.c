/* pipewright — transport helpers that need no MPI library: the launcher's
 * environment, names, and the entry points of a build without MPI. The MPI
 * transport itself is in transport_mpi.c and collective_mpi.c. */
#include "runtime/transport.h"

#include <hwloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

const char *pw_phase_name(int phase)
{
    static const char *const names[PW_PHASE_COUNT] = {"start-up", "training step", "epoch boundary",
                                                      "evaluation", "checkpoint save", "shutdown",
                                                      "re-partition"};
    return phase >= 0 && phase < PW_PHASE_COUNT ? names[phase] : "?";
}

int pw_transport_blame(const pw_transport *t, double stall_s, const char *(*act_name)(int), char *buf,
                       size_t n)
{
    if (n) buf[0] = '\0';
    if (!t || !t->vt || !t->vt->blame) return -2;
    if (!act_name && t->state) act_name = t->state->act_name;
    return t->vt->blame(t->self, stall_s, act_name, buf, n);
}

/* PW_TEST_HANG, parsed once: rank, phase, step, and whether to SIGSTOP. */
static struct {
    pthread_once_t once;
    int rank, stop;
    long long step;
    char phase[16];
} hang = {PTHREAD_ONCE_INIT, -1, 0, -1, ""};

static void hang_read(void)
{
    const char *spec = getenv("PW_TEST_HANG");
    char mode[8] = "";
    if (!spec || sscanf(spec, "%d:%15[a-z]:%lld:%7[a-z]", &hang.rank, hang.phase, &hang.step, mode) < 3) {
        hang.rank = -1;
        return;
    }
    hang.stop = strcmp(mode, "stop") == 0;
}

void pw_transport_test_point(const pw_transport *t, const char *phase, int64_t step)
{
    if (!t) return;
    pthread_once(&hang.once, hang_read);
    if (hang.rank != t->world_rank || hang.step != step || strcmp(hang.phase, phase) != 0) return;
    fprintf(stderr, "pipewright: PW_TEST_HANG: MPI rank %d %s at point '%s' of step %lld\n", t->world_rank,
            hang.stop ? "stops (SIGSTOP)" : "hangs", phase, (long long)step);
    fflush(NULL);
    if (hang.stop) raise(SIGSTOP);
    for (;;) pause();
}

void pw_transport_destroy(pw_transport *t)
{
    if (!t) return;
    if (t->vt && t->vt->destroy) t->vt->destroy(t->self);
    free(t);
}

void pw_transport_abort(pw_transport *t, int code)
{
    if (t && t->vt && t->vt->abort) t->vt->abort(t->self, code);
}

int pw_transport_host_place(const pw_transport *t, struct hwloc_topology *topo, int *slot, int *n)
{
    *n = t->local_size > 0 ? t->local_size : 1;
    *slot = t->local_rank >= 0 ? t->local_rank % *n : 0;
    /* hwloc's topology spans what the process may use (its cgroup); a
     * binding to less than that came from the launcher or the user. */
    hwloc_bitmap_t bound = hwloc_bitmap_alloc();
    int keep = bound && hwloc_get_cpubind(topo, bound, HWLOC_CPUBIND_PROCESS) == 0 &&
               !hwloc_bitmap_iszero(bound) &&
               !hwloc_bitmap_isincluded(hwloc_topology_get_allowed_cpuset(topo), bound);
    hwloc_bitmap_free(bound);
    return keep;
}

int pw_mpi_launched_size(void)
{
    /* Open MPI, MPICH/Hydra, PMIx-based launchers (srun, prterun). */
    static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE",
                                       "MPI_LOCALNRANKS"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v) {
            long n = strtol(v, NULL, 10);
            if (n > 0 && n < (1L << 30)) return (int)n;
        }
    }
    return 0;
}

pw_status pw_transport_allgather(const pw_transport *t, const void *mine, size_t bytes, void *all)
{
    if (!t || !t->vt || !t->vt->allgather) return pw_error(PW_ERR_INVALID_ARG, "allgather: no transport");
    return t->vt->allgather(t->self, mine, bytes, all);
}

pw_status pw_transport_barrier(const pw_transport *t)
{
    if (!t || !t->vt || !t->vt->barrier) return pw_error(PW_ERR_INVALID_ARG, "barrier: no transport");
    return t->vt->barrier(t->self);
}

pw_status pw_allreduce_algo_parse(const char *s, pw_allreduce_algo *out)
{
    if (s && !strcasecmp(s, "tree")) *out = PW_ALLREDUCE_TREE;
    else if (s && !strcasecmp(s, "ring")) *out = PW_ALLREDUCE_RING;
    else if (s && (!strcasecmp(s, "mpi") || !strcasecmp(s, "iallreduce"))) *out = PW_ALLREDUCE_MPI;
    else if (s && (!strcasecmp(s, "hierarchical") || !strcasecmp(s, "hier"))) *out = PW_ALLREDUCE_HIER;
    else if (s && !strcasecmp(s, "auto")) *out = PW_ALLREDUCE_AUTO;
    else return pw_error(PW_ERR_INVALID_ARG, "all-reduce '%s' is not tree, ring, mpi, hierarchical or auto",
                         s ? s : "(null)");
    return PW_OK;
}

#ifndef PW_HAVE_MPI
int pw_mpi_built(void) { return 0; }

pw_status pw_mpi_transport_create(int *argc, char ***argv, const pw_mpi_config *cfg, pw_transport **out)
{
    (void)argc;
    (void)argv;
    (void)cfg;
    if (out) *out = NULL;
    return pw_error(PW_ERR_UNSUPPORTED, "this build has no MPI (configure with -DPW_MPI=ON and an MPI "
                    "library such as Debian's libopenmpi-dev)");
}

pw_status pw_mpi_coll_create(const void *comm, pw_allreduce_algo algo, pw_coll *out)
{
    (void)comm;
    (void)algo;
    if (out) memset(out, 0, sizeof *out);
    return pw_error(PW_ERR_UNSUPPORTED, "this build has no MPI");
}

void pw_mpi_coll_destroy(pw_coll *c) { (void)c; }
#endif
