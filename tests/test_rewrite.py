"""The split module in one process: outputs, gradients, buffers and an optimizer step equal the
original model's for every registry model, on 2 and 3 stages (CPU devices here)."""

import copy
from collections import Counter

import pytest
import torch
import torch.utils._pytree as pytree

import autosplit
import models
from autosplit import OpGraph, SolverOptions, capture, solve
from autosplit.api import first_microbatch
from autosplit.rewrite import PlanMismatchError, deliver, split_module, transfer
from checks import assert_trains_like
from cost_models import Cluster, price_graph
from numerics import assert_same

HF = {"gpt2", "llama", "mixtral"}


def planned(name, stages, microbatches=1):
    model, args, kwargs = models.REGISTRY[name]()
    if microbatches > 1:  # a batch of two different halves, so each microbatch differs
        args, kwargs = pytree.tree_map(lambda t: torch.cat([t, t.flip(0)]) if isinstance(t, torch.Tensor) else t,
                                       (args, kwargs))
    # HF models are compared in eval mode; rescnn's BatchNorm too when microbatched (batch statistics
    # per microbatch are refused, see test_pipeline)
    model.train(name not in HF and not (name == "rescnn" and microbatches > 1))
    reference = copy.deepcopy(model)
    one_args, one_kwargs = first_microbatch(args, kwargs, microbatches)
    traced = capture(model, one_args, one_kwargs)
    plan = solve(OpGraph.from_traced(traced), Cluster.parse(f"{stages}xh100"), SolverOptions(microbatches=microbatches),
                 costs=price_graph(traced.graph_module), parameters=traced.parameters)
    return model, reference, traced, plan, args, kwargs


def reference_kwargs(name, kwargs):
    """The split of a Hugging Face model is captured with use_cache=False: call the model so."""
    return {**kwargs, "use_cache": False} if name in HF else kwargs


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_split_model_trains_exactly_like_the_original(name, stages):
    model, reference, traced, plan, args, kwargs = planned(name, stages)
    split = split_module(model, traced, plan, ["cpu"] * stages)
    assert sum(1 for n in split.graph_module.graph.nodes if n.target is transfer) >= stages - 1
    assert_trains_like(split, reference, args, kwargs, reference_kwargs=reference_kwargs(name, kwargs))


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_microbatched_split_trains_exactly_like_the_original(name, stages):
    model, reference, traced, plan, args, kwargs = planned(name, stages, microbatches=2)
    split = split_module(model, traced, plan, ["cpu"] * stages, microbatches=2)
    assert len(split.graph_module.pipeline.stages) == stages
    # SGD: Adam divides by the gradient's own size, so the 1e-11 roundoff of microbatch-sized matmuls in
    # Mixtral's 1e-10-sized expert gradients would show up as whole steps of difference
    assert_trains_like(split, reference, args, kwargs, reference_kwargs=reference_kwargs(name, kwargs),
                       optimizer=torch.optim.SGD)


def test_values_the_plan_rebuilds_are_computed_on_each_stage_not_sent():
    model, args, kwargs = models.masked()
    reference = copy.deepcopy(model)
    traced = capture(model, args, kwargs)
    # Across hosts the gate costs less to rebuild than to send: the plan lists it on both stages.
    plan = solve(OpGraph.from_traced(traced), Cluster.parse("3x1xh100"), SolverOptions(),
                 costs=price_graph(traced.graph_module), parameters=traced.parameters)
    listed = Counter(n for stage in plan.stages for n in stage.nodes)
    rebuilt = {n for n, count in listed.items() if count > 1}
    assert "to" in rebuilt
    split = split_module(model, traced, plan, ["cpu"] * 3)
    graph = split.graph_module.graph
    assert not {n.args[0].name for n in graph.nodes if n.target is transfer} & rebuilt
    computing = lambda g: sum(n.op in ("call_function", "call_method") and n.target not in (transfer, deliver)  # noqa: E731
                              for n in g.nodes)
    assert computing(graph) - computing(traced.graph_module.graph) == sum(listed[n] - 1 for n in rebuilt)
    assert_trains_like(split, reference, args, kwargs)


