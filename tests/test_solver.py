"""The solver: exact DP against brute force, CP-SAT against the DP, DAGs with skips, mixed devices,
memory, pins, infeasibility, determinism, and the Plan's JSON round trip."""

import dataclasses
import itertools
import math
from collections import Counter

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import models
import autosplit
from autosplit import ConfigError, OpGraph, capture, presets, spec
from autosplit.errors import InfeasibleError
from autosplit.plan import Plan
from autosplit.solver import (
    Chain,
    DeviceOrder,
    SolverOptions,
    StageModel,
    assignment_from_cuts,
    build_chain,
    chain_dp,
    cp_sat_blocks,
    device_orders,
    evaluate,
    fastest_link,
    link_load,
    lower_bound_s,
    order_count,
    replicable,
    search_orders,
    solve,
    stage_ranges,
    stage_shares,
    traffic_bound_s,
    unpriced_notes,
)
from cost_models import AnalyticCostModel, Cluster, OpCost, get_device, price_graph
from cost_models.memory import TRAINING_PRECISIONS


def synthetic_chain(times, cross, params=None):
    n = len(times)
    prefix = lambda v: np.concatenate([[0.0], np.cumsum(v)])  # noqa: E731
    params = params if params is not None else [0.0] * n
    return Chain(
        ops=[f"op{k}" for k in range(n)], time_s={"h100-sxm": prefix(times)},
        state_bytes=prefix([16.0 * p for p in params]), param_count=prefix(params),
        activation_bytes=prefix([0.0] * n), cross_bytes=np.array([0.0] + list(cross) + [0.0]),
        cross_count=np.array([0.0] + [1.0] * (n - 1) + [0.0]),
        pins=np.full(n, -1), block_starts=list(range(n)), block_names=[f"op{k}" for k in range(n)],
        forbidden=set(), replicated={})


def brute_force(model, n, stages):
    best = math.inf
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        worst = 0.0
        for s in range(stages):
            i, j = bounds[s], bounds[s + 1]
            if not model.allowed(s, np.array([i]), j)[0]:
                worst = math.inf
                break
            worst = max(worst, float(model.time_s(s, np.array([i]), j)[0]))
        best = min(best, worst)
    return best


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 9).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0.001, 1.0), min_size=n, max_size=n),
    st.lists(st.floats(0.0, 5e10), min_size=n - 1, max_size=n - 1),
    st.integers(1, min(n, 4)))))
def test_chain_dp_equals_brute_force(case):
    times, cross, stages = case
    chain = synthetic_chain(times, cross)
    cluster = Cluster.parse(f"{stages}xh100")
    model = StageModel(chain, DeviceOrder.of(cluster, range(stages), 0.1), SolverOptions(), cluster)
    found = chain_dp(model, range(chain.n + 1))
    assert found is not None
    assert found[0] == pytest.approx(brute_force(model, chain.n, stages), rel=1e-9)
    assignment = assignment_from_cuts(chain.n, found[1])
    assert sorted(set(assignment)) == list(range(stages))


def test_chain_dp_respects_memory():
    # 1.5G parameters per op: 24 GiB of bf16-mixed AdamW state, 6 GiB more in the optimizer step
    chain = synthetic_chain([1.0] * 6, [0.0] * 5, params=[1.5 * 2**30] * 6)
    cluster = Cluster.parse("3xh100")
    model = StageModel(chain, DeviceOrder.of(cluster, range(3), 0.1), SolverOptions(), cluster)
    bottleneck, cuts = chain_dp(model, range(7))
    assert cuts == [2, 4]  # two ops (about 63 GiB at the step) fit in 72 GiB, three would not
    tight = StageModel(chain, DeviceOrder.of(cluster, range(3), 0.5), SolverOptions(), cluster)
    assert chain_dp(tight, range(7)) is None  # 40 GiB usable: one op each is 3 stages for 6 ops


def test_chain_dp_checks_memory_where_the_fastest_split_does_not_fit_and_stops_at_an_upper_bound():
    # The fastest split 3 | 1 (3 s each) puts three 1.5G-parameter ops on stage 0, about 94 GiB of
    # bf16-mixed AdamW state and step: over the 72 GiB usable. 2 | 2 (2 s and 4 s) fits.
    chain = synthetic_chain([1.0, 1.0, 1.0, 3.0], [0.0] * 3, params=[1.5 * 2**30] * 3 + [0.0])
    cluster = Cluster.parse("2xh100")
    model = StageModel(chain, DeviceOrder.of(cluster, range(2), 0.1), SolverOptions(), cluster)
    found = chain_dp(model, range(5))
    assert found == (pytest.approx(4.0), [2]) and found[0] == pytest.approx(brute_force(model, 4, 2), rel=1e-12)
    assert chain_dp(model, range(5), upper_s=found[0]) == found
    assert chain_dp(model, range(5), upper_s=3.9) is None  # no split that fits is that fast


def widths_model(widths):
    layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    return nn.Sequential(*layers)


def priced(model, *inputs):
    traced = capture(model, inputs)
    return traced, OpGraph.from_traced(traced), price_graph(traced.graph_module)


def block_model(graph, costs, traced, cluster, options):
    blocks = graph.coarsen()
    times = {d.name: AnalyticCostModel().times(costs, d) for d in cluster.devices}
    chain = build_chain(graph, blocks, costs, traced.parameters, times, options, fastest_link(cluster))
    return blocks, chain, StageModel(chain, DeviceOrder.of(cluster, range(options.stages or len(cluster)), 0.1),
                                     options, cluster)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.sampled_from([64, 256, 1024, 2048]), min_size=4, max_size=8), st.integers(2, 3))
def test_cp_sat_reaches_the_dp_optimum_on_chains(widths, stages):
    traced, graph, costs = priced(widths_model(widths), spec((512, widths[0])))
    cluster = Cluster.parse(f"{stages}xh100")
    options = SolverOptions(refine=False, time_limit_s=5)
    blocks, chain, model = block_model(graph, costs, traced, cluster, options)
    dp = chain_dp(model, chain.block_starts + [chain.n])
    cp = cp_sat_blocks(model, graph, None, options)
    assert cp is not None and cp.status == "OPTIMAL"
    bounds = chain.block_starts + [chain.n]
    per_op = [cp.assignment[b] for b in range(len(chain.block_starts)) for _ in range(bounds[b + 1] - bounds[b])]
    compute, comm_in, comm_out = evaluate(model, graph, per_op)
    cp_bottleneck = max(map(sum, zip(compute, comm_in, comm_out)))
    assert cp_bottleneck == pytest.approx(dp[0], rel=1e-4)


class Skips(nn.Module):
    """A U-Net-like chain: the first layer's output is added back at the end."""

    def __init__(self, d=256, depth=5):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))

    def forward(self, x):
        first = self.layers[0](x)
        h = first
        for layer in self.layers[1:]:
            h = torch.relu(layer(h))
        return h + first


