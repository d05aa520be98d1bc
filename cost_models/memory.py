"""How much device memory a model part needs, for inference and for training.

    state = training_state_bytes(7e9, precision="bf16-mixed", optimizer="adamw")
    state.total_bytes / 7e9                                   # 16.0 bytes per parameter
    stage = stage_memory(params, costs, nodes, mode="train", schedule="1f1b",
                         num_stages=4, stage=0, microbatches=8)

Training keeps, per parameter: the weight, its gradient, optional fp32 master weights and the
optimizer's states; bf16 mixed precision with AdamW is the usual 2 + 2 + 4 + 4 + 4 = 16 bytes
(ZeRO, Rajbhandari et al. 2020, §3.1). Activations are what autograd saved for backward
(measured per node by :func:`cost_models.ops.price_graph`), times the microbatches a stage holds
at once under the pipeline schedule. On top comes an allowance for workspace and fragmentation.

Data parallel: a stage replicated over k ranks with FSDP2 (``fully_shard``, one unit per stage)
keeps on each rank 1/k of the weights, gradients, master weights and optimizer states, and for
the step the whole stage's weights (all-gathered before its first forward) and gradients
(accumulated unsharded over the microbatches, reduce-scattered after the last backward):
:func:`data_parallel_factors`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from cost_models.ops import OpCost

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
INTERLEAVED = "interleaved-1f1b"
"""Several stages per device, stage s on device s mod D (Megatron's virtual stages), run by
torch.distributed.pipelining's ``ScheduleInterleaved1F1B``."""
MODES = ("train", "infer")


@dataclass(frozen=True)
class TrainingPrecision:
    """Bytes per parameter that a training precision keeps, besides optimizer states."""

    name: str
    weight_bytes: float
    grad_bytes: float
    master_bytes: float
    """fp32 master copy of the weights kept by mixed precision (0 when the weights are fp32)."""
    state_bytes: float
    """Bytes of each optimizer state value (Adam keeps two per parameter)."""


TRAINING_PRECISIONS: dict[str, TrainingPrecision] = {
    p.name: p
    for p in [
        TrainingPrecision("fp32", 4, 4, 0, 4),
        TrainingPrecision("bf16-mixed", 2, 2, 4, 4),  # bf16 weights/grads, fp32 master and states
        TrainingPrecision("fp16-mixed", 2, 2, 4, 4),
        TrainingPrecision("bf16", 2, 2, 0, 2),  # pure bf16, states in bf16 too
    ]
}

OPTIMIZER_STATES = {"sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2}
"""Optimizer state values per parameter: momentum; Adam's first and second moments."""


@dataclass(frozen=True)
class Quantization:
    """A weight-only quantized format: packed values plus a scale (and zero point) per group."""

    name: str
    bits: int
    group_size: int
    group_overhead_bytes: float
    """Bytes of scale and zero point stored once per group of ``group_size`` weights."""

    @property
    def bytes_per_param(self) -> float:
        return self.bits / 8 + self.group_overhead_bytes / self.group_size


QUANTIZATIONS: dict[str, Quantization] = {
    q.name: q
    for q in [
        Quantization("int8", 8, 128, 2.0),  # per-group fp16 scale
        Quantization("int4", 4, 128, 2.5),  # GPTQ/AWQ: fp16 scale + 4-bit zero point per 128
        Quantization("nf4", 4, 64, 4.0),  # bitsandbytes NF4: fp32 absmax per block of 64
    ]
}

GPU_CONTEXT_BYTES = 512 * 2**20
"""CUDA context, cuBLAS/cuDNN handles and workspace reserved on every GPU (≈ 0.4–0.6 GiB on
recent drivers; an allowance, not a measurement)."""

FRAGMENTATION = 0.05
"""Fragmentation allowance of PyTorch's CUDA caching allocator: 5% on top of the live tensors.
The CPU allocator returns freed memory at once and gets none."""

OPTIMIZER_STEP_TEMPORARIES = 1.0
"""Temporaries of the optimizer step, in optimizer-state copies of the parameters: the foreach
(multi-tensor) Adam/AdamW of PyTorch allocates one state-sized buffer per parameter for the
denominator while it updates (measured with the torch profiler's memory timeline)."""


@dataclass(frozen=True)
class TrainingState:
    """Bytes of the per-parameter training state of ``num_params`` parameters."""

    weights_bytes: float
    grads_bytes: float
    master_bytes: float
    optimizer_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.grads_bytes + self.master_bytes + self.optimizer_bytes


@dataclass(frozen=True)
class MemoryBreakdown:
    """Memory of one stage (or a whole model) by kind, in bytes."""

    weights_bytes: float = 0
    grads_bytes: float = 0
    optimizer_bytes: float = 0
    """Optimizer states and fp32 master weights."""
    activations_bytes: float = 0
    """Saved-for-backward tensors of every microbatch in flight (training), or the largest live
    activations (inference)."""
    kv_cache_bytes: float = 0
    workspace_bytes: float = 0
    """Transient buffers, allocator fragmentation and (on a GPU) the CUDA context."""

    @property
    def total_bytes(self) -> float:
        return (self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes
                + self.kv_cache_bytes + self.workspace_bytes)


def training_state_bytes(num_params: float, *, precision: str = "bf16-mixed", optimizer: str = "adamw") -> TrainingState:
    """Weights, gradients, master weights and optimizer states of ``num_params`` parameters.

    Example:
        >>> training_state_bytes(7e9).total_bytes / 2**30   # 7B, bf16 mixed, AdamW
        104.3...
    """
    p = _precision(precision)
    states = _optimizer_states(optimizer)
    if num_params < 0:
        raise ValueError(f"num_params must be >= 0, e.g. 7e9; got {num_params}")
    return TrainingState(
        weights_bytes=num_params * p.weight_bytes,
        grads_bytes=num_params * p.grad_bytes,
        master_bytes=num_params * p.master_bytes,
        optimizer_bytes=num_params * states * p.state_bytes,
    )


def weight_bytes(num_params: float, dtype: torch.dtype | str = torch.bfloat16) -> float:
    """Bytes of ``num_params`` weights stored as ``dtype`` or a quantized format (``"int4"``...)."""
    if num_params < 0:
        raise ValueError(f"num_params must be >= 0, e.g. 7e9; got {num_params}")
    if isinstance(dtype, str):
        if dtype in QUANTIZATIONS:
            return num_params * QUANTIZATIONS[dtype].bytes_per_param
        dtype = _dtype(dtype)
    return num_params * torch.empty((), dtype=dtype, device="meta").element_size()


def kv_cache_bytes(*, batch: int, seq: int, layers: int, kv_heads: int, head_dim: int,
                   dtype: torch.dtype | str = torch.bfloat16) -> float:
    """Keys and values of every layer for ``batch`` sequences of ``seq`` tokens."""
    for name, value in dict(batch=batch, seq=seq, layers=layers, kv_heads=kv_heads, head_dim=head_dim).items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, e.g. 8; got {value!r}")
    itemsize = torch.empty((), dtype=_dtype(dtype) if isinstance(dtype, str) else dtype, device="meta").element_size()
    return 2 * batch * seq * layers * kv_heads * head_dim * itemsize


def microbatches_in_flight(schedule: str, *, num_stages: int, stage: int, microbatches: int,
                           stages_per_device: int = 1) -> int:
    """Microbatches whose activations stage ``stage`` holds at its peak.

    GPipe runs every forward before any backward: all ``m``. 1F1B starts backward as soon as the
    last stage can, so stage ``s`` of ``S`` holds at most ``S - s`` (never more than ``m``).
    Interleaved 1F1B (``stages_per_device`` = v stages on each of D = S ÷ v devices, stage s on
    device s mod D) holds what its device's order of work leaves in flight
    (:func:`interleaved_1f1b_order`): the most forwards of the stage not yet undone by their
    backwards. E.g. D = 2, v = 2, m = 4: stages 0..3 hold 4, 3, 2, 1; D = 4, v = 2, m = 8: 8, 8,
    7, 5, 4, 4, 3, 1. The device holds, at once, less than the sum of its stages' peaks
    (:func:`in_flight_profile`).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, e.g. '1f1b'; got {schedule!r}")
    if num_stages < 1 or microbatches < 1:
        raise ValueError(f"num_stages and microbatches must be >= 1; got {num_stages} and {microbatches}")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, {num_stages}); got {stage}")
    if schedule == INTERLEAVED:
        devices = _devices(num_stages, stages_per_device)
        profile = in_flight_profile(schedule, num_stages=num_stages, stages_per_device=stages_per_device,
                                    device=stage % devices, microbatches=microbatches)
        return int(profile[:, stage // devices].max())
    if stages_per_device != 1:
        raise ValueError(f"schedule {schedule!r} runs one stage per device; got stages_per_device={stages_per_device}: "
                         f"use schedule={INTERLEAVED!r}")
    return microbatches if schedule == "gpipe" else min(num_stages - stage, microbatches)


def interleaved_rounds(devices: int, microbatches: int) -> int:
    """Rounds of PyTorch's ``ScheduleInterleaved1F1B``: max(1, m ÷ D) (integer division). Each
    round runs m ÷ rounds microbatches through a stage before the device turns to its next
    stage, so m must be a multiple of the rounds: with D = 4, m = 1 to 8, 10 and 12 run, m = 9,
    11 and 13 do not.

    Raises:
        ValueError: m is not a multiple of the rounds; says which counts run.
    """
    rounds = max(1, microbatches // devices)
    if microbatches % rounds:
        near = sorted((k for k in range(max(1, microbatches - devices), microbatches + devices + 1)
                       if k % max(1, k // devices) == 0), key=lambda k: (abs(k - microbatches), k))
        raise ValueError(f"interleaved 1F1B on {devices} devices runs {microbatches} microbatches in {rounds} "
                         f"rounds of equal size, and {microbatches} is not a multiple of {rounds}: use "
                         f"microbatches={near[0]} or another count m with m % max(1, m // {devices}) == 0 "
                         f"({', '.join(map(str, sorted(near)))})")
    return rounds


def interleaved_1f1b_order(device: int, *, devices: int, stages_per_device: int,
                           microbatches: int) -> list[tuple[str, int, int]]:
    """The work of one device under interleaved 1F1B, in the order PyTorch 2.13's
    ``ScheduleInterleaved1F1B`` runs it: ``("F" or "B", local stage, microbatch)``, local stage
    k being pipeline stage k·D + device.

    With g = m ÷ rounds microbatches per round (:func:`interleaved_rounds`), device r first runs
    W = min((v − 1)·g + 2·(D − 1 − r), v·m) forwards, taking its stages in turn g microbatches
    at a time (forward op k runs local stage (k ÷ g) mod v); then alternates one forward and one
    backward, the backwards taking the stages in reverse turn (backward op k: local stage
    v − 1 − (k ÷ g) mod v); then runs the W backwards left. Running example, D = 2, v = 2, m = 4
    (g = 2), device 0 (stages 0 and 2): W = 4: F0 F0 F2 F2 (microbatches 0, 1 of each), then
    F0 B2, F0 B2, F2 B0, F2 B0, then B2 B2 B0 B0.
    """
    D, v, m = devices, stages_per_device, microbatches
    per_round = m // interleaved_rounds(D, m)
    warmup = min((v - 1) * per_round + 2 * (D - 1 - device), v * m)
    done = {"F": [0] * v, "B": [0] * v}
    order: list[tuple[str, int, int]] = []

    def run(kind: str, local: int) -> None:
        order.append((kind, local, done[kind][local]))
        done[kind][local] += 1

    for k in range(v * m + warmup):
        if k < v * m:
            run("F", (k // per_round) % v)
        if k >= warmup:
            run("B", v - 1 - ((k - warmup) // per_round) % v)
    return order


def in_flight_profile(schedule: str, *, num_stages: int, stages_per_device: int, device: int,
                      microbatches: int) -> np.ndarray:
    """Microbatches each stage of a device holds after each of the device's forwards (rows), its
    stages in pipeline order (columns): the device's activations peak at one of these moments,
    at max over rows of (row · saved bytes per microbatch of each stage).

    One stage per device: one row, its :func:`microbatches_in_flight`. Interleaved 1F1B: from
    :func:`interleaved_1f1b_order`. In the running example there (device 0 of D = 2, v = 2,
    m = 4) the rows are (1, 0), (2, 0), (2, 1), (2, 2), (3, 2), (4, 1), (4, 1), (3, 2): each stage
    peaks (at 4 and 2) but the device holds at most 5 microbatches' worth when they are equal.
    """
    if schedule != INTERLEAVED:
        held = microbatches_in_flight(schedule, num_stages=num_stages, stage=device, microbatches=microbatches,
                                      stages_per_device=stages_per_device)
        return np.array([[held]], dtype=np.int64)
    devices = _devices(num_stages, stages_per_device)
    if not 0 <= device < devices:
        raise ValueError(f"device must be in [0, {devices}); got {device}")
    held = np.zeros(stages_per_device, dtype=np.int64)
    rows = []
    for kind, local, _ in interleaved_1f1b_order(device, devices=devices, stages_per_device=stages_per_device,
                                                 microbatches=microbatches):
        held[local] += 1 if kind == "F" else -1
        if kind == "F":
            rows.append(held.copy())
    return np.array(rows, dtype=np.int64)


def _devices(num_stages: int, stages_per_device: int) -> int:
    if not isinstance(stages_per_device, int) or stages_per_device < 1 or num_stages % stages_per_device:
        raise ValueError(f"stages_per_device must be a positive int dividing the {num_stages} stages, e.g. 2; "
                         f"got {stages_per_device!r}")
    return num_stages // stages_per_device


def activation_bytes(costs: Mapping[str, OpCost], nodes: Iterable[str]) -> int:
    """Bytes autograd keeps for backward for one microbatch through ``nodes`` (in graph order):
    each storage once, however many nodes keep it or a view of it (:class:`OpsMemory`)."""
    nodes = list(nodes)
    return int(OpsMemory.from_costs(nodes, costs, [0.0] * len(nodes)).activations_bytes(0, len(nodes)))


def stage_memory(
    num_params: float,
    costs: Mapping[str, OpCost],
    nodes: Iterable[str],
    *,
    mode: str = "train",
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    weight_dtype: torch.dtype | str = torch.bfloat16,
    schedule: str = "1f1b",
    num_stages: int = 1,
    stage: int = 0,
    microbatches: int = 1,
    stages_per_device: int = 1,
    kv_cache: float = 0,
    device_kind: str = "gpu",
) -> MemoryBreakdown:
    """Peak memory of a pipeline stage that owns ``num_params`` parameters and runs ``nodes``.

    Args:
        num_params: parameters whose storage lives on this stage.
        costs: :func:`cost_models.ops.price_graph` of the graph, traced at the microbatch size
            and in the dtype activations will have.
        nodes: names of the stage's nodes.
        mode: ``"train"`` or ``"infer"``.
        precision, optimizer: the training state per parameter (see :data:`TRAINING_PRECISIONS`).
        weight_dtype: inference weights: a dtype or a quantized format of :data:`QUANTIZATIONS`.
        schedule, num_stages, stage, microbatches, stages_per_device: set how many microbatches
            are in flight (:func:`microbatches_in_flight`); with several stages per device this
            is the stage alone, and :func:`device_peak_terms` what its device holds.
        kv_cache: bytes of KV cache this stage keeps (inference), see :func:`kv_cache_bytes`.
        device_kind: ``"gpu"`` adds the CUDA context to the workspace.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, e.g. 'train'; got {mode!r}")
    nodes = list(nodes)
    in_flight = (microbatches_in_flight(schedule, num_stages=num_stages, stage=stage, microbatches=microbatches,
                                        stages_per_device=stages_per_device) if mode == "train" else 1)
    if nodes:
        memory = OpsMemory.from_costs(nodes, costs, [num_params] + [0] * (len(nodes) - 1), train=mode == "train")
        quantities = memory.quantities(0, len(nodes))
    else:
        quantities = dict(params=num_params, copies=0.0, activations=0.0, transient=0.0)
    return peak_breakdown(quantities, in_flight=in_flight, gpu=device_kind == "gpu", mode=mode, precision=precision,
                          optimizer=optimizer, weight_dtype=weight_dtype, kv_cache=kv_cache)


# --------------------------------------------------------------------------- ops laid out in one order


@dataclass(frozen=True)
class Storage:
    """One storage a stage may hold: an op's output (views of it included) or a temporary an op
    keeps for backward."""

    nbytes: float
    producer: int
    """Position of the op that makes it; -1 for a value made before the ops (a model input)."""
    readers: tuple[int, ...] = ()
    """Positions of the ops that read it or a view of it, sorted; ``n`` for a read after the
    ops (a returned value, or a reader outside them)."""
    savers: tuple[int, ...] = ()
    """Positions of the ops that keep it for backward, sorted."""
    grad_bytes: float = 0.0
    """Bytes of its gradient in backward (0: none flows)."""


class OpsMemory:
    """The one memory model of a pipeline stage: its peak, from when each tensor is made and
    last read, for any run ``[i, j)`` of ops laid out in one order (vectorized over ``i``, as an
    interval DP needs) and for any stage of any op → stage assignment.

        memory = OpsMemory.from_costs(ops, costs, params_per_op, train=True)
        memory.total_bytes(i=np.arange(j), j=j, in_flight=4, gpu=True, **rules)   # every start i
        memory.quantities_of(stage_of_op, s)                                        # any stage

    A stage runs its ops in order, one microbatch at a time; the caller holds what it received
    (a value made before the stage and read in it or after it, relayed on) until the stage
    returns, and what the stage returns lives until then (on its own device a received value is
    a copy, freed after its last reader: there the figure is a bound by at most what the stage
    receives). Per microbatch:

    * forward, at op t: every value made on the stage so far that a later op (here or on a
      later stage) still reads, or that some op keeps for backward, what was received, and the
      op's own temporaries (``OpCost.fwd_workspace_bytes``);
    * backward, at op t (last op first): what the stage's ops up to t keep for backward (a
      tensor is freed with its earliest saver's backward), the gradients live at t (a value's
      gradient exists from its last reader's backward to its producer's; one received lives to
      the end of the stage's backward), the op's backward temporaries, and the
      gradients of the weights it reads: made whole, then added to those of the microbatches
      before (the weights' accumulated gradients are part of the training state).

    The gradients the stage receives for what it sent (the next stage's, or the loss's) are
    held all through its backward: at the ops before the last one that makes a sent value, all
    of them count on top (exact when the stage sends one value with a gradient, as a pipeline
    stage usually does; a bound otherwise). The stage's ``transient`` is the larger of the two
    peaks; its ``activations``
    what it keeps per microbatch for backward, each tensor once. :func:`peak_terms` adds the
    other microbatches in flight and the training state. Views cost nothing and keep their base
    alive; weights are not activations.
    """

    def __init__(self, n: int, params: Sequence[float], tensors: Sequence[Storage], *,
                 fwd_workspace: Sequence[float] | None = None, bwd_workspace: Sequence[float] | None = None,
                 cpu_workspace: tuple[Sequence[float], Sequence[float]] | None = None,
                 weight_reads: Sequence[Mapping[str, float]] | None = None, train: bool = True):
        self.n = n
        self.weight_reads = [dict(w) for w in weight_reads] if weight_reads is not None else [{} for _ in range(n)]
        readers_of: dict[str, list[int]] = {}
        numel: dict[str, float] = {}
        for k, reads in enumerate(self.weight_reads):
            for name, count in reads.items():
                readers_of.setdefault(name, []).append(k)
                numel[name] = float(count)
        # a parameter is stored with its first reader; every other stage reading it holds a copy
        self._weight_readers = [(numel[name], np.array(ks, dtype=np.int64)) for name, ks in readers_of.items()
                                if len(ks) > 1]
        self.train = train
        self.param_count = np.concatenate([[0.0], np.cumsum(np.asarray(params, dtype=float))])
        self.tensors = [t for t in tensors if t.nbytes > 0 or (train and t.grad_bytes > 0)]
        self.fwd_workspace = np.zeros(n) if fwd_workspace is None else np.asarray(fwd_workspace, dtype=float)
        self.bwd_workspace = np.zeros(n) if bwd_workspace is None or not train else np.asarray(bwd_workspace, dtype=float)
        extra = cpu_workspace or (np.zeros(n), np.zeros(n))
        self.cpu_workspace = (np.asarray(extra[0], dtype=float), np.asarray(extra[1], dtype=float) * float(train))
        T = self.tensors
        self._b = np.array([t.nbytes for t in T], dtype=float)
        self._g = np.array([t.grad_bytes if train and t.readers else 0.0 for t in T], dtype=float)  # unread: none
        self._p = np.array([t.producer for t in T], dtype=np.int64)
        self._u = np.array([max(t.readers, default=t.producer) for t in T], dtype=np.int64)
        saved = [bool(t.savers) and train for t in T]
        # a tensor some op keeps for backward lives from its producer to the stage's end
        self._e = np.where(saved, n, np.maximum(self._u, self._p)) if T else np.zeros(0, dtype=np.int64)

        def spans(lo: np.ndarray, hi: np.ndarray, weights: np.ndarray) -> np.ndarray:
            """Σ weights over t in [lo, hi] (clipped to [0, n)), for every t."""
            lo, hi = np.maximum(lo, 0), np.minimum(hi, n - 1)
            keep = lo <= hi
            d = np.bincount(lo[keep], weights=weights[keep], minlength=n + 1) \
                - np.bincount(hi[keep] + 1, weights=weights[keep], minlength=n + 1)
            return np.cumsum(d)[:n]

        self._alive = spans(self._p, self._e, self._b)              # Σ b over p ≤ t ≤ e
        self._grads = spans(self._p, self._u, self._g)              # Σ g over p ≤ t ≤ u
        # received at a stage starting at i: made before i, read at i or later
        d = np.bincount(self._p + 1, weights=self._b, minlength=n + 2) \
            - np.bincount(np.minimum(self._u, n) + 1, weights=self._b, minlength=n + 2)
        self._received = np.cumsum(d)[: n + 1]
        # gradients coming back at a stage ending at j: of what is made before j and read at j or later
        d = np.bincount(self._p + 1, weights=self._g, minlength=n + 2) \
            - np.bincount(np.minimum(self._u, n) + 1, weights=self._g, minlength=n + 2)
        self._sent_grads = np.cumsum(d)[: n + 1]
        # the last op before j that makes a value with a gradient read at j or later (-1: none)
        self._last_sender = np.full(n + 1, -1, dtype=np.int64)
        for k in np.argsort(self._p, kind="stable"):
            if self._g[k] > 0 and self._p[k] >= 0:
                self._last_sender[self._p[k] + 1: min(self._u[k], n) + 1] = self._p[k]
        # (saver, tensor) pairs sorted by saver, for what a stage keeps for backward
        pairs = sorted((k, idx) for idx, t in enumerate(T) if train for k in t.savers)
        self._pair_saver = np.array([k for k, _ in pairs], dtype=np.int64)
        self._pair_tensor = np.array([idx for _, idx in pairs], dtype=np.int64)
        # what op t certainly holds on any stage: its inputs, its outputs and its temporaries
        floor = self.fwd_workspace.copy()
        for idx, tensor in enumerate(T):
            at = {k for k in tensor.readers if k < n} | ({tensor.producer} if tensor.producer >= 0 else set())
            floor[list(at)] += self._b[idx]
        self._floor = floor
        self._columns: dict[int, np.ndarray] = {}
        self._copy_columns: dict[int, np.ndarray] = {}
        self._tables: dict[bool, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_costs(cls, ops: Sequence[str], costs: Mapping[str, OpCost], params: Sequence[float], *,
                   weight_reads: Sequence[Mapping[str, float]] | None = None, train: bool = True) -> "OpsMemory":
        """From :func:`cost_models.ops.price_graph` costs of ``ops`` (missing ones cost nothing).
        Values read by nodes that are not among ``ops`` (the graph's output) are read after them.
        ``weight_reads``: per op, the parameters it reads (name → count), for the copies a stage
        holds of parameters stored on another."""
        position = {op: k for k, op in enumerate(ops)}
        n = len(ops)
        cost = lambda name: costs.get(name, _NOTHING)  # noqa: E731
        root: dict[str, tuple[str, ...]] = {}

        def roots(name: str) -> tuple[str, ...]:
            """The values whose storage ``name`` shares (itself unless it aliases what it reads)."""
            if name not in root:
                c = cost(name)
                read = [r for r in c.reads if not cost(r).weight]
                root[name] = tuple(dict.fromkeys(x for r in read for x in roots(r))) if c.alias and read else (name,)
            return root[name]

        readers: dict[str, set[int]] = {}
        savers: dict[str, set[int]] = {}
        own: list[Storage] = []
        for name, c in costs.items():
            at = position.get(name, n)
            for r in c.reads:
                for base in roots(r):
                    readers.setdefault(base, set()).add(at)
        for k, op in enumerate(ops):
            for key, nbytes in cost(op).saved.items():
                head, _, index = key.rpartition(":")
                if head == op and index.isdigit():  # a temporary of its own
                    own.append(Storage(float(nbytes), k, (k,), (k,)))
                else:
                    for base in roots(key):
                        savers.setdefault(base, set()).add(k)
        tensors = []
        for name in dict.fromkeys([*ops, *readers]):
            c = cost(name)
            if c.weight or roots(name) != (name,):
                continue
            tensors.append(Storage(float(c.output_bytes), position.get(name, -1), tuple(sorted(readers.get(name, ()))),
                                  tuple(sorted(savers.get(name, ()))), float(c.grad_bytes)))
        # A weight's gradient is made whole and then added to the one of the earlier microbatches.
        return cls(n, params, tensors + own, fwd_workspace=[cost(op).fwd_workspace_bytes for op in ops],
                   bwd_workspace=[cost(op).bwd_workspace_bytes + cost(op).weight_grad_bytes for op in ops],
                   cpu_workspace=([cost(op).cpu_fwd_workspace_bytes for op in ops],
                                  [cost(op).cpu_bwd_workspace_bytes for op in ops]),
                   weight_reads=weight_reads, train=train)

    def scaled(self, factor: float) -> "OpsMemory":
        """The same ops with every activation, gradient and temporary ``factor`` times as large
        (a smaller microbatch); parameters unchanged."""
        tensors = [dataclasses.replace(t, nbytes=t.nbytes * factor, grad_bytes=t.grad_bytes * factor)
                   for t in self.tensors]
        return OpsMemory(self.n, np.diff(self.param_count), tensors, fwd_workspace=self.fwd_workspace * factor,
                         bwd_workspace=self.bwd_workspace * factor,
                         cpu_workspace=(self.cpu_workspace[0] * factor, self.cpu_workspace[1] * factor),
                         weight_reads=self.weight_reads, train=self.train)

    # ------------------------------------------------------------------ runs [i, j) of the order

    def params(self, i: np.ndarray | int, j: int) -> np.ndarray:
        return self.param_count[j] - self.param_count[i]

    def copies(self, i: np.ndarray | int, j: int) -> np.ndarray:
        """Parameters ops ``[i, j)`` read that are stored before ``i``: the stage holds a copy of
        each for the call (and, training, its gradient)."""
        i = np.asarray(i)
        if not self._weight_readers:
            return 0.0 * i
        if not i.ndim:
            return self._copies_column(int(i))[j]
        return np.array([self._copies_column(int(a))[j] for a in i.ravel()]).reshape(i.shape)

    def _copies_column(self, i: int) -> np.ndarray:
        hit = self._copy_columns.get(i)
        if hit is None:
            arrivals = np.zeros(self.n + 2)
            for count, readers in self._weight_readers:
                if readers[0] < i:
                    later = readers[readers >= i]
                    if len(later):
                        arrivals[later[0] + 1] += count
            hit = np.cumsum(arrivals)[: self.n + 1]
            if len(self._copy_columns) * (self.n + 1) > COLUMN_CACHE:
                self._copy_columns.clear()
            self._copy_columns[i] = hit
        return hit

    def activations_bytes(self, i: np.ndarray | int, j: int) -> np.ndarray:
        """Bytes kept for backward per microbatch by ops ``[i, j)``, each tensor once."""
        i = np.asarray(i)
        return np.array([self._kept(int(a))[j] for a in i.ravel()]).reshape(i.shape) if i.ndim else self._kept(int(i))[j]

    def transient_bytes(self, i: np.ndarray | int, j: int, cpu: bool = False) -> np.ndarray:
        """The peak of one microbatch through ops ``[i, j)`` run as a stage (see the class), on a
        GPU or (``cpu``) on a CPU, whose kernels need other temporaries (``OpCost.cpu_*``)."""
        found = self._lookup(i, j, cpu)
        if found is not None:
            return found[1]
        i = np.asarray(i)
        if not i.ndim:
            return self._column(int(i), cpu)[1][j]
        return np.array([self._column(int(a), cpu)[1][j] for a in i.ravel()]).reshape(i.shape)

    def prepare(self, positions: Sequence[int], cpu: bool = False) -> None:
        """Tabulate the quantities of stages starting and ending at ``positions`` (the cut
        candidates of a DP), so that queries over them are lookups (up to ``TABLE_MAX``)."""
        positions = np.array(sorted(set(int(p) for p in positions)), dtype=np.int64)
        if cpu in self._tables and np.array_equal(self._tables[cpu][0], positions):
            return
        self._tables.pop(cpu, None)
        if len(positions) > TABLE_MAX:
            return
        tables = np.zeros((3, len(positions), len(positions)))
        for a, i in enumerate(positions):
            saved, peak = self._column(int(i), cpu, cache=False)
            tables[0, a], tables[1, a] = saved[positions], peak[positions]
            if self._weight_readers:
                tables[2, a] = self._copies_column(int(i))[positions]
        self._tables[cpu] = (positions, tables)

    def _lookup(self, i: np.ndarray | int, j: int, cpu: bool) -> np.ndarray | None:
        """(saved, transient, copies) of stages [i, j) from the table, or None if not tabulated."""
        i = np.asarray(i)
        if cpu not in self._tables or not i.ndim or not len(i):
            return None
        positions, tables = self._tables[cpu]
        a = np.minimum(np.searchsorted(positions, i), len(positions) - 1)
        b = int(np.searchsorted(positions, j))
        if b >= len(positions) or positions[b] != j or not np.all(positions[a] == i):
            return None
        return tables[:, a, b]

    def _kept(self, i: int) -> np.ndarray:
        return self._column(i)[0]

    def _column(self, i: int, cpu: bool = False, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """For a stage starting at ``i``: its saved bytes and its transient peak, for every end
        ``j`` in ``[0, n]`` (entries ``j <= i`` are 0)."""
        hit = self._columns.get((i, cpu))
        if hit is not None:
            return hit
        n = self.n
        fwd_workspace, bwd_workspace = self._workspace(cpu)
        # saved: tensors whose first saver at or after i is at or before t
        later = self._pair_saver >= i
        tensors, first = np.unique(self._pair_tensor[later], return_index=True)
        starts = self._pair_saver[later][first]
        held = np.cumsum(np.bincount(starts, weights=self._b[tensors], minlength=n + 1))[:n]
        # forward: live values made at i or later, and everything received, held to the end
        before = self._p < i
        ends = np.minimum(self._e[before], n)
        made_before = np.cumsum(np.bincount(ends, weights=self._b[before], minlength=n + 1)[::-1])[::-1][:n]
        forward = self._alive - made_before + self._received[i] + fwd_workspace
        running = np.zeros(n + 1)
        running[i + 1:] = np.maximum.accumulate(forward[i:])
        if self.train:
            backward = np.zeros(n + 1)  # backward[k]: the most over ops [i, k)
            backward[i + 1:] = np.maximum.accumulate((held + self._grads + bwd_workspace)[i:])
            # The gradients coming back for what the stage sends are held all through its backward:
            # before the last op that makes one, all of them count on top (see the class).
            passing = np.cumsum(np.bincount(np.minimum(self._u[before], n), weights=self._g[before],
                                            minlength=n + 1)[::-1])[::-1]  # made before i, read at j or later
            sender = self._last_sender
            coming = np.where(sender >= i, self._sent_grads - passing, 0.0)
            before_sender = backward[np.maximum(sender, 0)]
            running[i + 1:] = np.maximum(running[i + 1:], np.maximum(backward, before_sender + coming)[i + 1:])
        saved = np.zeros(n + 1)
        saved[i + 1:] = held[i:]
        result = (saved, running)
        if cache:
            if len(self._columns) * (n + 1) > COLUMN_CACHE:
                self._columns.clear()
            self._columns[(i, cpu)] = result
        return result

    def floor_bytes(self, i: int, j: int) -> float:
        """A lower bound of the inference ``transient`` of any stage running ops ``[i, j)``, alone
        or with others: the most any one of them holds at once (inputs, outputs, temporaries)."""
        return float(self._floor[i:j].max()) if j > i else 0.0

    def _workspace(self, cpu: bool) -> tuple[np.ndarray, np.ndarray]:
        if not cpu:
            return self.fwd_workspace, self.bwd_workspace
        return self.fwd_workspace + self.cpu_workspace[0], self.bwd_workspace + self.cpu_workspace[1]

    def quantities(self, i: int, j: int, cpu: bool = False) -> dict[str, float]:
        """Parameters, saved bytes per microbatch and transient peak of the run ``[i, j)``."""
        return dict(params=float(self.params(i, j)), copies=float(self.copies(i, j)),
                    activations=float(self.activations_bytes(i, j)), transient=float(self.transient_bytes(i, j, cpu)))

    def total_bytes(self, i: np.ndarray | int, j: int, *, in_flight: int, gpu: bool, **rules: Any) -> np.ndarray:
        """Peak bytes of a stage running ops ``[i, j)`` (``rules``: see :func:`peak_terms`)."""
        found = self._lookup(i, j, not gpu)
        if found is None:
            found = (self.activations_bytes(i, j), self.transient_bytes(i, j, not gpu), self.copies(i, j))
        terms = peak_terms(params=self.params(i, j), activations=found[0], transient=found[1], copies=found[2],
                           in_flight=in_flight, gpu=gpu, **rules)
        return sum(terms.values())

    # ------------------------------------------------------------------ any stage of any assignment

    def quantities_of(self, stage_of_op: Sequence[int], s: int, cpu: bool = False) -> dict[str, float]:
        """The quantities of stage ``s`` when op k runs on stage ``stage_of_op[k]`` (stages need
        not be runs of the order). A value made on an earlier stage and read on ``s`` or later is
        received (relayed on); one read on a later stage, or after the ops, is sent. Equals
        :meth:`quantities` where the stage is a run."""
        n = self.n
        st = np.asarray(stage_of_op, dtype=np.int64)
        here = st == s
        params = float(np.diff(self.param_count)[here].sum())
        copies = float(sum(count for count, readers in self._weight_readers
                           if not here[readers[0]] and here[readers].any()))
        if not here.any():
            return dict(params=params, copies=copies, activations=0.0, transient=0.0)
        last = int(st.max())
        stage_at = np.append(st, last)  # position n: after the ops, on the last stage
        received = 0.0
        alive = np.zeros(n + 1)
        grads = np.zeros(n + 1)
        held = np.zeros(n + 1)
        activations = sent_grads = 0.0
        sender = -1
        for idx, tensor in enumerate(self.tensors):
            p, b, g = tensor.producer, self._b[idx], self._g[idx]
            made = int(stage_at[p]) if p >= 0 else -1
            readers = np.asarray(tensor.readers, dtype=np.int64)
            reader_stages = stage_at[readers] if len(readers) else np.zeros(0, dtype=np.int64)
            sent = bool(np.any(reader_stages > s)) or (s == last and bool(np.any(readers == n)))
            inside = readers[(readers < n) & here[np.minimum(readers, n - 1)]] if len(readers) else readers
            savers = [k for k in tensor.savers if here[k]] if self.train else []
            if made == s or (made < s and (len(reader_stages) and reader_stages.max() >= s)):
                own = made == s
                end = n if (sent or savers) else int(inside.max()) if len(inside) else p
                if own:
                    alive[p] += b
                    alive[min(end, n - 1) + 1 if end < n else n] -= b
                else:
                    received += b
                if g and sent and own:
                    sent_grads += g
                    sender = max(sender, p)
                if g:
                    lo = p if own else 0
                    hi = n - 1 if sent else int(inside.max()) if len(inside) else -1
                    if lo <= hi:
                        grads[lo] += g
                        grads[hi + 1] -= g
            if savers:
                activations += b
                held[savers[0]] += b
        alive, grads, held = np.cumsum(alive)[:n], np.cumsum(grads)[:n], np.cumsum(held)[:n]
        fwd_workspace, bwd_workspace = self._workspace(cpu)
        peak = float((received + alive + fwd_workspace)[here].max())
        if self.train:
            backward = (held + grads + bwd_workspace)[here]
            early = backward[np.nonzero(here)[0] < sender]
            peak = max(peak, float(backward.max()), float(early.max()) + sent_grads if len(early) else 0.0)
        return dict(params=params, copies=copies, activations=activations, transient=peak)


TABLE_MAX = 2048
"""Most cut candidates :meth:`OpsMemory.prepare` tabulates (three tables of their squares: at
most 96 MiB); beyond, each query prices the runs it asks for."""
COLUMN_CACHE = 1 << 24
"""Floats of per-start columns :class:`OpsMemory` keeps."""
_NOTHING = OpCost()


def data_parallel_factors(data_parallel: int) -> tuple[float, float]:
    """What one rank keeps of a training stage replicated over ``data_parallel`` = k ranks, as
    multiples of the stage's own bytes: ``(held, sharded)``.

    ``held`` multiplies weights and gradients: 1 for one replica; 1 + 1/k under FSDP2, whose
    rank keeps a 1/k shard of each and, through the pipelined step, the whole stage unsharded:
    the all-gathered weights, kept from the first forward to the last backward, and the
    gradients, accumulated over the microbatches for one reduce-scatter after the last backward.
    (The flat copy of the gradients that the reduce-scatter sends is made after the unsharded
    weights are freed, and fits in their place for gradients no larger than the weights.)
    ``sharded`` multiplies master weights, optimizer states and the optimizer step's
    temporaries: 1/k.

    Example:
        >>> data_parallel_factors(1), data_parallel_factors(4)
        ((1.0, 1.0), (1.25, 0.25))
    """
    if not isinstance(data_parallel, int) or isinstance(data_parallel, bool) or data_parallel < 1:
        raise ValueError(f"data_parallel must be a positive int, e.g. 2; got {data_parallel!r}")
    if data_parallel == 1:
        return 1.0, 1.0
    return 1.0 + 1.0 / data_parallel, 1.0 / data_parallel


def peak_terms(*, params: Any, activations: Any, transient: Any, in_flight: int, gpu: bool, copies: Any = 0.0,
               mode: str = "train",
               precision: str = "bf16-mixed", optimizer: str = "adamw", weight_dtype: torch.dtype | str = torch.bfloat16,
               kv_cache: float = 0, data_parallel: int = 1, shared_weights: str = "sent") -> dict[str, Any]:
    """Peak bytes of a stage by kind (the fields of :class:`MemoryBreakdown`), from its quantities
    (scalars or arrays alike; see :class:`OpsMemory`).

    Training: weights, gradients, master weights and optimizer states of ``params``, weights and
    gradients of the ``copies`` of parameters stored on other stages; the saved
    ``activations`` of ``in_flight`` microbatches; and as workspace whichever is higher of the
    microbatch being run (its ``transient`` peak beyond its own saved tensors: gradients and
    temporaries) and the optimizer step (activations freed, the step's temporaries live).
    With ``shared_weights="copies"`` the copies are trained where they are (each holder steps
    its own optimizer on its copy), so they also hold master weights and optimizer states.
    With ``data_parallel`` = k > 1 replicas of the stage (FSDP2), weights and gradients are
    (1 + 1/k) times as large and master weights, optimizer states and the step's temporaries 1/k
    (:func:`data_parallel_factors`).
    Inference: weights (copies included), the ``transient`` peak of the live activations, the KV
    cache; replicas change nothing. A GPU adds
    the allocator's fragmentation on the live bytes and the CUDA context.
    """
    if mode == "train":
        p = _precision(precision)
        states = _optimizer_states(optimizer)
        held, sharded = data_parallel_factors(data_parallel)
        trained = params + copies if shared_weights == "copies" else params  # what this stage's optimizer steps
        live = dict(weights_bytes=(params + copies) * p.weight_bytes * held,
                    grads_bytes=(params + copies) * p.grad_bytes * held,
                    optimizer_bytes=trained * (p.master_bytes + states * p.state_bytes) * sharded,
                    activations_bytes=activations * in_flight, kv_cache_bytes=0.0 * params)
        step = trained * p.state_bytes * OPTIMIZER_STEP_TEMPORARIES * sharded if states else 0.0 * params
        transient = np.maximum(transient - activations, step - live["activations_bytes"])
    elif mode == "infer":
        live = dict(weights_bytes=weight_bytes(1, weight_dtype) * (params + copies), grads_bytes=0.0 * params,
                    optimizer_bytes=0.0 * params, activations_bytes=transient + 0.0 * params,
                    kv_cache_bytes=kv_cache + 0.0 * params)
        transient = 0.0 * params
    else:
        raise ValueError(f"mode must be one of {MODES}, e.g. 'train'; got {mode!r}")
    workspace = np.maximum(transient, 0.0)
    if gpu:
        workspace = workspace + FRAGMENTATION * sum(live.values()) + GPU_CONTEXT_BYTES
    return dict(live, workspace_bytes=workspace)


def device_peak_terms(stages: Sequence[Mapping[str, Any]], *, profile: np.ndarray, gpu: bool, mode: str = "train",
                      kv_cache: float = 0, **rules: Any) -> dict[str, float]:
    """Peak bytes by kind of a device that runs several stages (``stages``: each one's
    :meth:`OpsMemory.quantities`, in pipeline order), the microbatches each holds in flight
    given by ``profile`` (:func:`in_flight_profile`: one row per moment, one column per stage).

    The training state of every stage is held at once, and the saved activations at the worst
    moment of the profile: max over rows of Σ_k row[k] · activations[k]. One stage runs at a
    time, so the workspace is the largest of the stages' (the running microbatch's gradients
    and temporaries beyond its saved tensors), or the optimizer step over all the device's
    parameters with the activations freed. The GPU context is counted once. For one stage
    (a one-row, one-column profile) this is :func:`peak_terms`.
    """
    profile = np.asarray(profile, dtype=float)
    if profile.ndim != 2 or profile.shape[1] != len(stages) or not len(stages):
        raise ValueError(f"profile must have one column per stage ({len(stages)}); got shape {profile.shape}")
    held = [peak_terms(params=q["params"], copies=q.get("copies", 0.0), activations=q["activations"],
                       transient=q["transient"], in_flight=1, gpu=False, mode=mode, **rules) for q in stages]
    live = {kind: float(sum(h[kind] for h in held))
            for kind in ("weights_bytes", "grads_bytes", "optimizer_bytes", "kv_cache_bytes")}
    live["kv_cache_bytes"] += kv_cache
    if mode == "train":
        saved = np.array([float(q["activations"]) for q in stages])
        live["activations_bytes"] = float((profile @ saved).max())
        # one microbatch's peak beyond its saved tensors, or the optimizer step over all the parameters
        running = max(float(q["transient"]) - float(q["activations"]) for q in stages)
        precision, optimizer = rules.get("precision", "bf16-mixed"), rules.get("optimizer", "adamw")
        states = _optimizer_states(optimizer)
        per_param = _precision(precision).state_bytes * OPTIMIZER_STEP_TEMPORARIES if states else 0.0
        step = per_param * sum(float(q["params"]) for q in stages)
        workspace = max(running, step - live["activations_bytes"], 0.0)
    else:
        live["activations_bytes"] = max(float(h["activations_bytes"]) for h in held)
        workspace = 0.0
    if gpu:
        workspace += FRAGMENTATION * sum(live.values()) + GPU_CONTEXT_BYTES
    return dict(live, workspace_bytes=workspace)


def peak_breakdown(quantities: Mapping[str, float], *, in_flight: int, gpu: bool, **rules: Any) -> MemoryBreakdown:
    """:func:`peak_terms` of one stage's :meth:`OpsMemory.quantities` as a :class:`MemoryBreakdown`."""
    terms = peak_terms(params=quantities["params"], copies=quantities.get("copies", 0.0),
                       activations=quantities["activations"], transient=quantities["transient"],
                       in_flight=in_flight, gpu=gpu, **rules)
    return MemoryBreakdown(**{k: float(v) for k, v in terms.items()})


def _precision(name: str) -> TrainingPrecision:
    try:
        return TRAINING_PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; use one of {', '.join(TRAINING_PRECISIONS)}, e.g. 'bf16-mixed'") from None


def _optimizer_states(name: str) -> int:
    try:
        return OPTIMIZER_STATES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZER_STATES)}, e.g. 'adamw'") from None


def _dtype(name: str) -> torch.dtype:
    aliases = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
               "fp8": torch.float8_e4m3fn, "int8": torch.int8}
    try:
        return aliases[name.lower()]
    except KeyError:
        known = ", ".join(list(aliases) + list(QUANTIZATIONS))
        raise ValueError(f"unknown dtype {name!r}; use one of {known}, e.g. 'bf16'") from None


def max_fitting(memory_at, capacity_bytes: float, *, upper: int = 1 << 20) -> int:
    """The largest positive integer n with ``memory_at(n) <= capacity_bytes`` (0 if none), for a
    memory that grows with n (a batch size, a microbatch count); binary search."""
    if memory_at(1) > capacity_bytes:
        return 0
    lo, hi = 1, 2
    while hi <= upper and memory_at(hi) <= capacity_bytes:
        lo, hi = hi, hi * 2
    hi = min(hi, upper + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if memory_at(mid) <= capacity_bytes:
            lo = mid
        else:
            hi = mid
    return lo

