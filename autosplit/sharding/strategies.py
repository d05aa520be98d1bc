"""The layouts each node of a captured graph can take on a tensor-parallel group, from DTensor itself.

    layouts = node_layouts(traced.graph_module, tp=4)
    layouts["linear_3"].layouts      # (Layout(inputs=('R', 'S(0)'), outputs=('S(2)',), compute_fraction=0.25), ...)

A layout of a node is one way DTensor runs its op on a 1-D mesh of ``tp`` ranks: the placement
of every tensor argument, the placement of every tensor output, and the share of the op's work
each rank does. They come from DTensor's own sharding propagation, so a runtime that hands an op
its inputs in those placements (``redistribute``) gets exactly that output with no further
communication:

1. Enumerate. Each tensor argument is offered every placement it can take — Replicate, Partial
   (floating point only) and Shard(d) on each dimension ``tp`` divides — as one ``OpStrategy``,
   and the op's strategy function registered with DTensor's sharding propagator (an op strategy,
   a single-dim strategy expanded to the mesh, or DTensor's tracing of the op's decomposition for
   composite ops such as ``aten.linear``) lists the input placements it accepts.
2. Confirm. For each distinct tuple of input placements, DTensor's runtime choice is asked
   what it does with inputs in exactly those placements: the strategy function on those inputs
   and ``_select_min_cost_strategy``, as ``propagate_op_sharding_non_cached`` (what every
   DTensor op call runs) does, less its fake-tensor run of the op (the capture has the output's
   shape). Only fixed points are kept — no input would be redistributed, except a replicated
   one DTensor slices or masks locally (an embedding split by vocabulary masks its replicated
   indices) — with the output placements DTensor picks.
3. Reach. A layout is dropped where the runtime could not hand DTensor its inputs as it says:
   one whose partial inputs all come from producers that are never partial (weights, graph
   inputs, ``rsqrt``) and whose other inputs are replicated (DTensor, handed only replicated
   inputs, runs the replicated layout), a copying reshape of a partial (it runs as clone, which
   all-reduces), and a partial output other than a sum (its gradient cannot come back).

Running example: ``aten.linear(x, w)`` with x (8, 1024, 4096) and w (11008, 4096) on tp=2 gives,
among others, ``(R, S(0)) -> S(2)`` (column parallel, each rank does half the FLOPs),
``(S(2), S(1)) -> P`` (row parallel: a partial sum, all-reduced by whoever needs it whole) and
``(R, R) -> R`` (replicated, whole work on every rank).

Fused attention is mapped: ``aten.scaled_dot_product_attention`` (a composite op that becomes a
fused kernel at run time) and the CPU kernel ``aten._scaled_dot_product_flash_attention_for_cpu``
have no strategy of their own, so they take the CUDA flash kernel's strategy (replicated, split by
heads, split by batch) without touching torch's registry; an attention mask follows the split of
the dimension it has (heads or batch) or stays replicated where it broadcasts. A runtime that
executes these on CPU registers the same strategy for the duration (:func:`cpu_attention_strategy`).

Ops with no strategy, and fx graphs' calls that map to no ATen op (``call_module``, methods),
are replicate-only, with a note naming the op. The mesh is a ``DeviceMesh`` built with
``_init_backend=False``: no process group is created, nothing global is left behind. Results are
cached by op, input shapes, strides and dtypes, constant arguments and ``tp``: the 6,000 nodes of
a Llama-70B graph have 70 distinct signatures.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import operator
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from autosplit.sharding.placements import PARTIAL, REPLICATE, from_placement, is_partial, is_shard, shard, to_placement

logger = logging.getLogger(__name__)

aten = torch.ops.aten


@dataclass(frozen=True)
class Layout:
    """One way a node runs on the tensor-parallel group."""

    inputs: tuple[str, ...]
    """Placement of each tensor argument, in the order of :func:`tensor_inputs`."""
    outputs: tuple[str, ...]
    """Placement of each tensor output, in pytree order (one for a single tensor)."""
    compute_fraction: float = 1.0
    """Share of the op's work each rank does: 1/tp when any input or output is sharded, else 1
    (a partial sum alone is computed whole-sized on every rank)."""

    @property
    def sharded(self) -> bool:
        """True when any input or output is sharded or partial."""
        return any(p != REPLICATE for p in (*self.inputs, *self.outputs))

    def to_json(self) -> dict:
        return {"inputs": list(self.inputs), "outputs": list(self.outputs), "compute_fraction": self.compute_fraction}

    @classmethod
    def from_json(cls, data: dict) -> "Layout":
        return cls(tuple(data["inputs"]), tuple(data["outputs"]), float(data["compute_fraction"]))


@dataclass(frozen=True)
class NodeLayouts:
    """The layouts a node can take (replicated first when it can be), and why it has no others."""

    layouts: tuple[Layout, ...]
    note: str = ""
    """Empty, or why the node is replicate-only (e.g. no DTensor strategy for its op)."""


@dataclass(frozen=True)
class Slot:
    """A tensor argument of a node: the producing node, and which of its tensor outputs it is."""

    producer: str
    index: int = 0


def tensor_inputs(node: fx.Node) -> list[Slot]:
    """The tensor arguments of ``node`` in the order of its layouts' ``inputs``: positional then
    keyword arguments, flattened; an element of a multi-output op read through ``getitem`` is
    that element of the producer."""
    if _is_getitem(node):
        return [Slot(node.args[0].name, int(node.args[1]))]
    if node.op == "output":
        return [Slot(a.name) for a in _nodes_in(node.args) if _is_tensor(a)]
    return [Slot(a.name) for a in _nodes_in((node.args, node.kwargs)) if _is_tensor(a)]


def _nodes_in(value: Any) -> Iterator[fx.Node]:
    """The fx nodes in nested arguments, in order (what ``pytree.tree_leaves`` keeps, faster)."""
    if isinstance(value, fx.Node):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _nodes_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _nodes_in(v)


def tensor_outputs(node: fx.Node) -> list[torch.Tensor]:
    """The tensors ``node`` produces (fake or meta), in pytree order."""
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def placement_options(t: torch.Tensor, tp: int) -> list[str]:
    """Every placement a tensor can take on ``tp`` ranks: R, P for floating point, S(d) where
    ``tp`` divides dimension d (uneven shards are left out: their ranks would differ in work)."""
    options = [REPLICATE]
    if t.is_floating_point() or t.is_complex():
        options.append(PARTIAL)
    options += [shard(d) for d, size in enumerate(t.shape) if isinstance(size, int) and size >= tp and size % tp == 0]
    return options


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the duration (as a ``with`` or a decorator).

    Planning passes allocate many small objects next to a captured graph of millions: each
    collection of the oldest generation walks all of them, a third of the time of
    :func:`node_layouts` and ``choose_layouts`` on Llama-70B. Whatever a pass leaves in
    reference cycles is collected at the next collection after it.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@collector_paused()
def node_layouts(gm: fx.GraphModule | fx.Graph, tp: int) -> dict[str, NodeLayouts]:
    """The layouts of every node of a captured graph on ``tp`` ranks, by node name.

    Args:
        gm: a graph from ``autosplit.capture`` (torch.export or fx), nodes carrying ``meta["val"]``.
        tp: size of the tensor-parallel group (the 1-D mesh).

    Example:
        >>> layouts = node_layouts(traced.graph_module, tp=2)
        >>> [l.inputs for l in layouts["linear"].layouts]
        [('R', 'R'), ('R', 'S(0)'), ('S(2)', 'S(1)'), ...]
    """
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive int, e.g. 2; got {tp!r}")
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    prepared = _PREPARED.get(graph)
    if prepared is None or len(prepared) != len(graph.nodes):
        prepared = [_prepare(node) for node in graph.nodes]
        _PREPARED[graph] = prepared
    result: dict[str, NodeLayouts] = {}
    partial_outputs: dict[str, set[int]] = {}  # node -> the outputs some layout of it gives partial
    for node, p in zip(graph.nodes, prepared):  # producers first: a node's kept layouts bound its readers'
        options = _layouts(node, p, tp)
        if p.kind in ("strategy", "cast"):
            slots = tensor_inputs(node)
            options = _reachable(options, [i for i, s in enumerate(slots)
                                           if s.index not in partial_outputs.get(s.producer, ())])
        result[node.name] = options
        partial_outputs[node.name] = {i for l in options.layouts for i, q in enumerate(l.outputs) if is_partial(q)}
    return result


def layouts_of(node: fx.Node, tp: int) -> NodeLayouts:
    """The layouts of one node (see :func:`node_layouts`), before those its producers rule out."""
    return _layouts(node, _prepare(node), tp)


@dataclass(frozen=True)
class _Prepared:
    """What the layouts of a node depend on besides ``tp``, read off the graph once: a planner
    asks for tp = 2, 4 and 8 of the same 6,000 nodes. (It holds no fx node: a graph's cache
    must not keep the graph alive.)"""

    kind: str
    """``weight``, ``whole`` (placeholders, outputs, factories), ``check`` (reads one input,
    returns nothing), ``getitem``, ``cast``, ``replicated`` (no ATen op) or ``strategy``."""
    n_inputs: int
    outputs: list[torch.Tensor]
    value: torch.Tensor | None = None
    """The input a check or a cast reads."""
    op: Any = None
    note: str = ""
    """Why a ``replicated`` node is replicate-only."""
    key: tuple | None = None
    """The ``strategy`` node's signature, less ``tp`` (None: no stable text, not cached)."""