def test_small_dags_match_brute_force_and_skips_are_paid_on_every_hop():
    traced, graph, costs = priced(Skips(), spec((256, 256)))
    cluster = Cluster.parse("3xh100")
    options = SolverOptions(refine=False)
    blocks, chain, model = block_model(graph, costs, traced, cluster, options)
    cp = cp_sat_blocks(model, graph, None, options)
    bounds = chain.block_starts + [chain.n]
    B = len(chain.block_starts)

    def per_op(assignment):
        return [assignment[b] for b in range(B) for _ in range(bounds[b + 1] - bounds[b])]

    def bottleneck(assignment):
        return max(map(sum, zip(*evaluate(model, graph, per_op(assignment)))))

    position = {op: k for k, op in enumerate(chain.ops)}
    block_of = {op: b for b in range(B) for op in chain.ops[bounds[b]:bounds[b + 1]]}
    edges = {(block_of[u], block_of[v]) for u, v in graph.dag.edges
             if u in position and v in position and block_of[u] != block_of[v]}
    best = min(bottleneck(a) for a in itertools.product(range(3), repeat=B)
               if set(a) == {0, 1, 2} and all(a[u] <= a[v] for u, v in edges))
    assert bottleneck(cp.assignment) == pytest.approx(best, rel=1e-4)
    # The skip from layer 0 to the final add crosses both hops when the ends are on stages 0 and 2.
    plan = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
    # solve's CP-SAT, confined to the stage ranges of the DP's split, proves the best block split.
    assert plan.solver.status == "OPTIMAL" and plan.bottleneck_s == pytest.approx(best, rel=1e-4)
    skip_bytes = 256 * 256 * 4
    stage_of = plan.stage_of()
    assert stage_of["layers_0"] == 0 and stage_of["add"] == 2
    relay = plan.stages[1]
    link = cluster.link(0, 1)
    per_hop_s = 2 * (skip_bytes / link.bandwidth_bytes_per_s + link.latency_s)  # forward + backward
    assert relay.comm_in_s >= per_hop_s and relay.comm_out_s >= per_hop_s


def _every_split_on_three(model, graph, chain):
    """The bottleneck of every op-level split of ``chain`` over 3 stages that follows the DAG."""
    position = {op: k for k, op in enumerate(chain.ops)}
    edges = [(position[u], position[v]) for u, v in graph.dag.edges if u in position and v in position]
    splits = {}
    for a in itertools.product(range(3), repeat=chain.n):
        if set(a) == {0, 1, 2} and all(a[u] <= a[v] for u, v in edges):
            splits[a] = max(map(sum, zip(*evaluate(model, graph, list(a)))))
    return splits


def test_stage_ranges_and_the_traffic_bound_hold_for_every_split():
    traced, graph, costs = priced(Skips(depth=4), spec((256, 256)))
    cluster = Cluster.parse("3xh100")
    blocks, chain, model = block_model(graph, costs, traced, cluster, SolverOptions())
    splits = _every_split_on_three(model, graph, chain)
    best = min(splits.values())
    for bound in (best, best * 1.2, best * 2):
        first, last = stage_ranges(model, graph, bound)
        inside = [a for a, value in splits.items() if value <= bound]
        assert inside and all(first[k] <= a[k] <= last[k] for a in inside for k in range(chain.n))
        assert traffic_bound_s(model, graph, bound) <= best * (1 + 1e-9)
    first, last = stage_ranges(model, graph, best)
    assert (last - first).sum() < 2 * chain.n  # the ranges do prune
    # The bound counts traffic the work bound leaves out: every cut carries at least one activation.
    assert traffic_bound_s(model, graph, best) > lower_bound_s(model) * 1.001


def test_stage_ranges_on_mixed_devices_hold_for_every_split_and_count_what_a_slow_device_holds(monkeypatch):
    traced, graph, costs = priced(Skips(d=1024, depth=4), spec((4096, 1024)))
    cluster = Cluster.parse("l4+h100+l4")
    blocks, chain, model = block_model(graph, costs, traced, cluster, SolverOptions())
    splits = _every_split_on_three(model, graph, chain)
    best = min(splits.values())
    shares = stage_shares(model, best)
    assert shares[1] == 1.0 and 0 < shares[0] == shares[2] < 0.6  # an L4 holds well under half an H100's work
    widths = {}
    for bound in (best, best * 1.2, best * 2):
        first, last = stage_ranges(model, graph, bound)
        inside = [a for a, value in splits.items() if value <= bound]
        assert inside and all(first[k] <= a[k] <= last[k] for a in inside for k in range(chain.n))
        widths[bound] = int((last - first).sum())
    # Counted as H100s, the L4s would leave the ranges wider.
    monkeypatch.setattr("autosplit.solver.dp.stage_shares", lambda model, bound_s: np.ones(len(model.device_order)))
    first, last = stage_ranges(model, graph, best)
    assert widths[best] < int((last - first).sum())


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 9).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0.001, 1.0), min_size=n, max_size=n),
    st.lists(st.floats(0.0, 5e10), min_size=n - 1, max_size=n - 1),
    st.integers(2, 3), st.floats(1.0, 1.5))))
def test_chain_dp_within_stage_ranges_finds_the_same_optimum(case):
    times, cross, stages, above = case
    chain = synthetic_chain(times, cross)
    cluster = Cluster.parse(f"{stages}xh100")
    model = StageModel(chain, DeviceOrder.of(cluster, range(stages), 0.1), SolverOptions(), cluster)
    graph = OpGraph.__new__(OpGraph)  # a bare chain: op k feeds op k + 1
    graph.dag = nx.DiGraph([(f"op{k}", f"op{k + 1}") for k in range(chain.n - 1)])
    everywhere = chain_dp(model, range(chain.n + 1))
    ranges = stage_ranges(model, graph, everywhere[0] * above)
    within = chain_dp(model, range(chain.n + 1), ranges)
    assert within is not None and within[0] == pytest.approx(everywhere[0], rel=1e-12)


def test_the_plan_is_proven_optimal_among_all_op_level_splits():
    model_, args, _ = models.gpt2()
    traced, graph, costs = priced(model_, *args)
    cluster, options = Cluster.parse("3xh100"), SolverOptions()
    plan = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
    assert plan.solver.status == "OPTIMAL" and plan.solver.gap < 1e-3
    assert plan.lower_bound_s <= plan.solver.bound_s <= plan.bottleneck_s
    # CP-SAT over every op with no ranges, from scratch, finds nothing better.
    _, chain, model = block_model(graph, costs, traced, cluster, options)
    starts = [k for k in range(chain.n) if k == 0 or k not in chain.forbidden]
    single = StageModel(dataclasses.replace(chain, block_starts=starts, block_names=[chain.ops[k] for k in starts]),
                        model.device_order, options, cluster)
    full = cp_sat_blocks(single, graph, None, dataclasses.replace(options, time_limit_s=30))
    assert full is not None and full.status == "OPTIMAL"
    bounds = starts + [chain.n]
    per_op = [full.assignment[b] for b in range(len(starts)) for _ in range(bounds[b + 1] - bounds[b])]
    assert max(map(sum, zip(*evaluate(model, graph, per_op)))) >= plan.bottleneck_s * (1 - 1e-6)
    assert full.bound_s <= plan.bottleneck_s


