/* pipewright — the MPI transport: initialisation, the process layout and
 * its communicators, non-blocking point-to-point for the engine, and the
 * blocking world operations tools use between steps (see transport.h). */
#ifdef PW_HAVE_MPI
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runtime/log.h"
#include "runtime/transport-internal.h"

int pw_mpi_serialize;
static pthread_mutex_t mpi_mu = PTHREAD_MUTEX_INITIALIZER;

void pw_mpi_lock(void)
{
    if (pw_mpi_serialize) pthread_mutex_lock(&mpi_mu);
}
void pw_mpi_unlock(void)
{
    if (pw_mpi_serialize) pthread_mutex_unlock(&mpi_mu);
}

int pw_mpi_built(void) { return 1; }

pw_status pw_mpi_error(int rc, const char *what)
{
    char text[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, text, &len);
    return pw_error(PW_ERR_IO, "%s: MPI error: %s", what, text);
}

pw_status pw_mpi_wait(MPI_Request *reqs, int n, MPI_Status *sts, const atomic_int *abort, const char *what)
{
    for (int spin = 0;; spin++) {
        int flag = 0;
        pw_mpi_lock();
        int rc = MPI_Testall(n, reqs, &flag, sts ? sts : MPI_STATUSES_IGNORE);
        pw_mpi_unlock();
        if (rc != MPI_SUCCESS) return pw_mpi_error(rc, what);
        if (flag) return PW_OK;
        if (abort && atomic_load_explicit(abort, memory_order_relaxed))
            return pw_error(PW_ERR_TIMEOUT, "%s: aborted", what);
        /* Yield first (a neighbour on this host may need the core to send),
         * then poll every ~20 us: latency well under a millisecond without
         * burning a core that compute threads need. */
        if (spin < 64) {
            sched_yield();
        } else {
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        }
    }
}

/* ------------------------------------------------------------ the transport */

typedef struct mpi_transport {
    MPI_Comm world, replica_comm, stage_comm;
    int finalize;          /* we initialised MPI */
    pw_coll stage_coll, replica_coll;
} mpi_transport;

static MPI_Request *req_of(pw_treq *r) { return (MPI_Request *)(void *)r->opaque; }

static pw_status mt_isend(void *self, int to, int tag, const void *buf, size_t bytes, pw_treq *req)
{
    mpi_transport *m = self;
    if (bytes > INT_MAX) return pw_error(PW_ERR_UNSUPPORTED, "MPI send of %zu bytes (max %d)", bytes, INT_MAX);
    req->bytes = SIZE_MAX;
    pw_mpi_lock();
    int rc = MPI_Isend(buf, (int)bytes, MPI_BYTE, to, tag, m->replica_comm, req_of(req));
    pw_mpi_unlock();
    return rc == MPI_SUCCESS ? PW_OK : pw_mpi_error(rc, "MPI_Isend");
}

static pw_status mt_irecv(void *self, int from, int tag, void *buf, size_t bytes, pw_treq *req)
{
    mpi_transport *m = self;
    if (bytes > INT_MAX) return pw_error(PW_ERR_UNSUPPORTED, "MPI receive of %zu bytes (max %d)", bytes, INT_MAX);
    req->bytes = bytes;
    pw_mpi_lock();
    int rc = MPI_Irecv(buf, (int)bytes, MPI_BYTE, from, tag, m->replica_comm, req_of(req));
    pw_mpi_unlock();
    return rc == MPI_SUCCESS ? PW_OK : pw_mpi_error(rc, "MPI_Irecv");
}

static int mt_test(void *self, pw_treq *req)
{
    (void)self;
    int flag = 0;
    MPI_Status st;
    pw_mpi_lock();
    int rc = MPI_Test(req_of(req), &flag, &st);
    pw_mpi_unlock();
    if (rc != MPI_SUCCESS) {
        pw_mpi_error(rc, "MPI_Test");
        return -1;
    }
    if (!flag) return 0;
    if (req->bytes != SIZE_MAX) {
        int got = 0;
        MPI_Get_count(&st, MPI_BYTE, &got);
        if ((size_t)got != req->bytes) {
            pw_error(PW_ERR_SHAPE, "a message of %d bytes arrived where %zu were expected (the "
                     "stages' ports disagree)", got, req->bytes);
            return -1;
        }
    }
    return 1;
}

