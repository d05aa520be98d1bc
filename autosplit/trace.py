"""Capture a model as a torch.fx graph whose every node knows its shapes, dtype, size and owner.

    traced = capture(model, (autosplit.spec((8, 1024), dtype=torch.long),))
    traced.graph_module(x)            # computes exactly what model(x) computes
    traced.nodes["linear_3"].module_path   # 'transformer.h.0.mlp.c_fc'

Two tracers are tried in turn (``tracer="auto"``): ``torch.fx.symbolic_trace``, which keeps
standard ``torch.nn`` layers as single ``call_module`` nodes, and non-strict ``torch.export``,
which follows Python control flow on shapes (Hugging Face models need it) and yields ATen ops.
Shapes are always found without running real kernels: on ``meta`` tensors for the fx graph, on
export's fake tensors otherwise, so a 70B-parameter model on ``meta`` captures in seconds.

Capture never writes the model's state. fx reads buffers as real tensors, so Python code on them
runs while tracing: the model's buffers are swapped for copies then, and a copy written there
(``self.n += 1``, ``self.ema.mul_(0.9)``) is a write fx leaves out of its graph: ``"auto"`` then
takes export, which records buffer writes as in-place ops on them, and ``"fx"`` is refused. Each
node's ``writes`` names the parameters and buffers it writes in place.

With fx a custom ``torch.autograd.Function`` call and a ``torch.utils.checkpoint`` call of a
submodule stay one node each, running the user's own code (:mod:`autosplit.opaque`); export
would inline them and refuses them instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import linecache
import logging
import operator
import os
import re
import sysconfig
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from autosplit.errors import InputSignatureError, OpaqueCallError, TraceError
from autosplit.opaque import FunctionCall, install_regions, kept_whole

logger = logging.getLogger(__name__)

TRACERS = ("auto", "fx", "export")


@dataclass(frozen=True)
class TensorSpec:
    """An example input given by shape and dtype instead of data (see :func:`spec`)."""

    shape: tuple[int, ...]
    """Size of every dimension, e.g. ``(8, 1024)``."""
    dtype: torch.dtype = torch.float32
    """Element type; token ids are ``torch.long``."""
    dims: tuple[str | None, ...] = ()
    """Names of the dimensions that may vary, e.g. ``("batch", "seq")``; None for a fixed one.
    ``capture(..., dynamic=True)`` keeps named dimensions symbolic (dimensions with the same
    name are the same size)."""

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"spec shape must be non-negative ints, e.g. (8, 1024); got {self.shape!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"spec dtype must be a torch.dtype such as torch.long; got {self.dtype!r}")
        dims = tuple(self.dims or ())
        if dims and (len(dims) != len(shape) or not all(d is None or (isinstance(d, str) and d.isidentifier())
                                                        for d in dims)):
            raise ValueError(f"spec dims must name each of the {len(shape)} dimensions with an identifier or "
                             f"None, e.g. ('batch', 'seq'); got {self.dims!r}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dims", dims)

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _itemsize(self.dtype)

    def materialize(self, device: torch.device) -> torch.Tensor:
        """A tensor of this shape and dtype on ``device`` (zeros: valid token ids and indices)."""
        if device.type == "meta":
            return torch.empty(self.shape, dtype=self.dtype, device=device)
        return torch.zeros(self.shape, dtype=self.dtype, device=device)


def spec(shape: Sequence[int], dtype: torch.dtype = torch.float32, *,
         dims: Sequence[str | None] | None = None) -> TensorSpec:
    """Describe an example input by shape, so no data (and no memory) is needed to plan.

    Example:
        >>> autosplit.capture(model, (autosplit.spec((8, 1024), dtype=torch.long),))
        >>> autosplit.spec((8, 1024), dtype=torch.long, dims=("batch", "seq"))  # may vary
    """
    return TensorSpec(tuple(shape), dtype, tuple(dims or ()))


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and size of a parameter, buffer or input."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    requires_grad: bool = False


@dataclass(frozen=True)
class NodeInfo:
    """What every later pass needs to know of one graph node."""

    name: str
    """The fx node's name, unique in the graph."""
    op: str
    """fx op kind: placeholder, get_attr, call_function, call_method, call_module or output."""
    target: str
    """Readable target: ``aten.linear.default``, ``_operator.add``, ``transformer.h.0.mlp``..."""
    shapes: tuple[tuple[int, ...], ...]
    """Shape of every tensor the node produces, in pytree order (empty for non-tensors)."""
    dtypes: tuple[torch.dtype, ...]
    """Dtype of every tensor the node produces, parallel to ``shapes``."""
    output_bytes: int
    """Bytes of all tensors the node produces."""
    module_path: str
    """Qualified name of the innermost module whose forward made the node ('' is the root)."""
    module_type: str
    """Dotted class name of that module, e.g. ``torch.nn.modules.linear.Linear``."""
    scope: tuple[str, ...] = ()
    """Call sites of the enclosing modules, outermost first; the n-th extra call of a module
    reused at several places is marked ``path@n`` so each call site stays distinct."""
    reads: tuple[str, ...] = ()
    """Canonical names of the parameters and buffers the node reads."""
    writes: tuple[str, ...] = ()
    """Canonical names of the parameters and buffers the node writes in place: directly
    (``n.add_(1)``), through a view, or through the result of an earlier in-place op on them
    (``ema.mul_(0.9).add_(y)``: both ops write ``ema``)."""
    single_tensor: bool = False
    """True when the node's value is exactly one tensor."""

    @property
    def shape(self) -> tuple[int, ...] | None:
        return self.shapes[0] if self.single_tensor else None

    @property
    def dtype(self) -> torch.dtype | None:
        return self.dtypes[0] if self.single_tensor else None


