/* libFuzzer harness: the pipeline-run flag parser (parse_args in
 * tools/pipeline-run.c, static there, so the tool is compiled into this
 * harness with its main renamed). The input is split at NUL and newline bytes
 * into at most 64 arguments after "pipeline-run"; every argument list must
 * give run (0), help (1) or a usage error (2), never a crash or UB; the
 * values kept as text (--memory-budget, --device-speeds, --gpu-memory) are
 * then parsed as a run parses them. The
 * parser prints usage errors to stderr: run with -close_fd_mask=3
 * (scripts/fuzz.sh does). Seeds: tests/fuzz/corpus/flags/. */
#define main pipeline_run_main
#include "tools/pipeline-run.c"
#undef main

#include "tests/fuzz/fuzz_util.h"

#define MAX_ARGS 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int once;
    if (!once++) fuzz_quiet();
    char *buf = malloc(size + 1);
    if (!buf) return 0;
    memcpy(buf, data, size);
    buf[size] = '\0';
    char *argv[MAX_ARGS + 2];
    int argc = 0;
    argv[argc++] = "pipeline-run";
    char *p = buf, *end = buf + size;
    while (p < end && argc <= MAX_ARGS) {
        char *q = p;
        while (q < end && *q != '\0' && *q != '\n') q++;
        *q = '\0';
        argv[argc++] = p;
        p = q + 1;
    }
    argv[argc] = NULL;
    options o;
    optind = 0; /* glibc: full re-initialisation of getopt for each input */
    int rc = parse_args(argc, argv, &o);
    if (rc < 0 || rc > 2) abort();
    if (rc == 0) {
        /* The values parse_args keeps as text, parsed as the run would. */
        int64_t bytes;
        int brc = one_budget(&o, &bytes);
        if (brc != 0 && brc != 2) abort();
        pw_device_spec *devs = NULL;
        if ((o.device_speeds || o.memory_budget) &&
            pw_plan_parse_devices(o.device_speeds, o.memory_budget, o.stages, &devs) == PW_OK)
            free(devs);
        if (o.gpu_memory) (void)pw_parse_bytes(o.gpu_memory, &bytes);
    }
    free(buf);
    return 0;
}
