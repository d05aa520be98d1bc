"""What one rank holds in memory, next to what the plan predicted for its stage.

    with pipe.measure_memory(optimizer=opt):         # one training step, measured
        loss = pipe.step(x, target=y)
        opt.step()
    print(pipe.memory_report(optimizer=opt))         # planned and measured, by kind

The plan prices a stage's memory by kind (``Plan.stages[s].memory``: weights, gradients,
optimizer state, activations, workspace); the report puts beside each what this rank holds:

* weights: the bytes of the model's parameters and buffers on the rank's device, each storage
  once; of a DTensor (a tensor-parallel weight), its local shard's. A model built on ``meta`` holds its stage's modules there (and the rest nowhere); a
  model built whole on the rank's device holds all of it, and the figure says so.
* gradients: the bytes of the ``.grad`` of the rank's parameters, now or at the end of the last
  measured step, whichever is more (``zero_grad()`` frees them).
* optimizer: the bytes of the optimizer's state tensors for the rank's parameters, likewise.
* activations: the highest total, during the last measured step, of the tensors autograd kept
  for backward (counted by ``torch.autograd.graph.saved_tensors_hooks``, each storage once,
  a DTensor's local shard, the weights left out): what the plan's activation figure prices, microbatches in flight
  included.
* peak: on CUDA, ``torch.cuda.max_memory_allocated`` over the measured step. PyTorch keeps no
  statistics of its CPU allocator, so on the CPU the peak is the bytes held when the step
  began (weights, gradients and optimizer state, counted as above) plus the highest growth of
  the CPU allocator's allocations during the step, from ``torch.profiler``'s memory records
  (``profile_memory=True``): every tensor the step allocates, temporaries and received
  activations included; Python objects and the communication library's own buffers are not.

Without a measured step, activations are reported as 0 and the peak, on CUDA, is the
allocator's peak since the process started (or since its statistics were last reset); None
on the CPU.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from cost_models.memory import MemoryBreakdown

if TYPE_CHECKING:
    from autosplit.distributed.runtime import DistributedPipeline


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """What a measured step used (:class:`MemoryProbe`)."""

    activations_bytes: float
    """The highest total of tensors kept for backward during the step."""
    grads_bytes: float
    """The gradients of the rank's parameters at the end of the step."""
    optimizer_bytes: float
    """The optimizer's state for the rank's parameters at the end of the step (0 if not given)."""
    peak_bytes: float
    """The highest memory in use during the step (see the module docstring for how)."""
    method: str
    """How ``peak_bytes`` was measured, in words."""


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """One rank's memory: the plan's figure for its stage and what the rank holds."""

    stage: int
    device: str
    planned: MemoryBreakdown
    """``plan.stages[stage].memory``."""
    measured: MemoryBreakdown
    """Weights, gradients and optimizer state counted now; activations from the last measured
    step (0 without one). Workspace and KV cache are not measured (0)."""
    measured_peak_bytes: float | None
    """The highest memory in use (see ``peak_method``); None where it could not be measured."""
    peak_method: str
    """How ``measured_peak_bytes`` was measured, in words."""

    @property
    def planned_peak_bytes(self) -> float:
        """The plan's total for the stage: every kind at once, as the solver's memory limit counts it."""
        return self.planned.total_bytes

    def __str__(self) -> str:
        rows = [("weights", "weights_bytes"), ("gradients", "grads_bytes"), ("optimizer", "optimizer_bytes"),
                ("activations", "activations_bytes"), ("workspace", "workspace_bytes")]
        lines = [f"{f'stage {self.stage} on {self.device}':<16}{'planned':>12}{'measured':>12}"]
        for label, field in rows:
            measured = getattr(self.measured, field) if field != "workspace_bytes" else None
            lines.append(f"  {label:<14}{_size(getattr(self.planned, field)):>12}{_size(measured):>12}")
        lines.append(f"  {'peak':<14}{_size(self.planned_peak_bytes):>12}{_size(self.measured_peak_bytes):>12}"
                     f"   {self.peak_method}")
        return "\n".join(lines)


