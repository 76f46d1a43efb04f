/* Tests: forecasts (partition + cost model + simulator) and --schedule auto. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"
#include "stages/plan/forecast.h"

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

/* ---- forecasts on a topology: placement-derived links (issue 6) ---- */

#include <time.h>

#include "graph/partition.h"
#include "runtime/topology.h"

static hwloc_topology_t topology(const char *spec)
{
    hwloc_topology_t t;
    cr_assert_eq(pw_topology_load_spec(spec, &t), PW_OK, "%s: %s", spec, pw_last_error());
    return t;
}

/* Two stages, one micro-batch: the step is F0, the activation on link 0 -> 1,
 * F1, B1, the gradient on link 1 -> 0, B0, OPTIM on rank 0, so a slower
 * link adds exactly twice its extra time per message (to the nanosecond
 * rounding of each message). */
static pw_forecast two_stages_on(const char *spec, double host_bw, int64_t *bytes)
{
    pw_graph *g = chain(8, 256);
    pw_forecast_config c = pw_forecast_defaults();
    c.graph = g;
    c.stages = 2;
    c.micro_batches = 1;
    c.micro_batch_size = 16;
    c.schedule = PW_SCHEDULE_GPIPE;
    c.topology = topology(spec);
    c.host_bandwidth = host_bw;
    pw_forecast f;
    cr_assert_eq(pw_forecast_run(&c, &f), PW_OK, "%s: %s", spec, pw_last_error());
    cr_assert_eq(f.n_links, 1, "%s", spec);
    cr_assert_eq(f.links[0].src, 0);
    cr_assert_eq(f.links[0].dst, 1);
    *bytes = f.links[0].bytes;
    hwloc_topology_destroy(c.topology);
    pw_graph_destroy(g);
    return f;
}

Test(forecast_topology, a_slow_link_adds_its_time_twice_per_micro_batch, .timeout = TIMEOUT)
{
    int64_t bytes, b2, b3;
    pw_forecast near = two_stages_on("pack:1 numa:1 core:2 pu:1", -1, &bytes);
    pw_forecast far = two_stages_on("pack:2 numa:1 core:1 pu:1", -1, &b2);
    pw_forecast hosts = two_stages_on("group:2 pack:2 core:1 pu:1", 1e9, &b3);
    /* One [256] f32 activation per sample crosses, 16 samples. */
    cr_assert_eq(bytes, 256 * 4 * 16);
    cr_assert_eq(b2, bytes);
    cr_assert_eq(b3, bytes);
    cr_assert_eq(near.links[0].cls, PW_LINK_NUMA);
    cr_assert_eq(far.links[0].cls, PW_LINK_PACKAGES);
    cr_assert_eq(hosts.links[0].cls, PW_LINK_HOSTS);
    cr_assert_eq(hosts.n_hosts, 2);
    cr_assert_eq(near.n_hosts, 1);
    /* The figures are the documented defaults (hosts: the override). */
    double lat_n, bw_n, lat_f, bw_f, lat_h;
    pw_link_default(PW_LINK_NUMA, 0, &lat_n, &bw_n);
    pw_link_default(PW_LINK_PACKAGES, 0, &lat_f, &bw_f);
    pw_link_default(PW_LINK_HOSTS, 0, &lat_h, NULL);
    cr_assert_float_eq(near.links[0].time, lat_n + (double)bytes / bw_n, 1e-12);
    cr_assert_float_eq(far.links[0].time, lat_f + (double)bytes / bw_f, 1e-12);
    cr_assert_float_eq(hosts.links[0].time, lat_h + (double)bytes / 1e9, 1e-12);
    /* By hand: 2 x (the slower link's time - the faster one's). */
    double want_far = 2 * (far.links[0].time - near.links[0].time);
    double want_hosts = 2 * (hosts.links[0].time - near.links[0].time);
    cr_log_info("step %.3f us near, %.3f us across packages (+%.3f), %.3f us across hosts (+%.3f)",
                near.step_time * 1e6, far.step_time * 1e6, want_far * 1e6, hosts.step_time * 1e6,
                want_hosts * 1e6);
    cr_assert_float_eq(far.step_time - near.step_time, want_far, 4e-9, "%.9f vs %.9f",
                       far.step_time - near.step_time, want_far);
    cr_assert_float_eq(hosts.step_time - near.step_time, want_hosts, 4e-9, "%.9f vs %.9f",
                       hosts.step_time - near.step_time, want_hosts);
    cr_assert_gt(want_hosts, want_far);
    pw_forecast_free(&near);
    pw_forecast_free(&far);
    pw_forecast_free(&hosts);
}

