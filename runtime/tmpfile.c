/* pipewright — registry of in-flight temporary files (see tmpfile.h). */
#include "runtime/tmpfile.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <errno.h>

/* Slot states: FREE -> CLAIMED (being filled; a signal handler skips it) ->
 * LIVE (the handler may unlink it) -> FREE. */
enum { SLOT_FREE = 0, SLOT_CLAIMED, SLOT_LIVE };

static struct {
    atomic_int state;
    atomic_int creating; /* pw_tmpfile_create between its check and open(2) */
    atomic_long creator; /* ... on this thread (its kernel id) */
    char path[PW_TMPFILE_PATH];
} slots[PW_TMPFILE_SLOTS];

static atomic_int closing; /* pw_tmpfile_abort_all ran: no more creates */

static long thread_id(void) { return (long)syscall(SYS_gettid); }

int pw_tmpfile_name(const char *path, char *out, size_t n)
{
    int k = snprintf(out, n, "%s.tmp.%ld", path, (long)getpid());
    return k < 0 || (size_t)k >= n ? -1 : 0;
}

/* Test hook: PW_TEST_TMPFILE_SIGNALS=N (read once) raises SIGTERM N times
 * right after a temp file is registered, so a test can interrupt a write in
 * flight (tests/test_cli.c: a second signal during --save). */
static pthread_once_t hook_once = PTHREAD_ONCE_INIT;
static int hook_signals;
static void hook_read(void)
{
    const char *v = getenv("PW_TEST_TMPFILE_SIGNALS");
    hook_signals = v ? atoi(v) : 0;
}

int pw_tmpfile_register(const char *tmp)
{
    size_t len = strlen(tmp);
    int slot = -1;
    for (int i = 0; len < PW_TMPFILE_PATH && i < PW_TMPFILE_SLOTS; i++) {
        int expect = SLOT_FREE;
        if (!atomic_compare_exchange_strong(&slots[i].state, &expect, SLOT_CLAIMED)) continue;
        memcpy(slots[i].path, tmp, len + 1);
        atomic_store(&slots[i].state, SLOT_LIVE);
        slot = i;
        break;
    }
    pthread_once(&hook_once, hook_read);
    for (int k = 0; k < hook_signals; k++) raise(SIGTERM);
    return slot;
}

void pw_tmpfile_forget(int slot)
{
    if (slot < 0 || slot >= PW_TMPFILE_SLOTS) return;
    atomic_store(&slots[slot].state, SLOT_FREE);
}

int pw_tmpfile_unlink_all(void)
{
    int n = 0;
    for (int i = 0; i < PW_TMPFILE_SLOTS; i++) {
        /* Lock-free atomics on int are async-signal-safe; so is unlink. A
         * slot freed between the load and the unlink names a file already
         * renamed or removed: unlink then fails harmlessly (ENOENT). */
        if (atomic_load(&slots[i].state) != SLOT_LIVE) continue;
        if (unlink(slots[i].path) == 0) n++;
    }
    return n;
}

int pw_tmpfile_create(int slot, const char *tmp)
{
    const int tracked = slot >= 0 && slot < PW_TMPFILE_SLOTS;
    if (tracked) {
        atomic_store(&slots[slot].creator, thread_id());
        atomic_store(&slots[slot].creating, 1);
    }
    /* Sequentially consistent: either this sees `closing`, or the abort
     * sees `creating` and waits for the open below to finish before it
     * unlinks (so a file created here is never left behind). */
    if (atomic_load(&closing)) {
        if (tracked) atomic_store(&slots[slot].creating, 0);
        errno = ECANCELED;
        return -1;
    }
    const int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    const int err = errno;
    if (tracked) atomic_store(&slots[slot].creating, 0);
    errno = err;
    return fd;
}

int pw_tmpfile_abort_all(void)
{
    atomic_store(&closing, 1);
    const long me = thread_id();
    for (int i = 0; i < PW_TMPFILE_SLOTS; i++) {
        /* Another thread between its check and open(2): let it finish
         * (an open takes microseconds; at most 2 s in all, should a
         * file system hang). This thread cannot be there: it is here. */
        for (int k = 0; k < 2000 && atomic_load(&slots[i].creating) && atomic_load(&slots[i].creator) != me; k++) {
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL);
        }
    }
    return pw_tmpfile_unlink_all();
}
