"""The Plan of a split: each stage's device, ops, weights, times and memory, and the solver report.

``_plan`` prices the chosen op → stage assignment once more (``evaluate``, the memory model), on
replica 0 of the cluster (``replica_cluster``), adds the data-parallel communication of each
step (``data_parallel_s``) and the schedule's bubble (``pipeline_times``), and says how sure the
answer is: status, gap to the bound, and the notes (``unpriced_notes``; why the search may have
missed a better split, when the plan does not meet its bound).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from autosplit.errors import ConfigError
from autosplit.graph import INPUT, OUTPUT, OpGraph
from autosplit.plan import Plan, SolverReport, Stage
from autosplit.schedule import pipeline_times
from autosplit.solver.chain import Chain
from autosplit.solver.options import SolverOptions
from autosplit.solver.stage_model import StageModel, evaluate, transfers_per_call, weight_homes, weight_readers
from cost_models import Cluster, Link, OpCost, sharded_data_parallel_s
from cost_models.memory import TRAINING_PRECISIONS, peak_breakdown

logger = logging.getLogger(__name__)


def _plan(graph: OpGraph, chain: Chain, model: StageModel, cluster: Cluster, options: SolverOptions,
          assignment: list[int], costs: Mapping[str, OpCost], status: str, proven_s: float, bound: float,
          method: str, wall_s: float, notes: Sequence[str] = (), unproven: Sequence[str] = ()) -> Plan:
    """The Plan of ``assignment`` on ``cluster`` (every replica's devices). ``notes`` are shown
    always, ``unproven`` (why the search may have missed a better split) only when the plan does
    not meet its bound."""
    order = model.device_order
    S = len(order)
    replica_size = len(cluster) // options.data_parallel
    compute, comm_in, comm_out = evaluate(model, graph, assignment)
    received = transfers_per_call(model, graph, assignment)
    homes = weight_homes(weight_readers(graph, chain, chain.weights), assignment)
    stored: list[list[str]] = [[] for _ in range(S)]
    for name in dict.fromkeys([*chain.weights, *homes]):  # a weight no op reads stays with the first stage
        stored[homes.get(name, 0)].append(name)
    stage_ops: list[list[str]] = [[] for _ in range(S)]
    for op, s in zip(chain.ops, assignment):
        stage_ops[s].append(op)
    node_order = {name: k for k, name in enumerate(graph.infos)}
    params = np.diff(chain.param_count)
    stage_list = []
    for s in range(S):
        nodes = {op for op in stage_ops[s] if op not in chain.rebuilt}
        todo = [u for op in nodes for u in graph.dag.predecessors(op) if u in chain.rebuilt]
        while todo:  # values rebuilt from the inputs on this stage, and what they are built from
            u = todo.pop()
            if u not in nodes:
                nodes.add(u)
                todo.extend(p for p in graph.dag.predecessors(u) if p in chain.rebuilt)
        nodes = sorted(nodes, key=node_order.__getitem__)
        if s == 0:
            nodes = [n for n in graph.order if graph[n]["kind"] == INPUT] + nodes
        if s == S - 1:
            nodes = nodes + [n for n in graph.order if graph[n]["kind"] == OUTPUT]
        owned = int(sum(params[k] for k, st in enumerate(assignment) if st == s))
        quantities = model.memory.quantities_of(assignment, s, cpu=not order.gpu[s])
        memory = peak_breakdown(quantities, in_flight=model.in_flight[s], gpu=order.gpu[s], **model.rules)
        modules = [graph.infos[n].module_path for n in sorted(stage_ops[s], key=node_order.__getitem__)
                   if graph.infos[n].module_path and graph.infos[n].op.startswith("call_")]
        stage_list.append(Stage(
            index=s,
            devices=(f"{order.types[s]}:{order.ranks[s]}",),
            nodes=tuple(nodes),
            modules=(modules[0], modules[-1]) if modules else ("", ""),
            param_count=owned,
            compute_s=compute[s],
            comm_in_s=comm_in[s],
            comm_out_s=comm_out[s],
            memory=memory,
            memory_capacity_bytes=order.capacity_bytes[s],
            weights=tuple(stored[s]),
            transfers_in=received[s],
            saved_bytes_per_microbatch=quantities["activations"],
            weight_copies=int(quantities["copies"]),
            transient_bytes=quantities["transient"],
            device_kind="gpu" if order.gpu[s] else "cpu",
            data_parallel_s=data_parallel_s(cluster, options, order.ranks[s], replica_size,
                                            quantities["params"] + quantities["copies"]),
        ))
    m = options.microbatches
    bottleneck, step, bubble = pipeline_times([st.time_s for st in stage_list], order.ranks, m)
    step += max(st.data_parallel_s for st in stage_list)
    samples = options.data_parallel * m * options.samples_per_microbatch / step if step > 0 else 0.0
    base, _, windows = method.partition(" + ")
    proven_bound = min(max(bound, proven_s), bottleneck)
    gap = max(0.0, (bottleneck - proven_bound) / bottleneck) if bottleneck > 0 else 0.0
    notes = list(notes)
    if gap <= 1e-6:
        status = "OPTIMAL"  # the bound meets the plan
    elif gap > 1e-3:
        if status == "OPTIMAL":
            notes.append(f"CP-SAT's proof holds in its rounded pricing; priced exactly the plan is {gap:.2%} "
                         "above the proven bound")
        status = "FEASIBLE"  # proven only in the solver's rounded pricing: say how far it may be
    if status != "OPTIMAL":
        notes.extend(unproven)
    label = {"dp": "block dp", "cp-sat": "cp-sat blocks", "dp refinement": "cp-sat blocks + dp refinement"}[base]
    if len(model.devices) < S and base != "cp-sat":  # interleaved: the cuts move to balance the devices
        label += " + device balancing"
    report = SolverReport(status=status, gap=gap, wall_s=wall_s, bound_s=proven_bound,
                          method=f"{label} + {windows}" if windows else label, notes=tuple(notes))
    for note in notes:
        logger.info("plan note: %s", note)
    logger.info("plan: bottleneck %.4g s (lower bound %.4g s) by %s in %.2f s", bottleneck, bound, report.method, wall_s)
    return Plan(
        stages=tuple(stage_list),
        bottleneck_s=bottleneck,
        lower_bound_s=bound,
        step_s=step,
        bubble_fraction=bubble,
        samples_per_s=samples,
        tokens_per_s=samples * options.tokens_per_sample if options.tokens_per_sample else None,
        mode=options.mode,
        schedule=options.schedule,
        microbatches=m,
        solver=report,
        fingerprint=graph.fingerprint(),
        node_digests=graph.node_digests(),
        cluster=str(cluster),
        options=_jsonable(dataclasses.asdict(options)),
        data_parallel=options.data_parallel,
    )


def replica_cluster(cluster: Cluster, data_parallel: int) -> Cluster:
    """The devices of replica 0, where the plan's stages are placed: the first of
    ``data_parallel`` equal runs of the cluster's devices (replica k runs on the k-th; the
    distributed runtime's rank k × stages + s runs stage s of replica k). The whole cluster for
    one replica.

    Raises:
        ConfigError: the devices do not split into ``data_parallel`` runs of the same kinds.
    """
    if data_parallel == 1:
        return cluster
    count = len(cluster)
    if count % data_parallel:
        each = max(1, count // data_parallel)
        raise ConfigError(f"data_parallel={data_parallel} replicas each need their own devices, and the cluster "
                          f"{cluster} has {count}, not a multiple of {data_parallel}: describe every replica's "
                          f"devices (e.g. {data_parallel * each} for {each} stage{'s' if each != 1 else ''} per "
                          f"replica), or use data_parallel dividing {count}")
    n = count // data_parallel
    kinds = [[d.name for d in cluster.devices[k * n:(k + 1) * n]] for k in range(data_parallel)]
    odd = next((k for k in range(1, data_parallel) if kinds[k] != kinds[0]), None)
    if odd is not None:
        raise ConfigError(f"data-parallel replicas run the same stages, so they need the same devices in the same "
                          f"order, but replica 0 has {'+'.join(kinds[0])} and replica {odd} has {'+'.join(kinds[odd])} "
                          f"(devices {odd * n}..{(odd + 1) * n - 1} of {cluster}): list the cluster as "
                          f"{data_parallel} equal runs of devices")
    return dataclasses.replace(cluster, devices=cluster.devices[:n], hosts=cluster.hosts[:n])


def data_parallel_s(cluster: Cluster, options: SolverOptions, rank: int, replica_size: int, params: float) -> float:
    """FSDP2's communication per step for the stage on device ``rank`` of replica 0, whose
    module holds ``params`` parameters (its own and its copies of weights stored elsewhere):
    over the same device of every replica (``rank + k × replica_size``)."""
    if options.data_parallel == 1 or options.mode != "train":
        return 0.0
    p = TRAINING_PRECISIONS[options.precision]
    group = [rank + k * replica_size for k in range(options.data_parallel)]
    return float(sharded_data_parallel_s(cluster, group, params * p.weight_bytes, params * p.grad_bytes))


def unpriced_notes(costs: Mapping[str, OpCost], shown: int = 3) -> list[str]:
    """One note for the ops whose forward could not be priced (counted as free), one for those
    whose backward could not (free or estimated): the first ``shown`` names and a count."""
    forward = [name for name, cost in costs.items() if cost.unpriced.startswith("forward")]
    backward = [name for name, cost in costs.items() if cost.unpriced.startswith("backward")]
    notes = []
    for names, what in ((forward, "priced as free: cannot run on meta"),
                        (backward, "backward unmeasured (free or estimated): no backward on meta")):
        if names:
            listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
            notes.append(f"{len(names)} op{'s' if len(names) > 1 else ''} {what} ({listed})")
    return notes


def fastest_link(cluster: Cluster) -> Link | None:
    """The link with the most bandwidth between two devices of ``cluster`` (None for one device)."""
    pairs = [cluster.link(i, j) for i in range(len(cluster)) for j in range(len(cluster)) if i != j]
    return max(pairs, key=lambda link: (link.bandwidth_bytes_per_s, -link.latency_s), default=None)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
