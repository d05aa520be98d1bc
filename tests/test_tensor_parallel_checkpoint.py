"""Checkpoints of tensor-parallel pipelines, a GPT whose embedding is tied to its head: a pp=2 ×
tp=2 pipeline built on meta reads the unsplit model's checkpoint into its DTensor shards, takes
an AdamW step and saves; that checkpoint (each weight once, the tied one included, the moments
as DTensors) loads with the optimizer's state into 4 stages without tensor parallelism, which
take the next step as the model does, and into the unsplit model; the 4 stages' checkpoint
loads back into the DTensors for a third step.

The tensor-parallel plan is the one ``test_distributed_tensor_parallel.py`` makes (a cluster
priced slow enough that the planner shards these tiny layers); the 4 gloo ranks are spawned once
for the module and do everything in one run, to keep the file quick."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.distributed.checkpoint as dcp

import autosplit
import autosplit.distributed
from autosplit.api import capture_microbatch
from autosplit.distributed.stages import stage_chain
from autosplit.graph import LAYOUT_ONLY
from numerics import assert_same
from rank_pool import shared_ranks
from test_distributed_tensor_parallel import batch, gpt, lm_loss, make_plan, slow_cluster, whole

RANKS_TIMEOUT_S = 240.0
"""How long the ranks may run before they are killed and the test fails."""

GROUP_TIMEOUT_S = 90.0
"""The ranks' process-group timeout: a rank waiting for a dead or stuck peer fails by then."""

LR, EPS = 1e-2, 1e-4
"""AdamW's, in the pipelines and the reference alike (``EPS``: see ``checks.train_alongside``)."""

TIED = "transformer.wte.weight"
"""The tied weight's canonical name (``lm_head.weight`` is its other name)."""


@functools.cache
def four_stage_plan():
    """A plan for 4 stages, one rank each, without tensor parallelism."""
    (ids,), _, _ = batch(0)
    return autosplit.plan(gpt(), example_inputs=(ids[:2],), cluster=slow_cluster(4), tracer="export",
                          global_batch=ids.shape[0], stages=4, shared_weights="copies")


def on_meta(factory):
    with torch.device("meta"):
        return factory()


def as_bytes(tensors):
    """Each tensor whole, as bytes, for comparing bit for bit across processes."""
    return {name: whole(t).detach().cpu().numpy().tobytes() for name, t in tensors.items()}


def optimizer_state(pipe, optimizer):
    """The optimizer's tensors by parameter name and key (``transformer.wte.weight.exp_avg``)."""
    names = {id(p): name for name, p in pipe.named_parameters()}
    return {f"{names[id(p)]}.{key}": value for p, state in optimizer.state.items() for key, value in state.items()}


def step(pipe, optimizer, reference, ref_optimizer, n):
    args, _, target = batch(n)
    pipe.step(*args, target=target)
    optimizer.step()
    optimizer.zero_grad()
    lm_loss(reference(*args), target).backward()
    ref_optimizer.step()
    ref_optimizer.zero_grad()


# --------------------------------------------------------------------------- what each rank runs


