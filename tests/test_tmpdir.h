/* pipewright tests — one scratch directory per test process, removed after
 * the suite (Criterion runs each test in its own process), and paths in it.
 * Define PW_TEST_TMP_NAME ("pipe_trace") and PW_TEST_SUITE (the suite's
 * name, a bare word) before including:
 *
 *     #define PW_TEST_TMP_NAME "trace_merge"
 *     #define PW_TEST_SUITE trace_merge
 *     #include "tests/test_tmpdir.h"
 *     ... write_file(tmp_path("a.json")) ...
 */
#ifndef PW_TESTS_TEST_TMPDIR_H
#define PW_TESTS_TEST_TMPDIR_H

#include <criterion/criterion.h>
#include <ftw.h>
#include <stdio.h>
#include <sys/stat.h>

static char g_dir[64];

static const char *tmpdir(void)
{
    if (!g_dir[0]) {
        snprintf(g_dir, sizeof g_dir, "/tmp/pw_" PW_TEST_TMP_NAME "_XXXXXX");
        cr_assert(mkdtemp(g_dir), "mkdtemp");
    }
    return g_dir;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static void remove_tmpdir(void)
{
    if (g_dir[0]) nftw(g_dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
}

TestSuite(PW_TEST_SUITE, .fini = remove_tmpdir);

/* A path in the directory; the last 8 stay valid. */
static const char *tmp_path(const char *name)
{
    static char buf[8][256];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, 256, "%s/%s", tmpdir(), name);
    return p;
}

#endif
