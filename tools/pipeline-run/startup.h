/* pipeline-run — a timer over MPI start-up.
 *
 * MPI_Init and the communicators pw_mpi_transport_create builds are
 * collectives over every process of the run, made before the heartbeats
 * that cover every later wait (runtime/transport.h) exist. A process that
 * never arrives — stopped (SIGSTOP), hung, or lost before MPI_Init — would
 * hold the others there for good. The guard ends the waiting process after
 * `limit_s` with a message naming itself and its host: every process still
 * waiting reports, so the rank that does not is the one that stalled. */
#ifndef PW_TOOLS_PIPELINE_RUN_STARTUP_H
#define PW_TOOLS_PIPELINE_RUN_STARTUP_H

typedef struct pr_startup_guard pr_startup_guard;

/* Arms the timer (NULL if no thread could be made: then no guard). */
pr_startup_guard *pr_startup_guard_arm(double limit_s);
/* Start-up is complete: disarms and frees. Accepts NULL. */
void pr_startup_guard_done(pr_startup_guard *g);

#endif
