/* pipewright — partitioning a graph into contiguous pipeline stages.
 *
 * A partition cuts the graph's nodes (in topological order) into n_stages
 * contiguous ranges. Two ways for now; the memory- and time-aware
 * partitioner replaces pw_partition_balanced behind the same struct.
 *
 *     pw_partition pt;
 *     PW_CHECK(pw_partition_make(g, 4, PW_PARTITION_AUTO, &pt));
 *     for (int s = 0; s < pt.n_stages; s++)
 *         printf("stage %d: nodes [%d, %d)\n", s, pt.begin[s], pt.begin[s + 1]);
 *     pw_partition_free(&pt);
 */
#ifndef PW_GRAPH_PARTITION_H
#define PW_GRAPH_PARTITION_H

#include "graph/graph.h"
#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pw_partition_method {
    PW_PARTITION_AUTO = 0,  /* the graph's `cut` markers when they make exactly
                               n_stages stages, else FLOPS */
    PW_PARTITION_CUTS,      /* the `cut` markers; an error when they make a
                               different number of stages */
    PW_PARTITION_FLOPS,     /* contiguous ranges minimising the largest stage's
                               forward + backward FLOPs */
} pw_partition_method;

typedef struct pw_partition {
    int n_stages;
    int *begin;             /* [n_stages + 1]: stage s runs nodes [begin[s], begin[s+1]) */
    double *flops;          /* [n_stages]: per-sample fwd + bwd FLOPs of each stage */
    pw_partition_method method; /* the method actually used (never AUTO) */
} pw_partition;

/* PW_ERR_INVALID_ARG when n_stages < 1, exceeds the node count, or CUTS does
 * not match the markers (the message says how many stages the markers make). */
pw_status pw_partition_make(const pw_graph *g, int n_stages, pw_partition_method method,
                            pw_partition *out);
void pw_partition_free(pw_partition *p);
/* "auto" / "cuts" / "flops". */
pw_status pw_partition_method_parse(const char *s, pw_partition_method *out);
const char *pw_partition_method_name(pw_partition_method m);

#ifdef __cplusplus
}
#endif
#endif
