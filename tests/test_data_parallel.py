"""Pipeline × data parallel: 2 replicas of a 2-stage plan on 4 gloo ranks train exactly like the
model in one process on the global batch, the copies of a tied weight stay bit-identical, a
world the plan does not fit is refused on every rank, and the plan prices what FSDP2 keeps and
sends per rank.

The multi-process tests share 4 ranks spawned once for the test session
(``rank_pool.shared_ranks``), which fail the test, killing the ranks, if a run has not finished
within ``RANKS_TIMEOUT_S``. Plans are made once, in the test process, and passed to the ranks.
"""

import copy
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import autosplit.distributed
import models
from autosplit import OpGraph, Plan, SolverOptions, solve
from autosplit.api import capture_microbatch
from autosplit.distributed import DistributedError
from autosplit.distributed.runtime import refuse_replicated_writes
from autosplit.errors import ConfigError, MicrobatchError
from cost_models import Cluster, price_graph, sharded_data_parallel_s
from cost_models.memory import FRAGMENTATION
from checks import train_alongside
from rank_pool import shared_ranks

RANKS_TIMEOUT_S = 120.0
"""How long one run on the 4 ranks may take before they are killed and the test fails."""

GROUP_TIMEOUT_S = 60.0
"""The ranks' process-group timeout: a rank waiting for a dead or stuck peer fails by then."""

REPLICAS, STAGES, MICROBATCHES, MICROBATCH_SIZE = 2, 2, 2, 2


def lm_loss(output, target):
    return F.cross_entropy(output["logits"].flatten(0, 1), target.flatten())


def global_batch(seed):
    """Token ids and targets of the global batch: every replica's microbatches."""
    g = torch.Generator().manual_seed(seed)
    size = REPLICAS * MICROBATCHES * MICROBATCH_SIZE
    return torch.randint(0, 50, (size, 6), generator=g), torch.randint(0, 50, (size, 6), generator=g)


def make_model():
    return models.tied_lm()[0].train()


@functools.cache
def make_plan(replicas=REPLICAS, stages=STAGES, schedule="1f1b"):
    """A plan of ``stages`` stages for each of ``replicas`` replicas on H100s: the cluster holds
    every replica's devices."""
    ids, _ = global_batch(0)
    traced = capture_microbatch(make_model(), (ids,), {}, microbatches=REPLICAS * MICROBATCHES).traced
    return solve(OpGraph.from_traced(traced), Cluster.parse(f"{replicas * stages}xh100"),
                 SolverOptions(microbatches=MICROBATCHES, schedule=schedule, data_parallel=replicas,
                               shared_weights="copies"),
                 costs=price_graph(traced.graph_module), parameters=traced.parameters, buffers=traced.buffers)


@pytest.fixture(scope="module")
def ranks():
    return shared_ranks(world=REPLICAS * STAGES, timeout_s=RANKS_TIMEOUT_S)


# --------------------------------------------------------------------------- what each rank runs


def train_like_one_process(rank, plans, steps):
    """For each plan: one step's loss and every gradient of this rank equal the model's in one
    process on the global batch (a deepcopy), and after ``steps`` AdamW steps so do the weights.
    Returns, per plan, the rank's replica and stage, its shared weights, and the bytes of each
    of its parameters gathered whole after the steps."""
    reports = []
    for plan in plans:
        model = make_model()
        reference = copy.deepcopy(model)
        pipe = autosplit.distributed.build(model, plan, loss_fn=lm_loss, example_inputs=(global_batch(0)[0],),
                                           timeout_s=GROUP_TIMEOUT_S)
        for name, p in pipe.named_parameters():
            assert isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0], f"{name} is sharded"
        whole = train_alongside(pipe, reference, lambda step: ((global_batch(step)[0],), {}, global_batch(step)[1]),
                                lm_loss, steps, whole=lambda t: t.full_tensor(), label=plan.schedule)
        reports.append({"where": (pipe.replica, pipe.stage), "shared": sorted(pipe.shared_weights),
                        "bytes": {name: value.numpy().tobytes() for name, value in whole.items()}})
    return reports


