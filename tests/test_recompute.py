"""Activation recomputation as the plan prices it: the stage transform computes what the stage
computes (outputs and every gradient, dropout included), keeps for backward what the plan says
it keeps, and two gloo ranks train a plan that recomputes exactly like the model in one process.

The plans are made for a global batch with ``recompute`` forced (the joint planner), at the
traced microbatch size, so the runtime captures the graph the plan was made for.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import json
import os

import pytest
import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import autosplit
import autosplit.distributed
import models
from autosplit.api import capture_microbatch
from autosplit.distributed.recompute import Recompute, recompute_graph, recompute_stages
from autosplit.distributed.stages import stage_chain
from autosplit.plan import Plan, RecomputedBlock
from checks import train_alongside
from numerics import assert_same
from rank_pool import shared_ranks

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MICROBATCHES = 4
CPU = torch.device("cpu")


@functools.cache
def gpt2():
    """A 3-layer GPT-2 with dropout on (so recomputation must replay the random masks), training.
    Attention dropout stays off: with it, CPU attention runs the math path (softmax, dropout,
    matmuls), which keeps more than the fused attention the cost model prices."""
    transformers = pytest.importorskip("transformers")  # here, not at import: the spawned ranks do without it
    torch.manual_seed(0)
    config = models.tiny_gpt2_config(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0, use_cache=False)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, ids


@functools.cache
def gpt2_plan(policy: str) -> Plan:
    model, ids = gpt2()
    return autosplit.plan(model, cluster="2xh100", example_inputs=(ids,), global_batch=MICROBATCHES * len(ids),
                          microbatches=MICROBATCHES, stages=2, tensor_parallel=1, recompute=policy,
                          shared_weights="copies", time_limit_s=2)


@functools.cache
def gpt2_captured():
    model, ids = gpt2()
    return capture_microbatch(model, (ids,), {}, microbatches=1)


def gpt2_chain(plan: Plan, recompute: bool = True):
    model, _ = gpt2()
    chain = stage_chain(model, gpt2_captured(), plan, CPU)
    if recompute:
        made = recompute_stages(plan, chain.modules, range(len(plan.stages)))
        assert sorted(made) == [s.index for s in plan.stages if s.recompute != "none"]
    return chain


def run_chain(chain, seed: int = 7):
    """Both stages of the chain one after the other; the logits, and every gradient of a loss on them."""
    model, ids = gpt2()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    values = chain.modules[0](ids)
    logits = chain.output.decode(chain.modules[1](*values))["logits"]
    logits.square().mean().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def mixed(plan: Plan) -> Plan:
    """``plan`` with its blocks recomputing "full" and "selective" in turn, as a stage whose
    blocks differ (``"full+selective"``) says."""
    stages = []
    for stage in plan.stages:
        blocks = tuple(dataclasses.replace(b, policy=("full", "selective")[k % 2])
                       for k, b in enumerate(stage.recompute_blocks))
        stages.append(dataclasses.replace(stage, recompute="full+selective", recompute_blocks=blocks))
    return dataclasses.replace(plan, stages=tuple(stages))


# --------------------------------------------------------------------------- the transform


@pytest.mark.parametrize("policy", ["full", "selective", "mixed"])
def test_recomputed_stages_compute_the_same_outputs_and_gradients(policy):
    plan = mixed(gpt2_plan("full")) if policy == "mixed" else gpt2_plan(policy)
    want = run_chain(gpt2_chain(plan, recompute=False))
    chain = gpt2_chain(plan)
    segments = [m for module in chain.modules for m in module.modules() if isinstance(m, Recompute)]
    assert {m.policy for m in segments} == ({"full", "selective"} if policy == "mixed" else {policy})
    blocks = {b.block: b.policy for stage in plan.stages for b in stage.recompute_blocks}
    assert all(blocks[m.block] == m.policy for m in segments), "each block runs its own policy"
    got = run_chain(chain)
    assert_same(got[0], want[0], name="logits")
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        assert_same(got[1][name], want[1][name], name=f"{name}.grad")
    # dropout is on: the same seed gives the same masks, and recomputation replays them
    other = run_chain(gpt2_chain(plan, recompute=False), seed=8)
    assert not torch.equal(other[0], want[0])


def test_each_run_of_a_block_is_one_segment_and_weights_stay_in_the_stage():
    plan = gpt2_plan("full")
    chain = gpt2_chain(plan, recompute=False)
    stage = chain.modules[0]
    layer = next(b for b in plan.stages[0].recompute_blocks if b.block == "transformer.h.0")
    count = recompute_graph(stage, [layer])
    assert count == 1  # its moves and dropouts (ops fixed to the mode, renamed in_mode_k) do not cut it
    calls = [n for n in stage.graph.nodes if n.op == "call_module" and n.target.startswith("recompute")]
    assert len(calls) == 1
    segment = stage.get_submodule(calls[0].target).segment
    assert not [n for n in segment.graph.nodes if n.op == "get_attr"], "weights are passed in"
    assert {n.name for n in segment.graph.nodes if n.op not in ("placeholder", "output")} <= set(layer.nodes) | {
        n.name for n in segment.graph.nodes if n.op == "call_module"}
    with pytest.raises(ValueError, match="does not run"):
        recompute_graph(gpt2_chain(plan, recompute=False).modules[1], [layer])  # its nodes live on stage 0


# --------------------------------------------------------------------------- memory


class _Made(TorchDispatchMode):
    """Records the storage of every tensor an op makes (weakly, with its bytes)."""

    def __init__(self):
        super().__init__()
        self.storages = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        return out


def kept_for_backward(module, make_inputs, weights) -> tuple[int, list]:
    """Bytes of the distinct storages a stage's forward leaves alive for its backward: those made
    in forward, or given as inputs, that its autograd graph still holds once the caller has let
    go of its inputs and outputs (views count their storage once; weights do not count).

    Why not ``saved_tensors_hooks`` alone: inside a non-reentrant checkpoint the checkpoint's own
    hooks take what the segment's ops save, and what it keeps — the segment's inputs, the
    outputs its selective policy stores — never passes an outer hook. Returns the graph's roots,
    which keep it alive."""
    made = _Made()
    inputs = make_inputs()
    for t in inputs:
        storage = t.untyped_storage()
        made.storages[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
    with made:
        out = module(*inputs)
    roots = [t.grad_fn for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    del inputs, out
    gc.collect()
    skip = {w.untyped_storage()._cdata for w in weights}
    return sum(n for key, (ref, n) in made.storages.items() if key not in skip and not ref.expired()), roots


def saved_by_hooks(module, inputs, weights) -> int:
    """Bytes of the distinct storages autograd saves for backward (``saved_tensors_hooks``)."""
    skip = {w.untyped_storage()._cdata for w in weights}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(saved.values())


MEMORY_RTOL = 0.03
"""How far the bytes stage 0 keeps may be from the plan's ``saved_bytes_per_microbatch``."""