@dataclass
class Traced:
    """A captured model: a runnable graph plus per-node annotations.

    The graph module shares its parameters and buffers with the model it was captured from.
    """

    graph_module: fx.GraphModule
    """Called with the model's inputs, returns what the model returns (same structure)."""
    nodes: dict[str, NodeInfo]
    """Annotations by node name, in graph (topological) order."""
    tracer: str
    """The tracer that produced the graph: ``"fx"`` or ``"export"``."""
    model_type: str
    """Dotted class name of the captured model."""
    parameters: dict[str, TensorInfo]
    """Every parameter under its canonical (first) name, in ``named_parameters`` order."""
    buffers: dict[str, TensorInfo]
    """Every buffer under its canonical name."""
    aliases: dict[str, str]
    """Other names of shared tensors (tied weights): alias -> canonical name."""
    module_types: dict[str, str]
    """Dotted class name of every submodule by qualified name ('' is the model)."""
    example_args: tuple[Any, ...] = ()
    """The positional example inputs, with every tensor replaced by its :class:`TensorSpec`."""
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    """The keyword example inputs, likewise."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the model's weights were at capture (``meta`` for a weightless model)."""
    symbols: dict[str, Any] = field(default_factory=dict)
    """With ``capture(..., dynamic=True)``: each named dimension's sympy symbol in the shapes
    of ``node.meta["val"]``; the annotations hold the traced sizes."""
    training: bool = True
    """The model's mode at capture. An exported graph keeps that mode's behaviour (dropout,
    batch statistics) whatever mode it is later put in; an fx graph follows its modules' mode."""
    notes: list[str] = field(default_factory=list)
    """What the capture chose for the user, to say in the plan (e.g. :data:`CACHE_OFF`)."""
    leaf_modules: tuple[type[nn.Module] | str, ...] = ()
    """The ``leaf_modules`` the capture was given: capturing again with them gives the same nodes."""

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def parameter_bytes(self) -> int:
        return sum(p.nbytes for p in self.parameters.values())

    def parameter_count(self) -> int:
        return sum(_numel(p.shape) for p in self.parameters.values())

    def written(self) -> dict[str, tuple[str, ...]]:
        """The parameters and buffers the graph writes in place, each with the nodes writing it
        (in graph order): a counter, an EMA, running statistics updated in ``forward``."""
        writers: dict[str, list[str]] = {}
        for info in self.nodes.values():
            for name in info.writes:
                writers.setdefault(name, []).append(info.name)
        return {name: tuple(nodes) for name, nodes in writers.items()}

    def canonical(self, name: str) -> str:
        """The canonical name of a parameter or buffer given under any of its names."""
        return self.aliases.get(name, name)


def capture(
    model: nn.Module,
    example_inputs: Any = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    tracer: str = "auto",
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    dynamic: bool = False,
) -> Traced:
    """Capture ``model`` as an annotated fx graph, without running its real kernels.

    Args:
        model: the module to capture; its weights may live on ``meta``.
        example_inputs: positional inputs: tensors, :func:`spec` shapes, or containers of them.
            A single tensor or spec stands for a one-element tuple.
        example_kwargs: keyword inputs, likewise.
        tracer: ``"auto"`` (fx, then export where fx fails or would drop a buffer write),
            ``"fx"`` or ``"export"``.
        leaf_modules: module classes or qualified names that fx keeps as single nodes.
        dynamic: keep the dimensions named in the specs' ``dims`` symbolic (torch.export with
            dynamic shapes), so costs can be re-priced at other sizes without tracing again.

    Returns:
        A :class:`Traced` whose ``graph_module`` computes what the model computes.

    Raises:
        InputSignatureError: the inputs do not fit ``model.forward``.
        OpaqueCallError: a custom autograd Function or a checkpointed region the tracer would
            inline (torch.export), or checkpoint of code that is not a submodule.
        TraceError: no tracer could capture the model; says where and what to try. With
            ``tracer="fx"``, also when fx would leave a buffer write in ``forward`` out of its graph.

    Example:
        >>> traced = capture(model, (autosplit.spec((4, 128), dtype=torch.long),))
        >>> traced.nodes["embedding"].shapes
        ((4, 128, 768),)
    """
    require_module(model, "capture")
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    if isinstance(example_inputs, (torch.Tensor, TensorSpec)):
        example_inputs = (example_inputs,)
    elif isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    elif not isinstance(example_inputs, tuple):
        raise TypeError(
            f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}:"
            " wrap a single input as (x,)"
        )
    example_kwargs = dict(example_kwargs or {})
    signature = _bind_inputs(model, example_inputs, example_kwargs)
    notes = []
    if _caches_by_default(model, example_inputs, example_kwargs):  # a split cannot hand back a cache its stages would each hold part of
        example_kwargs["use_cache"] = False
        signature = _bind_inputs(model, example_inputs, example_kwargs)
        notes.append(CACHE_OFF)
        if model not in _TOLD_CACHE_OFF:  # once per model, however often it is captured
            _TOLD_CACHE_OFF.add(model)
            logger.warning("%s: %s", type(model).__name__, CACHE_OFF)
    device = _model_device(model)
    leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
    leaf_paths = frozenset(m for m in leaf_modules if isinstance(m, str))
    if len(leaf_types) + len(leaf_paths) != len(leaf_modules):
        raise TypeError("leaf_modules takes nn.Module classes or qualified module names (str)")

    dynamic_shapes = _dynamic_shapes(signature, tracer) if dynamic else None
    if dynamic_shapes is not None:  # export wants a key for every keyword it is given (use_cache too)
        dynamic_shapes.update({k: None for k in example_kwargs if k not in dynamic_shapes})
    failures: list[tuple[str, BaseException]] = []
    tried = ("fx", "export") if tracer == "auto" and not dynamic else (tracer if tracer != "auto" else "export",)
    with _capture_context(model):
        for name in tried:
            try:
                if name == "fx":
                    gm = _trace_fx(model, signature, example_inputs, example_kwargs, device, leaf_types, leaf_paths)
                else:
                    gm = _trace_export(model, example_inputs, example_kwargs, device, dynamic_shapes)
                break
            except OpaqueCallError:  # a refusal, not a failure: no other tracer keeps such a call either
                raise
            except UnrecordedWriteError as e:
                if tracer == "fx":  # the user chose fx: its one problem, and the remedy
                    raise
                logger.info("fx would drop buffer writes of %s; capturing with export", type(model).__name__)
                failures.append((name, e))
            except Exception as e:  # each tracer fails in its own ways; all are reported below
                logger.debug("tracer %s failed on %s: %s", name, type(model).__name__, e)
                failures.append((name, e))
        else:
            raise _trace_error(model, failures) from failures[-1][1]
    if failures:
        logger.info("captured %s with %s after fx failed: %s", type(model).__name__, name, failures[0][1])
    traced = _annotate(model, gm, name, example_inputs, example_kwargs, device)
    traced.notes = notes
    traced.leaf_modules = tuple(leaf_modules)
    if dynamic:
        traced.symbols = _named_symbols(gm, signature, dynamic_shapes)
    return traced