static pw_status mt_send(void *self, int to, int tag, const void *buf, size_t bytes)
{
    mpi_transport *m = self;
    if (bytes > INT_MAX) return pw_error(PW_ERR_UNSUPPORTED, "MPI send of %zu bytes (max %d)", bytes, INT_MAX);
    pw_mpi_lock();
    int rc = MPI_Send(buf, (int)bytes, MPI_BYTE, to, tag, m->world);
    pw_mpi_unlock();
    return rc == MPI_SUCCESS ? PW_OK : pw_mpi_error(rc, "MPI_Send");
}

static pw_status mt_recv(void *self, int from, int tag, void *buf, size_t bytes)
{
    mpi_transport *m = self;
    if (bytes > INT_MAX) return pw_error(PW_ERR_UNSUPPORTED, "MPI receive of %zu bytes (max %d)", bytes, INT_MAX);
    MPI_Status st;
    pw_mpi_lock();
    int rc = MPI_Recv(buf, (int)bytes, MPI_BYTE, from, tag, m->world, &st);
    pw_mpi_unlock();
    if (rc != MPI_SUCCESS) return pw_mpi_error(rc, "MPI_Recv");
    int got = 0;
    MPI_Get_count(&st, MPI_BYTE, &got);
    if ((size_t)got != bytes)
        return pw_error(PW_ERR_SHAPE, "MPI rank %d sent %d bytes, %zu expected", from, got, bytes);
    return PW_OK;
}

static pw_status mt_allgather(void *self, const void *mine, size_t bytes, void *all)
{
    mpi_transport *m = self;
    if (bytes > INT_MAX) return pw_error(PW_ERR_UNSUPPORTED, "MPI all-gather of %zu bytes", bytes);
    pw_mpi_lock();
    int rc = MPI_Allgather(mine, (int)bytes, MPI_BYTE, all, (int)bytes, MPI_BYTE, m->world);
    pw_mpi_unlock();
    return rc == MPI_SUCCESS ? PW_OK : pw_mpi_error(rc, "MPI_Allgather");
}

static pw_status mt_barrier(void *self)
{
    mpi_transport *m = self;
    pw_mpi_lock();
    int rc = MPI_Barrier(m->world);
    pw_mpi_unlock();
    return rc == MPI_SUCCESS ? PW_OK : pw_mpi_error(rc, "MPI_Barrier");
}

static void mt_abort(void *self, int code)
{
    mpi_transport *m = self;
    MPI_Abort(m ? m->world : MPI_COMM_WORLD, code);
}

static void mt_destroy(void *self)
{
    mpi_transport *m = self;
    if (!m) return;
    pw_mpi_coll_fini(&m->stage_coll);
    pw_mpi_coll_fini(&m->replica_coll);
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) {
        if (m->stage_comm != MPI_COMM_NULL) MPI_Comm_free(&m->stage_comm);
        if (m->replica_comm != MPI_COMM_NULL) MPI_Comm_free(&m->replica_comm);
        if (m->world != MPI_COMM_NULL) MPI_Comm_free(&m->world);
        if (m->finalize) MPI_Finalize();
    }
    free(m);
}

static const pw_transport_i mpi_transport_i = {
    .name = "mpi",
    .isend = mt_isend,
    .irecv = mt_irecv,
    .test = mt_test,
    .send = mt_send,
    .recv = mt_recv,
    .allgather = mt_allgather,
    .barrier = mt_barrier,
    .abort = mt_abort,
    .destroy = mt_destroy,
};

static const char *level_name(int l)
{
    switch (l) {
    case MPI_THREAD_SINGLE: return "single";
    case MPI_THREAD_FUNNELED: return "funneled";
    case MPI_THREAD_SERIALIZED: return "serialized";
    default: return "multiple";
    }
}

