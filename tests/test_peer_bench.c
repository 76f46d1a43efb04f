/* pipewright tests — tools/bench/peer/ (pipewright beside PyTorch) where
 * PyTorch is absent, as in CI: the benchmark must say how to install it and
 * exit 0, and the graphs it trains must still be the ones its PyTorch twins
 * implement, so a changed example graph fails here rather than in the next
 * benchmark run. python3 runs with -I -S -B: no site-packages, so no torch even
 * where one is installed, and no bytecode written into the source tree.
 * Skipped without python3. */
#define _GNU_SOURCE /* nftw, popen */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#define PW_TEST_TMP_NAME "peer_bench"
#define PW_TEST_SUITE peer_bench
#include "tests/test_tmpdir.h"

#define PEER PW_SOURCE_DIR "/tools/bench/peer"

static void need_python(void)
{
    if (system("python3 -I -S -B -c 'import json, re' >/dev/null 2>&1") != 0)
        cr_skip_test("python3 not available");
}

/* Runs a shell command; its stdout and stderr in *out (caller frees), its
 * exit status returned. */
static int run(const char *cmd, char **out)
{
    char full[2048];
    snprintf(full, sizeof full, "%s 2>&1", cmd);
    FILE *p = popen(full, "r");
    cr_assert(p, "popen %s", cmd);
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    cr_assert(buf);
    for (size_t k; (k = fread(buf + n, 1, cap - 1 - n, p)) > 0;) n += k;
    buf[n] = 0;
    int st = pclose(p);
    *out = buf;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

Test(peer_bench, without_torch_says_how_to_install_and_exits_0)
{
    need_python();
    char *out;
    int rc = run("cd " PW_SOURCE_DIR " && python3 -I -S -B " PEER "/peer.py --models quick", &out);
    cr_expect_eq(rc, 0, "exit %d:\n%s", rc, out);
    cr_expect(strstr(out, "peer: skipped: PyTorch is not importable"), "%s", out);
    cr_expect(strstr(out, "pip install torch"), "%s", out);
    cr_expect(!strstr(out, "Traceback"), "%s", out);
    free(out);
}

/* What the twins read from the shipped graphs: the sizes docs/performance.md
 * reports (4.84 M and 0.83 M parameters, the 784-2048x4-10 MLP). */
Test(peer_bench, twins_read_the_shipped_graphs)
{
    need_python();
    char *out;
    int rc = run("cd " PW_SOURCE_DIR " && python3 -I -S -B " PEER "/peer.py --graphs", &out);
    cr_assert_eq(rc, 0, "exit %d:\n%s", rc, out);
    cr_expect(strstr(out, "mlp: tools/bench/peer/mlp.graph {\"input\": 784, \"layers\": [[\"fc1\", 2048], "
                          "[\"fc2\", 2048], [\"fc3\", 2048], [\"fc4\", 2048], [\"head\", 10]]}"), "%s", out);
    cr_expect(strstr(out, "gpt: examples/tiny_gpt.graph {\"T\": 128, \"blocks\": 6, \"dim\": 256, "
                          "\"dropout\": 0.1, \"ff\": 1024, \"heads\": 4, \"max\": 128, \"vocab\": 256}"),
              "%s", out);
    cr_expect(strstr(out, "quick: examples/tiny_gpt_quick.graph {\"T\": 64, \"blocks\": 4, \"dim\": 128, "
                          "\"dropout\": 0.0, \"ff\": 512, \"heads\": 4, \"max\": 64, \"vocab\": 256}"),
              "%s", out);
    free(out);
}

/* Reads `graph` with graphs.py's reader `fn` (read_gpt or read_mlp). */
static int read_graph(const char *fn, const char *graph, char **out)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "python3 -I -S -B -c \"import sys; sys.path.insert(0, '%s'); import graphs; "
             "print(graphs.%s('%s'))\"", PEER, fn, graph);
    return run(cmd, out);
}

/* A copy of `src` with `from` replaced by `to`, in the scratch directory. */
static const char *edited(const char *src, const char *name, const char *from, const char *to)
{
    char cmd[1024];
    const char *dst = tmp_path(name);
    snprintf(cmd, sizeof cmd, "sed 's/%s/%s/' '%s' > '%s'", from, to, src, dst);
    cr_assert_eq(system(cmd), 0, "%s", cmd);
    return dst;
}

/* A graph that is not the twins' architecture is refused, naming what is
 * missing; the unedited copy is read (so the refusal is the edit's doing). */
Test(peer_bench, a_changed_architecture_is_refused)
{
    need_python();
    const char *gpt = PW_SOURCE_DIR "/examples/tiny_gpt.graph";
    const char *mlp = PW_SOURCE_DIR "/tools/bench/peer/mlp.graph";
    char *out;
    cr_expect_eq(read_graph("read_gpt", edited(gpt, "same.graph", "x", "x"), &out), 0, "%s", out);
    free(out);
    cr_expect_eq(read_graph("read_gpt", edited(gpt, "relu.graph", "gelu(fc)", "relu(fc)"), &out), 1);
    cr_expect(strstr(out, "the PyTorch twin does not cover this graph") && strstr(out, "gelu"), "%s", out);
    free(out);
    cr_expect_eq(read_graph("read_gpt", edited(gpt, "untied.graph", ", weight=wte.weight", ""), &out), 1);
    cr_expect(strstr(out, "lm_head"), "%s", out);
    free(out);
    cr_expect_eq(read_graph("read_gpt", edited(gpt, "drop.graph", "pd  *= dropout(pr, p=0.1)",
                                               "pd = dropout(pr, p=0.2)"), &out), 1);
    cr_expect(strstr(out, "three dropouts of one p"), "%s", out);
    free(out);
    cr_expect_eq(read_graph("read_mlp", edited(mlp, "mlp_same.graph", "x", "x"), &out), 0, "%s", out);
    free(out);
    cr_expect_eq(read_graph("read_mlp", edited(mlp, "mlp_gelu.graph", "h2     = relu", "h2 = gelu"), &out), 1);
    cr_expect(strstr(out, "only linear, relu and softmax_cross_entropy"), "%s", out);
    free(out);
    cr_expect_eq(read_graph("read_mlp", edited(mlp, "mlp_skip.graph", "linear(h2,", "linear(h1,"), &out), 1);
    cr_expect(strstr(out, "not a chain"), "%s", out);
    free(out);
}
