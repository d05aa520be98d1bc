"""Re-price a plan's memory for the schedule the runtime will actually run.

    plan = recheck_schedule(plan, "gpipe", plan.microbatches)    # before the one-process runner

A plan is solved for a schedule (``"1f1b"`` by default: stage s of S keeps S − s microbatches'
activations in flight), but the one-process runner (``autosplit.pipeline.Pipeline``) runs a GPipe
wavefront: every stage runs every microbatch's forward before any backward, so each keeps all m.
A plan that fits under 1F1B may not under GPipe. ``recheck_schedule`` recomputes every stage's
memory with the same model the solver used (``cost_models.memory.peak_breakdown`` of the stage's
parameters, saved bytes per microbatch and largest output, all kept in ``Stage``) and refuses,
before anything is moved, when a stage no longer fits.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from autosplit.errors import InfeasibleError
from autosplit.plan import Plan, Stage
from cost_models.memory import INTERLEAVED, SCHEDULES, max_fitting, microbatches_in_flight, peak_breakdown

logger = logging.getLogger(__name__)


def pipeline_times(stage_times_s: Sequence[float], device_of_stage: Sequence[int],
                   microbatches: int) -> tuple[float, float, float]:
    """(bottleneck, step, bubble fraction) of a pipeline whose stage s takes ``stage_times_s[s]``
    per microbatch on device ``device_of_stage[s]``.

    The bottleneck is the slowest device's time per microbatch: the sum of its stages' times.
    One stage per device (S stages): the step is (m + S − 1) × bottleneck, the bubble
    (S − 1) ÷ (m + S − 1). Several stages per device (interleaved, v on each of D devices): in
    the steady state a device runs all of its stages for every microbatch, m × bottleneck, and
    filling and draining the pipeline leaves each device idle for D − 1 stage times, counted at
    the slowest stage: step = m × bottleneck + (D − 1) × max stage time, bubble = (D − 1) × max
    stage time ÷ step, which is (D − 1) ÷ (v·m + D − 1) when the stages are equal: the plain
    pipeline's bubble with m·v microbatches (Narayanan et al. 2021, §2.2).
    """
    m = microbatches
    per_device: dict[int, float] = {}
    for t, device in zip(stage_times_s, device_of_stage, strict=True):
        per_device[device] = per_device.get(device, 0.0) + t
    bottleneck = max(per_device.values())
    S, D = len(stage_times_s), len(per_device)
    if S == D:
        return bottleneck, (m + S - 1) * bottleneck, (S - 1) / (m + S - 1)
    step = m * bottleneck + (D - 1) * max(stage_times_s)
    return bottleneck, step, ((D - 1) * max(stage_times_s) / step if step > 0 else 0.0)


def recheck_schedule(plan: Plan, schedule: str, microbatches: int) -> Plan:
    """The plan with each stage's memory recomputed for ``schedule`` and ``microbatches``.

    Call it wherever a plan is about to run under a schedule other than the one it was solved
    for, e.g. in ``autosplit.api`` before building the one-process runner, which runs GPipe:
    ``plan = recheck_schedule(plan, "gpipe", microbatches)``. The stages, cuts and times are
    unchanged; memory, schedule, microbatches, step time and bubble follow the new schedule.

    Raises:
        InfeasibleError: a stage no longer fits its device; names the stage, the device, the bytes
            needed against the capacity, and what would fit (fewer microbatches, more devices,
            the multi-process runtime with 1F1B).
        ValueError: an unknown schedule or a microbatch count below 1.

    Example:
        >>> plan = recheck_schedule(plan, "gpipe", 8)
        >>> [stage.memory_bytes for stage in plan.stages]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, e.g. 'gpipe'; got {schedule!r}")
    if plan.stages_per_device > 1:
        raise ValueError(f"the plan runs {plan.stages_per_device} stages on each device under {plan.schedule!r}, "
                         f"placed and priced for that schedule and {plan.microbatches} microbatches: plan again with "
                         f"schedule={schedule!r} and microbatches={microbatches}")
    if schedule == INTERLEAVED:
        raise ValueError(f"schedule {INTERLEAVED!r} runs several stages on each device, and the plan runs one: plan "
                         f"again with schedule={INTERLEAVED!r} and stages_per_device=2 or more")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive int, e.g. 8; got {microbatches!r}")
    S = len(plan.stages)
    rules = {k: plan.options[k] for k in ("precision", "optimizer", "weight_dtype", "shared_weights") if k in plan.options}
    rules["mode"] = plan.mode
    rules["data_parallel"] = plan.data_parallel
    stages = []
    for stage in plan.stages:
        memory = _memory(plan, stage, rules, schedule, microbatches)
        if memory.total_bytes > stage.memory_capacity_bytes:
            raise _does_not_fit(plan, stage, rules, schedule, microbatches, memory.total_bytes)
        stages.append(dataclasses.replace(stage, memory=memory))
    m = microbatches
    step = (m + S - 1) * plan.bottleneck_s + plan.data_parallel_step_s
    per_microbatch = plan.samples_per_s * plan.step_s / plan.microbatches if plan.step_s else 0.0
    samples = m * per_microbatch / step if step > 0 else 0.0
    tokens = plan.tokens_per_s / plan.samples_per_s * samples if plan.tokens_per_s and plan.samples_per_s else None
    logger.info("memory rechecked for %s with %d microbatches: peak %.3g GiB", schedule, m,
                max(s.memory_bytes for s in stages) / 2**30)
    return dataclasses.replace(plan, stages=tuple(stages), schedule=schedule, microbatches=m, step_s=step,
                               bubble_fraction=(S - 1) / (m + S - 1), samples_per_s=samples, tokens_per_s=tokens)