def test_values_built_from_the_inputs_alone_are_rebuilt_where_that_costs_less_than_sending_them():
    model_, args, kwargs = models.masked()
    traced = capture(model_, args, kwargs)
    graph, costs = OpGraph.from_traced(traced), price_graph(traced.graph_module, training=True)
    options = SolverOptions()
    times = AnalyticCostModel().times(costs, get_device("h100"))
    # Across hosts a message costs more than the one small kernel that builds the gate: every stage
    # that reads it rebuilds it, and pays for it.
    cluster = Cluster.parse("3x1xh100")
    plan = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
    listed = Counter(n for stage in plan.stages for n in stage.nodes)
    assert listed["to"] == 2 and times["to"].total_s > 0
    for stage in plan.stages:  # a stage's compute is that of the nodes it runs, rebuilt ones included
        assert stage.compute_s == pytest.approx(sum(times[n].total_s for n in stage.nodes if n in times), rel=1e-9)
    # The DP's interval pricing agrees with the per-op evaluation on contiguous splits.
    _, chain, model = block_model(graph, costs, traced, cluster, options)
    assert "to" in chain.rebuilt and len(chain.rebuild_needers) >= 1
    positions = sorted(set(range(1, chain.n)) - chain.forbidden)
    t = chain.time_s["h100-sxm"]
    for cuts in itertools.combinations(positions, 2):
        bounds = [0, *cuts, chain.n]
        by_interval = [t[j] - t[i] + float(model.rebuild_s(s, np.array([i]), j)[0])
                       for s, (i, j) in enumerate(zip(bounds, bounds[1:]))]
        by_op = evaluate(model, graph, assignment_from_cuts(chain.n, list(cuts)))[0]
        assert by_interval == pytest.approx(by_op, rel=1e-9)
    # Over NVLink sending it costs less: it travels like an activation (without a gradient).
    plan = solve(graph, Cluster.parse("3xh100"), options, costs=costs, parameters=traced.parameters)
    assert Counter(n for stage in plan.stages for n in stage.nodes)["to"] == 1


def test_only_values_with_a_gradient_send_one_back():
    model_, args, kwargs = models.llama()
    traced, graph, costs = priced(model_, *args)
    infos = graph.infos
    ids, hidden = infos["input_ids"], infos["embedding"]
    assert ids.dtypes == (torch.int64,) and hidden.dtypes == (torch.float32,)
    assert link_load(hidden, gradient=True) == (2 * hidden.output_bytes, 2)
    assert link_load(ids, gradient=True) == (ids.output_bytes, 1)  # integers carry no gradient
    assert link_load(hidden, gradient=False) == (hidden.output_bytes, 1)
    cluster, options = Cluster.parse("2xh100"), SolverOptions()
    _, chain, model = block_model(graph, costs, traced, cluster, options)
    assert model.gradient("embedding") and not model.gradient("input_ids")
    assert all(not model.gradient(v) for v in replicable(graph))  # built from the inputs alone


def test_a_weight_stays_on_the_stage_of_its_first_reader():
    model_, args, _ = models.gpt2()
    traced, graph, costs = priced(model_, *args)
    plan = solve(graph, Cluster.parse("3xh100"), SolverOptions(), costs=costs, parameters=traced.parameters)
    stage_of = plan.stage_of()
    order = {name: k for k, name in enumerate(graph.infos)}
    weights = [n for n, info in graph.infos.items() if info.op == "get_attr" and n in stage_of]
    assert weights
    for weight in weights:
        first_reader = min((v for v in graph.dag.successors(weight) if v in stage_of), key=order.__getitem__)
        assert stage_of[weight] == stage_of[first_reader], weight


def test_a_fast_and_a_slow_device_share_work_by_speed():
    traced, graph, costs = priced(widths_model([4096] * 13), spec((2048, 4096)))
    cluster = Cluster.parse("h100+l4")
    plan = solve(graph, cluster, SolverOptions(), costs=costs, parameters=traced.parameters)
    by_device = {stage.devices[0].split(":")[0]: stage for stage in plan.stages}
    fast, slow = by_device["h100-sxm"], by_device["l4"]
    work = lambda stage: sum(costs[n].fwd_flops + costs[n].bwd_flops for n in stage.nodes if n in costs)  # noqa: E731
    speed_ratio = get_device("h100").flops_for(torch.float32) / get_device("l4").flops_for(torch.float32)
    assert work(fast) / work(slow) == pytest.approx(speed_ratio, rel=0.35)
    # Either order of the two devices along the pipeline was tried; the slow one may come first.
    assert plan.stages[0].devices != plan.stages[1].devices


def small_gpu(name, memory_gib):
    base = get_device("h100")
    return dataclasses.replace(base, name=name, memory_bytes=int(memory_gib * 2**30), aliases=(), vendor_name="")


def test_memory_limits_and_pins_hold():
    model, args, _ = models.tied_lm()
    traced, graph, costs = priced(model, *args)
    cluster = Cluster.parse("3xh100")
    plan = solve(graph, cluster, SolverOptions(pin={"blocks.1": 2, "embed": 0}), costs=costs,
                 parameters=traced.parameters)
    stage_of = plan.stage_of()
    for name, info in graph.infos.items():
        if info.module_path.startswith("blocks.1") and name in stage_of:
            assert stage_of[name] == 2
    for stage in plan.stages:
        assert stage.memory_bytes <= stage.memory_capacity_bytes
    with pytest.raises(ValueError, match="pin names module 'nope'"):
        solve(graph, cluster, SolverOptions(pin={"nope": 0}), costs=costs, parameters=traced.parameters)
    with pytest.raises(ValueError, match="stage 5, but there are 3 stages"):
        solve(graph, cluster, SolverOptions(pin={"embed": 5}), costs=costs, parameters=traced.parameters)


def test_every_op_and_parameter_is_assigned_exactly_once():
    model, args, kwargs = models.gpt2()
    traced, graph, costs = priced(model, *args)
    plan = solve(graph, Cluster.parse("3xh100"), SolverOptions(microbatches=4), costs=costs,
                 parameters=traced.parameters)
    assert sum(s.param_count for s in plan.stages) == traced.parameter_count()
    assert [s.index for s in plan.stages] == [0, 1, 2]
    rebuilt = replicable(graph)  # values built from the inputs alone may be rebuilt where read
    seen = Counter(n for s in plan.stages for n in s.nodes)
    for name in graph.compute_nodes():
        assert seen[name] >= 1 if name in rebuilt else seen[name] == 1, name


