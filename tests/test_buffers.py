"""Buffers written in forward (a counter, an EMA, running statistics): the split makes the same
writes once per call, capture never changes the model, and what cannot be done is refused."""

import copy

import pytest
import torch

import autosplit
import models
from autosplit import MicrobatchError, OpGraph, SolverOptions, TraceError, capture, solve
from autosplit.api import _solve
from autosplit.rewrite import split_module
from checks import assert_unchanged
from cost_models import Cluster, price_graph
from numerics import assert_same

HF = {"gpt2", "llama", "mixtral"}


@pytest.mark.parametrize("name", sorted(models.STATEFUL))
def test_split_updates_buffers_once_per_call_like_the_model(name):
    model, (x,), _ = models.STATEFUL[name]()
    model.train()
    reference = copy.deepcopy(model)
    split = autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,))
    assert len(split.plan.stages) == 2
    for step in range(3):  # each call must update the buffers once: the counter reads 1, 2, 3
        batch = x + step
        out, want = split(batch), reference(batch)
        assert_same(out, want, name=f"output of call {step}")
        out.square().mean().backward()
        want.square().mean().backward()
        for (n1, b1), (_, b2) in zip(split.named_buffers(), reference.named_buffers(), strict=True):
            assert b1 is model.get_buffer(n1), "the split shares the model's buffers"
            assert_same(b1, b2, name=f"{n1} after call {step}")
            assert not b1.requires_grad
        for (n1, p1), (_, p2) in zip(split.named_parameters(), reference.named_parameters(), strict=True):
            assert_same(p1.grad, p2.grad, name=f"{n1}.grad after call {step}")


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("name", sorted(models.STATEFUL))
def test_every_write_runs_on_the_stage_storing_its_buffer(name, stages):
    model, args, _ = models.STATEFUL[name]()
    traced = capture(model, args)
    written = traced.written()
    assert written, "the capture keeps the model's buffer writes"
    plan = solve(OpGraph.from_traced(traced), Cluster.parse(f"{stages}xh100"), SolverOptions(),
                 costs=price_graph(traced.graph_module), parameters=traced.parameters, buffers=traced.buffers)
    home = {w: stage.index for stage in plan.stages for w in stage.weights}
    stage_of = {n: stage.index for stage in plan.stages for n in stage.nodes}
    for buffer, writers in written.items():
        assert {stage_of[w] for w in writers} == {home[buffer]}, (buffer, writers, plan.stages)


def test_a_chain_of_in_place_ops_writes_the_buffer_at_every_step():
    model, args, _ = models.ema()
    traced = capture(model, args)
    assert traced.tracer == "export"  # fx would run `mul_` at trace time and drop it
    writers = traced.written()["ema"]
    assert [traced.nodes[w].target for w in writers] == ["aten.mul_.Tensor", "aten.add_.Tensor"]


@pytest.mark.parametrize("name", sorted(models.REGISTRY) + sorted(models.STATEFUL))
def test_capture_leaves_every_parameter_and_buffer_of_the_model_unchanged(name):
    model, args, kwargs = models.REGISTRY.get(name, models.STATEFUL.get(name))()
    model.train()
    before = copy.deepcopy(model)
    tracers = ["auto"] if name in HF else ["auto", "fx", "export"]
    for tracer in tracers:
        try:
            capture(model, args, kwargs, tracer=tracer)
        except TraceError:
            assert tracer == "fx" and name in ("step_counter", "ema"), (name, tracer)
        assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["step_counter", "ema"])
def test_fx_chosen_for_a_model_whose_writes_it_would_drop_is_refused(name):
    model, args, _ = models.STATEFUL[name]()
    before = copy.deepcopy(model)
    with pytest.raises(TraceError, match=r'writes the buffer (n|ema) .*Use tracer="export"'):
        autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=args, tracer="fx")
    assert_unchanged(model, before)
    assert autosplit.plan(model, devices=2, example_inputs=args, tracer="export").stages


def test_fx_keeps_writes_it_records():
    model, args, _ = models.running_norm()
    reference = copy.deepcopy(model)
    split = autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=args, tracer="fx")
    assert split.plan is not None and capture(model, args).tracer == "fx"
    split(*args)
    reference(*args)
    for (n1, b1), (_, b2) in zip(split.named_buffers(), reference.named_buffers(), strict=True):
        assert_same(b1, b2, name=n1)


def test_a_bad_tracer_is_refused():
    model, args, _ = models.mlp()
    for entry in (autosplit.autosplit, autosplit.plan):
        with pytest.raises(ValueError, match="tracer must be one of 'auto', 'fx', 'export', got 'torchscript'"):
            entry(model, devices=2, example_inputs=args, tracer="torchscript")


@pytest.mark.parametrize("name", sorted(models.STATEFUL))
def test_buffer_writes_under_microbatches_are_refused_before_anything_moves(name):
    model, (x,), _ = models.STATEFUL[name]()
    before = copy.deepcopy(model)
    with pytest.raises(MicrobatchError, match=r"with microbatches=2 the update would run 2 times.*Use microbatches=1"):
        autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(torch.cat([x, x[:2]]),), microbatches=2)
    assert_unchanged(model, before)


def test_a_plan_that_puts_a_write_off_its_buffers_stage_is_refused():
    model, args, _ = models.ema()
    traced = capture(model, args)
    plan = _solve(traced, ["cpu", "cpu"], None, "train", 1, {})
    add = traced.written()["ema"][-1]
    stages = list(plan.stages)  # move the second write to stage 1, its buffer stays on stage 0
    moved = [dataclass_replace(stages[0], nodes=tuple(n for n in stages[0].nodes if n != add)),
             dataclass_replace(stages[1], nodes=(add, *stages[1].nodes))]
    before = copy.deepcopy(model)
    with pytest.raises(autosplit.AutosplitError, match=r"writes ema on stage 1, but ema is stored on stage 0"):
        split_module(model, traced, dataclass_replace(plan, stages=moved), ["cpu", "cpu"])
    assert_unchanged(model, before)


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


class _FoldedCounter(torch.nn.Module):
    """Reads its buffer in an expression fx computes at trace time (``1 + self.n``) and writes it
    in place after the layers."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        h = self.b(self.a(x * (1 + self.n)))
        self.n.add_(h.mean().detach())
        return h


def test_an_expression_fx_folds_on_a_written_buffer_is_captured_by_export_and_kept_on_one_stage():
    model, x = _FoldedCounter(), torch.randn(3, 8)
    before = copy.deepcopy(model)
    with pytest.raises(TraceError, match=r"writes the buffer n in place, and torch.fx computed 1 tensor expression"):
        capture(model, (x,), tracer="fx")
    assert capture(model, (x,)).tracer == "export"
    with pytest.raises(autosplit.ConfigError, match=r"from the first read of n to its last in-place write"):
        autosplit.plan(model, devices=2, example_inputs=(x,))
    assert_unchanged(model, before)
    reference = copy.deepcopy(model)
    split = autosplit.autosplit(model, devices=["cpu"], example_inputs=(x,))
    for _ in range(3):  # the buffer is read at every call, as it changes
        assert_same(split(x), reference(x))
    assert_same(model.n, reference.n)
