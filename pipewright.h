/* pipewright — umbrella header: every public header, grouped by who needs it.
 *
 *     #include <pipewright/pipewright.h>          // cc ... $(pkg-config --cflags --libs pipewright)
 *
 * docs/api.md walks from an empty directory to a running custom pipeline;
 * docs/architecture.md maps the rooms these headers come from. Each header
 * says, per function, who owns what it returns, how long it lives and from
 * which threads it may be called. A program may include just the headers
 * of its group instead of this one. */
#ifndef PIPEWRIGHT_H
#define PIPEWRIGHT_H

/* ---- Everyone: errors, logging, random numbers, tensors and files. */
#include "runtime/status.h"      /* pw_status, pw_error, pw_last_error */
#include "runtime/log.h"         /* PW_DEBUG levels and subsystems */
#include "runtime/rng.h"         /* the documented RNG (weights, dropout) */
#include "runtime/tensor.h"      /* shapes and dtypes */
#include "runtime/arena.h"       /* plan-then-allocate memory */
#include "runtime/safetensors.h" /* reading and writing safetensors files */

/* ---- Custom-trainer authors: your own stage callbacks on the engine. */
#include "scheduler/stage.h"     /* pw_stage_i: the callbacks the engine drives */
#include "scheduler/schedule.h"  /* schedules: generate, lower, validate, CSV */
#include "scheduler/engine.h"    /* the engine itself */
#include "scheduler/runner.h"    /* the engine from a schedule name and a stage table */
#include "runtime/collective.h"  /* gradient buckets summed across replicas */
#include "runtime/compress.h"    /* ... compressed: bf16, fp16, top-k, PowerSGD */
#include "runtime/transport.h"   /* several processes: MPI */
#include "runtime/link.h"        /* a slow link for runs; --allreduce auto and hierarchical */
#include "runtime/topology.h"    /* hwloc topology and placement */
#include "runtime/trace.h"       /* recording a run's trace */
#include "runtime/metrics_log.h" /* a metrics log (JSON Lines) of your own figures */

/* ---- Graph users: a model as a graph file, trained through the library. */
#include "graph/graph.h"              /* parsing, shapes, costs */
#include "graph/partition.h"          /* cutting a graph into stages */
#include "stages/ops/optim.h"         /* SGD, AdamW, learning-rate schedules */
#include "stages/program/program.h"   /* a node range as a stage program */
#include "stages/ops/tp.h"            /* tensor-parallel ops and a program's group endpoint */
#include "stages/train/data.h"        /* data sets and samplers */
#include "stages/train/program_stage.h" /* a program as an engine chunk */
#include "stages/train/trainer.h"     /* one stage, the reference loop */
#include "stages/train/pipeline.h"    /* stages x replicas x schedule: pw_pipeline */
#include "stages/train/checkpoint.h"  /* weights: --save / --init-from files */
#include "stages/train/pipeline_metrics.h" /* a pipeline's metrics log (--metrics) */
#include "stages/train/state.h"       /* training state: checkpoints and resume */
#include "stages/train/generate.h"    /* sampling text from a trained model */
#include "stages/train/ps.h"          /* parameter servers: --sync ps */

/* ---- Planners and tool builders: forecasts, plans, trace analysis. */
#include "scheduler/simulate.h"              /* simulating a schedule's step */
#include "stages/plan/forecast.h"            /* forecasting layouts, calibration */
#include "stages/plan/profile.h"             /* measured op times */
#include "stages/plan/plan.h"                /* the whole layout: partition, schedule, placement */
#include "stages/plan/layout.h"              /* searching stages x replicas x threads x schedule */
#include "stages/train/rebalance.h"          /* moving a running pipeline's cuts */
#include "stages/plan/rebalancer.h"          /* when and where to move them */
#include "runtime/trace_read.h"              /* reading traces */
#include "scheduler/analysis/trace_analysis.h" /* bubbles and their causes (pipe-trace) */

#endif
