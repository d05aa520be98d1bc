"""Roofline time of a priced op on a device, with per-class efficiencies that calibration can fit.

    model = AnalyticCostModel()
    t = model.time(cost, get_device("h100"))      # OpTime(fwd_s=..., bwd_s=...)

time = max(FLOPs ÷ (peak FLOP/s × compute efficiency), bytes ÷ (bandwidth × memory efficiency))
       + kernels × per-kernel overhead

Running example: a bf16 linear of a Llama-7B MLP on 8 × 4096 tokens, 4096 → 11008, does
2·32768·4096·11008 = 2.95 TFLOP; on an H100 (989 TFLOP/s dense bf16, matmul efficiency 0.75) it
takes 3.98 ms, while its 0.99 GB of traffic would take 0.37 ms at 3.35 TB/s × 0.8: compute-bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

import torch

from cost_models.ops import OP_CLASSES, OpCost

logger = logging.getLogger(__name__)

# Achievable fraction of the datasheet peak, per op class. Typical of tuned libraries on recent
# GPUs: large cuBLAS GEMMs sustain 70-80% of dense peak, fused attention 50-60%, convolutions
# 55-65%; bandwidth-bound kernels stream at 75-90% of peak memory bandwidth. They are starting
# points: `AnalyticCostModel.calibrate` fits them to measurements on the device at hand.
DEFAULT_COMPUTE_EFFICIENCY = {
    "matmul": 0.75, "conv": 0.6, "attention": 0.55, "norm": 0.5, "softmax": 0.5, "embedding": 0.5,
    "indexing": 0.5, "reduction": 0.5, "elementwise": 0.5, "view": 1.0, "none": 1.0,
}
DEFAULT_MEMORY_EFFICIENCY = {
    "matmul": 0.8, "conv": 0.8, "attention": 0.8, "norm": 0.75, "softmax": 0.75, "embedding": 0.6,
    "indexing": 0.5, "reduction": 0.75, "elementwise": 0.8, "view": 1.0, "none": 1.0,
}


@dataclass(frozen=True)
class Efficiency:
    """Achievable fraction of peak FLOP/s and of peak bandwidth for every op class."""

    compute: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_COMPUTE_EFFICIENCY))
    """FLOP/s efficiency by op class, e.g. ``{"matmul": 0.75}``."""
    memory: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MEMORY_EFFICIENCY))
    """Bandwidth efficiency by op class."""
    kernel_overhead_s: float | None = None
    """Per-kernel overhead of the forward; None uses the device's own figure."""
    backward_kernel_overhead_s: float | None = None
    """Per-kernel overhead of the backward, which also pays the autograd engine; None: the same
    as the forward."""

    def __post_init__(self) -> None:
        for kind, table in (("compute", self.compute), ("memory", self.memory)):
            unknown = set(table) - set(OP_CLASSES)
            if unknown:
                raise ValueError(f"unknown op class(es) {sorted(unknown)} in {kind} efficiency; "
                                 f"classes are {', '.join(OP_CLASSES)}")
            for name, value in table.items():
                if not value > 0:
                    raise ValueError(f"{kind} efficiency of {name} must be positive, e.g. 0.7; got {value}")
            missing = set(OP_CLASSES) - set(table)
            if missing:
                defaults = DEFAULT_COMPUTE_EFFICIENCY if kind == "compute" else DEFAULT_MEMORY_EFFICIENCY
                object.__setattr__(self, kind, {**{c: defaults[c] for c in missing}, **table})
        for name in ("kernel_overhead_s", "backward_kernel_overhead_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, e.g. 5e-6; got {value}")


@dataclass(frozen=True)
class OpTime:
    """Predicted seconds of one op's forward and backward."""

    fwd_s: float
    bwd_s: float

    @property
    def total_s(self) -> float:
        return self.fwd_s + self.bwd_s


@dataclass(frozen=True)
class Sample:
    """One measurement for calibration: the cost of an op, or of a block of ops run together
    (a tuple of costs), and its measured times on a device."""

    cost: OpCost | tuple[OpCost, ...]
    device: object
    """The DeviceSpec it was measured on."""
    fwd_s: float
    bwd_s: float | None = None

    @property
    def costs(self) -> tuple[OpCost, ...]:
        return self.cost if isinstance(self.cost, tuple) else (self.cost,)