Test(forecast_topology, all_reduce_rings_take_their_slowest_hop, .timeout = TIMEOUT)
{
    pw_graph *g = chain(8, 256);
    pw_forecast_config c = pw_forecast_defaults();
    c.graph = g;
    c.stages = 2;
    c.replicas = 2;
    c.micro_batches = 2;
    c.micro_batch_size = 4;
    /* Replica 0 on host 0, replica 1 on host 1: each ring hop leaves a host.
     * (A Group holding one package is merged into it by hwloc: hosts of a
     * synthetic cluster need two packages or more.) */
    c.topology = topology("group:2 pack:2 core:1 pu:1");
    pw_forecast f;
    cr_assert_eq(pw_forecast_run(&c, &f), PW_OK, "%s", pw_last_error());
    cr_assert_eq(f.n_hosts, 2);
    cr_assert_eq(f.allreduce_cls, PW_LINK_HOSTS);
    cr_assert_eq(f.links[0].cls, PW_LINK_PACKAGES, "the pipeline stays on its host");
    /* The ring of stage 0's parameters at the host figures. */
    int64_t params = 0;
    pw_partition part;
    cr_assert_eq(pw_partition_make(g, 2, PW_PARTITION_FLOPS, &part), PW_OK);
    for (int i = part.begin[f.allreduce_stage]; i < part.begin[f.allreduce_stage + 1]; i++) {
        pw_op_cost oc;
        if (pw_graph_node_cost(g, i, &oc) == PW_OK) params += oc.param_bytes;
    }
    pw_partition_free(&part);
    double lat, bw;
    pw_link_default(PW_LINK_HOSTS, 0, &lat, &bw);
    cr_assert_float_eq(f.allreduce_time, pw_sim_ring_allreduce(params, 2, lat, bw), 1e-12);
    pw_forecast_free(&f);
    hwloc_topology_destroy(c.topology);
    pw_graph_destroy(g);
}

