/* Tests: forecasts (partition + cost model + simulator) and --schedule auto. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"
#include "stages/forecast.h"

#define TIMEOUT 120

static pw_graph *chain(int layers, int width)
{
    char text[1 << 15];
    size_t off = (size_t)snprintf(text, sizeof text, "input x : f32[%d]\nlabel y : i32[]\nh0 = relu(x)\n", width);
    for (int l = 0; l < layers; l++)
        off += (size_t)snprintf(text + off, sizeof text - off, "l%d = linear(h%d, out=%d)\nh%d = relu(l%d)\n",
                                l, l, width, l + 1, l);
    snprintf(text + off, sizeof text - off, "o = linear(h%d, out=10)\nloss = softmax_cross_entropy(o, y)\n",
             layers);
    pw_graph *g;
    cr_assert_eq(pw_graph_parse_string(text, strlen(text), "chain.graph", &g), PW_OK, "%s", pw_last_error());
    return g;
}

Test(forecast, bubbles_follow_the_schedules, .timeout = TIMEOUT)
{
    pw_graph *g = chain(32, 256);
    pw_forecast_config c = pw_forecast_defaults();
    c.graph = g;
    c.stages = 4;
    c.micro_batches = 16;
    c.micro_batch_size = 8;
    c.link_latency_s = 0;
    c.link_bandwidth = 1e15;
    double bubble[8];
    pw_schedule_kind kinds[] = {PW_SCHEDULE_GPIPE, PW_SCHEDULE_1F1B, PW_SCHEDULE_INTERLEAVED,
                                PW_SCHEDULE_ZB_H1, PW_SCHEDULE_ZB_V};
    for (int i = 0; i < 5; i++) {
        c.schedule = kinds[i];
        pw_forecast f;
        cr_assert_eq(pw_forecast_run(&c, &f), PW_OK, "%s", pw_last_error());
        bubble[i] = f.bubble;
        cr_log_info("%s: step %.3f ms, bubble %.1f%%", pw_schedule_kind_name(kinds[i]),
                    f.step_time * 1e3, 100 * f.bubble);
        cr_assert_gt(f.step_time, 0);
        pw_forecast_free(&f);
    }
    /* Near-balanced stages: 1F1B close to (p-1)/(m+p-1) = 15.8%; the others lower. */
    cr_assert_float_eq(bubble[1], 3.0 / 19.0, 0.05, "1f1b bubble %.3f", bubble[1]);
    cr_assert_lt(bubble[2], bubble[1]);
    cr_assert_lt(bubble[3], bubble[1]);
    cr_assert_lt(bubble[4], bubble[3]);
    pw_graph_destroy(g);
}

Test(forecast, plans_past_this_machine, .timeout = TIMEOUT)
{
    pw_graph *g = chain(200, 512);
    pw_forecast_config c = pw_forecast_defaults();
    c.graph = g;
    c.stages = 64;
    c.replicas = 8;
    c.micro_batches = 256;
    c.micro_batch_size = 4;
    pw_forecast f;
    cr_assert_eq(pw_forecast_run(&c, &f), PW_OK, "%s", pw_last_error());
    cr_assert_eq(f.n_ranks, 64);
    cr_assert_gt(f.samples_per_s, 0);
    pw_forecast_free(&f);
    pw_graph_destroy(g);
}

Test(forecast, auto_picks_the_fastest_that_fits_or_says_why_not, .timeout = TIMEOUT)
{
    pw_graph *g = chain(16, 256);
    pw_forecast_config c = pw_forecast_defaults();
    c.graph = g;
    c.stages = 4;
    c.micro_batches = 8;
    c.micro_batch_size = 8;
    char *buf = NULL;
    size_t len = 0;
    FILE *rep = open_memstream(&buf, &len);
    pw_forecast best;
    cr_assert_eq(pw_forecast_auto(&c, &best, rep), PW_OK, "%s", pw_last_error());
    fclose(rep);
    cr_assert(strstr(buf, "chose"), "%s", buf);
    cr_assert(strstr(buf, "1f1b"), "%s", buf);
    cr_log_info("%s", buf);
    /* The choice is at least as fast as 1F1B. */
    c.schedule = PW_SCHEDULE_1F1B;
    pw_forecast one;
    cr_assert_eq(pw_forecast_run(&c, &one), PW_OK);
    cr_assert_leq(best.step_time, one.step_time * (1 + 1e-12));
    pw_forecast_free(&one);
    pw_forecast_free(&best);
    free(buf);
    c.memory_budget = 1000; /* bytes: nothing fits */
    cr_assert_eq(pw_forecast_auto(&c, &best, NULL), PW_ERR_NOMEM);
    cr_assert(strstr(pw_last_error(), "memory budget"), "%s", pw_last_error());
    pw_graph_destroy(g);
}