def test_infeasible_memory_says_what_would_fit():
    model, inputs = presets.build("gpt2", batch=1, seq=64)
    traced, graph, costs = priced(model, *inputs)
    tiny = Cluster.from_specs([small_gpu("gpu-2mb", 0.6 + 0.002)] * 2)
    with pytest.raises(InfeasibleError) as error:
        solve(graph, tiny, SolverOptions(), costs=costs, parameters=traced.parameters)
    message = str(error.value)
    assert "the model does not fit" in message and "GiB" in message
    # The embedding's state alone exceeds a device: more of them would not help, splitting it would.
    assert "transformer.wte" in message and "no cut can separate" in message and "tensor parallelism" in message
    assert "× gpu-2mb (" not in message  # no "at least N × device" remedy


def test_plans_are_deterministic_and_round_trip_through_json(tmp_path):
    model, args, _ = models.llama()
    traced, graph, costs = priced(model, *args)
    cluster = Cluster.parse("2x2xh100")
    options = SolverOptions(microbatches=4, samples_per_microbatch=2, tokens_per_sample=16)
    first = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
    second = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
    strip = lambda plan: {k: v for k, v in plan.to_dict().items() if k != "solver"}  # noqa: E731
    assert strip(first) == strip(second)
    assert first.solver.status in ("OPTIMAL", "FEASIBLE") and 0 <= first.solver.gap < 1
    assert first.bubble_fraction == pytest.approx(3 / 7)
    assert first.tokens_per_s == pytest.approx(first.samples_per_s * 16)
    assert first.fingerprint == graph.fingerprint()
    again = Plan.load(first.save(tmp_path / "plan.json"))
    assert again == first
    with pytest.raises(ValueError, match="format version"):
        Plan.from_dict({**first.to_dict(), "format_version": 99})


def test_a_plan_notes_the_ops_it_could_not_price_and_keeps_the_notes_in_json(tmp_path):
    model, args, _ = models.no_meta_kernel()
    traced, graph, costs = priced(model, *args)
    plan = solve(graph, Cluster.parse("2xh100"), SolverOptions(), costs=costs, parameters=traced.parameters)
    assert plan.solver.notes[0] == "1 op priced as free: cannot run on meta (unique)"
    assert "note         1 op priced as free: cannot run on meta (unique)" in plan.summary()
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan
    older = plan.to_dict()
    del older["solver"]["notes"]  # a plan saved before notes existed
    assert Plan.from_dict(older).solver.notes == ()


def test_unpriced_notes_name_a_few_ops_and_count_the_rest():
    costs = {f"op{k}": OpCost(unpriced="forward cannot run on meta: NotImplementedError") for k in range(5)}
    costs["fine"] = OpCost()
    costs["grad"] = OpCost(unpriced="backward cannot run on meta, counted as free: RuntimeError")
    assert unpriced_notes(costs) == [
        "5 ops priced as free: cannot run on meta (op0, op1, op2 and 2 more)",
        "1 op backward unmeasured (free or estimated): no backward on meta (grad)",
    ]
    assert unpriced_notes({"fine": OpCost()}) == []


def test_the_traffic_bound_says_when_it_falls_back_to_the_work_bound(monkeypatch):
    traced, graph, costs = priced(Skips(depth=4), spec((256, 256)))
    cluster = Cluster.parse("3xh100")
    _, _, model = block_model(graph, costs, traced, cluster, SolverOptions())
    incumbent = lower_bound_s(model) * 1.5
    notes = []
    assert traffic_bound_s(model, graph, incumbent, notes=notes) > lower_bound_s(model) and notes == []

    class NoFlow:  # a max-flow solver that never finds the optimum
        OPTIMAL = 0

        def add_arc_with_capacity(self, *arc):
            pass

        def solve(self, source, sink):
            return 3

    monkeypatch.setattr("autosplit.solver.bounds.max_flow.SimpleMaxFlow", NoFlow)
    assert traffic_bound_s(model, graph, incumbent, notes=notes) == lower_bound_s(model)
    assert notes == ["the traffic bound fell back to the work bound: max flow status 3 on hop 0"]


def test_options_are_validated():
    with pytest.raises(ValueError, match="schedule must be one of"):
        SolverOptions(schedule="zb")
    with pytest.raises(ValueError, match="microbatches must be a positive int"):
        SolverOptions(microbatches=0)
    with pytest.raises(ValueError, match="memory_headroom"):
        SolverOptions(memory_headroom=1.5)
    with pytest.raises(ValueError, match="precision must be one of"):
        SolverOptions(precision="fp12")
    with pytest.raises(TypeError, match="no_split takes module classes or names"):
        SolverOptions(no_split=(3,))
    with pytest.raises(ValueError, match="optimizer must be one of sgd, sgd-momentum, adam, adamw"):
        SolverOptions(optimizer="lion")


def test_more_stages_than_separable_ops_is_refused():
    model_, args, kwargs = models.masked()
    traced = capture(model_, args, kwargs)
    graph, costs = OpGraph.from_traced(traced), price_graph(traced.graph_module)
    chain = block_model(graph, costs, traced, Cluster.parse("2xh100"), SolverOptions())[1]
    units = chain.n - len(chain.forbidden & set(range(1, chain.n)))  # weights stay glued to their readers
    assert units < chain.n
    with pytest.raises(ConfigError, match=f"{units + 1} stages need at least {units + 1} ops that a cut can separate; "
                                         f"this graph has {units}: use fewer stages"):
        solve(graph, Cluster.parse(f"{units + 1}xh100"), SolverOptions(), costs=costs, parameters=traced.parameters)


def test_no_split_modules_are_never_cut():
    model, args, _ = models.gpt2()
    traced, graph, costs = priced(model, *args)
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    plan = solve(graph, Cluster.parse("4xh100"), SolverOptions(no_split=(GPT2Attention, "transformer.h.1.mlp")),
                 costs=costs, parameters=traced.parameters)
    stage_of = plan.stage_of()
    groups = {}
    for name, info in graph.infos.items():
        for site in info.scope:
            path = site.partition("@")[0]
            if path.endswith(".attn") or path == "transformer.h.1.mlp":
                groups.setdefault(site, set()).add(stage_of.get(name))
    assert groups and all(len(stages - {None}) == 1 for stages in groups.values())