def test_eval_mode_and_no_grad_reach_the_stages():
    model, reference, traced, plan, args, _ = planned("rescnn", 2)
    split = split_module(model, traced, plan, ["cpu", "cpu"])
    split.eval()
    reference.eval()
    assert all(not m.training for m in split.graph_module.modules())
    with torch.no_grad():
        assert_same(split(*args), reference(*args))


def test_a_plan_for_another_model_or_device_count_is_refused():
    model, _, traced, plan, _, _ = planned("mlp", 2)
    with pytest.raises(ValueError, match="the plan has 2 stages but 3 devices"):
        split_module(model, traced, plan, ["cpu"] * 3)
    other, args, _ = models.REGISTRY["tied_lm"]()
    other_traced = capture(other, args)
    with pytest.raises(PlanMismatchError, match="made for another graph.*Plan again"):
        split_module(other, other_traced, plan, ["cpu", "cpu"])
    wider, args, _ = models.MLP(d_out=9), models.mlp()[1], None  # same node names, the last layer differs
    with pytest.raises(PlanMismatchError, match=r"node 'layers_6' \(.* in layers.6, output shapes \(4, 9\)\) "
                                                "differs from the planned node"):
        split_module(wider, capture(wider, args), plan, ["cpu", "cpu"])


def test_checkpoints_load_either_way():
    model, reference, traced, plan, args, _ = planned("tied_lm", 3)
    split = split_module(model, traced, plan, ["cpu"] * 3)
    fresh = models.REGISTRY["tied_lm"]()[0]
    fresh.load_state_dict(split.state_dict())  # a split model's checkpoint loads into the original
    assert_same(fresh(*args)["logits"], split(*args)["logits"])
    torch.manual_seed(7)
    other = models.TiedLM()
    split.load_state_dict(other.state_dict())  # and the original's into the split model
    assert_same(split(*args)["logits"], other(*args)["logits"])
    assert split.head.weight is split.embed.weight  # still tied