_PREPARED: "weakref.WeakKeyDictionary[fx.Graph, list[_Prepared]]" = weakref.WeakKeyDictionary()
"""Each graph's nodes prepared, in graph order (a captured graph is not edited after capture;
a changed node count prepares it again)."""


def _prepare(node: fx.Node) -> _Prepared:
    outputs = tensor_outputs(node)
    inputs = tensor_inputs(node)
    n = len(inputs)
    if node.op == "get_attr":
        return _Prepared("weight", n, outputs)
    if node.op in ("placeholder", "output"):
        return _Prepared("whole", n, outputs)
    if not outputs:
        return _Prepared("check", n, outputs, _value(node, inputs[0]) if n == 1 else None)
    if _is_getitem(node):
        return _Prepared("getitem", n, outputs)
    if not inputs:
        return _Prepared("whole", n, outputs)
    op, note = _aten_op(node)
    if op in _CASTS and n == 1 and len(outputs) == 1:
        return _Prepared("cast", n, outputs, _value(node, inputs[0]), op)
    if op is None:
        return _Prepared("replicated", n, outputs, note=note)
    try:
        key = _signature(node, op)
    except TypeError:
        key = None
    return _Prepared("strategy", n, outputs, op=op, key=key)


def _layouts(node: fx.Node, p: _Prepared, tp: int) -> NodeLayouts:
    """The layouts of a prepared node on ``tp`` ranks."""
    outputs = p.outputs
    whole = NodeLayouts((Layout((REPLICATE,) * p.n_inputs, (REPLICATE,) * len(outputs)),))
    if p.kind == "weight":  # a weight: stored replicated or sharded along any dimension
        if len(outputs) != 1:
            return whole
        return NodeLayouts(tuple(Layout((), (q,)) for q in placement_options(outputs[0], tp) if q != PARTIAL))
    if p.kind == "whole" or tp == 1:  # inputs arrive whole on every rank; factories compute whole
        return whole
    if p.kind == "check":  # a check of its input's metadata (``_assert_tensor_metadata``): reads any placement
        if p.value is None:
            return whole
        return NodeLayouts(tuple(Layout((q,), ()) for q in placement_options(p.value, tp)))
    if p.kind == "getitem":
        if len(outputs) != 1:
            return whole
        return NodeLayouts(tuple(Layout((q,), (q,)) for q in placement_options(outputs[0], tp)))
    if p.kind == "cast":  # elementwise: any placement carries over
        return NodeLayouts(tuple(Layout((q,), (q,)) for q in placement_options(outputs[0], tp)
                                 if q in placement_options(p.value, tp)))
    if p.kind == "replicated":
        return NodeLayouts(whole.layouts, p.note)
    key = (*p.key, tp) if p.key is not None else None
    if key is not None and key in _CACHE:
        return _CACHE[key]
    try:
        result = _enumerate(node, p.op, tp)
    except Exception as e:  # a strategy function that cannot handle these arguments
        logger.debug("no DTensor layouts for %s (%s): %s", node.name, p.op, e)
        result = NodeLayouts(whole.layouts, f"{p.op}: DTensor's strategy failed ({type(e).__name__}: {e}); replicated")
    if key is not None:
        _CACHE[key] = result
    return result


