/* pipewright — transports: messages between pipeline ranks that live in
 * different processes, collectives across them, and the layout of a
 * multi-process run. The MPI transport is the one implementation (built when
 * PW_HAVE_MPI); in one process the engine hands buffers between threads and
 * needs no transport at all.
 *
 *     // mpirun -np 4 pipeline-run m.graph --stages 2 --replicas 2
 *     pw_mpi_config mc = {.n_ranks = 2, .n_replicas = 2};
 *     pw_transport *t;
 *     if (pw_mpi_transport_create(&argc, &argv, &mc, &t) != PW_OK) { ... }
 *     // t->replica, t->rank: what this process runs (world rank w is
 *     // replica w / n_ranks, rank w % n_ranks)
 *     pw_engine_config ec = {..., .replicas = 2, .transport = t};
 *     ...
 *     pw_transport_destroy(t);       // MPI_Finalize
 *
 * Layout. With T tensor-parallel ranks per stage (n_tensor; 1: none), world
 * rank w < S·R·T runs tensor-parallel rank w mod T of pipeline rank
 * (w div T) mod S of replica w div (S·T):
 *
 *     w = (replica · S + rank) · T + tp
 *
 * (world ranks S·R·T .. S·R·T+K−1 are parameter servers when n_servers = K).
 * A stage's T ranks are consecutive (mpirun places them on neighbouring
 * cores, and on one host: their all-reduce runs per layer), then a
 * replica's stages; at T = 1 this is w = replica · S + rank. Three
 * communicators are split from the world: the replica's (its S ranks with
 * this process's tp, for activations and gradients between stages and the
 * global gradient norm: stage s talks to the same tp rank of stage s ± 1),
 * the stage's (the R processes that hold the same rank and tp, for the
 * gradient all-reduce of that tp rank's parts) and, at T > 1, the
 * tensor-parallel group's (the T processes of this replica's stage, for
 * the split layers' sums: stages/ops/tp.h, the tree's order).
 *
 * Threads. The engine's worker calls the point-to-point functions from its
 * event loop and its communication thread calls the collectives; the caller's
 * thread uses the blocking world functions between steps. The MPI transport
 * asks for MPI_THREAD_MULTIPLE and serialises its own calls with a lock when
 * the library grants less (at least MPI_THREAD_SERIALIZED is required).
 *
 * Failure. Every function returns a pw_status with a message; nothing here
 * exits. pw_transport_abort (MPI_Abort) is for tools that have reported an
 * error and want every other process stopped at once.
 *
 * No wait is unbounded. Each process publishes what it is doing on its
 * progress board (pw_transport_state: phase, step, a progress counter, the
 * engine action it runs and the process it waits for, if any); a heartbeat
 * thread sends it to every other process several times a second. The
 * blocking world functions poll their requests, and once one has waited
 * watchdog_s they ask pw_transport_blame whom the run is stuck on: a process
 * whose heartbeat stopped (SIGSTOP, a dead host), or one that is not waiting
 * for anybody yet has made no progress for watchdog_s (hung inside a
 * computation), found by following the chain of who waits for whom. The
 * wait then fails with PW_ERR_TIMEOUT, naming that process and what it was
 * doing; a wait whose chain ends at a process still making progress (a long
 * evaluation on another replica) goes on. The engine's watchdog asks the
 * same question (scheduler/engine.h).
 */
#ifndef PW_RUNTIME_TRANSPORT_H
#define PW_RUNTIME_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>
#ifndef __cplusplus
#include <stdalign.h> /* alignas: a keyword in C++ */
#endif

#include "runtime/atomic.h"
#include "runtime/collective.h"
#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A pending non-blocking operation: storage the caller owns. */
typedef struct pw_treq {
    alignas(8) unsigned char opaque[16];
    size_t bytes;         /* a receive: what must arrive */
    /* A send held back by a slow link (runtime/link.h) until due_ns; the
     * transport posts it then (0: posted). */
    int64_t due_ns;
    const void *held_buf;
    size_t held_bytes;
    int held_to, held_tag;
    int held_ps;          /* 1: a parameter-server message (ps_isend's communicator) */
} pw_treq;

