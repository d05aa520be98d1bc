"""Choose a layout for every node of a captured graph on a tensor-parallel group, exactly.

    choice = choose_layouts(traced, costs, Cluster.parse("8xh100"), ranks=range(8))
    choice.layouts["linear_6"]          # Layout(inputs=('S(2)', 'S(1)'), outputs=('P',), ...)
    choice.collective_counts            # {'forward': {'all_reduce': 161, ...}, 'backward': {...}}

The problem. Every node takes one of its DTensor layouts (:mod:`autosplit.sharding.strategies`).
Minimize, over all nodes, one rank's compute time of its layout (forward, plus backward when
training), plus the time of the collectives its output and its output's gradient need to reach
its readers' layouts (:mod:`autosplit.sharding.price`), plus ``memory_weight_s_per_byte`` × the
bytes a rank keeps for it (a weight's share and its gradient when training, the tensors it saves
for backward). The all-replicated choice is always feasible.

The model (OR-Tools CP-SAT). A boolean per node and layout, exactly one true per node; the
work and memory of a layout are linear terms. For each producer, a boolean per (output, placement
read) that is true when some reader reads it so, and one per (output, placement read, gradient
placement given back); the collective between the producer's layout and such a read is paid by
an AND of the two (``w >= x + z - 1``: with non-negative costs the minimum makes it exact). So
three readers of one replicated value that each give back a partial gradient pay one all-reduce.
The AND is modelled with one boolean per producer layout, ``w_k => x_k`` and ``sum_k w_k == z``,
whose linear relaxation pays exactly the expected cost for a given z (the usual
``w >= x + z - 1`` lets a half-chosen pair pay nothing, and CP-SAT then stalls on long chains
of view ops).

Repeated layers share one decision. Blocks of ``OpGraph.coarsen()`` (one per transformer layer)
with the same structural signature — ops, shapes, constants and edges, never module names — are
instances of one template: the k-th node of every instance uses the template's k-th booleans,
its terms weighted by the number of instances. Producer terms are grouped by (producer's class,
readers' classes), so an 80-layer model has about the variables of a 1-layer one. Nodes outside
repeated blocks (embedding, final norm, head) have their own. Solved with a fixed seed, one
worker and a deterministic time limit: the same input gives the same choice.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx

from autosplit.graph import OpGraph
from autosplit.sharding.eliminate import eliminate
from autosplit.sharding.placements import REPLICATE, validate
from autosplit.sharding.price import (CollectiveTimes, GraphFacts, ShardingCost, compute_s, gradient_placement,
                                      gradient_target, per_rank_cost, price_with, transition, weight_bytes)
from autosplit.sharding.strategies import Layout, NodeLayouts, collector_paused, node_layouts
from autosplit.trace import Traced
from cost_models.analytic import AnalyticCostModel
from cost_models.cluster import Cluster
from cost_models.ops import OpCost

logger = logging.getLogger(__name__)

METHODS = ("auto", "eliminate", "cp-sat")

UNITS_PER_S = 1e10
"""Objective units per second (0.1 ns): CP-SAT needs integer coefficients."""


@dataclass
class ShardingChoice:
    """A layout for every node on a tensor-parallel group, and what it costs one rank."""

    tp: int
    ranks: tuple[int, ...]
    layouts: dict[str, Layout]
    """The chosen layout of every node, by node name."""
    notes: dict[str, str]
    """Nodes that could only be replicated, and why (e.g. no DTensor strategy for their op)."""
    per_rank: dict[str, OpCost]
    """Every node's cost on one rank under the chosen layouts."""
    parameter_bytes: dict[str, int]
    """Bytes of every weight each rank holds."""
    collective_s: dict[str, tuple[float, float]]
    """Per producer node: seconds of the collectives on its output (forward) and on its output's
    gradient (backward)."""
    collective_counts: dict[str, dict[str, int]]
    """Collectives by direction and kind, e.g. ``{"forward": {"all_reduce": 1}, "backward": {...}}``."""
    compute_s: float
    """One rank's compute time summed over nodes (forward + backward when training)."""
    communication_s: float
    """Collective time summed over nodes (forward + backward)."""
    memory_bytes: int
    """One rank's weight (and gradient, when training) bytes plus saved-activation bytes."""
    objective_s: float
    """compute_s + communication_s + memory_weight_s_per_byte × memory_bytes."""
    status: str
    """CP-SAT's status: OPTIMAL (proven) or FEASIBLE (time limit reached)."""
    variables: int
    """Booleans in the model (grows with distinct structure, not with depth)."""
    wall_s: float
    priced: ShardingCost | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        """The choice as data: layouts as placement strings, and the summary figures."""
        return {
            "tp": self.tp, "ranks": list(self.ranks),
            "layouts": {n: l.to_json() for n, l in self.layouts.items()},
            "notes": dict(self.notes), "parameter_bytes": dict(self.parameter_bytes),
            "collective_s": {n: list(v) for n, v in self.collective_s.items()},
            "collective_counts": self.collective_counts, "compute_s": self.compute_s,
            "communication_s": self.communication_s, "memory_bytes": self.memory_bytes,
            "objective_s": self.objective_s, "status": self.status, "variables": self.variables,
        }