_CACHE: dict[Any, NodeLayouts] = {}
"""Layouts by node signature and ``tp``, before :func:`_reachable` (which depends on the producers)."""


def _reachable(layouts: NodeLayouts, never_partial: list[int]) -> NodeLayouts:
    """``layouts`` less those DTensor would run otherwise, given the inputs (``never_partial``)
    whose producer can give no partial value.

    Such an input reaches the op whole where a layout wants it partial: the runtime stores a weight
    the plan wants partial replicated, a graph input enters replicated, and an op with no partial
    layout (``rsqrt``) gives a replicated value; it leaves ``R -> P`` to the op, and DTensor makes a
    partial from a replicated input itself, at no cost, when its strategy for the other inputs'
    placements wants one. When every input that is not replicated in a layout is such a partial,
    DTensor is handed replicated inputs only and runs the replicated layout instead:
    ``linear(x, w, b)`` in ``(R, P, P) -> P`` runs as ``(R, R, R) -> R``, not as priced. With a
    sharded input beside it the partial is made as planned: row-parallel ``(S(2), S(1), P) -> P``
    adds the whole bias as one addend.
    """
    if not never_partial:
        return layouts
    kept = tuple(l for l in layouts.layouts
                 if not any(is_partial(l.inputs[i]) for i in never_partial)
                 or any(p != REPLICATE and not (i in never_partial and is_partial(p)) for i, p in enumerate(l.inputs)))
    return layouts if len(kept) == len(layouts.layouts) else NodeLayouts(kept, layouts.note)


