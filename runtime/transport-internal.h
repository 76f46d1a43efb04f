/* pipewright — shared by transport_mpi.c and collective_mpi.c. Not
 * installed. Only for builds with PW_HAVE_MPI. */
#ifndef PW_RUNTIME_TRANSPORT_INTERNAL_H
#define PW_RUNTIME_TRANSPORT_INTERNAL_H

#ifdef PW_HAVE_MPI
#include <mpi.h>
#include <stdatomic.h>

#include "runtime/transport.h"

_Static_assert(sizeof(MPI_Request) <= sizeof(((pw_treq *)0)->opaque), "pw_treq too small for MPI_Request");

/* Set when MPI granted less than MPI_THREAD_MULTIPLE: every MPI call of
 * ours then holds pw_mpi_mu. */
extern int pw_mpi_serialize;
void pw_mpi_lock(void);
void pw_mpi_unlock(void);

/* "what: MPI error text" as PW_ERR_IO. */
pw_status pw_mpi_error(int rc, const char *what);

/* Tests `reqs` until all complete (statuses optional), without blocking in
 * MPI: between tests it yields, then sleeps a few microseconds. Gives up with
 * PW_ERR_TIMEOUT when *abort becomes non-zero (abort may be NULL). */
pw_status pw_mpi_wait(MPI_Request *reqs, int n, MPI_Status *sts, const atomic_int *abort,
                      const char *what);

/* collective_mpi.c: the collectives on `comm` (borrowed; must outlive it). */
pw_status pw_mpi_coll_init(MPI_Comm comm, pw_allreduce_algo algo, pw_coll *out);
void pw_mpi_coll_fini(pw_coll *c);
/* A watch over a tree endpoint's waits (tensor parallelism's, which run
 * inside a stage's compute, where the engine's watchdog cannot look):
 * called while a wait has lasted waited_ns, with the member it waits for
 * (-1: unknown); a status other than PW_OK ends the wait with it. */
typedef pw_status (*pw_mpi_watch_fn)(void *arg, int64_t waited_ns, int member);
void pw_mpi_coll_watch(pw_coll *c, pw_mpi_watch_fn fn, void *arg);

/* collective_hier.c: the endpoint the transport uses (algo, possibly
 * hierarchical or auto, each behind `link` when set); desc (optional)
 * receives "ring", "auto over tree, ring, mpi", ... */
struct pw_link;
pw_status pw_mpi_coll_build(MPI_Comm comm, pw_allreduce_algo algo, const struct pw_link *link, pw_coll *out,
                            char *desc, size_t desc_n);
void pw_mpi_coll_unbuild(pw_coll *c);
#endif

#endif
