/* pipewright tests — helpers several test programs share: running a
 * command and keeping its output, reading a file whole, and comparing two
 * safetensors files tensor by tensor. They need no Criterion (the MPI
 * driver uses them too): each returns what happened and the caller
 * asserts; test_read_file_or_fail exists where criterion.h came first.
 *
 *     char *out;
 *     int rc = test_run("cd /tmp && pipeline-run m.graph --quiet 2>&1", &out);
 *     cr_assert_eq(rc, 0, "%s", out);
 *     free(out);
 *     char why[256];
 *     cr_assert(test_same_tensors("a.st", "b.st", why, sizeof why), "%s", why);
 */
#ifndef PW_TESTS_TEST_HELPERS_H
#define PW_TESTS_TEST_HELPERS_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "runtime/safetensors.h"

/* Runs the shell command `cmd` (add "2>&1" to keep its errors too); returns
 * its exit status (-1 when a signal ended it, -2 when it could not start)
 * and everything it printed in *out, NUL-terminated (the caller frees it;
 * out NULL: dropped). */
static inline int test_run(const char *cmd, char **out)
{
    FILE *p = popen(cmd, "r");
    size_t cap = 1 << 16, n = 0, k;
    char *buf = malloc(cap);
    if (!p || !buf) {
        if (p) pclose(p);
        free(buf);
        if (out) *out = strdup("test_run: cannot start the command");
        return -2;
    }
    while ((k = fread(buf + n, 1, cap - n - 1, p)) > 0) {
        n += k;
        if (cap - n < 4096) {
            char *more = realloc(buf, cap * 2);
            if (!more) break;
            buf = more;
            cap *= 2;
        }
    }
    buf[n] = '\0';
    int st = pclose(p);
    if (out) *out = buf;
    else free(buf);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* The bytes of `path`, NUL-terminated, and their count in *n; NULL when it
 * cannot be read. The caller frees it. */
static inline char *test_read_file(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *b = NULL;
    long len = -1;
    if (fseek(f, 0, SEEK_END) == 0 && (len = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0)
        b = malloc((size_t)len + 1);
    if (b && fread(b, 1, (size_t)len, f) != (size_t)len) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (!b) return NULL;
    b[len] = '\0';
    if (n) *n = (size_t)len;
    return b;
}

#ifdef CRITERION_H_
/* test_read_file for a file the test needs: fails the test when it cannot
 * be read. */
static inline char *test_read_file_or_fail(const char *path, size_t *n)
{
    char *b = test_read_file(path, n);
    cr_assert(b, "cannot read %s", path);
    return b;
}
#endif

/* Compares every tensor of the safetensors files a and b (by name; the
 * metadata is not compared). `tol` < 0: byte for byte; otherwise each f32
 * element within tol times the largest |element| of b's tensor, plus atol
 * (b is the reference). 1 when
 * they agree; 0 with the reason in why (the first tensor and element that
 * differ, a missing tensor, other counts, no tensors, a file that cannot
 * be read). */
static inline int test_compare_tensors(const char *a, const char *b, double tol, double atol, char *why,
                                       size_t n)
{
    pw_safetensors *fa = NULL, *fb = NULL;
    int ok = 0;
    if (pw_safetensors_open(a, &fa) != PW_OK || pw_safetensors_open(b, &fb) != PW_OK) {
        snprintf(why, n, "%s", pw_last_error());
        goto out;
    }
    if (pw_safetensors_count(fa) != pw_safetensors_count(fb) || pw_safetensors_count(fa) == 0) {
        snprintf(why, n, "%d tensors vs %d", pw_safetensors_count(fa), pw_safetensors_count(fb));
        goto out;
    }
    for (int i = 0; i < pw_safetensors_count(fa); i++) {
        pw_st_tensor ta, tb;
        pw_safetensors_at(fa, i, &ta);
        if (pw_safetensors_get(fb, ta.name, &tb) != PW_OK || ta.nbytes != tb.nbytes) {
            snprintf(why, n, "tensor %s missing or of another size in %s", ta.name, b);
            goto out;
        }
        const float *x = ta.data, *y = tb.data;
        const size_t count = ta.nbytes / 4;
        if (tol < 0) {
            if (memcmp(ta.data, tb.data, ta.nbytes) == 0) continue;
            size_t at = 0;
            while (at < count && memcmp(&x[at], &y[at], 4) == 0) at++;
            if (at < count) snprintf(why, n, "tensor %s differs at element %zu: %.9g vs %.9g", ta.name, at, x[at], y[at]);
            else snprintf(why, n, "tensor %s differs in its last bytes", ta.name);
            goto out;
        }
        double big = 0, err = 0;
        size_t at = 0;
        for (size_t e = 0; e < count; e++) {
            big = fmax(big, fabs(y[e]));
            const double d = fabs((double)x[e] - y[e]);
            if (d > err) err = d, at = e;
        }
        if (err > tol * big + atol) {
            snprintf(why, n, "tensor %s differs by %g at element %zu (largest %g)", ta.name, err, at, big);
            goto out;
        }
    }
    ok = 1;
out:
    pw_safetensors_close(fa);
    pw_safetensors_close(fb);
    return ok;
}

/* Byte-identical tensors (test_compare_tensors with no tolerance). */
static inline int test_same_tensors(const char *a, const char *b, char *why, size_t n)
{
    return test_compare_tensors(a, b, -1, 0, why, n);
}

#endif
