"""Microbatch pipelining in one process: the stages of a split graph run in a GPipe wavefront.

    runner = Pipeline.from_graph(split_graph, stage_of, devices, microbatches=4)

The split graph is cut into one graph module per stage. A batch is cut into equal microbatches
along each input's batch dimension: declared (``batch_dims``), else dimension 0 where that is
plainly the batch; an input that could hold the batch elsewhere is refused until declared
(:func:`resolve_batch_dims`). At clock tick k stage s runs microbatch k − s, so while stage 1 works on
microbatch 0, stage 0 already works on microbatch 1. On CUDA every device gets its own stream:
kernels are queued without waiting, copies between devices order the two streams (the copy
kernel waits for the sender's stream and the receiver's stream waits for the copy), and the
autograd engine runs each device's backward on its own thread, on the stream its forward used,
so backward overlaps too. On CPU devices the stages run one after the other, with the same
results. The outputs of the microbatches are joined along each one's batch dimension (found at
capture, :attr:`Pipeline.join_dims`), so loss and gradients equal the unsplit batch's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Collection, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from autosplit.errors import MicrobatchError


_COMPUTE = ("call_function", "call_method", "call_module")


def batch_size(values: Sequence[Any], dims: Sequence[int | None] | None = None) -> int | None:
    """The batch size of flat inputs: the size along its batch dimension of the first value that
    is cut (``dims``, one per value), or without ``dims`` dimension 0 of the first tensor."""
    if dims is None:
        return next((v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    for value, dim in zip(values, dims):
        tensors = _tensors(value) if dim is not None else []
        if tensors:
            return tensors[0].shape[dim]
    return None


def resolve_batch_dims(arguments: Mapping[str, Any], declared: Mapping[str, int | None] | None = None, *,
                       microbatches: int) -> dict[str, int | None]:
    """The dimension that holds the batch in each input (None: passed whole to every microbatch).

    ``arguments`` are a call's inputs by forward-argument name, in signature order; ``declared``
    gives some of them their batch dimension or None (``batch_dims``); a dimension applies to
    every tensor in the argument, containers included. Undeclared inputs follow the common case,
    batch first: the batch is dimension 0 of the first tensor (unless a declared input fixes it),
    and a tensor is cut along dimension 0 when that is its only dimension of the batch's size,
    passed whole when it has none. A tensor that has the batch's size elsewhere, e.g. (T, B, H)
    with T ≠ B, or (B, B), could be either, so it is refused until declared.

    Raises:
        ValueError, TypeError: ``declared`` names an unknown input or a dimension it lacks.
        MicrobatchError: an input is ambiguous, or the batch cannot be cut into ``microbatches``.
    """
    declared = dict(declared or {})
    check_batch_dims(declared, list(arguments))
    dims: dict[str, int | None] = {name: None for name in arguments}
    for name, dim in declared.items():
        tensors = _tensors(arguments[name])
        if dim is None or not tensors:
            continue
        low = min(t.dim() for t in tensors)
        if not -low <= dim < low:
            shape = tuple(next(t for t in tensors if t.dim() == low).shape)
            raise ValueError(f"batch_dims={{{name!r}: {dim}}} is out of range for {name!r} of shape {shape}: "
                             f"give a dimension in [{-low}, {low - 1}], or None to pass it whole")
        dims[name] = dim % low
    source = next(((n, d) for n, d in dims.items() if d is not None), None)
    if source is None:
        first = next((n for n in arguments if n not in declared
                      and any(t.dim() > 0 for t in _tensors(arguments[n]))), None)
        if first is None:
            raise MicrobatchError(f"microbatches={microbatches} needs a tensor input with a batch dimension; this "
                                  "call has none: use microbatches=1, or declare one with batch_dims={'x': 0}")
        source = (first, 0)
    name, dim = source
    batch = next(t for t in _tensors(arguments[name]) if t.dim() > 0).shape[dim]
    for name, value in arguments.items():
        if name not in declared:
            dims[name] = _inferred_dim(name, value, batch, source)
    for name, dim in dims.items():
        for t in _tensors(arguments[name]) if dim is not None else []:
            if t.shape[dim] != batch:
                raise MicrobatchError(
                    f"input {name!r} has shape {tuple(t.shape)}: {t.shape[dim]} along its batch dimension {dim}, but "
                    f"the batch is {batch} ({source[0]!r} dimension {source[1]}); pass inputs with one batch size, "
                    f"or batch_dims={{{name!r}: None}} to pass it whole")
    if batch % microbatches:
        raise MicrobatchError(f"a batch of {batch} cannot be cut into {microbatches} equal microbatches: "
                              f"pass a batch that is a multiple of {microbatches}, or change microbatches")
    return dims


def check_batch_dims(declared: Mapping[str, Any], names: Sequence[str]) -> None:
    """Refuse ``batch_dims`` entries that name no input of ``names`` or are not an int or None."""
    unknown = [name for name in declared if name not in names]
    if unknown:
        raise ValueError(f"batch_dims names {unknown}, which the forward does not take: its inputs are "
                         f"{', '.join(names)}; key batch_dims by those names, e.g. {{{names[0]!r}: 1}}" if names
                         else f"batch_dims names {unknown}, but the forward takes no inputs")
    for name, dim in declared.items():
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool)):
            raise TypeError(f"batch_dims[{name!r}] must be the int dimension that holds the batch, or None to "
                            f"pass the input whole; got {dim!r}")


def _inferred_dim(name: str, value: Any, batch: int, source: tuple[str, int]) -> int | None:
    """Dimension 0 where a tensor's batch-sized dimension is only dimension 0, None where it has
    none; an input that has the batch's size anywhere else is refused (see resolve_batch_dims)."""
    found: set[int | None] = set()
    for t in _tensors(value):
        sized = [d for d in range(t.dim()) if t.shape[d] == batch]
        if sized not in ([], [0]):
            raise MicrobatchError(
                f"input {name!r} has shape {tuple(t.shape)}, and the batch is {batch} ({source[0]!r} dimension "
                f"{source[1]}): it cannot be told which of its dimensions {sized} holds the batch, if any. Declare "
                f"it: batch_dims={{{name!r}: {sized[-1]}}} cuts it along dimension {sized[-1]}"
                f"{f' (any of {sized} may be given)' if len(sized) > 1 else ''}, "
                f"batch_dims={{{name!r}: None}} passes it whole to every microbatch")
        found.add(0 if sized else None)
    if len(found) > 1:
        raise MicrobatchError(f"input {name!r} holds tensors with and without the batch ({batch}) in dimension 0, "
                              "and a batch dimension applies to every tensor of an input: pass them as separate "
                              f"inputs, or batch_dims={{{name!r}: None}} to pass it whole to every microbatch")
    return found.pop() if found else None


