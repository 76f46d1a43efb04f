/* pipeline-run --max-restarts N: a supervising parent (one process).
 *
 * The parent never trains: it runs the same command line as a child (with
 * PW_SUPERVISED=1, so the child does not supervise again, and PW_RESTART=k
 * for the k-th restart), waits for it, and after a failure — a crash, a
 * kill, an error exit — runs it again with `--resume CKPT_DIR` appended
 * (the newest complete checkpoint; from step 0 when there is none yet),
 * after a backoff of 1, 2, 4 ... s (at most 60 s; PW_RESTART_BACKOFF=S sets
 * the first), at most N times. Each failure is logged on stderr with the
 * step it resumes from. Not restarted: success (0), a bad command line (2),
 * and a run the parent itself was asked to stop (SIGINT/SIGTERM are passed
 * on to the child, whose status, 75 after its checkpoint, is returned).
 * Returns the exit status for main. */
#ifndef PW_TOOLS_SUPERVISE_H
#define PW_TOOLS_SUPERVISE_H

int pw_supervise(int argc, char **argv, const char *ckpt_dir, int max_restarts, int quiet);

#endif