_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten.alias.default,
          aten.contiguous.default}
"""Ops that return their input or an elementwise copy of it: a cast keeps any placement (DTensor
never sees a cast to the same dtype, and runs ``_to_copy`` elementwise otherwise)."""


def _value(node: fx.Node, slot: Slot) -> torch.Tensor | None:
    """The tensor an input slot of ``node`` reads."""
    producer = next(n for n in node.all_input_nodes if n.name == slot.producer)
    values = tensor_outputs(producer)
    return values[slot.index] if slot.index < len(values) else None


def clear_cache() -> None:
    """Forget the layouts found so far (they depend only on torch's version)."""
    _CACHE.clear()


# --------------------------------------------------------------------------- ops of fx graphs

_FX_FUNCTIONS = {
    operator.add: aten.add.Tensor, operator.sub: aten.sub.Tensor, operator.mul: aten.mul.Tensor,
    operator.truediv: aten.div.Tensor, operator.neg: aten.neg.default, operator.matmul: aten.matmul.default,
    torch.add: aten.add.Tensor, torch.sub: aten.sub.Tensor, torch.mul: aten.mul.Tensor, torch.div: aten.div.Tensor,
    torch.matmul: aten.matmul.default, torch.relu: aten.relu.default, torch.tanh: aten.tanh.default,
    torch.sigmoid: aten.sigmoid.default, torch.exp: aten.exp.default, torch.rsqrt: aten.rsqrt.default,
    torch.nn.functional.gelu: aten.gelu.default, torch.nn.functional.relu: aten.relu.default,
    torch.nn.functional.silu: aten.silu.default, torch.nn.functional.linear: aten.linear.default,
}
"""Functions an fx graph calls whose positional arguments are those of one ATen op."""


def _aten_op(node: fx.Node) -> tuple[Any, str]:
    """The ATen op a node runs, or None and why it is replicate-only."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target, ""
    if node.op == "call_function" and node.target in _FX_FUNCTIONS:
        if any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            return None, f"{_name(node)} with tensor keyword arguments: replicated"
        return _FX_FUNCTIONS[node.target], ""
    return None, f"{_name(node)} maps to no ATen op with a DTensor strategy: replicated"


def _name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _is_getitem(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
            and isinstance(node.args[0].meta.get("val"), (tuple, list)) and isinstance(node.args[1], int))


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _signature(node: fx.Node, op: Any) -> tuple:
    """Everything the layouts depend on but ``tp``; raises TypeError for a constant without a stable text."""

    def describe(value: Any) -> Any:
        if isinstance(value, fx.Node):
            v = value.meta.get("val")
            if isinstance(v, torch.Tensor):
                return ("T", tuple(v.shape), tuple(v.stride()), str(v.dtype))
            return ("V", repr(v))
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        text = repr(value)
        if " at 0x" in text:
            raise TypeError(text)
        return text

    return (str(op), describe(node.args), tuple(sorted((k, describe(v)) for k, v in node.kwargs.items())))


# --------------------------------------------------------------------------- DTensor calls


@functools.lru_cache(maxsize=None)
def _mesh(tp: int):
    """A 1-D mesh of ``tp`` ranks that creates no process group (only its size matters here)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh("cpu", list(range(tp)), _init_backend=False, _rank=0)


def _propagator():
    from torch.distributed.tensor import DTensor

    return DTensor._op_dispatcher.sharding_propagator


def _spec(t: torch.Tensor, placement: str, tp: int):
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    return DTensorSpec(_mesh(tp), (to_placement(placement),), TensorMeta(t.shape, t.stride(), t.dtype))


def _schema_args(node: fx.Node, leaf) -> tuple[tuple, dict]:
    """The node's args and kwargs with each tensor node replaced by ``leaf(index, tensor)`` (its
    position among the tensor inputs) and other nodes by their values."""
    counter = iter(range(1 << 30))

    def convert(value: Any) -> Any:
        if isinstance(value, fx.Node):
            v = value.meta.get("val")
            return leaf(next(counter), v) if isinstance(v, torch.Tensor) else v
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, tuple):
            return tuple(convert(v) for v in value)
        return value

    args = tuple(convert(a) for a in node.args)
    kwargs = {k: convert(v) for k, v in node.kwargs.items()}
    return args, kwargs