def test_a_solver_time_out_still_returns_the_best_plan_found_with_its_gap():
    model, args, _ = models.gpt2()
    traced, graph, costs = priced(model, *args)
    cluster = Cluster.parse("4xh100")
    rushed = solve(graph, cluster, SolverOptions(time_limit_s=1e-9), costs=costs, parameters=traced.parameters)
    patient = solve(graph, cluster, SolverOptions(), costs=costs, parameters=traced.parameters)
    assert rushed.solver.status == "FEASIBLE" and patient.solver.status == "OPTIMAL"
    assert rushed.solver.notes == ("op-level CP-SAT found no split within its time limit (1e-09 s)",)
    assert patient.solver.notes == ()  # proven: nothing to say
    assert 0 <= rushed.solver.gap < 1 and rushed.solver.bound_s <= rushed.bottleneck_s
    assert rushed.bottleneck_s == pytest.approx(patient.bottleneck_s, rel=0.05)  # the DP split stands


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_every_registry_model_gets_a_valid_plan(name):
    model, args, kwargs = models.REGISTRY[name]("meta")
    traced = capture(model, args, kwargs)
    graph = OpGraph.from_traced(traced)
    plan = solve(graph, Cluster.parse("2xh100"), SolverOptions(microbatches=2), costs=price_graph(traced.graph_module),
                 parameters=traced.parameters)
    stage_of = plan.stage_of()
    rebuilt = replicable(graph)
    for u, v in graph.dag.edges:  # every value flows forward along the pipeline
        if u in stage_of and v in stage_of and u not in rebuilt and graph.infos[u].op != "get_attr":
            assert stage_of[u] <= stage_of[v], (u, v)
    assert sum(s.param_count for s in plan.stages) == traced.parameter_count()
    assert plan.bottleneck_s >= plan.lower_bound_s * (1 - 1e-9)


def test_a_plan_prints_as_a_table_with_a_summary():
    model, args, _ = models.gpt2()
    traced, graph, costs = priced(model, *args)
    plan = solve(graph, Cluster.parse("3xh100"), SolverOptions(microbatches=4, samples_per_microbatch=2,
                                                              tokens_per_sample=16),
                 costs=costs, parameters=traced.parameters)
    text = str(plan)
    assert "3-stage train plan on 3xh100-sxm" in text
    for stage in plan.stages:
        assert f"h100-sxm:{stage.index}" in text and f"{stage.modules[0]} → {stage.modules[1]}" in text
    assert plan.stages[0].modules[0] in ("transformer", "transformer.wte")  # the first op, not a weight
    assert plan.stages[-1].modules[1] == "lm_head"
    assert "× the lower bound" in text and "tokens/s" in text and "bubble 33.3%" in text
    assert f"{plan.solver.status} by {plan.solver.method}" in text


def test_splits_not_contiguous_in_the_chain_order_are_found_around_the_cuts(monkeypatch):
    model, args, _ = models.gpt2()
    traced, graph, costs = priced(model, *args)
    cluster, options = Cluster.parse("3xh100"), SolverOptions()
    windowed = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
    monkeypatch.setattr("autosplit.solver.driver.OPS_GAP", math.inf)  # the solver without its last step
    contiguous = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
    assert windowed.solver.method.endswith("cp-sat ops")
    assert windowed.bottleneck_s < contiguous.bottleneck_s * (1 - 1e-6)
    listed = Counter(n for st in windowed.stages for n in st.nodes)
    stage = {n: s for n, s in windowed.stage_of().items() if listed[n] == 1}  # not the input-derived, rebuilt per stage
    for u, v in graph.dag.edges:  # still a pipeline: data flows to the same or a later stage
        if u in stage and v in stage:
            assert stage[u] <= stage[v], (u, v)
    chain_order = [n for n in traced.nodes if n in stage]
    assert any(stage[a] > stage[b] for a, b in zip(chain_order, chain_order[1:]))  # not one interval per stage


def test_too_many_op_stage_choices_move_only_the_ops_near_the_cuts_and_prove_nothing(monkeypatch):
    model, args, _ = models.gpt2()
    traced, graph, costs = priced(model, *args)
    cluster, options = Cluster.parse("3xh100"), SolverOptions()
    whole = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
    monkeypatch.setattr("autosplit.solver.driver.OPS_GAP", math.inf)  # the solver without its last step
    contiguous = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
    monkeypatch.setattr("autosplit.solver.driver.OPS_GAP", 0.01)
    monkeypatch.setattr("autosplit.solver.cpsat.OPS_CHOICES_PER_S", 1)  # a model of 0.5 op-stage choices at most
    windowed = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
    assert whole.solver.status == "OPTIMAL" and not whole.solver.notes
    assert windowed.bottleneck_s <= contiguous.bottleneck_s and windowed.solver.method.endswith("cp-sat ops")
    assert windowed.solver.status == "FEASIBLE" and windowed.solver.gap > 0  # what moved is not every split
    assert any(note.startswith("op-level CP-SAT moved only ops within 10 of a cut") for note in windowed.solver.notes)


@pytest.mark.parametrize("text, stages", [("rtx4090+rtx3090+l4", 3), ("rtx4090+rtx3090+l4", 2), ("2xh100+l4", 3),
                                          ("2xh100+l4", 2), ("2x2xh100", 4), ("2x2xh100+2x1xl4", 4), ("3xh100", 2)])
def test_distinct_device_orders_are_counted_and_listed_once_each(text, stages):
    cluster = Cluster.parse(text)
    kind = lambda r: (cluster.devices[r].name, cluster.hosts[r])  # noqa: E731
    every = {tuple(map(kind, p)) for p in itertools.permutations(range(len(cluster)), stages)}
    orders = list(device_orders(cluster, stages))
    counts = list(Counter(map(kind, range(len(cluster)))).values())
    assert len(orders) == len(set(orders)) == len(every) == order_count(counts, stages)
    assert {tuple(map(kind, order)) for order in orders} == every and orders == sorted(orders)
    assert all(len(set(order)) == stages for order in orders)


def test_device_orders_of_many_devices_are_listed_without_their_n_factorial_permutations():
    # 12 devices of 3 kinds: 12! = 479,001,600 rank permutations, 12! / (4!)^3 = 34,650 distinct orders.
    cluster = Cluster.parse("4xh100+4xa100+4xl4")
    orders = list(device_orders(cluster, 12))
    assert len(orders) == len(set(orders)) == order_count([4, 4, 4], 12) == math.factorial(12) // math.factorial(4) ** 3
    assert orders[0] == tuple(range(12)) and orders == sorted(orders)
    assert order_count([4, 4, 4, 4], 16) == 63_063_000
    assert order_count([2, 1], 2) == 3 and order_count([1, 1, 1], 2) == 6  # aa ab ba; and 3 × 2
    assert order_count([8] * 8, 64) == math.factorial(64) // math.factorial(8) ** 8


def test_the_order_search_picks_the_order_that_pricing_every_order_picks(monkeypatch):
    model, args, _ = models.gpt2()
    traced, graph, costs = priced(model, *args)
    for text, options in [("2xh100+2xl4+rtx4090", SolverOptions(microbatches=4)),
                          ("2xh100+2xl4+rtx4090", SolverOptions(microbatches=4, mode="infer", stages=3)),
                          ("h100+l4+rtx3090", SolverOptions(mode="infer"))]:
        cluster = Cluster.parse(text)
        every = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
        with monkeypatch.context() as patch:
            patch.setattr("autosplit.solver.orders.ORDERS_PRICED", 0)
            searched = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
        assert [s.devices for s in searched.stages] == [s.devices for s in every.stages], text
        assert searched.bottleneck_s == every.bottleneck_s
        total = order_count(list(Counter((d.name, h) for d, h in zip(cluster.devices, cluster.hosts)).values()),
                            options.stages or len(cluster))
        assert every.solver.orders_tried == every.solver.orders_total == searched.solver.orders_total == total > 1
        assert searched.solver.orders_tried == 1 and searched.solver.order_gap == every.solver.order_gap == 0.0


