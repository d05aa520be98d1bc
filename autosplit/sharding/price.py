"""What a choice of layouts costs each rank of a tensor-parallel group: work, memory, collectives.

    priced = price_layouts(gm, costs, chosen, Cluster.parse("4xh100"), ranks=[0, 1, 2, 3])
    priced.per_rank["linear_3"].fwd_flops     # a quarter of the op's FLOPs when it is split
    priced.collective_s["linear_6"]           # (forward s, backward s) moving its output/gradient

Work. A node whose layout shards any input or output does 1/tp of its FLOPs and workspace on each
rank; the bytes it moves, its saved tensors and its output scale tensor by tensor (a sharded
tensor is 1/tp on each rank, a replicated or partial one is whole).

Collectives, forward. A producer hands its output in its layout's placement; each consumer reads it
in its own layout's placement. Each distinct placement read that differs from the one produced
is made once (the runtime redistributes once and shares the result among the readers):

    P -> R   all-reduce          P -> S(d)   reduce-scatter
    S -> R   all-gather          S(i) -> S(j)   all-to-all
    R -> S, R -> P               free (a local slice; DTensor zeroes other ranks' addends)

Collectives, backward. A gradient flows back against each edge. The gradient a consumer gives
an input it read as S(d) is S(d); as P, R (the gradient of a sum is the same on every rank);
as R, it is P when another input of a sharded layout is sharded or partial (a column-parallel
matmul: each rank holds a part of dx = dy·Wᵀ), S when the op only sliced a replicated input,
else R. Contributions of the consumers that read the same placement and give the same gradient
placement are summed first (autograd adds P + P without communicating), then brought to the
placement the producer's backward needs: its output's placement, or R for a P output — one
all-reduce for the q, k and v projections reading one replicated norm output (Megatron's f),
and none for a row-parallel output's replicated gradient (the adjoint of g). A weight read
replicated by a split op gets a partial gradient: all-reduced, as DTensor's optimizer step
must before it can add it to the replicated weight. A forward all-gather thus becomes a
backward reduce-scatter, as in sequence parallelism.

Sizes are the whole tensor's (``collectives`` divides them as each collective does).

Saved tensors. An input an op reads through a collective and keeps for backward (the all-gathered
input of a column-parallel matmul, kept for its weight's gradient) is the collective's result, a
tensor of its own beside the producer's output (``saved_as_read``).

What a plan sends. ``plan_collectives`` prices the collectives of a Plan's layouts again, stage by
stage; ``bytes_sent`` is what one rank sends in each under a ring.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch.fx as fx

from autosplit.sharding.placements import REPLICATE, is_partial, is_shard
from autosplit.sharding.strategies import Layout, Slot, tensor_inputs, tensor_outputs
from cost_models import collectives
from cost_models.analytic import AnalyticCostModel
from cost_models.cluster import Cluster
from cost_models.ops import OpCost, needs_grad_of

logger = logging.getLogger(__name__)

COLLECTIVE_KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")


@dataclass(frozen=True)
class Collective:
    """One collective a choice of layouts makes the tensor-parallel group run."""

    node: str
    """The producer whose output (forward) or output's gradient (backward) is moved."""
    kind: str
    """One of :data:`COLLECTIVE_KINDS`."""
    direction: str
    """``"forward"`` or ``"backward"``."""
    src: str
    """Placement before."""
    dst: str
    """Placement after."""
    nbytes: int
    """Size of the whole tensor."""
    seconds: float


def transition(src: str, dst: str) -> str | None:
    """The collective that turns placement ``src`` into ``dst`` (None: nothing, or a local op).

    Example:
        >>> transition("P", "R"), transition("S(1)", "R"), transition("R", "S(0)")
        ('all_reduce', 'all_gather', None)
    """
    if src == dst or src == REPLICATE:
        return None
    if is_partial(src):
        return "reduce_scatter" if is_shard(dst) else "all_reduce"
    if is_shard(src):
        return "all_to_all" if is_shard(dst) else "all_gather"  # S -> P gathers, then keeps one addend
    raise ValueError(f"unknown placement {src!r}")