def _wrap_lists(value: Any) -> Any:
    """A list of OpStrategies becomes a TupleStrategy, as DTensor's dispatcher wraps tensor lists."""
    from torch.distributed.tensor._op_schema import OpStrategy, TupleStrategy

    if isinstance(value, (list, tuple)) and value and all(isinstance(v, OpStrategy) for v in value):
        return TupleStrategy(list(value) if isinstance(value, list) else tuple(value))
    return value


def _enumerate(node: fx.Node, op: Any, tp: int) -> NodeLayouts:
    metas = [n.meta["val"] for n in _nodes_in((node.args, node.kwargs)) if _is_tensor(n)]
    outputs = tensor_outputs(node)
    if any(not isinstance(s, int) for t in (*metas, *outputs) for s in t.shape):
        return NodeLayouts((Layout(("R",) * len(metas), ("R",) * len(outputs)),),
                           f"{op}: symbolic shapes; replicated")
    options = [placement_options(t, tp) for t in metas]
    if op in _ATTENTION:
        layouts = _attention_layouts(node, op, metas, options, tp)
        return NodeLayouts(_ordered(layouts))
    prop = _propagator()
    if op not in prop.op_single_dim_strategy_funcs and op not in prop.op_strategy_funcs:
        from torch.distributed.tensor._decompositions import DecompShardingStrategy

        if not DecompShardingStrategy.has_decomp(op):
            return NodeLayouts((Layout(("R",) * len(metas), ("R",) * len(outputs)),),
                               f"{op} has no DTensor sharding strategy; replicated")
        return NodeLayouts(_ordered(_decomposition_layouts(node, op, metas, options, outputs, tp)))
    layouts = []
    for inputs in _accepted_inputs(node, op, metas, options, tp):
        produced = _runtime_outputs(node, op, inputs, tp, len(outputs))
        if produced is not None:
            layouts.append(_layout(inputs, produced, tp))
    if op is aten.reshape.default and not _viewable(metas[0], outputs[0].shape):
        # A reshape that must copy runs as clone + view on DTensors (reshape is a composite op),
        # and DTensor's clone all-reduces a partial input: its view strategy's P -> P is not run.
        layouts = [l for l in layouts if not is_partial(l.inputs[0])]
    if not layouts:
        return NodeLayouts((Layout(("R",) * len(metas), ("R",) * len(outputs)),),
                           f"{op}: DTensor's propagation accepted none of its placements; replicated")
    return NodeLayouts(_ordered(layouts))


def _viewable(t: torch.Tensor, shape: Any) -> bool:
    """Whether ``t`` (its shape and strides) can be viewed as ``shape`` without a copy."""
    try:
        torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta").view(shape)
    except RuntimeError:
        return False
    return True


def _replicate():
    from torch.distributed.tensor import Replicate

    return Replicate()


def _is_mask_partial(placement: Any) -> bool:
    return type(placement).__name__ == "_MaskPartial"


def _layout(inputs: tuple[str, ...], outputs: tuple[str, ...], tp: int) -> Layout:
    fraction = 1 / tp if any(is_shard(p) for p in (*inputs, *outputs)) else 1.0
    return Layout(tuple(inputs), tuple(outputs), fraction)


def _ordered(layouts: list[Layout]) -> tuple[Layout, ...]:
    """Distinct layouts, the all-replicated one first (every node has it: the fallback), the rest
    sorted by placements, less those with a partial output other than a sum: such an output
    cannot take its gradient back when the gradient comes as a partial sum (as it does to a value
    read beside a sharded input: ``rsqrt(mean(x)) * x`` with x split by hidden), and DTensor
    refuses "Redistribution from one partial type (P(sum)) to another (P(avg))"."""
    unique = [l for l in dict.fromkeys(layouts) if all(q == PARTIAL or not is_partial(q) for q in l.outputs)]
    # In a fixed order: DTensor's decomposition tracer lists some ops' strategies in an order that
    # follows Python's string hashing, which differs between processes, and ties go to the first.
    unique.sort(key=lambda l: (l.sharded, l.inputs, l.outputs))
    return tuple(unique)


def _accepted_inputs(node: fx.Node, op: Any, metas: list, options: list[list[str]],
                     tp: int) -> list[tuple[str, ...]]:
    """Step 1: the distinct input placements DTensor's strategy for ``op`` accepts, each input
    offered all its ``options``."""
    from torch.distributed.tensor._op_schema import OpSchema, OpSpec, OpStrategy

    prop = _propagator()
    single_dim = prop.op_single_dim_strategy_funcs.get(op)
    strategy_func = prop.op_strategy_funcs.get(op)
    info = prop.op_to_schema_info.get(op) or prop.op_to_schema_info_for_single_dim_strategy.get(op)
    if single_dim is not None:
        return _single_dim_inputs(node, op, single_dim, metas, options, tp, info)
    args, kwargs = _schema_args(node, lambda i, t: OpStrategy([OpSpec(_spec(t, p, tp)) for p in options[i]]))
    schema = OpSchema(op, tuple(_wrap_lists(a) for a in args), {k: _wrap_lists(v) for k, v in kwargs.items()},
                      schema_info=info)
    strategy = strategy_func(schema)
    return _input_tuples(strategy, metas, options)


