/* pipewright — ASCII timeline of a schedule (docs and debugging).
 *
 *   1f1b: 4 ranks, 8 micro-batches; unit-cost makespan 22, bubble 27.3% (theory 27.3%)
 *   rank 0 | F0 F1 F2 F3 .. .. B0 F4 .. B1 F5 ...
 *
 * Each compute action sits at the step where the validator's unit-cost replay
 * starts it; communication takes no time and is not drawn. */
#include <stdlib.h>
#include <string.h>

#include "scheduler/schedule-internal.h"
#include "scheduler/schedule.h"

static int is_compute(pw_action_kind k) { return k == PW_ACT_F || k == PW_ACT_B || k == PW_ACT_W; }

/* "F3", or "1F3" when ranks hold several chunks. */
static int label(const pw_schedule *s, const pw_action *a, char *buf, size_t n)
{
    const char *k = a->kind == PW_ACT_F ? "F" : a->kind == PW_ACT_B ? "B" : "W";
    if (s->chunks_per_rank == 1) return snprintf(buf, n, "%s%d", k, (int)a->mb);
    return snprintf(buf, n, "%d%s%d", (int)a->chunk, k, (int)a->mb);
}

static void print_lists(const pw_schedule *s, FILE *f)
{
    for (int r = 0; r < s->n_ranks; r++) {
        fprintf(f, "rank %d:", r);
        for (int i = 0; i < s->ranks[r].n_actions; i++) {
            char cell[48];
            pw_action_format(&s->ranks[r].actions[i], s->chunks_per_rank == 1, cell, sizeof cell);
            fprintf(f, " %s", cell);
        }
        fputc('\n', f);
    }
}

pw_status pw_schedule_print(const pw_schedule *s, FILE *f)
{
    if (!s || !f) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_print: NULL argument");
    PW_CHECK(pw_sched_check_shape(s));
    int64_t total = 0;
    for (int r = 0; r < s->n_ranks; r++) total += s->ranks[r].n_actions;
    uint32_t *start = malloc((size_t)(total ? total : 1) * sizeof *start);
    if (!start) return pw_error(PW_ERR_NOMEM, "schedule print: out of memory");

    char title[200], chunks[64] = "";
    if (s->chunks_per_rank > 1)
        snprintf(chunks, sizeof chunks, " x %d chunks%s", s->chunks_per_rank,
                 !s->chunk_rank ? ""
                 : pw_sched_is_v_placement(s->n_ranks, s->n_chunks, s->chunk_rank) ? " (V placement)"
                                                                                   : " (custom placement)");
    snprintf(title, sizeof title, "%s: %d rank%s%s, %d micro-batch%s%s",
             pw_schedule_kind_name(s->kind), s->n_ranks, s->n_ranks == 1 ? "" : "s", chunks,
             s->n_micro, s->n_micro == 1 ? "" : "es", s->split_w ? ", split W" : "");

    pw_status st = pw_sched_replay(s, NULL, start);
    if (st != PW_OK) {
        /* Still show what is there; the message says why there is no timeline. */
        fprintf(f, "%s (no timeline: %s)\n", title, pw_last_error());
        print_lists(s, f);
        free(start);
        return ferror(f) ? pw_error(PW_ERR_IO, "schedule print: write error") : PW_OK;
    }

    /* Lay the compute actions out on the unit-cost clock. */
    int64_t makespan = 0, busy = 0, off = 0;
    int width = 1;
    for (int r = 0; r < s->n_ranks; r++) {
        for (int i = 0; i < s->ranks[r].n_actions; i++) {
            const pw_action *a = &s->ranks[r].actions[i];
            if (!is_compute(a->kind)) continue;
            char cell[48];
            int w = label(s, a, cell, sizeof cell);
            if (w > width) width = w;
            if ((int64_t)start[off + i] + 1 > makespan) makespan = (int64_t)start[off + i] + 1;
            busy++;
        }
        off += s->ranks[r].n_actions;
    }
    double bubble = makespan ? 1.0 - (double)busy / ((double)s->n_ranks * (double)makespan) : 0.0;
    fprintf(f, "%s; unit-cost makespan %lld, bubble %.1f%%", title, (long long)makespan,
            100.0 * bubble);
    /* The closed form of the generator this schedule claims to come from. */
    pw_schedule_config cfg = {
        .kind = s->kind, .n_stages = s->n_ranks, .n_micro = s->n_micro, .split_w = s->split_w,
        .chunks_per_rank = s->chunks_per_rank,
    };
    double theory = s->kind == PW_SCHEDULE_CUSTOM ? -1.0 : pw_schedule_config_bubble(&cfg);
    if (theory >= 0) fprintf(f, " (theory %.1f%%)", 100.0 * theory);
    fputc('\n', f);

    int *slot = malloc((size_t)(makespan ? makespan : 1) * sizeof *slot);
    if (!slot) {
        free(start);
        return pw_error(PW_ERR_NOMEM, "schedule print: out of memory");
    }
    int rw = snprintf(NULL, 0, "%d", s->n_ranks - 1);
    off = 0;
    for (int r = 0; r < s->n_ranks; r++) {
        const pw_rank_program *p = &s->ranks[r];
        for (int64_t t = 0; t < makespan; t++) slot[t] = -1;
        for (int i = 0; i < p->n_actions; i++)
            if (is_compute(p->actions[i].kind)) slot[start[off + i]] = i;
        fprintf(f, "rank %*d |", rw, r);
        for (int64_t t = 0; t < makespan; t++) {
            char cell[48];
            if (slot[t] >= 0) {
                label(s, &p->actions[slot[t]], cell, sizeof cell);
            } else {
                memset(cell, '.', (size_t)width);
                cell[width > 2 ? 2 : width] = '\0'; /* ".." reads as idle without shouting */
            }
            fprintf(f, " %-*s", t + 1 < makespan ? width : 0, cell);
        }
        fputc('\n', f);
        off += p->n_actions;
    }
    free(slot);
    free(start);
    return ferror(f) ? pw_error(PW_ERR_IO, "schedule print: write error") : PW_OK;
}
