"""What a stage costs: its work, its traffic and its memory, on the devices of a device order.

    model = StageModel(chain, DeviceOrder.of(cluster, range(4), 0.1), options, cluster)
    model.time_s(1, np.array([3, 5]), 9)                  # stage 1 on ops [3, 9) and [5, 9)
    compute, comm_in, comm_out = evaluate(model, graph, stage_of_op)

``StageModel`` prices a contiguous stage [i, j) of the chain, vectorized over the start i, as the
DP, the order search and the bounds need it; its memory is ``OpsMemory``, the one memory model the
plan and the runtime use too. ``evaluate`` prices any op → stage assignment exactly: each
travelling value hop by hop from its producer's stage to its last reader's, each weight read on
several stages sent once per call from its first reader (``weight_readers``, ``weight_homes``),
and the rebuilt values each stage needs. Every candidate split is compared by it (``_bottleneck``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from autosplit.graph import OpGraph
from autosplit.solver.chain import Chain, chain_travellers, link_load
from autosplit.solver.options import SolverOptions, memory_rules
from cost_models import Cluster, all_reduce_s
from cost_models.memory import (
    MemoryBreakdown,
    OpsMemory,
    Storage,
    device_peak_terms,
    in_flight_profile,
    microbatches_in_flight,
    peak_breakdown,
)

if TYPE_CHECKING:
    from autosplit.solver.orders import DeviceOrder


class StageModel:
    """Time and memory of a stage [i, j) of a chain on a device order, vectorized over i."""

    def __init__(self, chain: Chain, device_order: DeviceOrder, options: SolverOptions, cluster: Cluster):
        self.chain, self.device_order, self.options, self.cluster = chain, device_order, options, cluster
        train = options.mode == "train"
        self.directions = 2 if train else 1
        S = len(device_order)
        self.in_flight = [microbatches_in_flight(options.schedule, num_stages=S, stage=s,
                                                 microbatches=options.microbatches,
                                                 stages_per_device=options.stages_per_device)
                          if train else 1 for s in range(S)]
        self.memory = chain.memory or OpsMemory(
            chain.n, np.diff(chain.param_count),
            [Storage(float(b), k, (k,), (k,)) for k, b in enumerate(np.diff(chain.activation_bytes)) if b > 0],
            train=train)
        self.rules = memory_rules(options)
        self.other_pins = []
        for s in range(S):
            other = (chain.pins >= 0) & (chain.pins != s)
            self.other_pins.append(np.concatenate([[0], np.cumsum(other)]))
        self.pin_span = []
        for s in range(S):
            where = np.nonzero(chain.pins == s)[0]
            self.pin_span.append((int(where.min()), int(where.max())) if len(where) else None)
        self._closure: tuple[OpGraph, np.ndarray, np.ndarray] | None = None
        self.weights = chain.weights
        devices: dict[int, list[int]] = {}
        for s, rank in enumerate(device_order.ranks):
            devices.setdefault(rank, []).append(s)
        self.devices = [tuple(stages) for stages in devices.values()]
        """The stages of each device, devices in the order of their first stage: one stage each,
        but with an interleaved schedule (stage s on the device of stage s mod D)."""
        self._profiles: list[np.ndarray] | None = None

    def closure_work(self, graph: OpGraph) -> tuple[np.ndarray, np.ndarray]:
        """Work of every op with all its ancestors, and with all its descendants, each op priced
        on the fastest device type (computed once per graph)."""
        if self._closure is None or self._closure[0] is not graph:
            chain, n = self.chain, self.chain.n
            work = np.min(np.stack([np.diff(chain.time_s[t]) for t in set(self.device_order.types)]), axis=0)
            position = {op: k for k, op in enumerate(chain.ops)}
            before = [[position[u] for u in graph.dag.predecessors(op) if u in position] for op in chain.ops]
            after: list[list[int]] = [[] for _ in range(n)]
            for k, preds in enumerate(before):
                for j in preds:
                    after[n - 1 - j].append(n - 1 - k)  # the reversed chain, for descendants
            self._closure = (graph, _closure_work(before, work), _closure_work(after, work[::-1])[::-1])
        return self._closure[1], self._closure[2]

    def gradient(self, value: str) -> bool:
        """Whether ``value``'s gradient comes back over the links (training, a weight-dependent value)."""
        return self.directions == 2 and value not in self.chain.no_gradient

    def cluster_link(self, a: int, b: int):
        """The link between the devices of stages a and b."""
        return self.cluster.link(self.device_order.ranks[a], self.device_order.ranks[b])

    def comm_s(self, k: np.ndarray | int, hop: int) -> np.ndarray | float:
        """Seconds per microbatch to move what crosses cut position(s) ``k`` over hop ``hop``."""
        return self.hop_s(self.chain.cross_bytes[k], hop, self.chain.cross_count[k])

    def hop_s(self, nbytes: np.ndarray | float, hop: int, count: np.ndarray | float = 1) -> np.ndarray | float:
        """Seconds per microbatch to make ``count`` transfers of ``nbytes`` in all over hop ``hop``
        (a value's ``link_load``: its gradient coming back included)."""
        return nbytes * self.device_order.hop_s_per_byte[hop] + count * self.device_order.hop_latency_s[hop]

    def rebuild_s(self, s: int, i: np.ndarray | int, j: int) -> np.ndarray | float:
        """Seconds stage s spends on [i, j) rebuilding the replicated values its ops need."""
        c = self.chain
        if not len(c.rebuild_needers):
            return 0.0 * np.asarray(i)
        needed = c.rebuild_next[:, i] < j  # groups × len(i)
        return c.rebuild_time_s[self.device_order.types[s]] @ needed

    def work_s(self, s: int, i: np.ndarray, j: int) -> np.ndarray:
        """Compute seconds of stage s on [i, j): its ops and the values it rebuilds."""
        t = self.chain.time_s[self.device_order.types[s]]
        return t[j] - t[i] + self.rebuild_s(s, i, j)

    def traffic_s(self, s: int, i: np.ndarray, j: int) -> np.ndarray | float:
        """Seconds stage s on [i, j) spends receiving at cut i and sending at cut j."""
        total = self.comm_s(i, s - 1) if s > 0 else 0.0 * np.asarray(i)
        if s < len(self.device_order) - 1:
            total = total + self.comm_s(j, s)
        return total

    def time_s(self, s: int, i: np.ndarray, j: int) -> np.ndarray:
        return self.work_s(s, i, j) + self.traffic_s(s, i, j)

    def memory_bytes(self, s: int, i: np.ndarray, j: int) -> np.ndarray:
        """Peak bytes of stage s on ops [i, j) (``OpsMemory.total_bytes``: the one memory model)."""
        return self.memory.total_bytes(i, j, in_flight=self.in_flight[s], gpu=self.device_order.gpu[s], **self.rules)

    def breakdown(self, s: int, stage_of_op: Sequence[int]) -> MemoryBreakdown:
        """Peak memory by kind of stage s in any op → stage assignment (chain order); equals
        ``memory_bytes`` where the stage is a run of the chain."""
        quantities = self.memory.quantities_of(stage_of_op, s, cpu=not self.device_order.gpu[s])
        return peak_breakdown(quantities, in_flight=self.in_flight[s], gpu=self.device_order.gpu[s], **self.rules)

    def device_breakdown(self, d: int, quantities: Sequence[Mapping[str, float]]) -> MemoryBreakdown:
        """Peak memory by kind of device d (``self.devices[d]``) given its stages' quantities
        (``OpsMemory.quantities``), in stage order: ``device_peak_terms`` with the microbatches
        each holds in flight through the schedule; a device of one stage is that stage's
        ``peak_breakdown``."""
        stages = self.devices[d]
        first = stages[0]
        if len(stages) == 1:
            return peak_breakdown(quantities[0], in_flight=self.in_flight[first], gpu=self.device_order.gpu[first],
                                  **self.rules)
        if self._profiles is None:  # several stages per device: an interleaved schedule, which trains
            S, v = len(self.device_order), self.options.stages_per_device
            self._profiles = [in_flight_profile(self.options.schedule, num_stages=S, stages_per_device=v, device=k,
                                                microbatches=self.options.microbatches)
                              for k in range(len(self.devices))]
        terms = device_peak_terms(quantities, profile=self._profiles[d], gpu=self.device_order.gpu[first], **self.rules)
        return MemoryBreakdown(**{k: float(v) for k, v in terms.items()})

    def device_fits(self, stage_of_op: Sequence[int]) -> bool:
        """Whether every device fits its stages of any op → stage assignment (chain order)."""
        for d, stages in enumerate(self.devices):
            cpu = not self.device_order.gpu[stages[0]]
            quantities = [self.memory.quantities_of(stage_of_op, s, cpu=cpu) for s in stages]
            if self.device_breakdown(d, quantities).total_bytes > self.device_order.capacity_bytes[stages[0]]:
                return False
        return True

    def allowed(self, s: int, i: np.ndarray, j: int) -> np.ndarray:
        ok = self.memory_bytes(s, i, j) <= self.device_order.capacity_bytes[s]
        ok &= (self.other_pins[s][j] - self.other_pins[s][i]) == 0
        span = self.pin_span[s]
        if span is not None:
            ok &= (i <= span[0]) & (j > span[1])
        return ok


