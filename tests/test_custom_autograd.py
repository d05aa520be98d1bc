"""Custom autograd Functions and checkpointed regions: a split runs the user's own code for them.

A tracer that follows ``Function.apply`` into its forward differentiates that forward instead
of calling the Function's backward (a straight-through estimator loses its gradient); one that
follows ``torch.utils.checkpoint`` into its function drops the recomputation (activations are
kept). Capture keeps both as single nodes with fx and refuses them with torch.export.
"""

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import autosplit
import models
from autosplit import OpaqueCallError, capture
from checks import assert_trains_like
from cost_models.ops import price_graph
from numerics import assert_same


def assert_trains_alike(name: str, microbatches: int) -> tuple[torch.nn.Module, autosplit.SplitModule]:
    """Split the model over two CPU devices and compare with a copy: outputs, every gradient (a
    missing one included), buffers, and one SGD step."""
    model, args, kwargs = getattr(models, name)()
    reference = copy.deepcopy(model)
    split = autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=args, microbatches=microbatches)
    assert len(split.plan.stages) == 2
    assert_trains_like(split, reference, args, kwargs, optimizer=torch.optim.SGD)
    return reference, split


@pytest.mark.parametrize("microbatches", [1, 2])
def test_a_straight_through_estimator_keeps_its_gradient(microbatches):
    reference, _ = assert_trains_alike("quantized", microbatches)
    # round's own derivative is zero: a split that differentiated the forward would give zeros here
    assert reference.inp.weight.grad.abs().max() > 0


@pytest.mark.parametrize("microbatches", [1, 2])
def test_a_weight_gradient_the_function_withholds_stays_missing(microbatches):
    reference, split = assert_trains_alike("frozen_projection", microbatches)  # the split's is missing too
    assert reference.proj.grad is None
    assert split.inp.weight.grad is not None


