"""The chain: the ops in one topological order, with the prefix sums every interval model reads.

    chain = build_chain(graph, graph.coarsen(), costs, traced.parameters, times, options, fastest_link(cluster))

Position k is the cut between op k − 1 and op k; a stage [i, j) costs differences of prefix sums
(``Chain.time_s``, ``state_bytes``, ...) and what crosses cut k is ``cross_bytes[k]``. The blocks'
ops follow each other; a weight sits right before its first reader, and the positions no cut may
take (between a weight and its reader, inside a no-split module, from a buffer's first access to
its last in-place write) are ``Chain.forbidden``.

Values computed from the model inputs alone (``replicable``) are rebuilt on every stage that
needs them, but those cheaper to receive (``_cheaper_to_send``): they stand first in the chain
with no time of their own, and each stage pays for the groups its ops need
(``_rebuild_groups``). The values that travel along the pipeline, with their readers, are
``travelling_readers``; ``link_load`` is what one of them puts on a link.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from autosplit.errors import ConfigError
from autosplit.graph import INPUT, OUTPUT, OpGraph, draws_random, writes_in_place
from autosplit.solver.options import SolverOptions, _state_bytes_per_param
from cost_models import Link, OpCost
from cost_models.memory import OpsMemory


@dataclass
class Chain:
    """Ops in a topological order with everything the interval formulations need, as arrays.

    Position k is the cut between op k−1 and op k (0 and n are the ends).
    """

    ops: list[str]
    """fx node names of the compute and weight ops, in chain order."""
    time_s: dict[str, np.ndarray]
    """Prefix sums of op time per microbatch, by device type: ``time_s[t][k]`` = ops < k."""
    state_bytes: np.ndarray
    """Prefix sums of the per-parameter training state (or inference weights) first used."""
    param_count: np.ndarray
    """Prefix sums of the parameters first used."""
    activation_bytes: np.ndarray
    """Prefix sums of saved-for-backward bytes per microbatch (0 for inference)."""
    cross_bytes: np.ndarray
    """Bytes crossing each cut position per microbatch, both ways (``link_load``; length n + 1)."""
    cross_count: np.ndarray
    """Transfers crossing each cut position per microbatch, both ways (each pays the link latency)."""
    pins: np.ndarray
    """Stage every op is pinned to, −1 for none."""
    block_starts: list[int]
    """Positions where a block starts (always valid cut positions)."""
    block_names: list[str]
    forbidden: set[int]
    """Cut positions inside a no-split module."""
    replicated: dict[str, tuple[str, ...]]
    """Values computed from the model inputs alone → those inputs; recomputed where read."""
    no_gradient: frozenset[str] = frozenset()
    """Values no gradient flows back to: the model inputs and what is computed from them alone."""
    rebuilt: frozenset[str] = frozenset()
    """The replicated values other ops need (see ``_rebuilt``): first in the chain, timed only
    through the rebuild groups, and computed on every stage that needs them."""
    rebuild_time_s: dict[str, np.ndarray] = field(default_factory=dict)
    """Per device type, seconds per microbatch to rebuild each group of replicated values on a
    stage that needs them (the groups' ops have no time of their own in ``time_s``)."""
    rebuild_needers: list[np.ndarray] = field(default_factory=list)
    """Per group, the positions of the ops that need it: a stage holding one of them rebuilds it."""
    rebuild_next: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), dtype=np.int64))
    """Per group and position i, the first position ≥ i of an op that needs it (n if none)."""
    weights: Mapping[str, Any] = field(default_factory=dict)
    """Every parameter and buffer by canonical name (``TensorInfo``: bytes, dtype, requires_grad)."""
    memory: OpsMemory | None = None
    """The ops' memory (``OpsMemory``): what a stage of them holds. Without it, each op keeps its
    own ``activation_bytes`` step for backward, and nothing else."""

    @property
    def n(self) -> int:
        return len(self.ops)