@collector_paused()
def choose_layouts(traced: Traced, costs: Mapping[str, OpCost], cluster: Cluster, ranks: Sequence[int], *,
                   device: Any = None, cost_model: AnalyticCostModel | None = None, training: bool = True,
                   memory_weight_s_per_byte: float = 0.0, output_placement: str = REPLICATE,
                   time_limit_s: float = 10.0, layouts: Mapping[str, NodeLayouts] | None = None,
                   method: str = "auto") -> ShardingChoice:
    """Choose the layout of every node of ``traced`` on the tensor-parallel group ``ranks``.

    Args:
        traced: the captured model (``autosplit.capture``).
        costs: ``price_graph(traced.graph_module, training=training)``.
        cluster: the devices and links; ``ranks`` index it.
        ranks: the tensor-parallel group in ring order; its size is tp.
        device: the device whose speed prices compute (default: ``cluster[ranks[0]]``).
        cost_model: turns an OpCost into seconds (default: ``AnalyticCostModel()``).
        training: price backward work and gradients' collectives too.
        memory_weight_s_per_byte: seconds the objective charges per byte a rank keeps; e.g.
            1e-9 makes a GB worth a second, and memory-lean layouts (sequence-split activations)
            win.
        output_placement: how the graph's outputs are returned (``"R"``: whole on every rank).
        time_limit_s: CP-SAT's deterministic time limit.
        layouts: the nodes' layouts, if already found (``node_layouts(gm, tp)``).
        method: ``"eliminate"`` (exact variable elimination), ``"cp-sat"``, or ``"auto"``:
            elimination where its tables stay small, else CP-SAT.

    Example:
        >>> choice = choose_layouts(traced, price_graph(traced.graph_module), Cluster.parse("2xh100"), [0, 1])
        >>> choice.collective_counts["forward"]
        {'all_reduce': 1}
    """
    started = time.perf_counter()
    ranks = tuple(ranks)
    tp = len(ranks)
    if tp < 1 or len(set(ranks)) != tp:
        raise ValueError(f"ranks must name distinct devices of the cluster, e.g. [0, 1]; got {list(ranks)}")
    if memory_weight_s_per_byte < 0:
        raise ValueError(f"memory_weight_s_per_byte must be >= 0, e.g. 1e-9; got {memory_weight_s_per_byte}")
    validate(output_placement)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, e.g. 'auto'; got {method!r}")
    gm = traced.graph_module
    device = cluster[ranks[0]] if device is None else device
    model_ = cost_model or AnalyticCostModel()
    options = dict(layouts) if layouts is not None else node_layouts(gm, tp)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    n_out = len(options[output.name].layouts[0].inputs)
    options[output.name] = NodeLayouts((Layout((output_placement,) * n_out, ()),))
    facts = GraphFacts(gm, costs, training=training)
    classes = _classes(traced)
    for name in facts.nodes:
        classes.setdefault(name, name)
    members: dict[Any, list[str]] = defaultdict(list)
    for name in facts.nodes:
        members[classes[name]].append(name)
    for cls, names in list(members.items()):  # instances whose layouts differ cannot share
        if len(names) > 1 and any(options[n].layouts != options[names[0]].layouts for n in names[1:]):
            del members[cls]
            for n in names:
                classes[n] = n
                members[n] = [n]

    ids = {cls: i for i, cls in enumerate(members)}
    unary: dict[Any, list[float]] = {}
    for cls, names in members.items():
        rep = names[0]
        unary[cls] = []
        for layout in options[rep].layouts:
            cost = per_rank_cost(facts, rep, layout, tp)
            held = _held_bytes(facts, rep, layout, cost, tp, training)
            unary[cls].append(len(names) * (compute_s(cost, device, model_, training) + memory_weight_s_per_byte * held))
    groups = _producer_groups(facts, classes)
    times = CollectiveTimes(cluster, ranks)
    solved = _eliminate(ids, unary, groups, classes, options, facts, times) if method != "cp-sat" else None
    if solved is None and method == "eliminate":
        raise ValueError("variable elimination would build tables over 2,000,000 entries for this graph; "
                         "use method='cp-sat' or 'auto'")
    if solved is not None:
        picks, status = solved, "OPTIMAL"
    else:
        picks, status = _cp_sat(unary, groups, classes, options, facts, times, time_limit_s)
    chosen: dict[str, Layout] = {}
    for name in facts.nodes:
        cls = classes[name]
        chosen[name] = options[members[cls][0]].layouts[picks[cls]]
    priced = price_with(facts, chosen, times)
    compute = sum(compute_s(c, device, model_, training) for c in priced.per_rank.values())
    communication = sum(f + b for f, b in priced.collective_s.values())
    memory = sum(_held_bytes(facts, n, chosen[n], priced.per_rank[n], tp, training) for n in facts.nodes)
    notes = {n: options[n].note for n in facts.nodes if options[n].note}
    choice = ShardingChoice(
        tp=tp, ranks=ranks, layouts=chosen, notes=notes, per_rank=priced.per_rank,
        parameter_bytes=priced.parameter_bytes, collective_s=priced.collective_s,
        collective_counts=priced.counts(), compute_s=compute, communication_s=communication, memory_bytes=memory,
        objective_s=compute + communication + memory_weight_s_per_byte * memory, status=status,
        variables=sum(len(u) for u in unary.values()), wall_s=time.perf_counter() - started, priced=priced)
    logger.debug("tp=%d: %s, %d variables, objective %.6f s, %.2f s", tp, choice.status, choice.variables,
                 choice.objective_s, choice.wall_s)
    return choice


