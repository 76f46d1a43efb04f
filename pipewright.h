/* pipewright — umbrella header: everything a custom trainer links against.
 *
 *     #include <pipewright/pipewright.h>
 *
 * See docs/api.md for a walk-through. */
#ifndef PIPEWRIGHT_H
#define PIPEWRIGHT_H

#include "runtime/status.h"
#include "runtime/log.h"
#include "runtime/tensor.h"
#include "runtime/rng.h"
#include "runtime/arena.h"
#include "runtime/safetensors.h"
#include "runtime/topology.h"
#include "runtime/trace.h"
#include "runtime/trace_read.h"
#include "scheduler/analysis/trace_analysis.h"
#include "runtime/collective.h"
#include "runtime/transport.h"
#include "graph/graph.h"
#include "graph/partition.h"
#include "scheduler/stage.h"
#include "scheduler/schedule.h"
#include "scheduler/simulate.h"
#include "scheduler/engine.h"
#include "scheduler/runner.h"
#include "stages/ops/optim.h"
#include "stages/train/data.h"
#include "stages/program/program.h"
#include "stages/train/program_stage.h"
#include "stages/train/checkpoint.h"
#include "stages/train/trainer.h"
#include "stages/train/pipeline.h"
#include "stages/train/state.h"
#include "stages/plan/forecast.h"
#include "stages/plan/profile.h"
#include "stages/plan/plan.h"
#include "stages/train/generate.h"

#endif
