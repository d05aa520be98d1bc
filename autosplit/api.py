"""The two entry points: ``autosplit.plan`` (where would it run?) and ``autosplit.autosplit``
(run it there).

    sm = autosplit.autosplit(model, devices=4, example_inputs=(x,))
    opt = torch.optim.AdamW(sm.parameters())                     # the loop is unchanged
    loss = loss_fn(sm(x), y.to(sm.output_device)); loss.backward(); opt.step()
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch
from torch import nn

from autosplit.graph import OpGraph
from autosplit.plan import Plan
from autosplit.rewrite import SplitModule, split_module
from autosplit.solver import SolverOptions, solve
from autosplit.trace import TensorSpec, capture
from cost_models import Cluster, price_graph

logger = logging.getLogger(__name__)

_SOLVER_FIELDS = {f.name for f in dataclasses.fields(SolverOptions)}


def resolve_devices(devices: int | Sequence[str | torch.device]) -> list[torch.device]:
    """An int means the first N accelerators (N CPU devices on a machine without one)."""
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"devices must be at least 1, e.g. devices=4; got {devices}")
        if torch.cuda.is_available():
            if devices > torch.cuda.device_count():
                raise ValueError(f"devices={devices} but this machine has {torch.cuda.device_count()} CUDA "
                                 "devices: ask for fewer, or list them, e.g. ['cuda:0', 'cuda:1', 'cpu']")
            return [torch.device("cuda", i) for i in range(devices)]
        return [torch.device("cpu")] * devices
    if isinstance(devices, (str, torch.device)):
        devices = [devices]
    resolved = [torch.device(d) for d in devices]
    if not resolved:
        raise ValueError("devices must name at least one device, e.g. ['cuda:0', 'cuda:1']")
    return resolved


def plan(model: nn.Module, *, devices: int | Sequence[str | torch.device] = 4, example_inputs: Any = None,
         example_kwargs: dict[str, Any] | None = None, mode: str = "train", microbatches: int = 1,
         cluster: Cluster | str | None = None, **options: Any) -> Plan:
    """Plan the split of ``model``: capture, price and solve; no device is touched.

    Args:
        model: the model (its weights may be on ``meta``).
        devices: how many devices (an int) or which (``["cuda:0", "cuda:1", "cpu"]``).
        example_inputs, example_kwargs: one microbatch of inputs: tensors or ``spec`` shapes.
        mode, microbatches: see :class:`SolverOptions`; other ``options`` are its fields
            (``schedule``, ``memory_headroom``, ``pin``, ``no_split``...).
        cluster: plan for other hardware than the local devices, e.g. ``"8xh100"``.

    Example:
        >>> p = autosplit.plan(model, cluster="8xh100", example_inputs=(spec((1, 4096), dtype=torch.long),))
    """
    if example_inputs is None and not example_kwargs:
        raise ValueError("plan() needs example inputs, e.g. example_inputs=(x,) or "
                         "(autosplit.spec((8, 1024), dtype=torch.long),)")
    traced = capture(model, example_inputs if example_inputs is not None else (), example_kwargs)
    return _solve(traced, devices, cluster, mode, microbatches, options)


def autosplit(model: nn.Module, *, devices: int | Sequence[str | torch.device] = 4, example_inputs: Any = None,
              example_kwargs: dict[str, Any] | None = None, mode: str = "train", microbatches: int = 1,
              cluster: Cluster | str | None = None, plan: Plan | None = None, output_device: Any = None,
              **options: Any) -> SplitModule:
    """Split ``model`` over ``devices`` and return a module that trains like it.

    Without example inputs the split is planned on the first forward call, with that batch. With
    ``plan`` (e.g. ``Plan.load(path)``) that plan is applied instead of solving again.

    Example:
        >>> sm = autosplit(model, devices=2, example_inputs=(x,))
        >>> sm(x).sum().backward()
    """
    if microbatches != 1:
        raise ValueError("microbatches > 1 needs the pipelined runner, which is not available yet in one "
                         "process: use microbatches=1 here (plan() takes microbatches for planning)")
    resolved = resolve_devices(devices)
    _check_options(options)
    split = SplitModule(model, None, plan, resolved, torch.device(output_device) if output_device else resolved[-1])

    def build(args: tuple, kwargs: dict) -> None:
        traced = capture(model, args, kwargs)
        chosen = plan if plan is not None else _solve(traced, resolved, cluster, mode, microbatches, options)
        built = split_module(model, traced, chosen, resolved[: len(chosen.stages)], output_device)
        split.attach(built)

    if example_inputs is not None or example_kwargs:
        inputs = example_inputs if isinstance(example_inputs, tuple) else ((example_inputs,) if example_inputs is not None else ())
        if any(isinstance(x, TensorSpec) for x in inputs):
            raise ValueError("autosplit() runs the model, so it needs real example tensors, not specs")
        build(inputs, dict(example_kwargs or {}))
    else:
        split.build_on_first_call(build)
    return split


def _solve(traced, devices, cluster, mode: str, microbatches: int, options: dict[str, Any]) -> Plan:
    _check_options(options)
    if cluster is None:
        cluster = Cluster.from_devices([str(d) for d in resolve_devices(devices)])
    elif isinstance(cluster, str):
        cluster = Cluster.parse(cluster)
    solver_options = SolverOptions(mode=mode, microbatches=microbatches, **options)
    return solve(OpGraph.from_traced(traced), cluster, solver_options,
                 costs=price_graph(traced.graph_module, training=mode == "train"), parameters=traced.parameters)


def _check_options(options: dict[str, Any]) -> None:
    unknown = set(options) - _SOLVER_FIELDS
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; options are {', '.join(sorted(_SOLVER_FIELDS))}")
