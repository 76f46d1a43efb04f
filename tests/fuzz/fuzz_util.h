/* pipewright — helpers shared by the libFuzzer harnesses (tests/fuzz/).
 *
 * Every reader of user files takes a path, so a harness hands it the input
 * as a file: fuzz_file() puts the bytes in an anonymous in-memory file
 * (memfd) and returns "/proc/self/fd/N" for it; nothing touches the disk and
 * concurrent harnesses never share a name. fuzz_quiet() drops pipewright's
 * log lines (a reader may PW_WARN on every input). See docs/building.md,
 * "Fuzzing", for how to add a harness. */
#ifndef PW_FUZZ_UTIL_H
#define PW_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "runtime/log.h"

typedef struct fuzz_file {
    int fd;
    char path[64];
} fuzz_file;

/* Writes data[0, size) to a fresh in-memory file; aborts (a harness bug, not
 * a finding) when the kernel refuses. Release with fuzz_file_close. */
static inline fuzz_file fuzz_file_open(const uint8_t *data, size_t size, const char *name)
{
    fuzz_file f;
    f.fd = memfd_create(name, MFD_CLOEXEC);
    if (f.fd < 0) {
        perror("fuzz: memfd_create");
        abort();
    }
    size_t done = 0;
    while (done < size) {
        ssize_t w = write(f.fd, data + done, size - done);
        if (w <= 0) {
            perror("fuzz: write");
            abort();
        }
        done += (size_t)w;
    }
    snprintf(f.path, sizeof f.path, "/proc/self/fd/%d", f.fd);
    return f;
}

static inline void fuzz_file_close(fuzz_file *f)
{
    if (f->fd >= 0) close(f->fd);
    f->fd = -1;
}

static void fuzz_log_drop(pw_log_level level, unsigned subsys, const char *msg, void *user)
{
    (void)level, (void)subsys, (void)msg, (void)user;
}

static inline void fuzz_quiet(void) { pw_log_set(fuzz_log_drop, NULL); }

/* Little-endian integer from the front of the input, consuming it. */
static inline uint64_t fuzz_take(const uint8_t **data, size_t *size, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes && *size > 0; i++) {
        v |= (uint64_t)**data << (8 * i);
        (*data)++;
        (*size)--;
    }
    return v;
}

#endif
