/* pipewright — the fixed worker team behind deterministic parallel kernels.
 * Contract in pool.h.
 *
 * A run is published under the mutex (fn, arg, n, a new generation) and its
 * items are taken with one atomic counter; the caller works too and then
 * waits for the finished count. Helpers spin a little after a run (the next
 * GEMM of a step follows within microseconds) and then sleep on a condition
 * variable. A helper that wakes late may still hold the previous run's
 * fields: publishing waits until no helper is inside a run (`active`), so a
 * late helper only ever sees a spent counter of its own run.
 */
#define _GNU_SOURCE
#include "runtime/pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

struct pw_pool {
    int n_threads;
    pthread_t *helpers;        /* n_threads - 1 */
    pthread_mutex_t mu;
    pthread_cond_t wake;       /* a new run or stop */
    pthread_cond_t idle;       /* active dropped to 0 */
    /* under mu */
    uint64_t gen;
    pw_pool_fn fn;
    void *arg;
    int64_t n;
    int active;                /* helpers inside a run */
    bool stop;
    /* lock-free */
    atomic_uint_fast64_t gen_peek; /* == gen, read by spinning helpers */
    atomic_int_fast64_t next;      /* next item to take */
    atomic_int_fast64_t finished;  /* items done in this run */
    atomic_flag busy;              /* a caller owns the helpers */
    atomic_bool stopping;
};

typedef struct helper_arg {
    pw_pool *pool;
    int worker;
} helper_arg;

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ~20-50 µs of pause instructions: long enough to bridge the gap between
 * two kernels of one step, short enough not to steal a core for long. */
#define SPIN_ROUNDS 2000

static void take_items(pw_pool *p, pw_pool_fn fn, void *arg, int64_t n, int worker)
{
    for (;;) {
        int64_t i = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (i >= n) return;
        fn(arg, i, worker);
        atomic_fetch_add_explicit(&p->finished, 1, memory_order_release);
    }
}

static void *helper_main(void *v)
{
    helper_arg *ha = v;
    pw_pool *p = ha->pool;
    const int worker = ha->worker;
    free(ha);
    uint64_t seen = 0;
    for (;;) {
        for (int i = 0; i < SPIN_ROUNDS; i++) {
            if (atomic_load_explicit(&p->gen_peek, memory_order_acquire) != seen ||
                atomic_load_explicit(&p->stopping, memory_order_relaxed))
                break;
            cpu_relax();
        }
        pthread_mutex_lock(&p->mu);
        while (!p->stop && p->gen == seen) pthread_cond_wait(&p->wake, &p->mu);
        if (p->stop) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        seen = p->gen;
        pw_pool_fn fn = p->fn;
        void *arg = p->arg;
        int64_t n = p->n;
        p->active++;
        pthread_mutex_unlock(&p->mu);

        take_items(p, fn, arg, n, worker);

        pthread_mutex_lock(&p->mu);
        if (--p->active == 0) pthread_cond_broadcast(&p->idle);
        pthread_mutex_unlock(&p->mu);
    }
}

pw_status pw_pool_create(int threads, pw_pool **out)
{
    *out = NULL;
    if (threads < 1 || threads > PW_POOL_MAX_THREADS)
        return pw_error(PW_ERR_INVALID_ARG, "thread pool: %d threads (1..%d)", threads,
                        PW_POOL_MAX_THREADS);
    pw_pool *p = calloc(1, sizeof *p);
    if (!p) return pw_error(PW_ERR_NOMEM, "thread pool: out of memory");
    p->n_threads = 1;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->idle, NULL);
    atomic_init(&p->gen_peek, 0);
    atomic_init(&p->next, 0);
    atomic_init(&p->finished, 0);
    atomic_flag_clear(&p->busy);
    atomic_init(&p->stopping, false);
    if (threads > 1) {
        p->helpers = calloc((size_t)threads - 1, sizeof *p->helpers);
        if (!p->helpers) {
            pw_pool_destroy(p);
            return pw_error(PW_ERR_NOMEM, "thread pool: out of memory");
        }
        for (int w = 1; w < threads; w++) {
            helper_arg *ha = malloc(sizeof *ha);
            if (ha) *ha = (helper_arg){p, w};
            if (!ha || pthread_create(&p->helpers[w - 1], NULL, helper_main, ha) != 0) {
                free(ha);
                pw_pool_destroy(p);
                return pw_error(PW_ERR_NOMEM, "thread pool: cannot start helper thread %d of %d",
                                w, threads - 1);
            }
            p->n_threads = w + 1;
        }
    }
    *out = p;
    return PW_OK;
}

void pw_pool_destroy(pw_pool *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    atomic_store(&p->stopping, true);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int w = 1; w < p->n_threads; w++) pthread_join(p->helpers[w - 1], NULL);
    pthread_cond_destroy(&p->idle);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->mu);
    free(p->helpers);
    free(p);
}

int pw_pool_threads(const pw_pool *p) { return p ? p->n_threads : 1; }

void pw_pool_run(pw_pool *p, int64_t n, pw_pool_fn fn, void *arg)
{
    if (n <= 0) return;
    if (!p || p->n_threads == 1 || n == 1 || atomic_flag_test_and_set(&p->busy)) {
        for (int64_t i = 0; i < n; i++) fn(arg, i, 0);
        return;
    }
    pthread_mutex_lock(&p->mu);
    while (p->active) pthread_cond_wait(&p->idle, &p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n = n;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    atomic_store_explicit(&p->finished, 0, memory_order_relaxed);
    p->gen++;
    atomic_store_explicit(&p->gen_peek, p->gen, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    take_items(p, fn, arg, n, 0);
    /* Wait for the helpers' last items; yield now and then in case one of
     * them was descheduled in the middle of an item. */
    for (unsigned spins = 0;
         atomic_load_explicit(&p->finished, memory_order_acquire) < n; spins++) {
        if (spins % 256 == 255) sched_yield();
        else cpu_relax();
    }
    atomic_flag_clear(&p->busy);
}

int pw_available_cores(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)(n > PW_POOL_MAX_THREADS ? PW_POOL_MAX_THREADS : n) : 1;
}