def build_chain(graph: OpGraph, blocks: OpGraph, costs: Mapping[str, OpCost], parameters: Mapping[str, Any],
                times_by_type: Mapping[str, Mapping[str, Any]], options: SolverOptions,
                link: Link | None = None, buffers: Mapping[str, Any] | None = None) -> Chain:
    """Lay the blocks' ops (of the op-level ``graph``) out in one topological order and compute
    the prefix sums. ``link`` (the fastest between the devices) decides which values computed
    from the inputs alone travel instead of being rebuilt (``_cheaper_to_send``); without it
    all are rebuilt."""
    train = options.mode == "train"
    infos = blocks.infos
    members = [(block, list(blocks[block]["members"])) for block in blocks.order
               if blocks[block]["kind"] not in (INPUT, OUTPUT)]
    # Values computed from the model inputs alone (masks, position ids, `replicable`) are rebuilt
    # by every stage that needs them, but those cheaper to send (`_cheaper_to_send`). The rebuilt
    # ones go first, glued together, with no time of their own: each stage pays for the groups it
    # needs (`_rebuild_groups`).
    replicated = replicable(graph)
    no_gradient = frozenset(replicated) | {op for op in graph.order if graph.infos[op].op == "placeholder"}
    in_chain = [op for _, ops_ in members for op in ops_]
    if link is not None:
        send = _cheaper_to_send(graph, in_chain, replicated, times_by_type, link, train)
        if send:
            replicated = replicable(graph, exclude=send)
    rebuilt = _rebuilt(graph, in_chain, replicated)
    front = [op for op in in_chain if op in rebuilt]
    members = [(block, [op for op in ops_ if op not in rebuilt]) for block, ops_ in members]
    if front:
        home = next(k for k, (_, ops_) in enumerate(members) if ops_)
        members[home] = (members[home][0], front + members[home][1])
    # A weight lives on the stage of its first reader (the rewriter puts it there): each weight op
    # goes right before that reader, in the reader's block, and no cut separates them. An op
    # nothing reads (a shape check) goes right after the last op it reads, likewise.
    laid_out = {op: k for k, op in enumerate(op for _, ops_ in members for op in ops_)}
    before: dict[str, list[str]] = {}
    after: dict[str, list[str]] = {}
    for op in laid_out:
        if infos[op].op == "get_attr":
            readers = [v for v in graph.dag.successors(op) if v in laid_out and infos[v].op != "get_attr"]
            if readers:
                before.setdefault(min(readers, key=laid_out.__getitem__), []).append(op)
        elif graph.dag.out_degree(op) == 0:
            inputs = [u for u in graph.dag.predecessors(op) if u in laid_out and infos[u].op != "get_attr"]
            if inputs:
                after.setdefault(max(inputs, key=laid_out.__getitem__), []).append(op)
    attached = {w for ws in [*before.values(), *after.values()] for w in ws}
    ops, block_starts, block_names = [], [], []
    glued: set[int] = set()
    for block, ops_ in members:
        laid = []

        def lay(op: str) -> None:
            for weight in before.get(op, ()):
                glued.add(len(ops) + len(laid) + 1)
                laid.append(weight)
            laid.append(op)
            for sink in after.get(op, ()):
                glued.add(len(ops) + len(laid))
                lay(sink)

        for op in ops_:
            if op not in attached:
                lay(op)
        if laid:
            block_starts.append(len(ops))
            block_names.append(block)
            ops.extend(laid)
    n = len(ops)
    position = {op: k for k, op in enumerate(ops)}
    if front:  # no cut inside the rebuilt values or right after them
        glued.update(range(1, max(position[op] for op in front) + 2))

    def prefix(values: Sequence[float]) -> np.ndarray:
        out = np.zeros(n + 1)
        np.cumsum(values, out=out[1:])
        return out

    time_s = {}
    for device_type, times in times_by_type.items():
        time_s[device_type] = prefix([(times[op].total_s if train else times[op].fwd_s)
                                      if op in times and op not in rebuilt else 0.0 for op in ops])
    per_param = _state_bytes_per_param(options)
    seen: set[str] = set()
    state, params = np.zeros(n), np.zeros(n)
    for k, op in enumerate(ops):
        for name in infos[op].reads:
            if name in parameters and name not in seen:
                seen.add(name)
                numel = math.prod(parameters[name].shape)
                params[k] += numel
                state[k] += per_param * numel
    activations = [costs[op].saved_bytes if train and op in costs else 0.0 for op in ops]

    # Every activation is live from its producer to its last reader; each cut in between
    # carries it. Model inputs are produced before the first op. A rebuilt value is recomputed by
    # every stage that reads it, so the inputs it comes from travel instead. Weights read on
    # several stages go straight from their owner to each reader once per step, which `evaluate`
    # prices; they do not ride along the chain.
    cross = np.zeros(n + 2)
    count = np.zeros(n + 2)
    for producer, readers in travelling_readers(graph, ops, replicated).items():
        start, last = position[producer] + 1 if producer in position else 0, max(readers)
        if last < start:
            continue
        nbytes, tensors = link_load(infos[producer], train and producer not in no_gradient)
        cross[start] += nbytes
        cross[last + 1] -= nbytes
        count[start] += tensors
        count[last + 1] -= tensors
    cross = np.cumsum(cross)[: n + 1]
    count = np.cumsum(count)[: n + 1]

    pins = np.full(n, -1)
    for path, stage in options.pin.items():
        matched = [k for k, op in enumerate(ops) if _under(infos[op].module_path, path)
                   or (infos[op].op == "get_attr" and any(_under(r.rpartition(".")[0], path) for r in infos[op].reads))]
        if not matched:
            raise ConfigError(f"pin names module {path!r}, which runs no op of this model; "
                             f"pin takes qualified module names such as 'transformer.h.0'")
        pins[matched] = stage
    forbidden: set[int] = set(glued)
    for rule in options.no_split:
        spans: dict[str, list[int]] = {}
        for k, op in enumerate(ops):
            for site in infos[op].scope:
                path = site.partition("@")[0]
                cls = blocks.module_types.get(path, "").rsplit(".", 1)[-1]
                if rule in (path, cls):
                    spans.setdefault(site, []).append(k)
        for ks in spans.values():
            forbidden.update(range(min(ks) + 1, max(ks) + 1))
    forbidden.update(_written_spans(ops, infos))
    weight_reads = []  # the parameters each op reads, itself or through the weight ops it reads
    for op in ops:
        names = [] if infos[op].op == "get_attr" else list(infos[op].reads) + [
            r for u in graph.dag.predecessors(op) if infos[u].op == "get_attr" for r in infos[u].reads]
        weight_reads.append({name: math.prod(parameters[name].shape) for name in names if name in parameters})
    chain = Chain(ops, time_s, prefix(state), prefix(params), prefix(activations), cross, count, pins, block_starts,
                  block_names, forbidden, replicated, no_gradient, weights={**(buffers or {}), **parameters},
                  memory=OpsMemory.from_costs(ops, costs if train else _unsaved(costs), params,
                                              weight_reads=weight_reads, train=train))

    _rebuild_groups(chain, graph, rebuilt, times_by_type, train)
    return chain