def _in_flight(plan: Plan, stage: Stage, schedule: str, microbatches: int) -> int:
    if plan.mode != "train":
        return 1
    return microbatches_in_flight(schedule, num_stages=len(plan.stages), stage=stage.index, microbatches=microbatches)


def _memory(plan: Plan, stage: Stage, rules: dict, schedule: str, microbatches: int):
    saved = stage.saved_bytes_per_microbatch
    if not saved and plan.mode == "train" and stage.memory.activations_bytes:  # a plan saved without it
        saved = stage.memory.activations_bytes / _in_flight(plan, stage, plan.schedule, plan.microbatches)
    quantities = dict(params=stage.param_count, copies=stage.weight_copies, activations=saved,
                      transient=stage.transient_bytes)
    return peak_breakdown(quantities, in_flight=_in_flight(plan, stage, schedule, microbatches),
                          gpu=stage.device_kind == "gpu", kv_cache=stage.memory.kv_cache_bytes, **rules)


def _does_not_fit(plan: Plan, stage: Stage, rules: dict, schedule: str, microbatches: int,
                  need_bytes: float) -> InfeasibleError:
    gib = 2**30
    capacity = stage.memory_capacity_bytes
    in_flight = _in_flight(plan, stage, schedule, microbatches)
    over = lambda k: max(_memory(plan, s, rules, schedule, k).total_bytes - s.memory_capacity_bytes  # noqa: E731
                         for s in plan.stages)
    most = max_fitting(over, 0.0, upper=microbatches - 1) if microbatches > 1 else 0
    tips = []
    if most >= 1:
        tips.append(f"microbatches={most} (the largest count whose {schedule} in-flight activations fit every stage)")
    if schedule == "gpipe" and all(_memory(plan, s, rules, "1f1b", microbatches).total_bytes <= s.memory_capacity_bytes
                                   for s in plan.stages):
        tips.append(f"the multi-process runtime with schedule '1f1b' ({microbatches} microbatches fit: stage s keeps "
                    f"S − s in flight, not all {microbatches})")
    tips.append(f"more devices, so each stage holds fewer ops (plan again with the microbatches and schedule "
                f"'{schedule}' the runtime uses)")
    return InfeasibleError(
        f"stage {stage.index} on {', '.join(stage.devices)} needs {need_bytes / gib:.2f} GiB under schedule "
        f"'{schedule}' with {microbatches} microbatches ({in_flight} in flight × "
        f"{stage.saved_bytes_per_microbatch / gib:.3f} GiB of saved activations), but has {capacity / gib:.2f} GiB "
        f"after headroom (the plan was made for '{plan.schedule}' with {plan.microbatches}); use "
        + ", or ".join(tips) + ".")
