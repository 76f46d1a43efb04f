/* bench_engine — scheduler overhead: the engine running a schedule whose
 * stage callbacks do nothing, so every microsecond is the engine's own
 * (action dispatch, slot and buffer bookkeeping, hand-offs between threads,
 * parking and waking).
 *
 *   bench_engine [--stages S] [--micro-batches M] [--steps N]
 *                [--schedule 1f1b|gpipe] [--pin 0|1]
 *
 * Reported: µs per action = wall time of a step / actions per rank (ranks
 * run concurrently, so this is what each rank pays per action), and the
 * total actions per second. Target (issue 3): at most 10 µs per action for
 * 4 stages × 64 micro-batches. With more stages than cores the threads
 * time-share the cores and hand-offs cost context switches; the output says
 * how many cores there are. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/trace.h"
#include "scheduler/engine.h"
#include "scheduler/schedule.h"
#include "tools/bench/bench_util.h"

typedef struct empty_chunk { char msg[64]; } empty_chunk;

static pw_status nop(void *self, int mb, int slot)
{
    (void)self; (void)mb; (void)slot;
    return PW_OK;
}

static pw_status nop_opt(void *self, long step)
{
    (void)self; (void)step;
    return PW_OK;
}

static size_t ports(void *self, pw_port port)
{
    (void)self; (void)port;
    return 64;
}

static pw_status bind(void *self, int slot, pw_port port, void *buf)
{
    (void)self; (void)slot; (void)port; (void)buf;
    return PW_OK;
}

int main(int argc, char **argv)
{
    const int S = (int)arg_int(argc, argv, "--stages", 4);
    const int M = (int)arg_int(argc, argv, "--micro-batches", 64);
    const int steps = (int)arg_int(argc, argv, "--steps", 200);
    const int pin = (int)arg_int(argc, argv, "--pin", 1);
    const char *kind_s = "1f1b";
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--schedule")) kind_s = argv[i + 1];
    pw_schedule_kind kind;
    if (S < 1 || M < 1 || steps < 1 || pw_schedule_kind_parse(kind_s, &kind) != PW_OK) {
        fprintf(stderr, "bench_engine: bad arguments\n");
        return 2;
    }
    pw_schedule_config sc = {.kind = kind, .n_stages = S, .n_micro = M};
    pw_schedule *s;
    pw_schedule_report *rep;
    if (pw_schedule_generate(&sc, &s) != PW_OK || pw_schedule_lower(s) != PW_OK ||
        pw_schedule_validate(s, &rep) != PW_OK) {
        fprintf(stderr, "bench_engine: %s\n", pw_last_error());
        return 1;
    }
    static const pw_stage_i empty_i = {
        .name = "empty", .forward = nop, .backward_input = nop, .optimizer_step = nop_opt,
        .port_bytes = ports, .bind = bind,
    };
    empty_chunk *chunks = calloc((size_t)S, sizeof *chunks);
    pw_engine_chunk *ec = calloc((size_t)S, sizeof *ec);
    for (int c = 0; c < S; c++) ec[c] = (pw_engine_chunk){&empty_i, &chunks[c]};
    pw_engine_config cfg = {.schedule = s, .report = rep, .chunks = ec, .watchdog_s = 30, .pin = pin};
    pw_engine *e;
    if (pw_engine_create(&cfg, &e) != PW_OK) {
        fprintf(stderr, "bench_engine: %s\n", pw_last_error());
        return 1;
    }
    int64_t max_actions = 0;
    for (int r = 0; r < S; r++)
        if (s->ranks[r].n_actions > max_actions) max_actions = s->ranks[r].n_actions;
    int64_t total_actions = rep->n_actions;
    double *t = malloc(sizeof(double) * (size_t)steps);
    for (int i = 0; i < 10; i++) pw_engine_run_step(e, i + 1); /* warm-up */
    for (int i = 0; i < steps; i++) {
        int64_t t0 = pw_now_ns();
        if (pw_engine_run_step(e, 11 + i) != PW_OK) {
            fprintf(stderr, "bench_engine: %s\n", pw_last_error());
            return 1;
        }
        t[i] = (double)(pw_now_ns() - t0) * 1e-3;
    }
    qsort(t, (size_t)steps, sizeof *t, cmp_double);
    double med = t[steps / 2];
    printf("bench_engine: %s, %d stages x %d micro-batches, empty compute, %ld cores, pin=%d\n",
           kind_s, S, M, sysconf(_SC_NPROCESSORS_ONLN), pin);
    printf("  step (median of %d)  %10.1f us\n", steps, med);
    printf("  actions per rank      %10lld (total %lld)\n", (long long)max_actions,
           (long long)total_actions);
    printf("  per action            %10.2f us   (target <= 10 us)\n", med / (double)max_actions);
    printf("  throughput            %10.0f actions/s (all ranks)\n",
           (double)total_actions / (med * 1e-6));
    pw_engine_destroy(e);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
    free(chunks);
    free(ec);
    free(t);
    return 0;
}
