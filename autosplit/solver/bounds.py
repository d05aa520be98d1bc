"""Lower bounds on the bottleneck of every split, against which each plan is reported.

    lower_s = traffic_bound_s(model, graph, incumbent_s=bottleneck_s)

``lower_bound_s``: max(total work ÷ combined speed of the devices, heaviest op on the fastest
device). ``traffic_bound_s`` raises it on identical devices by the traffic every split faster
than the incumbent must send: per hop, a minimum cut (OR-Tools max flow) among the splits that
``stage_ranges`` allows, which the mean stage pays twice (sent by one stage, received by the next).
"""

from __future__ import annotations

import numpy as np
from ortools.graph.python import max_flow

from autosplit.graph import OpGraph
from autosplit.solver.chain import chain_travellers
from autosplit.solver.dp import stage_ranges
from autosplit.solver.stage_model import StageModel, _travel_arrays


def lower_bound_s(model: StageModel) -> float:
    """max(total work ÷ combined speed of the stages' devices, heaviest op on the fastest device).
    A device that runs several stages (interleaved) counts once: the bound is on its time."""
    chain, order = model.chain, model.device_order
    kinds = dict(zip(order.ranks, order.types))  # one entry per device
    work = [chain.time_s[t][-1] for t in kinds.values()]
    combined = 1 / sum(1 / w for w in work) if all(w > 0 for w in work) else 0.0
    per_op = np.min(np.stack([np.diff(chain.time_s[t]) for t in set(order.types)]), axis=0)
    return max(combined, float(per_op.max()) if len(per_op) else 0.0)


def traffic_bound_s(model: StageModel, graph: OpGraph, incumbent_s: float, *,
                    notes: list[str] | None = None) -> float:
    """A lower bound on the bottleneck that adds the traffic every split must send, given a split
    of bottleneck ``incumbent_s``: on identical devices, min(incumbent, (work + 2 · Σ_k least
    traffic over cut k) ÷ D) for D devices. The stages' times add up to the work plus each cut's
    traffic twice (sent by one stage, received by the next), and the slowest device is at least
    their mean (with one stage per device, D = S; interleaved, each device sums its stages,
    each of which is then at most the incumbent, so the ranges below hold too).

    The least traffic over cut k is a minimum cut (OR-Tools max flow): among the ideals of the op
    DAG (all of an op's ancestors with it) that put every op on its side of cut k as
    ``stage_ranges`` allows for any split at most ``incumbent_s``, the one whose crossing values
    cost least on hop k.
    Splits above the incumbent are bounded by the incumbent itself. Memory is ignored, so the
    bound holds for every split; mixed devices get the work bound (``lower_bound_s``). Where the
    max flow fails, the work bound is returned and ``notes`` says why.
    """
    chain, order = model.chain, model.device_order
    S = len(order)
    plain = lower_bound_s(model)
    tick_s = incumbent_s / 1e9
    if S == 1 or len(set(order.types)) > 1 or not np.isfinite(incumbent_s):
        return plain
    first, last = stage_ranges(model, graph, incumbent_s)
    if np.any(first > last):
        return incumbent_s  # nothing fits below the incumbent: it is optimal
    position = {op: k for k, op in enumerate(chain.ops)}
    producer, flat_readers, starts, nbytes, tensors = _travel_arrays(model, graph)
    readers = [sorted(set(r)) for r in chain_travellers(graph, chain).values()]
    first, last = np.append(first, S - 1), np.append(last, S - 1)  # position n: the returned values
    inputs = producer < 0
    # Producers of model inputs sit on stage 0 and never move.
    p_first = np.where(inputs, 0, first[np.maximum(producer, 0)])
    p_last = np.where(inputs, 0, last[np.maximum(producer, 0)])
    r_first = np.maximum.reduceat(first[flat_readers], starts)  # the reader that can start latest
    r_last = np.maximum.reduceat(last[flat_readers], starts)
    # A weight sends nothing along the pipeline and needs nothing before it: it can always sit
    # on the early side of a cut, so it is left out of the cuts.
    weight = np.array([graph.infos[op].op == "get_attr" for op in chain.ops] + [False], dtype=bool)
    pairs = [(position[a], position[b]) for a, b in graph.dag.edges if a in position and b in position]
    u = np.array([a for a, _ in pairs], dtype=np.int64)
    v = np.array([b for _, b in pairs], dtype=np.int64)
    least = 0.0
    for hop in range(S - 1):
        seconds = model.hop_s(nbytes, hop, tensors)
        # Always crossing: produced surely before the cut, read surely after it.
        least += float(seconds[(p_last <= hop) & (r_first > hop)].sum())
        free = (first <= hop) & (last > hop) & ~weight
        node = lambda k: k + 2 if free[k] else (0 if last[k] <= hop or weight[k] else 1)  # noqa: E731
        arcs: list[tuple[int, int, int]] = []  # capacity −1: infinite
        touching = free[u] | free[v]
        for a, b in zip(u[touching].tolist(), v[touching].tolist()):
            x, y = node(a), node(b)
            if x != y and x != 0 and y != 1:
                arcs.append((y, x, -1))  # b inside needs a inside
        maybe = np.nonzero((p_first <= hop) & (r_last > hop) & ~((p_last <= hop) & (r_first > hop)))[0]
        for relay, index in enumerate(maybe.tolist(), start=chain.n + 2):
            arcs.append((0 if producer[index] < 0 else node(int(producer[index])), relay,
                         int(seconds[index] / tick_s)))  # rounded down: the bound stays a bound
            arcs.extend((relay, r, -1) for r in {node(r) for r in readers[index]} - {0})
        flow = max_flow.SimpleMaxFlow()
        infinite = sum(c for _, _, c in arcs if c > 0) + 1
        for a, b, c in arcs:
            flow.add_arc_with_capacity(a, b, c if c >= 0 else infinite)
        solved = flow.solve(0, 1)
        if solved != flow.OPTIMAL or flow.optimal_flow() >= infinite:
            why = (f"max flow status {solved}" if solved != flow.OPTIMAL else
                   "the stage ranges contradict each other")  # not a valid incumbent
            if notes is not None:
                notes.append(f"the traffic bound fell back to the work bound: {why} on hop {hop}")
            return plain
        least += flow.optimal_flow() * tick_s
    work = chain.time_s[order.types[0]][-1]
    return max(plain, min(incumbent_s, (work + 2 * least) / len(set(order.ranks))))
