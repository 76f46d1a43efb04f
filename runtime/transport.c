/* pipewright — transport helpers that need no MPI library: the launcher's
 * environment, names, and the entry points of a build without MPI. The MPI
 * transport itself is in transport_mpi.c and collective_mpi.c. */
#include "runtime/transport.h"

#include <hwloc.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

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

pw_status pw_allreduce_algo_parse(const char *s, pw_allreduce_algo *out)
{
    if (s && !strcasecmp(s, "ring")) *out = PW_ALLREDUCE_RING;
    else if (s && (!strcasecmp(s, "mpi") || !strcasecmp(s, "iallreduce"))) *out = PW_ALLREDUCE_MPI;
    else return pw_error(PW_ERR_INVALID_ARG, "all-reduce '%s' is not ring or mpi", s ? s : "(null)");
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