def cut_microbatches(values: Sequence[Any], microbatches: int, dims: Sequence[int | None] | None = None,
                     names: Sequence[str] | None = None) -> list[list[Any]]:
    """Cut each value into ``microbatches`` equal chunks along its batch dimension (``dims``, one
    per value; every tensor of a container along the same one); a value whose dimension is None
    goes to each microbatch whole. Without ``dims`` they are resolved by :func:`resolve_batch_dims`
    from the values themselves, named by ``names`` (default ``input 0``, ``input 1``...)."""
    if dims is None:
        names = list(names) if names is not None else [f"input {i}" for i in range(len(values))]
        resolved = resolve_batch_dims(dict(zip(names, values)), microbatches=microbatches)
        dims = [resolved[name] for name in names]
    batch = batch_size(values, dims)
    if batch is None:
        raise MicrobatchError(f"microbatches={microbatches} needs a tensor input with a batch dimension; this "
                              "call has none: use microbatches=1")
    if batch % microbatches:
        raise MicrobatchError(f"a batch of {batch} cannot be cut into {microbatches} equal microbatches: "
                              f"pass a batch that is a multiple of {microbatches}, or change microbatches")
    columns = [_cut(v, d, microbatches) if d is not None else [v] * microbatches for v, d in zip(values, dims)]
    return [list(row) for row in zip(*columns)] if columns else [[] for _ in range(microbatches)]


def _cut(value: Any, dim: int, microbatches: int) -> list[Any]:
    """``value`` in ``microbatches`` chunks along ``dim``: every tensor in it chunked, the rest shared."""
    leaves, structure = pytree.tree_flatten(value)
    columns = [leaf.chunk(microbatches, dim) if isinstance(leaf, torch.Tensor) and leaf.dim() > 0
               else [leaf] * microbatches for leaf in leaves]
    return [pytree.tree_unflatten(list(row), structure) for row in zip(*columns)] if leaves else [value] * microbatches


def _tensors(value: Any) -> list[Any]:
    """The tensors in ``value``, containers included, that have dimensions."""
    return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor) and x.dim() > 0]


