"""The comparisons the numerics tests share: a split against a ``copy.deepcopy`` of the model.

    reference = copy.deepcopy(model)
    split = autosplit.autosplit(model, devices=["cpu"] * 2, example_inputs=args)
    assert_trains_like(split, reference, args, kwargs)

``assert_trains_like`` checks what a training step sees: the outputs (their structure too), every
gradient (one missing on either side included), every buffer after the call, and the update one
optimizer step makes. ``assert_unchanged`` checks that a refused split left the model as it was.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection

import torch
import torch.utils._pytree as pytree
from torch import nn

from numerics import assert_same


def leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of an output in order: containers, model-output classes and dataclasses opened."""
    if dataclasses.is_dataclass(out) and type(out) not in pytree.SUPPORTED_NODES:
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _shape_of(out: Any) -> Any:
    """The output's structure with every tensor replaced by a marker: Nones and other values stay."""
    if dataclasses.is_dataclass(out) and type(out) not in pytree.SUPPORTED_NODES:
        return type(out), [_shape_of(getattr(out, f.name)) for f in dataclasses.fields(out)]
    return pytree.tree_map(lambda x: "tensor" if isinstance(x, torch.Tensor) else x, out)


def _loss(out: Any) -> torch.Tensor:
    """A loss that reaches every floating-point output."""
    return sum(t.float().square().mean() for t in leaves(out) if t.is_floating_point())


def assert_outputs_same(out: Any, want: Any, when: str = "") -> None:
    """Same output type and structure (Nones where the model has them), every tensor within
    tolerance of the model's."""
    assert type(out) is type(want), f"{type(out).__name__} != {type(want).__name__}{when}"
    assert _shape_of(out) == _shape_of(want), f"output structure {_shape_of(out)} != {_shape_of(want)}{when}"
    for i, (got, expected) in enumerate(zip(leaves(out), leaves(want), strict=True)):
        assert_same(got, expected, name=f"output {i}{when}")


VANISHING_RTOL = 1e-6
"""A gradient that is zero in exact arithmetic holds only roundoff: at most this fraction of the
model's largest gradient entry, on either side."""


def assert_buffers_same(split: nn.Module, reference: nn.Module, when: str = "") -> None:
    for (n1, b1), (n2, b2) in zip(split.named_buffers(), reference.named_buffers(), strict=True):
        assert n1 == n2
        assert_same(b1, b2, name=f"{n1}{when}")  # statistics, counters and averages moved alike


def assert_grads_same(split: nn.Module, reference: nn.Module, vanishing: Collection[str] = ()) -> None:
    """Every gradient of ``split`` equals ``reference``'s (a missing one must be missing on both).
    Parameters whose name ends with one of ``vanishing`` have a gradient that is zero in exact
    arithmetic (a key projection's bias: softmax ignores what it adds to each query's scores), so
    the computed one is roundoff and has no value to compare: both must be roundoff-sized."""
    scale = max(p.grad.abs().max().item() for p in reference.parameters() if p.grad is not None)
    for (n1, p1), (n2, p2) in zip(split.named_parameters(), reference.named_parameters(), strict=True):
        assert n1 == n2
        if n1.endswith(tuple(vanishing)):
            for side, grad in (("split", p1.grad), ("model", p2.grad)):
                size = grad.abs().max().item()
                assert size <= VANISHING_RTOL * scale, f"{n1}.grad of the {side}: {size:.3g} is not roundoff " \
                                                       f"of the largest gradient entry, {scale:.3g}"
        else:
            assert_same(p1.grad, p2.grad, name=f"{n1}.grad")


