/* pipewright — plan-then-allocate arenas. */
#include "runtime/arena.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/log.h"

void pw_arena_init(pw_arena *a, const char *name)
{
    a->name = name;
    a->size = 0;
    a->base = NULL;
}

size_t pw_arena_plan(pw_arena *a, size_t bytes)
{
    size_t off = a->size;
    a->size += (bytes + PW_ARENA_ALIGN - 1) / PW_ARENA_ALIGN * PW_ARENA_ALIGN;
    return off;
}

pw_status pw_arena_commit(pw_arena *a)
{
    PW_ASSERT(a->base == NULL);
    /* Whole pages, page-aligned: a device backend may page-lock the block
     * (stages/ops/backend.h, host_register), which must not share a page with
     * other memory. */
    long pg = sysconf(_SC_PAGESIZE);
    size_t page = pg >= PW_ARENA_ALIGN ? (size_t)pg : PW_ARENA_ALIGN;
    size_t sz = a->size ? (a->size + page - 1) / page * page : page;
    void *p = NULL;
    if (posix_memalign(&p, page, sz) != 0)
        return pw_error(PW_ERR_NOMEM, "%s: cannot allocate %zu bytes", a->name, sz);
    memset(p, 0, sz);
    a->base = p;
    PW_INFO(PW_SUB_MEM, "%s: %zu bytes", a->name, sz);
    return PW_OK;
}

void pw_arena_release(pw_arena *a)
{
    if (!a) return;
    free(a->base);
    a->base = NULL;
    a->size = 0;
}