def test_sixteen_devices_of_four_kinds_plan_with_the_order_report(tmp_path):
    model = widths_model([64] * 21)
    traced, graph, costs = priced(model, spec((32, 64)))
    cluster = Cluster.parse("4xh100+4xa100+4xrtx4090+4xl4")
    options = SolverOptions(microbatches=8, time_limit_s=0.5)
    first = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
    second = solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
    report = first.solver
    assert (report.orders_total, report.orders_tried, report.order_gap) == (63_063_000, 1, 0.0)
    assert sorted(s.devices[0] for s in first.stages) == sorted(f"{d.name}:{r}" for r, d in enumerate(cluster.devices))
    assert [s.devices for s in first.stages] == [s.devices for s in second.stages]
    assert first.bottleneck_s == second.bottleneck_s
    assert "order proven best of 63,063,000 distinct orders" in "\n".join(first.summary())
    again = Plan.load(first.save(tmp_path / "plan.json"))
    assert again == first
    older = first.to_dict()  # a plan file written before the order fields existed still loads
    for key in ("orders_tried", "orders_total", "order_gap"):
        del older["solver"][key]
    assert Plan.from_dict(older).solver.orders_total == 1
    single = solve(graph, Cluster.parse("4xh100"), options, costs=costs, parameters=traced.parameters)
    assert single.solver.orders_total == 1 and not any(line.startswith("devices") for line in single.summary())


def test_an_order_search_too_large_to_run_says_the_order_is_not_proven(monkeypatch):
    model = widths_model([64] * 9)
    traced, graph, costs = priced(model, spec((32, 64)))
    monkeypatch.setattr("autosplit.solver.orders.ORDER_SEARCH_MAX_CELLS", 0)
    plan = solve(graph, Cluster.parse("2x2xh100+2x1xl4"), SolverOptions(time_limit_s=0.5), costs=costs,
                 parameters=traced.parameters)
    assert plan.solver.orders_total == 180 and 1 <= plan.solver.orders_tried <= 3 and plan.solver.order_gap is None
    assert "order not proven best" in "\n".join(plan.summary()) and "gap unknown" in "\n".join(plan.summary())


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(["2xh100+2xl4+rtx4090", "h100+l4+rtx4090", "2x1xh100+2x1xl4", "3xl4+h100"]),
       st.integers(4, 9), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_the_order_search_is_exact_on_random_chains_with_memory_limits(text, n, stages, seed):
    cluster = Cluster.parse(text)
    stages = min(stages, n, len(cluster))
    rng = np.random.default_rng(seed)
    prefix = lambda v: np.concatenate([[0.0], np.cumsum(v)])  # noqa: E731
    work = rng.uniform(0.1, 1.0, n)
    chain = dataclasses.replace(
        synthetic_chain(work, rng.uniform(0, 5e10, n - 1), params=rng.uniform(0, 15 * 2**30, n)),  # bf16: up to 30 GiB
        time_s={d.name: prefix(work * rng.uniform(0.5, 3.0)) for d in cluster.devices})
    options = SolverOptions(mode="infer", stages=stages)
    best, first = math.inf, None  # every order priced; ties go to the first in device_orders
    for order in device_orders(cluster, stages):
        found = chain_dp(StageModel(chain, DeviceOrder.of(cluster, order, 0.1), options, cluster), range(n + 1))
        if found is not None and found[0] < best * (1 - 1e-9):
            best, first = found[0], order
    searched = search_orders(chain, cluster, stages, options, range(n + 1))
    if first is None:
        assert searched is None
    else:
        assert searched[0] == pytest.approx(best, rel=1e-9) and searched[1] == first


def _stage_runs(chain, plan):
    """Each chain op's stage in the plan (a value rebuilt on several stages: its first)."""
    first = {}
    for stage in plan.stages:
        for node in stage.nodes:
            first.setdefault(node, stage.index)
    return [first[op] for op in chain.ops]


@pytest.mark.parametrize("name,mode,schedule", [("mlp", "train", "1f1b"), ("rescnn", "train", "gpipe"),
                                                ("tied_lm", "train", "1f1b"), ("tied_lm", "infer", "1f1b")])
def test_reported_memory_is_the_dp_figure_and_fits_every_device(name, mode, schedule):
    model, args, _ = getattr(models, name)()
    traced, graph, costs = priced(model, *args)
    loose = SolverOptions(mode=mode, schedule=schedule, microbatches=4, stages=3)
    # A device just big enough for an even split's heaviest stage: memory binds.
    plan = solve(graph, Cluster.parse("3xh100"), loose, costs=costs, parameters=traced.parameters)
    need_gib = (max(s.memory_bytes for s in plan.stages) - 0.5 * 2**30) / 2**30
    for cluster in [Cluster.parse("3xh100"), Cluster.from_specs([small_gpu("tight", (need_gib * 0.97 + 0.5) / 0.9)] * 3)]:
        try:
            plan = solve(graph, cluster, loose, costs=costs, parameters=traced.parameters)
        except InfeasibleError:
            continue
        _, chain, stage_model = block_model(graph, costs, traced, cluster, loose)
        assignment = _stage_runs(chain, plan)
        for stage in plan.stages:
            assert stage.memory_bytes <= stage.memory_capacity_bytes
            assert stage.memory == stage_model.breakdown(stage.index, assignment)
            where = np.nonzero(np.asarray(assignment) == stage.index)[0]
            if len(where) == where[-1] - where[0] + 1:  # a run of the chain: the DP priced exactly this
                dp = stage_model.memory_bytes(stage.index, np.array([where[0]]), int(where[-1]) + 1)[0]
                assert dp == pytest.approx(stage.memory_bytes, rel=1e-12)


def test_in_flight_activations_that_bind_are_named_with_remedies_that_fit():
    # Small weights, large activations: under 1F1B stage 0 keeps 4 microbatches in flight.
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
    traced, graph, costs = priced(model, torch.randn(4096, 256))
    one = solve(graph, Cluster.parse("4xh100"), SolverOptions(microbatches=1), costs=costs,
                parameters=traced.parameters)
    need_gib = (max(s.memory_bytes for s in one.stages) - 0.5 * 2**30) / 2**30
    tight = Cluster.from_specs([small_gpu("gpu-small", (need_gib * 1.3 + 0.5) / 0.9)] * 4)
    solve(graph, tight, SolverOptions(microbatches=1), costs=costs, parameters=traced.parameters)  # fits
    with pytest.raises(InfeasibleError) as error:
        solve(graph, tight, SolverOptions(microbatches=8), costs=costs, parameters=traced.parameters)
    message = str(error.value)
    assert "stage 0" in message and "in flight" in message
    assert "microbatches=" in message and "activation checkpointing" in message
    assert "at least 5 ×" not in message  # one more device would not help: stage 0 would keep 5


