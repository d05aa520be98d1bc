"""Run a captured graph on a tensor-parallel group exactly as its chosen layouts say.

    choice = choose_layouts(traced, price_graph(traced.graph_module), cluster, ranks=[0, 1])
    tp = TensorParallelModule(traced, choice.layouts, init_device_mesh("cpu", (2,)))
    with cpu_attention_strategy():          # on CPU meshes, for SDPA; around backward too
        loss = loss_fn(tp(ids), target)
        loss.backward()

The plan (``autosplit.sharding``) gives every node of the graph a :class:`Layout`: the
placement each tensor input must have when the op runs, and the placement of each output. This
module applies it with DTensor and nothing else:

1. Every weight (a ``get_attr`` node) is distributed once, at construction, in its node's output
   placement and registered under the model's own name as an ``nn.Parameter`` holding a DTensor
   (buffers as DTensor buffers), so autograd and any optimizer see the shards.
2. ``forward`` runs the graph with an ``fx.Interpreter``. Before each op, each tensor input is
   redistributed to the placement the op's layout names (once per producer and placement: two
   readers of ``x`` in ``S(1)`` share one all-gather, as the pricing assumes). A plain tensor (a
   graph input, or the output of a factory op such as ``arange``) enters as ``Replicate`` first.
   Running the ATen op on DTensors then picks DTensor's strategy for those input placements,
   which is the one the planner priced; a node whose output comes out in another placement is
   listed in ``unplanned``.
3. The graph's outputs are returned whole (``full_tensor``), in the model's output structure.

Running example, an MLP ``down(gelu(up(x)))`` on 2 ranks: ``up.weight`` is ``S(0)`` (each rank
holds half of the rows), ``x`` enters ``R``, ``linear(x, up.weight)`` gives ``S(2)``, gelu keeps
it, ``linear(h, down.weight)`` with ``down.weight`` in ``S(1)`` gives ``P`` (partial sums), and
the output node wants ``R``: one all-reduce, the only collective of the forward.

Pipeline stages (``autosplit.distributed.build`` with a tensor-parallel plan) are laid out by
:func:`parallelize_stage` instead: the same placements as explicit nodes in the stage's graph
(a :class:`Placer` call per value and placement), so the stage stays a graph module that
``PipelineStage`` runs and that recomputation can wrap; what crosses a stage boundary is each
rank's shard (:class:`WireLayout`).

Not handled: nodes the planner could only replicate because DTensor has no strategy for their op
(DTensor refuses to run them on DTensors; the plan's notes name them); in-place writes to
buffers (the runtime refuses models that write their state in forward on tensor-parallel
groups); random ops run on each rank's own generator, so dropout draws the same mask on every
rank of a group for a replicated tensor when the ranks are seeded alike, and (on the CPU, where
DTensor has no generator of its own) the same pattern on every shard of a sharded one.
"""

from __future__ import annotations

import inspect
import logging
import operator
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch import nn

from autosplit.errors import DistributedError
from autosplit.rewrite import TRACED_NODE
from autosplit.sharding.placements import (REPLICATE, from_placement, is_partial, is_shard, shard_dim,
                                          to_placement)
from autosplit.sharding.strategies import Layout, tensor_inputs, tensor_outputs
from autosplit.trace import Traced

logger = logging.getLogger(__name__)