def test_recomputation_keeps_what_the_plan_prices():
    """Stage 0 of the GPT-2 (embeddings, layer 0, the first ops of layer 1) under each policy
    keeps for backward, per microbatch, the bytes the plan says (``Stage.saved_bytes_per_microbatch``,
    of which ``memory.activations_bytes`` is the multiple by the microbatches in flight).

    Measured (2 × 16 tokens, d 32, fp32): none keeps 157,824 B for 153,728 planned, selective
    66,944 for 66,944, full 13,184 for 13,184. The 4,096 B of "none": CPU attention turns the
    boolean causal mask into a float one and saves it (2,048 B in each of the two attentions),
    which the cost model does not price; the recomputing policies recompute it."""
    model, ids = gpt2()
    weights = list(model.parameters())
    found = {}
    for policy in ("none", "selective", "full"):
        plan = gpt2_plan(policy)
        module = gpt2_chain(plan).modules[0]
        kept, _ = kept_for_backward(module, lambda: (ids.clone(),), weights)
        planned = plan.stages[0].saved_bytes_per_microbatch
        found[policy] = kept
        assert abs(kept - planned) <= MEMORY_RTOL * planned, (policy, kept, planned)
        if policy == "none":  # the liveness count is what autograd saves, seen by its hooks
            assert kept == saved_by_hooks(module, (ids.clone(),), weights)
    assert found["full"] < found["selective"] < found["none"], found


# --------------------------------------------------------------------------- the plan


def test_the_plan_records_each_recomputing_block_and_round_trips(tmp_path):
    plan = gpt2_plan("selective")
    for stage in plan.stages:
        assert stage.recompute == "selective" and stage.recompute_blocks
        assert all(b.policy == "selective" for b in stage.recompute_blocks)
        nodes = [n for b in stage.recompute_blocks for n in b.nodes]
        assert len(nodes) == len(set(nodes)) and set(nodes) <= set(stage.nodes)
    assert {b.block for b in plan.stages[0].recompute_blocks} & {b.block for b in plan.stages[1].recompute_blocks}, \
        "a block cut by the stage boundary is listed on both stages, each with its own nodes"
    again = Plan.load(plan.save(tmp_path / "plan.json"))
    assert again == plan and isinstance(again.stages[0].recompute_blocks[0], RecomputedBlock)
    assert gpt2_plan("none").stages[0].recompute_blocks == ()
    # a plan saved before the blocks were recorded still loads; the runtime refuses to guess them
    data = json.loads(json.dumps(plan.to_dict()))
    for stage in data["stages"]:
        del stage["recompute_blocks"]
    old = Plan.from_dict(data)
    assert old.stages[0].recompute_blocks == () and old.stages[0].recompute == "selective"
    with pytest.raises(ValueError, match="does not record which blocks"):
        recompute_stages(old, gpt2_chain(old, recompute=False).modules, [0])
    plan.require_pipeline_only("autosplit.distributed", runs_recompute=True)
    with pytest.raises(ValueError, match="recomputes activations .*autosplit.distributed runs recomputation"):
        plan.require_pipeline_only("autosplit() in one process")