def saved_activation_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward, weights left out (their storage is the model's)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(kept.values())


@pytest.mark.parametrize("microbatches", [1, 2])
def test_a_checkpointed_block_is_recomputed_in_backward_on_its_stage(microbatches):
    reference, split = assert_trains_alike("checkpointed", microbatches)
    x = torch.randn(4, 8)
    calls = {"reference": 0, "split": 0}
    for key, module in (("reference", reference), ("split", split)):
        module.block[0].register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
        module(x).sum().backward()
    assert calls["reference"] == 2 * 1 and calls["split"] == 2 * microbatches  # forward, then again in backward
    assert saved_activation_bytes(split, x) == saved_activation_bytes(reference, x)


def test_a_function_call_is_one_node_with_shapes_and_a_price():
    model, args, _ = models.quantized()
    traced = capture(model, args, tracer="fx")
    calls = [info for info in traced.nodes.values() if "RoundSTE" in info.target]
    assert [info.target for info in calls] == ["models.RoundSTE.apply"] * 2
    assert [info.shapes for info in calls] == [((4, 16),), ((4, 16),)]
    assert not any("round" in info.target for info in traced.nodes.values() if info not in calls)
    costs = price_graph(traced.graph_module)
    # priced on meta by running the Function: forward rounds, backward passes the gradient on
    # untouched (round's own derivative would write a tensor of zeros)
    assert all(not costs[i.name].unpriced and costs[i.name].fwd_bytes > 0 and costs[i.name].bwd_bytes == 0
               for i in calls)
    assert_same(traced.graph_module(*args), model(*args))
    model, args, _ = models.frozen_projection()
    traced = capture(model, args, tracer="fx")
    (call,) = [n for n, info in traced.nodes.items() if info.target == "models.FrozenWeightMatmul.apply"]
    cost = price_graph(traced.graph_module)[call]
    assert cost.fwd_flops == cost.bwd_flops == 2 * 4 * 8 * 8  # its backward makes the input's gradient only


def test_a_checkpointed_region_keeps_only_its_inputs_and_prices_the_recompute():
    model, args, _ = models.checkpointed()
    traced = capture(model, args, tracer="fx")
    (region,) = [n for n, info in traced.nodes.items() if info.module_path == "block"]
    assert traced.nodes[region].op == "call_module" and traced.nodes[region].shapes == ((4, 8),)
    model.checkpoint = False
    unrolled = capture(model, args, tracer="fx")
    cost, plain = price_graph(traced.graph_module)[region], price_graph(unrolled.graph_module)
    (source,) = traced.graph.find_nodes(op="call_function", target=torch.tanh)
    assert dict(cost.saved) == {source.name: 4 * 8 * 4}  # its input: not the 4x32 activations inside
    inside = [plain[n] for n, info in unrolled.nodes.items() if info.module_path.startswith("block.")]
    assert len(inside) == 3 and sum(c.saved_bytes for c in inside) >= 2 * 4 * 32 * 4  # kept without checkpoint
    block = type(cost)(fwd_flops=sum(c.fwd_flops for c in inside), bwd_flops=sum(c.bwd_flops for c in inside))
    # backward runs the forward again up to the last tensor backward needs (the GELU output;
    # torch stops the recomputation there), then the backward of the block itself
    first_linear = 2 * 4 * 8 * 32
    assert cost.fwd_flops == block.fwd_flops
    assert cost.bwd_flops == block.bwd_flops + first_linear
    # the recomputed hidden activations live there: with what it keeps (the input's and the
    # weights' gradients), its backward's peak holds them
    assert cost.bwd_workspace_bytes + cost.weight_grad_bytes + 4 * 8 * 4 >= 2 * 4 * 32 * 4


def test_export_refuses_what_it_would_inline_and_leaves_the_model_alone():
    apply = torch.autograd.Function.__dict__["apply"]
    for name, culprit in (("quantized", "models.RoundSTE"), ("checkpointed", "torch.utils.checkpoint")):
        model, args, _ = getattr(models, name)()
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(OpaqueCallError, match=f"(?s){culprit}.*tracer='fx'"):
            capture(model, args, tracer="export")
        assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    capture(models.checkpointed()[0], args, tracer="fx")  # patched while fx traces, restored after
    assert torch.autograd.Function.__dict__["apply"] is apply and torch.utils.checkpoint.checkpoint is checkpoint


def test_hugging_face_gradient_checkpointing_is_refused_not_dropped():
    # its layers checkpoint only where gradients are on; export captures without them
    model, args, kwargs = models.gpt2()
    model.activation_checkpointing_enable()
    with pytest.raises(OpaqueCallError, match="gradient checkpointing is on in transformer.*checkpointing_disable"):
        autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=args, example_kwargs=kwargs)
    assert all(p.device.type == "cpu" for p in model.parameters()) and model.transformer.gradient_checkpointing


class _ImportedCheckpoint(torch.nn.Module):
    """Calls ``checkpoint`` by the name this file imports, on a submodule's bound ``forward``."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.blk = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
        self.reentrant = reentrant

    def forward(self, x):
        return self.b(checkpoint(self.blk.forward, self.a(x), use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_imported_by_name_and_reentrant_checkpoint_are_kept(reentrant):
    torch.manual_seed(0)
    model, x = _ImportedCheckpoint(reentrant), torch.randn(4, 8)
    reference = copy.deepcopy(model)
    split = autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,))
    assert [n.target for n in split.graph_module.graph.nodes if n.op == "call_module"] == ["a", "blk", "b"]
    split(x).square().sum().backward()
    reference(x).square().sum().backward()
    for (key, p), q in zip(split.named_parameters(), reference.parameters(), strict=True):
        assert_same(p.grad, q.grad, name=key)
    assert checkpoint is torch.utils.checkpoint.checkpoint  # this file's name is given back


class _ClosureCheckpoint(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(lambda h: self.lin(h).relu(), x, use_reentrant=False)


def test_checkpoint_of_code_that_is_not_a_module_is_refused_with_the_fix():
    with pytest.raises(OpaqueCallError, match="(?s)lambda.*not a module of the model.*nn.Module"):
        capture(_ClosureCheckpoint(), (torch.randn(2, 8),))