/* What a process does, for the others' watchdogs (pw_transport_state). */
typedef enum pw_phase {
    PW_PHASE_START = 0,      /* set-up: data, pipeline creation */
    PW_PHASE_STEP,           /* a training step (the engine, then the tied sums and the loss) */
    PW_PHASE_EPOCH,          /* the end of an epoch, before its evaluation */
    PW_PHASE_EVAL,           /* evaluation */
    PW_PHASE_SAVE,           /* gathering and writing a checkpoint */
    PW_PHASE_SHUTDOWN,       /* the run is over: waiting for the others to finish */
    PW_PHASE_REBALANCE,      /* moving the cuts between steps (stages/train/rebalance.h) */
    PW_PHASE_COUNT
} pw_phase;
const char *pw_phase_name(int phase);

/* wait_peer values besides a world rank. */
enum { PW_WAIT_NOBODY = -1, PW_WAIT_ALL = -2 };

/* This process's progress board, written by any of its threads (lock-free
 * stores) and read by the heartbeat thread. */
typedef struct pw_transport_state {
    atomic_int phase;        /* pw_phase */
    atomic_llong step;       /* the training step the phase belongs to */
    atomic_llong progress;   /* bumped by every unit of work: an action, a message, a micro-batch */
    atomic_int wait_peer;    /* the world rank this process waits for, PW_WAIT_ALL (a
                                collective: several) or PW_WAIT_NOBODY (computing) */
    atomic_int act, mb;      /* the engine action being run (its pw_action_kind, -1) and micro-batch */
    const char *(*act_name)(int); /* (optional) names `act`; set by the engine's creator thread,
                                     read by blame on the threads that wait */
} pw_transport_state;

typedef struct pw_transport_i {
    const char *name;
    /* Non-blocking point-to-point between pipeline ranks of this process's
     * replica, matched by (peer, tag) in posting order. */
    pw_status (*isend)(void *self, int to_rank, int tag, const void *buf, size_t bytes, pw_treq *req);
    pw_status (*irecv)(void *self, int from_rank, int tag, void *buf, size_t bytes, pw_treq *req);
    /* 1: complete; 0: pending; -1: failed (pw_last_error says why; a
     * receive of another size than posted fails). Never blocks. */
    int (*test)(void *self, pw_treq *req);
    /* Blocking, on the world, from one thread between steps. Tags >= 0. */
    pw_status (*send)(void *self, int to_world, int tag, const void *buf, size_t bytes);
    pw_status (*recv)(void *self, int from_world, int tag, void *buf, size_t bytes);
    /* all[world_size × bytes] receives every process's `mine`, in world order. */
    pw_status (*allgather)(void *self, const void *mine, size_t bytes, void *all);
    pw_status (*barrier)(void *self);
    /* Stops every process of the run (MPI_Abort); for tools, after reporting. */
    void (*abort)(void *self, int code);
    void (*destroy)(void *self);
    /* (optional) see pw_transport_blame. */
    int (*blame)(void *self, double stall_s, const char *(*act_name)(int), char *buf, size_t n);
    /* (optional; a run with servers, pw_mpi_config.n_servers) Parameter-server
     * messages between any two processes of the run, by world rank (servers
     * included), on a communicator of their own; completed with `test`.
     * Any thread. cancel: drops a request still pending (a receive nobody
     * will send to) and frees it. */
    pw_status (*ps_isend)(void *self, int to_world, int tag, const void *buf, size_t bytes, pw_treq *req);
    pw_status (*ps_irecv)(void *self, int from_world, int tag, void *buf, size_t bytes, pw_treq *req);
    void (*cancel)(void *self, pw_treq *req);
} pw_transport_i;

