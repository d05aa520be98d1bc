"""The joint search: meshes, microbatch sizes, recomputation and tensor layouts chosen together."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from autosplit.graph import INPUT, OUTPUT, OpGraph  # noqa: E402
from autosplit.solver.joint import (RECOMPUTE, BlockSums, Mesh, block_sums, meshes, recompute_costs,  # noqa: E402
                             scale_costs, screen, solve_joint)
from autosplit.plan import Plan  # noqa: E402
from autosplit.solver import SolverOptions  # noqa: E402
from autosplit.trace import capture, spec  # noqa: E402
from cost_models import AnalyticCostModel, Cluster, price_graph  # noqa: E402
from cost_models.memory import microbatches_in_flight, peak_terms  # noqa: E402

SEQ = 128


def _llama(layers: int = 4, hidden: int = 256, batch: int = 1, seq: int = SEQ):
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                                      max_position_embeddings=seq, use_cache=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    traced = capture(model, (spec((batch, seq), dtype=torch.long),))
    return traced, price_graph(traced.graph_module, training=True)


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.fixture(scope="module")
def wide_llama():
    """Layers wide enough (4096, sequences of 2048) that splitting them over NVLinked GPUs pays."""
    return _llama(layers=4, hidden=4096, seq=2048)


def test_scaled_costs_match_pricing_at_twice_the_batch():
    (_, c1), (_, c2) = _llama(layers=1, batch=1), _llama(layers=1, batch=2)
    scaled = scale_costs(c1, 2)
    for field in ("fwd_flops", "bwd_flops", "grad_bytes"):  # exact: every op's work is linear in the batch
        assert sum(getattr(c, field) for c in scaled.values()) == sum(getattr(c, field) for c in c2.values())
    for field in ("fwd_bytes", "bwd_bytes", "saved_bytes"):  # rotary tables do not grow with the batch
        ratio = sum(getattr(c, field) for c in scaled.values()) / sum(getattr(c, field) for c in c2.values())
        assert 1 <= ratio < 1.03, (field, ratio)


def test_recomputation_keeps_less_and_reruns_the_forward(llama):
    traced, costs = llama
    blocks = OpGraph.from_traced(traced).coarsen()
    chain = [b for b in blocks.order if blocks[b]["kind"] not in (INPUT, OUTPUT)]
    times = AnalyticCostModel().times(costs, Cluster.parse("h100").devices[0])
    sums = block_sums(blocks, chain, costs, times, traced.parameters, train=True)
    heaviest = sums.time_s["none"].max()
    layers = [k for k in range(len(chain)) if sums.time_s["none"][k] > heaviest / 2 and sums.params[k] < 2e6]
    assert len(layers) == 4  # the decoder layers, not the embedding or the head
    for k in layers:
        assert sums.saved_bytes["full"][k] < sums.saved_bytes["selective"][k] < sums.saved_bytes["none"][k]
        assert sums.time_s["none"][k] < sums.time_s["selective"][k] < sums.time_s["full"][k]
    # the costs the exact solver gets say the same: full recomputation of a layer keeps only its input
    layer = chain[layers[0]]
    changed = recompute_costs(costs, blocks, {layer: "full"})
    kept = {k for n in blocks[layer]["members"] for k in changed[n].saved}
    inside = set(blocks[layer]["members"])
    assert all(k.partition(":")[0] not in inside or changed[k.partition(":")[0]].weight for k in kept)
    assert sum(changed[n].bwd_flops for n in inside) == sum(costs[n].bwd_flops + costs[n].fwd_flops for n in inside
                                                            if not costs[n].weight)


def test_meshes_keep_tensor_parallel_groups_inside_a_host():
    found = meshes(Cluster.parse("2x4xh100"), 64, blocks=10)
    assert {m.tp for m in found} == {1, 2, 4}
    assert all(m.dp * m.pp * m.tp == 8 for m in found)
    assert Mesh(1, 2, 4) in found and Mesh(2, 1, 4) in found
    assert all(m.dp in (1, 2) for m in meshes(Cluster.parse("2x4xh100"), 6, blocks=10))  # dp divides the batch


def _brute_force(sums: BlockSums, stages: int, m: int, capacity: float, rules: dict) -> float:
    n = len(sums.params)
    best = np.inf
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        worst = 0.0
        for s in range(stages):
            a, b = bounds[s], bounds[s + 1]
            fits = []
            for r in RECOMPUTE:
                saved = sums.saved_bytes[r][a:b].sum()
                total = sum(peak_terms(params=sums.params[a:b].sum(), activations=saved,
                                       transient=saved + sums.peak_bytes[r][a:b].max(),
                                       in_flight=microbatches_in_flight("1f1b", num_stages=stages, stage=s,
                                                                        microbatches=m), gpu=True, **rules).values())
                if total <= capacity:
                    fits.append(sums.time_s[r][a:b].sum())
            worst = max(worst, min(fits, default=np.inf))
        best = min(best, worst)
    return best


def test_screen_is_exact_over_block_cuts():
    rng = np.random.default_rng(0)
    n = 7
    none = rng.uniform(1, 2, n)
    sums = BlockSums(time_s={"none": none, "selective": none * 1.1, "full": none * 1.3},
                     saved_bytes={"none": rng.uniform(2e9, 4e9, n), "selective": np.full(n, 1e9),
                                  "full": np.full(n, 2e8)},
                     peak_bytes={r: np.full(n, 1e8) for r in RECOMPUTE}, params=rng.uniform(1e8, 3e8, n),
                     cross_bytes=np.zeros(n + 1))
    rules = dict(mode="train", precision="bf16-mixed", optimizer="adamw")
    for capacity in (40e9, 25e9, 16e9):
        found = screen(sums, stages=3, microbatches=4, capacity_bytes=capacity, hop_s_per_byte=0.0, hop_latency_s=0.0,
                       gpu=True, rules=rules)
        expected = _brute_force(sums, 3, 4, capacity, rules)
        if not np.isfinite(expected):
            assert found is None
            continue
        assert found is not None and found[0] == pytest.approx(expected), capacity
    # tighter memory makes the stages recompute, the first (most in flight) first
    roomy = screen(sums, stages=3, microbatches=4, capacity_bytes=80e9, hop_s_per_byte=0.0, hop_latency_s=0.0,
                   gpu=True, rules=rules)
    tight = screen(sums, stages=3, microbatches=4, capacity_bytes=16e9, hop_s_per_byte=0.0, hop_latency_s=0.0,
                   gpu=True, rules=rules)
    assert set(roomy[1]) == {"none"} and tight[1][0] != "none"


def test_joint_plan_chooses_microbatches_and_round_trips(llama, tmp_path):
    traced, costs = llama
    options = SolverOptions(global_batch=32, tensor_parallel=1, tokens_per_sample=SEQ, time_limit_s=2)
    graph = OpGraph.from_traced(traced)
    plan = solve_joint(graph, Cluster.parse("4xa100-80gb"), options, costs=costs, parameters=traced.parameters,
                       buffers=traced.buffers)
    mesh = plan.mesh
    assert mesh["dp"] * mesh["pp"] * mesh["tp"] == 4 and mesh["tp"] == 1
    assert plan.global_batch == 32 == mesh["dp"] * plan.microbatches * plan.microbatch_size
    if mesh["pp"] > 1:
        assert plan.microbatches > 1  # one microbatch would leave the pipeline idle most of the step
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan
    again = solve_joint(graph, Cluster.parse("4xa100-80gb"), options, costs=costs, parameters=traced.parameters,
                        buffers=traced.buffers)
    assert again.to_dict() | {"solver": None} == plan.to_dict() | {"solver": None}


def test_joint_plans_refuse_to_run_where_a_runtime_cannot(llama):
    traced, costs = llama
    plan = solve_joint(OpGraph.from_traced(traced), Cluster.parse("2xh100"),
                       SolverOptions(global_batch=4, recompute="full", tensor_parallel=1, time_limit_s=2),
                       costs=costs, parameters=traced.parameters, buffers=traced.buffers)
    assert {s.recompute for s in plan.stages} == {"full"}
    with pytest.raises(ValueError, match="recomputes activations"):
        plan.require_pipeline_only("autosplit() in one process")
    with pytest.raises(ValueError, match="global_batch"):
        SolverOptions(tensor_parallel=2)


def _solve(traced, costs, cluster: str, **options):
    from autosplit.api import solve_traced

    return solve_traced(traced, Cluster.parse(cluster), SolverOptions(time_limit_s=2, **options), costs)


def test_tensor_parallel_plans_carry_head_split_layouts_and_round_trip(wide_llama, tmp_path):
    traced, costs = wide_llama
    plan = _solve(traced, costs, "4xh100", global_batch=8, tensor_parallel=2)
    assert plan.tensor_parallel == 2 and plan.mesh["tp"] == 2
    assert all(len(stage.devices) == 2 for stage in plan.stages)
    linear = {v["module"]: v for v in plan.layouts.values() if v["op"] == "aten.linear.default"}
    q, o = linear["model.layers.0.self_attn.q_proj"], linear["model.layers.0.self_attn.o_proj"]
    assert q["inputs"][1] == "S(0)" and o["inputs"][1] == "S(1)", (q, o)  # column-parallel q, row-parallel o
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan
    again = _solve(traced, costs, "4xh100", global_batch=8, tensor_parallel=2)
    assert _solve(traced, costs, "2x4xh100", global_batch=8).tensor_parallel > 1  # chosen where it pays
    assert again.to_dict() | {"solver": None} == plan.to_dict() | {"solver": None}


def test_tensor_parallel_stays_inside_hosts_and_stages_cross_them(wide_llama):
    traced, costs = wide_llama
    plan = _solve(traced, costs, "2x4xh100", global_batch=16, tensor_parallel=4, stages=2)
    assert plan.mesh == {"dp": 1, "pp": 2, "tp": 4}
    hosts = [{int(d.rpartition(":")[2]) // 4 for d in stage.devices} for stage in plan.stages]
    assert hosts == [{0}, {1}]  # each stage's group on one host, the pipeline's cut between hosts


def test_a_layer_too_large_for_one_device_is_sharded_instead_of_refused():
    from autosplit.api import solve_traced
    from autosplit.errors import InfeasibleError
    from autosplit.solver import solve

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 70_000), torch.nn.Linear(70_000, 70_000),
                                    torch.nn.Linear(70_000, 64))
    traced = capture(model, (spec((8, 64)),), tracer="export")
    costs = price_graph(traced.graph_module, training=True)
    with pytest.raises(InfeasibleError):  # 4.9 B parameters with AdamW: 78 GB on one 80 GB H100
        solve(OpGraph.from_traced(traced), Cluster.parse("2xh100"), SolverOptions(), costs=costs,
              parameters=traced.parameters)
    plan = solve_traced(traced, Cluster.parse("2xh100"), SolverOptions(global_batch=8, time_limit_s=2), costs)
    assert plan.tensor_parallel == 2
    assert max(stage.memory_bytes for stage in plan.stages) <= plan.stages[0].memory_capacity_bytes


def test_the_api_plans_a_global_batch_from_the_traced_batch_and_autosplit_refuses_one():
    import autosplit

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=SEQ,
                                      use_cache=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    inputs = (spec((2, SEQ), dtype=torch.long),)  # traced at 2 samples: the costs scale from 2
    plan = autosplit.plan(model, cluster="2xa100-80gb", example_inputs=inputs, global_batch=8, time_limit_s=2)
    assert plan.global_batch == 8 == plan.mesh["dp"] * plan.microbatches * plan.microbatch_size
    assert plan.options["samples_per_microbatch"] == plan.microbatch_size
    with pytest.raises(ValueError, match="autosplit.plan"):
        autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=inputs, global_batch=8)


def test_fixed_sizes_the_cluster_or_batch_cannot_meet_are_refused_with_what_fits(llama):
    from autosplit.errors import ConfigError

    traced, costs = llama
    with pytest.raises(ConfigError, match="must divide the 4 devices .*use one of 1, 2, 4"):
        _solve(traced, costs, "2x2xh100", global_batch=8, tensor_parallel=3)
    with pytest.raises(ConfigError, match="dp must divide the global batch \\(5\\)"):
        _solve(traced, costs, "2x2xh100", global_batch=5, data_parallel=2)


def test_the_one_process_split_refuses_a_plan_it_cannot_run_before_moving_anything():
    import copy

    import autosplit
    from checks import assert_unchanged
    from models import MLP

    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 16)
    plan = autosplit.plan(model, devices=["cpu", "cpu"], example_inputs=(x,), global_batch=8, tensor_parallel=1,
                          stages=2, recompute="full", time_limit_s=2)
    assert plan.mesh == {"dp": 1, "pp": 2, "tp": 1}
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="recomputes activations .*autosplit\\(\\) in one process"):
        autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,), plan=plan)
    assert_unchanged(model, before)


def test_values_crossing_stages_of_tensor_parallel_groups_are_priced_as_one_rank_s_shard(wide_llama):
    from autosplit.solver.joint import per_rank_graph

    traced, costs = wide_llama
    plan = _solve(traced, costs, "4xh100", global_batch=8, tensor_parallel=2, stages=2)
    graph = OpGraph.from_traced(traced)
    shards = per_rank_graph(graph, plan.layouts, 2)
    sharded = [n for n, v in plan.layouts.items() if v["output"].startswith("S(") and graph.infos[n].op != "get_attr"
               and len(v["output"].split()) == 1]
    assert sharded
    for name in sharded:
        whole, part = graph.infos[name], shards.infos[name]
        assert part.output_bytes * 2 == whole.output_bytes, name  # rank i of a group sends its half
        for _, v, tensors in shards.dag.out_edges(name, data="tensors"):
            assert tensors[name].nbytes * 2 == graph.dag.edges[name, v]["tensors"][name].nbytes
    replicated = next(n for n, v in plan.layouts.items() if v["output"] == "R" and graph.infos[n].output_bytes)
    assert shards.infos[replicated] == graph.infos[replicated]
