"""The stages of a plan as one graph module each, in the form torch.distributed.pipelining runs.

    chain = stage_chain(model, captured, plan, device)
    sent = chain.modules[0](*first_microbatch)        # the tensors stage 0 sends to stage 1
    sent = chain.modules[1](*sent)                    # ... and so on; the last returns the output
    output = chain.output.decode(sent)                # the model's output structure

Every rank builds the whole chain the same way (graph work only, no tensor is copied) and runs
its own stage, so all ranks agree on what crosses each boundary without exchanging anything.

The graph is the one-process split's (:func:`autosplit.rewrite.split_graph`, every stage on this
rank's device) cut by :func:`autosplit.pipeline.cut_stages`: nodes go where the plan puts them,
values computed from the inputs alone are rebuilt where the plan says, and a value read on a
later stage is relayed stage by stage. What differs is what pipelining needs:

* A chain. ``PipelineStage`` sends every output of stage s to stage s + 1 and nothing further, so
  stage s takes exactly what stage s − 1 sends, in its order, and sends everything a later stage
  reads. Running example, ResCNN on three stages: the stem's output feeds the residual blocks on
  stage 0 and the head's concat on stage 2. Stage 0 sends it with its main activation; stage 1
  receives it, sends the same tensor on, and stage 2 reads it. Backward runs the other way:
  stage 1's copy is its own input, so the gradient stage 2 sends back for it adds to the
  gradient of that input, and stage 0 receives the sum (what the plan prices as one transfer
  per hop, :attr:`autosplit.plan.Stage.transfers_in`).
* Tensors only. Every value crosses as a flat tuple of tensors (a :class:`Wire`): a tuple or a
  dict crosses leaf by leaf, a Python number as a 0-d tensor (so a number computed from data
  arrives exact), and what cannot depend on data (None, dtypes, devices, strings) is fixed at
  capture. The last stage returns the model's output the same way, flattened (the schedule
  detaches each element of the last stage's output tuple after backward, which a dict or a
  model-output class would not survive); the loss function gets it back whole
  (:meth:`Wire.decode`).
* Each stage reads its own weights. A weight stored on another stage (the tied embedding of a
  language model, read again by its head) is the rank's own copy rather than a value sent once
  per call; :func:`shared_weights` says which, so the runtime can sum their gradients.
* Inputs that are not tensors (flags, numbers) are fixed at capture, as both tracers fix them:
  stage 0 takes the tensor inputs it reads, and the runtime refuses a call that passes another
  value for a fixed one.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.fx.immutable_collections import immutable_dict, immutable_list

from autosplit.api import CapturedMicrobatch
from autosplit.errors import AutosplitError
from autosplit.pipeline import cut_stages
from autosplit.plan import Plan
from autosplit.rewrite import deliver, placeholder_arguments, split_graph, transfer

_NUMBERS = {"bool": (bool, torch.bool), "int": (int, torch.int64), "float": (float, torch.float64)}
"""Python numbers that cross as 0-d tensors: kind -> (Python type, tensor dtype)."""

_FIXED_TYPES = (str, torch.dtype, torch.device, torch.layout, torch.memory_format)
"""Values that cannot depend on data: fixed at capture instead of sent."""


@dataclasses.dataclass(frozen=True)
class Fixed:
    """A leaf of a crossing value fixed at capture (a dtype, a device, a string)."""

    value: Any


@dataclasses.dataclass(frozen=True)
class Wire:
    """How one value crosses a stage boundary as tensors: its pytree structure and, per leaf,
    ``"tensor"`` (sent as is, contiguous), ``"bool"``/``"int"``/``"float"`` (sent as a 0-d
    tensor), ``"size"`` (a ``torch.Size``, sent as a 1-d tensor) or :class:`Fixed` (not sent)."""

    name: str
    """The node of the split graph that makes the value, for messages."""
    spec: pytree.TreeSpec
    kinds: tuple[Any, ...]
    metas: tuple[torch.Tensor, ...]
    """A ``meta`` tensor per sent leaf, one microbatch's worth: shape, dtype, and whether the
    receiver needs its gradient (``requires_grad``)."""

    @classmethod
    def of(cls, name: str, value: Any, needs_grad: bool) -> "Wire":
        """The wire of ``value`` (a node's value at capture: meta or fake tensors, or numbers).
        ``needs_grad``: whether the value may depend on a trainable weight (floating leaves then
        send a gradient back)."""
        leaves, spec = pytree.tree_flatten(value, is_leaf=_is_size)
        kinds, metas = [], []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                grad = needs_grad and (leaf.is_floating_point() or leaf.is_complex())
                kinds.append("tensor")
                metas.append(torch.empty(tuple(leaf.shape), dtype=leaf.dtype, device="meta").requires_grad_(grad))
            elif isinstance(leaf, torch.Size):
                kinds.append("size")
                metas.append(torch.empty((len(leaf),), dtype=torch.int64, device="meta"))
            elif type(leaf) in (bool, int, float):
                kind = type(leaf).__name__
                kinds.append(kind)
                metas.append(torch.empty((), dtype=_NUMBERS[kind][1], device="meta"))
            elif leaf is None or isinstance(leaf, _FIXED_TYPES):
                kinds.append(Fixed(leaf))
            else:
                raise AutosplitError(
                    f"{name} crosses a stage boundary and holds a {type(leaf).__name__}, which cannot be sent between "
                    "ranks (tensors, numbers, dtypes, devices and strings can): pin the ops that make and read it to "
                    "one stage (pin={'module.path': stage}) or plan again")
        return cls(name, spec, tuple(kinds), tuple(metas))

    def encode(self, value: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The tensors that carry ``value`` (the sender's side)."""
        sent = []
        for leaf, kind in zip(pytree.tree_leaves(value, is_leaf=_is_size), self.kinds, strict=True):
            if kind == "tensor":
                sent.append(leaf.contiguous())  # point-to-point sends take contiguous tensors
            elif kind == "size":
                sent.append(torch.tensor(list(leaf), dtype=torch.int64, device=device))
            elif not isinstance(kind, Fixed):
                sent.append(torch.tensor(leaf, dtype=_NUMBERS[kind][1], device=device))
        return tuple(sent)

    def decode(self, tensors: Sequence[torch.Tensor]) -> Any:
        """The value ``tensors`` carry (the receiver's side)."""
        received = iter(tensors)
        leaves = []
        for kind in self.kinds:
            if isinstance(kind, Fixed):
                leaves.append(kind.value)
            elif kind == "tensor":
                leaves.append(next(received))
            elif kind == "size":
                leaves.append(torch.Size(next(received).tolist()))
            else:
                leaves.append(_NUMBERS[kind][0](next(received).item()))
        return pytree.tree_unflatten(leaves, self.spec)


def _is_size(value: Any) -> bool:
    return isinstance(value, torch.Size)


class Send(nn.Module):
    """The last op of a stage: what it sends, flattened to tensors (:meth:`Wire.encode`). On the
    last stage it gets the model's output, assembled with ``out_spec`` where the captured graph
    returns a flat list (torch.export)."""

    def __init__(self, wires: Sequence[Wire], device: torch.device, out_spec: pytree.TreeSpec | None = None):
        super().__init__()
        self.wires = list(wires)
        self.device = device
        self.out_spec = out_spec
        self.layout: Any = None
        """On a tensor-parallel stage, how its tensors cross as shards
        (:class:`autosplit.distributed.tensor_parallel.WireLayout`); None otherwise."""

    def forward(self, *values: Any) -> tuple[torch.Tensor, ...]:
        if self.out_spec is not None:
            values = (pytree.tree_unflatten(list(values[0]), self.out_spec),)
        sent = tuple(t for wire, value in zip(self.wires, values, strict=True) for t in wire.encode(value, self.device))
        return sent if self.layout is None else self.layout.to_local(sent)


class Receive(nn.Module):
    """The first op of a stage after the first: the values the received tensors carry."""

    def __init__(self, wires: Sequence[Wire]):
        super().__init__()
        self.wires = list(wires)
        self.layout: Any = None
        """On a tensor-parallel stage, how its tensors cross as shards; None otherwise."""

    def forward(self, *tensors: torch.Tensor) -> tuple[Any, ...]:
        if self.layout is not None:
            tensors = self.layout.from_local(tensors)
        values, start = [], 0
        for wire in self.wires:
            values.append(wire.decode(tensors[start:start + len(wire.metas)]))
            start += len(wire.metas)
        return tuple(values)


@dataclasses.dataclass
class StageChain:
    """A plan's stages as graph modules that pass tensors along a chain."""

    modules: list[fx.GraphModule]
    """Stage s takes what stage s − 1 sends (stage 0: the model's tensor inputs it reads, see
    ``first_inputs``) and returns the tensors it sends; the last stage returns the model's
    output, flattened by ``output``."""
    received: list[tuple[torch.Tensor, ...]]
    """Meta tensors of what each stage takes, per microbatch."""
    sent: list[tuple[torch.Tensor, ...]]
    """Meta tensors of what each stage returns, per microbatch."""
    output: Wire
    """How the last stage's tensors become the model's output."""
    flat_inputs: fx.GraphModule
    """Called like the model, returns its inputs flat: one value per input of the split graph."""
    input_values: list[Any]
    """Each flat input at capture: a meta or fake tensor (one microbatch), or a fixed value."""
    input_arguments: list[str]
    """The forward argument each flat input comes from."""
    first_inputs: list[int]
    """The positions, among the flat inputs, of what stage 0 takes."""
    reads: list[set[str]]
    """The parameters and buffers (canonical names) each stage reads."""
    homes: dict[str, int]
    """The stage that stores each parameter and buffer, as the plan says."""


def stage_chain(model: nn.Module, captured: CapturedMicrobatch, plan: Plan, device: torch.device, *,
                check_plan: bool = True) -> StageChain:
    """Build every stage of ``plan`` as a graph module on ``device`` (see the module docstring).
    ``check_plan``: as for :func:`autosplit.rewrite.split_graph`.

    Raises:
        PlanMismatchError: the plan was made for another graph.
        AutosplitError: a value that cannot be sent between ranks crosses a boundary.
    """
    traced = captured.traced
    count = len(plan.stages)
    rewritten = split_graph(model, traced, plan, [device] * count, device, captured.written_flags,
                            plan.microbatches, check_plan=check_plan)
    gm = rewritten.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    input_values = [n.meta.get("val") for n in placeholders]
    flat_inputs = _input_flattener(gm, getattr(traced.graph_module, "_in_spec", None))
    _fix_inputs(gm, placeholders)
    needs_grad = _needs_grad(gm)
    cut = cut_stages(gm, rewritten.stage_of, count)
    by_name = {n.name: n for n in gm.graph.nodes}
    wires = [[_wire(by_name[name], needs_grad) for name in cut.outputs[s]] for s in range(count - 1)]
    for s in range(1, count):  # each stage reads only what the one before it sends
        assert set(cut.inputs[s]) == set(cut.outputs[s - 1]), (s, cut.inputs[s], cut.outputs[s - 1])
    assert all(by_name[name].op == "placeholder" for name in cut.inputs[0]), cut.inputs[0]

    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    structure = output_node.args[0] if output_node.args else None
    out_spec = getattr(traced.graph_module, "_out_spec", None)
    values = _plain(fx.node.map_arg(structure, _value_of))
    output = Wire.of("the model's output", pytree.tree_unflatten(list(values), out_spec) if out_spec else values,
                     any(needs_grad.get(n, False) for n in output_node.all_input_nodes))

    modules, received, sent = [], [], []
    for s, module in enumerate(cut.stages):
        if s == 0:
            received.append(tuple(_meta_of(by_name[name].meta["val"]) for name in cut.inputs[0]))
        else:
            _receive(module, cut.inputs[s], cut.outputs[s - 1], wires[s - 1])
            received.append(tuple(m for wire in wires[s - 1] for m in wire.metas))
        if s < count - 1:
            _send(module, wires[s], device)
            sent.append(tuple(m for wire in wires[s] for m in wire.metas))
        else:
            _return_output(module, cut.outputs[s], structure, output, device, out_spec)
            sent.append(output.metas)
        module.graph.lint()
        module.recompile()
        modules.append(module)
    names = [n.name for n in placeholders]
    return StageChain(modules, received, sent, output, flat_inputs, input_values,
                      placeholder_arguments(model, traced.graph_module), [names.index(n) for n in cut.inputs[0]],
                      [_reads(model, module) for module in modules], rewritten.homes)


def stage_tensors(module: fx.GraphModule) -> list[torch.Tensor]:
    """Every tensor a stage module reads: parameters and buffers of the modules it calls, and
    tensors it fetches (weights, constants of the capture)."""
    found: dict[int, torch.Tensor] = {}
    for t in [*module.parameters(), *module.buffers()]:
        found.setdefault(id(t), t)
    for node in module.graph.nodes:
        if node.op == "get_attr":
            value = _fetch(module, node.target)
            if isinstance(value, torch.Tensor):
                found.setdefault(id(value), value)
    return list(found.values())


def shared_weights(chain: StageChain, model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The trainable parameters read on several stages (canonical name -> those stages): each
    such stage holds a copy, and the copies' gradients must be summed."""
    readers: dict[str, list[int]] = {}
    for stage, names in enumerate(chain.reads):
        for name in names:
            readers.setdefault(name, []).append(stage)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: tuple(stages) for name, stages in sorted(readers.items()) if len(stages) > 1 and name in trainable}


def _reads(model: nn.Module, module: fx.GraphModule) -> set[str]:
    canonical: dict[int, str] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        canonical.setdefault(id(t), name)
    return {canonical[id(t)] for t in stage_tensors(module) if id(t) in canonical}


def _input_flattener(gm: fx.GraphModule, in_spec: pytree.TreeSpec | None) -> fx.GraphModule:
    """A module with the split graph's signature that returns its inputs flat: the graph's own
    code binds a call's arguments (defaults, keywords, the input tree of an exported graph)."""
    graph = fx.Graph()
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        info = codegen.pytree_info
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(info.orig_args, info.in_spec, None))
    inputs = [graph.node_copy(n) for n in gm.graph.nodes if n.op == "placeholder"]
    graph.output(tuple(inputs))
    flattener = fx.GraphModule(nn.Module(), graph, class_name="FlatInputs")
    if in_spec is not None:
        flattener._in_spec = in_spec
    return flattener