def _closure_work(before: Sequence[Sequence[int]], work: np.ndarray) -> np.ndarray:
    """Work of every op with all its ancestors, ops in topological order with their
    predecessors' indices. The ancestor sets are bitsets (Python ints); an op's set is its
    heaviest predecessor's plus the few ops the others add (the branches that rejoin)."""
    sets: list[int] = []
    totals = np.zeros(len(before))
    for k, preds in enumerate(before):
        if preds:
            base = max(preds, key=lambda p: (totals[p], p))
            bits, total = sets[base], float(totals[base])
        else:
            bits, total = 0, 0.0
        extra = 1 << k
        for p in preds:
            extra |= sets[p]
        extra &= ~bits
        bits |= extra
        while extra:
            low = extra & -extra
            total += work[low.bit_length() - 1]
            extra ^= low
        sets.append(bits)
        totals[k] = total
    return totals


@dataclass(frozen=True)
class WeightUse:
    """A parameter or buffer and the chain positions of the ops that compute with it."""

    nbytes: float
    gradient: bool
    """A trainable floating-point parameter: its gradient goes back to where it is stored."""
    readers: tuple[int, ...]


def weight_readers(graph: OpGraph, chain: Chain, weights: Mapping[str, Any]) -> dict[str, WeightUse]:
    """Every parameter and buffer (canonical name) read by the chain's ops, with the positions of
    the ops that compute with it: a module's call (``call_module``) or an op taking the tensor
    from a ``get_attr`` node. ``weights`` maps names to ``TensorInfo`` (nbytes, dtype,
    requires_grad). It is stored on the first stage that reads it (``weight_homes``) and sent
    from there once per call to every other stage that reads it, as the rewriter does."""
    cached = chain.__dict__.get("_weight_readers")
    if cached is not None and cached[0] is graph:
        return cached[1]
    found: dict[str, list[int]] = {}
    for k, op in enumerate(chain.ops):
        if graph.infos[op].op != "get_attr":
            for name in graph.infos[op].reads:
                found.setdefault(name, []).append(k)
    uses = {}
    for name, readers in found.items():
        info = weights.get(name)
        nbytes = info.nbytes if info is not None else 0
        gradient = info is not None and info.requires_grad and info.dtype.is_floating_point
        uses[name] = WeightUse(float(nbytes), gradient, tuple(sorted(set(readers))))
    chain.__dict__["_weight_readers"] = (graph, uses)
    return uses


