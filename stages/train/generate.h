/* pipewright — text generation through a pipeline's stage programs.
 *
 * Byte-level sampling from a trained language model (a graph whose input is
 * i32 [T] tokens and whose loss reads logits [T, V]): the window of the last
 * T tokens (the prompt, then what has been sampled) is written at positions
 * 0 .. n−1 of row 0, the rest padded with zeros; every program of replica 0
 * runs pw_program_forward_eval in stage order with its stage-to-stage ports
 * bound to link buffers (as pw_pipeline_evaluate does); the logits at the
 * last real position n−1 give the next token. Causal attention makes the
 * padding after n−1 harmless.
 *
 *     pw_generate_config gc = pw_generate_defaults();
 *     gc.graph = g; gc.prompt = "The "; gc.tokens = 100; gc.temperature = 0.8; gc.top_k = 40;
 *     char *text = NULL;
 *     PW_CHECK(pw_generate(pl, &gc, &text));   // the prompt and what followed
 *     fputs(text, stdout);
 *     free(text);
 *
 * Sampling: softmax(logits / temperature) over the top_k largest logits
 * (0: all), drawn with pw_rng from `seed` and the token index, so the text
 * is a pure function of the weights, prompt and config. temperature 0 is
 * greedy (argmax). One process only (no transport).
 *
 * Ownership and threads: pw_generate borrows the pipeline and the graph for
 * the call and returns a new string owned by the caller (free()); it drives
 * the pipeline, so the one thread that drives it calls it, between steps.
 * pw_generate_dataset returns a new data set (pw_dataset_destroy).
 */
#ifndef PW_STAGES_GENERATE_H
#define PW_STAGES_GENERATE_H

#include <stddef.h>
#include <stdint.h>

#include "runtime/status.h"
#include "stages/train/pipeline.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_generate_config {
    const pw_graph *graph;  /* the graph the pipeline was built from */
    const char *prompt;     /* bytes; "" or NULL: start from "\n" */
    int64_t tokens;         /* how many to sample (>= 0) */
    double temperature;     /* > 0; 0: greedy */
    int top_k;              /* keep the k largest logits; 0: all */
    uint64_t seed;
} pw_generate_config;

/* tokens 200, temperature 1, top_k 0, seed 1. */
pw_generate_config pw_generate_defaults(void);

/* Samples cfg->tokens bytes after the prompt. PW_OK: *out is a new
 * NUL-terminated string (free()) holding the prompt followed by the sampled
 * bytes. An empty prompt starts from a newline. Errors: PW_ERR_INVALID_ARG
 * (a bad config; a pipeline with a transport), PW_ERR_SHAPE (the graph's
 * input is not i32 [T], or its loss does not read [T, V] logits; the
 * message names the graph), PW_ERR_NOMEM, or a program's error. */
pw_status pw_generate(pw_pipeline *pl, const pw_generate_config *cfg, char **out);

/* The one-window byte data set a pipeline for pw_generate is built over
 * when no training data is loaded (a checkpoint is): one zero window of the
 * graph's T tokens, byte vocabulary. PW_OK: *out is new
 * (pw_dataset_destroy). PW_ERR_SHAPE when the graph's input is not i32 [T]
 * (the message names the graph and its input), PW_ERR_NOMEM. */
pw_status pw_generate_dataset(const pw_graph *g, pw_dataset **out);

#ifdef __cplusplus
}
#endif
#endif