def _fix_inputs(gm: fx.GraphModule, placeholders: list[fx.Node]) -> None:
    """Replace every input that was not a tensor at capture by its value then: both tracers fix
    such inputs (fx asserts the value, export bakes it in), and only tensors cross to stage 0."""
    for node in placeholders:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) or "val" not in node.meta:
            continue
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)


def _needs_grad(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """Whether each node's value may depend on a trainable weight. Over-approximated (a value
    behind ``detach`` counts), which costs a gradient of zeros; an under-approximation would
    drop gradients, so there is none: inputs are the only nodes taken as constant."""
    needs: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            needs[node] = _trainable(_fetch(gm, node.target))
        elif node.op == "call_module":
            needs[node] = _trainable(gm.get_submodule(node.target)) or any(needs.get(n, False)
                                                                           for n in node.all_input_nodes)
        elif node.op in ("call_function", "call_method"):
            needs[node] = any(needs.get(n, False) for n in node.all_input_nodes)
        else:
            needs[node] = False
    return needs


def _trainable(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, nn.Module):
        return any(p.requires_grad for p in value.parameters())
    return False


def _wire(node: fx.Node, needs_grad: dict[fx.Node, bool]) -> Wire:
    """The wire of the value ``node`` sends, named after the node that makes it."""
    return Wire.of(getattr(_source(node), "name", node.name), _value_of(node), needs_grad[node])


def _source(node: fx.Node) -> Any:
    """The node that makes a value, looking through the moves that relay it (``transfer``,
    ``deliver``); a constant where an input fixed at capture took the place of a node."""
    while isinstance(node, fx.Node) and "val" not in node.meta and node.target in (transfer, deliver):
        node = node.args[0]
    return node


def _value_of(node: Any) -> Any:
    """A node's value at capture (its source's, for a move)."""
    source = _source(node)
    if not isinstance(source, fx.Node):
        return source
    assert "val" in source.meta, f"{source.name} has no value recorded at capture"
    return source.meta["val"]


def _meta_of(value: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(value.shape), dtype=value.dtype, device="meta")


def _receive(module: fx.GraphModule, names: list[str], order: list[str], wires: list[Wire]) -> None:
    """Make ``module`` take the tensors of ``wires`` (in the sender's ``order``) in place of its
    inputs ``names``, decoding them with a :class:`Receive` module."""
    graph = module.graph
    old = dict(zip(names, [n for n in graph.nodes if n.op == "placeholder"], strict=True))
    attribute = _free_attribute(module, "receive")
    module.add_module(attribute, Receive(wires))
    taken = {n.target for n in old.values()}
    first = next(iter(graph.nodes))
    with graph.inserting_before(first):
        tensors = []
        for wire in wires:
            for i in range(len(wire.metas)):
                tensors.append(graph.placeholder(_fresh(wire.name if len(wire.metas) == 1 else f"{wire.name}_{i}",
                                                        taken)))
        decoded = graph.call_module(attribute, tuple(tensors))
        for k, name in enumerate(order):
            value = graph.call_function(operator.getitem, (decoded, k))
            old[name].replace_all_uses_with(value)
    for node in old.values():
        graph.erase_node(node)


def _send(module: fx.GraphModule, wires: list[Wire], device: torch.device) -> None:
    """Make ``module`` return the tensors of ``wires`` (its outputs, in order)."""
    graph = module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    attribute = _free_attribute(module, "send")
    module.add_module(attribute, Send(wires, device))
    with graph.inserting_before(output):
        sent = graph.call_module(attribute, tuple(output.args[0]))
    output.args = (sent,)


def _return_output(module: fx.GraphModule, names: list[str], structure: Any, wire: Wire, device: torch.device,
                   out_spec: pytree.TreeSpec | None) -> None:
    """Make the last stage return the model's output (``structure`` over the split graph's nodes),
    flattened by ``wire``."""
    graph = module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    local = dict(zip(names, output.args[0], strict=True))
    attribute = _free_attribute(module, "send")
    module.add_module(attribute, Send([wire], device, out_spec))
    with graph.inserting_before(output):
        sent = graph.call_module(attribute, (fx.node.map_arg(structure, lambda n: local[n.name]),))
    output.args = (sent,)


def _fresh(name: str, taken: set[str]) -> str:
    """``name``, or ``name_k`` for the first k that no other input of the stage uses."""
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


def _free_attribute(module: nn.Module, name: str) -> str:
    """``name``, or ``name_k`` for the first k that is not an attribute of ``module`` yet."""
    candidate, k = name, 0
    while hasattr(module, candidate):
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def _plain(value: Any) -> Any:
    """``value`` with fx's immutable containers made the dicts and lists the graph's code builds."""
    if type(value) in (dict, immutable_dict):
        return {k: _plain(v) for k, v in value.items()}
    if type(value) in (list, immutable_list):
        return [_plain(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    return value


def _fetch(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value
