/* Tests for the metrics reader (runtime/metrics_read.h) and `pipe-trace
 * --plot` (tools/pipe-trace/plot.c). The metrics files are written here in
 * the schema `pipeline-run --metrics` writes. The reader keeps every known
 * value in file order, ignores what it does not know, skips non-finite
 * values with a note and refuses malformed lines with FILE:LINE; the SVG is
 * checked to be well-formed XML (a small checker below: balanced tags,
 * quoted attributes, known entities) with the curves in it, for ordinary,
 * empty, huge and hostile inputs. */
#define _GNU_SOURCE /* nftw */
#include <criterion/criterion.h>
#include <ctype.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runtime/metrics_read.h"

#define TIMEOUT .timeout = 60
#define TOOL PW_BINARY_DIR "/pipe-trace"

/* plot.c has no main of its own: compiled in, as the fuzz harness does. */
#include "tools/pipe-trace/plot.c"
#include "tools/pipe-trace/svg.c"
#include "tools/pipe-trace/report.c"

/* ---------------------------------------------------------------- helpers */

#define PW_TEST_TMP_NAME "metrics_plot"
#define PW_TEST_SUITE metrics_plot
#include "tests/test_tmpdir.h"
#include "tests/test_helpers.h"

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    cr_assert(f, "%s", path);
    fputs(text, f);
    cr_assert_eq(fclose(f), 0);
}

static pw_metrics *read_text(const char *text)
{
    pw_metrics *m = NULL;
    pw_status st = pw_metrics_read_memory(text, strlen(text), "m.jsonl", &m);
    cr_assert_eq(st, PW_OK, "%s", pw_last_error());
    return m;
}

static void expect_error(const char *text, const char *error)
{
    pw_metrics *m = NULL;
    pw_status st = pw_metrics_read_memory(text, strlen(text), "m.jsonl", &m);
    cr_assert_eq(st, PW_ERR_PARSE, "accepted: %s", text);
    cr_assert_null(m);
    cr_assert(strstr(pw_last_error(), error), "%s\n  got: %s\n  expected: %s", text, pw_last_error(), error);
}

/* The plot of `m` as a string. */
static char *plot_of(const pw_metrics *m, const char *title)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert(f);
    cr_assert_eq(pt_plot_write(f, m, title), 0);
    fclose(f);
    return buf;
}

/* ---------------------------------------------------------------- XML check */

static int name_char(int c) { return isalnum(c) || c == '_' || c == '-' || c == ':' || c == '.'; }

/* NULL when `s` is well-formed XML as far as these SVGs go (one root; tags
 * balanced; attributes name="value"; only the five entities and numeric
 * references; no '<' or bare '&' in text; no numbers spelt nan or inf),
 * else what is wrong. */
