"""``solve()``: the steps of the method, coarse to fine (``autosplit.solver`` states the problem).

    plan = solve(graph, Cluster.parse("4xh100"), SolverOptions(microbatches=8), costs=costs,
                 parameters=traced.parameters)

1. the block-level chain DP on the best device order (``choose_order``; with several stages per
   device, ``autosplit.interleaved``);
2. CP-SAT over the block DAG, warm-started with the DP's split;
3. the DP again over every op position where a cut of a split at least as good can fall;
4. while the plan is more than ``OPS_GAP`` above the bound, CP-SAT over single ops (``_refine_ops``).

Every candidate is priced by ``evaluate``; the best becomes the Plan (``_plan``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

from autosplit.errors import ConfigError
from autosplit.graph import OpGraph
from autosplit.plan import Plan
from autosplit.solver.assemble import _plan, fastest_link, replica_cluster, unpriced_notes
from autosplit.solver.bounds import traffic_bound_s
from autosplit.solver.chain import build_chain
from autosplit.solver.cpsat import _fits_memory, _refine_ops, cp_sat_blocks, ops_time_limit_s
from autosplit.solver.dp import _cut_positions, assignment_from_cuts, chain_dp, stage_ranges
from autosplit.solver.infeasible import _infeasible
from autosplit.solver.options import SolverOptions
from autosplit.solver.orders import choose_order
from autosplit.solver.stage_model import _bottleneck
from cost_models import AnalyticCostModel, Cluster, OpCost
from cost_models.memory import INTERLEAVED


OPS_GAP = 0.01
"""Above this distance to the bound (relative) the op-level CP-SAT runs."""


def solve(graph: OpGraph, cluster: Cluster, options: SolverOptions | None = None, *,
          costs: Mapping[str, OpCost], parameters: Mapping[str, Any], buffers: Mapping[str, Any] | None = None,
          cost_model: AnalyticCostModel | None = None, device_order: Sequence[int] | None = None,
          near_cuts: Sequence[str] | None = None) -> Plan:
    """Split ``graph`` into pipeline stages over ``cluster`` (the method: ``autosplit.solver``).

    Args:
        graph: the op-level graph (``OpGraph.from_traced``), traced at the microbatch size.
        cluster: the devices, in the order of the cluster description.
        options: stage count, schedule, memory and solver settings.
        costs: ``cost_models.price_graph`` of the graph's module.
        parameters: ``Traced.parameters`` (canonical name → shape, dtype).
        buffers: ``Traced.buffers``: a buffer read on several stages is sent like a weight.
        cost_model: turns costs into seconds per device type; default: the analytic roofline.
        device_order: stage s runs on device ``device_order[s]`` of the first replica, as a
            mesh places it (``autosplit.solver.joint``); default: the best order is searched.
        near_cuts: with ``device_order``, the blocks where a coarser search started each stage
            after the first: the block-level DP looks near them first.

    Raises:
        InfeasibleError: no split fits the devices' memory; says what would.
        ConfigError: more stages than separable ops, pins this model cannot honour, or a cluster
            that does not hold ``data_parallel`` equal replicas.

    Example:
        >>> plan = solve(OpGraph.from_traced(traced), Cluster.parse("4xh100"),
        ...              SolverOptions(microbatches=8), costs=costs, parameters=traced.parameters)
    """
    options = options or SolverOptions()
    start = time.perf_counter()
    everything, cluster = cluster, replica_cluster(cluster, options.data_parallel)
    stages = options.stages or len(cluster) * options.stages_per_device
    cost_model = cost_model or AnalyticCostModel()
    blocks = graph.coarsen()
    types = {d.name: d for d in cluster.devices}
    times = {name: cost_model.times(costs, device) for name, device in types.items()}
    chain = build_chain(graph, blocks, costs, parameters, times, options, fastest_link(cluster), buffers)
    units = chain.n - len(chain.forbidden & set(range(1, chain.n)))  # runs of ops no cut can separate
    if stages > units:
        written = sorted({name for op in chain.ops for name in graph.infos[op].writes})
        why = (f" (every op from the first read of {', '.join(written[:3])} to its last in-place write stays on one "
               "stage, which stores it)" if written else "")
        raise ConfigError(f"{stages} stages need at least {stages} ops that a cut can separate; this graph has "
                          f"{units}{why}: use fewer stages")
    for path, stage in options.pin.items():
        if not 0 <= stage < stages:
            raise ConfigError(f"pin puts {path!r} on stage {stage}, but there are {stages} stages (0..{stages - 1})")

    # 1. Block-level DP on the best device order (``choose_order``). Several stages per device
    #    (interleaved): the DP over stages, balanced over the devices (``autosplit.interleaved``).
    block_cuts = sorted(set(chain.block_starts + [chain.n]) - chain.forbidden | {0, chain.n})
    looped = None
    if options.schedule == INTERLEAVED:
        from autosplit import interleaved as looped  # it builds on this package

        looped.check(cluster, stages, options)
        chosen = looped.choose_order(chain, graph, cluster, stages, options, block_cuts)
        if chosen is None:
            raise looped.infeasible(chain, graph, cluster, stages, options)
    else:
        starts = dict(zip(chain.block_names, chain.block_starts))
        near = None if near_cuts is None else [starts[b] for b in near_cuts if b in starts]
        chosen = choose_order(chain, cluster, stages, options, block_cuts, fixed=device_order, near=near)
        if chosen is None:
            raise _infeasible(chain, cluster, stages, options)
    model, dp_cuts = chosen.model, chosen.cuts

    # 2. CP-SAT on the block DAG, warm-started with the DP split when it falls on block bounds.
    bounds = chain.block_starts + [chain.n]
    hint = None
    if all(c in bounds for c in dp_cuts):
        stage_of_start = assignment_from_cuts(chain.n, dp_cuts)
        hint = [stage_of_start[start] for start in chain.block_starts]
    # Every candidate is priced by `evaluate`, which adds what the DP leaves out (a weight read on
    # several stages travels to them).
    dp_assignment = assignment_from_cuts(chain.n, dp_cuts)
    dp_bottleneck = _bottleneck(model, graph, dp_assignment)
    if hint is not None:  # only splits at least as good as the DP's: each block within its ops' stage ranges
        cp = cp_sat_blocks(model, graph, hint, options, dp_bottleneck, ranges=stage_ranges(model, graph, dp_bottleneck))
    else:
        cp = cp_sat_blocks(model, graph, None, options)
    candidates: list[tuple[float, list[int], str]] = [(dp_bottleneck, dp_assignment, "dp")]
    if cp is not None:
        per_op = [cp.assignment[b] for b in range(len(chain.block_starts))
                  for _ in range(bounds[b + 1] - bounds[b])]
        if _fits_memory(model, per_op):  # CP-SAT's memory is a relaxation
            candidates.append((_bottleneck(model, graph, per_op), per_op, "cp-sat"))
        else:  # its bound stands; its split does not fit
            cp = dataclasses.replace(cp, status="MISFIT")

    # 3. Op-level refinement: the DP again over every op position where a cut of a split at least
    #    as good as the best so far can fall (``stage_ranges``): exact among contiguous splits.
    if options.refine:
        best_so_far = min(c[0] for c in candidates)
        first, last = stage_ranges(model, graph, best_so_far)
        positions = sorted(set(bounds) | set(_cut_positions(first, last, stages).tolist()) - chain.forbidden
                           | {0, chain.n})
        if looped is not None:
            cuts = looped.split(model, graph, positions, (first, last), seeds=[dp_cuts])
        else:
            found = chain_dp(model, positions, (first, last), best_so_far)
            cuts = None if found is None else found[1]
        if cuts is not None:
            split = assignment_from_cuts(chain.n, cuts)
            candidates.append((_bottleneck(model, graph, split), split, "dp refinement"))
    bottleneck, assignment, method = min(candidates, key=lambda c: (c[0], c[2] != "cp-sat"))

    # 4. While the plan is more than OPS_GAP above the bound, CP-SAT over single ops, each free
    #    within the stages it could take in a better split: proves the plan optimal among all
    #    op-level splits, or improves it.
    status, bound_s = "FEASIBLE", 0.0
    unproven: list[str] = []  # why the plan may not be optimal, shown when it is not proven so
    bound_notes: list[str] = []
    lower = traffic_bound_s(model, graph, bottleneck, notes=bound_notes)
    if options.refine and bottleneck > lower * (1 + OPS_GAP):
        found = _refine_ops(model, graph, assignment, bottleneck, options, notes=unproven)
        if found is not None:
            result, per_op, complete = found
            value = _bottleneck(model, graph, per_op)
            fits = value >= bottleneck * (1 - 1e-9) or _fits_memory(model, per_op)
            if value < bottleneck * (1 - 1e-9) and fits:
                bottleneck, assignment = value, per_op
                method = f"{method} + cp-sat ops"
                bound_notes.clear()
                lower = traffic_bound_s(model, graph, bottleneck, notes=bound_notes)
            if not fits:
                unproven.append("op-level CP-SAT's best split does not fit once its memory is priced op by op; "
                                "its bound stands")
            if complete:
                status, bound_s = result.status if fits else "FEASIBLE", result.bound_s
                if result.status != "OPTIMAL":
                    unproven.append(f"op-level CP-SAT stopped at its time limit "
                                    f"({ops_time_limit_s(options):g} s) without a proof")
    elif options.refine:
        unproven.append(f"op-level CP-SAT not run: the plan is within {OPS_GAP:.0%} of the lower bound")
    else:
        unproven.append("op-level refinement off (refine=False): only cuts between blocks were searched")
        if cp is None:
            unproven.append(f"block-level CP-SAT found no split within its time limit ({options.time_limit_s:g} s); "
                            "the DP's split stands")
        else:  # a block split, and CP-SAT searched all block splits
            status, bound_s = ("FEASIBLE" if cp.status == "MISFIT" else cp.status), cp.bound_s
            if cp.status == "MISFIT":
                unproven.append("block-level CP-SAT's best split does not fit once its memory is priced op by op; "
                                "its bound stands")
            elif cp.status != "OPTIMAL":
                unproven.append(f"block-level CP-SAT stopped at its time limit ({options.time_limit_s:g} s) "
                                "without a proof")
    plan = _plan(graph, chain, model, everything, options, assignment, costs, status, max(bound_s, lower), lower,
                 method, time.perf_counter() - start, notes=unpriced_notes(costs),
                 unproven=unproven + bound_notes)
    return dataclasses.replace(plan, solver=dataclasses.replace(
        plan.solver, orders_tried=chosen.tried, orders_total=chosen.total, order_gap=chosen.gap))