def weight_homes(uses: Mapping[str, WeightUse], stage_of_op: Sequence[int]) -> dict[str, int]:
    """The stage storing each weight: the first (lowest) stage that reads it."""
    return {name: min(stage_of_op[r] for r in use.readers) for name, use in uses.items()}


def _travel_arrays(model: StageModel, graph: OpGraph) -> tuple[np.ndarray, ...]:
    """The travelling values as arrays (computed once per chain and graph): producer position
    (−1 for a model input), their readers' positions back to back with each value's first index,
    and the bytes and transfers each puts on a link (``link_load``)."""
    chain = model.chain
    cached = chain.__dict__.get("_travel_arrays")
    if cached is None or cached[0] is not graph or cached[1] != model.directions:
        position = {op: k for k, op in enumerate(chain.ops)}
        travellers = chain_travellers(graph, chain)
        producer = np.array([position.get(p, -1) for p in travellers], dtype=np.int64)
        readers = np.array([r for rs in travellers.values() for r in rs], dtype=np.int64)
        starts = np.cumsum([0] + [len(rs) for rs in travellers.values()])[:-1].astype(np.int64)
        loads = np.array([link_load(graph.infos[p], model.gradient(p)) for p in travellers], dtype=float).reshape(-1, 2)
        cached = (graph, model.directions, producer, readers, starts, loads[:, 0], loads[:, 1])
        chain.__dict__["_travel_arrays"] = cached
    return cached[2:]


