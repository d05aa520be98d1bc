"""Calls that capture keeps whole: custom autograd Functions and checkpointed regions.

    with kept_whole(model, tracer):          # around fx's trace; tracer=None around torch.export
        graph = tracer.trace(model)
    install_regions(gm, model, tracer.checkpointed)   # checkpointed modules, made to checkpoint

A tracer that follows ``Function.apply`` records the ops of the Function's forward, and autograd
later differentiates those ops: the user's ``backward`` is lost (a straight-through estimator
gets round's zero gradient; a backward that withholds a weight gradient gets one). A tracer that
follows ``torch.utils.checkpoint.checkpoint`` records the ops of the checkpointed function: the
region is no longer recomputed in backward, so its activations are kept.

With fx both stay opaque. ``Function.apply`` on traced values becomes one ``call_function``
node whose target, a :class:`FunctionCall`, calls ``apply`` again when the graph runs: the user's
forward and backward run on the node's stage. ``checkpoint(module, *args)`` (or a module's
bound ``__call__``, or ``forward`` where no hook tells the two apart) becomes one ``call_module``
node of that module, and in the captured graph module the module's place is taken by a
:class:`CheckpointRegion` that calls it under ``checkpoint`` with the same options; it shares the
module's parameters, buffers and children under the same names, so every pass sees the module's
own weights. Priced on meta, such a node saves what checkpoint saves (its inputs) and its
backward includes the recomputation, as the runtime does. A reentrant checkpoint
(``use_reentrant=True``) runs as written, but its backward cannot be priced (it refuses
``torch.autograd.grad``) and is estimated from the forward, as ``OpCost.unpriced`` says.

torch.export cannot keep either (non-strict export inlines them), so there they are refused
with :class:`~autosplit.errors.OpaqueCallError`, as is checkpoint of code that is not a module
of the model, and a Hugging Face model with gradient checkpointing on (its layers checkpoint
only with gradients enabled; export captures without them). The patches (``Function.apply``,
``torch.utils.checkpoint``, and ``checkpoint`` imported into the model's modules) are undone
when the tracer returns; the model is never changed.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
import torch.utils.checkpoint as checkpoint_module
from torch import nn

from autosplit.errors import OpaqueCallError

CHECKPOINT_OPTIONS = ("use_reentrant", "context_fn", "determinism_check", "debug", "early_stop",
                      "preserve_rng_state")
"""Keyword arguments that ``torch.utils.checkpoint.checkpoint`` takes for itself (the rest go
to the checkpointed function)."""


class FunctionCall:
    """The target of the node that stands for one ``Function.apply``: calls it again.

    Named after the Function (``RoundSTE``), so the node is named ``round_ste`` and its
    annotated target is ``models.RoundSTE.apply``.
    """

    def __init__(self, function: type[torch.autograd.Function]):
        self.function = function
        self.__name__ = function.__name__
        self.__qualname__ = f"{function.__module__}.{function.__qualname__}.apply"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function.apply(*args, **kwargs)

    def __repr__(self) -> str:
        return self.__qualname__


class CheckpointRegion(nn.Module):
    """A module of the model called under ``torch.utils.checkpoint``: the graph's stand-in for it.

    Its parameters, buffers and children are the module's own (the same dictionaries), so
    names and tensors are unchanged; calling it calls the module through ``checkpoint`` with
    the options of the captured call. The recomputation in backward reads the weights the
    forward read: under ``functional_call`` (a weight sent from another stage, or meta
    weights when pricing) those are not the module's own.
    """

    def __init__(self, module: nn.Module, options: dict[str, Any]):
        super().__init__()
        self.__dict__.update(region=module, options=dict(options),
                             _parameters=module._parameters, _buffers=module._buffers, _modules=module._modules)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = {**dict(self.region.named_parameters(remove_duplicate=False)),
                 **dict(self.region.named_buffers(remove_duplicate=False))}

        def run(*args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(self.region, state, args, kwargs)

        return checkpoint_module.checkpoint(run, *args, **self.options, **kwargs)

    def extra_repr(self) -> str:  # also what tells two regions apart when pricing
        options = ", ".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))
        return f"{self.region!r}, {options}"


def _traced(tree: Any) -> fx.Proxy | None:
    return next((x for x in pytree.tree_leaves(tree) if isinstance(x, fx.Proxy)), None)


def _function_name(function: Any) -> str:
    return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', repr(function))}"


@contextlib.contextmanager
def kept_whole(model: nn.Module, tracer: fx.Tracer | None) -> Iterator[None]:
    """While a tracer runs: with fx (``tracer``), keep Function calls and checkpointed modules
    as single nodes (see the module docstring); with torch.export (None), refuse them."""
    apply = torch.autograd.Function.__dict__["apply"]
    without_reentrant = checkpoint_module._checkpoint_without_reentrant_generator
    original = checkpoint_module.checkpoint
    refuse = tracer is None
    if refuse:
        _refuse_switched_checkpointing(model)

    def kept_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        proxy = _traced((args, kwargs))
        if issubclass(cls, checkpoint_module.CheckpointFunction) and (refuse or proxy is not None):
            _refuse_checkpoint(args[0] if args else None, refuse)
        if refuse and not cls.__module__.startswith("torch._library."):
            # torch.library custom ops with register_autograd call a generated Function here;
            # export keeps such an op as one node with its registered backward.
            raise OpaqueCallError(
                f"{_function_name(cls)} is a custom torch.autograd.Function, and torch.export traces its forward "
                "and would differentiate that instead of calling its backward. Capture with tracer='fx', which keeps "
                "each Function call as one node running your forward and backward (mark any module fx cannot trace "
                "a leaf: leaf_modules=[...]), or express it with torch.library.custom_op and register_autograd")
        if proxy is None:
            return apply.__func__(cls, *args, **kwargs)
        return proxy.tracer.create_proxy("call_function", FunctionCall(cls), args, kwargs)

    def kept_checkpoint(function: Any, *args: Any, **kwargs: Any) -> Any:
        if refuse or _traced((args, kwargs)) is None:
            return original(function, *args, **kwargs)
        module = _checkpointed_module(function, tracer)
        options = {k: kwargs.pop(k) for k in CHECKPOINT_OPTIONS if k in kwargs}
        path = tracer.path_of_module(module)
        tracer.checkpointed.setdefault(path, options)
        if tracer.checkpointed[path] != options:
            raise OpaqueCallError(f"module '{path}' is checkpointed at two call sites with different options "
                                  f"({tracer.checkpointed[path]} and {options}): call it the same way at both")
        tracer.leaf_now.add(path)
        try:
            out = module(*args, **kwargs)  # fx records one call_module node: the module is a leaf now
        finally:
            tracer.leaf_now.discard(path)
        out.node.meta["checkpoint"] = True
        return out

    def refused_generator(function: Any, *args: Any, **kwargs: Any) -> Any:
        if refuse or _traced((args, kwargs)) is not None:
            _refuse_checkpoint(function, refuse)
        return without_reentrant(function, *args, **kwargs)

    patched_globals = []
    if not refuse:
        for module in model.modules():  # `from torch.utils.checkpoint import checkpoint` in the model's files
            names = getattr(type(module).forward, "__globals__", {})
            if names.get("checkpoint") is original and all(names is not g for g in patched_globals):
                patched_globals.append(names)
    torch.autograd.Function.apply = classmethod(kept_apply)
    checkpoint_module._checkpoint_without_reentrant_generator = refused_generator
    checkpoint_module.checkpoint = kept_checkpoint
    for names in patched_globals:
        names["checkpoint"] = kept_checkpoint
    try:
        yield
    finally:
        torch.autograd.Function.apply = apply
        checkpoint_module._checkpoint_without_reentrant_generator = without_reentrant
        checkpoint_module.checkpoint = original
        for names in patched_globals:
            names["checkpoint"] = original


def _checkpointed_module(function: Any, tracer: fx.Tracer) -> nn.Module:
    """The module of the model that ``checkpoint(function, ...)`` calls, or a refusal. A bound
    ``forward`` counts as the module where no hook tells calling it from calling ``forward``."""
    module = None
    if isinstance(function, nn.Module):
        module = function
    elif inspect.ismethod(function) and isinstance(function.__self__, nn.Module):
        owner = function.__self__
        hooked = owner._forward_hooks or owner._forward_pre_hooks
        if function.__name__ in ("__call__", "_wrapped_call_impl") or (function.__name__ == "forward" and not hooked):
            module = owner
    paths = {id(m): path for path, m in tracer.root.named_modules()}
    if module is None or not paths.get(id(module)):
        _refuse_checkpoint(function, False)
    return module


def _refuse_switched_checkpointing(model: nn.Module) -> None:
    """Refuse a model that checkpoints only with gradients on: export runs without them.

    Hugging Face layers with ``gradient_checkpointing = True`` call checkpoint only in
    training and where ``torch.is_grad_enabled()``; torch.export captures under ``no_grad``,
    so the region would be missing from the graph without any call to see.
    """
    switched = next((path for path, m in model.named_modules()
                     if m.training and getattr(m, "gradient_checkpointing", False) is True), None)
    if switched is not None:
        raise OpaqueCallError(
            f"gradient checkpointing is on in {switched or type(model).__name__} (gradient_checkpointing=True), and "
            "torch.export captures the model without it: the split would keep the activations instead of "
            "recomputing them in backward. Turn it off before splitting (model.activation_checkpointing_disable(); "
            "gradient_checkpointing_disable() before transformers 5) and let the plan count the activations, or put "
            "the model in eval mode for inference")


def _refuse_checkpoint(function: Any, export: bool) -> None:
    name = getattr(function, "__qualname__", None) or type(function).__name__
    if export:
        raise OpaqueCallError(
            f"the model calls torch.utils.checkpoint.checkpoint (on {name}), and torch.export inlines the "
            "checkpointed code: the split would keep its activations instead of recomputing them in backward. "
            "Capture with tracer='fx' (checkpointed submodules stay checkpointed), or turn checkpointing off "
            "(e.g. model.activation_checkpointing_disable()) and let the plan count the activations")
    raise OpaqueCallError(
        f"torch.utils.checkpoint.checkpoint is called on {name}, which is not a module of the model "
        "(or is reached through an alias autosplit does not see, e.g. functools.partial): capture keeps a "
        "checkpointed region as one call of a submodule. Put the checkpointed code in an nn.Module of the model "
        "and call checkpoint(module, *inputs, use_reentrant=False) directly")


def install_regions(gm: fx.GraphModule, model: nn.Module, checkpointed: dict[str, dict[str, Any]]) -> None:
    """Put a :class:`CheckpointRegion` in ``gm`` in place of each checkpointed module.

    Raises:
        OpaqueCallError: the module is also called without checkpoint as one node, or the
            graph module reaches it through one of the model's own modules (where the
            replacement would change the model).
    """
    own = {id(m) for m in model.modules()}
    for path, options in checkpointed.items():
        plain = [n.name for n in gm.graph.find_nodes(op="call_module", target=path) if not n.meta.get("checkpoint")]
        parent_path, _, name = path.rpartition(".")
        parent = gm.get_submodule(parent_path)
        if plain:
            raise OpaqueCallError(
                f"module '{path}' is called both under torch.utils.checkpoint and without it (node {plain[0]}), "
                "and a split cannot run one module both ways: checkpoint it at every call, or at none")
        if parent is not gm and id(parent) in own:
            raise OpaqueCallError(
                f"module '{path}' is checkpointed, and its parent '{parent_path}' is also called as one node: "
                f"checkpoint '{parent_path}' instead, or do not mark it a leaf")
        setattr(parent, name, CheckpointRegion(getattr(parent, name), options))
