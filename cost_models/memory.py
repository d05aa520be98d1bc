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
from typing import Iterable, Mapping

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
    largest_output = max((costs[n].output_bytes for n in nodes), default=0)
    if mode == "train":
        state = training_state_bytes(num_params, precision=precision, optimizer=optimizer)
        in_flight = microbatches_in_flight(schedule, num_stages=num_stages, stage=stage, microbatches=microbatches)
        activations = activation_bytes(costs, nodes) * in_flight
        live = dict(weights_bytes=state.weights_bytes, grads_bytes=state.grads_bytes,
                    optimizer_bytes=state.master_bytes + state.optimizer_bytes, activations_bytes=activations)
        # The peak is in backward (activations plus the biggest output and its gradient) or in
        # the optimizer step (activations freed, step temporaries allocated), whichever is higher.
        step = 0.0
        if _optimizer_states(optimizer):
            step = num_params * _precision(precision).state_bytes * OPTIMIZER_STEP_TEMPORARIES
        transient = max(2 * largest_output, step - activations)
    else:
        live = dict(weights_bytes=weight_bytes(num_params, weight_dtype), kv_cache_bytes=kv_cache,
                    activations_bytes=_inference_peak(costs, nodes))
        transient = largest_output
    workspace = transient
    if device_kind == "gpu":
        workspace += FRAGMENTATION * sum(live.values()) + GPU_CONTEXT_BYTES
    return MemoryBreakdown(**live, workspace_bytes=workspace)


def _inference_peak(costs: Mapping[str, OpCost], nodes: list[str]) -> int:
    """Without autograd only a few activations live at once: the two largest consecutive outputs."""
    outputs = [costs[n].output_bytes for n in nodes]
    return max((a + b for a, b in zip(outputs, outputs[1:])), default=max(outputs, default=0))


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