class Pipeline(nn.Module):
    """Runs per-stage graph modules over microbatches in a wavefront; called with the split
    graph's flat inputs, returns its flat outputs (the values the output node reads)."""

    def __init__(self, stages: Sequence[fx.GraphModule], inputs: Sequence[Sequence[str]],
                 outputs: Sequence[Sequence[str]], placeholders: Sequence[str], results: Sequence[str],
                 devices: Sequence[torch.device], microbatches: int, arguments: Sequence[str] | None = None,
                 batch_dims: Mapping[str, int | None] | None = None, prologue: fx.GraphModule | None = None,
                 shared: Sequence[str] = ()):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.prologue = prologue
        """Runs once per call before the microbatches: the weights sent to the other stages that
        read them, which every microbatch then reuses (their gradients accumulate, and flow
        back across the link once)."""
        self.shared = list(shared)
        self.inputs = [list(names) for names in inputs]
        self.outputs = [list(names) for names in outputs]
        self.placeholders = list(placeholders)
        self.results = list(results)
        self.devices = list(devices)
        self.microbatches = microbatches
        # The forward argument each placeholder comes from (exported: one per tensor of a container).
        self.arguments = list(arguments) if arguments is not None else list(self.placeholders)
        # The batch dimension of each argument, or None to pass it whole; arguments missing here are
        # resolved by resolve_batch_dims at the first call and kept for every later one.
        self.batch_dims = dict(batch_dims or {})
        last_use: dict[str, int] = {}
        for s, names in enumerate(self.inputs):
            for name in names:
                last_use[name] = s
        kept = set(self.results)  # results stay until the microbatches are joined
        self.release = [[n for n, s in last_use.items() if s == stage and n not in kept] for stage in range(len(stages))]
        self._streams: dict[torch.device, Any] = {}
        self.labels: dict[str, str] = {}
        """How errors name each result: its place in the model's output (``output[1]``,
        ``output['loss']``), not the graph node that makes it."""
        self.join_dims: dict[str, tuple[int | str, ...]] = {}
        """The batch dimension of each tensor in each result (:func:`tensor_leaves` order), by
        result name, as the capture found it; a str says why a tensor has none. Results not
        here join along dimension 0 where only that dimension has the microbatch's size."""

    @classmethod
    def from_graph(cls, gm: fx.GraphModule, stage_of: dict[fx.Node, int], devices: Sequence[torch.device],
                   microbatches: int, arguments: Sequence[str] | None = None,
                   batch_dims: Mapping[str, int | None] | None = None, once: Collection[fx.Node] = ()) -> "Pipeline":
        """Cut ``gm`` into one graph module per stage (:func:`cut_stages`). ``arguments`` and
        ``batch_dims``: see the attributes of the same names. The nodes in ``once`` (which read
        weights only) run once per call, in a prologue whose results every microbatch reads."""
        cut = cut_stages(gm, stage_of, len(devices), once)
        results = set(cut.results)
        weights = [n.target for n in gm.graph.nodes if n.name in results and n.op == "get_attr"]
        if weights:
            raise MicrobatchError(f"the model returns its own weights ({', '.join(weights)}), which are not "
                                  "per microbatch: use microbatches=1")
        return cls(cut.stages, cut.inputs, cut.outputs, cut.placeholders, cut.results, devices, microbatches,
                   arguments, batch_dims, cut.prologue, cut.shared)

    def forward(self, *flat: Any) -> tuple[Any, ...]:
        dims = self._dims(flat)
        envs = [dict(zip(self.placeholders, chunk)) for chunk in cut_microbatches(flat, self.microbatches, dims)]
        count, m = len(self.stages), self.microbatches
        chunk = batch_size(flat, dims) // m
        with self._on_streams(flat) as callers:
            if self.prologue is not None:
                shared = dict(zip(self.shared, self.prologue()))
                for env in envs:
                    env.update(shared)
            for tick in range(m + count - 1):
                for s in range(count):
                    i = tick - s
                    if not 0 <= i < m:
                        continue
                    env = envs[i]
                    values = self.stages[s](*[env[name] for name in self.inputs[s]])
                    env.update(zip(self.outputs[s], values))
                    for name in self.release[s]:
                        env.pop(name, None)
            joined = tuple(_join(self.labels.get(name, name), [env[name] for env in envs], chunk,
                                 self.join_dims.get(name)) for name in self.results)
            for value in joined:  # made on a pipeline stream, used next on the caller's
                if isinstance(value, torch.Tensor) and value.device in callers:
                    value.record_stream(callers[value.device])
        return joined

    def _dims(self, flat: Sequence[Any]) -> list[int | None]:
        """The batch dimension of each placeholder; undeclared arguments resolved once, at the first call."""
        if any(name not in self.batch_dims for name in self.arguments):
            grouped: dict[str, list[Any]] = {}
            for name, value in zip(self.arguments, flat):
                grouped.setdefault(name, []).append(value)
            declared = {name: dim for name, dim in self.batch_dims.items() if name in grouped}
            self.batch_dims = resolve_batch_dims(grouped, declared, microbatches=self.microbatches)
        return [self.batch_dims[name] for name in self.arguments]

    @contextlib.contextmanager
    def _on_streams(self, flat: Sequence[Any]) -> Iterator[dict[torch.device, Any]]:
        """Make each CUDA device's current stream its pipeline stream for the duration, ordered
        after the caller's streams on entry, and the caller's streams after them on exit.
        Yields the caller's stream of every CUDA device (none on CPU)."""
        cuda = _unique(d for d in self.devices if d.type == "cuda")
        if not cuda:
            yield {}
            return
        streams = {}
        for device in cuda:
            device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            streams[device] = self._streams[device]
        callers = {device: torch.cuda.current_stream(device) for device in streams}
        for device, stream in streams.items():
            stream.wait_stream(callers[device])
        for value in flat:  # inputs made on the caller's stream are read on the pipeline's
            if isinstance(value, torch.Tensor) and value.is_cuda and value.device in streams:
                value.record_stream(streams[value.device])
        try:
            with contextlib.ExitStack() as stack:
                for stream in streams.values():
                    stack.enter_context(torch.cuda.stream(stream))
                yield callers
        finally:
            for device, stream in streams.items():
                callers[device].wait_stream(stream)


