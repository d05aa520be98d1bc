"""Ops whose behaviour depends on train/eval mode, made to follow the mode at call time.

A captured graph fixes what ``self.training`` was at capture: export records
``aten.dropout(x, 0.1, True)``, ``aten.batch_norm(..., True, ...)`` plus the increment of
``num_batches_tracked``, and attention dropout as a number; ``symbolic_trace`` fixes the
``training=`` argument of functional dropout and batch norm. The rewriter replaces each such op
by an :class:`InMode` module that reads ``training`` from the op's owning module whenever it
runs, so ``split.eval()`` turns dropout off and makes batch norm use its running statistics,
exactly as in the model. A flag is taken for ``self.training`` only where a capture in the other
mode shows it change (:func:`written_flags`): ``F.dropout(x, 0.1)``, whose ``training`` defaults
to True, drops in eval mode too, in the model and in the split. Capture in training mode: a graph
captured in eval mode has no attention dropout rate left to turn on (Python branches on
``self.training`` stay as captured, whichever the mode).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

# op -> (position of the flag in args, its keyword name)
_DROPOUT_FLAG = {
    aten.dropout.default: (2, "train"),
    aten.feature_dropout.default: (2, "train"),
    aten.alpha_dropout.default: (2, "train"),
    aten.feature_alpha_dropout.default: (2, "train"),
    aten.native_dropout.default: (2, "train"),
    F.dropout: (2, "training"),
    F.dropout1d: (2, "training"),
    F.dropout2d: (2, "training"),
    F.dropout3d: (2, "training"),
    F.alpha_dropout: (2, "training"),
    F.feature_alpha_dropout: (2, "training"),
}
_ATTENTION = {aten.scaled_dot_product_attention.default: (4, "dropout_p"),
              F.scaled_dot_product_attention: (4, "dropout_p")}
_BATCH_NORM = {aten.batch_norm.default: (5, "training", 3, "running_mean"),
               F.batch_norm: (5, "training", 1, "running_mean")}


class InMode(nn.Module):
    """Calls ``op`` with the argument at (``index``, ``keyword``) replaced by ``choose(training,
    captured)``, where ``training`` is the owning module's mode at this call."""

    def __init__(self, op: Callable[..., Any], owner: nn.Module, index: int, keyword: str,
                 choose: Callable[[bool, Any], Any]):
        super().__init__()
        self.op, self.index, self.keyword, self.choose = op, index, keyword, choose
        self.__dict__["owner"] = owner  # not a child: its weights belong to the model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.keyword in kwargs:
            kwargs = {**kwargs, self.keyword: self.choose(self.owner.training, kwargs[self.keyword])}
        elif len(args) > self.index:
            args = (*args[: self.index], self.choose(self.owner.training, args[self.index]), *args[self.index + 1:])
        else:
            kwargs = {**kwargs, self.keyword: self.choose(self.owner.training, _default(self.op, self.keyword))}
        return self.op(*args, **kwargs)


def _default(op: Callable[..., Any], keyword: str) -> Any:
    if isinstance(op, torch._ops.OpOverload):
        return next(a.default_value for a in op._schema.arguments if a.name == keyword)
    return inspect.signature(op).parameters[keyword].default


def _follow(training: bool, captured: Any) -> bool:
    return training


def _rate_when_training(training: bool, captured: Any) -> Any:
    return captured if training else 0.0


def _count_when_training(training: bool, captured: Any) -> Any:
    return captured if training else 0


def in_mode(node: fx.Node, owner: nn.Module, captured_training: bool) -> InMode | None:
    """The :class:`InMode` that replaces ``node``, or None when its behaviour does not depend on
    the mode. A flag is taken for ``self.training`` only when it was passed and equals the mode
    of the capture: a flag left to its default, or one that disagrees with the capture
    (``F.dropout(x, 0.1, training=True)`` in eval mode), was written that way and stays."""
    if node.op != "call_function":
        return None
    target = node.target

    def given(index: int, keyword: str) -> Any:
        value = node.kwargs[keyword] if keyword in node.kwargs else (
            node.args[index] if len(node.args) > index else _NOT_GIVEN)
        return _NOT_GIVEN if isinstance(value, fx.Node) else value

    if target in _DROPOUT_FLAG:
        index, keyword = _DROPOUT_FLAG[target]
        if given(index, keyword) is captured_training:
            return InMode(target, owner, index, keyword, _follow)
    elif target in _ATTENTION:
        index, keyword = _ATTENTION[target]
        rate = given(index, keyword)
        if captured_training and rate is not _NOT_GIVEN and rate:
            return InMode(target, owner, index, keyword, _rate_when_training)
    elif target in _BATCH_NORM:
        index, keyword, stats_index, stats_keyword = _BATCH_NORM[target]
        stats = node.kwargs.get(stats_keyword, node.args[stats_index] if len(node.args) > stats_index else None)
        if given(index, keyword) is captured_training and stats is not None:  # no running stats: batch stats always
            return InMode(target, owner, index, keyword, _follow)
    elif captured_training and target in (aten.add_.Tensor, aten.add_.Scalar) and _counts_batches(node, owner):
        return InMode(target, owner, 1, "other", _count_when_training)
    return None


_NOT_GIVEN = object()


def written_flags(traced: Any, other: Any) -> frozenset[str]:
    """Nodes whose mode flag is the same in captures of the two modes (``traced`` and ``other``,
    of the same model and inputs): those flags were written into the code, not taken from
    ``self.training``, so they must stay. Export writes ``F.dropout(x, 0.1)`` (training defaults to
    True) as ``aten.dropout(x, 0.1, True)`` in both modes."""
    twins = {n.name: n for n in other.graph.nodes}
    written = set()
    for node in traced.graph.nodes:
        flag = _FLAGS.get(node.target) if node.op == "call_function" else None
        twin = twins.get(node.name)
        if flag is None or twin is None or twin.target != node.target:
            continue
        index, keyword = flag
        value = lambda n: n.kwargs.get(keyword, n.args[index] if len(n.args) > index else _NOT_GIVEN)  # noqa: E731
        if value(node) == value(twin):
            written.add(node.name)
    return frozenset(written)


_FLAGS = {**_DROPOUT_FLAG, **_ATTENTION, **{op: spec[:2] for op, spec in _BATCH_NORM.items()}}


def _counts_batches(node: fx.Node, owner: nn.Module) -> bool:
    """A batch norm adding to one of its own buffers in place: the batch count that export
    records in training mode (``num_batches_tracked += 1``)."""
    buffer = node.args[0] if node.args else None
    return (isinstance(owner, nn.modules.batchnorm._BatchNorm) and isinstance(buffer, fx.Node)
            and buffer.op == "get_attr")