def _single_dim_inputs(node: fx.Node, op: Any, single_dim: Any, metas: list, options: list[list[str]], tp: int,
                       info: Any) -> list[tuple[str, ...]]:
    """The input placements of a single-dim strategy's rules (its shard placeholders filled with
    plain shards, as for inputs that hold ``Shard`` placements)."""
    from torch.distributed.tensor._dtensor_spec import TensorMeta
    from torch.distributed.tensor._op_schema import OpSchema, OpSpec, OpStrategy
    from torch.distributed.tensor._ops.single_dim_strategy import _PreparedSingleDimStrategy

    def leaf(i: int, t: torch.Tensor) -> Any:
        pick = next((p for p in options[i] if is_shard(p)), REPLICATE)
        return OpStrategy([OpSpec(_spec(t, pick, tp))])

    args, kwargs = _schema_args(node, leaf)
    schema = OpSchema(op, tuple(_wrap_lists(a) for a in args), {k: _wrap_lists(v) for k, v in kwargs.items()},
                      schema_info=info)
    outs = [TensorMeta(t.shape, t.stride(), t.dtype) for t in tensor_outputs(node)]
    out_meta = outs[0] if isinstance(node.meta.get("val"), torch.Tensor) else tuple(outs)
    prepared = _PreparedSingleDimStrategy(single_dim, schema, out_meta)
    tuples = []
    for rule in prepared.expanded_strategies:
        inputs = [_replicate() if _is_mask_partial(p) else p for p in rule[prepared.num_outputs:]]
        if len(inputs) != len(metas) or any(p is None for p in inputs):
            continue
        try:
            placements = tuple(from_placement(p, t.ndim) for p, t in zip(inputs, metas))
        except ValueError:
            continue
        if all(p in allowed for p, allowed in zip(placements, options)):
            tuples.append(placements)
    return list(dict.fromkeys(tuples))


def _decomposition_layouts(node: fx.Node, op: Any, metas: list, options: list[list[str]],
                           outputs: list[torch.Tensor], tp: int) -> list[Layout]:
    """Layouts of a composite op (``aten.linear``, ``aten.matmul``): DTensor runs its
    decomposition op by op, and its decomposition tracer tells, for each tuple of input
    placements, the output placements reached without any redistribution. (Asking DTensor's runtime propagation about one tuple instead would trace
    every other tuple too, and one failing tuple fails them all.)"""
    from torch.distributed.tensor._op_schema import OpSchema

    prop = _propagator()
    prop.decomp_strategy.ensure_schema_info(op)
    layouts: list[Layout] = []
    # The tracer tries every combination of the placements the inputs hold (shards on every
    # dimension): one input holding a shard and another a partial sum covers them all.
    floating = [i for i, o in enumerate(options) if PARTIAL in o]
    sharded = [i for i, o in enumerate(options) if any(is_shard(p) for p in o)]
    probes = [("S",) * len(options), ("P",) * len(options)]
    mixed = next(((i, j) for i in sharded for j in floating if i != j), None)
    if mixed is not None:
        probes = [tuple("S" if k == mixed[0] else "P" if k == mixed[1] else "R" for k in range(len(options)))]
    for probe in probes:
        def leaf(i: int, t: torch.Tensor) -> Any:
            pick = next((p for p in options[i] if p.startswith(probe[i])), REPLICATE)
            return _spec(t, pick, tp)

        args, kwargs = _schema_args(node, leaf)
        schema = OpSchema(op, args, kwargs, schema_info=prop.op_to_schema_info.get(op))
        strategy = prop.decomp_strategy.propagate_strategy(schema)
        for spec in strategy.strategies:
            try:
                inputs = tuple(from_placement(s.placements[0], t.ndim) for s, t in zip(spec.input_specs, metas))
                specs = spec.output_specs if isinstance(spec.output_specs, (tuple, list)) else (spec.output_specs,)
                produced = tuple(from_placement(s.placements[0], t.ndim) for s, t in zip(specs, outputs))
            except ValueError:
                continue
            if (len(inputs) == len(metas) and len(produced) == len(outputs)
                    and all(p in allowed for p, allowed in zip(inputs, options))
                    and all(p in placement_options(t, tp) for p, t in zip(produced, outputs))):
                layouts.append(_layout(inputs, produced, tp))
    return layouts


