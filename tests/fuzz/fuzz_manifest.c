/* libFuzzer harness: the training-state checkpoint's manifest reader
 * (stages/train/state.c, pw_state_open_manifest) and the resume check against a
 * graph and run settings (pw_state_check), which read every field the
 * manifest may hold. The tensor files it names are read by the safetensors
 * reader (fuzz_safetensors.c). Seeds: tests/fuzz/corpus/manifest/ (a
 * one-process checkpoint's manifest and an MPI run's, with shards). */
#include "graph/graph.h"
#include "stages/train/state.h"
#include "tests/fuzz/fuzz_util.h"

static const char graph_text[] = "graph cli_mlp\n"
                                 "input x : f32[24]\n"
                                 "label y : i32[]\n"
                                 "h1 = linear(x, out=32) as fc1\n"
                                 "a1 = relu(h1)\n"
                                 "h2 = linear(a1, out=32) as fc2\n"
                                 "a2 = relu(h2)\n"
                                 "logits = linear(a2, out=5) as head\n"
                                 "loss = softmax_cross_entropy(logits, y)\n";

static volatile size_t sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static pw_graph *g;
    if (!g) {
        fuzz_quiet();
        if (pw_graph_parse_string(graph_text, sizeof graph_text - 1, "fuzz.graph", &g) != PW_OK) abort();
    }
    fuzz_file f = fuzz_file_open(data, size, "manifest.json");
    pw_state *s = NULL;
    if (pw_state_open_manifest(f.path, &s) == PW_OK) {
        const pw_state_meta *m = pw_state_get_meta(s);
        sink = strlen(m->path) + strlen(m->version) + strlen(m->run.data) + strlen(m->layout.schedule) +
               (size_t)m->step + (size_t)m->layout.stages;
        pw_state_run run = {.data = "synthetic:512:24:5", .train_samples = 512, .batch = 48, .micro_batch = 8,
                            .grad_groups = 2, .seed = 1, .shuffle = 1, .optim = pw_optim_defaults(PW_OPTIM_ADAMW)};
        (void)pw_state_check(s, g, &run);
    }
    pw_state_close(s);
    fuzz_file_close(&f);
    return 0;
}