def refusals(rank, plans):
    """The message of every plan or data_parallel this world cannot run (``None`` if it ran)."""
    messages = []
    for plan, data_parallel in plans:
        try:
            autosplit.distributed.build(make_model(), plan, loss_fn=lm_loss, example_inputs=(global_batch(0)[0],),
                                        data_parallel=data_parallel, timeout_s=GROUP_TIMEOUT_S)
        except DistributedError as e:
            messages.append(str(e))
        else:
            messages.append(None)
    return messages


def plan_for_the_world_then_train(rank):
    """Rank 0 plans 2 replicas of world ÷ 2 stages and shares the plan; every rank runs it."""
    model = make_model()
    ids, target = global_batch(0)
    plan = autosplit.distributed.plan_and_broadcast(model, example_inputs=(ids,), microbatches=MICROBATCHES,
                                                    cluster="4xh100", data_parallel=REPLICAS,
                                                    timeout_s=GROUP_TIMEOUT_S)
    pipe = autosplit.distributed.build(model, plan, loss_fn=lm_loss, example_inputs=(ids,), timeout_s=GROUP_TIMEOUT_S)
    loss = pipe.step(ids, target=target)
    return autosplit.distributed.plan_digest(plan), (plan.data_parallel, len(plan.stages)), loss is not None


# --------------------------------------------------------------------------- tests


def test_two_replicas_of_two_stages_train_exactly_like_one_process_with_gpipe_and_1f1b(ranks):
    plans = [make_plan(schedule=schedule) for schedule in ("gpipe", "1f1b")]
    reports = ranks.run(train_like_one_process, plans, 3)
    for i in range(len(plans)):
        # rank = replica × stages + stage
        assert [report[i]["where"] for report in reports] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert all(report[i]["shared"] == ["embed.weight"] for report in reports)
        tied = [report[i]["bytes"]["embed.weight"] for report in reports]
        assert tied.count(tied[0]) == 4, "the four copies of the tied weight are bit-identical"
        for stage in range(STAGES):  # the replicas of a stage are bit-identical too
            assert reports[stage][i]["bytes"] == reports[STAGES + stage][i]["bytes"]


def test_a_world_the_plan_does_not_fit_is_refused_on_every_rank(ranks):
    three_stages = make_plan(replicas=1, stages=3, schedule="gpipe")
    one_replica = make_plan(replicas=1, stages=2)
    messages = ranks.run(refusals, [(three_stages, None), (one_replica, None), (make_plan(), 4)])
    for not_multiple, other_replicas, other_data_parallel in messages:
        assert "the plan has 3 stages" in not_multiple and "4 ranks run, not a multiple of 3" in not_multiple
        assert "launch 3 (1 replica) or 6 (2 replicas) processes" in not_multiple
        assert "4 stages × 1 replica, 2 stages × 2 replicas, 1 stage × 4 replicas" in not_multiple
        assert "made for 1 data-parallel replica of 2 stages (2 ranks)" in other_replicas
        assert "plan for 2 replicas" in other_replicas and "data_parallel=2" in other_replicas
        assert "data_parallel=4 replicas of the plan's 2 stages need 8 ranks" in other_data_parallel


def test_rank_0_plans_replicas_for_the_world_and_every_rank_runs_them(ranks):
    reports = ranks.run(plan_for_the_world_then_train)
    assert len({digest for digest, _, _ in reports}) == 1, "every rank got rank 0's plan"
    assert all(shape == (REPLICAS, STAGES) for _, shape, _ in reports)
    assert [last for _, _, last in reports] == [False, True, False, True]


def test_a_model_that_writes_its_buffers_in_forward_is_refused_with_replicas():
    model, _, _ = models.step_counter()
    traced = capture_microbatch(model, (torch.randn(8, 8),), {}, microbatches=1).traced
    refuse_replicated_writes(traced, 1)
    with pytest.raises(MicrobatchError, match="updates n in forward, and with 2 data-parallel replicas"):
        refuse_replicated_writes(traced, 2)


