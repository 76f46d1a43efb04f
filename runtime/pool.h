/* pipewright — a fixed team of worker threads that runs a parallel-for whose
 * result does not depend on the thread count.
 *
 *     pw_pool *pool;
 *     PW_CHECK(pw_pool_create(4, &pool));          // the caller + 3 helpers
 *     pw_pool_run(pool, n_tiles, gemm_tile, &job);  // gemm_tile(&job, t, worker)
 *     pw_pool_destroy(pool);
 *
 * The contract that makes results reproducible: the caller cuts its work
 * into items whose boundaries depend on the problem only (never on the
 * thread count), and each item's result depends on its own inputs only.
 * pw_pool_run then computes every item exactly once, on whichever thread
 * takes it; the bits are the same with 1 thread or 64, and the same when
 * the pool is busy and the caller computes everything itself.
 *
 * Threads: pw_pool_run may be called from any thread, also from several at
 * once: one caller at a time gets the helpers, any other runs its items on
 * its own thread (same results, no waiting on another caller's work).
 * Items must not call pw_pool_run on the same pool (they would run serially,
 * which is correct but pointless). pw_pool_create / pw_pool_destroy must not
 * race with pw_pool_run on the same pool.
 */
#ifndef PW_RUNTIME_POOL_H
#define PW_RUNTIME_POOL_H

#include <stdint.h>

#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_pool pw_pool;

/* One item: `worker` is in [0, pw_pool_threads) and names the thread that
 * runs it (0 is the caller), for per-thread scratch memory only. */
typedef void (*pw_pool_fn)(void *arg, int64_t item, int worker);

/* A team of `threads` (1..PW_POOL_MAX_THREADS): the calling thread plus
 * threads - 1 helpers, which spin briefly after each run and then sleep. */
#define PW_POOL_MAX_THREADS 256
pw_status pw_pool_create(int threads, pw_pool **out);
void pw_pool_destroy(pw_pool *pool); /* accepts NULL */
int pw_pool_threads(const pw_pool *pool); /* 1 for NULL */

/* Runs fn(arg, i, worker) once for every i in [0, n_items) and returns when
 * all have finished. A NULL pool, one thread, one item, or a pool busy with
 * another caller's run: the items run on the calling thread, in order. */
void pw_pool_run(pw_pool *pool, int64_t n_items, pw_pool_fn fn, void *arg);

/* The number of cores this process may run on (its affinity mask), >= 1. */
int pw_available_cores(void);

#ifdef __cplusplus
}
#endif
#endif