def checkpoints_across_plans(rank, tp_plan, pp_plan, unsplit, saved, resaved):
    """Build pp=2 × tp=2 on meta from the unsplit model's checkpoint and train a step beside the
    model, then save with the optimizer; build 4 stages on meta from that checkpoint with the
    optimizer's state and take the second step, which equals the model's only if the state came
    back whole; save again, and load that into the tensor-parallel pipeline for the third step."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    reference = gpt()  # the weights the unsplit checkpoint holds
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR, eps=EPS)
    wanted = dict(reference.named_parameters())
    source = {name: t.clone() for name, t in reference.state_dict().items()}
    args, _, _ = batch(0)
    tp = autosplit.distributed.build(on_meta(gpt), tp_plan, loss_fn=lm_loss, example_inputs=args, tracer="export",
                                     timeout_s=GROUP_TIMEOUT_S, checkpoint=unsplit)
    state = tp.state_dict()
    placements = {name: str(t.placements) for name, t in state.items() if isinstance(t, DTensor)}
    for name, t in state.items():  # each rank's shard is its slice of the model's tensor, bit for bit
        assert torch.equal(whole(t), source[name]), name
        if isinstance(t, DTensor):
            mine = distribute_tensor(source[name], t.device_mesh, t.placements, src_data_rank=None).to_local()
            assert torch.equal(t.to_local(), mine), name
    tp.load_state_dict({name: torch.zeros_like(whole(t)) for name, t in state.items()})
    assert not any(t.to_local().any() if isinstance(t, DTensor) else t.any() for t in tp.state_dict().values())
    tp.load_state_dict(source)  # the whole model's, the tied weight under both its names
    assert all(torch.equal(whole(t), source[name]) for name, t in tp.state_dict().items())

    opt = torch.optim.AdamW(tp.parameters(), lr=LR, eps=EPS)
    step(tp, opt, reference, ref_opt, 0)
    for p, moments in opt.state.items():  # the moments are sharded as their weights
        assert getattr(moments["exp_avg"], "placements", None) == getattr(p, "placements", None)
    autosplit.distributed.save(tp, saved, optimizer=opt)
    trained, moments = as_bytes(tp.state_dict()), as_bytes(optimizer_state(tp, opt))

    pp = autosplit.distributed.build(on_meta(gpt), pp_plan, loss_fn=lm_loss, example_inputs=args, tracer="export",
                                     timeout_s=GROUP_TIMEOUT_S, checkpoint=saved)
    pp_opt = torch.optim.AdamW(pp.parameters(), lr=LR, eps=EPS)
    autosplit.distributed.load(pp, saved, optimizer=pp_opt)
    loaded, loaded_moments = as_bytes(pp.state_dict()), as_bytes(optimizer_state(pp, pp_opt))
    step(pp, pp_opt, reference, ref_opt, 1)
    for name, p in pp.named_parameters():
        assert_same(p.detach(), wanted[name].detach(), name=f"rank {rank} {name}, 4 stages, a step after loading")
    autosplit.distributed.save(pp, resaved, optimizer=pp_opt)
    resaved_state, resaved_moments = as_bytes(pp.state_dict()), as_bytes(optimizer_state(pp, pp_opt))

    opt = torch.optim.AdamW(tp.parameters(), lr=LR, eps=EPS)  # back into the DTensors, moments too
    autosplit.distributed.load(tp, resaved, optimizer=opt)
    reloaded, reloaded_moments = as_bytes(tp.state_dict()), as_bytes(optimizer_state(tp, opt))
    step(tp, opt, reference, ref_opt, 2)
    for name, p in tp.named_parameters():
        assert_same(whole(p.detach()), wanted[name].detach(), name=f"rank {rank} {name}, pp=2 × tp=2, a step after "
                                                                   "loading")
    return {"placements": placements, "trained": trained, "moments": moments, "loaded": loaded,
            "loaded_moments": loaded_moments, "resaved": resaved_state, "resaved_moments": resaved_moments,
            "reloaded": reloaded, "reloaded_moments": reloaded_moments}


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def ranks():
    return shared_ranks(world=4, timeout_s=RANKS_TIMEOUT_S)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the unsplit model's, in one process
def test_tensor_parallel_checkpoints_load_under_another_plan_into_and_from_the_unsplit_model(ranks, tmp_path):
    unsplit, saved, resaved = tmp_path / "unsplit", tmp_path / "pp2_tp2", tmp_path / "pp4"
    autosplit.distributed.save(gpt(), unsplit)
    tp_plan = make_plan("gpt", stages=2, data_parallel=1)
    assert tp_plan.mesh == {"dp": 1, "pp": 2, "tp": 2}
    results = ranks.run(checkpoints_across_plans, tp_plan, four_stage_plan(), str(unsplit), str(saved), str(resaved))

    # ranks 0, 1 ran stage 0 of the tensor-parallel pipeline, ranks 2, 3 stage 1
    assert any("Shard" in p for r in results for p in r["placements"].values()), "the plan shards some weights"
    tied = results[0]["placements"][TIED]
    assert results[3]["placements"][TIED] == tied, "each stage's copy of the tied weight is sharded alike"
    model = gpt()
    names = set(model.state_dict()) - {"lm_head.weight"}  # the tied weight once, under its first name
    for before, after in (("trained", "loaded"), ("moments", "loaded_moments"), ("resaved", "reloaded"),
                          ("resaved_moments", "reloaded_moments")):
        written = {k: v for r in results for k, v in r[before].items()}
        for r in results:  # what each rank read is, bit for bit, what the other plan's ranks wrote
            assert r[before] == {k: written[k] for k in r[before]}, before
            assert r[after] == {k: written[k] for k in r[after]}, after
        assert set().union(*(r[after] for r in results)) == set(written), f"{after} covers {before}"
    trained = {k: v for r in results for k, v in r["trained"].items()}
    assert set(trained) == names

    stored = dcp.FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    assert {k for k in stored if not k.startswith("optimizer.")} == names
    # the tied weight's two copies, each in two shards (or replicated): written once
    chunks = {(tuple(c.offsets), tuple(c.sizes)) for c in stored[TIED].chunks}
    assert len(stored[TIED].chunks) == len(chunks) == (2 if "Shard" in tied else 1), stored[TIED].chunks
    assert sum(math.prod(sizes) for _, sizes in chunks) == model.transformer.wte.weight.numel()

    reference = gpt()  # into the unsplit model, with its optimizer: equal to the model trained the same step
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR, eps=EPS)
    args, _, target = batch(0)
    lm_loss(reference(*args), target).backward()
    ref_opt.step()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    autosplit.distributed.load(model, saved, optimizer=opt)
    assert as_bytes({k: v for k, v in model.state_dict().items() if k in names}) == trained
    assert model.lm_head.weight is model.transformer.wte.weight
    wanted = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert_same(p.detach(), wanted[name].detach(), name=name)
        for key, value in opt.state[p].items():
            assert_same(value, ref_opt.state[wanted[name]][key], name=f"{name}.{key}")


def test_a_plan_made_with_weights_cuts_the_model_built_on_meta():
    # export records a contiguous() after attention on meta, whose strides differ, and skips it with
    # weights: the plan does not list it, and it runs where its input is made
    plan = four_stage_plan()
    model = on_meta(gpt)
    captured = capture_microbatch(model, batch(0)[0], {}, microbatches=plan.microbatches, tracer="export")
    assert any(str(n.target) in LAYOUT_ONLY for n in captured.traced.graph_module.graph.nodes)
    chain = stage_chain(model, captured, plan, torch.device("cpu"))
    assert len(chain.modules) == 4
