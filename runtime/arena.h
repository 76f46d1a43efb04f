/* pipewright — plan-then-allocate memory arenas.
 *
 * Sizes are planned first (pw_arena_plan returns an offset), then the arena
 * allocates one block and pointers are resolved from offsets:
 *
 *     pw_arena a; pw_arena_init(&a, "stage 0 activations");
 *     size_t off_w = pw_arena_plan(&a, out * in * sizeof(float));
 *     PW_CHECK(pw_arena_commit(&a));         // one allocation, zeroed
 *     float *w = pw_arena_at(&a, off_w);     // (out, in)
 *
 * Every planned region is 64-byte aligned; the block is page-aligned and a
 * whole number of pages (so a device backend can page-lock it). Step
 * boundaries reuse the block; only pw_arena_release frees it.
 *
 * Ownership and threads: the pw_arena struct is the caller's; the block it
 * commits belongs to the arena until pw_arena_release frees it, and every
 * pointer from pw_arena_at is valid until then. Planning and committing are
 * not thread-safe (one thread); once committed, threads may use disjoint
 * parts of the block at once.
 */
#ifndef PW_RUNTIME_ARENA_H
#define PW_RUNTIME_ARENA_H

#include <stddef.h>

#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PW_ARENA_ALIGN 64

typedef struct pw_arena {
    const char *name;   /* for messages: "stage 1 parameters" */
    size_t size;        /* bytes planned so far */
    void *base;         /* NULL until committed */
} pw_arena;

void pw_arena_init(pw_arena *a, const char *name);
/* Reserves `bytes` (rounded up to the alignment); returns its offset. */
size_t pw_arena_plan(pw_arena *a, size_t bytes);
/* Allocates the planned size at once, zero-filled. */
pw_status pw_arena_commit(pw_arena *a);
static inline void *pw_arena_at(const pw_arena *a, size_t off) { return (char *)a->base + off; }
void pw_arena_release(pw_arena *a); /* accepts an uncommitted arena */

#ifdef __cplusplus
}
#endif
#endif
