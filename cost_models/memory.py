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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from cost_models.ops import OpCost

SCHEDULES = ("gpipe", "1f1b")
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


def microbatches_in_flight(schedule: str, *, num_stages: int, stage: int, microbatches: int) -> int:
    """Microbatches whose activations stage ``stage`` holds at its peak.

    GPipe runs every forward before any backward: all ``m``. 1F1B starts backward as soon as the
    last stage can, so stage ``s`` of ``S`` holds at most ``S - s`` (never more than ``m``).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, e.g. '1f1b'; got {schedule!r}")
    if num_stages < 1 or microbatches < 1:
        raise ValueError(f"num_stages and microbatches must be >= 1; got {num_stages} and {microbatches}")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, {num_stages}); got {stage}")
    return microbatches if schedule == "gpipe" else min(num_stages - stage, microbatches)


def activation_bytes(costs: Mapping[str, OpCost], nodes: Iterable[str]) -> int:
    """Bytes autograd keeps for backward for one microbatch through ``nodes``; a tensor kept by
    several nodes counts once."""
    kept: dict[str, int] = {}
    for name in nodes:
        for key, nbytes in costs[name].saved.items():
            kept[key] = max(kept.get(key, 0), nbytes)
    return sum(kept.values())


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
        schedule, num_stages, stage, microbatches: set how many microbatches are in flight.
        kv_cache: bytes of KV cache this stage keeps (inference), see :func:`kv_cache_bytes`.
        device_kind: ``"gpu"`` adds the CUDA context to the workspace.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, e.g. 'train'; got {mode!r}")
    nodes = list(nodes)
    in_flight = (microbatches_in_flight(schedule, num_stages=num_stages, stage=stage, microbatches=microbatches)
                 if mode == "train" else 1)
    if nodes:
        quantities = OpsMemory.from_costs(nodes, costs, [num_params] + [0] * (len(nodes) - 1)).quantities(0, len(nodes))
    else:
        quantities = dict(params=num_params, activations=0.0, largest_output=0.0, inference_peak=0.0)
    return peak_breakdown(quantities, in_flight=in_flight, gpu=device_kind == "gpu", mode=mode, precision=precision,
                          optimizer=optimizer, weight_dtype=weight_dtype, kv_cache=kv_cache)


# --------------------------------------------------------------------------- ops laid out in one order


class OpsMemory:
    """The one memory model of a pipeline stage, exact for any run ``[i, j)`` of ops laid out in
    one order (vectorized over ``i``, as an interval DP needs) and for any subset of them.

        memory = OpsMemory.from_costs(ops, costs, params_per_op)
        memory.total_bytes(i=np.arange(j), j=j, in_flight=4, gpu=True, **rules)   # every start i
        memory.breakdown_of(mask, in_flight=4, gpu=True, **rules)                 # MemoryBreakdown

    What it counts (:func:`peak_breakdown` turns the quantities into bytes by kind):

    * parameters: those first read by the ops (their storage lives with the first reader);
    * saved activations per microbatch: every tensor some op of the stage keeps for backward,
      once however many of its ops keep it. Over ``[i, j)`` a tensor counts iff its last saver
      before ``j`` is at ``≥ i``: the sum of every saver's bytes in ``[i, j)`` less, for each two
      consecutive savers ``a < b`` of one tensor with ``i ≤ a`` and ``b < j``, the tensor's bytes
      (it is counted at ``a`` already);
    * the largest output (a range maximum): training holds it and its gradient at once;
    * inference's live activations: the largest sum of two consecutive outputs (range maximum).
    """

    def __init__(self, outputs_bytes: Sequence[float], params: Sequence[float],
                 saved: Sequence[tuple[float, Sequence[int]]]):
        """``outputs_bytes`` and ``params`` per op; ``saved``: (bytes, saver positions) per tensor."""
        self.n = n = len(outputs_bytes)
        self.outputs_bytes = np.asarray(outputs_bytes, dtype=float)
        self.param_count = np.concatenate([[0.0], np.cumsum(np.asarray(params, dtype=float))])
        self.saved = [(float(b), sorted(set(int(k) for k in savers))) for b, savers in saved if b > 0 and savers]
        per_op = np.zeros(n)
        pairs: list[tuple[int, int, float]] = []
        for nbytes, savers in self.saved:
            for k in savers:
                per_op[k] += nbytes
            pairs.extend((a, b, nbytes) for a, b in zip(savers, savers[1:]))
        self.saved_prefix = np.concatenate([[0.0], np.cumsum(per_op)])
        pairs.sort(key=lambda p: p[1])
        self._pair_a = np.array([p[0] for p in pairs], dtype=np.int64)
        self._pair_b = np.array([p[1] for p in pairs], dtype=np.int64)
        self._pair_bytes = np.array([p[2] for p in pairs], dtype=float)
        self._shared: dict[int, np.ndarray] = {}
        self._largest = _SparseMax(self.outputs_bytes)
        consecutive = self.outputs_bytes[:-1] + self.outputs_bytes[1:] if n > 1 else np.zeros(0)
        self._consecutive = _SparseMax(consecutive)

    @classmethod
    def from_costs(cls, ops: Sequence[str], costs: Mapping[str, OpCost], params: Sequence[float]) -> "OpsMemory":
        """From :func:`cost_models.ops.price_graph` costs of ``ops`` (missing ones cost nothing)."""
        outputs = [costs[op].output_bytes if op in costs else 0 for op in ops]
        tensors: dict[str, list] = {}
        for k, op in enumerate(ops):
            for key, nbytes in (costs[op].saved.items() if op in costs else ()):
                entry = tensors.setdefault(key, [0, []])
                entry[0] = max(entry[0], nbytes)
                entry[1].append(k)
        return cls(outputs, params, [(b, savers) for b, savers in tensors.values()])

    # ------------------------------------------------------------------ the quantities over [i, j)

    def params(self, i: np.ndarray | int, j: int) -> np.ndarray:
        return self.param_count[j] - self.param_count[i]

    def activations_bytes(self, i: np.ndarray | int, j: int) -> np.ndarray:
        """Saved-for-backward bytes per microbatch of ops ``[i, j)``, each tensor once."""
        return self.saved_prefix[j] - self.saved_prefix[i] - self._shared_from(j)[i]

    def largest_output_bytes(self, i: np.ndarray | int, j: int) -> np.ndarray:
        return self._largest.query(i, j)

    def inference_peak_bytes(self, i: np.ndarray | int, j: int) -> np.ndarray:
        """Without autograd only a few activations live at once: the two largest consecutive outputs."""
        return np.maximum(self._consecutive.query(i, j - 1), self._largest.query(i, j))

    def _shared_from(self, j: int) -> np.ndarray:
        """Per start i, bytes counted twice in [i, j): consecutive savers a < b of one tensor, i ≤ a, b < j."""
        cached = self._shared.get(j)
        if cached is None:
            count = int(np.searchsorted(self._pair_b, j, side="left"))
            hist = np.bincount(self._pair_a[:count], weights=self._pair_bytes[:count], minlength=self.n + 1)
            cached = np.cumsum(hist[::-1])[::-1]
            if len(self._shared) * (self.n + 1) > 1 << 22:  # at most ~32 MiB of cached rows
                self._shared.clear()
            self._shared[j] = cached
        return cached

    # ------------------------------------------------------------------ the quantities of any subset

    def quantities_of(self, mask: Sequence[bool]) -> dict[str, float]:
        """Parameters, saved bytes per microbatch, largest output and inference peak of the ops
        where ``mask`` is true (need not be contiguous: consecutive means adjacent in the order)."""
        mask = np.asarray(mask, dtype=bool)
        out = self.outputs_bytes
        pairs = (out[:-1] + out[1:])[mask[:-1] & mask[1:]] if self.n > 1 else np.zeros(0)
        largest = float(out[mask].max()) if mask.any() else 0.0
        return dict(
            params=float(np.diff(self.param_count)[mask].sum()),
            activations=float(sum(b for b, savers in self.saved if mask[savers].any())),
            largest_output=largest,
            inference_peak=max(float(pairs.max()) if len(pairs) else 0.0, largest),
        )

    def quantities(self, i: int, j: int) -> dict[str, float]:
        """:meth:`quantities_of` the run ``[i, j)``."""
        return dict(params=float(self.params(i, j)), activations=float(self.activations_bytes(i, j)),
                    largest_output=float(self.largest_output_bytes(i, j)),
                    inference_peak=float(self.inference_peak_bytes(i, j)))

    def total_bytes(self, i: np.ndarray | int, j: int, *, in_flight: int, gpu: bool, **rules: Any) -> np.ndarray:
        """Peak bytes of a stage running ops ``[i, j)`` (``rules``: see :func:`peak_breakdown`)."""
        terms = peak_terms(params=self.params(i, j), activations=self.activations_bytes(i, j),
                           largest_output=self.largest_output_bytes(i, j),
                           inference_peak=self.inference_peak_bytes(i, j) if rules.get("mode") == "infer" else 0.0,
                           in_flight=in_flight, gpu=gpu, **rules)
        return sum(terms.values())


class _SparseMax:
    """Range maximum over [i, j) in O(1) per query, vectorized over i (a sparse table)."""

    def __init__(self, values: np.ndarray):
        self.levels = [np.asarray(values, dtype=float)]
        width = 1
        while 2 * width <= len(values):
            last = self.levels[-1]
            self.levels.append(np.maximum(last[:-width], last[width:]))
            width *= 2

    def query(self, i: np.ndarray | int, j: int) -> np.ndarray:
        i = np.asarray(i)
        length = j - i
        safe = np.maximum(length, 1)
        level = np.floor(np.log2(safe)).astype(np.int64)
        out = np.zeros(np.shape(i))
        for k in np.unique(level[length > 0]) if np.ndim(i) else ([int(level)] if length > 0 else []):
            table = self.levels[k]
            where = (level == k) & (length > 0)
            lo = np.where(where, i, 0)
            hi = np.where(where, j - (1 << k), 0)
            out = np.where(where, np.maximum(table[lo], table[hi]), out)
        return out


def peak_terms(*, params: Any, activations: Any, largest_output: Any, inference_peak: Any, in_flight: int,
               gpu: bool, mode: str = "train", precision: str = "bf16-mixed", optimizer: str = "adamw",
               weight_dtype: torch.dtype | str = torch.bfloat16, kv_cache: float = 0) -> dict[str, Any]:
    """Peak bytes of a stage by kind (the fields of :class:`MemoryBreakdown`), from its quantities
    (scalars or arrays alike).

    Training: weights, gradients, master weights and optimizer states of ``params``; the saved
    ``activations`` of ``in_flight`` microbatches; and a transient: the peak is in backward (the
    largest output and its gradient live on top) or in the optimizer step (activations freed,
    the step's temporaries live), whichever is higher. Inference: weights, ``inference_peak``,
    the KV cache, and the largest output as transient. A GPU adds the allocator's fragmentation
    on the live bytes and the CUDA context.
    """
    if mode == "train":
        p = _precision(precision)
        states = _optimizer_states(optimizer)
        live = dict(weights_bytes=params * p.weight_bytes, grads_bytes=params * p.grad_bytes,
                    optimizer_bytes=params * (p.master_bytes + states * p.state_bytes),
                    activations_bytes=activations * in_flight, kv_cache_bytes=0.0 * params)
        step = params * p.state_bytes * OPTIMIZER_STEP_TEMPORARIES if states else 0.0 * params
        transient = np.maximum(2 * largest_output, step - live["activations_bytes"])
    elif mode == "infer":
        live = dict(weights_bytes=weight_bytes(1, weight_dtype) * params, grads_bytes=0.0 * params,
                    optimizer_bytes=0.0 * params, activations_bytes=inference_peak + 0.0 * params,
                    kv_cache_bytes=kv_cache + 0.0 * params)
        transient = largest_output + 0.0 * params
    else:
        raise ValueError(f"mode must be one of {MODES}, e.g. 'train'; got {mode!r}")
    workspace = transient
    if gpu:
        workspace = workspace + FRAGMENTATION * sum(live.values()) + GPU_CONTEXT_BYTES
    return dict(live, workspace_bytes=workspace)


def peak_breakdown(quantities: Mapping[str, float], *, in_flight: int, gpu: bool, **rules: Any) -> MemoryBreakdown:
    """:func:`peak_terms` of one stage's :meth:`OpsMemory.quantities` as a :class:`MemoryBreakdown`."""
    terms = peak_terms(params=quantities["params"], activations=quantities["activations"],
                       largest_output=quantities["largest_output"], inference_peak=quantities["inference_peak"],
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