def assert_trains_like(split: nn.Module, reference: nn.Module, args: tuple, kwargs: dict, *,
                       reference_kwargs: dict | None = None, optimizer=torch.optim.AdamW,
                       vanishing: Collection[str] = ()) -> None:
    """Outputs, gradients, buffers and one optimizer step of ``split`` equal ``reference``'s, each
    tensor relative to its own scale. ``reference_kwargs`` (default ``kwargs``) is what the
    reference is called with, e.g. with ``use_cache=False`` where the split was captured so;
    ``vanishing``: see :func:`assert_grads_same`."""
    ref_kwargs = kwargs if reference_kwargs is None else reference_kwargs
    assert list(split.state_dict()) == list(reference.state_dict())
    out, want = split(*args, **kwargs), reference(*args, **ref_kwargs)
    assert_outputs_same(out, want)
    _loss(out).backward()
    _loss(want).backward()
    assert_grads_same(split, reference, vanishing)
    assert_buffers_same(split, reference)

    # One step on equal gradients (the reference's; the split's were compared above): it must move
    # each parameter alike, and the outputs computed with the moved weights must agree. The step is
    # compared, not the weights after it: a step of ~lr on a weight of ~1 is lost at 1e-5 of the weight.
    # Not the split's own gradients: AdamW divides each entry by |g| + 1e-8, so float32 roundoff in an
    # entry near 1e-8 (Llama's 4.667e-10 against 4.676e-10) moves that entry's step by 1e-4 of lr; and
    # with SGD a step of 1e-6 on a weight of 1e-2 is measured only to float32's spacing there, 1e-9.
    # A gradient the model never makes (a weight its Function withholds it from) stays missing.
    for p1, p2 in zip(split.parameters(), reference.parameters(), strict=True):
        p1.grad = None if p2.grad is None else p2.grad.to(p1.device, copy=True)
    before = [p.detach().clone() for p in split.parameters()]
    ref_before = [p.detach().clone() for p in reference.parameters()]
    opt, ref_opt = optimizer(split.parameters(), lr=1e-2), optimizer(reference.parameters(), lr=1e-2)
    opt.step()
    ref_opt.step()
    for (n1, p1), p2, b1, b2 in zip(split.named_parameters(), reference.parameters(), before, ref_before,
                                    strict=True):
        assert_same(p1.detach() - b1, p2.detach() - b2, name=f"{n1} update")
    with torch.no_grad():
        out, want = split(*args, **kwargs), reference(*args, **ref_kwargs)
    assert_outputs_same(out, want, " after the step")
    assert_buffers_same(split, reference, " after the step")


def state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def assert_unchanged(model: nn.Module, before: nn.Module) -> None:
    """Every parameter and buffer bit-identical to ``before`` (a deepcopy), on the same device."""
    for (name, got), (_, want) in zip(state(model), state(before), strict=True):
        assert got.device == want.device, f"{name} moved to {got.device}"
        assert torch.equal(got, want), f"{name} changed"


def train_alongside(pipe, reference, batches, loss_fn, steps, *, whole=lambda t: t, label="", eps=1e-8):
    """Train a rank of a distributed pipeline and the model in one process (a deepcopy) side by
    side, with AdamW on the same batches (``batches(step)`` gives args, kwargs and target): each
    step's loss equals the model's on the last rank and is None elsewhere, every gradient of the
    first step and every weight after ``steps`` steps equal the model's (``whole`` turns a
    sharded tensor into the whole one). Returns the rank's weights after the steps, whole, by name.

    ``eps``: AdamW's. Adam divides each gradient by its own size, so a gradient that is zero in
    exact arithmetic (an attention key's bias: softmax ignores it) and rounding noise in practice
    moves its weight by the full learning rate in a direction the rounding chose; a split that
    sums in another order (tensor parallelism) then moves it the other way. An ``eps`` above that
    noise keeps such weights still in both, and changes nothing else measurably."""
    wanted = dict(reference.named_parameters())
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2, eps=eps)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, eps=eps)
    for step in range(steps):
        args, kwargs, target = batches(step)
        loss = pipe.step(*args, target=target, **kwargs)
        ref_loss = loss_fn(reference(*args, **kwargs), target)
        ref_loss.backward()
        if pipe.is_last:
            assert_same(loss, ref_loss.detach(), name=f"{label} loss, step {step}")
        else:
            assert loss is None
        if step == 0:
            for name, p in pipe.named_parameters():
                assert_same(whole(p.grad), wanted[name].grad, name=f"{label} {name}.grad")
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
    weights = {name: whole(p.detach()) for name, p in pipe.named_parameters()}
    for name, value in weights.items():
        assert_same(value, wanted[name].detach(), name=f"{label} {name} after {steps} steps")
    return weights