class _AliasedRoot(torch.nn.Module):
    """Names at its root that a deduplicating walk loses: a parameter and a module under two names
    each (pipelining's ModelWithParamAlias), and a buffer left out of the state_dict."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.w1 = self.w0 = torch.nn.Parameter(torch.randn(d, d))
        self.out = self.inp = torch.nn.Linear(d, d)
        self.mid = torch.nn.Linear(d, d)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, d), persistent=False)

    def forward(self, x):
        h = torch.relu(self.inp(x @ self.w0)) * self.scale
        return self.out(torch.tanh(self.mid(h)) @ self.w1)


def test_aliased_names_and_unsaved_buffers_at_the_root_keep_the_models_state_dict_keys():
    torch.manual_seed(0)
    model, x = _AliasedRoot(), torch.randn(4, 6)
    reference = copy.deepcopy(model)
    split = autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,))
    assert list(split.state_dict()) == list(reference.state_dict())  # w0, inp.* saved; scale not
    assert split.w0 is split.w1 and split.inp is split.out and split.scale is model.scale
    reference.load_state_dict(split.state_dict())  # strict: no key missing, none unexpected
    split.load_state_dict(reference.state_dict())
    assert_trains_like(split, reference, (x,), {})


def test_moving_the_split_to_one_device_is_refused_and_dtype_casts_work():
    model, reference, traced, plan, args, _ = planned("mlp", 2)
    split = split_module(model, traced, plan, ["cpu", "cpu"])
    for move in (lambda: split.to("cpu"), lambda: split.cuda(), lambda: split.cpu(),
                 lambda: split.to(torch.device("cpu"), torch.float64)):
        with pytest.raises(RuntimeError, match="undo the split.*Cast dtypes with .to\\(dtype\\)"):
            move()
    assert split.to(torch.float64) is split
    assert_same(split(args[0].double()), reference.double()(args[0].double()))


def test_a_failed_move_leaves_every_parameter_where_it_was(monkeypatch):
    model, reference, traced, plan, args, _ = planned("mlp", 2)
    before = {name: (p, p.data_ptr()) for name, p in model.named_parameters()}
    real_to, calls = torch.Tensor.to, []

    def to_then_fail(self, *a, **k):  # the third tensor does not fit on its device
        calls.append(a)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory")
        return real_to(self, *a, **k).clone()

    monkeypatch.setattr(torch.Tensor, "to", to_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        split_module(model, traced, plan, ["cpu", "cpu:0"])  # "cpu:0" is another device to the split
    monkeypatch.undo()
    assert len(calls) == 3  # two tensors had moved when the third failed
    for name, p in model.named_parameters():
        assert p is before[name][0] and p.data_ptr() == before[name][1], f"{name} was left moved"
    assert_same(model(*args), reference(*args))


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("name", ["tied_lm", "shared_block", "masked", "gpt2"])
def test_the_runtime_makes_the_transfers_the_plan_counts(name, microbatches, monkeypatch):
    model, reference, traced, plan, args, kwargs = planned(name, 3, microbatches)
    split = split_module(model, traced, plan, ["cpu"] * 3, microbatches=microbatches)
    real_to, moves = torch.Tensor.to, []

    def counting(self, *a, **k):
        if a and isinstance(a[0], torch.device):
            moves.append(tuple(self.shape))
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", counting)
    split(*args, **kwargs)
    monkeypatch.undo()
    assert len(moves) == sum(stage.transfers_in for stage in plan.stages) > 0
    assert [s.transfers_in for s in plan.stages][0] == 0


def test_a_weight_read_on_two_stages_is_stored_once_and_sent_once_per_call():
    model, reference, traced, plan, args, kwargs = planned("tied_lm", 3, microbatches=2)
    homes = {name: stage.index for stage in plan.stages for name in stage.weights}
    assert sorted(homes) == sorted([*traced.parameters, *traced.buffers])  # every tensor stored exactly once
    head_stage = plan.stage_of()[next(n for n, i in traced.nodes.items() if i.module_path == "head")]
    assert homes["embed.weight"] == 0 < head_stage  # the tied head reads the embedding's weight elsewhere
    split = split_module(model, traced, plan, ["cpu"] * 3, microbatches=2)
    pipeline = split.graph_module.pipeline
    assert pipeline.prologue is not None and len(pipeline.shared) == 1  # sent once per call, not per microbatch
    assert_trains_like(split, reference, args, kwargs, optimizer=torch.optim.SGD)


def test_the_placement_audit_catches_a_stage_reading_a_tensor_off_its_device():
    """The audit runs on every split (it would fail the build); here it is shown to catch what a
    GPU would reject: bypass any one move of a tied-weight split, and a stage reads another's tensor."""
    from autosplit.rewrite import _model_state, audit_placement

    model, _, traced, plan, _, _ = planned("tied_lm", 3)
    split = split_module(model, traced, plan, ["cpu"] * 3)
    gm = split.graph_module
    homes = {name: stage.index for stage in plan.stages for name in stage.weights}
    home_of = {id(t): homes[name] for name, t in _model_state(traced.graph_module, traced)}
    assert audit_placement(gm.graph, gm, home_of) == []
    moves = [n for n in gm.graph.nodes if n.target is transfer]
    assert any(n.args[0].op == "get_attr" for n in moves)  # the tied weight's move is among them
    for move in moves:
        graph = copy.deepcopy(gm.graph)
        twin = next(n for n in graph.nodes if n.name == move.name)
        readers = [r.name for r in twin.users]
        twin.replace_all_uses_with(twin.args[0])
        problems = audit_placement(graph, gm, home_of)
        assert any(f"{r} on stage" in p for r in readers for p in problems), (move.name, problems)