static const char *xml_problem(const char *s)
{
    static char why[160];
    const char *stack[64];
    size_t len[64];
    int depth = 0, roots = 0;
    const char *p = s;
    if (!strncmp(p, "<?xml", 5)) {
        if (!(p = strstr(p, "?>"))) return "unterminated XML declaration";
        p += 2;
    }
    while (*p) {
        if (*p == '&') {
            if (strncmp(p, "&amp;", 5) && strncmp(p, "&lt;", 4) && strncmp(p, "&gt;", 4) && strncmp(p, "&quot;", 6) &&
                strncmp(p, "&apos;", 6) && strncmp(p, "&#", 2))
                return "a bare '&'";
            p++;
            continue;
        }
        if (*p != '<') {
            if (depth == 0 && !isspace((unsigned char)*p)) return "text outside the root";
            p++;
            continue;
        }
        p++;
        if (*p == '/') {
            p++;
            const char *n = p;
            while (name_char(*p)) p++;
            if (!depth) return "an end tag without a start";
            depth--;
            if ((size_t)(p - n) != len[depth] || strncmp(n, stack[depth], len[depth])) {
                snprintf(why, sizeof why, "</%.*s> closes <%.*s>", (int)(p - n), n, (int)len[depth], stack[depth]);
                return why;
            }
            while (isspace((unsigned char)*p)) p++;
            if (*p++ != '>') return "a malformed end tag";
            continue;
        }
        const char *n = p;
        while (name_char(*p)) p++;
        if (p == n) return "a '<' that starts no tag";
        if (depth == 0 && roots++) return "two root elements";
        for (;;) {
            while (isspace((unsigned char)*p)) p++;
            if (*p == '>' || (p[0] == '/' && p[1] == '>')) break;
            const char *a = p;
            while (name_char(*p)) p++;
            if (p == a || *p != '=' || (p[1] != '"' && p[1] != '\'')) {
                snprintf(why, sizeof why, "a malformed attribute in <%.*s>: %.20s", (int)(p - n), n, a);
                return why;
            }
            const char q = p[1];
            const char *v = p + 2, *e = strchr(v, q);
            if (!e) return "an unterminated attribute value";
            for (const char *c = v; c < e; c++)
                if (*c == '<') return "'<' in an attribute";
            if (memmem(v, (size_t)(e - v), "nan", 3) || memmem(v, (size_t)(e - v), "inf", 3)) {
                snprintf(why, sizeof why, "a non-finite number in an attribute: %.*s", (int)(e - v), v);
                return why;
            }
            p = e + 1;
        }
        if (*p == '/') {
            p += 2;
            continue;
        }
        p++;
        if (depth == 64) return "nested too deep";
        stack[depth] = n;
        len[depth++] = (size_t)(name_char(*n) ? strspn(n, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-:.") : 0);
    }
    if (depth) return "unclosed elements at the end";
    if (!roots) return "no root element";
    return NULL;
}

static int count(const char *s, const char *needle)
{
    int n = 0;
    for (const char *p = s; (p = strstr(p, needle)); p++) n++;
    return n;
}

/* Points in the polyline of class `cls`, or -1 when there is none. */
static int polyline_points(const char *svg, const char *cls)
{
    char key[64];
    snprintf(key, sizeof key, "<polyline class=\"%s\"", cls);
    const char *p = strstr(svg, key);
    if (!p || !(p = strstr(p, "points=\""))) return -1;
    p += 8;
    const char *e = strchr(p, '"');
    int n = 0;
    for (const char *c = p; c < e; c++) n += *c == ',';
    return n;
}

/* ---------------------------------------------------------------- reader */

static const char k_good[] =
    "{\"type\":\"step\",\"step\":1,\"epoch\":0,\"loss\":2.5,\"lr\":0.001,\"grad_norm\":1.5,\"samples_per_s\":900,"
    "\"step_ms\":40.5,\"bubble_pct\":12.5,\"stage_busy_ms\":[20.1,19.8]}\n"
    "{\"type\":\"step\",\"step\":2,\"epoch\":0,\"loss\":2.25,\"lr\":0.001,\"grad_norm\":1.25,\"samples_per_s\":3100,"
    "\"step_ms\":11.5,\"bubble_pct\":11.5,\"stage_busy_ms\":[5.1,4.8],\"something_new\":{\"x\":[1,2]}}\n"
    "\n"
    "{\"type\":\"eval\",\"step\":2,\"epoch\":0,\"loss\":2.4,\"accuracy\":0.31}\r\n"
    "{\"type\":\"checkpoint\",\"step\":2,\"path\":\"a.safetensors\"}\n"
    "{\"type\":\"step\",\"step\":3,\"epoch\":1,\"loss\":2.0,\"lr\":0.0005,\"grad_norm\":1.0,\"samples_per_s\":3200,"
    "\"step_ms\":11.0,\"bubble_pct\":11.0,\"stage_busy_ms\":[5.0,4.9]}\n"
    "{\"type\":\"eval\",\"step\":3,\"epoch\":1,\"loss\":2.1,\"accuracy\":null}";

Test(metrics_plot, reads_every_known_value_in_order, TIMEOUT)
{
    pw_metrics *m = read_text(k_good);
    cr_assert_eq(m->lines, 7);
    cr_assert_eq(m->step_lines, 3);
    cr_assert_eq(m->eval_lines, 2);
    cr_assert_eq(m->ignored_lines, 1);
    cr_assert_eq(m->nonfinite, 0);
    const pw_metrics_series *loss = &m->series[PW_METRIC_LOSS];
    cr_assert_eq(loss->n, 3);
    cr_assert(loss->p[0].step == 1 && loss->p[0].value == 2.5 && loss->p[2].step == 3 && loss->p[2].value == 2.0);
    cr_assert_eq(m->series[PW_METRIC_SAMPLES_PER_S].p[1].value, 3100);
    cr_assert_eq(m->series[PW_METRIC_LR].p[2].value, 0.0005);
    cr_assert_eq(m->series[PW_METRIC_GRAD_NORM].n, 3);
    cr_assert_eq(m->series[PW_METRIC_STEP_MS].p[0].value, 40.5);
    cr_assert_eq(m->series[PW_METRIC_BUBBLE_PCT].p[1].value, 11.5);
    cr_assert_eq(m->series[PW_METRIC_EVAL_LOSS].n, 2);
    cr_assert_eq(m->series[PW_METRIC_EVAL_LOSS].p[1].value, 2.1);
    cr_assert_eq(m->series[PW_METRIC_EVAL_ACCURACY].n, 1); /* null: no accuracy, not a skipped value */
    cr_assert_eq(m->series[PW_METRIC_EVAL_ACCURACY].p[0].value, 0.31);
    cr_assert_eq(m->n_notes, 1);
    cr_assert(strstr(m->notes[0], "1 line of other types ignored"), "%s", m->notes[0]);
    pw_metrics_destroy(m);
    /* The file reader reads what the memory reader reads. */
    write_text(tmp_path("good.jsonl"), k_good);
    cr_assert_eq(pw_metrics_read(tmp_path("good.jsonl"), &m), PW_OK, "%s", pw_last_error());
    cr_assert_eq(m->series[PW_METRIC_LOSS].n, 3);
    cr_assert_str_eq(m->file, tmp_path("good.jsonl"));
    pw_metrics_destroy(m);
    cr_assert_eq(pw_metrics_read(tmp_path("missing.jsonl"), &m), PW_ERR_IO);
}

Test(metrics_plot, non_finite_values_are_skipped_with_a_note, TIMEOUT)
{
    pw_metrics *m = read_text("{\"type\":\"step\",\"step\":1,\"loss\":1.5,\"samples_per_s\":10}\n"
                              "{\"type\":\"step\",\"step\":2,\"loss\":NaN,\"samples_per_s\":Infinity}\n"
                              "{\"type\":\"step\",\"step\":3,\"loss\":-inf, \"samples_per_s\":null,\"grad_norm\":nan}\n"
                              "{\"type\":\"eval\",\"step\":3,\"loss\":NaN,\"accuracy\":NaN}\n"
                              "{\"type\":\"step\",\"step\":4,\"loss\":1.25,\"samples_per_s\":12,\"note\":\"NaN\","
                              "\"grad_norm\":null,\"lr\":null,\"stage_busy_ms\":[1,null]}\n");
    cr_assert_eq(m->series[PW_METRIC_LOSS].n, 2);
    cr_assert_eq(m->series[PW_METRIC_LOSS].p[1].step, 4);
    cr_assert_eq(m->series[PW_METRIC_SAMPLES_PER_S].n, 2);
    cr_assert_eq(m->series[PW_METRIC_EVAL_LOSS].n, 0);
    cr_assert_eq(m->series[PW_METRIC_EVAL_ACCURACY].n, 0);
    cr_assert_eq(m->nonfinite, 7);
    cr_assert_eq(m->n_notes, 1);
    cr_assert(strstr(m->notes[0], "m.jsonl: 7 values not finite (NaN, Infinity or null) left out; the first at line 2 "
                     "(\"loss\")"), "%s", m->notes[0]);
    char *svg = plot_of(m, NULL);
    cr_assert_null(xml_problem(svg), "%s", xml_problem(svg));
    cr_assert(strstr(svg, "7 non-finite values left out"));
    free(svg);
    pw_metrics_destroy(m);
}

/* Lines as `pipeline-run --metrics` writes them (tools/pipeline-run.c,
 * metrics_step / metrics_eval): grad_norm null without clipping, a language
 * model's eval line with accuracy null and its own members. */
Test(metrics_plot, reads_what_pipeline_run_writes, TIMEOUT)
{
    pw_metrics *m = read_text(
        "{\"type\":\"step\",\"step\":1,\"epoch\":1,\"loss\":5.54517746,\"lr\":0.003,\"grad_norm\":null,"
        "\"samples_per_s\":1517.21622,\"tokens_per_s\":97102.2381,\"step_ms\":21.0912,\"bubble_pct\":24.2165,"
        "\"stage_busy_ms\":[7.50312,8.12],\"elapsed_s\":0.0214}\n"
        "{\"type\":\"eval\",\"step\":1,\"epoch\":1,\"loss\":5.1,\"accuracy\":null,\"ppl\":164.0219,"
        "\"token_accuracy\":0.0512,\"unigram_entropy\":3.36,\"samples\":64,\"eval_ms\":3.2,\"elapsed_s\":0.03}\n");
    cr_assert_eq(m->nonfinite, 0);
    cr_assert_eq(m->n_notes, 0, "%s", m->n_notes ? m->notes[0] : "");
    cr_assert_eq(m->series[PW_METRIC_LOSS].n, 1);
    cr_assert_eq(m->series[PW_METRIC_GRAD_NORM].n, 0);
    cr_assert_eq(m->series[PW_METRIC_SAMPLES_PER_S].p[0].value, 1517.21622);
    cr_assert_eq(m->series[PW_METRIC_EVAL_LOSS].n, 1);
    cr_assert_eq(m->series[PW_METRIC_EVAL_ACCURACY].n, 0);
    pw_metrics_destroy(m);
}

Test(metrics_plot, malformed_lines_name_the_file_and_line, TIMEOUT)
{
    static const struct { const char *text, *error; } cases[] = {
        {"{\"type\":\"step\",\"step\":1}\nnot json\n", "m.jsonl:2: not a JSON object: "},
        {"[1, 2]\n", "m.jsonl:1: an array, expected a JSON object"},
        {"{\"type\":\"step\",\"step\":1,\"loss\":1}\n{\"type\":5}\n", "m.jsonl:2: \"type\" is a number, expected a string"},
        {"{\"type\":\"step\",\"loss\":1}\n", "m.jsonl:1: a step line without \"step\""},
        {"\n\n{\"type\":\"eval\",\"loss\":1}\n", "m.jsonl:3: an eval line without \"step\""},
        {"{\"type\":\"step\",\"step\":-1}\n", "m.jsonl:1: \"step\" is not an integer >= 0, expected an integer >= 0"},
        {"{\"type\":\"step\",\"step\":1.5}\n", "\"step\" is not an integer >= 0"},
        {"{\"type\":\"step\",\"step\":\"3\"}\n", "m.jsonl:1: \"step\" is a string, expected an integer >= 0"},
        {"{\"type\":\"step\",\"step\":NaN}\n", "m.jsonl:1: \"step\" is not finite"},
        {"{\"type\":\"step\",\"step\":1,\"loss\":\"low\"}\n", "m.jsonl:1: \"loss\" is a string, expected a number"},
        {"{\"type\":\"step\",\"step\":1,\"samples_per_s\":true}\n", "\"samples_per_s\" is a boolean, expected a number"},
        {"{\"type\":\"eval\",\"step\":1,\"accuracy\":[1]}\n", "\"accuracy\" is an array, expected a number"},
        {"{\"type\":\"step\",\"step\":1,\"epoch\":\"one\"}\n", "\"epoch\" is a string, expected a number"},
        {"{\"type\":\"step\",\"step\":1,\"stage_busy_ms\":3}\n", "\"stage_busy_ms\" is a number, expected an array"},
        {"{\"type\":\"step\",\"step\":1,\"stage_busy_ms\":[1,\"x\"]}\n", "\"stage_busy_ms\"[1] is a string"},
        {"{\"type\":\"step\",\"step\":1,\"loss\":1e999}\n", "m.jsonl:1: not a JSON object: real number overflow"},
        {"{\"type\":\"step\",\"step\":1,}\n", "m.jsonl:1: not a JSON object"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) expect_error(cases[i].text, cases[i].error);
    /* A line without end is refused before it is held whole. */
    const size_t big = PW_METRICS_MAX_LINE + 10;
    char *huge = malloc(big + 1);
    cr_assert(huge);
    memset(huge, ' ', big);
    huge[big] = 0;
    expect_error(huge, "m.jsonl:1: line longer than 1048576 bytes");
    free(huge);
    /* Embedded NUL bytes are an error, not a cut line. */
    pw_metrics *m = NULL;
    const char nul[] = "{\"type\":\"step\",\"step\":1}\n{\"type\":\0\"step\"}\n";
    cr_assert_eq(pw_metrics_read_memory(nul, sizeof nul - 1, "m.jsonl", &m), PW_ERR_PARSE);
    cr_assert(strstr(pw_last_error(), "m.jsonl:2: "), "%s", pw_last_error());
}

/* ---------------------------------------------------------------- plot */

Test(metrics_plot, the_svg_is_well_formed_and_holds_the_curves, TIMEOUT)
{
    pw_metrics *m = read_text(k_good);
    char *svg = plot_of(m, "curves <of> \"run\" & co");
    cr_assert_null(xml_problem(svg), "%s:\n%s", xml_problem(svg), svg);
    cr_assert_eq(polyline_points(svg, "loss"), 3, "%s", svg);
    cr_assert_eq(polyline_points(svg, "samples_per_s"), 3);
    cr_assert_eq(count(svg, "<circle cx="), 2 + 1, "two evaluation points and the legend's"); /* eval + legend */
    cr_assert(strstr(svg, "curves &lt;of&gt; &quot;run&quot; &amp; co"));
    cr_assert(strstr(svg, ">loss</text>") && strstr(svg, ">samples/s</text>") && strstr(svg, ">step</text>"));
    cr_assert(strstr(svg, "<title>step 3: eval loss 2.1</title>"), "%s", svg);
    cr_assert(strstr(svg, "3 steps, 2 evaluations; last loss 2 (step 3), last eval loss 2.1 (step 3)"), "%s", svg);
    /* Ticks: a label per grid line, with whole step numbers. */
    cr_assert(count(svg, "text-anchor=\"middle\">") >= 6);
    free(svg);
    pw_metrics_destroy(m);
}

Test(metrics_plot, empty_flat_huge_and_hostile_inputs_plot_cleanly, TIMEOUT)
{
    static const char *const inputs[] = {
        "",
        "{\"type\":\"eval\",\"step\":0,\"loss\":1}\n",
        "{\"type\":\"step\",\"step\":5,\"loss\":3,\"samples_per_s\":7}\n",
        "{\"type\":\"step\",\"step\":9223372036854775807,\"loss\":1.7976931348623157e308,\"samples_per_s\":-1.7976931348623157e308}\n"
        "{\"type\":\"step\",\"step\":0,\"loss\":-1.7976931348623157e308,\"samples_per_s\":5e-324}\n",
        "{\"type\":\"step\",\"step\":1,\"loss\":5e-324,\"samples_per_s\":5e-324}\n"
        "{\"type\":\"step\",\"step\":2,\"loss\":1e-323,\"samples_per_s\":0}\n",
        "{\"type\":\"step\",\"step\":1,\"loss\":1e300}\n{\"type\":\"step\",\"step\":2,\"loss\":1.0000000000000002e300}\n",
        "{\"type\":\"step\",\"step\":3,\"loss\":2}\n{\"type\":\"step\",\"step\":1,\"loss\":1}\n{\"type\":\"step\",\"step\":2,\"loss\":3}\n",
    };
    for (size_t i = 0; i < sizeof inputs / sizeof *inputs; i++) {
        pw_metrics *m = read_text(inputs[i]);
        char *svg = plot_of(m, NULL);
        cr_assert_null(xml_problem(svg), "input %zu: %s:\n%s", i, xml_problem(svg), svg);
        if (i == 0) cr_assert(strstr(svg, "no finite loss values in the file") && strstr(svg, "no finite samples/s"));
        free(svg);
        pw_metrics_destroy(m);
    }
}

Test(metrics_plot, long_runs_are_drawn_with_a_few_points_a_column, TIMEOUT)
{
    const int N = 200000;
    char *text = malloc((size_t)N * 80), *p = text;
    cr_assert(text);
    for (int s = 1; s <= N; s++)
        p += sprintf(p, "{\"type\":\"step\",\"step\":%d,\"loss\":%.6f,\"samples_per_s\":%d}\n", s, 2.0 / (1 + s * 1e-4) +
                     (s % 7) * 0.01, 3000 + s % 100);
    pw_metrics *m = read_text(text);
    free(text);
    cr_assert_eq(m->series[PW_METRIC_LOSS].n, N);
    char *svg = plot_of(m, NULL);
    cr_assert_null(xml_problem(svg));
    const int pts = polyline_points(svg, "loss");
    cr_assert(pts > 800 && pts <= 4 * 960, "%d points drawn", pts);
    cr_assert(strlen(svg) < 200000, "%zu bytes", strlen(svg));
    free(svg);
    pw_metrics_destroy(m);
}

Test(metrics_plot, cli_plot, TIMEOUT)
{
    write_text(tmp_path("good.jsonl"), k_good);
    char cmd[1024], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s --plot %s -o %s 2>&1", TOOL, tmp_path("good.jsonl"), tmp_path("c.svg"));
    cr_assert_eq(test_run(cmd, &out), 0, "%s", out);
    cr_assert(strstr(out, "note: ") && strstr(out, "1 line of other types ignored"), "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "cat %s", tmp_path("c.svg"));
    cr_assert_eq(test_run(cmd, &out), 0);
    cr_assert_null(xml_problem(out), "%s", xml_problem(out));
    cr_assert(strstr(out, "<polyline class=\"loss\"") && strstr(out, "<polyline class=\"samples_per_s\""));
    free(out);
    /* To stdout without -o; --title. */
    snprintf(cmd, sizeof cmd, "%s --plot %s --title 'my run' 2>/dev/null", TOOL, tmp_path("good.jsonl"));
    cr_assert_eq(test_run(cmd, &out), 0);
    cr_assert(strstr(out, ">my run</text>"));
    free(out);
    /* Malformed: exit 1 with FILE:LINE. */
    write_text(tmp_path("bad.jsonl"), "{\"type\":\"step\",\"step\":1}\n{\"type\":\"step\",\"step\":2,\"loss\":\"x\"}\n");
    snprintf(cmd, sizeof cmd, "%s --plot %s -o %s 2>&1", TOOL, tmp_path("bad.jsonl"), tmp_path("d.svg"));
    cr_assert_eq(test_run(cmd, &out), 1, "%s", out);
    cr_assert(strstr(out, "bad.jsonl:2: \"loss\" is a string, expected a number"), "%s", out);
    free(out);
    /* Usage: a trace beside --plot, -o without --plot, --plot with --merge. */
    snprintf(cmd, sizeof cmd, "%s --plot %s t.json 2>&1", TOOL, tmp_path("good.jsonl"));
    cr_assert_eq(test_run(cmd, &out), 2, "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "%s -o x.svg t.json 2>&1", TOOL);
    cr_assert_eq(test_run(cmd, &out), 2, "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "%s --plot %s --merge m.json 2>&1", TOOL, tmp_path("good.jsonl"));
    cr_assert_eq(test_run(cmd, &out), 2, "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "%s --plot %s/missing.jsonl 2>&1", TOOL, tmpdir());
    cr_assert_eq(test_run(cmd, &out), 1, "%s", out);
    free(out);
}

Test(metrics_plot, the_xml_checker_is_not_vacuous, TIMEOUT)
{
    static const char *const bad[] = {
        "<svg><g></svg>", "<svg a=1/>", "<svg>&x;</svg>", "<svg x=\"nan\"/>", "<svg/><svg/>", "<svg>",
        "</svg>", "<svg>a < b</svg>", "<svg y=\"-inf\"></svg>",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) cr_assert_not_null(xml_problem(bad[i]), "%s", bad[i]);
    cr_assert_null(xml_problem("<?xml version=\"1.0\"?>\n<svg a=\"1\"><g><t>x &amp; y</t></g><r/></svg>\n"));
}
