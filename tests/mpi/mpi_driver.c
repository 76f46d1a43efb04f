/* MPI tests: pipeline-run under mpirun on loopback, against the same run in
 * one process. Run by CTest as `mpi_driver BUILD_DIR NP` for NP = 2 and 4
 * (no Criterion: each case launches mpirun itself).
 *
 *   identical   for every (stages, replicas) with stages × replicas = NP:
 *               the checkpoint's tensors are byte-identical to the same run
 *               in one process (SGD and AdamW, 1F1B / GPipe / split W, clipping);
 *               a run resumed with --init-from likewise
 *   failures    a rank killed (SIGKILL), exiting early, reporting an error
 *               or hanging: mpirun returns non-zero within a bounded time and
 *               the output names the rank (and stage)
 *
 * Exit status: 0 pass, 1 fail, 77 skipped (no mpirun, or a build without
 * MPI), as CTest's SKIP_RETURN_CODE. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "runtime/safetensors.h"
#include "runtime/transport.h"

static const char *bin;       /* the build directory: pipeline-run */
static char dir[64];          /* scratch */
static int failures;

#define MPIRUN "mpirun --oversubscribe --bind-to none --mca btl self,vader"
#define DATA "--data synthetic:768:24:5 --no-pin --quiet --seed 5 --shuffle"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    failures++;
}

/* Runs a shell command with a time limit; returns its exit status (-1 when
 * killed by a signal; 124 on timeout) and its output in *out. */