def collective_s(kind: str | None, nbytes: int, cluster: Cluster, ranks: Sequence[int]) -> float:
    """Seconds of a collective of ``kind`` on a tensor of ``nbytes`` (whole) over ``ranks``."""
    if kind is None or nbytes == 0:
        return 0.0
    if kind == "all_reduce":
        return float(collectives.all_reduce_s(cluster, ranks, nbytes))
    if kind == "reduce_scatter":
        return float(collectives.reduce_scatter_s(cluster, ranks, nbytes))
    if kind == "all_gather":
        return float(collectives.all_gather_s(cluster, ranks, nbytes))
    if kind == "all_to_all":  # every rank holds its 1/p shard and sends (p-1)/p of it
        return float(collectives.all_to_all_s(cluster, ranks, nbytes / len(ranks)))
    raise ValueError(f"unknown collective {kind!r}; expected one of {COLLECTIVE_KINDS}")


class CollectiveTimes:
    """:func:`collective_s` on one group, remembered (the ring's bandwidth and latency are
    looked up link by link)."""

    def __init__(self, cluster: Cluster, ranks: Sequence[int]):
        self.cluster, self.ranks = cluster, tuple(ranks)
        self._seen: dict[tuple[str | None, int], float] = {}

    def __call__(self, kind: str | None, nbytes: int) -> float:
        key = (kind, nbytes)
        if key not in self._seen:
            self._seen[key] = collective_s(kind, nbytes, self.cluster, self.ranks)
        return self._seen[key]


def gradient_placement(layout: Layout, slot: int) -> str:
    """The placement of the gradient a node with ``layout`` gives its input ``slot``."""
    read = layout.inputs[slot]
    if is_shard(read):
        return read
    if is_partial(read):
        return REPLICATE
    others = [p for i, p in enumerate(layout.inputs) if i != slot]
    if any(p != REPLICATE for p in others):
        return "P"
    sliced = [p for p in layout.outputs if is_shard(p)]
    return sliced[0] if sliced else REPLICATE


def gradient_target(produced: str) -> str:
    """The placement the producer's backward needs its output's gradient in."""
    return REPLICATE if is_partial(produced) else produced


