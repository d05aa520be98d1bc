"""Why no split fits the devices' memory, and what would.

    raise _infeasible(chain, cluster, stages, options)
    # llama-7b, seq 1024, 8 microbatches on 4 × rtx4090: "the model does not fit: train at bf16-mixed
    # with adamw, ...: filled from the front, the 4 stages hold only ops 0..1389 of 2217 (up to
    # model.layers.19); ... Would fit: precision='bf16'; or at least 8 × rtx4090 (8 stages); or
    # mode='infer' (weights alone: 12.6 GiB)."

The binding constraint is found by filling the stages greedily from the front (``_fill``), and
every remedy named (fewer microbatches, a lighter precision, more devices, inference) is checked
with the same memory model (``_fits``), so the message never suggests a change that would not fit.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from autosplit.errors import InfeasibleError
from autosplit.solver.chain import Chain
from autosplit.solver.dp import _Fill, _fill
from autosplit.solver.options import SolverOptions
from autosplit.solver.orders import DeviceOrder
from autosplit.solver.stage_model import StageModel
from cost_models import Cluster
from cost_models.memory import peak_breakdown, training_state_bytes, weight_bytes


def _infeasible(chain: Chain, cluster: Cluster, stages: int, options: SolverOptions) -> InfeasibleError:
    """Why no split fits, from the constraint that binds, and remedies checked against the same
    memory model (``OpsMemory``): each is tried by filling the stages greedily from the front,
    which finds a split of a chain whenever one fits (a stage's memory only grows as it takes
    more ops), so a remedy is named only if it would actually fit."""
    gib = 2**30
    order = DeviceOrder.of(cluster, range(stages), options.memory_headroom)
    model = StageModel(chain, order, options, cluster)
    cuts = [k for k in range(chain.n + 1) if k not in chain.forbidden]
    device = order.types[0] if len(set(order.types)) == 1 else "devices"
    head = f"no split into {stages} stages fits {stages} × {device}"
    fill = _fill(model, cuts)
    if fill.stage is None:  # the stages hold everything: pins or no-split rules bind
        return InfeasibleError(f"{head}: the ops fit by memory alone, but not with the pins {dict(options.pin)} "
                               f"and no-split rules {list(options.no_split)}: relax them")
    s, i = fill.stage, fill.position
    what = (f"{options.mode} at {options.precision} with {options.optimizer}, schedule {options.schedule!r}, "
            f"{options.microbatches} microbatch{'es' if options.microbatches != 1 else ''}"
            if options.mode == "train" else f"inference with {options.weight_dtype} weights")
    unit_end = next(k for k in cuts if k > i)
    q = model.memory.quantities(i, unit_end, cpu=not order.gpu[s])
    m = peak_breakdown(q, in_flight=model.in_flight[s], gpu=order.gpu[s], **model.rules)
    capacity = order.capacity_bytes[s]
    ops = chain.ops[i:unit_end]
    paths = [_block_of(chain, i), _block_of(chain, unit_end - 1)]
    where = paths[0] + (f" … {paths[-1]}" if paths[-1] != paths[0] else "")
    state_gib = (m.weights_bytes + m.grads_bytes + m.optimizer_bytes) / gib
    if fill.unit_too_big:
        reason = (f"stage {s} ({order.types[s]}:{order.ranks[s]}) must hold at least the ops no cut can separate "
                  f"from {where} ({len(ops)} ops): {state_gib:.1f} GiB of weights and state, "
                  + (f"{m.activations_bytes / gib:.1f} GiB of activations ({model.in_flight[s]} microbatches in flight "
                     f"× {q['activations'] / gib:.2f} GiB), " if options.mode == "train" else
                     f"{m.activations_bytes / gib:.1f} GiB of live activations, ")
                  + f"{m.workspace_bytes / gib:.1f} GiB of workspace: {m.total_bytes / gib:.1f} GiB, but it has "
                  f"{capacity / gib:.1f} GiB after {options.memory_headroom:.0%} headroom")
    else:
        ahead = model.memory.quantities(0, chain.n)
        reason = (f"filled from the front, the {stages} stages hold only ops 0..{i - 1} of {chain.n} "
                  f"(up to {where}); the whole model is {training_state_bytes(ahead['params'], precision=options.precision, optimizer=options.optimizer).total_bytes / gib if options.mode == 'train' else weight_bytes(ahead['params'], options.weight_dtype) / gib:.1f} GiB of "
                  f"weights{' and state' if options.mode == 'train' else ''}"
                  + (f" and {ahead['activations'] / gib:.2f} GiB of activations per microbatch, of which stage s keeps "
                     f"{'all ' + str(options.microbatches) if options.schedule == 'gpipe' else 'min(S − s, microbatches)'}"
                     f" in flight ({', '.join(str(f) for f in model.in_flight[:4])}{', …' if stages > 4 else ''})"
                     if options.mode == "train" else ""))
    tips = _remedies(chain, cluster, stages, options, cuts, fill)
    return InfeasibleError(f"the model does not fit: {what}: {head}: {reason}. "
                           + ("Would fit: " + "; or ".join(tips) + "." if tips else
                              "Nothing tried fits (fewer in-flight microbatches, smaller microbatches, more devices, "
                              "a lighter precision): the largest indivisible part needs tensor parallelism."))


def _fits(chain: Chain, cluster: Cluster, stages: int, options: SolverOptions, cuts: Sequence[int],
          activation_scale: float = 1.0) -> bool:
    """Whether some split fits by memory (``_fill``), with activations scaled (a smaller microbatch)."""
    if stages > len(cluster):
        cluster = Cluster.from_specs([max(cluster.devices, key=lambda d: d.memory_bytes)] * stages)
    model = StageModel(chain, DeviceOrder.of(cluster, range(stages), options.memory_headroom), options, cluster)
    if activation_scale != 1.0:
        model.memory = model.memory.scaled(activation_scale)
    return _fill(model, cuts).stage is None


def _remedies(chain: Chain, cluster: Cluster, stages: int, options: SolverOptions, cuts: Sequence[int],
              fill: _Fill) -> list[str]:
    """Changes that make a split fit, each checked with ``_fits``."""
    tips = []
    gib = 2**30
    replace = dataclasses.replace
    if options.mode == "train":
        m = options.microbatches
        fewer = [k for k in range(m - 1, 0, -1) if _fits(chain, cluster, stages, replace(options, microbatches=k), cuts)]
        if fewer:
            tips.append(f"microbatches={fewer[0]} ({'at most ' + str(fewer[0]) + ' in flight per stage' if options.schedule == 'gpipe' else f'stage 0 keeps {fewer[0]} in flight, not {min(stages, m)}'}; "
                        f"at the same microbatch size, so a smaller batch per step)")
        if options.schedule == "gpipe" and _fits(chain, cluster, stages, replace(options, schedule="1f1b"), cuts):
            tips.append("schedule='1f1b' (stage s keeps S − s microbatches in flight, not all)")
        lo, hi = 0.0, 1.0
        if _fits(chain, cluster, stages, options, cuts, 1 / 64):
            for _ in range(12):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if _fits(chain, cluster, stages, options, cuts, mid) else (lo, mid)
            tips.append(f"microbatches of at most {lo:.0%} of the traced size (activations scale with it)")
            tips.append("recomputing activations in backward (activation checkpointing) of the stages' blocks")
        if options.precision not in ("bf16",) and _fits(chain, cluster, stages, replace(options, precision="bf16"), cuts):
            tips.append("precision='bf16'")
    if fill.unit_too_big:
        tips.append("tensor parallelism over the indivisible part (its weights and activations split over a group)")
    for more in range(stages + 1, 4 * stages + 1):
        if more > len(cluster) and _fits(chain, cluster, more, options, cuts):
            largest = max(cluster.devices, key=lambda d: d.memory_bytes)
            tips.append(f"at least {more} × {largest.name} ({more} stages)")
            break
    if options.mode == "train" and _fits(chain, cluster, stages, replace(options, mode="infer"), cuts):
        tips.append(f"mode='infer' (weights alone: {weight_bytes(chain.param_count[-1], options.weight_dtype) / gib:.1f} GiB)")
    if options.mode == "infer" and options.weight_dtype != "int4" \
            and _fits(chain, cluster, stages, replace(options, weight_dtype="int4"), cuts):
        tips.append(f"weight_dtype='int4' ({weight_bytes(chain.param_count[-1], 'int4') / gib:.1f} GiB of weights)")
    return tips


def _block_of(chain: Chain, position: int) -> str:
    """The block (a layer, an embedding) the op at ``position`` belongs to."""
    return chain.block_names[max(0, int(np.searchsorted(chain.block_starts, position, side="right")) - 1)]