def _held_bytes(facts: GraphFacts, name: str, layout: Layout, cost: OpCost, tp: int, training: bool) -> int:
    """Bytes a rank keeps for a node: a weight's share (twice when training: its gradient) and
    the tensors it saves for backward (``cost``: the node's per-rank cost in ``layout``)."""
    return weight_bytes(facts, name, layout, tp) * (2 if training else 1) + (cost.saved_bytes if training else 0)


def _producer_groups(facts: GraphFacts, classes: Mapping[str, Any]) -> list[tuple[str, int]]:
    """One producer standing for each group of producers alike — the same class, read by the
    same classes through the same slots — and how many it stands for."""
    count: dict[tuple, int] = defaultdict(int)
    first: dict[tuple, str] = {}
    text = {name: str(cls) for name, cls in classes.items()}
    for name in facts.nodes:
        readers = tuple(sorted((text[v], slot, index) for v, slot, index in facts.readers.get(name, [])))
        if not readers:
            continue
        key = (text[name], readers, name if classes[name] == name else None)
        count[key] += 1
        first.setdefault(key, name)
    return [(first[key], n) for key, n in sorted(count.items(), key=lambda kv: str(kv[0]))]


def _read_costs(facts: GraphFacts, u: str, classes: Mapping[str, Any], options: Mapping[str, NodeLayouts],
                times: CollectiveTimes) -> list[tuple[list[float], list[tuple[Any, int, list[bool]]]]]:
    """The collective terms of producer ``u``: for each distinct read (forward: output index and
    placement; backward: also the gradient placement), the seconds for each of u's layouts, and
    for each reader (its class, slot) which of its layouts make that read."""
    flows = facts.training and facts.has_grad.get(u, False)
    sizes = facts.output_bytes.get(u, [])
    keys: dict[tuple, list[tuple[Any, int, list[bool]]]] = defaultdict(list)
    for v, slot, index in facts.readers.get(u, []):
        layouts = options[v].layouts
        reads = [(index, l.inputs[slot]) if slot < len(l.inputs) else None for l in layouts]
        for p in sorted({r[1] for r in reads if r is not None}):
            keys[("f", index, p, "")].append((classes[v], slot, [r == (index, p) for r in reads]))
        if flows:
            grads = [(index, l.inputs[slot], gradient_placement(l, slot)) if slot < len(l.inputs) else None
                     for l in layouts]
            for key in sorted({g for g in grads if g is not None}):
                keys[("b",) + key].append((classes[v], slot, [g == key for g in grads]))
    terms = []
    for (direction, index, p, g), readers in sorted(keys.items()):
        costs_s = []
        for layout in options[u].layouts:
            produced = layout.outputs[index] if index < len(layout.outputs) else REPLICATE
            nbytes = sizes[index] if index < len(sizes) else 0
            kind = transition(produced, p) if direction == "f" else transition(g, gradient_target(produced))
            costs_s.append(times(kind, nbytes))
        if any(costs_s):
            terms.append((costs_s, readers))
    return terms


