/* pipeline-run --max-restarts: the supervising parent (supervise.h). */
#include "supervise.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "stages/train/state.h"

static volatile sig_atomic_t g_child, g_asked;

/* The parent's SIGINT/SIGTERM: passed on to the child, which checkpoints
 * and exits; then the parent stops restarting. */
static void forward(int sig)
{
    g_asked = sig;
    if (g_child > 0) kill((pid_t)g_child, sig);
}

static void describe(int st, char *buf, size_t n)
{
    if (WIFEXITED(st)) snprintf(buf, n, "exit status %d", WEXITSTATUS(st));
    else if (WIFSIGNALED(st)) snprintf(buf, n, "killed by signal %d (%s)", WTERMSIG(st), strsignal(WTERMSIG(st)));
    else snprintf(buf, n, "status 0x%x", st);
}

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR && !g_asked) {
    }
}

int pw_supervise(int argc, char **argv, const char *ckpt_dir, int max_restarts, int quiet)
{
    (void)quiet;
    char **args = calloc((size_t)argc + 3, sizeof *args);
    if (!args) {
        fprintf(stderr, "pipeline-run: supervisor: out of memory\n");
        return 1;
    }
    for (int i = 0; i < argc; i++) args[i] = argv[i];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    double backoff = 1.0;
    const char *b = getenv("PW_RESTART_BACKOFF");
    if (b && atof(b) >= 0) backoff = atof(b);
    setenv("PW_SUPERVISED", "1", 1);
    int status = 1;
    for (int run = 0;; run++) {
        char k[16];
        snprintf(k, sizeof k, "%d", run);
        setenv("PW_RESTART", k, 1);
        fflush(NULL);
        pid_t pid = fork();
        if (pid < 0) {
            fprintf(stderr, "pipeline-run: supervisor: fork: %s\n", strerror(errno));
            free(args);
            return 1;
        }
        if (pid == 0) {
            execv("/proc/self/exe", args);
            execvp(args[0], args);
            fprintf(stderr, "pipeline-run: supervisor: cannot run %s: %s\n", args[0], strerror(errno));
            _exit(127);
        }
        g_child = pid;
        if (g_asked) kill(pid, g_asked);
        int st = 0;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
        }
        g_child = 0;
        status = WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? 128 + WTERMSIG(st) : 1;
        if (status == 0 || status == 2 || g_asked) break;
        char why[96];
        describe(st, why, sizeof why);
        if (run >= max_restarts) {
            fprintf(stderr, "pipeline-run: supervisor: run %d ended with %s; giving up after %d restart%s\n",
                    run + 1, why, max_restarts, max_restarts == 1 ? "" : "s");
            break;
        }
        /* Where the next run starts: the newest complete checkpoint. */
        pw_state *s = NULL;
        char from[4200];
        if (pw_state_open(ckpt_dir, &s) == PW_OK) {
            const pw_state_meta *m = pw_state_get_meta(s);
            snprintf(from, sizeof from, "from %s (step %lld)", m->path, (long long)m->step);
            args[argc] = "--resume";
            args[argc + 1] = (char *)ckpt_dir;
            args[argc + 2] = NULL;
        } else {
            snprintf(from, sizeof from, "from step 0 (no complete checkpoint in %s yet)", ckpt_dir);
            args[argc] = NULL;
        }
        pw_state_close(s);
        fprintf(stderr, "pipeline-run: supervisor: run %d ended with %s; restart %d of %d in %.1f s %s\n", run + 1,
                why, run + 1, max_restarts, backoff, from);
        sleep_s(backoff);
        if (g_asked) break;
        backoff = backoff * 2 > 60 ? 60 : backoff * 2;
    }
    free(args);
    return status;
}
