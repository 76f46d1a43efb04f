/* A program built on an installed pipewright, the way a user builds one
 * (scripts/check-install.sh): it includes only <pipewright/...>, links
 * libpipewright (shared or static) and trains a small MLP through a 2-stage
 * 1F1B pipeline for a few steps on synthetic data. The same file is compiled
 * as C11 and as C++17, so it keeps to what both languages accept.
 *
 * Prints "consumer: N steps, loss A -> B" and exits 0 when every call
 * succeeded and the loss went down; otherwise prints pw_last_error() and
 * exits 1. */
#include <pipewright/pipewright.h>
#include <pipewright/scheduler/engine.h>
#include <stdio.h>
#include <string.h>

static const char graph_text[] =
    "graph consumer\n"
    "input x : f32[16]\n"
    "label y : i32[]\n"
    "h = linear(x, out=32)\n"
    "cut\n"
    "a = relu(h)\n"
    "logits = linear(a, out=4)\n"
    "loss = softmax_cross_entropy(logits, y)\n";

int main(void)
{
    enum { STEPS = 8 };
    pw_graph *g = NULL;
    pw_dataset *train = NULL;
    pw_pipeline *pl = NULL;
    double first = 0, last = 0;
    int steps = 0;

    pw_status st = pw_graph_parse_string(graph_text, strlen(graph_text), "consumer.graph", &g);
    if (st == PW_OK) st = pw_dataset_from_spec("synthetic:512:16:4", 1, &train);
    if (st == PW_OK) {
        pw_pipeline_config pc = pw_pipeline_defaults();
        pc.graph = g;
        pc.train = train;
        pc.batch = 64;
        pc.micro_batches = 4;
        pc.stages = 2;
        pc.schedule = PW_SCHEDULE_1F1B;
        pc.pin = 0;
        pc.threads = 1;
        st = pw_pipeline_create(&pc, &pl);
    }
    for (; st == PW_OK && steps < STEPS; steps++) {
        pw_step_stats s;
        st = pw_pipeline_step(pl, &s);
        if (steps == 0) first = s.loss;
        last = s.loss;
    }
    if (st != PW_OK) {
        fprintf(stderr, "consumer: %s: %s\n", pw_status_str(st), pw_last_error());
    } else {
        printf("consumer: %d steps, loss %.4f -> %.4f\n", steps, first, last);
        if (!(last < first)) {
            fprintf(stderr, "consumer: the loss did not go down\n");
            st = PW_ERR_NUMERIC;
        }
    }
    pw_pipeline_destroy(pl);
    pw_dataset_destroy(train);
    pw_graph_destroy(g);
    return st == PW_OK ? 0 : 1;
}
