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
#include "graph/graph.h"
#include "scheduler/stage.h"
#include "stages/optim.h"
#include "stages/data.h"
#include "stages/program.h"
#include "stages/checkpoint.h"
#include "stages/trainer.h"

#endif