def _input_tuples(strategy: Any, metas: list, options: list[list[str]]) -> list[tuple[str, ...]]:
    from torch.distributed.tensor._op_schema import OpStrategy

    if not isinstance(strategy, OpStrategy):
        raise TypeError(f"a {type(strategy).__name__} (lists of tensors in and out) is not planned")
    tuples = []
    for spec in strategy.strategies:
        specs = spec.input_specs if spec.input_specs is not None else [spec.output_spec] * len(metas)
        if len(specs) != len(metas):
            continue
        try:
            placements = tuple(from_placement(s.placements[0], t.ndim) for s, t in zip(specs, metas))
        except ValueError:  # strided shards and other placements not planned
            continue
        if all(p in allowed for p, allowed in zip(placements, options)):
            tuples.append(placements)
    return list(dict.fromkeys(tuples))


def _runtime_outputs(node: fx.Node, op: Any, inputs: tuple[str, ...], tp: int,
                     n_outputs: int) -> tuple[str, ...] | None:
    """Step 2: the output placements DTensor's runtime propagation gives inputs in exactly
    ``inputs``, or None when it would redistribute them first (not a fixed point)."""
    from torch.distributed.tensor._dtensor_spec import TensorMeta
    from torch.distributed.tensor._op_schema import OpSchema, OpStrategy
    from torch.distributed.tensor._ops.single_dim_strategy import _expand_single_dim_strategy_to_mesh
    from torch.distributed.tensor._sharding_prop import _select_min_cost_strategy

    # What ``propagate_op_sharding_non_cached`` does for a strategy op, less its fake-tensor
    # run: the output's shape is known from the capture.
    prop = _propagator()
    args, kwargs = _schema_args(node, lambda i, t: _spec(t, inputs[i], tp))
    schema = OpSchema(op, args, kwargs, schema_info=prop.op_to_schema_info.get(op))
    strategy_schema = prop._wrap_with_op_strategy(schema)
    single_dim = prop.op_single_dim_strategy_funcs.get(op)
    try:
        if single_dim is not None:
            outs = [TensorMeta(t.shape, t.stride(), t.dtype) for t in tensor_outputs(node)]
            out_meta = outs[0] if isinstance(node.meta.get("val"), torch.Tensor) else tuple(outs)
            strategy = _expand_single_dim_strategy_to_mesh(_mesh(tp), strategy_schema, single_dim, out_meta)(
                op, strategy_schema.args_meta, strategy_schema.kwargs_meta)
        else:
            strategy = prop.op_strategy_funcs[op](strategy_schema)
        if not isinstance(strategy, OpStrategy):
            return None
        picked = _select_min_cost_strategy(strategy, schema)
    except Exception as e:
        logger.debug("DTensor refuses %s with inputs %s: %s", op, inputs, e)
        return None
    wanted_specs = picked.input_specs if picked.input_specs is not None else [picked.output_spec] * len(inputs)
    metas = [t.meta["val"] for t in _nodes_in((node.args, node.kwargs)) if _is_tensor(t)]
    try:
        wanted = tuple(from_placement(_replicate() if _is_mask_partial(s.placements[0]) else s.placements[0], t.ndim)
                       for s, t in zip(wanted_specs, metas))
    except ValueError:
        return None
    # Replicate -> Shard or Partial is a local slice or mask DTensor makes itself, free (an
    # embedding split by vocabulary masks its replicated indices so).
    if len(wanted) != len(inputs) or any(w != p and p != REPLICATE for w, p in zip(wanted, inputs)):
        return None
    specs = picked.output_specs
    specs = [specs] if not isinstance(specs, (tuple, list)) else [s for s in specs if s is not None]
    if len(specs) != n_outputs:
        return None
    try:
        return tuple(from_placement(s.placements[0], t.ndim) for s, t in zip(specs, tensor_outputs(node)))
    except ValueError:
        return None


# --------------------------------------------------------------------------- fused attention

_ATTENTION = (aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default)


