"""Buffers written in forward (a counter, an EMA, running statistics): the split makes the same
writes once per call, capture never changes the model, and what cannot be done is refused."""

import copy

import pytest
import torch

import autosplit
import models
from autosplit import MicrobatchError, OpGraph, SolverOptions, TraceError, capture, solve
from autosplit.api import solve_captured
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


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_no_grad_regions_pass_no_gradient_and_reads_follow_the_write(tracer, stages):
    model, (x,), _ = models.no_grad_stats()
    reference = copy.deepcopy(model)
    traced = capture(model, (x,), tracer=tracer)
    region = [n.name for n in traced.graph.nodes if n.meta.get("grad_enabled") is False]
    assert region
    costs = price_graph(traced.graph_module)  # no backward runs through the region: nothing saved for it
    assert all(costs[name].saved_bytes == 0 and costs[name].grad_bytes == 0 for name in region), region
    split = autosplit.autosplit(model, devices=["cpu"] * stages, example_inputs=(x,), tracer=tracer)
    for step in range(2):  # the second call reads the mean the first one wrote
        out, want = split(x + step), reference(x + step)
        assert_same(out, want, name=f"output of call {step}")
        out.square().mean().backward()
        want.square().mean().backward()
        assert_same(split.get_buffer("running_mean"), reference.running_mean, name=f"running_mean after {step}")
        assert not split.get_buffer("running_mean").requires_grad
    assert model.target.weight.grad is None  # the frozen branch: no gradient, as in the model
    for (name, p1), p2 in zip(split.named_parameters(), reference.parameters(), strict=True):
        assert_same(p1.grad, p2.grad, name=f"{name}.grad")


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


class _WeightTable(torch.nn.Module):
    """Refreshes a table derived from a weight in every call (``copy_`` under no_grad): the same
    write however often it runs, so it is kept under microbatches; a write from the batch is not."""

    def __init__(self, from_batch: bool = False):
        super().__init__()
        self.from_batch = from_batch
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.register_buffer("table", torch.zeros(8))

    def forward(self, x):
        h = self.a(x)
        with torch.no_grad():
            self.table.copy_(h.mean(0) if self.from_batch else self.a.weight.sum(0) * 2)
        return self.b(h + self.table)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_write_that_repeats_the_same_value_is_kept_under_microbatches(tracer):
    model = _WeightTable()
    reference = copy.deepcopy(model)
    x = torch.randn(6, 8)
    split = autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,), microbatches=2, tracer=tracer)
    out, want = split(x), reference(x)
    assert_same(out, want)
    out.square().mean().backward()
    want.square().mean().backward()
    assert_same(split.get_buffer("table"), reference.table, name="table")
    for (name, p1), p2 in zip(split.named_parameters(), reference.parameters(), strict=True):
        assert_same(p1.grad, p2.grad, name=f"{name}.grad")
    model = _WeightTable(from_batch=True)
    before = copy.deepcopy(model)
    with pytest.raises(MicrobatchError, match="the model updates table .* would run 2 times per call"):
        autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,), microbatches=2, tracer=tracer)
    assert_unchanged(model, before)


def test_a_plan_that_puts_a_write_off_its_buffers_stage_is_refused():
    model, args, _ = models.ema()
    traced = capture(model, args)
    plan = solve_captured(traced, ["cpu", "cpu"], None, "train", 1, {})
    add = traced.written()["ema"][-1]
    home = next(s.index for s in plan.stages if "ema" in s.weights)
    other = 1 - home  # move the second write to the other stage; its buffer stays where it is
    stages = [dataclass_replace(s, nodes=tuple(n for n in s.nodes if n != add)) for s in plan.stages]
    stages[other] = dataclass_replace(stages[other], nodes=(add, *stages[other].nodes))
    moved = stages
    before = copy.deepcopy(model)
    with pytest.raises(autosplit.AutosplitError, match=rf"writes ema on stage {other}, but ema is stored on stage {home}"):
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