def test_recheck_schedule_reprices_memory_and_refuses_what_no_longer_fits():
    from autosplit.schedule import recheck_schedule

    model, args, _ = models.mlp()
    traced, graph, costs = priced(model, *args)
    plan = solve(graph, Cluster.parse("3xh100"), SolverOptions(microbatches=4), costs=costs,
                 parameters=traced.parameters)
    gpipe = recheck_schedule(plan, "gpipe", 4)
    assert gpipe.schedule == "gpipe" and gpipe.stages[0].nodes == plan.stages[0].nodes
    for before, after in zip(plan.stages, gpipe.stages):
        assert after.memory.activations_bytes == 4 * before.saved_bytes_per_microbatch
        assert after.memory.weights_bytes == before.memory.weights_bytes
    assert gpipe.stages[-1].memory_bytes > plan.stages[-1].memory_bytes  # it kept 1, now 4
    assert recheck_schedule(gpipe, "1f1b", 4).stages == plan.stages  # the same model both ways
    assert Plan.from_dict(plan.to_dict()).stages == plan.stages
    # The last stage fits 1F1B's one microbatch in flight, not GPipe's four.
    last = plan.stages[-1]
    capacity = last.memory_bytes + last.saved_bytes_per_microbatch
    tight = dataclasses.replace(plan, stages=plan.stages[:-1] + (dataclasses.replace(last, memory_capacity_bytes=capacity),))
    with pytest.raises(InfeasibleError) as error:
        recheck_schedule(tight, "gpipe", 4)
    message = str(error.value)
    assert f"stage {last.index} on {last.devices[0]}" in message and "GiB" in message
    assert "'1f1b'" in message and "microbatches=" in message and "more devices" in message


# --------------------------------------------------------------------------- interleaved 1F1B


def test_interleaved_pricing_of_a_tiny_chain_matches_the_hand_figures():
    """Four ops, one per stage, stages 0 and 2 on device 0 and stages 1 and 3 on device 1 (v = 2,
    D = 2), 4 microbatches, no traffic."""
    from autosplit.interleaved import DevicePricing, looped_order
    from autosplit.schedule import pipeline_times

    prefix = lambda v: np.concatenate([[0.0], np.cumsum(v)])  # noqa: E731
    chain = dataclasses.replace(synthetic_chain([3e-3, 1e-3, 1e-3, 3e-3], [0.0] * 3, params=[1000, 2000, 3000, 4000]),
                                activation_bytes=prefix([1e5, 2e5, 3e5, 4e5]), cross_count=np.zeros(5))
    cluster = Cluster.parse("2xh100")
    options = SolverOptions(schedule="interleaved-1f1b", stages_per_device=2, microbatches=4)
    model = StageModel(chain, looped_order(cluster, [0, 1], 2, 0.1), options, cluster)
    assert model.device_order.ranks == (0, 1, 0, 1) and model.devices == [(0, 2), (1, 3)]
    # Each stage's peak in flight under ScheduleInterleaved1F1B's order (device 0 runs F0 F0 F2 F2,
    # F0 B2, F0 B2, F2 B0, F2 B0, B2 B2 B0 B0; device 1: F1 F1 F3 B3 F3 B3 F1 B1 F1 B1 F3 B3 F3 B3 B1 B1).
    assert model.in_flight == [4, 3, 2, 1]
    # Time: a device sums its stages; the step is m × bottleneck + (D − 1) × the slowest stage.
    pricing = DevicePricing(model, None)
    stage_s = pricing.stage_times([0, 1, 2, 3, 4])
    assert stage_s == pytest.approx([3e-3, 1e-3, 1e-3, 3e-3])
    assert pricing.device_times(stage_s) == pytest.approx([4e-3, 4e-3])
    bottleneck, step, bubble = pipeline_times(stage_s, model.device_order.ranks, 4)
    assert (bottleneck, step, bubble) == pytest.approx((4e-3, 4 * 4e-3 + 1 * 3e-3, 3e-3 / 19e-3))
    assert pipeline_times([1.0] * 8, [0, 1, 2, 3] * 2, 8)[2] == pytest.approx(3 / (2 * 8 + 3))  # (D−1)/(vm+D−1)
    # Memory: every stage's state, and the activations at the device's worst moment. Device 0 holds
    # (stage 0, stage 2) = (3, 2) microbatches after its fifth forward: 3 × 100 kB + 2 × 300 kB,
    # more than (4, 1) = 700 kB; device 1 (2, 1) = 2 × 200 kB + 400 kB. The sum of the stages'
    # own peaks (4 × 100 + 2 × 300 = 1000 kB, 3 × 200 + 400 = 1000 kB) would overstate both.
    gib_context = 512 * 2**20
    for device, params, activations in [(0, 1000 + 3000, 9e5), (1, 2000 + 4000, 8e5)]:
        live = 2 * params + 2 * params + (4 + 2 * 4) * params + activations  # bf16-mixed AdamW: 16 B per parameter
        assert pricing.memory_bytes([0, 1, 2, 3, 4], device) == pytest.approx(1.05 * live + gib_context, rel=1e-12)


def interleaved_plan(name, microbatches=4, devices=2, v=2, **options):
    model, args, _ = getattr(models, name)()
    traced, graph, costs = priced(model, *args)
    opts = SolverOptions(schedule="interleaved-1f1b", stages_per_device=v, microbatches=microbatches, **options)
    return traced, graph, costs, solve(graph, Cluster.parse(f"{devices}xh100"), opts, costs=costs,
                                       parameters=traced.parameters, buffers=traced.buffers)