static int run(const char *cmd, int limit_s, char **out, double *took)
{
    char full[8192];
    snprintf(full, sizeof full, "cd '%s' && timeout -k 5 %d sh -c '%s' 2>&1", dir, limit_s, cmd);
    double t0 = now_s();
    FILE *p = popen(full, "r");
    if (!p) return -2;
    size_t cap = 1 << 16, n = 0, k;
    char *buf = malloc(cap);
    while ((k = fread(buf + n, 1, cap - n - 1, p)) > 0) {
        n += k;
        if (n + 1 >= cap) buf = realloc(buf, cap *= 2);
    }
    buf[n] = '\0';
    int st = pclose(p);
    if (took) *took = now_s() - t0;
    if (out) *out = buf;
    else free(buf);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* 1 when every tensor of a matches b's byte for byte (names, shapes, data). */
static int same_tensors(const char *a, const char *b, char *why, size_t n)
{
    pw_safetensors *fa = NULL, *fb = NULL;
    int ok = 0;
    if (pw_safetensors_open(a, &fa) != PW_OK || pw_safetensors_open(b, &fb) != PW_OK) {
        snprintf(why, n, "%s", pw_last_error());
        goto out;
    }
    if (pw_safetensors_count(fa) != pw_safetensors_count(fb)) {
        snprintf(why, n, "%d tensors vs %d", pw_safetensors_count(fa), pw_safetensors_count(fb));
        goto out;
    }
    for (int i = 0; i < pw_safetensors_count(fa); i++) {
        pw_st_tensor ta, tb;
        pw_safetensors_at(fa, i, &ta);
        if (pw_safetensors_get(fb, ta.name, &tb) != PW_OK) {
            snprintf(why, n, "tensor %s missing", ta.name);
            goto out;
        }
        if (ta.nbytes != tb.nbytes || memcmp(ta.data, tb.data, ta.nbytes) != 0) {
            size_t k = 0;
            while (k + 4 <= ta.nbytes && k < tb.nbytes && !memcmp((const char *)ta.data + k, (const char *)tb.data + k, 4))
                k += 4;
            float x = 0, y = 0;
            if (k + 4 <= ta.nbytes && k + 4 <= tb.nbytes) {
                memcpy(&x, (const char *)ta.data + k, 4);
                memcpy(&y, (const char *)tb.data + k, 4);
            }
            snprintf(why, n, "tensor %s differs at element %zu: %.9g vs %.9g", ta.name, k / 4, x, y);
            goto out;
        }
    }
    ok = 1;
out:
    pw_safetensors_close(fa);
    pw_safetensors_close(fb);
    return ok;
}

static void write_graph(void)
{
    char path[128];
    snprintf(path, sizeof path, "%s/m.graph", dir);
    FILE *f = fopen(path, "w");
    fputs("graph mpi_mlp\n"
          "input x : f32[24]\n"
          "label y : i32[]\n"
          "h1 = linear(x, out=48) as fc1\n"
          "n1 = layernorm(h1)\n"
          "a1 = gelu(n1)\n"
          "h2 = linear(a1, out=48) as fc2\n"
          "a2 = relu(h2)\n"
          "h3 = linear(a2, out=48) as fc3\n"
          "a3 = relu(h3)\n"
          "r = add(a3, a1)\n"
          "logits = linear(r, out=5) as head\n"
          "loss = softmax_cross_entropy(logits, y)\n", f);
    fclose(f);
}

/* One (stages, replicas) layout: the same flags in one process and under
 * mpirun; the checkpoints must hold the same tensor bytes. */
static void identical(int np, int S, int R, const char *extra, const char *mpi_extra, const char *tag)
{
    char args[1024], cmd[2048], why[256];
    snprintf(args, sizeof args, "m.graph " DATA " --stages %d --replicas %d --batch 48 --steps 12 %s", S, R,
             extra);
    char *out = NULL;
    double took;
    snprintf(cmd, sizeof cmd, "%s/pipeline-run %s --save one_%s.st", bin, args, tag);
    int st = run(cmd, 300, &out, &took);
    if (st != 0) {
        fail("in one process (%s): exit %d\n%s", cmd, st, out);
        free(out);
        return;
    }
    free(out);
    snprintf(cmd, sizeof cmd, MPIRUN " -np %d %s/pipeline-run %s %s --save mpi_%s.st", np, bin, args, mpi_extra,
             tag);
    st = run(cmd, 300, &out, &took);
    if (st != 0) {
        fail("under mpirun (%s): exit %d\n%s", cmd, st, out);
        free(out);
        return;
    }
    free(out);
    char a[160], b[160];
    snprintf(a, sizeof a, "%s/one_%s.st", dir, tag);
    snprintf(b, sizeof b, "%s/mpi_%s.st", dir, tag);
    if (!same_tensors(a, b, why, sizeof why))
        fail("%d stages x %d replicas %s %s: the MPI checkpoint differs from one process: %s", S, R, extra,
             mpi_extra, why);
    else
        printf("ok   %d stages x %d replicas %s %s: MPI checkpoint identical to one process (%.1f s)\n", S, R,
               extra, mpi_extra, took);
}

/* Resuming under MPI from a checkpoint saved in one process. */
static void resumed(int np, int S, int R)
{
    char cmd[2048], why[256], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s/pipeline-run m.graph " DATA " --steps 4 --batch 48 --save start.st", bin);
    if (run(cmd, 300, &out, NULL) != 0) {
        fail("%s\n%s", cmd, out);
        free(out);
        return;
    }
    free(out);
    const char *flags = "--optimizer adamw --steps 6 --batch 48 --init-from start.st";
    snprintf(cmd, sizeof cmd, "%s/pipeline-run m.graph " DATA " --stages %d --replicas %d %s --save r1.st", bin,
             S, R, flags);
    int a = run(cmd, 300, &out, NULL);
    if (a != 0) fail("%s\n%s", cmd, out);
    free(out);
    snprintf(cmd, sizeof cmd, MPIRUN " -np %d %s/pipeline-run m.graph " DATA " --stages %d --replicas %d %s "
             "--save r2.st", np, bin, S, R, flags);
    int b = run(cmd, 300, &out, NULL);
    if (b != 0) fail("%s\n%s", cmd, out);
    free(out);
    if (a || b) return;
    char p1[160], p2[160];
    snprintf(p1, sizeof p1, "%s/r1.st", dir);
    snprintf(p2, sizeof p2, "%s/r2.st", dir);
    if (!same_tensors(p1, p2, why, sizeof why)) fail("--init-from under MPI differs: %s", why);
    else printf("ok   --init-from under MPI (%d x %d) identical to one process\n", S, R);
}

/* A process fails after step 2: every mode must end the run, non-zero,
 * within the bound, with the failing rank named. */
static void failure(int np, const char *mode, const char *must_say, double bound_s)
{
    const int S = np / 2, R = 2, victim = np - 1;
    char cmd[2048], *out = NULL;
    double took = 0;
    snprintf(cmd, sizeof cmd, "PW_TEST_FAULT=%s:%d:2 " MPIRUN " -np %d %s/pipeline-run m.graph " DATA
             " --stages %d --replicas %d --batch 48 --steps 40 --watchdog 3", mode, victim, np, bin, S, R);
    int st = run(cmd, 120, &out, &took);
    char name[160];
    snprintf(name, sizeof name, must_say, victim, victim / S, victim % S);
    if (st == 0) fail("%s: mpirun returned 0 after rank %d failed\n%s", mode, victim, out);
    else if (st == 124) fail("%s: the run hung (killed by the test after %.0f s)\n%s", mode, took, out);
    else if (took > bound_s) fail("%s: the others took %.1f s to stop (bound %.0f s)\n%s", mode, took, bound_s, out);
    else if (!strstr(out, name)) fail("%s: the output does not say \"%s\"\n%s", mode, name, out);
    else printf("ok   %s of rank %d: mpirun exit %d after %.1f s, says \"%s\"\n", mode, victim, st, took, name);
    free(out);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s BUILD_DIR NP\n", argv[0]);
        return 2;
    }
    static char abs_bin[4096];
    if (!realpath(argv[1], abs_bin)) {
        perror(argv[1]);
        return 2;
    }
    bin = abs_bin;
    int np = atoi(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (system("command -v mpirun >/dev/null 2>&1") != 0) {
        printf("mpirun not found: skipping the MPI tests (Debian: apt-get install openmpi-bin)\n");
        return 77;
    }
    if (!pw_mpi_built()) {
        printf("this build has no MPI (PW_MPI=OFF): skipping the MPI tests\n");
        return 77;
    }
    /* Root in containers; leak reports from the MPI library are not ours. */
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 0);
    setenv("OPENBLAS_NUM_THREADS", "1", 1);
    const char *asan = getenv("ASAN_OPTIONS");
    char asan_opts[512];
    snprintf(asan_opts, sizeof asan_opts, "%s%sdetect_leaks=0", asan ? asan : "", asan && *asan ? ":" : "");
    setenv("ASAN_OPTIONS", asan_opts, 1);
    snprintf(dir, sizeof dir, "/tmp/pw_mpi_test_XXXXXX");
    if (!mkdtemp(dir)) return 1;
    write_graph();

    if (np == 2) {
        identical(2, 2, 1, "--micro-batches 4", "", "s2");
        identical(2, 1, 2, "--micro-batches 2 --buckets 3", "", "r2");
        identical(2, 2, 1, "--schedule gpipe --optimizer adamw --clip-grad-norm 0.5", "", "s2g");
        identical(2, 1, 2, "--optimizer adamw", "--allreduce mpi", "r2mpi");
        resumed(2, 1, 2);
        failure(2, "kill", "rank %d", 60);
        failure(2, "error", "MPI rank %d (replica %d, stage %d): step 2: injected fault", 60);
    } else {
        identical(4, 2, 2, "--micro-batches 4 --clip-grad-norm 0.5", "", "s2r2");
        identical(4, 4, 1, "--micro-batches 8 --optimizer adamw", "", "s4");
        identical(4, 1, 4, "--micro-batches 2 --buckets 2 --optimizer adamw", "", "r4");
        identical(4, 2, 2, "--schedule zb-h1 --micro-batches 4 --buckets 2", "", "zb");
        resumed(4, 2, 2);
        failure(4, "kill", "rank %d", 60);
        failure(4, "exit", "MPI rank %d (replica %d, stage %d): exited before the end of the run", 60);
        failure(4, "hang", "MPI rank %d = replica %d rank %d", 60);
    }
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    if (failures) {
        printf("%d MPI check(s) failed\n", failures);
        return 1;
    }
    printf("all MPI checks passed (%d processes)\n", np);
    return 0;
}
