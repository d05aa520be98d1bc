"""CP-SAT over the block DAG, and over single ops around the cuts.

    found = cp_sat_blocks(model, graph, hint=dp_stage_of_block, options=options, hint_s=dp_bottleneck_s)

A boolean per block and stage, precedence on every edge between blocks, a crossing indicator per
group of tensors and hop, the weights sent between devices, the values each stage rebuilds, and a
linear relaxation of every stage's memory (``_memory_constraints``); minimize the slowest device,
then the traffic. Costs are integer ticks rounded down, so the proven bound stays a bound, and
every split CP-SAT returns is priced again exactly (``evaluate``, ``_fits_memory``).
``_refine_ops`` runs the same model with every op that could move in a better split as a block of
its own: OPTIMAL there proves the split optimal among all op-level splits.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from ortools.sat.python import cp_model

from autosplit.errors import ConfigError
from autosplit.graph import OpGraph
from autosplit.solver.bounds import lower_bound_s
from autosplit.solver.chain import Chain, chain_travellers, link_load
from autosplit.solver.dp import stage_ranges
from autosplit.solver.options import SolverOptions
from autosplit.solver.stage_model import StageModel, weight_readers
from cost_models.memory import (
    FRAGMENTATION,
    GPU_CONTEXT_BYTES,
    OPTIMIZER_STATES,
    OPTIMIZER_STEP_TEMPORARIES,
    TRAINING_PRECISIONS,
    data_parallel_factors,
    weight_bytes,
)

logger = logging.getLogger(__name__)


@dataclass
class CpResult:
    assignment: list[int]
    """Stage of every block, in chain order."""
    bottleneck_s: float
    status: str
    bound_s: float
    wall_s: float


def cp_sat_blocks(model: StageModel, graph: OpGraph, hint: Sequence[int] | None,
                  options: SolverOptions, hint_s: float | None = None,
                  ranges: tuple[np.ndarray, np.ndarray] | None = None) -> CpResult | None:
    """Assign a stage to every block (any DAG split, not only chain intervals), minimizing the
    bottleneck (the slowest device: the sum of its stages' times where it runs several), then
    the traffic. Returns None when CP-SAT finds no feasible assignment.

    ``hint`` (a stage per block) with its bottleneck ``hint_s`` bounds the search from above; the
    lower bound of the problem bounds it from below. When CP-SAT proves the hint optimal, the
    hint is kept: it already has the least traffic among the chain splits of that bottleneck.
    ``ranges`` (``stage_ranges`` at ``hint_s``, per op) confine each block to the stages its ops
    can take in a split at least as good as the hint.
    """
    chain, order = model.chain, model.device_order
    S, B = len(order), len(chain.block_names)
    bounds = chain.block_starts + [chain.n]
    block_of_op = np.zeros(chain.n, dtype=np.int64)
    for b in range(B):
        block_of_op[bounds[b]:bounds[b + 1]] = b
    position = {op: k for k, op in enumerate(chain.ops)}

    # Integer ticks: the total work of the slowest device type spread over ~10^6 ticks. Costs are
    # rounded down, so the model never prices a split above its true time and its bound holds.
    total = max(chain.time_s[t][-1] for t in set(order.types))
    tick_s = max(total, 1e-12) / 1e6
    ticks = lambda seconds: int(round(seconds / tick_s))  # noqa: E731
    cost_ticks = lambda seconds: int(seconds / tick_s)  # noqa: E731

    if ranges is not None:
        first = [int(ranges[0][bounds[b]:bounds[b + 1]].max()) for b in range(B)]
        last = [int(ranges[1][bounds[b]:bounds[b + 1]].min()) for b in range(B)]
    else:
        first, last = [0] * B, [S - 1] * B
    if any(f > l for f, l in zip(first, last)):
        return None

    m = cp_model.CpModel()
    y = [[m.new_bool_var(f"y{b}_{s}") for s in range(S)] for b in range(B)]
    x = [m.new_int_var(first[b], last[b], f"x{b}") for b in range(B)]
    for b in range(B):
        m.add_exactly_one(y[b])
        m.add(x[b] == sum(s * y[b][s] for s in range(S)))
        for s in itertools.chain(range(first[b]), range(last[b] + 1, S)):
            m.add(y[b][s] == 0)
    for s in range(S):
        m.add(sum(y[b][s] for b in range(B)) >= 1)
        span = model.pin_span[s]
        if span is not None:
            for b in set(block_of_op[span[0]:span[1] + 1].tolist()):
                m.add(y[b][s] == 1)
    for b in range(B):
        pinned = {int(p) for p in chain.pins[bounds[b]:bounds[b + 1]] if p >= 0}
        if len(pinned) > 1:
            raise ConfigError(f"block {chain.block_names[b]} holds ops pinned to stages {sorted(pinned)}: "
                             "pin whole blocks (e.g. a layer) to one stage")

    # Tensors between blocks, grouped by (producer block, consumer blocks, weight): producer −1
    # stands for the model's inputs, which enter at stage 0.
    groups: dict[tuple[int, tuple[int, ...]], list[float]] = {}
    for producer, readers in chain_travellers(graph, chain).items():
        p_block = int(block_of_op[position[producer]]) if producer in position else -1
        # a returned value (read at position n) is priced up to the stage of the last block
        consumers = tuple(sorted({int(block_of_op[min(r, chain.n - 1)]) for r in readers} - {p_block}))
        if not consumers:
            continue
        entry = groups.setdefault((p_block, consumers), [0.0, 0])
        nbytes, tensors = link_load(graph.infos[producer], model.gradient(producer))
        entry[0] += nbytes
        entry[1] += tensors
    for u, v in blocks_dag_edges(chain, graph, block_of_op):
        m.add(x[u] <= x[v])

    stage_terms: list[list[Any]] = [[] for _ in range(S)]
    comm_terms: list[Any] = []
    hint_ticks = [0] * S  # the hint's stage times as this model prices them
    for (p, consumers), (nbytes, count) in groups.items():
        for hop in range(S - 1):
            seconds = model.hop_s(nbytes, hop, count)
            cost = cost_ticks(seconds)
            if hint is not None and (0 if p < 0 else hint[p]) <= hop < max(hint[c] for c in consumers):
                hint_ticks[hop] += cost
                hint_ticks[hop + 1] += cost
            if cost == 0 or (p >= 0 and first[p] > hop) or all(last[c] <= hop for c in consumers):
                continue  # free, or it cannot cross this hop
            cross = m.new_bool_var("")
            beyond = m.new_bool_var("")
            for c in consumers:
                for s in range(max(hop + 1, first[c]), last[c] + 1):
                    m.add_implication(y[c][s], beyond)
            up_to = 1 if p < 0 else sum(y[p][s] for s in range(hop + 1))
            m.add(cross >= up_to + beyond - 1)
            stage_terms[hop].append(cost * cross)
            stage_terms[hop + 1].append(cost * cross)
            comm_terms.append(cost * cross)

    # A weight read in several blocks lives with its first reader and goes once per step to each
    # other device that reads it (as `evaluate` prices it), over the cheapest link: a lower bound.
    # With one stage per device a device is a stage; interleaved, a device's stages share it.
    devices = model.devices
    D = len(devices)
    device_of = {s: d for d, stages in enumerate(devices) for s in stages}
    pairs = [(a[0], b[0]) for a in devices for b in devices if a != b]
    link_s_per_byte = min((1 / model.cluster_link(a, b).bandwidth_bytes_per_s for a, b in pairs), default=0.0)
    link_latency_s = min((model.cluster_link(a, b).latency_s for a, b in pairs), default=0.0)

    def on(b: int, stages: Sequence[int]) -> Any:
        """1 when block b runs on one of ``stages`` (a device's), else 0."""
        return sum(y[b][s] for s in stages)

    for use in weight_readers(graph, chain, chain.weights).values():
        owner = int(block_of_op[use.readers[0]])
        others = sorted({int(block_of_op[r]) for r in use.readers} - {owner})
        if not others or D == 1:
            continue
        directions = 2 if use.gradient and model.directions == 2 else 1
        cost = cost_ticks(directions * (use.nbytes * link_s_per_byte + link_latency_s) / options.microbatches)
        if cost == 0:
            continue
        away = []
        for stages in devices:  # the device reads the weight, and does not own it
            d = m.new_bool_var("")
            for r in others:
                m.add(d >= on(r, stages) - on(owner, stages))
            away.append(d)
            stage_terms[stages[0]].append(cost * d)
            comm_terms.append(cost * d)
        for stages in devices:  # the owner sends it to each of them
            e = m.new_int_var(0, D - 1, "")
            m.add(e >= sum(away) - (D - 1) * (1 - on(owner, stages)))
            stage_terms[stages[0]].append(cost * e)
        if hint is not None:
            readers_at = {device_of[hint[r]] for r in others} - {device_of[hint[owner]]}
            for d in readers_at:
                hint_ticks[devices[d][0]] += cost
            hint_ticks[devices[device_of[hint[owner]]][0]] += cost * len(readers_at)

    # A stage rebuilds each group of replicated values that one of its ops needs.
    for g, needers in enumerate(chain.rebuild_needers):
        needing = sorted({int(block_of_op[k]) for k in needers.tolist()})
        for s in range(S):
            cost = cost_ticks(chain.rebuild_time_s[order.types[s]][g])
            here = [b for b in needing if first[b] <= s <= last[b]]
            if cost == 0 or not here:
                continue
            rebuilds = m.new_bool_var("")
            for b in here:
                m.add_implication(y[b][s], rebuilds)
            stage_terms[s].append(cost * rebuilds)
            if hint is not None and any(hint[b] == s for b in here):
                hint_ticks[s] += cost

    block_ticks = []
    for s in range(S):
        t = chain.time_s[order.types[s]]
        block_ticks.append([cost_ticks(t[bounds[b + 1]] - t[bounds[b]]) for b in range(B)])
        if hint is not None:
            hint_ticks[s] += sum(block_ticks[s][b] for b in range(B) if hint[b] == s)
    slack = 2 * (B + len(groups) + len(chain.rebuild_needers)) + 10  # rounding of every term to whole ticks
    lowest = max(0, ticks(lower_bound_s(model)) - slack)
    hint_device_ticks = max(sum(hint_ticks[s] for s in stages) for stages in model.devices)
    highest = max(ticks(hint_s), hint_device_ticks) + slack if hint_s is not None else ticks(total) * 4 + 10**6
    bottleneck = m.new_int_var(lowest, max(highest, lowest), "bottleneck")
    for stages in model.devices:  # a device's time: its stage's, or the sum of its stages' (interleaved)
        m.add(bottleneck >= sum(block_ticks[s][b] * y[b][s] for s in stages for b in range(B))
              + sum(term for s in stages for term in stage_terms[s]))
    _memory_constraints(m, model, y, bounds, block_of_op, first, last)
    if hint is not None:
        for b in range(B):
            for s in range(S):
                m.add_hint(y[b][s], hint[b] == s)
    m.minimize(bottleneck)

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = options.workers
    solver.parameters.interleave_search = True
    solver.parameters.random_seed = options.seed
    solver.parameters.max_deterministic_time = options.time_limit_s
    solver.parameters.max_time_in_seconds = options.time_limit_s * 20  # a safety net: the deterministic limit decides
    start = time.perf_counter()
    status = solver.solve(m)
    logger.debug("cp-sat: %d blocks, %s in %.2f s", B, solver.status_name(status), solver.wall_time)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    best, bound, proven = solver.objective_value, solver.best_objective_bound, status == cp_model.OPTIMAL
    if proven and hint is not None and hint_s is not None and best >= hint_device_ticks:
        return CpResult(list(hint), hint_s, "OPTIMAL", min(bound * tick_s, hint_s), time.perf_counter() - start)
    # Second phase: the same bottleneck, least traffic.
    m.add(bottleneck <= int(round(best)))
    m.clear_hints()
    for b in range(B):
        for s in range(S):
            m.add_hint(y[b][s], bool(solver.value(y[b][s])))
    first = [[bool(solver.value(y[b][s])) for s in range(S)] for b in range(B)]
    if comm_terms:  # a polish: a quarter of the time
        m.minimize(sum(comm_terms))
        solver.parameters.max_deterministic_time = options.time_limit_s / 4
        solver.parameters.max_time_in_seconds = options.time_limit_s * 5
        status2 = solver.solve(m)
    else:
        status2 = cp_model.UNKNOWN
    chosen = ([[bool(solver.value(y[b][s])) for s in range(S)] for b in range(B)]
              if status2 in (cp_model.OPTIMAL, cp_model.FEASIBLE) else first)
    assignment = [row.index(True) for row in chosen]
    return CpResult(assignment, best * tick_s, "OPTIMAL" if proven else "FEASIBLE", bound * tick_s,
                    time.perf_counter() - start)


def blocks_dag_edges(chain: Chain, graph: OpGraph, block_of_op: np.ndarray) -> set[tuple[int, int]]:
    """Precedence between blocks: every op-level edge between two different blocks."""
    position = {op: k for k, op in enumerate(chain.ops)}
    edges = set()
    for u, v in graph.dag.edges:
        if u in position and v in position:
            a, b = int(block_of_op[position[u]]), int(block_of_op[position[v]])
            if a != b:
                edges.add((a, b))
    return edges


MEMORY_UNITS_PER_BYTE = 20
"""CP-SAT prices memory in 1/20 bytes, so that the GPU's 5% fragmentation allowance is integral."""


def _memory_constraints(m: cp_model.CpModel, model: StageModel, y: list[list[Any]], bounds: Sequence[int],
                        block_of_op: np.ndarray, first: Sequence[int], last: Sequence[int]) -> None:
    """A relaxation of every stage's memory (``OpsMemory``, ``peak_terms``) as linear constraints
    on the block → stage booleans ``y``, in 1/20 bytes: no split that fits is cut off, so
    CP-SAT's bound stays a bound, and every split it returns is priced again with the exact model
    (``_fits_memory``) before it is used.

    Parameters and saved tensors add up over the stage's blocks, exactly: a tensor saved in one
    block is that block's; one saved in several gets a boolean per stage, true when any of them
    is on it, so it counts once. Training holds the saved tensors of every in-flight microbatch
    (the microbatch being run adds its gradients and temporaries: at least 0); inference holds
    at least, at each op, its inputs, its output and its temporaries (``OpsMemory.floor_bytes``).
    """
    memory, order, rules = model.memory, model.device_order, model.rules
    S, B = len(order), len(bounds) - 1
    train = rules["mode"] == "train"
    unit = MEMORY_UNITS_PER_BYTE
    params = [float(memory.params(bounds[b], bounds[b + 1])) for b in range(B)]
    own = [0.0] * B
    shared: dict[tuple[int, ...], float] = {}
    for tensor in memory.tensors if train else ():
        if not tensor.savers:
            continue
        held = tuple(sorted({int(block_of_op[k]) for k in tensor.savers}))
        if len(held) == 1:
            own[held[0]] += tensor.nbytes
        else:
            shared[held] = shared.get(held, 0.0) + tensor.nbytes
    beyond = [0.0 if train else float(memory.floor_bytes(bounds[b], bounds[b + 1])) for b in range(B)]
    for s in range(S):
        here = [b for b in range(B) if first[b] <= s <= last[b]]
        if not here:
            continue
        placeable = set(here)
        gpu = order.gpu[s]
        frag = FRAGMENTATION if gpu else 0.0
        scale = 1 + frag
        capacity = int(math.floor((order.capacity_bytes[s] - (GPU_CONTEXT_BYTES if gpu else 0.0)) * unit))
        saved = [math.ceil(own[b]) * y[b][s] for b in here]
        for held, nbytes in shared.items():
            on = [b for b in held if b in placeable]
            if on:
                u = m.new_bool_var("")
                for b in on:
                    m.add_implication(y[b][s], u)
                saved.append(math.ceil(nbytes) * u)
        top = max((beyond[b] for b in here), default=0.0)
        run = m.new_int_var(0, int(math.ceil(top)), "")
        for b in here:
            if beyond[b] > 0:
                m.add(run >= int(math.ceil(beyond[b])) * y[b][s])
        f = model.in_flight[s]
        if train:
            p = TRAINING_PRECISIONS[rules["precision"]]
            states = OPTIMIZER_STATES[rules["optimizer"].lower()]
            held, sharded = data_parallel_factors(rules["data_parallel"])
            state_per_param = ((p.weight_bytes + p.grad_bytes) * held
                               + (p.master_bytes + states * p.state_bytes) * sharded)
            step_per_param = p.state_bytes * OPTIMIZER_STEP_TEMPORARIES * sharded if states else 0.0
            # a microbatch: state and in-flight activations live (with fragmentation)
            m.add(sum(math.ceil(params[b] * scale * state_per_param * unit) * y[b][s] for b in here)
                  + round(scale * f * unit) * sum(saved) + unit * run <= capacity)
            # the optimizer step: activations freed (but their fragmentation), its temporaries live
            m.add(sum(math.ceil(params[b] * (scale * state_per_param + step_per_param) * unit) * y[b][s] for b in here)
                  + round(frag * f * unit) * sum(saved) <= capacity)
        else:
            per_param = weight_bytes(1, rules["weight_dtype"])
            m.add(sum(math.ceil(params[b] * scale * per_param * unit) * y[b][s] for b in here)
                  + round(scale * unit) * run <= capacity)


def _fits_memory(model: StageModel, stage_of_op: Sequence[int]) -> bool:
    """Whether every device fits its stages of an op → stage assignment (the exact model)."""
    return model.device_fits(stage_of_op)


OPS_CHOICES_PER_S = 12_000
"""Op-stage choices (each op that may move × the stages it may take) the op-level CP-SAT frees
per second of ``OPS_TIME_S``; beyond, only the ops within ``WINDOW_OPS`` of a cut.
Measured on gpt2-xl: 4,398 choices (8 stages) proven optimal in 0.5 s; 11,649 (16 stages) ran
out of the 0.5 s before even keeping its warm start, where the window improved the plan by 1%."""

WINDOW_OPS = 10
"""Ops on each side of a cut that may move when there are too many choices."""

OPS_TIME_S = 0.5
"""Deterministic time limit of the op-level CP-SAT (at most the solver's own limit)."""


def ops_time_limit_s(options: SolverOptions) -> float:
    """The op-level CP-SAT's time limit: ``OPS_TIME_S``, or the solver's own if shorter."""
    return min(options.time_limit_s, OPS_TIME_S)


def _refine_ops(model: StageModel, graph: OpGraph, assignment: Sequence[int], bottleneck: float,
                options: SolverOptions, notes: list[str] | None = None) -> tuple[CpResult, list[int], bool] | None:
    """CP-SAT with every op that could move in a split better than ``assignment`` (see
    ``stage_ranges``) as a block of its own, the others fixed, hinted and bounded by
    ``assignment``. Returns the result, its split per op, and whether every such op was free (then
    an OPTIMAL status proves the split optimal over all op-level splits on this device order).
    Appends to ``notes`` why it returns None or leaves ops fixed."""
    notes = notes if notes is not None else []
    chain = model.chain
    n = chain.n
    first, last = stage_ranges(model, graph, bottleneck)
    stage = np.asarray(assignment)
    if np.any(stage < first) or np.any(stage > last):  # priced differently from the ranges
        notes.append("op-level CP-SAT skipped: the plan lies outside the stage ranges of its own bottleneck")
        return None
    free = last > first
    choices = int((last - first + 1)[free].sum())
    most = OPS_CHOICES_PER_S * OPS_TIME_S
    complete = choices <= most
    if not complete:  # too many: the ops around the cuts
        notes.append(f"op-level CP-SAT moved only ops within {WINDOW_OPS} of a cut: {int(free.sum())} could move "
                     f"with {choices} op-stage choices, more than the {most:.0f} it takes in {OPS_TIME_S:g} s")
        near = np.zeros(n, dtype=bool)
        for cut in np.nonzero(np.diff(stage))[0] + 1:
            near[max(0, cut - WINDOW_OPS):cut + WINDOW_OPS + 1] = True
        free &= near
    low, high = np.where(free, first, stage), np.where(free, last, stage)
    starts = [k for k in range(n) if k == 0 or (k not in chain.forbidden and (
        free[k] or free[k - 1] or low[k] != low[k - 1] or high[k] != high[k - 1]))]
    fine = dataclasses.replace(chain, block_starts=starts, block_names=[chain.ops[k] for k in starts])
    single = StageModel(fine, model.device_order, options, model.cluster)
    limited = dataclasses.replace(options, time_limit_s=ops_time_limit_s(options))
    found = cp_sat_blocks(single, graph, [assignment[k] for k in starts], limited, bottleneck, ranges=(low, high))
    if found is None:
        notes.append(f"op-level CP-SAT found no split within its time limit ({limited.time_limit_s:g} s)")
        return None
    bounds = starts + [n]
    per_op = [found.assignment[b] for b in range(len(starts)) for _ in range(bounds[b + 1] - bounds[b])]
    return found, per_op, complete
