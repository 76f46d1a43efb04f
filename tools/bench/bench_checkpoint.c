/* bench_checkpoint — what training-state checkpoints cost the tiny GPT's
 * training, side by side in one run, beside the disk's own write bandwidth.
 *
 *   bench_checkpoint [--graph examples/tiny_gpt_quick.graph] [--batch 32] [--micro-batches 4]
 *                    [--stages 2] [--every 100] [--rounds 2] [--dir /tmp/bench_ckpt]
 *                    [--disk-mib 256]
 *
 * One pipeline (AdamW, 1F1B, text:fortunes or a seeded random corpus when the
 * package is missing) trains blocks of --every steps, alternating: a block
 * without checkpoints, then a block that starts with one (pw_state_writer_save
 * at its first step boundary: the snapshot on the training thread, the files
 * from the writer's thread while the block's steps run, and
 * pw_state_writer_poll at every step boundary) — what `pipeline-run
 * --checkpoint-dir DIR --checkpoint-every 100` does once per 100 steps. Both
 * kinds of block see the same machine, round after round (in the order
 * without, with; then with, without); the rate of each is its steps ×
 * batch over its wall time (the checkpoint's snapshot and any wait for the
 * previous write included), and its CPU time is the whole process's (the
 * writer's thread included). Reported: the median and best block of each
 * kind, the medians of each round's ratio, the checkpoint's bytes, its
 * snapshot and write times; then the disk: --disk-mib MiB written to --dir in 4 MiB
 * writes and fsynced, the MB/s the checkpoint's write can at best reach.
 * (docs/performance.md, "Training-state checkpoints".) */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "graph/graph.h"
#include "runtime/rng.h"
#include "runtime/trace.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"
#include "stages/train/state.h"
#include "tools/bench/bench_util.h"

static double now_s(void) { return (double)pw_now_ns() * 1e-9; }

/* CPU seconds of the whole process (every thread: the stage workers, the
 * writer): what a checkpoint costs in work, much less sensitive than the
 * wall clock to the other jobs of a shared machine. */
static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "bench_checkpoint: %s%s\n", what, pw_last_error());
    exit(1);
}

/* The training split of text:fortunes, or of a seeded random corpus. */
static pw_dataset *load_data(const pw_graph *g, int *synthetic)
{
    pw_dataset *d = NULL;
    *synthetic = 0;
    if (pw_dataset_from_spec_for_graph("text:fortunes", 1, g, &d) == PW_OK) return d;
    char path[] = "/tmp/bench_checkpoint_XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) die("mkstemp: ");
    FILE *f = fdopen(fd, "wb");
    uint64_t key = pw_rng_key(1, "bench_checkpoint");
    for (uint64_t i = 0; i < (1u << 20); i++) fputc('a' + (int)(pw_rng_u64(key, i) % 26), f);
    fclose(f);
    const pw_value *in = &g->values[g->input];
    pw_status st = pw_dataset_load_text(path, in->shape.d[in->shape.ndim - 1], 1, &d);
    unlink(path);
    if (st != PW_OK) die("random corpus: ");
    *synthetic = 1;
    return d;
}

/* MB/s of writing `mib` MiB to a file in dir in 4 MiB writes, then fsync. */
static double disk_bandwidth(const char *dir, long mib)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/disk_bandwidth.tmp", dir);
    const size_t chunk = (size_t)4 << 20;
    char *buf = malloc(chunk);
    if (!buf) die("out of memory");
    uint64_t key = pw_rng_key(2, "disk");
    for (size_t i = 0; i < chunk; i++) buf[i] = (char)pw_rng_u64(key, i); /* not compressible */
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        fprintf(stderr, "bench_checkpoint: %s: %s\n", path, strerror(errno));
        exit(1);
    }
    double t0 = now_s();
    for (long i = 0; i < mib / 4; i++)
        if (write(fd, buf, chunk) != (ssize_t)chunk) die("disk write failed");
    if (fsync(fd) != 0) die("fsync failed");
    double t = now_s() - t0;
    close(fd);
    unlink(path);
    free(buf);
    return (double)(mib / 4) * (double)chunk / t / 1e6;
}