class MemoryProbe:
    """Measures the steps run inside it (``with pipe.measure_memory(): ...``); on leaving,
    the pipeline's :attr:`last_step_memory` holds what they used at most."""

    def __init__(self, pipe: "DistributedPipeline", optimizer: torch.optim.Optimizer | None = None):
        self.pipe = pipe
        self.optimizer = optimizer
        self._saved = _SavedTensorBytes(_storages(_model_tensors(pipe._model, pipe.device)))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._saved.pack, self._saved.unpack)
        self._profiler: Any = None
        self._held_bytes = 0.0

    def __enter__(self) -> "MemoryProbe":
        device = self.pipe.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            counted = _counted(self.pipe, self.optimizer)
            self._held_bytes = counted.weights_bytes + counted.grads_bytes + counted.optimizer_bytes
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True)
            self._profiler.__enter__()
            self.pipe._failures.inline = True  # the step's allocations in this thread, where the profiler records
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        device = self.pipe.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = float(torch.cuda.max_memory_allocated(device))
            method = f"torch.cuda.max_memory_allocated({device}) over the measured step"
        else:
            self.pipe._failures.inline = False
            self._profiler.__exit__(*exc)
            peak = self._held_bytes + _peak_growth(self._profiler)
            method = ("CPU: tensors held at the start of the step + the CPU allocator's peak growth during it "
                      "(torch.profiler memory records)")
        after = _counted(self.pipe, self.optimizer)
        self.pipe.last_step_memory = StepMemory(float(self._saved.peak_bytes), after.grads_bytes,
                                                after.optimizer_bytes, peak, method)


def memory_report(pipe: "DistributedPipeline", optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """This rank's :class:`MemoryReport` (see the module docstring for what each figure is)."""
    measured = _counted(pipe, optimizer)
    step = pipe.last_step_memory
    if step is not None:
        measured = dataclasses.replace(measured, activations_bytes=step.activations_bytes,
                                       grads_bytes=max(measured.grads_bytes, step.grads_bytes),
                                       optimizer_bytes=max(measured.optimizer_bytes, step.optimizer_bytes))
        peak, method = step.peak_bytes, step.method
    elif pipe.device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(pipe.device))
        method = f"torch.cuda.max_memory_allocated({pipe.device}) since the process started (no measured step)"
    else:
        peak, method = None, "no measured step: run one inside pipe.measure_memory()"
    return MemoryReport(pipe.stage, str(pipe.device), pipe.plan.stages[pipe.stage].memory, measured, peak, method)


def _counted(pipe: "DistributedPipeline", optimizer: torch.optim.Optimizer | None) -> MemoryBreakdown:
    parameters = [p for _, p in pipe.named_parameters()]
    weights = _bytes(_model_tensors(pipe._model, pipe.device))
    grads = _bytes(p.grad for p in parameters if p.grad is not None)
    state = _bytes(t for p in parameters for t in (optimizer.state.get(p, {}).values() if optimizer else ())
                   if isinstance(t, torch.Tensor))
    return MemoryBreakdown(weights_bytes=weights, grads_bytes=grads, optimizer_bytes=state)


def _model_tensors(model: nn.Module, device: torch.device) -> list[torch.Tensor]:
    return [t for t in [*model.parameters(), *model.buffers()] if t.device == device]


def _local(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``t``: a DTensor's local shard (a DTensor has no storage of its
    own), any other tensor itself."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        with torch.no_grad():
            return t.to_local()
    return t


def _storages(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {_local(t).untyped_storage().data_ptr() for t in tensors}


def _bytes(tensors: Iterable[torch.Tensor]) -> float:
    """Bytes of the storages behind ``tensors`` (a DTensor's: its local shard's), each once."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = _local(t).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return float(sum(seen.values()))


class _SavedTensorBytes:
    """Counts the storages autograd keeps for backward: ``pack`` wraps each saved tensor in a
    handle that autograd holds until backward frees it; the handle's end releases the count."""

    def __init__(self, excluded: set[int]):
        self.excluded = excluded
        self.users: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def pack(self, tensor: torch.Tensor) -> "_Saved":
        try:
            storage = _local(tensor).untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage (sparse, nested)
            return _Saved(tensor, None, 0, self)
        if key in self.excluded or size == 0:
            return _Saved(tensor, None, 0, self)
        self.users[key] = self.users.get(key, 0) + 1
        if self.users[key] == 1:
            self.live_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return _Saved(tensor, key, size, self)

    @staticmethod
    def unpack(saved: "_Saved") -> torch.Tensor:
        return saved.tensor

    def release(self, key: int, size: int) -> None:
        self.users[key] -= 1
        if not self.users[key]:
            del self.users[key]
            self.live_bytes -= size


class _Saved:
    __slots__ = ("tensor", "key", "size", "counter")

    def __init__(self, tensor: torch.Tensor, key: int | None, size: int, counter: _SavedTensorBytes):
        self.tensor, self.key, self.size, self.counter = tensor, key, size, counter

    def __del__(self) -> None:
        if self.key is not None:
            self.counter.release(self.key, self.size)


def _peak_growth(profiler: Any) -> float:
    """The highest running total of the CPU allocations and frees the profiler recorded."""
    events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    total = peak = 0
    for _, size in events:
        total += size
        peak = max(peak, total)
    return float(peak)


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value}"
