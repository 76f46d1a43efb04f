/* pipeline-run — a timer over MPI start-up (startup.h). */
#include "startup.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct pr_startup_guard {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    double limit_s;
};

/* This process's world rank before MPI knows it: mpirun's environment. */
static const char *env_rank(void)
{
    const char *names[] = {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *v = getenv(names[i]);
        if (v && *v) return v;
    }
    return "?";
}

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Wakes every 100 ms (the monotonic clock runs on while the process is
 * stopped): a wake-up that comes a second or more late means this process
 * itself was not running (stopped, or starved of the CPU), and the time it
 * lost that way is counted. When the limit passes, a process that lost
 * most of it says so instead of blaming another: under mpirun a stopped
 * process is sent SIGCONT before it is killed, and its late wake-up must
 * not read as one more process that was kept waiting. */
static void *guard_main(void *arg)
{
    pr_startup_guard *g = arg;
    const double start = mono_s();
    double last = start, lost = 0;
    pthread_mutex_lock(&g->mu);
    for (;;) {
        if (g->done) break;
        const double now = mono_s();
        if (now - last >= 1.0) lost += now - last - 0.1;
        last = now;
        if (now - start >= g->limit_s) break;
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_nsec += 100000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&g->cv, &g->mu, &until);
    }
    const int done = g->done;
    pthread_mutex_unlock(&g->mu);
    if (done) return NULL;
    char host[128] = "?";
    gethostname(host, sizeof host - 1);
    char msg[512];
    int n;
    if (lost >= 0.5 * g->limit_s)
        n = snprintf(msg, sizeof msg,
                     "pipeline-run: MPI rank %s (host %s, pid %ld): MPI start-up did not complete in %.0f s, and "
                     "this process itself was not running for %.1f s of them (stopped or starved of the CPU): it "
                     "is the one the others waited for, or one of them\n",
                     env_rank(), host, (long)getpid(), g->limit_s, lost);
    else
        n = snprintf(msg, sizeof msg,
                     "pipeline-run: MPI rank %s (host %s, pid %ld): MPI start-up did not complete in %.0f s: another "
                     "process of the run did not arrive (stopped, hung or lost); every process still waiting "
                     "reports this, so the rank that does not (or says it was not running) is the stalled one "
                     "(--watchdog sets the limit)\n",
                     env_rank(), host, (long)getpid(), g->limit_s);
    if (n > 0) {
        ssize_t w = write(STDERR_FILENO, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
        (void)w;
    }
    _exit(1); /* MPI cannot be left or aborted before it has started */
}

pr_startup_guard *pr_startup_guard_arm(double limit_s)
{
    pr_startup_guard *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->limit_s = limit_s;
    pthread_mutex_init(&g->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&g->thread, NULL, guard_main, g) != 0) {
        pthread_cond_destroy(&g->cv);
        pthread_mutex_destroy(&g->mu);
        free(g);
        return NULL;
    }
    return g;
}

void pr_startup_guard_done(pr_startup_guard *g)
{
    if (!g) return;
    pthread_mutex_lock(&g->mu);
    g->done = 1;
    pthread_cond_signal(&g->cv);
    pthread_mutex_unlock(&g->mu);
    pthread_join(g->thread, NULL);
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    free(g);
}