typedef struct pw_transport {
    const pw_transport_i *vt;
    void *self;
    int world_rank, world_size; /* world_size: the workers (S x R x T), servers not counted */
    int replica, n_replicas;  /* this process's replica (-1 on a server) */
    int rank, n_ranks;        /* this process's pipeline rank (-1 on a server) */
    int server, n_servers;    /* parameter servers (--sync ps): this process's index, -1 on a
                                 worker; server j is world rank S x R x T + j */
    int tp_rank, n_tp;        /* this process's tensor-parallel rank of n_tp (T; 0 or 1: none;
                                 -1 on a server) */
    int local_rank, local_size; /* among the run's processes on this host */
    int max_tag;              /* largest point-to-point tag */
    pw_coll stage_coll;       /* the R processes holding this rank: member = replica */
    pw_coll replica_coll;     /* the S ranks of this replica (this tp): member = rank */
    pw_coll tp_coll;          /* n_tp > 1: the T processes of this replica's stage, member =
                                 tp_rank; the tree, its waits watched (a stalled peer fails
                                 them after watchdog_s, naming it); vt NULL otherwise */
    char desc[128];           /* "MPI (Open MPI 4.1.4), ring all-reduce, thread level multiple" */
    pw_transport_state *state;/* this process's progress board (NULL: none) */
    double watchdog_s;        /* how long a world wait may go without progress */
} pw_transport;

/* Progress board updates (any thread; t may be NULL: a run in one process). */
static inline void pw_transport_phase(const pw_transport *t, pw_phase phase, int64_t step)
{
    if (!t || !t->state) return;
    atomic_store_explicit(&t->state->phase, (int)phase, memory_order_relaxed);
    atomic_store_explicit(&t->state->step, step, memory_order_relaxed);
    atomic_fetch_add_explicit(&t->state->progress, 1, memory_order_relaxed);
}
static inline void pw_transport_progress(const pw_transport *t)
{
    if (t && t->state) atomic_fetch_add_explicit(&t->state->progress, 1, memory_order_relaxed);
}
/* peer: a world rank, PW_WAIT_ALL or PW_WAIT_NOBODY (the wait is over). */
static inline void pw_transport_waiting(const pw_transport *t, int peer)
{
    if (t && t->state) atomic_store_explicit(&t->state->wait_peer, peer, memory_order_relaxed);
}

/* Whom is the run stuck on? Called by a process that has waited stall_s.
 * Returns the world rank of the stalled process, with "MPI rank 3 (replica
 * 1, stage 1) stalled in evaluation after step 12: ..." in buf; -1 when no
 * process is stalled yet (the chain of waits ends at one still making
 * progress: keep waiting); -2 when every process waits and none is stalled
 * (a deadlock), described in buf. act_name (optional) names the engine's
 * action codes. A transport without a board returns -2 and an empty buf. */
int pw_transport_blame(const pw_transport *t, double stall_s, const char *(*act_name)(int), char *buf,
                       size_t n);

/* Test hook: PW_TEST_HANG=RANK:PHASE:STEP[:stop] (read once) makes world
 * rank RANK, on reaching `phase` ("step", "epoch", "eval", "save") of step
 * STEP, hang for good (sleep) or, with ":stop", stop itself with SIGSTOP.
 * A no-op without a transport or without the variable. */
void pw_transport_test_point(const pw_transport *t, const char *phase, int64_t step);

/* Blocking, on the world, from one thread between steps: all[world_size ×
 * bytes] receives every process's `mine`, in world order (the vtable's
 * allgather); and a barrier. Errors name a stalled or lost process when the
 * watchdog can tell which. */
pw_status pw_transport_allgather(const pw_transport *t, const void *mine, size_t bytes, void *all);
pw_status pw_transport_barrier(const pw_transport *t);

/* Accepts NULL. For MPI: frees the communicators and calls MPI_Finalize. */
void pw_transport_destroy(pw_transport *t);
/* MPI_Abort on the world; returns only when the transport cannot abort. */
void pw_transport_abort(pw_transport *t, int code);
/* The world rank running pipeline rank `rank` of `replica` with this
 * process's tensor-parallel rank (the peer this process exchanges with). */
static inline int pw_transport_world_of(const pw_transport *t, int replica, int rank)
{
    const int T = t->n_tp > 1 ? t->n_tp : 1;
    return (replica * t->n_ranks + rank) * T + (T > 1 ? t->tp_rank : 0);
}