def _dynamic_shapes(bound: inspect.BoundArguments, tracer: str) -> dict[str, Any]:
    """torch.export's ``dynamic_shapes`` for the named dims of the spec inputs; one Dim per name."""
    if tracer == "fx":
        raise ValueError('dynamic=True needs tracer="export" or "auto": fx keeps no symbolic shapes')
    dims: dict[str, Any] = {}

    def for_leaf(x: Any) -> Any:
        if isinstance(x, TensorSpec) and any(x.dims):
            return {i: dims.setdefault(name, torch.export.Dim(name, min=1)) for i, name in enumerate(x.dims) if name}
        return None

    shapes = {name: pytree.tree_map(for_leaf, value) for name, value in bound.arguments.items()
              if any(isinstance(x, (torch.Tensor, TensorSpec)) for x in pytree.tree_leaves(value))}
    if not dims:
        raise ValueError('dynamic=True needs inputs given as specs with named dims, '
                         'e.g. spec((8, 1024), dtype=torch.long, dims=("batch", "seq"))')
    return shapes


def _named_symbols(gm: fx.GraphModule, bound: inspect.BoundArguments, shapes: dict[str, Any]) -> dict[str, Any]:
    """Which sympy symbol export gave each named dimension, read off the input placeholders."""
    names: list[Any] = []
    for name, value in bound.arguments.items():
        if name in shapes:
            leaves = pytree.tree_leaves(value)
            specs = pytree.tree_leaves(shapes[name], is_leaf=lambda x: isinstance(x, dict) or x is None)
            names.extend(zip(leaves, specs) if len(leaves) == len(specs) else [])
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    symbols: dict[str, Any] = {}
    tensors = [(leaf, dim_spec) for leaf, dim_spec in names if isinstance(leaf, (torch.Tensor, TensorSpec))]
    for node, (leaf, dim_spec) in zip(placeholders, tensors):
        for index, dim in (dim_spec or {}).items():
            size = node.meta["val"].shape[index]
            if isinstance(size, torch.SymInt):
                symbols.setdefault(dim.__name__, size.node.expr)
    return symbols


# --------------------------------------------------------------------------- input handling


CACHE_OFF = ("captured with use_cache=False: the graph, and a split of it, returns no KV cache (past_key_values "
             "is None). Pass example_kwargs={'use_cache': False}, or set model.config.use_cache = False, to choose "
             "this yourself")
"""The note of a model whose config turns its KV cache on and whose inputs leave it on."""
_TOLD_CACHE_OFF: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _caches_by_default(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether ``model`` would build and return a KV cache with these inputs: its config turns
    the cache on and the inputs do not say ``use_cache``."""
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False):
        return False
    try:
        given = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return False
    return "use_cache" in inspect.signature(model.forward).parameters and "use_cache" not in given


def require_module(model: Any, caller: str) -> None:
    """Refuse anything but an ``nn.Module``, saying how to make one of a plain function."""
    if isinstance(model, nn.Module):
        return
    if callable(model):
        name = getattr(model, "__name__", type(model).__name__)
        raise TypeError(f"{caller}() splits an nn.Module, and {name!r} is a plain {type(model).__name__}: wrap it "
                        f"in a module whose forward calls it (class Wrapped(nn.Module): def forward(self, *args): "
                        f"return {name}(*args)), with the weights it uses as that module's parameters")
    raise TypeError(f"{caller}() splits an nn.Module; got {type(model).__name__}")


def _bind_inputs(model: nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """Check the inputs against ``model.forward``; the bound arguments feed the fx tracer."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        given = ", ".join([_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()])
        raise InputSignatureError(
            f"example inputs do not fit {type(model).__name__}.forward{signature}: {e}; "
            f"got ({given}). Pass positional inputs in example_inputs and the rest in example_kwargs."
        ) from None
    bound.apply_defaults()
    return bound


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, TensorSpec):
        return f"spec{value.shape}"
    return type(value).__name__


