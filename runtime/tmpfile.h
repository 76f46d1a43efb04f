/* pipewright — the registry of temporary files that atomic writes have in
 * flight, so that an interrupted run leaves none behind.
 *
 * Every atomic write of the project (pw_safetensors_write, pw_trace_write,
 * pw_dataset_write_idx) writes "<path>.tmp.<pid>", fsyncs it and renames it
 * into place. Between create and rename the temp path is registered here:
 *
 *     char tmp[4096];
 *     pw_tmpfile_name(path, tmp, sizeof tmp);     // "<path>.tmp.<pid>"
 *     int slot = pw_tmpfile_register(tmp);       // before it exists; -1: registry full
 *     int fd = pw_tmpfile_create(slot, tmp);     // open(2), or -1
 *     ... write, fsync, close, rename or unlink ...
 *     pw_tmpfile_forget(slot);                   // accepts -1
 *
 * A signal handler (pipeline-run's second SIGINT/SIGTERM) calls
 * pw_tmpfile_abort_all(), which is async-signal-safe: it only reads the
 * fixed slots and calls unlink(2). An exit path may call it too.
 *
 * Thread-safety: register and forget may be called from any thread; a slot
 * is claimed with an atomic compare-and-swap, so concurrent writers never
 * share one. At most PW_TMPFILE_SLOTS writes are tracked at once; a further
 * one is not tracked (register returns -1) but is otherwise unaffected.
 */
#ifndef PW_RUNTIME_TMPFILE_H
#define PW_RUNTIME_TMPFILE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PW_TMPFILE_SLOTS 16
#define PW_TMPFILE_PATH 4096

/* "<path>.tmp.<pid>" into out[n]; returns 0, or -1 when it does not fit. */
int pw_tmpfile_name(const char *path, char *out, size_t n);
/* Remembers tmp (copied) until pw_tmpfile_forget(slot). Returns the slot,
 * or -1 (registry full or path too long: the file is then not tracked). */
int pw_tmpfile_register(const char *tmp);
/* The temp file was renamed or removed. Accepts -1. */
void pw_tmpfile_forget(int slot);
/* Unlinks every registered temp file; async-signal-safe. Returns how many
 * it removed. */
int pw_tmpfile_unlink_all(void);

/* open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666) for a
 * registered slot (or -1: untracked), so that pw_tmpfile_abort_all on
 * another thread cannot miss it: -1 with errno ECANCELED once an abort has
 * begun. */
int pw_tmpfile_create(int slot, const char *tmp);

/* For a process about to _exit (a second signal): stops every later
 * pw_tmpfile_create, waits (at most 2 s) for those in progress on other
 * threads, then unlinks every registered temp file. Async-signal-safe
 * (atomics, nanosleep, unlink, the gettid system call). Returns how many it
 * removed. */
int pw_tmpfile_abort_all(void);

#ifdef __cplusplus
}
#endif
#endif
