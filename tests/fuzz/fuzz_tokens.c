/* libFuzzer harness: the llm.c token shard reader (stages/train/data_tokens.c,
 * pw_dataset_load_tokens). Byte 0 picks the split (bit 0), the context
 * (bits 1-6 give 1..64) and a headers-only load (bit 7: no side wanted, as
 * a middle pipeline stage loads); byte 1 bit 0 makes two files, the first
 * bytes 2-3 (little-endian, modulo what is left + 1) long, given as the
 * training and the held-out shard; the rest is the file(s). A data set that
 * loads is gathered from (first and last window: every id below n_tokens /
 * n_classes), its entropy computed, and checked against a GPT of vocabulary
 * 300, which names the first id out of range by shard and position, as
 * pipeline-run does. Seeds: tests/fuzz/corpus/tokens/. */
#include "graph/graph.h"
#include "stages/train/data.h"
#include "tests/fuzz/fuzz_util.h"

static const char *const GPT =
    "graph fuzz_gpt\n"
    "input tokens : i32[4]\n"
    "label next : i32[4]\n"
    "tok = embedding(tokens, vocab=300, dim=8) as wte\n"
    "logits = linear(tok, out=300, bias=false, weight=wte.weight) as lm_head\n"
    "loss = softmax_cross_entropy(logits, next)\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int once;
    static pw_graph *g;
    if (!once++) {
        fuzz_quiet();
        if (pw_graph_parse_string(GPT, strlen(GPT), "fuzz.graph", &g) != PW_OK) abort();
    }
    unsigned b0 = (unsigned)fuzz_take(&data, &size, 1), b1 = (unsigned)fuzz_take(&data, &size, 1);
    size_t first = size;
    if (b1 & 1) first = (size_t)fuzz_take(&data, &size, 2) % (size + 1);
    fuzz_file f1 = fuzz_file_open(data, first, "train.bin");
    fuzz_file f2 = fuzz_file_open(data + first, size - first, "val.bin");
    pw_tokens_config tc = {.train = f1.path, .heldout = (b1 & 1) ? f2.path : NULL,
                           .context = (int64_t)((b0 >> 1) & 63) + 1, .test = b0 & 1,
                           .missing = (b0 & 0x80) ? PW_DATA_ALL : 0};
    pw_dataset *d = NULL;
    if (pw_dataset_load_tokens(&tc, &d) == PW_OK) {
        const int64_t T = tc.context;
        if (d->n < 1 || d->sample_numel != T || d->x_dtype != PW_I32) abort();
        if (!(b0 & 0x80)) {
            int64_t idx[2] = {0, d->n - 1};
            int32_t *x = malloc(2 * sizeof(int32_t) * (size_t)T), *y = malloc(2 * sizeof(int32_t) * (size_t)T);
            if (!x || !y || pw_dataset_gather(d, idx, 2, x, y) != PW_OK) abort();
            for (int64_t i = 0; i < 2 * T; i++)
                if (x[i] < 0 || x[i] >= d->n_tokens || y[i] < 0 || y[i] >= d->n_classes) abort();
            free(x);
            free(y);
        }
        (void)pw_dataset_unigram_entropy(d);
        /* A context other than the graph's is a shape error before any id. */
        pw_status st = pw_dataset_check_graph(g, d);
        if (st != PW_OK && st != PW_ERR_SHAPE) abort();
    }
    pw_dataset_destroy(d);
    fuzz_file_close(&f1);
    fuzz_file_close(&f2);
    return 0;
}