@dataclass
class ShardingCost:
    """What a choice of layouts costs each rank."""

    per_rank: dict[str, OpCost]
    """Every node's cost on one rank."""
    parameter_bytes: dict[str, int]
    """Bytes of every weight (``get_attr`` target) each rank holds."""
    collective_s: dict[str, tuple[float, float]]
    """Per producer node: seconds of the collectives moving its output (forward) and its
    output's gradient (backward); nodes with none are left out."""
    collectives: list[Collective] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Collectives by direction and kind, e.g. ``{"forward": {"all_reduce": 2}, "backward": {}}``."""
        out: dict[str, dict[str, int]] = {"forward": {}, "backward": {}}
        for direction in out:
            out[direction] = dict(sorted(Counter(c.kind for c in self.collectives if c.direction == direction).items()))
        return out


class GraphFacts:
    """What pricing needs of a graph: each node's input slots, readers and tensor sizes.

    The parts that depend only on the graph are gathered once per graph and shared by every
    GraphFacts of it (a captured graph is not edited after capture): a planner that prices
    tp = 2, 4, 8 under several memory weights walks the graph once."""

    def __init__(self, gm: fx.GraphModule, costs: Mapping[str, OpCost], *, training: bool = True):
        self.graph = gm.graph
        shared = _graph_structure(gm.graph)
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.costs = costs
        self.training = training
        self.slots: dict[str, list[Slot]] = shared.slots
        self.readers: dict[str, list[tuple[str, int, int]]] = shared.readers
        """producer -> [(consumer, slot index, producer's output index)]"""
        self.output_bytes: dict[str, list[int]] = shared.output_bytes
        self.weights: dict[str, Any] = shared.weights
        self.inputs_of: dict[str, list[tuple[int, bool, str]]] = shared.inputs_of
        """node -> [(bytes, read from a weight, producer)] for each tensor input slot"""
        needs = needs_grad_of(gm) if training else {}  # not shared: a weight's requires_grad may change
        self.has_grad = {name: bool(needs.get(name)) for name in self.nodes}

    def slot_bytes(self, slot: Slot) -> int:
        sizes = self.output_bytes.get(slot.producer, [])
        return sizes[slot.index] if slot.index < len(sizes) else 0


@dataclass
class _Structure:
    """The graph-only facts behind :class:`GraphFacts` (names and sizes: nothing that keeps
    the graph alive)."""

    slots: dict[str, list[Slot]]
    readers: dict[str, list[tuple[str, int, int]]]
    output_bytes: dict[str, list[int]]
    weights: dict[str, Any]
    inputs_of: dict[str, list[tuple[int, bool, str]]]
    n_nodes: int


_STRUCTURES: "weakref.WeakKeyDictionary[fx.Graph, _Structure]" = weakref.WeakKeyDictionary()


def _graph_structure(graph: fx.Graph) -> _Structure:
    """The graph-only facts of ``graph``, gathered on first use (rebuilt if its node count changed)."""
    found = _STRUCTURES.get(graph)
    if found is not None and found.n_nodes == len(graph.nodes):
        return found
    nodes = {n.name: n for n in graph.nodes}
    slots: dict[str, list[Slot]] = {}
    readers: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    output_bytes: dict[str, list[int]] = {}
    weights = {n.name: n.target for n in graph.nodes if n.op == "get_attr"}
    for node in graph.nodes:
        output_bytes[node.name] = [t.numel() * t.element_size() for t in tensor_outputs(node)]
        slots[node.name] = node_slots = tensor_inputs(node)
        for i, slot in enumerate(node_slots):
            readers[slot.producer].append((node.name, i, slot.index))
    inputs_of = {}
    for name, node_slots in slots.items():
        row = []
        for s in node_slots:
            sizes = output_bytes.get(s.producer, [])
            row.append((sizes[s.index] if s.index < len(sizes) else 0, s.producer in weights, s.producer))
        inputs_of[name] = row
    found = _Structure(slots, dict(readers), output_bytes, weights, inputs_of, len(nodes))
    _STRUCTURES[graph] = found
    return found


def per_rank_cost(facts: GraphFacts, name: str, layout: Layout, tp: int) -> OpCost:
    """The cost of node ``name`` on one rank when it runs in ``layout`` (see the module docstring)."""
    cost = facts.costs.get(name)
    if cost is None:
        return OpCost()
    f = layout.compute_fraction
    placements = layout.inputs
    gather = cost.op_class in ("embedding", "indexing")  # reads rows of its table, not all of it
    # Sums run in the order of the lists they replace (inputs, then outputs), so the floating
    # point results are the same bit for bit.
    moved_total, moved_scaled = 0, 0
    weight_total, weight_scaled = 0, 0
    by_input: dict[str, float] = {}
    for i, (nbytes, weight, producer) in enumerate(facts.inputs_of[name]):
        s = (1 / tp if is_shard(placements[i]) else 1.0) if i < len(placements) else 1.0
        if i < len(placements):
            by_input[producer] = s
        if not (gather and weight):
            moved_total += nbytes
            moved_scaled += nbytes * s
        if weight:
            weight_total += nbytes
            weight_scaled += nbytes * s
    outputs = layout.outputs
    out_scaled = 0
    out_share = 1.0
    for i, nbytes in enumerate(facts.output_bytes[name]):
        s = (1 / tp if is_shard(outputs[i]) else 1.0) if i < len(outputs) else 1.0
        if i == 0:
            out_share = s
        moved_total += nbytes
        moved_scaled += nbytes * s
        out_scaled += nbytes * s
    byte_share = moved_scaled / moved_total if moved_total else f
    weight_share = weight_scaled / weight_total if weight_total else 1.0
    saved = {key: int(nbytes * by_input.get(key, out_share if key == name else f))
             for key, nbytes in cost.saved.items()}
    return _with(
        cost,
        fwd_flops=int(cost.fwd_flops * f), bwd_flops=int(cost.bwd_flops * f),
        fwd_bytes=int(cost.fwd_bytes * byte_share), bwd_bytes=int(cost.bwd_bytes * byte_share),
        output_bytes=int(out_scaled), saved=saved,
        grad_bytes=int(cost.grad_bytes * out_share), weight_grad_bytes=int(cost.weight_grad_bytes * weight_share),
        fwd_workspace_bytes=int(cost.fwd_workspace_bytes * f), bwd_workspace_bytes=int(cost.bwd_workspace_bytes * f),
        cpu_fwd_workspace_bytes=int(cost.cpu_fwd_workspace_bytes * f),
        cpu_bwd_workspace_bytes=int(cost.cpu_bwd_workspace_bytes * f),
    )


def _with(cost: OpCost, **changes: Any) -> OpCost:
    """``dataclasses.replace(cost, **changes)`` without re-running the dataclass's ``__init__``
    field by field (OpCost has no ``__post_init__``), for the per-node loop of a 6,000-node graph."""
    new = object.__new__(OpCost)
    new.__dict__.update(cost.__dict__)
    new.__dict__.update(changes)
    return new


REDISTRIBUTED_SAVE = 1000
"""Saved-tensor keys ``f"{node}:{REDISTRIBUTED_SAVE + slot}"`` name an input a node keeps in the
placement it read it in, made by a collective: the node's own tensor (``cost_models.memory``)."""


def saved_as_read(facts: GraphFacts, name: str, chosen: Mapping[str, Layout], cost: OpCost) -> OpCost:
    """``cost`` with each input that node ``name`` saves for backward, and reads in a placement a
    collective makes (``transition``), kept as a tensor of its own: the redistributed copy (the
    runtime's, e.g. the all-gathered input a column-parallel matmul keeps for its weight's
    gradient) is another storage than the producer's output, which its other readers may keep
    too. Its size is already the read placement's (``per_rank_cost``). Two readers that keep one
    copy (the runtime makes each placement of a value once) are counted twice."""
    if not cost.saved:
        return cost
    layout = chosen[name]
    saved = dict(cost.saved)
    for i, slot in enumerate(facts.slots[name]):
        if i >= len(layout.inputs) or slot.producer not in saved or slot.producer in facts.weights:
            continue
        made = chosen.get(slot.producer)
        produced = made.outputs[slot.index] if made is not None and slot.index < len(made.outputs) else REPLICATE
        if transition(produced, layout.inputs[i]) is not None:
            saved[f"{name}:{REDISTRIBUTED_SAVE + i}"] = saved.pop(slot.producer)
    return cost if saved == cost.saved else _with(cost, saved=saved)


def weight_bytes(facts: GraphFacts, name: str, layout: Layout, tp: int) -> int:
    """Bytes of weight node ``name`` on one rank (0 for other nodes)."""
    if name not in facts.weights or not facts.output_bytes[name]:
        return 0
    placement = layout.outputs[0] if layout.outputs else REPLICATE
    return facts.output_bytes[name][0] // tp if is_shard(placement) else facts.output_bytes[name][0]


def producer_collectives(facts: GraphFacts, producer: str, layout: Layout,
                         reads: Sequence[tuple[int, str, str | None]], times: CollectiveTimes) -> list[Collective]:
    """The collectives moving ``producer``'s outputs to readers that read (output index,
    placement, gradient placement or None when no gradient flows back), each distinct read once."""
    found = []
    gathered: dict[tuple[int, str], set[str]] = defaultdict(set)
    for index, placement, grad in reads:
        gathered[(index, placement)]
        if grad is not None:
            gathered[(index, placement)].add(grad)
    for (index, placement), grads in sorted(gathered.items()):
        produced = layout.outputs[index] if index < len(layout.outputs) else REPLICATE
        sizes = facts.output_bytes.get(producer, [])
        nbytes = sizes[index] if index < len(sizes) else 0
        kind = transition(produced, placement)
        if kind is not None:
            found.append(Collective(producer, kind, "forward", produced, placement, nbytes, times(kind, nbytes)))
        target = gradient_target(produced)
        for grad in sorted(grads):
            kind = transition(grad, target)
            if kind is not None:
                found.append(Collective(producer, kind, "backward", grad, target, nbytes, times(kind, nbytes)))
    return found


def reads_of(facts: GraphFacts, producer: str, chosen: Mapping[str, Layout]) -> list[tuple[int, str, str | None]]:
    """How the readers of ``producer`` read it under ``chosen``."""
    reads = []
    flows = facts.training and facts.has_grad.get(producer, False)
    for consumer, slot, index in facts.readers.get(producer, []):
        layout = chosen[consumer]
        if slot >= len(layout.inputs):
            continue
        reads.append((index, layout.inputs[slot], gradient_placement(layout, slot) if flows else None))
    return reads


def price_layouts(gm: fx.GraphModule, costs: Mapping[str, OpCost], chosen: Mapping[str, Layout],
                  cluster: Cluster, ranks: Sequence[int], *, training: bool = True) -> ShardingCost:
    """Price a layout per node (e.g. a :class:`~autosplit.sharding.choose.ShardingChoice`'s) on
    the tensor-parallel group ``ranks`` of ``cluster``.

    Args:
        gm: the captured graph.
        costs: ``price_graph(gm)``.
        chosen: a layout for every node (the output node's inputs say how the outputs are returned).
        cluster: the devices and their links.
        ranks: the tensor-parallel group, in ring order.
        training: also price the backward's collectives.

    Example:
        >>> priced = price_layouts(gm, costs, choice.layouts, cluster, [0, 1])
        >>> priced.counts()
        {'forward': {'all_reduce': 1}, 'backward': {'all_reduce': 1}}
    """
    return price_with(GraphFacts(gm, costs, training=training), chosen, CollectiveTimes(cluster, ranks))


def price_with(facts: GraphFacts, chosen: Mapping[str, Layout], times: CollectiveTimes) -> ShardingCost:
    """:func:`price_layouts` on a graph's facts already gathered."""
    tp = len(times.ranks)
    missing = [n for n in facts.nodes if n not in chosen]
    if missing:
        raise ValueError(f"no layout for {len(missing)} node(s), e.g. {missing[:3]}: give every node one")
    per_rank = {name: saved_as_read(facts, name, chosen, per_rank_cost(facts, name, chosen[name], tp))
                for name in facts.nodes}
    params = {str(facts.weights[n]): weight_bytes(facts, n, chosen[n], tp) for n in facts.weights}
    found: list[Collective] = []
    seconds: dict[str, tuple[float, float]] = {}
    for name in facts.nodes:
        moves = producer_collectives(facts, name, chosen[name], reads_of(facts, name, chosen), times)
        found += moves
        if moves:
            seconds[name] = (sum(c.seconds for c in moves if c.direction == "forward"),
                             sum(c.seconds for c in moves if c.direction == "backward"))
    return ShardingCost(per_rank, params, seconds, found)


def compute_s(cost: OpCost, device: Any, model: AnalyticCostModel, training: bool) -> float:
    """Seconds of one rank's work on a node."""
    t = model.time(cost, device)
    return t.fwd_s + (t.bwd_s if training else 0.0)


# --------------------------------------------------------------------------- what a plan sends


def bytes_sent(kind: str, nbytes: float, ranks: int) -> float:
    """Bytes each of ``ranks`` ranks sends in one collective of ``kind`` on a tensor of
    ``nbytes`` (whole, as :class:`Collective` counts it), under the ring algorithms
    ``cost_models.collectives`` prices: an all-reduce sends 2(n − 1)/n of the tensor, an
    all-gather or a reduce-scatter (n − 1)/n, an all-to-all (n − 1)/n of each rank's 1/n shard.

    Example:
        >>> bytes_sent("all_reduce", 1024, 2), bytes_sent("all_gather", 1024, 4)
        (1024.0, 768.0)
    """
    if kind not in COLLECTIVE_KINDS:
        raise ValueError(f"unknown collective {kind!r}; expected one of {COLLECTIVE_KINDS}")
    share = (ranks - 1) / ranks
    if kind == "all_reduce":
        return 2 * share * nbytes
    if kind == "all_to_all":
        return share * nbytes / ranks
    return share * nbytes


def plan_collectives(gm: fx.GraphModule, plan: Any) -> list[list[Collective]]:
    """The collectives each stage of ``plan`` runs on its tensor-parallel group per microbatch,
    priced again from ``plan.layouts`` on the graph ``gm`` it was made from (the capture at
    ``plan.traced_batch`` samples, or at the microbatch's).

    A collective belongs to the stage of the readers that need it, where the runtime runs it: a
    value sent across a cut arrives in its producer's placement and the next stage redistributes
    it, and each stage that reads a value in some placement makes it once. (The solver adds a
    collective's time to its producer's, so a cut it crosses leaves it with the producer's stage.)
    Activations scale from the traced samples to the plan's microbatch; weights and their
    gradients do not. Seconds are 0: the stage's ``compute_s`` holds them. Empty lists when
    ``plan.tensor_parallel`` is 1.

    Example:
        >>> per_stage = plan_collectives(traced.graph_module, plan)
        >>> sum(bytes_sent(c.kind, c.nbytes, plan.tensor_parallel) for c in per_stage[0])   # per rank
    """
    if plan.tensor_parallel == 1 or not plan.layouts:
        return [[] for _ in plan.stages]
    chosen = {name: Layout(tuple(entry["inputs"]), tuple(entry["output"].split()))
              for name, entry in plan.layouts.items()}
    missing = [n.name for n in gm.graph.nodes if n.name not in chosen]
    if missing:
        raise ValueError(f"the plan has no layout for {len(missing)} node(s) of this graph, e.g. {missing[:3]}: "
                         "pass the graph the plan was made from (autosplit.capture at the plan's traced batch)")
    facts = GraphFacts(gm, {}, training=plan.mode == "train")
    traced = plan.traced_batch or plan.microbatch_size
    factor = plan.microbatch_size / traced if plan.microbatch_size and traced else 1.0
    stage_of = {name: stage.index for stage in plan.stages for name in stage.nodes}
    found: list[list[Collective]] = [[] for _ in plan.stages]
    for name in facts.nodes:
        flows = facts.training and facts.has_grad.get(name, False)
        reads: dict[int, list[tuple[int, str, str | None]]] = defaultdict(list)
        for consumer, slot, index in facts.readers.get(name, []):
            layout = chosen[consumer]
            if slot < len(layout.inputs):
                reads[stage_of.get(consumer, 0)].append(
                    (index, layout.inputs[slot], gradient_placement(layout, slot) if flows else None))
        scale = 1.0 if name in facts.weights else factor
        for stage, stage_reads in sorted(reads.items()):
            for c in producer_collectives(facts, name, chosen[name], stage_reads, lambda *_: 0.0):
                found[stage].append(replace(c, nbytes=int(c.nbytes * scale)))
    return found