def _model_device(model: nn.Module) -> torch.device:
    """The device inputs go to: meta if every weight is on meta, else the first real device."""
    devices = [t.device for t in _tensors_of(model)]
    real = [d for d in devices if d.type != "meta"]
    if real:
        return real[0]
    return torch.device("meta") if devices else torch.device("cpu")


def _tensors_of(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _materialize(tree: Any, device: torch.device) -> Any:
    """Specs become tensors on ``device``; on meta, real tensors become meta tensors too."""

    def leaf(x: Any) -> Any:
        if isinstance(x, TensorSpec):
            return x.materialize(device)
        if isinstance(x, torch.Tensor) and device.type == "meta":
            return x.detach().to("meta").requires_grad_(x.requires_grad)
        return x

    return pytree.tree_map(leaf, tree)


def _as_specs(tree: Any) -> Any:
    return pytree.tree_map(
        lambda x: TensorSpec(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x, tree
    )


@contextlib.contextmanager
def _capture_context(model: nn.Module) -> Iterator[None]:
    """Switch off what stops capture and restore it afterwards; the user's model is left as it was.

    Hugging Face models return a KV-cache object that is not a pytree unless ``use_cache`` is off;
    the captured graph is the model's cache-free forward, the one used for training.

    A forward that keeps a value on its module (``self.hidden = h``, as pipelining's
    ``MLPModuleWithDw`` does) would keep the tracer's stand-in there: an fx Proxy or export's
    FakeTensor, which breaks ``torch.save(model)`` and is no value of the model. Every module's
    attributes are put back as they were before the capture.
    """
    config = getattr(model, "config", None)
    restore = config is not None and getattr(config, "use_cache", False) is True
    attributes = [(module, dict(module.__dict__)) for module in model.modules()]
    if restore:
        config.use_cache = False
    try:
        yield
    finally:
        if restore:
            config.use_cache = True
        for module, before in attributes:
            module.__dict__.clear()
            module.__dict__.update(before)


# --------------------------------------------------------------------------- fx


class _LeafTracer(fx.Tracer):
    """``fx.Tracer`` with extra leaf modules, by class or by qualified name, and the modules
    called under checkpoint (leaves for that call only: see :mod:`autosplit.opaque`)."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_paths: frozenset[str]):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_paths = leaf_paths
        self.leaf_now: set[str] = set()
        self.checkpointed: dict[str, dict[str, Any]] = {}

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        if not torch.is_grad_enabled():  # inside `with torch.no_grad():` in the model's code
            node.meta["grad_enabled"] = False
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if (self.leaf_types and isinstance(m, self.leaf_types)) or module_qualified_name in self.leaf_paths \
                or module_qualified_name in self.leaf_now:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace_fx(
    model: nn.Module,
    bound: inspect.BoundArguments,
    args: tuple,
    kwargs: dict,
    device: torch.device,
    leaf_types: tuple[type, ...],
    leaf_paths: frozenset[str],
) -> fx.GraphModule:
    params = list(bound.signature.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise TraceError("fx cannot trace a forward that takes *args or **kwargs")
    # Everything that is not a tensor (flags, None defaults) is fixed at its given value, so
    # branches such as `if mask is not None` follow the call the user described.
    concrete = {
        name: value
        for name, value in bound.arguments.items()
        if not any(isinstance(x, (torch.Tensor, TensorSpec)) for x in pytree.tree_leaves(value))
    }
    tracer = _LeafTracer(leaf_types, leaf_paths)
    # Traced with grad enabled, so the nodes made inside the model's no_grad regions show as such.
    with _scratch_buffers(model) as scratch, kept_whole(model, tracer), torch.enable_grad():
        graph = tracer.trace(model, concrete_args=concrete)  # Functions, checkpoints: one node each
    written = [name for name, copy in scratch if copy._version > 0]
    if written:
        raise UnrecordedWriteError(
            f"{type(model).__name__}.forward writes the buffer {written[0]}"
            f"{f' (and {len(written) - 1} more)' if len(written) > 1 else ''} in place in a way torch.fx cannot "
            "record (e.g. `self.n += 1` or `self.ema.mul_(0.9)`): fx runs such code once while tracing and leaves "
            "the write out of the graph, so a split would never update the buffer. Use tracer=\"export\" (or "
            "\"auto\", which picks it), which records buffer writes")
    state = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    written_in_graph = sorted({n.args[0].target for n in graph.nodes
                               if n.op in ("call_method", "call_function") and n.args
                               and writes_in_place(_target_name(n)) and isinstance(n.args[0], fx.Node)
                               and n.args[0].op == "get_attr" and n.args[0].target in state})
    folded = [n.target for n in graph.nodes if n.op == "get_attr" and n.target.startswith("_tensor_constant")]
    if written_in_graph and folded:
        raise UnrecordedWriteError(
            f"{type(model).__name__}.forward writes the buffer {written_in_graph[0]} in place, and torch.fx computed "
            f"{len(folded)} tensor expression{'s' if len(folded) > 1 else ''} ({folded[0]}) once while tracing, "
            "e.g. `1 + self.n`: one on that buffer would keep its value at capture while the buffer changes. Use "
            "tracer=\"export\" (or \"auto\", which picks it), which reads the buffer at every call")
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    install_regions(gm, model, tracer.checkpointed)
    # Concrete arguments come back renamed (`mask_1`); give the signature its real names back.
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(params), (placeholders, params)
    for node, param in zip(placeholders, params):
        node.target = param.name
    gm.recompile()
    values = [bound.arguments[p.name] for p in params]
    with torch.no_grad():
        try:
            _ValuePropagator(gm, to_meta=True).run(*_materialize(values, torch.device("meta")))
        except Exception as e:
            if device.type == "meta":
                raise
            # Data-dependent code (`.item()`, `.tolist()`) cannot run on meta; real weights can.
            logger.info("shape propagation on meta failed (%s); propagating on %s", e, device)
            _ValuePropagator(gm, to_meta=False).run(*_materialize(values, device))
    if _detach_no_grad_regions(gm):
        gm.recompile()
    return gm


class UnrecordedWriteError(TraceError):
    """fx traced a forward that writes a buffer in place, but the write is not in its graph."""


@contextlib.contextmanager
def _scratch_buffers(model: nn.Module) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Every buffer of ``model`` replaced by a copy while fx traces it; yields (canonical name,
    copy) pairs.

    fx turns parameter reads into graph nodes but reads buffers as the real tensors, so Python
    code on a buffer runs for real while tracing: ``self.n += 1`` would add 1 to the user's
    buffer, and the graph would not hold the write. The copies take such writes instead (their
    version counters show them); a copy shared by two names is one copy, as the buffer was.
    """
    copies: dict[int, torch.Tensor] = {}
    named: list[tuple[str, torch.Tensor]] = []
    for name, buffer in model.named_buffers():
        copies[id(buffer)] = buffer.detach().clone()
        named.append((name, copies[id(buffer)]))
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and id(buffer) in copies:
                    swapped.append((module, name, buffer))
                    module._buffers[name] = copies[id(buffer)]
        yield named
    finally:
        for module, name, buffer in swapped:
            module._buffers[name] = buffer


class _ValuePropagator(fx.Interpreter):
    """Runs the graph once and records every node's value in ``node.meta["val"]``.

    The model's own tensors are never written to: with ``to_meta`` every weight is read as a
    meta tensor (no real kernel runs, no weight memory is touched); otherwise buffers are read
    as copies, so BatchNorm statistics and counters stay as they were.
    """

    def __init__(self, gm: fx.GraphModule, to_meta: bool):
        super().__init__(gm)
        self.copy = _meta_copy if to_meta else _buffer_copy

    def run_node(self, n: fx.Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as e:  # the op that rejects the values reaching it: named in the TraceError
            if not hasattr(e, "autosplit_node"):
                e.autosplit_node = (n, [self.env[a] for a in n.all_input_nodes if a in self.env])
            raise
        if n.op != "output":
            n.meta["val"] = value
        return value

    def get_attr(self, target: str, args: Any, kwargs: Any) -> Any:
        return self.copy(super().get_attr(target, args, kwargs))

    def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        state = {name: self.copy(t) for name, t in _named_state(module)}
        return torch.func.functional_call(module, state, args, kwargs)


def _meta_copy(value: Any) -> Any:
    return value.detach().to("meta") if isinstance(value, torch.Tensor) else value


def _buffer_copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) else value


def _named_state(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


# --------------------------------------------------------------------------- export


def _trace_export(model: nn.Module, args: tuple, kwargs: dict, device: torch.device,
                  dynamic_shapes: dict[str, Any] | None = None) -> fx.GraphModule:
    args, kwargs = _materialize((args, kwargs), device)
    try:
        ep = _export(model, args, kwargs, dynamic_shapes)
    except RuntimeError as e:
        if "register a pytree" not in str(e) or not _register_output_dataclasses(model, args, kwargs):
            raise
        ep = _export(model, args, kwargs, dynamic_shapes)
    # Guards would reject any batch size but the traced one; the input check stays.
    with _lazy_recompiles():
        gm = ep.module(check_guards=False)
    _inline_grad_regions(gm)
    _detach_no_grad_regions(gm)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()  # once, after every pass: the code of a 70B model's graph takes most of a second to generate
    return gm


def _export(model: nn.Module, args: tuple, kwargs: dict,
            dynamic_shapes: dict[str, Any] | None = None) -> torch.export.ExportedProgram:
    # Exported with grad enabled: the model's own no_grad regions come back as higher-order ops
    # (_inline_grad_regions). A failed export prints the partial graph to stderr and logs a warning about it: the
    # TraceError says what matters in one message, the rest goes to the debug log.
    # Source stack traces are not recorded on the nodes: nothing here reads them, and collecting
    # one per op is about a fifth of the export time of a large model. Export's passes each
    # regenerate the graph's Python code, which nothing reads before the end (_lazy_recompiles).
    noisy = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    stderr = io.StringIO()
    try:
        with torch.enable_grad(), contextlib.redirect_stderr(stderr), _no_stack_traces(), _lazy_recompiles(), \
                kept_whole(model, None):
            return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    finally:
        noisy.setLevel(level)
        if stderr.getvalue():
            logger.debug("torch.export printed:\n%s", stderr.getvalue())


_SET_GRAD = torch.ops.higher_order.wrap_with_set_grad_enabled


def _inline_grad_regions(gm: fx.GraphModule) -> None:
    """Inline the grad-mode regions export keeps as higher-order ops (``with torch.no_grad():``
    in the model's code becomes ``wrap_with_set_grad_enabled(False, submodule, *inputs)``), each
    inlined node marked with the region's mode in ``meta["grad_enabled"]`` (inner regions keep
    their own), so the graph can be split through them; :func:`_detach_no_grad_regions` then
    keeps what the mode did. Edits the graph only: the caller recompiles ``gm``."""
    inlined = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _SET_GRAD:
            continue
        enabled, holder, *inputs = node.args
        body = getattr(gm, holder.target)
        _inline_grad_regions(body)
        env: dict[fx.Node, Any] = {}
        placeholders = iter(inputs)
        results: Any = None
        with gm.graph.inserting_before(node):
            for inner in body.graph.nodes:
                if inner.op == "placeholder":
                    env[inner] = next(placeholders)
                elif inner.op == "output":
                    results = fx.node.map_arg(inner.args[0], env.__getitem__)
                elif inner.op == "get_attr":
                    env[inner] = gm.graph.get_attr(_adopt(gm, body, inner.target))
                else:
                    env[inner] = gm.graph.node_copy(inner, env.__getitem__)
                    env[inner].meta.setdefault("grad_enabled", bool(enabled))
        for user in list(node.users):  # getitem(region, i) -> the region's i-th result
            assert user.target is operator.getitem, user
            user.replace_all_uses_with(results[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not holder.users:
            gm.graph.erase_node(holder)
            delattr(gm, holder.target)
        inlined = True
    if inlined:
        gm.graph.lint()


def _adopt(gm: fx.GraphModule, body: fx.GraphModule, target: str) -> str:
    """The name under which ``gm`` reaches what ``body`` fetches as ``target``."""
    value = _fetch(body, target)
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False),
                    *gm.named_modules(remove_duplicate=False)]:
        if t is value:
            return name
    name = f"_region_{target.replace('.', '_')}"
    setattr(gm, name, value)
    return name


def _detach_no_grad_regions(gm: fx.GraphModule) -> bool:
    """Keep what the model's ``torch.no_grad()`` regions do when the graph runs in grad mode:
    every tensor a region's op reads from outside the region, and every tensor it makes, passes
    through ``detach``. No gradient then reaches a region's inputs or the weights its layers
    read, and a buffer it updates in place stays free of autograd history, exactly as under
    no_grad (the nodes carry ``meta["grad_enabled"] = False``, set while tracing). Edits the graph
    only, and says whether it did: the caller recompiles ``gm``."""
    region = [n for n in gm.graph.nodes if n.meta.get("grad_enabled") is False
              and n.op in ("call_function", "call_method", "call_module")]
    if not region:
        return False
    inside = set(region)
    exported = any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)

    def detached(source: fx.Node, after: fx.Node, owner: fx.Node) -> fx.Node:
        with gm.graph.inserting_after(after):
            node = (gm.graph.call_function(torch.ops.aten.detach.default, (source,)) if exported
                    else gm.graph.call_method("detach", (source,)))
        node.meta = {k: v for k, v in owner.meta.items() if k in ("nn_module_stack", "stack_trace")}
        node.meta["val"] = source.meta["val"].detach()
        ours.add(node)
        return node

    ours: set[fx.Node] = set()
    for node in region:
        cut = {}
        for source in node.all_input_nodes:
            if source not in inside and source not in ours and isinstance(source.meta.get("val"), torch.Tensor) \
                    and source not in cut:
                cut[source] = detached(source, node.prev, node)
        if cut:
            node.args = fx.node.map_arg(node.args, lambda n: cut.get(n, n))
            node.kwargs = fx.node.map_arg(node.kwargs, lambda n: cut.get(n, n))
        if isinstance(node.meta.get("val"), torch.Tensor) and node.users:
            made = detached(node, node, node)
            node.replace_all_uses_with(made, delete_user_cb=lambda user: user is not made)
    gm.graph.lint()
    return True


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """Tracing without recording each node's Python stack trace (``torch.fx.config``)."""
    import torch.fx.config as fx_config

    before = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = before


@contextlib.contextmanager
def _lazy_recompiles() -> Iterator[None]:
    """Graph modules made inside generate their Python code when it is first needed, not at each
    ``recompile()``: export's passes recompile the whole graph several times (each most of a
    second for a 70B model's 6,000 ops) where only the last code is ever run. This is the
    mode torch.compile traces in (``torch._dynamo.config.use_lazy_graph_module``)."""
    from torch.fx._lazy_graph_module import _use_lazy_graph_module

    with _use_lazy_graph_module(True):
        yield


def _run_on_meta(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The model's output for these inputs, computed on meta copies of its weights and inputs
    (specs included): shapes and structure only, nothing real runs or is written. Raises what the
    model raises on meta (data-dependent code, ops without a meta kernel)."""
    copies: dict[int, Any] = {}
    state = {name: copies.setdefault(id(t), _meta_copy(t)) for name, t in _named_state(model)}
    meta = torch.device("meta")
    with torch.no_grad(), _capture_context(model):
        return torch.func.functional_call(model, state, _materialize(args, meta), _materialize(kwargs, meta))


def _register_output_dataclasses(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Register the dataclasses found in the model's output as pytrees; True if any was new.

    export must flatten outputs; a plain dataclass is opaque to it until registered.
    """
    try:
        out = _run_on_meta(model, args, kwargs)
    except Exception:
        return False
    found: list[type] = []

    def visit(x: Any) -> None:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            if type(x) not in pytree.SUPPORTED_NODES and type(x) not in found:
                found.append(type(x))
            for f in dataclasses.fields(x):
                visit(getattr(x, f.name))
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)

    visit(out)
    for cls in found:
        logger.info("registering output dataclass %s as a pytree for export", cls.__qualname__)
        torch.export.register_dataclass(cls)
    return bool(found)


# --------------------------------------------------------------------------- annotation


def _annotate(
    model: nn.Module, gm: fx.GraphModule, tracer: str, args: tuple, kwargs: dict, device: torch.device
) -> Traced:
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, t in _named_state(model):
        first = canonical.setdefault(id(t), name)
        if first != name:
            aliases[name] = first
    module_types = {path: _class_name(type(m)) for path, m in model.named_modules(remove_duplicate=False)}

    def infos(named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, TensorInfo]:
        return {
            name: TensorInfo(tuple(t.shape), t.dtype, t.numel() * t.element_size(), t.requires_grad)
            for name, t in named
        }

    nodes: dict[str, NodeInfo] = {}
    aliases_of_state: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        writes = _written_state(node, gm, canonical, aliases_of_state)
        nodes[node.name] = _node_info(node, gm, canonical, module_types, writes)
        node.meta["autosplit"] = nodes[node.name]
    return Traced(
        graph_module=gm,
        nodes=nodes,
        tracer=tracer,
        model_type=_class_name(type(model)),
        parameters=infos(model.named_parameters()),
        buffers=infos(model.named_buffers()),
        aliases=aliases,
        module_types=module_types,
        example_args=_as_specs(args),
        example_kwargs=_as_specs(kwargs),
        device=device,
        training=model.training,
    )


_CALL_SUFFIX = re.compile(r"@(\d+)$")


def _node_info(
    node: fx.Node, gm: fx.GraphModule, canonical: dict[int, str], module_types: dict[str, str],
    writes: tuple[str, ...] = (),
) -> NodeInfo:
    if node.op == "output":
        value = pytree.tree_map(lambda a: a.meta.get("val") if isinstance(a, fx.Node) else None, node.args[0])
    else:
        value = node.meta.get("val")
    leaves = [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]

    scope: tuple[str, ...] = ()
    module_path = ""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        # Keys carry the call index of a reused module (`blk@1`); values carry the clean path.
        entries = []
        for key, (path, _cls) in stack.items():
            match = _CALL_SUFFIX.search(key)
            entries.append(f"{path}@{match.group(1)}" if match else path)
        entries = [e for e in entries if e and not e.startswith("@")]
        scope = tuple(entries)
        module_path = list(stack.values())[-1][0]

    reads: list[str] = []
    if node.op == "get_attr":
        t = _fetch(gm, node.target)
        if isinstance(t, torch.Tensor):
            reads.append(canonical.get(id(t), node.target))
        module_path = reads[0].rpartition(".")[0] if reads else node.target.rpartition(".")[0]
    elif node.op == "call_module":
        module_path = node.target
        for _, t in _named_state(gm.get_submodule(node.target)):
            name = canonical.get(id(t))
            if name is not None and name not in reads:
                reads.append(name)
    elif node.op in ("call_function", "call_method"):
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                t = _fetch(gm, arg.target)
                name = canonical.get(id(t), arg.target) if isinstance(t, torch.Tensor) else None
                if name is not None and name not in reads:
                    reads.append(name)

    shapes = tuple(tuple(_traced_size(d) for d in t.shape) for t in leaves)
    return NodeInfo(
        name=node.name,
        op=node.op,
        target=_target_name(node),
        shapes=shapes,
        dtypes=tuple(t.dtype for t in leaves),
        output_bytes=sum(_numel(shape) * _itemsize(t.dtype) for shape, t in zip(shapes, leaves)),
        module_path=module_path,
        module_type=module_types.get(module_path, ""),
        scope=scope,
        reads=tuple(reads),
        writes=writes,
        single_tensor=isinstance(value, torch.Tensor),
    )


_INPLACE_OPERATORS = frozenset({"setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow",
                                "iand", "ior", "ixor", "ilshift", "irshift"})
_VIEW_METHODS = frozenset({"view", "view_as", "reshape", "reshape_as", "select", "narrow", "transpose", "t",
                           "permute", "squeeze", "unsqueeze", "expand", "expand_as", "flatten", "unflatten",
                           "detach", "diagonal", "as_strided", "movedim", "split", "chunk", "unbind", "getitem",
                           "__getitem__", "real", "imag"})


def draws_random(target: str) -> bool:
    """Whether an op (its ``NodeInfo.target``) draws random numbers: dropout, ``rand``, ``normal``..."""
    return any(word in target for word in _RANDOM_WORDS)


_RANDOM_WORDS = ("dropout", "rand", "bernoulli", "normal", "multinomial", "uniform", "exponential")


def writes_in_place(target: str) -> bool:
    """Whether an op (its ``NodeInfo.target``, e.g. ``aten.add_.Tensor``, ``mul_`` or
    ``_operator.iadd``) writes its first argument in place."""
    parts = target.split(".")
    name = parts[1] if parts[0] == "aten" and len(parts) > 1 else parts[-1]
    return (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_OPERATORS


def _written_state(node: fx.Node, gm: fx.GraphModule, canonical: dict[int, str],
                   aliases: dict[fx.Node, str]) -> tuple[str, ...]:
    """The parameter or buffer ``node`` writes in place, if any. ``aliases`` maps each node seen
    so far whose value shares memory with one (the tensor itself, a view of it, the result of
    an in-place op on it) to its canonical name, and is extended with ``node``: in
    ``ema.mul_(0.9).add_(y)`` the ``add_`` writes ``ema`` through the ``mul_`` result."""
    if node.op == "get_attr":
        t = _fetch(gm, node.target)
        if isinstance(t, torch.Tensor) and id(t) in canonical:
            aliases[node] = canonical[id(t)]
        return ()
    if node.op not in ("call_function", "call_method") or not node.args or node.args[0] not in aliases:
        return ()
    base = aliases[node.args[0]]
    target = _target_name(node)
    if writes_in_place(target):
        aliases[node] = base
        return (base,)
    is_view = getattr(node.target, "is_view", False) if isinstance(node.target, torch._ops.OpOverload) \
        else target.rpartition(".")[2] in _VIEW_METHODS
    if is_view:
        aliases[node] = base
    return ()


def _traced_size(d: Any) -> int:
    """A dimension's traced size. A symbolic one is read through its hint: ``int()`` would make
    export's shape environment specialize the symbol to that value."""
    if isinstance(d, torch.SymInt):
        node = d.node
        return int(node.hint if node.hint is not None else node.shape_env.size_hint(node.expr))
    return int(d)


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        target = node.target
        if isinstance(target, FunctionCall):
            return repr(target)
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return str(target)
        return fx.node._get_qualified_name(target)
    return str(node.target)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


# --------------------------------------------------------------------------- errors


_OWN_DIRS = tuple(os.path.dirname(p) + os.sep for p in (torch.__file__, __file__))
_SITE_DIRS = tuple({sysconfig.get_paths()[k] + os.sep for k in ("purelib", "platlib")})
_STDLIB_DIRS = tuple({sysconfig.get_paths()[k] + os.sep for k in ("stdlib", "platstdlib")})


def _trace_error(model: nn.Module, failures: list[tuple[str, BaseException]]) -> TraceError:
    """One message: where each tracer failed (module, file:line, source) and what to try."""
    names = {id(m): path for path, m in model.named_modules(remove_duplicate=False)}
    lines = [f"could not capture {type(model).__name__} as a graph:"]
    culprit = None
    for tracer, exc in failures:
        where, module = _failure_site(exc, names)
        culprit = culprit or module
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        lines.append(f"  {'torch.fx.symbolic_trace' if tracer == 'fx' else 'torch.export'}: "
                     f"{type(exc).__name__}: {reason}" + (f"\n      at {where}" if where else ""))
    tips = []
    rejected = next((_rejection(exc) for tracer, exc in failures if getattr(exc, "autosplit_node", None)), None)
    if rejected:
        lines.append(f"  the example inputs reach {rejected}, which cannot take them")
        tips.append("check the example inputs' shapes and dtypes against what that layer was built for "
                    "(example_inputs are one batch as the model's forward takes it)")
    if not rejected:  # the graph could not be built: what makes tracing fail
        if culprit and culprit[0] != "<root>":
            path, cls = culprit
            tips.append(f"mark {cls} a leaf (leaf_modules=[{cls}] or ['{path}']) so fx does not trace into it")
        tips.append("pass the inputs that select the branch you want (example_kwargs, e.g. flags or masks)")
        tried = {t for t, _ in failures}
        if tried == {"fx"}:
            tips.append('try tracer="export"')
        elif tried == {"export"}:
            tips.append('try tracer="fx"')
        else:
            tips.append("replace data-dependent Python branches (`if x.sum() > 0`) with torch.where or torch.cond")
    lines.append("What to try: " + "; ".join(tips) + ".")
    return TraceError("\n".join(lines))


def _rejection(exc: BaseException) -> str:
    """The op an fx value propagation failed at, with the shapes that reached it."""
    node, values = exc.autosplit_node
    shapes = ", ".join(str(tuple(v.shape)) for v in values if isinstance(v, torch.Tensor)) or "no tensors"
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return f"layer '{node.target}' ({type(module).__name__}) with inputs of shape {shapes}"
    return f"{_target_name(node)} ('{node.name}') with inputs of shape {shapes}"


def _failure_site(exc: BaseException, names: dict[int, str]) -> tuple[str | None, tuple[str, str] | None]:
    """The innermost frame of user code in ``exc``'s traceback, and the model's module running there."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    user = [f for f in frames if _is_user_file(f.f_code.co_filename)]
    if not user:
        return None, None
    inner = user[-1]
    where = f"{inner.f_code.co_filename}:{inner.f_lineno} in {inner.f_code.co_name}"
    source = linecache.getline(inner.f_code.co_filename, inner.f_lineno).strip()
    if source:
        where += f": `{source}`"
    for frame in reversed(user):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            path = names[id(owner)] or "<root>"
            return f"module '{path}' ({type(owner).__name__}), {where}", (path, type(owner).__name__)
    return where, None


def _is_user_file(filename: str) -> bool:
    """Not torch, not autosplit, not the standard library: code of the model (or its library)."""
    if filename.startswith(_OWN_DIRS) or filename.startswith("<eval_with_key>"):
        return False
    return filename.startswith(_SITE_DIRS) or not filename.startswith(_STDLIB_DIRS)