int main(int argc, char **argv)
{
    const char *graph = arg_str(argc, argv, "--graph", "examples/tiny_gpt_quick.graph");
    const long batch = arg_int(argc, argv, "--batch", 32), M = arg_int(argc, argv, "--micro-batches", 4);
    const int S = (int)arg_int(argc, argv, "--stages", 2), every = (int)arg_int(argc, argv, "--every", 100);
    const int rounds = (int)arg_int(argc, argv, "--rounds", 2);
    const char *dir = arg_str(argc, argv, "--dir", "/tmp/bench_ckpt");
    const long disk_mib = arg_int(argc, argv, "--disk-mib", 256);
    if (every < 2 || rounds < 1 || rounds > 32) {
        fprintf(stderr, "bench_checkpoint: --every >= 2, --rounds in [1, 32]\n");
        return 2;
    }
    pw_graph *g = NULL;
    if (pw_graph_parse_file(graph, &g) != PW_OK) die("");
    int synthetic;
    pw_dataset *d = load_data(g, &synthetic);
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = batch;
    pc.micro_batches = (int)M;
    pc.stages = S;
    pc.schedule = PW_SCHEDULE_1F1B;
    pc.optim = pw_optim_defaults(PW_OPTIM_ADAMW);
    pc.optim.lr = 3e-3f;
    pc.pin = 1;
    pw_pipeline *pl;
    if (pw_pipeline_create(&pc, &pl) != PW_OK) die("");
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) die("cannot clear --dir");
    pw_state_config sc = {
        .dir = dir, .keep = 2, .graph = g,
        .run = {.data = "text:fortunes", .train_samples = d->n, .batch = batch, .micro_batch = batch / M,
                .grad_groups = pw_grad_groups(0, 1, (int)M, NULL), .seed = 1, .optim = pc.optim},
        .layout = {.stages = S, .replicas = 1, .micro_batches = (int)M, .processes = 1, .schedule = "1f1b"},
    };
    pw_state_writer *w;
    if (pw_state_writer_create(&sc, &w) != PW_OK) die("");
    printf("bench_checkpoint: %s, %d stages, batch %ld in %ld micro-batches, AdamW, %s; blocks of %d steps, "
           "alternating without / with one checkpoint (%s)\n", g->name, S, batch, M,
           synthetic ? "a random corpus (no fortunes package)" : "text:fortunes", every, dir);
    if (pw_pipeline_step(pl, NULL) != PW_OK) die(""); /* warm-up */
    double rate[2][32], cpu[2][32], snap = 0, write = 0, stall = 0;
    int64_t bytes = 0, done_n = 0;
    /* Rounds alternate the order (without, with; then with, without) so
     * that a machine getting faster or slower over the run favours
     * neither. */
    for (int r = 0; r < rounds; r++)
        for (int k = 0; k < 2; k++) {
            const int with = r % 2 ? 1 - k : k;
            double t0 = now_s(), c0 = cpu_s();
            for (int i = 0; i < every; i++) {
                pw_step_stats st;
                if (pw_pipeline_step(pl, &st) != PW_OK) die("");
                if (with && i == 0 && pw_state_writer_save(w, pl, st.step) != PW_OK) die("save: ");
                pw_state_done dn;
                int completed;
                do {
                    if (pw_state_writer_poll(w, 0, &dn, &completed) != PW_OK) die("poll: ");
                    if (completed) {
                        snap += dn.snapshot_s;
                        write += dn.write_s;
                        stall += dn.stall_s;
                        bytes = dn.bytes;
                        done_n++;
                    }
                } while (completed);
            }
            rate[with][r] = (double)every * (double)batch / (now_s() - t0);
            cpu[with][r] = (cpu_s() - c0) / (double)every;
            printf("  round %d %-22s %8.1f samples/s  %.4f CPU s per step\n", r + 1,
                   with ? "with a checkpoint:" : "without:", rate[with][r], cpu[with][r]);
            fflush(stdout);
        }
    pw_state_done dn;
    int completed;
    do {
        if (pw_state_writer_poll(w, 1, &dn, &completed) != PW_OK) die("poll: ");
        if (completed) {
            snap += dn.snapshot_s;
            write += dn.write_s;
            bytes = dn.bytes;
            done_n++;
        }
    } while (completed);
    double best[2] = {0, 0};
    for (int k = 0; k < 2; k++)
        for (int r = 0; r < rounds; r++)
            if (rate[k][r] > best[k]) best[k] = rate[k][r];
    /* Each round's two blocks ran back to back: their ratio is the least
     * disturbed comparison on a shared machine. */
    double pair[32], cpair[32];
    for (int r = 0; r < rounds; r++) {
        pair[r] = rate[1][r] / rate[0][r];
        cpair[r] = cpu[1][r] / cpu[0][r];
    }
    const double pr = median(pair, rounds), cpr = median(cpair, rounds);
    const double med0 = median(rate[0], rounds), med1 = median(rate[1], rounds);
    printf("steady rate without checkpoints  %.1f samples/s (median of %d blocks; best %.1f)\n", med0, rounds, best[0]);
    printf("steady rate with one per %d steps %.1f samples/s (median; best %.1f): %+.2f%% (median), %+.2f%% (best)\n",
           every, med1, best[1], 100.0 * (med1 / med0 - 1.0), 100.0 * (best[1] / best[0] - 1.0));
    const double cpu0 = median(cpu[0], rounds), cpu1 = median(cpu[1], rounds);
    printf("CPU time per step (all threads): %.4f s without, %.4f s with one checkpoint per %d steps: %+.2f%% "
           "(medians)\n", cpu0, cpu1, every, 100.0 * (cpu1 / cpu0 - 1.0));
    printf("paired by round (the two blocks back to back): rate %+.2f%%, CPU time %+.2f%% (medians of %d rounds)\n",
           100.0 * (pr - 1.0), 100.0 * (cpr - 1.0), rounds);
    if (done_n > 0)
        printf("checkpoint: %.2f MiB; snapshot %.4f s on the training thread, files %.3f s on the writer's thread "
               "(%.0f MB/s), waits for a previous write %.4f s (means of %lld)\n", (double)bytes / (1 << 20),
               snap / (double)done_n, write / (double)done_n, (double)bytes / (write / (double)done_n) / 1e6,
               stall / (double)done_n, (long long)done_n);
    printf("disk: %.0f MB/s writing %ld MiB to %s (4 MiB writes, fsync)\n", disk_bandwidth(dir, disk_mib), disk_mib,
           dir);
    pw_state_writer_destroy(w);
    pw_pipeline_destroy(pl);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
    return 0;
}