pw_status pw_mpi_transport_create(int *argc, char ***argv, const pw_mpi_config *cfg, pw_transport **out)
{
    if (!out || !cfg) return pw_error(PW_ERR_INVALID_ARG, "pw_mpi_transport_create: NULL argument");
    *out = NULL;
    const int S = cfg->n_ranks, R = cfg->n_replicas;
    if (S < 1 || R < 1) return pw_error(PW_ERR_INVALID_ARG, "MPI: %d stages x %d replicas", S, R);
    pw_transport *t = calloc(1, sizeof *t);
    mpi_transport *m = calloc(1, sizeof *m);
    if (!t || !m) {
        free(t);
        free(m);
        return pw_error(PW_ERR_NOMEM, "MPI transport: out of memory");
    }
    m->world = m->replica_comm = m->stage_comm = MPI_COMM_NULL;
    t->vt = &mpi_transport_i;
    t->self = m;
    pw_status st = PW_OK;
    int inited = 0, provided = MPI_THREAD_SINGLE, rc;
    MPI_Initialized(&inited);
    if (!inited) {
        rc = MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
        if (rc != MPI_SUCCESS) {
            free(m);
            free(t);
            return pw_mpi_error(rc, "MPI_Init_thread");
        }
        m->finalize = 1;
    } else {
        MPI_Query_thread(&provided);
    }
    if (provided < MPI_THREAD_SERIALIZED) {
        st = pw_error(PW_ERR_UNSUPPORTED, "MPI grants thread level '%s'; pipewright needs at least "
                      "'serialized' (its worker and communication threads call MPI)", level_name(provided));
        goto fail;
    }
    pw_mpi_serialize = provided < MPI_THREAD_MULTIPLE;
    MPI_Comm_dup(MPI_COMM_WORLD, &m->world);
    MPI_Comm_set_errhandler(m->world, MPI_ERRORS_RETURN);
    MPI_Comm_rank(m->world, &t->world_rank);
    MPI_Comm_size(m->world, &t->world_size);
    if (t->world_size != S * R) {
        st = pw_error(PW_ERR_INVALID_ARG, "mpirun started %d process%s, but --stages %d x --replicas %d "
                      "needs %d (one per stage of each replica)", t->world_size,
                      t->world_size == 1 ? "" : "es", S, R, S * R);
        goto fail;
    }
    t->n_ranks = S;
    t->n_replicas = R;
    t->replica = t->world_rank / S;
    t->rank = t->world_rank % S;
    if ((rc = MPI_Comm_split(m->world, t->replica, t->rank, &m->replica_comm)) != MPI_SUCCESS ||
        (rc = MPI_Comm_split(m->world, t->rank, t->replica, &m->stage_comm)) != MPI_SUCCESS) {
        st = pw_mpi_error(rc, "MPI_Comm_split");
        goto fail;
    }
    MPI_Comm_set_errhandler(m->replica_comm, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(m->stage_comm, MPI_ERRORS_RETURN);
    MPI_Comm node;
    if (MPI_Comm_split_type(m->world, MPI_COMM_TYPE_SHARED, t->world_rank, MPI_INFO_NULL, &node) ==
        MPI_SUCCESS) {
        MPI_Comm_rank(node, &t->local_rank);
        MPI_Comm_size(node, &t->local_size);
        MPI_Comm_free(&node);
    } else {
        t->local_rank = 0;
        t->local_size = 1;
    }
    int *ub = NULL, flag = 0;
    MPI_Comm_get_attr(m->world, MPI_TAG_UB, &ub, &flag);
    t->max_tag = flag && ub ? *ub : 32767;
    PW_CHECK_GOTO(pw_mpi_coll_init(m->stage_comm, cfg->allreduce, &m->stage_coll), st, fail);
    PW_CHECK_GOTO(pw_mpi_coll_init(m->replica_comm, PW_ALLREDUCE_RING, &m->replica_coll), st, fail);
    t->stage_coll = m->stage_coll;
    t->replica_coll = m->replica_coll;
    char lib[MPI_MAX_LIBRARY_VERSION_STRING] = "MPI";
    int len = 0;
    MPI_Get_library_version(lib, &len);
    lib[strcspn(lib, ",\n")] = '\0';
    snprintf(t->desc, sizeof t->desc, "%s, %s all-reduce, thread level %s", lib,
             cfg->allreduce == PW_ALLREDUCE_MPI ? "MPI_Iallreduce" : "ring", level_name(provided));
    PW_INFO(PW_SUB_COMM, "MPI rank %d: replica %d rank %d, host rank %d of %d (%s)", t->world_rank,
            t->replica, t->rank, t->local_rank, t->local_size, t->desc);
    *out = t;
    return PW_OK;
fail:
    mt_destroy(m);
    free(t);
    return st;
}
#else
typedef int pw_transport_mpi_unused; /* a build without MPI */
#endif
