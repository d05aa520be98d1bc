"""The split module in one process: outputs, gradients, buffers and an optimizer step equal the
original model's for every registry model, on 2 and 3 stages (CPU devices here)."""

import copy
import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree

import models
from autosplit import OpGraph, SolverOptions, capture, solve
from autosplit.rewrite import PlanMismatchError, split_module, transfer
from cost_models import Cluster, price_graph

HF = {"gpt2", "llama", "mixtral"}


def leaves(out):
    if dataclasses.is_dataclass(out) and type(out) not in pytree.SUPPORTED_NODES:
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def planned(name, stages):
    model, args, kwargs = models.REGISTRY[name]()
    model.train(name not in HF)
    reference = copy.deepcopy(model)
    traced = capture(model, args, kwargs)
    plan = solve(OpGraph.from_traced(traced), Cluster.parse(f"{stages}xh100"), SolverOptions(),
                 costs=price_graph(traced.graph_module), parameters=traced.parameters)
    return model, reference, traced, plan, args, kwargs


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_split_model_trains_exactly_like_the_original(name, stages):
    model, reference, traced, plan, args, kwargs = planned(name, stages)
    split = split_module(model, traced, plan, ["cpu"] * stages)
    assert list(split.state_dict()) == list(reference.state_dict())
    assert sum(1 for n in split.graph_module.graph.nodes if n.target is transfer) >= stages - 1

    ref_kwargs = {**kwargs, "use_cache": False} if name in HF else kwargs
    out, want = split(*args, **kwargs), reference(*args, **ref_kwargs)
    assert type(out) is type(want)
    for got, expected in zip(leaves(out), leaves(want), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    loss = lambda o: sum(t.float().square().mean() for t in leaves(o) if t.is_floating_point())  # noqa: E731
    loss(out).backward()
    loss(want).backward()
    for (n1, p1), (n2, p2) in zip(split.named_parameters(), reference.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-5, msg=n1)
    for (n1, b1), (_, b2) in zip(split.named_buffers(), reference.named_buffers(), strict=True):
        torch.testing.assert_close(b1, b2, msg=n1)  # BatchNorm statistics moved alike

    opt, ref_opt = torch.optim.AdamW(split.parameters(), lr=1e-2), torch.optim.AdamW(reference.parameters(), lr=1e-2)
    opt.step()
    ref_opt.step()
    for (n1, p1), (_, p2) in zip(split.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=n1)


def test_eval_mode_and_no_grad_reach_the_stages():
    model, reference, traced, plan, args, _ = planned("rescnn", 2)
    split = split_module(model, traced, plan, ["cpu", "cpu"])
    split.eval()
    reference.eval()
    assert all(not m.training for m in split.graph_module.modules())
    with torch.no_grad():
        torch.testing.assert_close(split(*args), reference(*args), rtol=1e-5, atol=1e-5)


def test_a_plan_for_another_model_or_device_count_is_refused():
    model, _, traced, plan, _, _ = planned("mlp", 2)
    with pytest.raises(ValueError, match="the plan has 2 stages but 3 devices"):
        split_module(model, traced, plan, ["cpu"] * 3)
    other, args, _ = models.REGISTRY["tied_lm"]()
    other_traced = capture(other, args)
    with pytest.raises(PlanMismatchError, match="made for another graph.*Plan again"):
        split_module(other, other_traced, plan, ["cpu", "cpu"])


def test_checkpoints_load_either_way():
    model, reference, traced, plan, args, _ = planned("tied_lm", 3)
    split = split_module(model, traced, plan, ["cpu"] * 3)
    fresh = models.REGISTRY["tied_lm"]()[0]
    fresh.load_state_dict(split.state_dict())  # a split model's checkpoint loads into the original
    torch.testing.assert_close(fresh(*args)["logits"], split(*args)["logits"])
    torch.manual_seed(7)
    other = models.TiedLM()
    split.load_state_dict(other.state_dict())  # and the original's into the split model
    torch.testing.assert_close(split(*args)["logits"], other(*args)["logits"])
    assert split.head.weight is split.embed.weight  # still tied