class AnalyticCostModel:
    """Prices ops on devices with the roofline model (see the module docstring)."""

    def __init__(self, efficiency: Efficiency | None = None, *, allow_tf32: bool = False):
        """
        Args:
            efficiency: per-class efficiencies; defaults to :data:`DEFAULT_COMPUTE_EFFICIENCY`
                and :data:`DEFAULT_MEMORY_EFFICIENCY`.
            allow_tf32: fp32 matmuls run on TF32 tensor cores (``torch.backends.cuda.matmul
                .allow_tf32``), so they get the device's tf32 peak.
        """
        self.efficiency = efficiency or Efficiency()
        self.allow_tf32 = allow_tf32

    def time(self, cost: OpCost, device) -> OpTime:
        """Forward and backward seconds of ``cost`` on ``device`` (a DeviceSpec)."""
        return OpTime(self._seconds(cost, device, cost.fwd_flops, cost.fwd_bytes, cost.fwd_kernels),
                      self._seconds(cost, device, cost.bwd_flops, cost.bwd_bytes, cost.bwd_kernels, backward=True))

    def times(self, costs: Mapping[str, OpCost], device) -> dict[str, OpTime]:
        """:meth:`time` of every op, by name; identical costs are priced once."""
        memo: dict[int, OpTime] = {}
        result = {}
        for name, cost in costs.items():
            key = id(cost)
            if key not in memo:
                memo[key] = self.time(cost, device)
            result[name] = memo[key]
        return result

    def _seconds(self, cost: OpCost, device, flops: int, nbytes: int, kernels: int, backward: bool = False) -> float:
        return self._roofline_s(cost, device, flops, nbytes, kernels) + kernels * self._overhead_s(device, backward)

    def _roofline_s(self, cost: OpCost, device, flops: int, nbytes: int, kernels: int) -> float:
        if kernels == 0 and flops == 0:
            return 0.0
        compute_s = flops / (self._peak_flops(cost, device) * self.efficiency.compute[cost.op_class]) if flops else 0.0
        memory_s = nbytes / (device.memory_bandwidth_bytes_per_s * self.efficiency.memory[cost.op_class])
        return max(compute_s, memory_s)

    def _overhead_s(self, device, backward: bool) -> float:
        e = self.efficiency
        if backward and e.backward_kernel_overhead_s is not None:
            return e.backward_kernel_overhead_s
        return e.kernel_overhead_s if e.kernel_overhead_s is not None else device.kernel_overhead_s

    def _peak_flops(self, cost: OpCost, device) -> float:
        dtype = cost.dtype if cost.dtype is not None and cost.dtype.is_floating_point else torch.float32
        if dtype == torch.float32 and self.allow_tf32 and "tf32" in device.peak_flops:
            return device.flops_for("tf32")
        try:
            return device.flops_for(dtype)
        except ValueError:  # e.g. fp8 on a device without it runs upcast
            return device.flops_for("fp32")

    def calibrate(self, samples: Iterable[Sample], *, per_class: bool = True) -> "AnalyticCostModel":
        """A model whose efficiencies and per-kernel overheads fit ``samples`` (measured times of
        single ops or of whole blocks).

        Fits, by least squares on the relative error, one time scale per op class (applied to
        both its efficiencies) and one per-kernel overhead for forward and one for backward:

            measured ≈ roofline(op) × scale[class] + kernels × overhead[pass]

        An overhead that comes out negative is pinned to zero and the rest refitted. Classes
        without samples keep their efficiencies. With ``per_class=False`` one scale serves every
        class: the right fit for whole blocks, whose mix of op classes barely varies between
        samples, after a per-class fit on single ops.

        Example:
            >>> calibrated = AnalyticCostModel().calibrate(samples)   # samples: list[Sample]
        """
        # One row per measured pass: roofline seconds per op class and kernel launches, which
        # the fit weighs by a scale per class and an overhead per kernel.
        rows: list[tuple[dict[str, float], int, float, bool]] = []
        for s in samples:
            for measured, backward in ((s.fwd_s, False), (s.bwd_s or 0.0, True)):
                roofline: dict[str, float] = {}
                kernels = 0
                for c in s.costs:
                    flops, nbytes, k = (c.bwd_flops, c.bwd_bytes, c.bwd_kernels) if backward else \
                        (c.fwd_flops, c.fwd_bytes, c.fwd_kernels)
                    kernels += k
                    seconds = self._roofline_s(c, s.device, flops, nbytes, k)
                    if seconds:
                        key = c.op_class if per_class else "*"
                        roofline[key] = roofline.get(key, 0.0) + seconds
                if kernels and measured > 0:
                    rows.append((roofline, kernels, measured, backward))
        if not rows:
            raise ValueError("calibrate() needs at least one sample of an op with kernels and a positive measured time")
        classes = sorted({c for roofline, *_ in rows for c in roofline})
        overheads = [False, True]
        while True:
            columns = [("class", c) for c in classes] + [("overhead", b) for b in overheads]
            matrix = [[roofline.get(key[1], 0.0) if key[0] == "class" else (kernels if key[1] == bw else 0.0)
                       for key in columns] for roofline, kernels, _, bw in rows]
            a = torch.tensor(matrix, dtype=torch.float64) / torch.tensor([r[2] for r in rows], dtype=torch.float64)[:, None]
            solution = torch.linalg.lstsq(a, torch.ones(len(rows), 1, dtype=torch.float64)).solution[:, 0].tolist()
            fitted = dict(zip(columns, solution))
            negative = [b for b in overheads if fitted[("overhead", b)] < 0]
            if not negative:
                break
            overheads = [b for b in overheads if b not in negative]
        compute, memory = dict(self.efficiency.compute), dict(self.efficiency.memory)
        for c in classes:
            scale = fitted[("class", c)]
            if scale > 0:  # time scale s means efficiency ÷ s
                for op_class in (compute if c == "*" else [c]):
                    compute[op_class] /= scale
                    memory[op_class] /= scale
        efficiency = replace(self.efficiency, compute=compute, memory=memory,
                             kernel_overhead_s=fitted.get(("overhead", False), 0.0),
                             backward_kernel_overhead_s=fitted.get(("overhead", True), 0.0))
        logger.debug("calibrated efficiencies: %s", efficiency)
        return AnalyticCostModel(efficiency, allow_tf32=self.allow_tf32)