def _eliminate(ids: Mapping[Any, int], unary: Mapping[Any, list[float]], groups: list[tuple[str, int]],
               classes: Mapping[str, Any], options: Mapping[str, NodeLayouts], facts: GraphFacts,
               times: CollectiveTimes) -> dict[Any, int] | None:
    """The exact optimum by variable elimination (:mod:`autosplit.sharding.eliminate`), or None
    when its tables would grow too large."""
    domains = {ids[c]: len(u) for c, u in unary.items()}
    factors = [((ids[c],), np.asarray(u)) for c, u in unary.items()]
    for u, count in groups:
        cu = ids[classes[u]]
        for costs_s, readers in _read_costs(facts, u, classes, options, times):
            scope = tuple(sorted({cu} | {ids[c] for c, _, _ in readers}))
            shape = [domains[w] for w in scope]
            none_reads = np.ones(shape, dtype=bool)  # no reader makes this read
            for c, _, makes in readers:
                axis = scope.index(ids[c])
                view = [1] * len(scope)
                view[axis] = shape[axis]
                none_reads &= ~np.asarray(makes).reshape(view)
            view = [1] * len(scope)
            view[scope.index(cu)] = shape[scope.index(cu)]
            table = count * np.asarray(costs_s).reshape(view) * (~none_reads)
            factors.append((scope, table))
    solved = eliminate(domains, factors)
    if solved is None:
        return None
    best, _ = solved
    return {c: best[i] for c, i in ids.items()}