def evaluate(model: StageModel, graph: OpGraph, stage_of_op: Sequence[int]) -> tuple[list[float], list[float], list[float]]:
    """Compute, incoming and outgoing traffic seconds per stage of any op → stage assignment
    (chain order): every value travels from its producer's stage to its last reader's, hop by hop."""
    chain, order = model.chain, model.device_order
    S = len(order)
    stage = np.asarray(stage_of_op, dtype=np.int64)
    compute = [float(np.diff(chain.time_s[order.types[s]])[stage == s].sum()) for s in range(S)]
    for g, needers in enumerate(chain.rebuild_needers):  # each stage rebuilds the values its ops need
        for s in np.unique(stage[needers]).tolist():
            compute[s] += float(chain.rebuild_time_s[order.types[s]][g])
    comm_in, comm_out = [0.0] * S, [0.0] * S
    _, _, _, nbytes, tensors = _travel_arrays(model, graph)
    for hop, crossing in enumerate(_crossings(model, graph, stage)):
        seconds = float(model.hop_s(nbytes[crossing], hop, tensors[crossing]).sum())
        comm_out[hop] += seconds
        comm_in[hop + 1] += seconds
    # A weight read on several stages lives on the first and goes straight to each other reader
    # once per call, reused by every microbatch (its gradient comes back once): amortized. Held as
    # copies, the readers all-reduce its gradient once per step instead, each paying the collective.
    m = model.options.microbatches
    for use, owner, others in _weight_sends(model, graph, stage):
        if model.options.shared_weights == "copies":
            if use.gradient and model.directions == 2:
                group = [model.device_order.ranks[s] for s in [owner, *others]]
                seconds = float(all_reduce_s(model.cluster, group, use.nbytes)) / m
                for s in [owner, *others]:
                    comm_out[s] += seconds
            continue
        directions = 2 if use.gradient and model.directions == 2 else 1
        for other in others:
            link = model.cluster_link(owner, other)
            seconds = directions * (use.nbytes / link.bandwidth_bytes_per_s + link.latency_s) / m
            comm_out[owner] += seconds
            comm_in[other] += seconds
    return compute, comm_in, comm_out


def _crossings(model: StageModel, graph: OpGraph, stage: np.ndarray) -> list[np.ndarray]:
    """Per hop, which travelling values cross it (``_travel_arrays`` order): produced on the hop's
    stage or before, read after it (returned values are read on the last stage)."""
    S = len(model.device_order)
    producer, readers, starts, _, _ = _travel_arrays(model, graph)
    if not len(producer):
        return [np.zeros(0, dtype=bool)] * (S - 1)
    at = np.append(stage, S - 1)  # position n: the outputs, gathered on the last stage
    first = np.where(producer >= 0, at[np.maximum(producer, 0)], 0)
    last = np.maximum.reduceat(at[readers], starts)
    return [(first <= hop) & (last > hop) for hop in range(S - 1)]


def _weight_sends(model: StageModel, graph: OpGraph, stage: np.ndarray) -> list[tuple[WeightUse, int, list[int]]]:
    """Each weight read on several stages, its home stage and the other stages it is sent to.
    With several stages per device (interleaved schedules) a device holds the weight once: it
    goes to the first stage reading it on each other device, none on the home's device."""
    sends = []
    ranks = model.device_order.ranks
    for use in weight_readers(graph, model.chain, model.weights).values():
        on = sorted(set(stage[list(use.readers)].tolist()))
        first_on_device = {}
        for s in on:
            first_on_device.setdefault(ranks[s], s)
        others = [s for s in first_on_device.values() if ranks[s] != ranks[on[0]]]
        if others:
            sends.append((use, on[0], others))
    return sends


def transfers_per_call(model: StageModel, graph: OpGraph, stage_of_op: Sequence[int]) -> list[int]:
    """Values each stage receives per call in the forward pass, as the runtime moves them: every
    travelling value once per microbatch over each hop it crosses (relayed stage by stage), and
    every weight once per call from its home to each other stage that reads it (none when the
    stages hold copies: ``SolverOptions.shared_weights``)."""
    stage = np.asarray(stage_of_op, dtype=np.int64)
    received = [0] * len(model.device_order)
    for hop, crossing in enumerate(_crossings(model, graph, stage)):
        received[hop + 1] += int(crossing.sum()) * model.options.microbatches
    for _, _, others in _weight_sends(model, graph, stage) if model.options.shared_weights == "sent" else ():
        for other in others:
            received[other] += 1
    return received


def _bottleneck(model: StageModel, graph: OpGraph, assignment: Sequence[int]) -> float:
    """The slowest device's time per microbatch: the sum of its stages' (one, but interleaved)."""
    compute, comm_in, comm_out = evaluate(model, graph, assignment)
    stage_s = [c + i + o for c, i, o in zip(compute, comm_in, comm_out)]
    return max(sum(stage_s[s] for s in stages) for stages in model.devices)
