"""Interleaved 1F1B: several stages on every device, priced and split.

    plan = solve(graph, Cluster.parse("4xh100"), SolverOptions(schedule="interleaved-1f1b",
                 stages_per_device=2, microbatches=8), costs=costs, parameters=traced.parameters)
    plan.device_stages()          # {0: (0, 4), 1: (1, 5), 2: (2, 6), 3: (3, 7)}

The problem. The model is cut into S = v·D contiguous stages, as for one stage per device, and
stage s runs on the (s mod D)-th device of the pipeline's device order: the looped placement of
Megatron-LM's interleaved schedule (Narayanan et al. 2021, §2.2) and of PyTorch's
``ScheduleInterleaved1F1B``, which the distributed runtime runs. Every microbatch passes each
device v times, so the pipeline fills and drains in D − 1 stage times instead of D − 1 device
times: the bubble shrinks v-fold, for v-fold traffic. What is priced:

* Time. A stage costs what it would alone: its compute, receiving at its start and sending at
  its end over the link between its device and its neighbours' (consecutive stages are always
  on different devices). A device's time per microbatch is the sum of its stages' times, and the
  slowest device's is the pipeline's period, ``Plan.bottleneck_s``; the step is m × bottleneck +
  (D − 1) × the slowest stage (``autosplit.schedule.pipeline_times``). A weight read by two
  stages of one device is read there, not sent.
* Memory. A device holds the training state of all its stages, and the saved activations of
  the microbatches each stage has in flight at the worst moment of the device's order of work
  (``cost_models.memory.in_flight_profile``, ``device_peak_terms``). Every stage must also fit
  its device alone (the ``StageModel`` check, with ``microbatches_in_flight`` for the stage).

The search is ``solve``'s, with the slowest device in place of the slowest stage: CP-SAT
(``cp_sat_blocks``) bounds each device's sum of stage times, and prices a weight once per
device that reads it. What changes are the two steps that rest on the exact interval DP, which
does not apply: the slowest device's sum does not decompose along the chain. They become:

1. ``chain_dp`` over the S stages of the looped device order minimizes the slowest *stage*, each stage
   fitting its device alone (necessary for the device to fit); a device's sum is then at most v
   times that. Where that split overflows a device, the DP runs again with each stage held to a
   falling share of its device's memory, down to 1/v beyond the CUDA context, where its split
   surely fits (``split``).
2. ``balance_devices`` moves one cut at a time to the position between its neighbours that
   lowers the device times most (the device times sorted from the slowest, compared in order,
   so a plateau of equal devices still moves), as long as every device fits, until no cut can
   move. Each move strictly lowers that vector, so the descent ends. The device times are the
   plan's (``DevicePricing``: as ``evaluate`` prices a split, weights sent between devices
   included).

This runs on block boundaries for every device order (``choose_order``: the orders of the D
devices as ``device_orders`` lists them, up to ``ORDERS_PRICED``), and again in the refinement
on every op position where a cut of a split at least as good can fall (``stage_ranges`` at the
device bottleneck hold: each stage of such a split takes at most that). The bound is the work
and the least traffic spread over the D devices (``lower_bound_s``, ``traffic_bound_s``); the
op-level CP-SAT proves a plan optimal on its device order, or reports the gap.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from autosplit.errors import ConfigError, InfeasibleError
from autosplit.graph import OpGraph
from autosplit.solver import (
    ORDERS_PRICED,
    Chain,
    DeviceOrder,
    OrderChoice,
    SolverOptions,
    StageModel,
    chain_dp,
    device_kinds,
    device_orders,
    order_count,
    weight_readers,
)
from autosplit.solver.infeasible import _fits
from cost_models import Cluster
from cost_models.memory import GPU_CONTEXT_BYTES, INTERLEAVED, interleaved_rounds

logger = logging.getLogger(__name__)

BALANCE_SWEEPS = 200
"""Most passes of ``balance_devices`` over the cuts (each pass that moves nothing ends it sooner)."""


def looped_order(cluster: Cluster, order: Sequence[int], stages_per_device: int, headroom: float) -> DeviceOrder:
    """The device order of v·D stages on the D devices ``order`` (cluster ranks): stage s on ``order[s mod D]``."""
    D = len(order)
    return DeviceOrder.of(cluster, [order[s % D] for s in range(D * stages_per_device)], headroom)


class DevicePricing:
    """Time and memory of every device of a looped device order, for splits given by their cut
    positions (``bounds``: 0, the S − 1 cuts, n), as ``evaluate`` and ``StageModel`` price them."""

    def __init__(self, model: StageModel, graph: OpGraph | None):
        self.model = model
        self.devices = len(model.devices)
        self.stages_per_device = len(model.device_order) // self.devices
        self._quantities: dict[tuple[int, int, bool], dict[str, float]] = {}
        self.shared_weights: list[tuple[np.ndarray, int, float]] = []
        """Weights read at several chain positions (none without ``graph``): (reader positions,
        directions, bytes)."""
        uses = weight_readers(graph, model.chain, model.weights).values() if graph is not None else ()
        for use in uses:
            readers = np.array(sorted(set(use.readers)), dtype=np.int64)
            if len(readers) > 1:
                directions = 2 if use.gradient and model.directions == 2 else 1
                self.shared_weights.append((readers, directions, use.nbytes))

    def split_times(self, bounds: Sequence[int]) -> np.ndarray:
        """Each device's time per microbatch in the split: its stages' and its weight sends."""
        return self.device_times(self.stage_times(bounds)) + self.weight_times(bounds)

    def weight_times(self, bounds: Sequence[int]) -> np.ndarray:
        """Seconds per microbatch each device spends on weights read on several devices: the
        device of the first stage reading one sends it to each other device reading it, once
        per call (``evaluate``'s ``_weight_sends``)."""
        model, D = self.model, self.devices
        seconds = np.zeros(D)
        for readers, directions, nbytes in self.shared_weights:
            stages = np.unique(np.searchsorted(bounds, readers, side="right") - 1)
            home = int(stages[0])
            first_on = {}
            for s in stages.tolist():
                first_on.setdefault(s % D, s)
            for device, s in first_on.items():
                if device != home % D:
                    link = model.cluster_link(home, s)
                    each = directions * (nbytes / link.bandwidth_bytes_per_s + link.latency_s) / model.options.microbatches
                    seconds[home % D] += each
                    seconds[device] += each
        return seconds

    def stage_times(self, bounds: Sequence[int]) -> np.ndarray:
        """Seconds per microbatch of every stage (compute and traffic, as ``StageModel.time_s``)."""
        return np.array([float(self.model.time_s(s, np.array([bounds[s]]), bounds[s + 1])[0])
                         for s in range(len(bounds) - 1)])

    def device_times(self, stage_times: np.ndarray) -> np.ndarray:
        """Each device's time per microbatch: the sum of its stages' (stage s on device s mod D)."""
        return stage_times.reshape(self.stages_per_device, self.devices).sum(axis=0)

    def times_to_ends(self, s: int, i: int, ends: np.ndarray) -> np.ndarray:
        """``StageModel.time_s`` of stage s from position i to each of ``ends`` (many ends at once)."""
        model, chain = self.model, self.model.chain
        t = chain.time_s[model.device_order.types[s]]
        seconds = t[ends] - t[i]
        if len(chain.rebuild_needers):
            needed = chain.rebuild_next[:, i][:, None] < ends[None, :]
            seconds = seconds + chain.rebuild_time_s[model.device_order.types[s]] @ needed
        if s > 0:
            seconds = seconds + model.comm_s(i, s - 1)
        if s < len(model.device_order) - 1:
            seconds = seconds + model.comm_s(ends, s)
        return seconds

    def memory_bytes(self, bounds: Sequence[int], device: int) -> float:
        """Peak bytes of ``device`` (its position along the pipeline) running its stages of the
        split (``StageModel.device_breakdown``)."""
        stages = self.model.devices[device]
        cpu = not self.model.device_order.gpu[stages[0]]
        quantities = [self._run(bounds[s], bounds[s + 1], cpu) for s in stages]
        return self.model.device_breakdown(device, quantities).total_bytes

    def fits(self, bounds: Sequence[int], devices: Sequence[int] | None = None) -> bool:
        """Whether ``devices`` (default: all) fit their memory."""
        capacity = self.model.device_order.capacity_bytes
        return all(self.memory_bytes(bounds, d) <= capacity[d]
                   for d in (range(self.devices) if devices is None else devices))

    def _run(self, i: int, j: int, cpu: bool) -> dict[str, float]:
        key = (i, j, cpu)
        if key not in self._quantities:
            self._quantities[key] = self.model.memory.quantities(i, j, cpu)
        return self._quantities[key]


def balance_devices(pricing: DevicePricing, candidates: Sequence[int], cuts: Sequence[int]) -> list[int]:
    """Coordinate descent on the cuts (see the module docstring): each cut moves, among
    ``candidates`` strictly between its neighbours, to where the device times sorted from the
    slowest are least in lexicographic order, if that is less than now, the two stages it
    bounds fit their device alone and the two devices fit. ``cuts`` must fit."""
    model = pricing.model
    n, S, D = model.chain.n, len(model.device_order), pricing.devices
    c = np.array(sorted(set(candidates)), dtype=np.int64)
    bounds = [0, *cuts, n]
    times = pricing.stage_times(bounds)
    scale = max(float(pricing.split_times(bounds).max()), 1e-30)

    def key(device_times: np.ndarray) -> np.ndarray:  # slowest first, rounded so that noise cannot cycle
        return np.round(-np.sort(-device_times, axis=-1) / scale, 12)

    for _ in range(BALANCE_SWEEPS):
        moved = False
        for k in range(1, S):
            lo, hi = bounds[k - 1], bounds[k + 1]
            xs = c[(c > lo) & (c < hi)]
            if len(xs) < 2:
                continue
            before = pricing.times_to_ends(k - 1, lo, xs)  # stage k − 1 on [lo, x)
            after = model.time_s(k, xs, hi)  # stage k on [x, hi)
            device = np.tile(pricing.device_times(times), (len(xs), 1))
            device[:, (k - 1) % D] += before - times[k - 1]
            device[:, k % D] += after - times[k]
            if pricing.shared_weights:
                device += np.array([pricing.weight_times(bounds[:k] + [x] + bounds[k + 1:]) for x in xs.tolist()])
            keys = key(device)
            now = key(pricing.device_times(times) + pricing.weight_times(bounds))
            for row in np.lexsort(keys.T[::-1]):
                if not _less(keys[row], now):
                    break
                x = int(xs[row])
                trial = bounds[:k] + [x] + bounds[k + 1:]
                if not (model.allowed(k - 1, np.array([lo]), x)[0] and model.allowed(k, np.array([x]), hi)[0]
                        and pricing.fits(trial, [(k - 1) % D, k % D])):
                    continue
                bounds = trial
                times[k - 1], times[k] = before[row], after[row]
                moved = True
                break
        if not moved:
            break
    return bounds[1:-1]


def _less(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` comes before ``b`` in lexicographic order."""
    differ = np.nonzero(a != b)[0]
    return bool(len(differ)) and a[differ[0]] < b[differ[0]]


def check(cluster: Cluster, stages: int, options: SolverOptions) -> int:
    """The number of devices D of an interleaved pipeline of ``stages`` stages.

    Raises:
        ConfigError: fewer than 2 devices, more than the cluster has, or a microbatch count that
            PyTorch's ``ScheduleInterleaved1F1B`` cannot run (``interleaved_rounds``).
    """
    v = options.stages_per_device
    D = stages // v
    if D < 2:
        raise ConfigError(f"schedule {INTERLEAVED!r} passes microbatches between devices, and stages={stages} with "
                          f"stages_per_device={v} is {D} device: use stages={2 * v} or more")
    if D > len(cluster):
        raise ConfigError(f"{stages} stages with stages_per_device={v} need {D} devices; the cluster {cluster} has "
                          f"{len(cluster)}: use stages={v * len(cluster)} or fewer")
    try:
        interleaved_rounds(D, options.microbatches)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return D


def choose_order(chain: Chain, graph: OpGraph, cluster: Cluster, stages: int, options: SolverOptions,
                 block_cuts: Sequence[int]) -> OrderChoice | None:
    """The device order along the pipeline whose block-level interleaved split is best, with
    that split (``split``; on every op position where no block split fits). Up to
    ``ORDERS_PRICED`` distinct orders of the D devices, each is split; beyond, the cluster's order
    and its orders by speed. Ties go to the first order. Returns None when no split fits."""
    D = stages // options.stages_per_device
    total = order_count([len(ranks) for ranks in device_kinds(cluster).values()], D)
    if total <= ORDERS_PRICED:
        orders = list(device_orders(cluster, D))
    else:
        speed = [d.flops_for("fp32") for d in cluster.devices]
        ranks = range(len(cluster))
        orders = sorted({tuple(order)[:D] for order in (
            ranks, sorted(ranks, key=lambda r: -speed[r]), sorted(ranks, key=lambda r: speed[r]))})
    every = sorted(set(range(chain.n + 1)) - chain.forbidden)
    best = None
    for order in orders:
        model = StageModel(chain, looped_order(cluster, order, options.stages_per_device, options.memory_headroom),
                           options, cluster)
        cuts = split(model, graph, block_cuts) or (split(model, graph, every) if options.refine else None)
        if cuts is None:
            continue
        bottleneck = float(DevicePricing(model, graph).split_times([0, *cuts, chain.n]).max())
        logger.debug("interleaved split on devices %s: slowest device %.4g s", order, bottleneck)
        if best is None or bottleneck < best[0] * (1 - 1e-9):
            best = (bottleneck, model, cuts)
    if best is None:
        return None
    # The splits are not proven best on any order, so neither is the order (but on one order).
    return OrderChoice(best[1], best[0], best[2], len(orders), total, 0.0 if total == 1 else None)


SHARE_STEPS = 6
"""Shares of a device's memory ``split`` tries for each stage, evenly from 1 to 1/v."""


def split(model: StageModel, graph: OpGraph, candidates: Sequence[int],
          ranges: tuple[np.ndarray, np.ndarray] | None = None, seeds: Sequence[Sequence[int]] = ()) -> list[int] | None:
    """The interleaved split with cuts at ``candidates`` (and stage s starting within ``ranges``,
    as for ``chain_dp``), balanced over the devices (``balance_devices``); None when none found
    fits every device.

    The starting splits: ``chain_dp``'s, each stage fitting its device alone, and ``seeds`` (cut
    positions of splits found before). Where none fits every device, ``chain_dp`` runs again with
    each stage held to a share α of its device's memory beyond the CUDA context, α falling from
    1 to 1/v in ``SHARE_STEPS`` steps, until its split fits: at 1/v every split it finds fits
    (a device needs at most the sum of its stages' own peaks beyond one context: their state
    and activations add up, their workspaces at most), above it a faster one may. Of all
    starts that fit, balanced, the one whose slowest device is fastest."""
    n, v = model.chain.n, model.options.stages_per_device
    pricing = DevicePricing(model, graph)
    starts = [list(seed) for seed in seeds]
    found = chain_dp(model, candidates, ranges)
    if found is not None:
        starts.insert(0, found[1])
    fitting = [cuts for cuts in starts if pricing.fits([0, *cuts, n])]
    if not fitting and found is not None:
        for share in np.linspace(1.0, 1 / v, SHARE_STEPS + 1)[1:]:
            held = chain_dp(_held_to(model, float(share)), candidates, ranges)
            if held is not None and pricing.fits([0, *held[1], n]):
                fitting.append(held[1])
                break
    if not fitting:
        return None
    balanced = [balance_devices(pricing, candidates, cuts) for cuts in fitting]
    slowest = [float(pricing.split_times([0, *cuts, n]).max()) for cuts in balanced]
    return balanced[int(np.argmin(np.round(np.array(slowest) / max(min(slowest), 1e-30), 9)))]


def _held_to(model: StageModel, share: float) -> StageModel:
    """``model`` with each stage allowed ``share`` of its device's memory beyond the CUDA context."""
    order = model.device_order
    capacity = tuple(GPU_CONTEXT_BYTES * gpu + share * (c - GPU_CONTEXT_BYTES * gpu)
                     for c, gpu in zip(order.capacity_bytes, order.gpu))
    return StageModel(model.chain, dataclasses.replace(order, capacity_bytes=capacity), model.options, model.cluster)


def _worst_device(model: StageModel, graph: OpGraph, cuts: Sequence[int]) -> tuple[str, float, float]:
    """The device of a split that overflows its memory most: (name, bytes needed, capacity)."""
    pricing = DevicePricing(model, graph)
    bounds = [0, *cuts, model.chain.n]
    order = model.device_order
    need = [pricing.memory_bytes(bounds, d) for d in range(pricing.devices)]
    d = int(np.argmax([need[d] - order.capacity_bytes[d] for d in range(pricing.devices)]))
    return f"{order.types[d]}:{order.ranks[d]}", need[d], order.capacity_bytes[d]


def infeasible(chain: Chain, graph: OpGraph, cluster: Cluster, stages: int, options: SolverOptions) -> InfeasibleError:
    """Why no interleaved split fits: the device that overflows most in the DP's split on the
    cluster's order (each stage fitting alone where it can), and whether one stage per device
    would fit."""
    gib = 2**30
    v = options.stages_per_device
    D = stages // v
    what = (f"train at {options.precision} with {options.optimizer}, schedule {INTERLEAVED!r} with {v} stages on each "
            f"of {D} devices, {options.microbatches} microbatches")
    model = StageModel(chain, looped_order(cluster, range(D), v, options.memory_headroom), options, cluster)
    every = sorted(set(range(chain.n + 1)) - chain.forbidden)
    found = chain_dp(model, every)
    if found is not None:
        device, need, capacity = _worst_device(model, graph, found[1])
        reason = (f"the fastest split whose stages each fit alone needs {need / gib:.2f} GiB on {device} (its {v} "
                  f"stages' state and the activations they hold in flight together), which has {capacity / gib:.2f} "
                  f"GiB after {options.memory_headroom:.0%} headroom")
    else:
        reason = "no split fits every stage in its device's memory, even alone"
    plain = dataclasses.replace(options, schedule="1f1b", stages_per_device=1, stages=D)
    fits = (f" Would fit: schedule='1f1b' with one stage per device (stage s keeps {D} − s microbatches in flight)."
            if _fits(chain, cluster, D, plain, every) else "")
    return InfeasibleError(f"the model does not fit: {what}: {reason}.{fits} Fewer or smaller microbatches (a stage "
                           "keeps up to all of them in flight) or more devices hold less per device.")
