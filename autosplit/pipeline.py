"""Microbatch pipelining in one process: the stages of a split graph run in a GPipe wavefront.

    runner = Pipeline.from_graph(split_graph, stage_of, devices, microbatches=4)

The split graph is cut into one graph module per stage. A batch is cut into equal microbatches
along dimension 0; at clock tick k stage s runs microbatch k − s, so while stage 1 works on
microbatch 0, stage 0 already works on microbatch 1. On CUDA every device gets its own stream:
kernels are queued without waiting, copies between devices order the two streams (the copy
kernel waits for the sender's stream and the receiver's stream waits for the copy), and the
autograd engine runs each device's backward on its own thread, on the stream its forward used,
so backward overlaps too. On CPU devices the stages run one after the other, with the same
results. The outputs of the microbatches are joined along dimension 0, so loss and gradients
equal the unsplit batch's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Collection, Iterator, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from autosplit.errors import MicrobatchError


_COMPUTE = ("call_function", "call_method", "call_module")


def batch_size(values: Sequence[Any]) -> int | None:
    """The batch size of flat inputs: dimension 0 of the first tensor that has dimensions."""
    return next((v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0), None)


def cut_microbatches(values: Sequence[Any], microbatches: int) -> list[list[Any]]:
    """Cut every tensor whose dimension 0 is the batch into ``microbatches`` equal chunks; every
    other value (flags, tensors without the batch dimension) goes to each microbatch whole."""
    batch = batch_size(values)
    if batch is None:
        raise MicrobatchError(f"microbatches={microbatches} needs a tensor input with a batch dimension "
                              "(dimension 0); this call has none: use microbatches=1")
    if batch % microbatches:
        raise MicrobatchError(f"a batch of {batch} cannot be cut into {microbatches} equal microbatches: "
                              f"pass a batch that is a multiple of {microbatches}, or change microbatches")
    columns = [v.chunk(microbatches) if _batched(v, batch) else [v] * microbatches for v in values]
    return [list(row) for row in zip(*columns)] if columns else [[] for _ in range(microbatches)]


def _batched(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


class Pipeline(nn.Module):
    """Runs per-stage graph modules over microbatches in a wavefront; called with the split
    graph's flat inputs, returns its flat outputs (the values the output node reads)."""

    def __init__(self, stages: Sequence[fx.GraphModule], inputs: Sequence[Sequence[str]],
                 outputs: Sequence[Sequence[str]], placeholders: Sequence[str], results: Sequence[str],
                 devices: Sequence[torch.device], microbatches: int, prologue: fx.GraphModule | None = None,
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
        last_use: dict[str, int] = {}
        for s, names in enumerate(self.inputs):
            for name in names:
                last_use[name] = s
        kept = set(self.results)  # results stay until the microbatches are joined
        self.release = [[n for n, s in last_use.items() if s == stage and n not in kept] for stage in range(len(stages))]
        self._streams: dict[torch.device, Any] = {}

    @classmethod
    def from_graph(cls, gm: fx.GraphModule, stage_of: dict[fx.Node, int], devices: Sequence[torch.device],
                   microbatches: int, once: Collection[fx.Node] = ()) -> "Pipeline":
        """Cut ``gm`` into one graph module per stage. ``stage_of`` gives the stage of every node
        that computes (placeholders, weights and the output node need none); a stage's graph takes
        the values it reads from the inputs or from earlier stages and returns those read later.
        The nodes in ``once`` (which read weights only) run once per call, in a prologue whose
        results every microbatch reads."""
        graph = gm.graph
        count = len(devices)
        output = next(n for n in graph.nodes if n.op == "output")
        results = _unique(n for n in output.all_input_nodes)
        weights = [n.target for n in results if n.op == "get_attr"]
        if weights:
            raise MicrobatchError(f"the model returns its own weights ({', '.join(weights)}), which are not "
                                  "per microbatch: use microbatches=1")
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
        placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
        return cls(stages, inputs, outputs, placeholders, [n.name for n in results], devices, microbatches,
                   prologue, [n.name for n in graph.nodes if n in once])

    def forward(self, *flat: Any) -> tuple[Any, ...]:
        envs = [dict(zip(self.placeholders, chunk)) for chunk in cut_microbatches(flat, self.microbatches)]
        count, m = len(self.stages), self.microbatches
        chunk = batch_size(flat) // m
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
            joined = tuple(_join(name, [env[name] for env in envs], chunk) for name in self.results)
            for value in joined:  # made on a pipeline stream, used next on the caller's
                if isinstance(value, torch.Tensor) and value.device in callers:
                    value.record_stream(callers[value.device])
        return joined

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


def _join(name: str, values: list[Any], chunk: int) -> Any:
    """Join one output's values over the microbatches: tensors along dimension 0, containers
    (tuples, dicts, model-output classes, dataclasses) leaf by leaf; other values must agree."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            raise MicrobatchError(
                f"the model returns a scalar ({name!r}, e.g. a loss computed inside forward): it cannot be "
                "joined from microbatches without changing its value. Return the per-sample outputs and compute "
                "the loss outside the model, or use microbatches=1")
        if any(v.dim() == 0 or v.shape[0] != chunk for v in values):
            raise MicrobatchError(
                f"the output {name!r} has shape {tuple(first.shape)} per microbatch of {chunk}: its dimension 0 "
                "is not the batch, so it cannot be joined; return batch-first outputs, or use microbatches=1")
        return torch.cat(values, dim=0)
    if dataclasses.is_dataclass(first) and not isinstance(first, type) and type(first) not in pytree.SUPPORTED_NODES:
        return dataclasses.replace(first, **{
            f.name: _join(f"{name}.{f.name}", [getattr(v, f.name) for v in values], chunk)
            for f in dataclasses.fields(first) if f.init})
    leaves, structure = pytree.tree_flatten(first)
    if not (len(leaves) == 1 and leaves[0] is first):
        columns = zip(*(pytree.tree_leaves(v) for v in values))
        return pytree.tree_unflatten([_join(name, list(column), chunk) for column in columns], structure)
    if any(v is not first and v != first for v in values[1:]):
        raise MicrobatchError(f"the output {name!r} differs between microbatches and is not a tensor: "
                              "it cannot be joined; use microbatches=1")
    return first


def _unique(items: Any) -> list[Any]:
    return list(dict.fromkeys(items))