class TensorParallelModule(nn.Module):
    """A captured model whose weights are sharded over a 1-D mesh and whose forward runs each op
    in its planned layout.

    Args:
        traced: the captured model (``autosplit.capture(..., tracer="export")``).
        layouts: the layout of every node by name (``choose_layouts(...).layouts``).
        mesh: a 1-D ``DeviceMesh`` whose size is the layouts' tensor-parallel degree.

    Every rank of the mesh must build the module from the same weights and layouts and call it
    with the same inputs. On a CPU mesh, run forward and backward inside
    ``autosplit.sharding.cpu_attention_strategy()`` when the model uses SDPA.

    Example:
        >>> tp = TensorParallelModule(traced, choice.layouts, mesh)
        >>> out = tp(ids)                                # the model's output, whole on every rank
        >>> tp.get_parameter("lm_head.weight").placements
        (Shard(dim=0),)
    """

    def __init__(self, traced: Traced, layouts: Mapping[str, Layout], mesh):
        super().__init__()
        if mesh.ndim != 1:
            raise ValueError(f"the tensor-parallel mesh must be 1-D, e.g. init_device_mesh('cpu', (2,)); "
                             f"got {mesh.ndim} dimensions {tuple(mesh.shape)}")
        gm = traced.graph_module
        missing = [n.name for n in gm.graph.nodes if n.name not in layouts]
        if missing:
            raise ValueError(f"the layouts name no layout for {len(missing)} nodes of the graph, e.g. "
                             f"{missing[:3]}: choose them for this graph (choose_layouts(traced, ...))")
        self.graph_module = [gm]  # a list: not a submodule, so its (whole) weights are not ours
        self.layouts = dict(layouts)
        self.mesh = mesh
        self.unplanned: list[str] = []
        """The nodes whose output DTensor placed otherwise than their layout says, in the last
        forward (empty when the run followed the plan)."""
        self._attr_of: dict[str, str] = {}  # get_attr node -> the weight's name
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                if node.target not in self._attr_of.values():
                    weight = gm.get_parameter(node.target) if _is_parameter(gm, node.target) \
                        else gm.get_buffer(node.target)
                    self._distribute(node.target, weight, self.layouts[node.name].outputs[0])
                self._attr_of[node.name] = node.target

    def _distribute(self, name: str, tensor: torch.Tensor, placement: str) -> None:
        """Register ``tensor`` under ``name`` (dotted, as in the model) as a DTensor in ``placement``."""
        from torch.distributed.tensor import distribute_tensor

        owner = self
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        value = distribute_tensor(tensor.detach(), self.mesh, [_stored(placement)])
        if isinstance(tensor, nn.Parameter):
            param = nn.Parameter(value, requires_grad=tensor.requires_grad)
            param.register_post_accumulate_grad_hook(_keep_gradient_in_placement)
            owner.register_parameter(leaf, param)
        else:
            owner.register_buffer(leaf, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        gm = self.graph_module[0]
        flat = _flat_inputs(gm, args, kwargs)
        self.unplanned = []
        outputs = _LayoutInterpreter(self).run(*flat, enable_io_processing=False)
        whole = pytree.tree_map_only(torch.Tensor, lambda o: o.full_tensor() if _is_dtensor(o) else o, outputs)
        return gm.graph._codegen.process_outputs(whole)


def _keep_gradient_in_placement(param: nn.Parameter) -> None:
    """Give a weight's gradient the weight's own placement (an op's backward may leave it partial
    or otherwise split), so an optimizer adds like to like."""
    if param.grad is not None and param.grad.placements != param.placements:
        param.grad = param.grad.redistribute(param.device_mesh, param.placements)


def _stored(placement: str):
    """The placement a weight is stored in: a partial weight is stored whole (``R``); the
    interpreter makes the planned partial from it where an op reads it."""
    return to_placement(REPLICATE if is_partial(placement) else placement)


def _is_parameter(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The graph's placeholder values for a call of the model, as the graph module's own forward
    flattens them (its positional and keyword arguments by the captured input structure)."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return list(args)
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"the tensor-parallel model takes the captured model's arguments "
                        f"{info.orig_args}: {e}") from e
    values = [bound.arguments[name] for name in info.orig_args]
    spec = info.in_spec
    if spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple and spec.child(1).type is dict:
        count = spec.child(0).num_children
        return fx_pytree.tree_flatten_spec((values[:count], dict(zip(spec.child(1).context, values[count:]))), spec)
    return fx_pytree.tree_flatten_spec(values, spec)


class _LayoutInterpreter(fx.Interpreter):
    """Runs the graph on DTensors, each op's tensor inputs redistributed to its layout first."""

    def __init__(self, module: TensorParallelModule):
        super().__init__(module.graph_module[0], garbage_collect_values=True)
        self.module = module
        self.mesh = module.mesh
        self.layouts = module.layouts
        self.moved: dict[tuple[str, str], Any] = {}  # (producer, placement) -> the redistributed value

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            return super().run_node(n)
        if n.op == "get_attr":
            name = self.module._attr_of[n.name]
            try:
                return self.module.get_parameter(name)
            except AttributeError:
                return self.module.get_buffer(name)
        if n.op == "call_function" and n.target is operator.getitem:
            return super().run_node(n)  # an element of a multi-output op: it has that element's placement
        layout = self.layouts[n.name]
        if n.op == "call_function" and not layout.outputs and not n.users:
            return None  # a check, e.g. export's _assert_tensor_metadata: no DTensor rule, nothing computed
        slots = iter(zip(tensor_inputs(n), layout.inputs, strict=True))

        def fetch(arg: fx.Node) -> Any:
            value = self.env[arg]
            if not isinstance(value, torch.Tensor):
                return value
            slot, placement = next(slots)
            return self._placed(f"{slot.producer}:{slot.index}", value, placement)

        args = pytree.tree_map_only(fx.Node, fetch, n.args)
        kwargs = pytree.tree_map_only(fx.Node, fetch, n.kwargs)
        if n.op == "output":
            return args[0]
        out = getattr(self, n.op)(n.target, args, kwargs)
        got = tuple(from_placement(t.placements[0], t.ndim) for t in pytree.tree_leaves(out) if _is_dtensor(t))
        if got and got != layout.outputs[:len(got)]:
            self.module.unplanned.append(f"{n.name} ({n.target}): planned {layout.outputs}, DTensor gave {got}")
            logger.debug("unplanned placement: %s", self.module.unplanned[-1])
        return out

    def _placed(self, producer: str, value: torch.Tensor, placement: str) -> Any:
        """``value`` in ``placement``, redistributed once per producer and placement."""
        key = (producer, placement)
        if key not in self.moved:
            self.moved[key] = place(value, self.mesh, placement)
        return self.moved[key]


# --------------------------------------------------------------------------- pipeline stages


class Placer(nn.Module):
    """``placer(value, "S(1)")``: ``value`` as a DTensor in that placement on the stage's
    tensor-parallel mesh, as the op reading it is laid out. The call nodes a stage graph gets
    from :func:`parallelize_stage` are the Plan's layout changes, one per value and placement."""

    def __init__(self, mesh):
        super().__init__()
        self.mesh = mesh

    def forward(self, value: Any, placement: str) -> Any:
        return place(value, self.mesh, placement)


def place(value: Any, mesh, placement: str) -> Any:
    """``value`` in ``placement`` on ``mesh``: a plain tensor (a stage's input, a factory op's
    output: the same on every rank) enters as ``Replicate``; ``R`` → ``P`` is left to the op
    reading it (DTensor makes a partial from a replicated input itself, with no collective, and
    its public ``redistribute`` refuses it)."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(value, torch.Tensor):
        return value
    if not isinstance(value, DTensor):
        value = DTensor.from_local(value, mesh, [Replicate()], run_check=False)
    have = from_placement(value.placements[0], value.ndim)
    if have != placement and not (is_partial(placement) and have == REPLICATE):
        if not value.is_contiguous():
            # DTensor's redistribute of a strided value (a transposed shard) returns a contiguous
            # local tensor but keeps the strides in its spec, and a later view then fails
            value = value.contiguous()
        value = _own_storage(value.redistribute(mesh, [to_placement(placement)]))
    return value


def _own_storage(value: Any) -> Any:
    """``value``, its shard copied out when it is a view of a larger buffer: without an
    all-to-all, gloo's ``S(i) → S(j)`` gathers the whole tensor and keeps a slice of it, and an
    op saving that slice for backward would keep the whole alive (twice the shard at tp = 2),
    where the plan prices a copy of the shard's size."""
    with torch.no_grad():
        local = value.to_local()
    if local.untyped_storage().nbytes() > local.numel() * local.element_size():
        return value.clone()
    return value


class WireLayout:
    """The placements of the tensors a stage sends (or receives) on its tensor-parallel group:
    each rank sends its own shard to the rank of the same group position on the next stage,
    which takes it back as a DTensor of the same placement. Nothing is gathered at a boundary
    (the next stage's ops redistribute as their layouts say, as the Plan prices); the last
    stage's output is made whole (``"whole"``) for the loss, the same on every rank of its group.

    ``placements``: per sent tensor, its placement (``"R"``, ``"S(d)"``, ``"P"``), ``"whole"``,
    or None for a number or size sent as a tensor."""

    def __init__(self, mesh, placements: Sequence[str | None]):
        self.mesh = mesh
        self.placements = list(placements)

    def local_metas(self, metas: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Meta tensors of what each rank sends (its shards), from the whole values' metas."""
        tp = self.mesh.size()
        found = []
        for meta, placement in zip(metas, self.placements, strict=True):
            shape = list(meta.shape)
            if placement is not None and is_shard(placement):
                shape[shard_dim(placement)] //= tp
            found.append(torch.empty(shape, dtype=meta.dtype, device="meta").requires_grad_(meta.requires_grad))
        return tuple(found)

    def to_local(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """What this rank sends of each tensor (the sender's side)."""
        from torch.distributed.tensor import DTensor, Replicate

        sent = []
        for t, placement in zip(tensors, self.placements, strict=True):
            if placement is None:
                sent.append(t)
                continue
            if placement == WHOLE:
                sent.append(t.full_tensor() if isinstance(t, DTensor) else t)
                continue
            if not isinstance(t, DTensor) and is_partial(placement):
                raise DistributedError(f"a stage sends a tensor the plan lays out as a partial sum ({placement}), "
                                       "but every rank of its group computed it whole: plan again with this autosplit")
            t = place(t, self.mesh, placement)
            # the gradient of a partial sum is the same on every rank: it comes back replicated
            grads = [Replicate()] if is_partial(placement) else None
            sent.append(t.to_local(grad_placements=grads).contiguous())
        return tuple(sent)

    def from_local(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The DTensors the received shards make (the receiver's side)."""
        from torch.distributed.tensor import DTensor

        return tuple(t if placement is None else DTensor.from_local(t, self.mesh, [to_placement(placement)],
                                                                     run_check=False)
                     for t, placement in zip(tensors, self.placements, strict=True))


WHOLE = "whole"
"""A sent tensor made whole on every rank (the model's output, for the loss)."""


def parallelize_stage(module: fx.GraphModule, traced: Traced, layouts: Mapping[str, Mapping[str, Any]], mesh, *,
                      last: bool) -> dict[int, nn.Parameter | torch.Tensor]:
    """Make a pipeline stage's graph module (``autosplit.distributed.stages``) run on a
    tensor-parallel ``mesh`` in the Plan's layouts (``Plan.layouts``), in place:

    1. Every weight the stage fetches (``get_attr``) becomes a DTensor in its node's placement
       (a parameter stays an ``nn.Parameter``, its gradient kept in that placement).
    2. Before each op, each tensor input passes through the stage's :class:`Placer` to the
       placement the op's layout names: one node per value and placement, the Plan's layout
       changes (explicit ``redistribute``; DTensor's propagation does the rest).
    3. What the stage receives and sends crosses as each rank's shard (:class:`WireLayout`), and
       the ``last`` stage's output is whole.

    Export's metadata checks (``_assert_tensor_metadata``), which DTensor has no rule for and
    which compute nothing, run :func:`skipped_check` instead. Returns the original tensors' ids
    → the DTensors that replace them, for the caller to put in the model wherever it holds
    them.

    Raises:
        DistributedError: a layout shards a dimension the runtime's shapes do not divide into
            equal shards (the plan was made for other shapes).
    """
    from autosplit.distributed.stages import Receive, Send, _fetch

    tp = mesh.size()
    planned = {n.name: n for n in traced.graph_module.graph.nodes}
    graph = module.graph
    attribute = "tensor_parallel"
    module.add_module(attribute, Placer(mesh))
    replaced: dict[int, Any] = {}
    placed: dict[tuple[fx.Node, str], fx.Node] = {}

    def placed_value(value: fx.Node, placement: str, reader: fx.Node) -> fx.Node:
        if value.op == "get_attr" and value.name in layouts:
            stored = from_placement(_stored(layouts[value.name]["output"]))
            if placement == stored or is_partial(placement) and stored == REPLICATE:
                return value  # a weight is stored as its readers read it (R -> P is left to the op)
        key = (value, placement)
        if key not in placed:  # before its first reader, so before every later one
            with graph.inserting_before(reader):
                placed[key] = graph.call_module(attribute, (value, placement))
            # part of the reader's block, for recomputation (autosplit.distributed.recompute)
            placed[key].meta[TRACED_NODE] = reader.meta.get(TRACED_NODE, reader.name)
        return placed[key]

    for node in list(graph.nodes):
        twin = planned.get(node.name)
        layout = layouts.get(node.name)
        if twin is None or layout is None or twin.op != node.op or twin.target != node.target:
            continue  # a node of the stage's own (a move, receive, send): no layout
        if node.op == "get_attr":
            original = _fetch(module, node.target)
            if id(original) not in replaced:
                replaced[id(original)] = _distributed(original, mesh, layout["output"])
            _set(module, node.target, replaced[id(original)])
            continue
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if not layout["output"] and not node.users:
            node.target = skipped_check  # a metadata check: the node stays, for the plan's records
            continue
        _check_even(node, layout, tp)
        inputs = iter(layout["inputs"])
        flat_twin, _ = pytree.tree_flatten((twin.args, twin.kwargs))
        flat, spec = pytree.tree_flatten((node.args, node.kwargs))
        assert len(flat_twin) == len(flat), (node.name, twin.args, node.args)
        for k, (was, value) in enumerate(zip(flat_twin, flat)):
            if isinstance(was, fx.Node) and _is_tensor_node(was):
                placement = next(inputs)
                if isinstance(value, fx.Node):
                    flat[k] = placed_value(value, placement, node)
        node.args, node.kwargs = pytree.tree_unflatten(flat, spec)

    for node in graph.nodes:
        if node.op != "call_module":
            continue
        target = module.get_submodule(node.target)
        if isinstance(target, Receive):
            target.layout = WireLayout(mesh, [p for wire in target.wires for p in _wire_placements(wire, layouts)])
        elif isinstance(target, Send):
            target.layout = WireLayout(mesh, [p for wire in target.wires for p in _wire_placements(wire, layouts, last)])
    graph.lint()
    module.recompile()
    return replaced


def skipped_check(*args: Any, **kwargs: Any) -> None:
    """What an export metadata check (``_assert_tensor_metadata``) runs on a tensor-parallel
    stage: nothing (DTensor has no rule for it, and the shards' metadata differ by design)."""


def _wire_placements(wire, layouts: Mapping[str, Mapping[str, Any]], whole: bool = False) -> list[str | None]:
    """The placement of each tensor a wire sends: its producer's output placements in order
    (``WHOLE`` for each with ``whole``), None for a number or size sent as a tensor."""
    from autosplit.distributed.stages import Fixed

    layout = layouts.get(wire.name)
    outputs = iter(layout["output"].split() if layout and layout["output"] else ())
    found: list[str | None] = []
    for kind in wire.kinds:
        if isinstance(kind, Fixed):
            continue  # not sent
        if kind != "tensor":
            found.append(None)
        else:
            placement = next(outputs, REPLICATE)
            found.append(WHOLE if whole else placement)
    return found


def _is_tensor_node(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _check_even(node: fx.Node, layout: Mapping[str, Any], tp: int) -> None:
    """Refuse a layout that shards a dimension this run's shapes do not split evenly."""
    values = tensor_outputs(node)
    for t, placement in zip(values, layout["output"].split()):
        if is_shard(placement) and t.shape[shard_dim(placement)] % tp:
            raise DistributedError(
                f"the plan shards {node.name} along dimension {shard_dim(placement)} over {tp} ranks, but here it has "
                f"shape {tuple(t.shape)}: the batch or sequence differs from the one planned. Plan again for batches of "
                "this shape")


def _distributed(tensor: torch.Tensor, mesh, placement: str) -> torch.Tensor:
    """``tensor`` as a DTensor in ``placement`` (a partial weight stored whole), a parameter as a
    parameter whose gradient keeps its placement."""
    from torch.distributed.tensor import distribute_tensor

    value = distribute_tensor(tensor.detach(), mesh, [_stored(placement)])
    if not isinstance(tensor, nn.Parameter):
        return value
    param = nn.Parameter(value, requires_grad=tensor.requires_grad)
    param.register_post_accumulate_grad_hook(_keep_gradient_in_placement)
    return param


def _set(module: nn.Module, target: str, value: torch.Tensor) -> None:
    *path, leaf = target.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    if isinstance(value, nn.Parameter):
        owner._parameters[leaf] = value
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)