@dataclasses.dataclass
class StageGraphs:
    """A split graph cut into one graph module per stage."""

    stages: list[fx.GraphModule]
    """Stage s takes the values named ``inputs[s]`` and returns those named ``outputs[s]``."""
    inputs: list[list[str]]
    """The values each stage reads from the graph's inputs, from ``once`` nodes or from other
    stages, in the order of its placeholders (by node name in the split graph)."""
    outputs: list[list[str]]
    """The values each stage computes that a later stage reads or the graph returns, in graph order."""
    placeholders: list[str]
    """The split graph's inputs, in order."""
    results: list[str]
    """The values the graph returns (each once, in the order the output node reads them)."""
    prologue: fx.GraphModule | None
    """Computes the ``once`` nodes (weights sent to other stages), or None."""
    shared: list[str]
    """The values the prologue returns, in order."""


def cut_stages(gm: fx.GraphModule, stage_of: dict[fx.Node, int], count: int,
               once: Collection[fx.Node] = ()) -> StageGraphs:
    """Cut ``gm`` into one graph module per stage. ``stage_of`` gives the stage of every node
    that computes (placeholders, weights and the output node need none); a stage's graph takes
    the values it reads from the inputs or from earlier stages and returns those read later,
    and fetches each weight it reads itself. The nodes in ``once`` go to a prologue instead,
    whose results the stages read as inputs."""
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    results = _unique(n for n in output.all_input_nodes)
    readers: dict[fx.Node, set[int]] = {}
    for node in graph.nodes:
        if node.op in _COMPUTE:
            for source in node.all_input_nodes:
                readers.setdefault(source, set()).add(stage_of[node])
    once = set(once)
    prologue = None
    if once:
        sub, env = fx.Graph(), {}
        for node in (n for n in graph.nodes if n in once):
            env[node] = sub.node_copy(node, lambda n: env.setdefault(n, sub.node_copy(n)))
        sub.output(tuple(env[n] for n in graph.nodes if n in once))
        prologue = fx.GraphModule(gm, sub, class_name="SharedWeights")
    stages, inputs, outputs = [], [], []
    for s in range(count):
        sub = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        members = [n for n in graph.nodes if n.op in _COMPUTE and stage_of[n] == s and n not in once]
        reads = _unique(src for n in members for src in n.all_input_nodes
                        if src.op != "get_attr" and (src.op == "placeholder" or src in once or stage_of[src] != s))
        for source in reads:
            env[source] = sub.placeholder(source.name)
            env[source].meta = dict(source.meta)

        def local(node: fx.Node) -> fx.Node:
            if node not in env:  # a weight or buffer: each stage fetches its own
                env[node] = sub.node_copy(node)
            return env[node]

        for node in members:
            env[node] = sub.node_copy(node, local)
        sends = [n for n in members if n in results or any(r > s for r in readers.get(n, ()))]
        sub.output(tuple(env[n] for n in sends))
        sub.lint()
        stages.append(fx.GraphModule(gm, sub, class_name=f"Stage{s}"))
        inputs.append([n.name for n in reads])
        outputs.append([n.name for n in sends])
    return StageGraphs(stages, inputs, outputs, [n.name for n in graph.nodes if n.op == "placeholder"],
                       [n.name for n in results], prologue, [n.name for n in graph.nodes if n in once])


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """The tensors in an output value, in the order :func:`_join` visits them: containers
    (tuples, dicts, model-output classes) leaf by leaf, dataclasses field by field."""
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and type(value) not in pytree.SUPPORTED_NODES:
        return [t for f in dataclasses.fields(value) if f.init for t in tensor_leaves(getattr(value, f.name))]
    leaves = pytree.tree_leaves(value)
    if len(leaves) == 1 and leaves[0] is value:
        return []
    return [t for leaf in leaves for t in tensor_leaves(leaf)]