def _unsaved(costs: Mapping[str, OpCost]) -> dict[str, OpCost]:
    """Inference keeps nothing for backward."""
    return {name: dataclasses.replace(cost, saved={}) for name, cost in costs.items()}


def link_load(info: Any, gradient: bool) -> tuple[float, float]:
    """Bytes and transfers one value puts on a link per microbatch: the value, and with
    ``gradient`` (training, and the value depends on weights) the gradient of its floating-point
    tensors coming back; integer ids and boolean masks have none."""
    graded = sum(math.prod(shape) * dtype.itemsize for shape, dtype in zip(info.shapes, info.dtypes)
                 if dtype.is_floating_point or dtype.is_complex) if gradient else 0
    return info.output_bytes + graded, 1.0 + (1.0 if graded else 0.0)


def _cheaper_to_send(graph: OpGraph, ops: Sequence[str], replicated: Mapping[str, tuple[str, ...]],
                     times_by_type: Mapping[str, Mapping[str, Any]], link: Link, train: bool) -> set[str]:
    """The replicated values read by ordinary ops that cost a stage less to receive and pass on
    over ``link`` than to rebuild along with everything they are built from: an attention mask of
    batch × seq² booleans crosses NVLink in a fraction of the dozens of small kernels that
    build it. They travel like activations instead (so do the values built from them)."""
    inside = set(ops)
    send = set()
    for u in ops:
        if u not in replicated or all(v not in inside or v in replicated for v in graph.dag.successors(u)):
            continue
        closure, todo = set(), [u]
        while todo:
            w = todo.pop()
            if w not in closure:
                closure.add(w)
                todo.extend(p for p in graph.dag.predecessors(w) if p in replicated and p in inside)
        rebuild_s = min(sum(times[w].fwd_s for w in closure if w in times) for times in times_by_type.values())
        nbytes, tensors = link_load(graph.infos[u], False)  # built from the inputs alone: no gradient
        if 2 * (nbytes / link.bandwidth_bytes_per_s + tensors * link.latency_s) < rebuild_s:  # in and out
            send.add(u)
    return send


def _rebuilt(graph: OpGraph, ops: Sequence[str], replicated: Mapping[str, tuple[str, ...]]) -> dict[str, set[str]]:
    """The replicated values some op reads, each with the ops that need it: the ops that are
    not rebuilt themselves and read it, directly or through other rebuilt values. (A replicated
    value nothing reads, such as a shape check on a mask, is an ordinary op.)"""
    inside = set(ops)
    rebuilt = {u for u in ops if u in replicated and any(v in inside for v in graph.dag.successors(u))}
    needers: dict[str, set[str]] = {u: set() for u in rebuilt}
    for op in ops:
        if op in rebuilt:
            continue
        todo = [u for u in graph.dag.predecessors(op) if u in rebuilt]
        while todo:
            u = todo.pop()
            if op not in needers[u]:
                needers[u].add(op)
                todo.extend(p for p in graph.dag.predecessors(u) if p in rebuilt)
    return needers