def test_the_plan_prices_what_fsdp2_keeps_and_sends_per_rank():
    """bf16 mixed precision with AdamW keeps per parameter 2 B of weight, 2 of gradient, 4 of
    master weight and 8 of optimizer state. Two FSDP2 replicas keep 1/2 of each and, through
    the step, the stage's weights and gradients whole: +1/2 × 2 B of weight and of gradient per
    parameter the stage holds (copies of a tied weight included), −1/2 × 12 B per parameter it
    trains (its copies too: each rank steps its own, ``shared_weights="copies"``); the GPU's
    fragmentation allowance follows the live bytes."""
    one, two = make_plan(replicas=1), make_plan(replicas=2)
    assert (one.data_parallel, two.data_parallel) == (1, 2)
    cluster = Cluster.parse("4xh100")
    for a, b in zip(one.stages, two.stages, strict=True):
        assert a.nodes == b.nodes and a.weight_copies == b.weight_copies
        held = a.param_count + a.weight_copies
        extra = dict(weights_bytes=held * 2 / 2, grads_bytes=held * 2 / 2, optimizer_bytes=-held * 12 / 2,
                     activations_bytes=0.0, kv_cache_bytes=0.0)
        extra["workspace_bytes"] = FRAGMENTATION * sum(extra.values())
        got = {k: getattr(b.memory, k) - getattr(a.memory, k) for k in extra}
        assert got == pytest.approx(extra, rel=1e-12, abs=1e-6)
        # the halved optimizer step stays below the microbatch's own peak, so it does not move the workspace
        assert held * 4 / 2 - a.memory.activations_bytes < a.transient_bytes - a.saved_bytes_per_microbatch
        assert b.data_parallel_s == sharded_data_parallel_s(cluster, [a.index, a.index + STAGES], held * 2, held * 2)
        assert b.data_parallel_s > 0 and a.data_parallel_s == 0
    m, S = MICROBATCHES, STAGES
    assert one.step_s == pytest.approx((m + S - 1) * one.bottleneck_s)
    assert two.bottleneck_s == one.bottleneck_s
    assert two.step_s == pytest.approx((m + S - 1) * two.bottleneck_s + max(s.data_parallel_s for s in two.stages))
    assert two.samples_per_s == pytest.approx(REPLICAS * m * 1 / two.step_s)
    assert "replicas     2 (FSDP2" in str(two)


def test_a_plan_with_replicas_round_trips_and_older_plans_read_as_one_replica(tmp_path):
    plan = make_plan()
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan
    older = plan.to_dict()
    del older["data_parallel"]
    for stage in older["stages"]:
        del stage["data_parallel_s"]
    assert Plan.from_dict(older).data_parallel == 1
    assert Plan.from_dict(older).stages[0].data_parallel_s == 0.0


def test_replicas_need_equal_runs_of_devices_and_one_process_runs_one_replica():
    plan = make_plan(replicas=1)
    graph_args = dict(costs={}, parameters={})
    with pytest.raises(ConfigError, match="the cluster 3xh100-sxm has 3, not a multiple of 2"):
        solve(OpGraph.from_traced(capture_microbatch(make_model(), (global_batch(0)[0],), {}, microbatches=4).traced),
              Cluster.parse("3xh100"), SolverOptions(data_parallel=2), **graph_args)
    with pytest.raises(ConfigError, match="replica 0 has h100-sxm and replica 1 has a100"):
        solve(OpGraph.from_traced(capture_microbatch(make_model(), (global_batch(0)[0],), {}, microbatches=4).traced),
              Cluster.parse("h100+a100"), SolverOptions(data_parallel=2), **graph_args)
    with pytest.raises(ValueError, match="data_parallel=2 runs replicas of the pipeline in separate processes"):
        autosplit.autosplit(make_model(), devices=2, plan=dataclasses.replace(plan, data_parallel=2),
                            example_inputs=(global_batch(0)[0],))