Test(forecast_topology, the_issue_example_on_a_cluster_fixture_in_well_under_a_second, .timeout = TIMEOUT)
{
    pw_graph *g = chain(200, 512);
    pw_forecast_config c = pw_forecast_defaults();
    c.graph = g;
    c.topology = topology(PW_SOURCE_DIR "/tests/fixtures/topologies/cluster_4node_8gpu.xml");
    /* 8 x 4 fills the 32 GPUs of the 4 nodes: a replica per node. */
    c.stages = 8;
    c.replicas = 4;
    c.micro_batches = 32;
    c.micro_batch_size = 4;
    pw_forecast f;
    cr_assert_eq(pw_forecast_run(&c, &f), PW_OK, "%s", pw_last_error());
    cr_assert(f.on_gpus);
    cr_assert_eq(f.n_hosts, 4);
    cr_assert_eq(f.topology_copies, 1);
    cr_assert_eq(f.n_links, 7);
    for (int k = 0; k < 7; k++)
        cr_assert_eq(f.links[k].cls, k == 3 ? PW_LINK_PACKAGES : PW_LINK_PACKAGE, "link %d", k);
    cr_assert_eq(f.allreduce_cls, PW_LINK_HOSTS);
    pw_forecast_free(&f);
    /* The issue's example: 512 ranks on 32 GPUs per copy: 16 copies, 64 hosts
     * of 8 GPUs; each pipeline spans 8 hosts. */
    c.stages = 64;
    c.replicas = 8;
    c.micro_batches = 256;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    cr_assert_eq(pw_forecast_run(&c, &f), PW_OK, "%s", pw_last_error());
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double dt = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    cr_log_info("64 x 8 x 256 on the cluster: %.3f s; %s", dt, f.placement);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    const double limit = 10.0; /* sanitizers slow everything several-fold */
#else
    const double limit = 1.0;
#endif
    cr_assert_lt(dt, limit, "took %.3f s", dt);
    cr_assert_eq(f.n_hosts, 64);
    cr_assert_eq(f.topology_copies, 16);
    cr_assert(strstr(f.placement, "64 hosts"), "%s", f.placement);
    int across = 0;
    for (int k = 0; k < f.n_links; k++)
        if (f.links[k].cls == PW_LINK_HOSTS) {
            cr_assert_eq(f.links[k].dst % 8, 0, "host boundary at %d -> %d", f.links[k].src, f.links[k].dst);
            across++;
        }
    cr_assert_eq(across, 7);
    /* The same run without the topology: every link at one figure. */
    double with = f.step_time;
    pw_forecast_free(&f);
    hwloc_topology_destroy(c.topology);
    c.topology = NULL;
    cr_assert_eq(pw_forecast_run(&c, &f), PW_OK);
    cr_assert_null(f.links);
    cr_assert_neq(f.step_time, with);
    pw_forecast_free(&f);
    pw_graph_destroy(g);
}

Test(forecast_topology, refuses_what_the_topology_cannot_hold, .timeout = TIMEOUT)
{
    pw_graph *g = chain(8, 64);
    pw_forecast_config c = pw_forecast_defaults();
    c.graph = g;
    c.stages = 2;
    c.topology = topology("pack:1 core:2 pu:1");
    c.gpus = 1; /* GPUs asked for, none there */
    pw_forecast f;
    cr_assert_eq(pw_forecast_run(&c, &f), PW_ERR_UNSUPPORTED);
    cr_assert(strstr(pw_last_error(), "no GPUs"), "%s", pw_last_error());
    cr_assert_null(f.links);
    cr_assert_null(f.peak_memory);
    hwloc_topology_destroy(c.topology);
    pw_graph_destroy(g);
    hwloc_topology_t t;
    cr_assert_neq(pw_topology_load_spec("pack:two core:1", &t), PW_OK);
    cr_assert_neq(pw_topology_load_spec("/nonexistent/cluster.xml", &t), PW_OK);
}

Test(forecast_calibrate, a_one_stage_forecast_at_the_measured_rate_takes_the_measured_step, .timeout = TIMEOUT)
{
    pw_graph *g = chain(6, 128);
    pw_forecast_config c = pw_forecast_defaults();
    c.graph = g;
    c.micro_batches = 4;
    c.micro_batch_size = 16;
    double rate = 0, step = 0;
    cr_assert_eq(pw_forecast_calibrate(&c, &rate, &step), PW_OK, "%s", pw_last_error());
    cr_log_info("calibrated: %.3g FLOP/s, one-stage step %.3f ms", rate, step * 1e3);
    cr_assert_gt(rate, 1e6);
    cr_assert_gt(step, 0);
    c.flops_per_s = rate;
    pw_forecast f;
    cr_assert_eq(pw_forecast_run(&c, &f), PW_OK, "%s", pw_last_error());
    /* Exact up to the simulator's nanosecond rounding of each action. */
    cr_assert_float_eq(f.step_time, step, 1e-7 + 1e-6 * step, "%.9f vs %.9f", f.step_time, step);
    pw_forecast_free(&f);
    c.micro_batch_size = 0;
    cr_assert_eq(pw_forecast_calibrate(&c, &rate, &step), PW_ERR_INVALID_ARG);
    cr_assert_eq(rate, 0);
    cr_assert_eq(pw_forecast_calibrate(NULL, &rate, NULL), PW_ERR_INVALID_ARG);
    pw_graph_destroy(g);
}