def _rebuild_groups(chain: Chain, graph: OpGraph, rebuilt: Mapping[str, set[str]],
                    times_by_type: Mapping[str, Mapping[str, Any]], train: bool) -> None:
    """Group the rebuilt values by the ops that need them (an attention mask and everything it is
    built from form one group, read by every attention op) and fill the chain's rebuild fields."""
    n = chain.n
    chain.rebuilt = frozenset(rebuilt)
    position = {op: k for k, op in enumerate(chain.ops)}
    groups: dict[tuple[int, ...], list[str]] = {}
    for value, needers in rebuilt.items():
        groups.setdefault(tuple(sorted(position[v] for v in needers)), []).append(value)
    keys = sorted(groups)
    chain.rebuild_needers = [np.array(key, dtype=np.int64) for key in keys]
    chain.rebuild_next = np.full((len(keys), n + 1), n, dtype=np.int64)
    for g, key in enumerate(keys):
        after = np.searchsorted(np.array(key), np.arange(n + 1))  # index of the first needer ≥ i
        within = after < len(key)
        chain.rebuild_next[g][within] = np.array(key)[after[within]]
    for device_type, times in times_by_type.items():
        chain.rebuild_time_s[device_type] = np.array([
            sum((times[v].total_s if train else times[v].fwd_s) for v in groups[key] if v in times) for key in keys])


def replicable(graph: OpGraph, exclude: Collection[str] = ()) -> dict[str, tuple[str, ...]]:
    """Values that depend on the model inputs only (no weight, no randomness, no in-place
    write), but those in ``exclude`` and what is built from them: each maps to the inputs it is
    computed from. A stage that reads such a value may rebuild it from those inputs instead of
    receiving it (position ids from the ids they index)."""
    found: dict[str, tuple[str, ...]] = {}
    for name in graph.order:
        info = graph.infos[name]
        if info.op == "placeholder" or name in exclude:
            continue
        if info.op not in ("call_function", "call_method") or draws_random(info.target) \
                or writes_in_place(info.target):
            continue
        preds = list(graph.dag.predecessors(name))  # none: a constant such as arange(seq)
        if not all(p in found or graph.infos[p].op == "placeholder" for p in preds):
            continue
        sources = set()
        for p in preds:
            sources.update(found.get(p, (p,)))
        found[name] = tuple(sorted(sources))
    return found


def _written_spans(ops: Sequence[str], infos: Mapping[str, Any]) -> set[int]:
    """Cut positions between the first op that reads or writes a parameter or buffer the model
    writes in place (a counter, an EMA, running statistics) and the last op that writes it.

    The tensor is stored on the stage of its first reader, and a write on any other stage
    would change a copy sent there: so every access up to the last write stays on one stage.
    Reads after the last write may lie on later stages; the updated tensor is sent to them.
    """
    first: dict[str, int] = {}
    last_write: dict[str, int] = {}
    for k, op in enumerate(ops):
        for name in [*infos[op].reads, *infos[op].writes]:
            first.setdefault(name, k)
        for name in infos[op].writes:
            last_write[name] = k
    return {cut for name, end in last_write.items() for cut in range(first[name] + 1, end + 1)}


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def travelling_readers(graph: OpGraph, ops: Sequence[str], replicated: Mapping[str, tuple[str, ...]]
                       ) -> dict[str, list[int]]:
    """Chain positions reading every value that travels along the pipeline: activations and
    model inputs. A value rebuilt from the inputs counts as read of those inputs; weights do
    not travel (see `weight_readers`). A value the model returns is read at position
    ``len(ops)`` (``RETURNED``): it travels to the last stage, where the outputs are gathered."""
    position = {op: k for k, op in enumerate(ops)}
    position.update({op: len(ops) for op in graph.order if graph[op]["kind"] == OUTPUT})
    readers: dict[str, list[int]] = {}
    for v in position:
        for u in graph.dag.predecessors(v):
            if graph.infos[u].op == "get_attr" or not graph.dag.edges[u, v]["tensors"]:
                continue  # a weight, or an edge that only orders accesses to a written buffer
            for source in replicated.get(u, (u,)):
                readers.setdefault(source, []).append(position[v])
    return {u: r for u, r in readers.items() if u not in replicated}


def chain_travellers(graph: OpGraph, chain: Chain) -> dict[str, list[int]]:
    """``travelling_readers`` of the chain's ops, computed once per chain and graph."""
    cached = chain.__dict__.get("_travellers")
    if cached is None or cached[0] is not graph:
        cached = (graph, travelling_readers(graph, chain.ops, chain.replicated))
        chain.__dict__["_travellers"] = cached
    return cached[1]
