"""Measured costs: run nodes (or whole blocks) on a real local device with the traced shapes.

    profiler = ProfiledCostModel("cpu")                  # or "cuda:0"
    times = profiler.measure(gm)                         # {node: OpTime}, median of repeats
    calibrated = profiler.calibrate(AnalyticCostModel(), gm, costs, cpu_device())

Each node gets fresh random inputs of its traced shapes (zeros for integer inputs, so indices
are valid), is warmed up, then timed ``repeats`` times forward and backward; the median is kept.
On CUDA the time comes from CUDA events on the device's current stream, on the CPU from
``time.perf_counter``. Results are cached on disk per (device name, op signature): identical
ops (every layer of a transformer) are measured once, and a later run measures nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from cost_models.analytic import AnalyticCostModel, OpTime, Sample
from cost_models.devices import cpu_model_name
from cost_models.ops import OpCost, call_node, module_state, needs_grad_of, node_inputs, signature

logger = logging.getLogger(__name__)

COMPUTE_OPS = ("call_function", "call_method", "call_module")


def default_cache_dir() -> str:
    """``$AUTOSPLIT_CACHE`` or ``~/.cache/autosplit``; profiles go to its ``profiles/`` folder."""
    root = os.environ.get("AUTOSPLIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "autosplit")
    return os.path.join(root, "profiles")


class ProfiledCostModel:
    """Measures ops and blocks on one local device (see the module docstring)."""

    def __init__(self, device: str | torch.device = "cpu", *, warmup: int = 2, repeats: int = 5,
                 cache_dir: str | None = None, progress: bool | None = None):
        """
        Args:
            device: where to measure: ``"cpu"`` or ``"cuda:N"``.
            warmup: untimed runs before timing (allocator, kernel selection, caches).
            repeats: timed runs; the median is kept.
            cache_dir: where measurements are kept between runs; ``None`` uses
                :func:`default_cache_dir`, ``""`` keeps them in memory only.
            progress: show a progress bar; default: when stderr is a terminal.
        """
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"cannot profile on {self.device}: CUDA is not available here; use device='cpu'")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"profiling runs on 'cpu' or 'cuda:N', got {self.device}")
        if warmup < 0 or repeats < 1:
            raise ValueError(f"warmup must be >= 0 and repeats >= 1, e.g. warmup=2, repeats=5; got {warmup}, {repeats}")
        self.warmup, self.repeats = warmup, repeats
        self.device_name = _device_name(self.device)
        cache_dir = default_cache_dir() if cache_dir is None else cache_dir
        self.cache_path = os.path.join(cache_dir, _safe(self.device_name) + ".json") if cache_dir else None
        self._cache: dict[str, list[float]] = self._load()
        self.progress = sys.stderr.isatty() if progress is None else progress

    # ------------------------------------------------------------------ ops

    def measure(self, gm: fx.GraphModule, nodes: Iterable[str] | None = None, *,
                training: bool = True) -> dict[str, OpTime]:
        """Measured forward (and backward) seconds of every compute node of ``gm`` (or ``nodes``)."""
        wanted = set(nodes) if nodes is not None else None
        needs_grad = needs_grad_of(gm) if training else {}
        todo = [n for n in gm.graph.nodes if n.op in COMPUTE_OPS and (wanted is None or n.name in wanted)]
        keys = {n.name: signature(n, gm, needs_grad) for n in todo}
        fresh = {key for key in keys.values() if key is None or _digest(key, training) not in self._cache}
        results: dict[str, OpTime] = {}
        with self._bar(len(fresh)) as advance:
            for node in todo:
                key = keys[node.name]
                digest = _digest(key, training) if key is not None else None
                if digest is None or digest not in self._cache:
                    measured = self._measure_node(node, gm, needs_grad, training)
                    if digest is None:
                        results[node.name] = measured
                        advance()
                        continue
                    self._cache[digest] = [measured.fwd_s, measured.bwd_s]
                    advance()
                fwd_s, bwd_s = self._cache[digest]
                results[node.name] = OpTime(fwd_s, bwd_s)
        self._save()
        return results

    def _measure_node(self, node: fx.Node, gm: fx.GraphModule, needs_grad: Mapping[str, bool],
                      training: bool) -> OpTime:
        args, kwargs, inputs = node_inputs(node, gm, needs_grad, self.device)
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        state = module_state(module, self.device) if module is not None else {}
        with torch.no_grad():
            try:
                fwd_s = self._time(lambda: call_node(node, module, state, args, kwargs))
            except Exception as e:
                logger.warning("cannot run %s (%s) on %s, counting it as free: %s", node.name, node.target, self.device, e)
                return OpTime(0.0, 0.0)
        bwd_s = 0.0
        if training:
            wrt = [t for t, _ in inputs.values() if t.requires_grad] + [p for p in state.values() if p.requires_grad]
            out = call_node(node, module, state, args, kwargs)
            outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            if outputs and wrt:
                grads = [torch.randn_like(t) for t in outputs]
                bwd_s = self._time(lambda: torch.autograd.grad(outputs, wrt, grads, retain_graph=True, allow_unused=True))
        return OpTime(fwd_s, bwd_s)

    # ------------------------------------------------------------------ blocks

    def measure_callable(self, fn: Callable[[], Any], *, backward: bool = True) -> OpTime:
        """Median seconds of ``fn()`` (a block's forward on prepared inputs), and of the backward
        of its differentiable outputs when ``backward``. Not cached: the callable is opaque."""
        with torch.no_grad():
            fwd_s = self._time(fn)
        bwd_s = 0.0
        if backward:
            out = fn()
            outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            if outputs:
                grads = [torch.randn_like(t) for t in outputs]
                bwd_s = self._time(lambda: torch.autograd.backward(outputs, grads, retain_graph=True))
        return OpTime(fwd_s, bwd_s)

    def _time(self, fn: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            fn()
        samples = []
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                stream = torch.cuda.current_stream(self.device)
                for _ in range(self.repeats):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record(stream)
                    fn()
                    end.record(stream)
                    end.synchronize()
                    samples.append(start.elapsed_time(end) / 1e3)
        else:
            for _ in range(self.repeats):
                start_s = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start_s)
        return statistics.median(samples)

    # ------------------------------------------------------------------ calibration

    def calibrate(self, model: AnalyticCostModel, gm: fx.GraphModule, costs: Mapping[str, OpCost], device_spec,
                  nodes: Iterable[str] | None = None, *, training: bool = True) -> AnalyticCostModel:
        """``model`` with its efficiencies fitted to measurements of ``gm``'s nodes on this device.

        Args:
            model: the analytic model to start from.
            gm, costs: the graph and its :func:`cost_models.ops.price_graph`.
            device_spec: the DeviceSpec describing this device (e.g. ``cpu_device()``).
            nodes: the nodes to measure (default: all compute nodes).
        """
        measured = self.measure(gm, nodes, training=training)
        samples = [Sample(costs[name], device_spec, t.fwd_s, t.bwd_s if training else None)
                   for name, t in measured.items() if costs[name].fwd_kernels]
        return model.calibrate(samples)

    # ------------------------------------------------------------------ cache

    def _load(self) -> dict[str, list[float]]:
        if not self.cache_path or not os.path.exists(self.cache_path):
            return {}
        try:
            with open(self.cache_path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable profile cache %s: %s", self.cache_path, e)
            return {}

    def _save(self) -> None:
        if not self.cache_path:
            return
        os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
        tmp = self.cache_path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self._cache, f, sort_keys=True)
        os.replace(tmp, self.cache_path)

    def _bar(self, total: int):
        if not self.progress or total < 2:
            return _Silent()
        return _Bar(total, f"profiling on {self.device_name}")


def _device_name(device: torch.device) -> str:
    """What identifies the hardware: the GPU's name, or the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()} x{torch.get_num_threads()} threads"


def _digest(key: str, training: bool) -> str:
    return hashlib.sha1(f"{torch.__version__}|{training}|{key}".encode()).hexdigest()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class _Silent:
    def __enter__(self) -> Callable[[], None]:
        return lambda: None

    def __exit__(self, *exc: Any) -> None:
        return None


class _Bar:
    """A rich progress bar on stderr; yields a function that advances it by one."""

    def __init__(self, total: int, description: str):
        from rich.console import Console
        from rich.progress import Progress

        self.progress = Progress(console=Console(stderr=True), transient=True)
        self.task = self.progress.add_task(description, total=total)

    def __enter__(self) -> Callable[[], None]:
        self.progress.start()
        return lambda: self.progress.advance(self.task)

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