def _join(name: str, values: list[Any], chunk: int, dims: Sequence[int | str] | None = None) -> Any:
    """Join one output's values over the microbatches: each tensor along its batch dimension,
    containers (tuples, dicts, model-output classes, dataclasses) leaf by leaf; other values must
    agree. ``dims`` gives each tensor's batch dimension, in :func:`tensor_leaves` order, as the
    capture found it (or why it has none, a str); without it a tensor joins along dimension 0
    when only that dimension has the microbatch's size."""
    return _join_value(name, values, chunk, iter(dims) if dims is not None else None)


def _join_value(name: str, values: list[Any], chunk: int, dims: Iterator[int | str] | None) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        dim = next(dims, None) if dims is not None else None
        if isinstance(dim, str):
            raise MicrobatchError(f"{_called(name)} {dim}")
        if dim is None:
            dim = _batch_dim_by_size(name, values, chunk)
        elif any(v.dim() <= dim or v.shape[dim] != chunk for v in values):
            raise MicrobatchError(
                f"{_called(name)} has shape {tuple(first.shape)} per microbatch of {chunk}, but its batch "
                f"dimension at capture was {dim}: its shape depends on the batch in a way the capture did not "
                "show; use microbatches=1")
        return torch.cat(values, dim=dim)
    if dataclasses.is_dataclass(first) and not isinstance(first, type) and type(first) not in pytree.SUPPORTED_NODES:
        return dataclasses.replace(first, **{
            f.name: _join_value(f"{name}.{f.name}", [getattr(v, f.name) for v in values], chunk, dims)
            for f in dataclasses.fields(first) if f.init})
    leaves, structure = pytree.tree_flatten(first)
    if not (len(leaves) == 1 and leaves[0] is first):
        columns = zip(*(pytree.tree_leaves(v) for v in values))
        return pytree.tree_unflatten([_join_value(name, list(column), chunk, dims) for column in columns], structure)
    if any(v is not first and v != first for v in values[1:]):
        raise MicrobatchError(f"{_called(name)} differs between microbatches and is not a tensor: "
                              "it cannot be joined; use microbatches=1")
    return first


SCALAR_OUTPUT = ("is a scalar (e.g. a loss computed inside forward): it cannot be joined from microbatches without "
                 "changing its value. Return the per-sample outputs and compute the loss outside the model, or use "
                 "microbatches=1")


def _batch_dim_by_size(name: str, values: list[torch.Tensor], chunk: int) -> int:
    """Dimension 0, for an output whose batch dimension the capture did not give, when only that
    dimension has the microbatch's size in every microbatch; anything else is refused."""
    first = values[0]
    if first.dim() == 0:
        raise MicrobatchError(f"{_called(name)} {SCALAR_OUTPUT}")
    sized = sorted(set.intersection(*({d for d in range(v.dim()) if v.shape[d] == chunk} for v in values)))
    if sized == [0]:
        return 0
    if not sized or sized[0] != 0:
        raise MicrobatchError(
            f"{_called(name)} has shape {tuple(first.shape)} per microbatch of {chunk}: its dimension 0 "
            "is not the batch, so it cannot be joined; return batch-first outputs, or use microbatches=1")
    raise MicrobatchError(
        f"{_called(name)} has shape {tuple(first.shape)} per microbatch of {chunk}: its dimensions {sized} all "
        "have the microbatch's size, and the capture could not tell which one holds the batch: use "
        "microbatches=1, or return the output with the batch as its only dimension of that size")


def _called(name: str) -> str:
    """How an error names an output: by its place in the model's output where known."""
    return f"the model's {name}" if name.startswith("output") else f"the output {name}"


def _unique(items: Any) -> list[Any]:
    return list(dict.fromkeys(items))