# --------------------------------------------------------------------------- two ranks


def lm_loss(output, target):
    return F.cross_entropy(output["logits"].flatten(0, 1), target.flatten())


def tied_lm_batch(step):
    g = torch.Generator().manual_seed(step)
    return ((torch.randint(0, 50, (2 * MICROBATCHES, 6), generator=g),), {},
            torch.randint(0, 50, (2 * MICROBATCHES, 6), generator=g))


def train_recomputing(rank, plan, steps):
    """One rank of a plan that recomputes: loss and every gradient of the first step, and the
    weights after ``steps`` AdamW steps, equal the model's in one process; returns the policies
    its stage runs."""
    model = models.tied_lm()[0]
    reference = copy.deepcopy(model)
    args, _, _ = tied_lm_batch(0)
    pipe = autosplit.distributed.build(model, plan, loss_fn=lm_loss, example_inputs=args, timeout_s=60)
    policies = sorted({m.policy for m in pipe._chain.modules[pipe.stage].modules() if isinstance(m, Recompute)})
    train_alongside(pipe, reference, tied_lm_batch, lm_loss, steps, label="recompute=full")
    return policies


class _Reduced(nn.Module):
    """A row-parallel projection and a residual: ``down(x)`` comes out as partial sums, which
    DTensor all-reduces inside the ``add``; then a norm."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(8, 16), nn.Linear(16, 8), nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.down(F.gelu(self.up(x))) + x)


def recompute_dtensors(rank):
    """The transform on a graph whose weights are DTensors sharded over the 2 ranks (``up``
    column-parallel, ``down`` row-parallel): outputs and gradients equal the plain graph's under
    each policy, and the all-reduce DTensor runs in forward is not run again in backward (the
    output of the op that reduces is kept). Returns the all-reduces of each backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model, x = _Reduced(), torch.randn(4, 8)
    exported = torch.export.export(model, (x,), strict=False)
    placements = {"up.weight": Shard(0), "up.bias": Shard(0), "down.weight": Shard(1)}
    reduces = []
    real = funcol.all_reduce

    def counted(*args, **kwargs):
        reduces.append(1)
        return real(*args, **kwargs)

    found = {}
    funcol.all_reduce = counted
    try:
        for policy in ("none", "full", "selective"):
            gm = exported.module()
            for name, p in list(gm.named_parameters()):
                owner, _, leaf = name.rpartition(".")
                setattr(gm.get_submodule(owner), leaf,
                        nn.Parameter(distribute_tensor(p.detach(), mesh, [placements.get(name, Replicate())])))
            if policy != "none":
                ops = tuple(n.name for n in gm.graph.nodes if n.op == "call_function")
                assert recompute_graph(gm, [RecomputedBlock("mlp", policy, ops)]) == 1
            out = gm(distribute_tensor(x, mesh, [Replicate()]))
            reduces.clear()
            out.full_tensor().square().sum().backward()
            found[policy] = (out.full_tensor().detach(), {n: p.grad.full_tensor() for n, p in gm.named_parameters()},
                             len(reduces))
    finally:
        funcol.all_reduce = real
    for policy in ("full", "selective"):
        assert_same(found[policy][0], found["none"][0], name=f"{policy} output")
        for name, grad in found["none"][1].items():
            assert_same(found[policy][1][name], grad, name=f"{policy} {name}.grad")
    return {policy: count for policy, (_, _, count) in found.items()}


def test_two_ranks_train_a_plan_that_recomputes_exactly_like_one_process():
    """The tied-embedding LM (fx-captured: its layers are call_module leaves inside the segments)
    on 2 gloo ranks with every block recomputing in full, under 1F1B. The same ranks then check
    the transform on DTensors (``recompute_dtensors``)."""
    model, args, _ = models.tied_lm()
    plan = autosplit.plan(model, cluster="2xh100", example_inputs=args, global_batch=2 * MICROBATCHES,
                          microbatches=MICROBATCHES, stages=2, tensor_parallel=1, recompute="full",
                          shared_weights="copies", time_limit_s=2)
    assert [s.recompute for s in plan.stages] == ["full", "full"]
    pool = shared_ranks(world=2, timeout_s=120)
    assert pool.run(train_recomputing, plan, 2) == [["full"], ["full"]]
    for counts in pool.run(recompute_dtensors):
        assert counts["full"] == counts["selective"] == counts["none"], counts