def _attention_layouts(node: fx.Node, op: Any, metas: list, options: list[list[str]], tp: int) -> list[Layout]:
    """Layouts of an attention op with the CUDA flash kernel's DTensor strategy (q, k, v and the
    output all replicated, all split by heads S(1), or all split by batch S(0)); a mask follows
    the split of its dimension, or stays replicated where it broadcasts (size 1)."""
    from torch.distributed.tensor._op_schema import OpSchema, OpSpec, OpStrategy

    q, k, v = metas[:3]
    strategy_schema = OpSchema(aten._scaled_dot_product_flash_attention.default,
                               tuple(OpStrategy([OpSpec(_spec(t, p, tp)) for p in options[i]])
                                     for i, t in enumerate((q, k, v))) + (0.0, False), {})
    strategy = _propagator().op_strategy_funcs[aten._scaled_dot_product_flash_attention.default](strategy_schema)
    n_outputs = len(tensor_outputs(node))
    layouts = []
    for qkv in _input_tuples(strategy, [q, k, v], options[:3]):
        if len(set(qkv)) != 1:
            continue
        placement = qkv[0]
        inputs = list(qkv)
        for i, mask in enumerate(metas[3:], start=3):
            inputs.append(_mask_placement(mask, placement, options[i]))
        if None in inputs:
            continue
        layouts.append(_layout(tuple(inputs), (placement,) * n_outputs, tp))
    return layouts


def _mask_placement(mask: torch.Tensor, placement: str, options: list[str]) -> str | None:
    if placement == REPLICATE:
        return REPLICATE
    dim = int(placement[2:-1]) - (4 - mask.ndim)  # masks broadcast from the right against (b, h, l, s)
    if dim < 0 or mask.shape[dim] == 1:
        return REPLICATE
    return shard(dim) if shard(dim) in options else None


def _attention_strategy(op_schema):
    """DTensor strategy for the CPU flash kernel: the CUDA flash kernel's placements for q, k, v,
    the output and the log-sum-exp, with the mask as :func:`_add_mask` places it."""
    from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy
    from torch.distributed.tensor.placement_types import Replicate, Shard

    mesh = op_schema.get_mesh_from_args()
    mask = op_schema.kwargs_schema.get("attn_mask")
    rows = [[Replicate()] * 5]
    for dim in (1, 0):
        row: list = [Shard(dim)] * 5
        rows.append(row)
    _add_mask(rows, mask)
    return expand_to_full_mesh_op_strategy(mesh, op_schema, rows, input_index=2)


def _add_mask(rows: list, mask: Any) -> None:
    """Append the attention mask's placement to every row: split like q's batch or heads where
    the mask has that dimension, else replicated (it broadcasts)."""
    from torch.distributed.tensor._op_schema import OpStrategy
    from torch.distributed.tensor.placement_types import Replicate, Shard

    if not isinstance(mask, OpStrategy):
        return
    shape = mask.strategies[0].output_spec.shape
    for row in rows:
        p = row[0]
        d = p.dim - (4 - len(shape)) if isinstance(p, Shard) else -1
        row.append(Shard(d) if d >= 0 and shape[d] != 1 else Replicate())


def _attention_backward_strategy(op_schema):
    """The backward of :func:`_attention_strategy`: gradients of q, k, v placed like q, k, v."""
    from torch.distributed.tensor._op_schema import OpStrategy
    from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy
    from torch.distributed.tensor.placement_types import Replicate, Shard

    mesh = op_schema.get_mesh_from_args()
    n_tensors = sum(isinstance(a, OpStrategy) for a in op_schema.args_schema)
    mask = op_schema.kwargs_schema.get("attn_mask")
    rows = [[Replicate()] * (3 + n_tensors)]
    for dim in (1, 0):
        rows.append([Shard(dim)] * (3 + n_tensors))
    _add_mask(rows, mask)
    return expand_to_full_mesh_op_strategy(mesh, op_schema, rows, input_index=3)


@contextlib.contextmanager
def cpu_attention_strategy() -> Iterator[None]:
    """Let DTensor run CPU flash attention (what ``F.scaled_dot_product_attention`` becomes on
    CPU) with the strategy the planner priced it by; restores DTensor's registry on exit.

    Example:
        >>> with cpu_attention_strategy():
        ...     out = F.scaled_dot_product_attention(q, k, v)   # q, k, v: DTensors split by heads
    """
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo

    prop = _propagator()
    forward = aten._scaled_dot_product_flash_attention_for_cpu.default
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    saved = {op: (prop.op_strategy_funcs.get(op), prop.op_to_schema_info.get(op)) for op in (forward, backward)}
    prop.register_op_strategy(forward, _attention_strategy, RuntimeSchemaInfo(3, ["attn_mask", "scale"]))
    prop.register_op_strategy(backward, _attention_backward_strategy, RuntimeSchemaInfo(6, ["attn_mask", "scale"]))
    prop.propagate_op_sharding.cache_clear()
    try:
        yield
    finally:
        for op, (func, info) in saved.items():
            for table, value in ((prop.op_strategy_funcs, func), (prop.op_to_schema_info, info)):
                if value is None:
                    table.pop(op, None)
                else:
                    table[op] = value
        prop.propagate_op_sharding.cache_clear()