/* Where this process goes on its host: the one rule for pinning the engine's
 * worker and binding the pipeline's memory. Returns 1 when the process is
 * already bound to part of the machine (mpirun --bind-to core, Open MPI's
 * default for two processes, or taskset): keep that binding (memory then
 * follows it by first touch). Otherwise 0, with *n = the run's processes on
 * this host (local_size) and *slot = this process's host rank: it takes slot
 * *slot of pw_cpu_place_ranks(topo, *n) — host rank l on core l, round-robin
 * when there are more processes than cores, never all on core 0. `topo` is
 * this machine's (runtime/topology.h). */
struct hwloc_topology;
int pw_transport_host_place(const pw_transport *t, struct hwloc_topology *topo, int *slot, int *n);

/* ------------------------------------------------------------------ MPI */

typedef enum pw_allreduce_algo {
    PW_ALLREDUCE_TREE = 0,   /* the tree of collective.h over MPI_Isend/Irecv:
                                same bytes as in one process, and as one
                                replica for power-of-two replica counts
                                (default) */
    PW_ALLREDUCE_RING,       /* the ring of collective.h: same bytes as the
                                in-process ring */
    PW_ALLREDUCE_MPI,        /* MPI_Iallreduce: the library's order */
    PW_ALLREDUCE_HIER,       /* hierarchical: a tree within each host, a tree
                                across the hosts' leaders, a copy back
                                (runtime/collective_hier.c; the tree's bytes
                                when hosts hold contiguous power-of-two blocks) */
    PW_ALLREDUCE_AUTO,       /* per bucket, the fastest by the measured
                                alpha-beta lines among the algorithms that
                                give the tree's bytes (runtime/link.h) */
} pw_allreduce_algo;

typedef struct pw_mpi_config {
    int n_ranks;             /* S: pipeline ranks per replica */
    int n_replicas;          /* R; the world must have S × R × T (+ n_servers) processes */
    int n_tensor;            /* T tensor-parallel ranks per stage (0 or 1: none) */
    int n_servers;           /* K parameter servers (0: none), the last K world ranks; their
                                world operations (allgather, barrier) are among the servers,
                                the workers' among the workers; heartbeats span everyone */
    pw_allreduce_algo allreduce;
    double watchdog_s;       /* world waits fail after this long without progress (0: 60 s) */
    double link_latency_s;   /* > 0 or link_bandwidth > 0: a slow link (runtime/link.h) */
    double link_bandwidth;   /* bytes/s per process and direction (0: unlimited) */
} pw_mpi_config;

/* 1 when this build has MPI (PW_HAVE_MPI). */
int pw_mpi_built(void);
/* The world size the launcher announced in the environment (Open MPI's
 * OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_SIZE...), 0 when the process was not
 * started by mpirun. Needs no MPI library. */
int pw_mpi_launched_size(void);
/* "tree" / "ring" / "mpi" / "hierarchical" / "auto" -> algorithm;
 * PW_ERR_INVALID_ARG otherwise. */
pw_status pw_allreduce_algo_parse(const char *s, pw_allreduce_algo *out);

/* Initialises MPI (MPI_Init_thread), checks the world has n_ranks ×
 * n_replicas × n_tensor processes ("mpirun -np 3, but --stages 2 x
 * --replicas 2 needs 4 processes") and splits the communicators. PW_OK: *out is new.
 * PW_ERR_UNSUPPORTED without MPI in this build; PW_ERR_INVALID_ARG for a
 * bad layout; PW_ERR_IO when MPI fails. Collective over every process and
 * unbounded until the heartbeats start at its end: MPI_Init waits for a
 * process that never arrives for good, so a caller that must not hang arms
 * its own timer around this call (pipeline-run does: docs/distributed.md). */
pw_status pw_mpi_transport_create(int *argc, char ***argv, const pw_mpi_config *cfg,
                                  pw_transport **out);

/* Just the MPI collectives of transport.c on a communicator the caller owns
 * (benchmarks and tests): `comm` is an MPI_Comm passed by address. */
pw_status pw_mpi_coll_create(const void *comm, pw_allreduce_algo algo, pw_coll *out);
void pw_mpi_coll_destroy(pw_coll *c);

#ifdef __cplusplus
}
#endif
#endif