/* The replicas' sum is costed by what the run puts on the wire: the
 * algorithm's link model and the compression's payload (runtime/compress.h,
 * pw_compress_model), worked out here by hand for one 256 × 256 matrix and
 * its bias. */
Test(forecast, compression_and_algorithm_cost_what_travels, .timeout = TIMEOUT)
{
    const char *text = "input x : f32[256]\nlabel y : i32[]\nl0 = linear(x, out=256)\nh = relu(l0)\n"
                       "loss = softmax_cross_entropy(h, y)\n";
    pw_graph *g;
    cr_assert_eq(pw_graph_parse_string(text, strlen(text), "one.graph", &g), PW_OK, "%s", pw_last_error());
    const double B = 1e8, a = 1e-4;
    const double raw = 4.0 * (256 * 256 + 256);
    struct { const char *mode; int algo, R; double want; } cases[] = {
        {"none", PW_ALLREDUCE_RING, 4, 2 * 3 * (raw / 4 / B + a)},
        {"none", PW_ALLREDUCE_TREE, 4, 2 * (3 * raw / 4 / B + a)},
        {"bf16", PW_ALLREDUCE_RING, 4, 3 * (raw / 2 / B + a)},
        /* ⌈0.01·65536⌉ = 656 and ⌈0.01·256⌉ = 3 (index, value) pairs */
        {"topk:0.01", PW_ALLREDUCE_TREE, 2, 1 * (8.0 * (656 + 3) / B + a)},
        /* P (256 × 4) with the bias, then Q (256 × 4), each a ring of 2 */
        {"powersgd:4", PW_ALLREDUCE_RING, 2, 2 * (4.0 * (1024 + 256) / 2 / B + a) + 2 * (4.0 * 1024 / 2 / B + a)},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        pw_forecast_config c = pw_forecast_defaults();
        c.graph = g;
        c.replicas = cases[i].R;
        c.micro_batch_size = 4;
        c.link_latency_s = a;
        c.allreduce_bandwidth = B;
        c.allreduce_algo = cases[i].algo;
        cr_assert_eq(pw_compress_parse(cases[i].mode, &c.compress), PW_OK, "%s", pw_last_error());
        pw_forecast f;
        cr_assert_eq(pw_forecast_run(&c, &f), PW_OK, "%s", pw_last_error());
        cr_expect(fabs(f.allreduce_time - cases[i].want) < 1e-9 * cases[i].want + 1e-12,
                  "%s (algorithm %d, %d replicas): all-reduce %.9g s, by hand %.9g s", cases[i].mode,
                  cases[i].algo, cases[i].R, f.allreduce_time, cases[i].want);
        pw_forecast_free(&f);
    }
    /* --sync ps with 2 servers and 3 workers: the gradients out, then each
     * server's half of the parameters to 3 workers. */
    pw_forecast_config c = pw_forecast_defaults();
    c.graph = g;
    c.replicas = 3;
    c.micro_batch_size = 4;
    c.link_latency_s = a;
    c.allreduce_bandwidth = B;
    c.ps_servers = 2;
    pw_forecast f;
    cr_assert_eq(pw_forecast_run(&c, &f), PW_OK, "%s", pw_last_error());
    const double want = raw / B + 3 * raw / 2 / B + 2 * a;
    cr_expect(fabs(f.allreduce_time - want) < 1e-9 * want, "parameter servers: %.9g s, by hand %.9g s",
              f.allreduce_time, want);
    pw_forecast_free(&f);
    pw_graph_destroy(g);
}