def _cp_sat(unary: Mapping[Any, list[float]], groups: list[tuple[str, int]], classes: Mapping[str, Any],
            options: Mapping[str, NodeLayouts], facts: GraphFacts, times: CollectiveTimes,
            time_limit_s: float) -> tuple[dict[Any, int], str]:
    """The same problem with OR-Tools CP-SAT (see the module docstring), for graphs whose
    elimination tables grow too large."""
    from ortools.sat.python import cp_model

    cp = cp_model.CpModel()
    x = {c: [cp.NewBoolVar("") for _ in u] for c, u in unary.items()}
    objective: list[tuple[int, Any]] = []
    for c, u in unary.items():
        cp.AddExactlyOne(x[c])
        objective += [(round(s * UNITS_PER_S), x[c][k]) for k, s in enumerate(u) if round(s * UNITS_PER_S)]
    for u, count in groups:
        for costs_s, readers in _read_costs(facts, u, classes, options, times):
            made = list({id(v): v for c, _, makes in readers for v, m in zip(x[c], makes) if m}.values())
            if len(made) == 1:
                z = made[0]
            else:
                z = cp.NewBoolVar("")
                for v in made:
                    cp.AddImplication(v, z)
                cp.Add(z <= sum(made))
            coefs = [round(c * UNITS_PER_S) * count for c in costs_s]
            ws = [cp.NewBoolVar("") for _ in coefs]
            cp.Add(sum(ws) == z)
            for w, xk, coef in zip(ws, x[classes[u]], coefs):
                cp.AddImplication(w, xk)
                if coef:
                    objective.append((coef, w))
    cp.Minimize(sum(c * v for c, v in objective))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    solver.parameters.max_deterministic_time = time_limit_s
    status = solver.Solve(cp)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError(f"CP-SAT found no layout ({solver.StatusName(status)}); the all-replicated one "
                           "is always feasible, so this is a bug")
    picks = {c: next(k for k, v in enumerate(vs) if solver.BooleanValue(v)) for c, vs in x.items()}
    return picks, solver.StatusName(status)


# --------------------------------------------------------------------------- repeated blocks


def _classes(traced: Traced) -> dict[str, Any]:
    """Node -> (template, position) for the nodes of repeated identical blocks (a new dict the
    caller may change; the blocks are found once per captured graph)."""
    graph = traced.graph
    found = _CLASSES.get(graph)
    if found is None or found[0] != len(graph.nodes):
        found = (len(graph.nodes), _find_classes(traced))
        _CLASSES[graph] = found
    return dict(found[1])


_CLASSES: "weakref.WeakKeyDictionary[fx.Graph, tuple[int, dict[str, Any]]]" = weakref.WeakKeyDictionary()
"""Captured graph -> (its node count when seen, its classes): coarsening a 6,000-node graph
takes a few tenths of a second, and a planner asks for every tp and memory weight."""


def _find_classes(traced: Traced) -> dict[str, Any]:
    graph = OpGraph.from_traced(traced)
    blocks = graph.coarsen()
    nodes = {n.name: n for n in traced.graph.nodes}
    by_signature: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for block in blocks:
        members = tuple(blocks[block]["members"])
        if blocks[block]["kind"] != "compute" or len(members) < 2:
            continue
        by_signature[_block_signature(members, nodes)].append(members)
    classes: dict[str, Any] = {}
    for sig, instances in by_signature.items():
        if len(instances) < 2:
            continue
        for members in instances:
            for j, name in enumerate(members):
                classes[name] = (sig, j)
    return classes


def _block_signature(members: tuple[str, ...], nodes: Mapping[str, fx.Node]) -> str:
    """A text of a block's structure: ops, constants, shapes, dtypes and edges (inside: by
    position; from outside: by the value's shape), never names."""
    position = {name: j for j, name in enumerate(members)}

    def describe(value: Any) -> Any:
        if isinstance(value, fx.Node):
            if value.name in position:
                return ("in", position[value.name])
            v = value.meta.get("val")
            return ("out", tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else ("out", repr(v))
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, describe(v)) for k, v in value.items()))
        return repr(value)

    records = []
    for name in members:
        node = nodes[name]
        v = node.meta.get("val")
        shape = (tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else type(v).__name__
        target = "weight" if node.op == "get_attr" else str(node.target) if node.op != "call_module" else "module"
        records.append((node.op, target, describe(node.args), describe(node.kwargs), shape))
    return hashlib.sha256(repr(records).encode()).hexdigest()[:16]