@pytest.mark.parametrize("name", ["mlp", "tied_lm"])
def test_an_interleaved_plan_lists_each_stage_with_its_device_and_prices_the_devices(name):
    traced, graph, costs, plan = interleaved_plan(name)
    assert len(plan.stages) == 4 and plan.stages_per_device == 2 and plan.schedule == "interleaved-1f1b"
    assert plan.device_ranks() == [0, 1, 0, 1] and plan.device_stages() == {0: (0, 2), 1: (1, 3)}
    assert [s.devices for s in plan.stages] == [("h100-sxm:0",), ("h100-sxm:1",)] * 2
    device_s = [plan.stages[0].time_s + plan.stages[2].time_s, plan.stages[1].time_s + plan.stages[3].time_s]
    slowest_stage = max(s.time_s for s in plan.stages)
    assert plan.bottleneck_s == pytest.approx(max(device_s), rel=1e-12)
    assert plan.step_s == pytest.approx(4 * plan.bottleneck_s + slowest_stage, rel=1e-12)
    assert plan.bubble_fraction == pytest.approx(slowest_stage / plan.step_s, rel=1e-12)
    assert plan.lower_bound_s <= plan.bottleneck_s
    memory = plan.device_memory()
    for rank, stages in plan.device_stages().items():
        assert memory[rank].total_bytes <= plan.stages[stages[0]].memory_capacity_bytes
        assert memory[rank].total_bytes < sum(plan.stages[s].memory_bytes for s in stages)  # one CUDA context
        assert memory[rank].weights_bytes == pytest.approx(sum(plan.stages[s].memory.weights_bytes for s in stages))
    nodes = [n for s in plan.stages for n in s.nodes if graph.infos[n].op not in ("placeholder", "output")]
    assert set(nodes) == {n for n in graph.order if graph.infos[n].op not in ("placeholder", "output")}
    # The best contiguous split by the slowest device, found by trying every one
    from autosplit.interleaved import DevicePricing, looped_order
    from autosplit.solver.stage_model import _bottleneck

    cluster = Cluster.parse("2xh100")
    options = SolverOptions(schedule="interleaved-1f1b", stages_per_device=2, microbatches=4)
    full = build_chain(graph, graph.coarsen(), costs, traced.parameters,
                       {d.name: AnalyticCostModel().times(costs, d) for d in cluster.devices}, options,
                       fastest_link(cluster), traced.buffers)
    looped = StageModel(full, looped_order(cluster, [0, 1], 2, 0.1), options, cluster)
    pricing = DevicePricing(looped, graph)
    best = math.inf
    for cuts in itertools.combinations(sorted(set(range(1, full.n)) - full.forbidden), 3):
        slowest = _bottleneck(looped, graph, assignment_from_cuts(full.n, cuts))
        # the descent prices a split as the plan does (tied weights sent between devices included)
        assert pricing.split_times([0, *cuts, full.n]).max() == pytest.approx(slowest, rel=1e-9)
        best = min(best, slowest)
    assert plan.bottleneck_s <= best * (1 + 1e-9)
    assert "interleaved-1f1b" in str(plan) and "device       h100-sxm:0: stages 0, 2" in str(plan)


def test_interleaved_plans_are_deterministic_and_round_trip_through_json(tmp_path):
    plans = [interleaved_plan("tied_lm")[3] for _ in range(2)]
    assert plans[0].stages == plans[1].stages and plans[0].bottleneck_s == plans[1].bottleneck_s
    loaded = Plan.load(plans[0].save(tmp_path / "plan.json"))
    assert loaded == plans[0] and loaded.device_memory() == plans[0].device_memory()


def test_interleaved_options_and_microbatch_counts_are_checked():
    with pytest.raises(ValueError, match="stages_per_device=2 needs schedule='interleaved-1f1b'"):
        SolverOptions(stages_per_device=2)
    with pytest.raises(ValueError, match="so it trains"):
        SolverOptions(schedule="interleaved-1f1b", stages_per_device=2, mode="infer")
    with pytest.raises(ValueError, match="stages=6 must be a multiple of stages_per_device=4"):
        SolverOptions(schedule="interleaved-1f1b", stages_per_device=4, stages=6)
    with pytest.raises(ConfigError, match="not a multiple of 2: use microbatches=4"):
        interleaved_plan("mlp", microbatches=5)  # PyTorch runs 5 on 2 devices in 2 rounds: refused
    with pytest.raises(ConfigError, match="need 3 devices; the cluster 2xh100-sxm has 2"):
        interleaved_plan("mlp", stages=6)
    with pytest.raises(ConfigError, match="use stages=4 or more"):
        interleaved_plan("mlp", stages=2)


def test_an_interleaved_plan_that_overflows_a_device_says_by_how_much():
    # Small weights, large activations: a device holds its two stages' in-flight microbatches.
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
    traced, graph, costs = priced(model, torch.randn(4096, 256))
    opts = SolverOptions(schedule="interleaved-1f1b", stages_per_device=2, microbatches=8)
    plan = solve(graph, Cluster.parse("2xh100"), opts, costs=costs, parameters=traced.parameters)
    need_gib = (max(m.total_bytes for m in plan.device_memory().values()) - 0.5 * 2**30) / 2**30
    tight = Cluster.from_specs([small_gpu("gpu-small", (need_gib * 0.7 + 0.5) / 0.9)] * 2)
    with pytest.raises(InfeasibleError) as error:
        solve(graph, tight, opts, costs=costs, parameters=traced.parameters)
    message = str(error.value)
    assert "interleaved-1f1b" in message and "GiB on gpu-small:" in message and "in flight" in message


def test_interleaved_plans_are_refused_where_one_stage_per_device_runs():
    from autosplit.api import autosplit
    from autosplit.schedule import recheck_schedule

    *_, plan = interleaved_plan("mlp")
    with pytest.raises(ValueError, match="plan again with schedule='gpipe' and microbatches=4"):
        recheck_schedule(plan, "gpipe", 4)
    model, args, _ = models.mlp()
    with pytest.raises(ValueError, match="autosplit.distributed.build"):
        autosplit(model, devices=2, plan=plan, example_inputs=args)


def test_shared_weights_held_as_copies_are_priced_as_the_distributed_runtime_holds_them():
    """A tied embedding and head read on two stages: sent once per call in one process, or a
    trained copy on each reading stage (its master weight and optimizer state, gradients
    all-reduced once per step) in the distributed runtime; each plan prices its own."""
    model, args, _ = models.tied_lm()
    traced = capture(model, args)
    graph, costs = OpGraph.from_traced(traced), price_graph(traced.graph_module)
    cluster = Cluster.parse("2xh100")
    plans = {how: solve(graph, cluster, SolverOptions(shared_weights=how, microbatches=4), costs=costs,
                        parameters=traced.parameters) for how in ("sent", "copies")}
    sent, copies = plans["sent"], plans["copies"]
    assert [s.nodes for s in sent.stages] == [s.nodes for s in copies.stages], "the same cut, to compare"
    assert sent.reads_weights_across_stages and copies.shared_weights == "copies"
    reader = next(s for s in sent.stages if s.weight_copies)
    other = copies.stages[reader.index]
    p = TRAINING_PRECISIONS["bf16-mixed"]
    extra = reader.weight_copies * (p.master_bytes + 2 * p.state_bytes)  # AdamW: two states
    assert other.memory.optimizer_bytes - reader.memory.optimizer_bytes == pytest.approx(extra)
    assert other.transfers_in == reader.transfers_in - 1, "no weight comes over the link per call"
    with pytest.raises(ValueError, match="shared_weights must be one of"):
        SolverOptions(shared_weights="mirrored")
    with pytest.raises(ValueError, match=r"as a copy trained on every stage that reads it.*shared_weights='sent'"):
        autosplit.autosplit(model, devices=["cpu", "cpu"], plan=copies, example_inputs=args)
