"""Joint plans: the mesh (pipeline × tensor × data parallel), the cuts, every node's tensor
layout, activation recomputation and the microbatches, chosen together for a global batch.

    cluster, options = Cluster.parse("4x8xh100"), SolverOptions(global_batch=256)
    plan = solve_joint(graph, cluster, options, costs=costs, parameters=traced.parameters,
                       sharding=sharding_for(traced, cluster, costs, options))

The problem. ``global_batch`` = G samples per optimizer step run on N devices. Choose a mesh
dp × pp × tp = N (tp devices run each stage tensor-parallel, pp stages form a pipeline, dp
replicas of it train on their own slices of the batch), the microbatch size b and count m with
dp · m · b = G, a tensor layout for every node on the tp group (``autosplit.sharding``), what
each block recomputes in backward (``RECOMPUTE``), and the pipeline cuts, so that the step —
(m + pp − 1) × the slowest stage's time per microbatch under 1F1B or GPipe, plus the replicas'
gradient reduction — is shortest while every device's memory holds its stage's share of the
weights, gradients and optimizer state and the activations its microbatches keep in flight.

Ranks. Rank r = ((k · pp) + s) · tp + i runs tensor-parallel shard i of stage s of replica k:
a tp group is tp consecutive ranks (inside a host when tp divides the host's devices, on its
fast links), stages follow each other along the hosts, and replica k takes the k-th run of
pp · tp ranks — with tp = 1, the order the distributed runtime numbers its ranks in
(``autosplit.distributed``: rank k × stages + s runs stage s of replica k).

How it is solved, coarse to fine:

1. Tensor layouts depend on tp alone: for each tp, ``sharding(tp, weight)`` chooses every node's
   layout on the group (DTensor's own strategies, priced on the group's links; repeated layers
   share one decision) for speed (weight 0), and returns the per-rank costs, parameter shards
   and the collectives each node waits for. For the meshes that fit with no microbatch size
   and could still beat the best step, layouts chosen for memory too (a price per byte).
2. Each (tp, layouts, b) is screened by an exact DP over block-level cuts on the tp groups
   (``screen``): stage s of pp picks, among the recomputation policies, the fastest whose
   memory fits with the microbatches 1F1B keeps in flight on it (pp − s), so recomputation is
   chosen per stage. Costs at microbatch size b are the traced costs scaled (``scale_costs``).
3. The best screened candidate, and those of other meshes within ``SOLVED_WITHIN`` of it, are
   solved exactly by ``solve`` on the cluster of tp groups in the mesh's device order (op-level
   cuts, the CP-SAT proof, the exact memory model), each block recomputing what its stage chose,
   and the shortest step wins.

Every candidate's step is priced by the same cost model; the plan says which mesh it chose and
what the runner-up meshes would take (``SolverReport.notes``), and is deterministic. The schedule
is ``options.schedule`` (1F1B by default: the step of GPipe with fewer microbatches in flight).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np

from autosplit.errors import ConfigError, InfeasibleError
from autosplit.graph import INPUT, OUTPUT, WEIGHT, OpGraph
from autosplit.plan import Plan, RecomputedBlock
from autosplit.sharding.placements import is_shard, shard_dim
from autosplit.solver.driver import solve
from autosplit.solver.options import SolverOptions
from cost_models import AnalyticCostModel, Cluster, OpCost, sharded_data_parallel_s
from cost_models.analytic import OpTime
from cost_models.memory import TRAINING_PRECISIONS, microbatches_in_flight, peak_terms

logger = logging.getLogger(__name__)

RECOMPUTE = ("none", "selective", "full")
"""What a block recomputes in backward instead of keeping: nothing; everything but the outputs
of its matmuls and attention (the policy torchtitan's selective op-level checkpointing uses, run
with ``torch.utils.checkpoint``'s selective contexts); or everything but its inputs."""

SAVED_BY_SELECTIVE = ("matmul", "attention", "conv")
"""Op classes whose outputs selective recomputation keeps (the expensive ones to recompute)."""

CANDIDATES_SOLVED = 3
"""At most this many screened candidates (of distinct meshes) are solved exactly, best first."""

SOLVED_WITHIN = 0.02
"""Candidates screened within this share of the best step are solved exactly too: the screen's
block-level cuts and memory are close to, not the same as, the exact solver's."""

MEMORY_LEAN_WEIGHT_S_PER_BYTE = 1e-9
"""Price of a byte kept per rank when layouts are chosen for memory (about 1 s per GB: memory
first, among equal memory the faster)."""


@dataclass(frozen=True)
class Sharding:
    """What tensor-parallel layouts make of the graph on one rank of a tp group."""

    tp: int
    costs: Mapping[str, OpCost]
    """Per-rank cost of every node (its shard's FLOPs, bytes and saved tensors)."""
    parameters: Mapping[str, Any]
    """Per-rank size of every parameter (``TensorInfo``: a sharded weight holds 1/tp)."""
    collectives_s: Mapping[str, tuple[float, float]]
    """Seconds each node waits for collectives on the group, forward and backward."""
    placements: Mapping[str, Any]
    """Each node's layout as JSON-able DTensor placements (``autosplit.sharding``)."""
    replicated_only: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Nodes that can only be replicated on the group, and why (no DTensor rule for their op)."""


ShardingFn = Callable[[int, float], Sharding]
"""(tp, memory weight in s per byte) → the layouts chosen for that group size."""


# --------------------------------------------------------------------------- pricing transforms


def add_collectives(times: dict[str, OpTime], collectives_s: Mapping[str, tuple[float, float]],
                    factor: float = 1.0) -> dict[str, OpTime]:
    """``times`` with each node's collective seconds (forward, backward) added, scaled by
    ``factor`` (the microbatch size over the traced one: collectives carry activations)."""
    for name, (fwd_s, bwd_s) in collectives_s.items():
        if name in times and (fwd_s or bwd_s):
            t = times[name]
            times[name] = OpTime(t.fwd_s + fwd_s * factor, t.bwd_s + bwd_s * factor)
    return times


class WithCollectives:
    """A cost model whose op times include the tensor-parallel collectives each op waits for."""

    def __init__(self, base: Any, collectives_s: Mapping[str, tuple[float, float]], factor: float = 1.0):
        self.base, self.collectives_s, self.factor = base, collectives_s, factor

    def times(self, costs: Mapping[str, OpCost], device: Any) -> dict[str, OpTime]:
        return add_collectives(self.base.times(costs, device), self.collectives_s, self.factor)


def scale_costs(costs: Mapping[str, OpCost], factor: float) -> dict[str, OpCost]:
    """Costs at ``factor`` × the traced batch: FLOPs, activation bytes, saved tensors, gradients
    and temporaries scale with the batch; weights, their gradients and kernel counts do not.

    Exact for ops whose work is linear in the batch (every op of a transformer or a CNN at a
    fixed sequence length or image size); a weight's bytes read by a matmul stay as they are.
    """
    if factor == 1:
        return dict(costs)
    memo: dict[int, OpCost] = {}
    weights = {name for name, cost in costs.items() if cost.weight}
    found = {}
    for name, cost in costs.items():
        key = id(cost)
        if key not in memo:
            memo[key] = _scaled(cost, factor, costs, weights)
        found[name] = memo[key]
    return found


def _scaled(cost: OpCost, f: float, costs: Mapping[str, OpCost], weights: set[str]) -> OpCost:
    if cost.weight:
        return cost
    return _scaled_with(cost, f, sum(costs[r].output_bytes for r in cost.reads if r in weights), weights)


def _scaled_with(cost: OpCost, f: float, weight_read: int, weights: Collection[str] = ()) -> OpCost:
    return dataclasses.replace(
        cost,
        fwd_flops=int(cost.fwd_flops * f),
        bwd_flops=int(cost.bwd_flops * f),
        fwd_bytes=int(weight_read + max(cost.fwd_bytes - weight_read, 0) * f),
        bwd_bytes=int(weight_read + cost.weight_grad_bytes
                      + max(cost.bwd_bytes - weight_read - cost.weight_grad_bytes, 0) * f),
        output_bytes=int(cost.output_bytes * f),
        saved={k: (v if k in weights else int(v * f)) for k, v in cost.saved.items()},
        grad_bytes=int(cost.grad_bytes * f),
        fwd_workspace_bytes=int(cost.fwd_workspace_bytes * f),
        bwd_workspace_bytes=int(cost.bwd_workspace_bytes * f),
        cpu_fwd_workspace_bytes=int(cost.cpu_fwd_workspace_bytes * f),
        cpu_bwd_workspace_bytes=int(cost.cpu_bwd_workspace_bytes * f),
    )


def scaled_times(costs: Mapping[str, OpCost], factor: float, device: Any, cost_model: Any) -> dict[str, OpTime]:
    """``cost_model.times`` of ``scale_costs(costs, factor)``, pricing each distinct scaled op once
    (a 70B graph has ~6,000 nodes and ~100 distinct costs per rank)."""
    weights = {name for name, cost in costs.items() if cost.weight}
    memo: dict[tuple, OpTime] = {}
    found = {}
    for name, cost in costs.items():
        read = 0 if cost.weight else sum(costs[r].output_bytes for r in cost.reads if r in weights)
        key = (cost.op_class, cost.dtype, cost.fwd_flops, cost.bwd_flops, cost.fwd_bytes, cost.bwd_bytes,
               cost.fwd_kernels, cost.bwd_kernels, cost.weight_grad_bytes, cost.weight, read)
        if key not in memo:
            bare = OpCost(op_class=cost.op_class, dtype=cost.dtype, fwd_flops=cost.fwd_flops, bwd_flops=cost.bwd_flops,
                          fwd_bytes=cost.fwd_bytes, bwd_bytes=cost.bwd_bytes, fwd_kernels=cost.fwd_kernels,
                          bwd_kernels=cost.bwd_kernels, weight_grad_bytes=cost.weight_grad_bytes, weight=cost.weight)
            scaled = bare if cost.weight or factor == 1 else _scaled_with(bare, factor, read)
            memo[key] = cost_model.time(scaled, device)
        found[name] = memo[key]
    return found


def scale_graph(graph: OpGraph, factor: float) -> OpGraph:
    """The graph with every value's size at ``factor`` × the traced batch (weights unchanged),
    as the links carry it: each tensor's first dimension holds the batch."""
    if factor == 1:
        return graph
    infos = {}
    for name, info in graph.infos.items():
        if info.op == "get_attr" or not info.output_bytes:
            infos[name] = info
            continue
        shapes = tuple((max(1, round(s[0] * factor)), *s[1:]) if s else s for s in info.shapes)
        infos[name] = dataclasses.replace(info, shapes=shapes, output_bytes=int(info.output_bytes * factor))
    dag = graph.dag.copy()
    for u, v, data in dag.edges(data=True):
        data["tensors"] = {p: (t if t.weight else dataclasses.replace(t, nbytes=int(t.nbytes * factor)))
                           for p, t in data["tensors"].items()}
    for n, data in dag.nodes(data=True):
        if data["kind"] not in (WEIGHT,) and data.get("output_bytes"):
            data["output_bytes"] = int(data["output_bytes"] * factor)
    return OpGraph(dag, list(graph.order), infos, dict(graph.module_types))


def per_rank_graph(graph: OpGraph, placements: Mapping[str, Mapping[str, Any]], tp: int, *,
                   values_only: bool = False) -> OpGraph:
    """The graph with each value's shapes and bytes those of one rank's shard under the layouts
    (``placements``, as ``Plan.layouts``): what one rank of a stage's group receives, holds and
    sends on at a stage boundary, where rank i of a group sends its shard to rank i of the next
    (``autosplit.distributed.tensor_parallel.WireLayout``). Replicated and partial values are
    whole on every rank; weights are left as they are (their per-rank sizes are the sharding's
    ``parameters``). ``values_only``: only the values on the edges (all a graph of blocks, whose
    edges name the ops, needs for the bytes crossing each cut)."""
    if tp == 1:
        return graph
    names = ({t.producer for _, _, tensors in graph.dag.edges(data="tensors") for t in tensors.values()}
             if values_only else graph.infos)
    ratio: dict[str, float] = {}
    infos = dict(graph.infos) if not values_only else graph.infos
    for name in names:
        info, layout = graph.infos.get(name), placements.get(name)
        outputs = layout["output"].split() if layout and layout.get("output") else ()
        if info is None or info.op == "get_attr" or len(outputs) != len(info.shapes) or not any(map(is_shard, outputs)):
            continue
        shapes = tuple(tuple(size // tp if is_shard(p) and d == shard_dim(p) else size for d, size in enumerate(shape))
                       for shape, p in zip(info.shapes, outputs))
        whole = sum(math.prod(shape) * dtype.itemsize for shape, dtype in zip(info.shapes, info.dtypes))
        if not whole:
            continue
        ratio[name] = sum(math.prod(shape) * dtype.itemsize for shape, dtype in zip(shapes, info.dtypes)) / whole
        if not values_only:
            infos[name] = dataclasses.replace(info, shapes=shapes, output_bytes=int(info.output_bytes * ratio[name]))
    if not ratio:
        return graph
    dag = graph.dag.copy()
    for _, _, data in dag.edges(data=True):
        tensors = data["tensors"]
        if any(p in ratio for p in tensors):
            data["tensors"] = {p: (dataclasses.replace(t, nbytes=int(t.nbytes * ratio[p])) if p in ratio and not t.weight
                                   else t) for p, t in tensors.items()}
    if not values_only:
        for n in ratio:
            if n in dag and dag.nodes[n].get("output_bytes"):
                dag.nodes[n]["output_bytes"] = int(dag.nodes[n]["output_bytes"] * ratio[n])
    return OpGraph(dag, list(graph.order), infos, dict(graph.module_types))


def recompute_costs(costs: Mapping[str, OpCost], blocks: OpGraph, policy_of_block: Mapping[str, str]) -> dict[str, OpCost]:
    """Costs with each block recomputing in backward what its policy (``RECOMPUTE``) says.

    What is not kept is dropped from the ops' saved tensors; the ops that make it run their
    forward again in backward (priced in their backward), and the block's dropped tensors live
    again while its backward runs (a backward temporary of each of its ops). Under
    ``"selective"`` the output of each matmul, attention and convolution is kept whole, as
    ``torch.utils.checkpoint``'s selective contexts keep it (``autosplit.distributed.recompute``):
    also where backward reads it only through a view (q, k and v split from one projection),
    or not at all (a projection followed by a residual add). And a block that recomputes keeps
    every value it reads from outside until its backward, as the checkpoint holds its inputs,
    also where no op saves it (the embeddings' sum entering a block that only drops out):
    counted once, in the first op that reads it, where no op of the graph saves it already. (A
    block none of whose ops saves anything leaves nothing that holds the checkpoint: it keeps
    nothing.)
    """
    found = dict(costs)
    for block, policy in policy_of_block.items():
        if policy == "none":
            continue
        members = set(blocks[block]["members"])
        kept = {n for n in members if policy == "selective" and costs[n].op_class in SAVED_BY_SELECTIVE}
        dropped_bytes = 0
        rerun = set()
        for n in members:
            cost = costs[n]
            keep = {k: v for k, v in cost.saved.items()
                    if _producer(k) not in members or _producer(k) in kept or _is_weight(costs, k)}
            dropped_bytes += sum(v for k, v in cost.saved.items() if k not in keep)
            if n in kept and n not in keep and cost.output_bytes:
                keep[n] = cost.output_bytes
            if keep != cost.saved:
                found[n] = dataclasses.replace(cost, saved=keep)
            if not cost.weight and (policy == "full" or cost.op_class not in SAVED_BY_SELECTIVE):
                rerun.add(n)
        for n in members:
            cost = found[n]
            if n in rerun and (cost.fwd_flops or cost.fwd_kernels):
                cost = dataclasses.replace(cost, bwd_flops=cost.bwd_flops + cost.fwd_flops,
                                           bwd_bytes=cost.bwd_bytes + cost.fwd_bytes,
                                           bwd_kernels=cost.bwd_kernels + cost.fwd_kernels)
            if dropped_bytes and not cost.weight:
                cost = dataclasses.replace(cost, bwd_workspace_bytes=cost.bwd_workspace_bytes + dropped_bytes)
            found[n] = cost
    saved_somewhere = {key for cost in found.values() for key in cost.saved}
    for block in blocks.order:
        if policy_of_block.get(block, "none") == "none":
            continue
        members = set(blocks[block]["members"])
        if not any(costs[n].saved for n in members):
            continue  # nothing of the block is saved, so nothing holds the checkpoint's inputs either
        for n in blocks[block]["members"]:
            cost = found[n]
            held = {} if cost.weight else _held_inputs(costs, cost, members, saved_somewhere)
            if held:
                found[n] = dataclasses.replace(cost, saved={**cost.saved, **held})
                saved_somewhere.update(held)
    return found


def _held_inputs(costs: Mapping[str, OpCost], cost: OpCost, members: Collection[str], saved: Collection[str]
                 ) -> dict[str, int]:
    """What a recomputing block's op reads from outside the block that no op saves (a weight
    aside): the checkpoint holds it for the block's backward."""
    return {r: costs[r].output_bytes for r in cost.reads
            if r not in members and r in costs and not costs[r].weight and r not in saved and costs[r].output_bytes}


def _producer(key: str) -> str:
    """The node that made a saved tensor: its key, or ``name`` of ``"name:i"`` (an intermediate)."""
    return key.partition(":")[0]


def _is_weight(costs: Mapping[str, OpCost], key: str) -> bool:
    cost = costs.get(key)
    return cost is not None and cost.weight


# --------------------------------------------------------------------------- meshes


@dataclass(frozen=True)
class Mesh:
    """Sizes of the mesh's dimensions: data-parallel replicas, pipeline stages, tensor-parallel group."""

    dp: int
    pp: int
    tp: int

    def __str__(self) -> str:
        return f"dp={self.dp} × pp={self.pp} × tp={self.tp}"


def group_cluster(cluster: Cluster, tp: int) -> Cluster:
    """The cluster of tp groups: one device per group (its first rank), on that rank's host; a
    group's devices must be alike."""
    if len(cluster) % tp:
        raise ConfigError(f"tensor_parallel={tp} must divide the {len(cluster)} devices of {cluster}: use one of "
                          f"{', '.join(map(str, _divisors(len(cluster))))}")
    for g in range(0, len(cluster), tp):
        names = {d.name for d in cluster.devices[g:g + tp]}
        if len(names) > 1:
            raise ConfigError(f"a tensor-parallel group of {tp} needs alike devices, but devices {g}..{g + tp - 1} of "
                              f"{cluster} are {' and '.join(sorted(names))}: use a tensor_parallel that keeps groups "
                              "of one kind")
    return dataclasses.replace(cluster, devices=cluster.devices[::tp], hosts=cluster.hosts[::tp])


def meshes(cluster: Cluster, global_batch: int, blocks: int, *, tp: int | None = None, dp: int | None = None,
           pp: int | None = None) -> list[Mesh]:
    """Every dp × pp × tp = devices with tp a power of two inside a host (or dividing the group
    of alike devices), pp at most the blocks, and dp dividing the global batch; ``tp``, ``dp``,
    ``pp`` fix a dimension."""
    n = len(cluster)
    per_host = _per_host(cluster)
    found = []
    for t in _divisors(n):
        if tp is not None and t != tp:
            continue
        if tp is None and (t & (t - 1) or t > per_host or per_host % t):
            continue
        try:
            group_cluster(cluster, t)
        except ConfigError:
            continue
        for p in _divisors(n // t):
            d = n // t // p
            if (pp is not None and p != pp) or (dp is not None and d != dp):
                continue
            if p <= blocks and global_batch % d == 0:
                found.append(Mesh(d, p, t))
    return found


def _per_host(cluster: Cluster) -> int:
    counts: dict[int, int] = {}
    for h in cluster.hosts:
        counts[h] = counts.get(h, 0) + 1
    return min(counts.values())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------- screening


@dataclass
class BlockSums:
    """Per block of the chain, what one rank's stage adds, under each recomputation policy."""

    time_s: dict[str, np.ndarray]
    """Policy → seconds per microbatch (forward, and backward with its recomputation)."""
    saved_bytes: dict[str, np.ndarray]
    """Policy → bytes kept for backward per microbatch."""
    peak_bytes: dict[str, np.ndarray]
    """Policy → the block's own peak beyond what the stage keeps: its backward's gradients and
    temporaries, and what it recomputes."""
    params: np.ndarray
    """Parameters per rank that the block stores (first reader)."""
    cross_bytes: np.ndarray
    """Activation bytes crossing each cut position 0..n between blocks, both ways in training."""


def block_sums(blocks: OpGraph, chain: Sequence[str], costs: Mapping[str, OpCost], times: Mapping[str, OpTime],
               parameters: Mapping[str, Any], train: bool, factor: float = 1.0,
               memory: BlockMemory | None = None) -> BlockSums:
    """``BlockSums`` of the blocks in ``chain`` order, from per-rank costs (at the traced batch;
    activations scaled by ``factor`` as ``scale_costs`` scales them) and times (at the batch
    priced). ``memory``: ``block_memory`` of the same costs, computed once for every batch."""
    memory = memory or block_memory(blocks, chain, costs, parameters, train)
    n = len(chain)
    time_s = {r: np.zeros(n) for r in RECOMPUTE}
    for k, block in enumerate(chain):
        members = blocks[block]["members"]
        fwd = sum(times[m].fwd_s for m in members)
        bwd = sum(times[m].bwd_s for m in members) if train else 0.0
        rerun = sum(times[m].fwd_s for m in memory.rerun_selective[k]) if train else 0.0
        time_s["none"][k] = fwd + bwd
        time_s["selective"][k] = fwd + bwd + rerun
        time_s["full"][k] = fwd + bwd + (fwd if train else 0.0)
    saved = {r: v * factor for r, v in memory.saved_bytes.items()}
    peak = {r: memory.grad_bytes * factor + (saved["none"] - saved[r]) for r in RECOMPUTE}
    return BlockSums(time_s, saved, peak, memory.params, memory.cross_bytes * factor)


@dataclass
class BlockMemory:
    """What ``block_sums`` needs of the costs apart from times, at the traced batch."""

    saved_bytes: dict[str, np.ndarray]
    grad_bytes: np.ndarray
    params: np.ndarray
    cross_bytes: np.ndarray
    rerun_selective: list[list[str]]
    """Per block, the ops selective recomputation runs again."""


def block_memory(blocks: OpGraph, chain: Sequence[str], costs: Mapping[str, OpCost], parameters: Mapping[str, Any],
                 train: bool) -> BlockMemory:
    """Per block: bytes kept for backward under each policy, the largest gradient and temporary
    of its backward, parameters stored (first reader), and activation bytes crossing each cut."""
    n = len(chain)
    index = {b: k for k, b in enumerate(chain)}
    saved = {r: np.zeros(n) for r in RECOMPUTE}
    grads = np.zeros(n)
    params = np.zeros(n)
    rerun: list[list[str]] = []
    seen: set[str] = set()
    saved_anywhere = {key for cost in costs.values() for key in cost.saved}
    held_before: set[str] = set()
    for k, block in enumerate(chain):
        members = blocks[block]["members"]
        rerun.append([m for m in members if not costs[m].weight and costs[m].op_class not in SAVED_BY_SELECTIVE])
        for m in members:
            for name in blocks.infos[m].reads if blocks.infos[m].op == "get_attr" else ():
                if name not in seen and name in parameters:
                    seen.add(name)
                    params[k] += math.prod(parameters[name].shape)
        if not train:
            continue
        keyed: dict[str, int] = {}
        for m in members:
            keyed.update({key: v for key, v in costs[m].saved.items() if not _is_weight(costs, key)})
        inside = set(members)
        matmul = {m for m in members if costs[m].op_class in SAVED_BY_SELECTIVE}
        held: dict[str, int] = {}
        for m in members if any(costs[m].saved for m in members) else ():
            held.update(_held_inputs(costs, costs[m], inside, saved_anywhere | held_before))
        held_before.update(held)
        saved["none"][k] = float(sum(keyed.values()))
        saved["selective"][k] = float(sum(v for key, v in keyed.items()
                                          if _producer(key) not in inside or _producer(key) in matmul)
                                      + sum(costs[m].output_bytes for m in matmul if m not in keyed)
                                      + sum(held.values()))
        saved["full"][k] = float(sum(v for key, v in keyed.items() if _producer(key) not in inside)
                                 + sum(held.values()))
        grads[k] = max((costs[m].bwd_workspace_bytes + costs[m].grad_bytes for m in members), default=0)
    cross = np.zeros(n + 1)
    for u, v, data in blocks.dag.edges(data=True):
        if u not in index or v not in index:
            continue
        for tensor in data["tensors"].values():
            if not tensor.weight:
                cross[index[u] + 1:index[v] + 1] += tensor.nbytes * (2 if train else 1)
    return BlockMemory(saved, grads, params, cross, rerun)


@dataclass(frozen=True)
class Screened:
    """One candidate's block-level plan: the mesh, the microbatches and the stages' policies."""

    mesh: Mesh
    microbatch_size: int
    microbatches: int
    memory_lean: bool
    step_s: float
    policies: tuple[str, ...]
    """Per stage, what its blocks recompute."""
    starts: tuple[int, ...]
    """Per stage, the position of its first block in the chain."""


def screen(sums: BlockSums, *, stages: int, microbatches: int, capacity_bytes: float, hop_s_per_byte: float,
           hop_latency_s: float, gpu: bool, rules: Mapping[str, Any], schedule: str = "1f1b",
           policies: Sequence[str] = RECOMPUTE) -> tuple[float, tuple[str, ...], tuple[int, ...], float] | None:
    """The block-level split into ``stages`` minimizing the slowest stage's time per microbatch,
    each stage taking the fastest recomputation policy whose memory fits ``capacity_bytes`` with
    the microbatches the schedule keeps in flight on it. Exact over block cuts (a DP over cut
    positions, vectorized over every (start, end) pair). Returns (bottleneck, policies, starts,
    fullest stage's bytes), or None when nothing fits."""
    n = len(sums.params)
    S = stages
    if S > n:
        return None
    hop = np.where(sums.cross_bytes > 0, sums.cross_bytes * hop_s_per_byte + hop_latency_s, 0.0)
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    valid = i < j
    P = np.concatenate([[0.0], np.cumsum(sums.params)])
    params = P[j] - P[i]
    prefix = {r: (np.concatenate([[0.0], np.cumsum(sums.time_s[r])]),
                  np.concatenate([[0.0], np.cumsum(sums.saved_bytes[r])]),
                  _range_max(sums.peak_bytes[r])) for r in policies}
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    choices = []
    for s in range(S):
        in_flight = microbatches_in_flight(schedule, num_stages=S, stage=s, microbatches=microbatches)
        cost = np.full((n + 1, n + 1), np.inf)
        policy = np.zeros((n + 1, n + 1), dtype=np.int64)
        fullest = np.zeros((n + 1, n + 1))
        for r_index, r in enumerate(policies):
            T, A, W = prefix[r]
            t = T[j] - T[i] + (hop[i] if s > 0 else 0.0) + (hop[j] if s < S - 1 else 0.0)
            saved = A[j] - A[i]
            terms = peak_terms(params=params, activations=saved, transient=saved + W, in_flight=in_flight, gpu=gpu,
                               **rules)
            total = sum(terms.values())
            ok = valid & (total <= capacity_bytes) & (t < cost)
            cost = np.where(ok, t, cost)
            policy = np.where(ok, r_index, policy)
            fullest = np.where(ok, total, fullest)
        value = np.maximum(best[:, None], cost)
        arg = value.argmin(axis=0)
        best = value[arg, np.arange(n + 1)]
        choices.append((arg, policy, fullest))
    if not np.isfinite(best[n]):
        return None
    chosen, starts, peaks = [], [], []
    end = n
    for s in range(S - 1, -1, -1):
        arg, policy, fullest = choices[s]
        start = int(arg[end])
        chosen.append(policies[policy[start, end]])
        peaks.append(float(fullest[start, end]))
        starts.append(start)
        end = start
    return float(best[n]), tuple(reversed(chosen)), tuple(reversed(starts)), max(peaks)


def _range_max(values: np.ndarray) -> np.ndarray:
    """table[i, j] = max(values[i:j]) (0 where i ≥ j)."""
    n = len(values)
    table = np.zeros((n + 1, n + 1))
    for a in range(n):
        table[a, a + 1:] = np.maximum.accumulate(values[a:])
    return table


# --------------------------------------------------------------------------- the joint search


def unsharded(costs: Mapping[str, OpCost], parameters: Mapping[str, Any]) -> Sharding:
    """tp = 1: every node whole on one device."""
    return Sharding(tp=1, costs=costs, parameters=parameters, collectives_s={}, placements={})


def sharding_for(traced: Any, cluster: Cluster, costs: Mapping[str, OpCost], options: SolverOptions,
                 cost_model: AnalyticCostModel | None = None) -> ShardingFn:
    """The layouts of ``traced``'s nodes on a tp group of ``cluster``'s first tp ranks, chosen by
    ``autosplit.sharding.choose_layouts`` (memoized per tp and memory weight): per-rank costs,
    parameters with their sharded dimension divided, collectives and placements with the
    module and op of each node."""
    from autosplit.sharding import choose_layouts, node_layouts

    found: dict[tuple[int, float], Sharding] = {}
    candidates: dict[int, Any] = {}
    train = options.mode == "train"

    def sharding(tp: int, weight: float) -> Sharding:
        if (tp, weight) not in found:
            start = time.perf_counter()
            if tp not in candidates:
                candidates[tp] = node_layouts(traced.graph_module, tp)
            choice = choose_layouts(traced, costs, cluster, list(range(tp)), cost_model=cost_model, training=train,
                                    memory_weight_s_per_byte=weight, time_limit_s=options.time_limit_s,
                                    layouts=candidates[tp])
            found[tp, weight] = _as_sharding(traced, choice, tp)
            logger.info("joint: layouts for tp=%d (memory weight %g s/B) in %.2f s", tp, weight,
                        time.perf_counter() - start)
        return found[tp, weight]

    return sharding


def _as_sharding(traced: Any, choice: Any, tp: int) -> Sharding:
    parameters = dict(traced.parameters)
    for node in traced.graph.nodes:
        if node.op != "get_attr":
            continue
        layout = choice.layouts.get(node.name)
        placement = layout.outputs[0] if layout is not None and layout.outputs else "R"
        for name in traced.nodes[node.name].reads:
            info = parameters.get(name)
            if info is None or not placement.startswith("S("):
                continue
            dim = int(placement[2:-1]) % max(len(info.shape), 1)
            shape = list(info.shape)
            shape[dim] = -(-shape[dim] // tp)
            parameters[name] = dataclasses.replace(info, shape=tuple(shape), nbytes=choice.parameter_bytes.get(
                name, info.nbytes // tp))
    placements = {}
    for name, layout in choice.layouts.items():
        info = traced.nodes.get(name)
        placements[name] = {"module": info.module_path if info else "", "op": info.target if info else "",
                            "inputs": list(layout.inputs), "output": " ".join(layout.outputs)}
    return Sharding(tp=tp, costs=choice.per_rank, parameters=parameters, collectives_s=dict(choice.collective_s),
                    placements=placements, replicated_only=dict(choice.notes))


def microbatch_sizes(per_replica: int, traced: int) -> list[int]:
    """Microbatch sizes b dividing a replica's share of the batch, from the traced size's
    divisors to 16 × it, in steps the traced costs scale to exactly (b a multiple or divisor of it)."""
    return [b for b in _divisors(per_replica) if b <= 16 * traced and (b % traced == 0 or traced % b == 0)]


def solve_joint(graph: OpGraph, cluster: Cluster, options: SolverOptions, *, costs: Mapping[str, OpCost],
                parameters: Mapping[str, Any], buffers: Mapping[str, Any] | None = None,
                cost_model: AnalyticCostModel | None = None, sharding: ShardingFn | None = None) -> Plan:
    """The fastest step for ``options.global_batch`` over every mesh, layout, microbatch size and
    recomputation (see the module docstring); the Plan records them all.

    Args:
        graph: the op-level graph, traced at ``options.samples_per_microbatch`` samples.
        cluster: every device (all replicas, all tensor-parallel ranks), in rank order.
        options: ``SolverOptions`` with ``global_batch``; ``tensor_parallel``, ``data_parallel``
            (when not 1), ``stages``, ``microbatches`` (when not 1) and ``recompute`` fix those
            choices instead of searching them.
        costs, parameters, buffers: as for :func:`autosplit.solver.solve`.
        sharding: the layouts for a tp group (``autosplit.sharding``); without it only tp = 1.

    Raises:
        InfeasibleError: no mesh, microbatch size and recomputation fits; names the meshes tried.
        ConfigError: a fixed choice the cluster or the batch cannot meet.
    """
    start = time.perf_counter()
    G = options.global_batch
    train = options.mode == "train"
    base = cost_model or AnalyticCostModel()
    blocks = graph.coarsen()
    chain = [b for b in blocks.order if blocks[b]["kind"] not in (INPUT, OUTPUT)]
    fixed_dp = options.data_parallel if options.data_parallel > 1 else None
    fixed_tp = options.tensor_parallel
    if fixed_tp is not None:
        group_cluster(cluster, fixed_tp)  # refuses a tp that does not divide the devices into alike groups
    found = meshes(cluster, G, len(chain), tp=fixed_tp, dp=fixed_dp, pp=options.stages)
    if not found:
        fixed = ", ".join(f"{k}={v}" for k, v in (("tensor_parallel", fixed_tp), ("data_parallel", fixed_dp),
                                                   ("stages", options.stages)) if v is not None)
        raise ConfigError(f"no mesh dp × pp × tp of the {len(cluster)} devices of {cluster} meets "
                          f"{fixed or 'the batch'}: dp must divide the global batch ({G}), pp be at most the "
                          f"{len(chain)} blocks, tp a power of two dividing a host's devices; let the solver choose "
                          "the fixed sizes, or change the global batch")
    policies = (options.recompute,) if options.recompute else RECOMPUTE
    rules = dict(mode=options.mode, precision=options.precision, optimizer=options.optimizer,
                 weight_dtype=options.weight_dtype, shared_weights=options.shared_weights)
    device = cluster.devices[0]
    capacity = device.memory_bytes * (1 - options.memory_headroom)
    gpu = device.kind == "gpu"
    screened: list[tuple[Screened, Sharding]] = []
    context = dict(blocks=blocks, chain=chain, options=options, device=device, base=base, capacity=capacity,
                   gpu=gpu, rules=rules, policies=policies, train=train)
    misfits: dict[int, list[tuple[Mesh, float]]] = {}
    for tp in sorted({mesh.tp for mesh in found}):
        tp_meshes = [mesh for mesh in found if mesh.tp == tp]
        if tp > 1 and sharding is None:
            continue
        shard = unsharded(costs, parameters) if tp == 1 else sharding(tp, 0.0)
        fits, misfits[tp] = _screen_meshes(shard, False, tp_meshes, cluster, **context)
        screened += fits
    # Layouts chosen for memory (slower per rank, never faster) for the meshes that did not fit
    # with the fastest layouts, where even a perfect balance of the fastest could beat the best.
    best_s = min((c.step_s for c, _ in screened), default=math.inf)
    for tp, missed in misfits.items():
        hopeful = [mesh for mesh, bound_s in missed if bound_s < best_s]
        if tp > 1 and hopeful:
            screened += _screen_meshes(sharding(tp, MEMORY_LEAN_WEIGHT_S_PER_BYTE), True, hopeful, cluster,
                                       **context)[0]
    if not screened:
        raise InfeasibleError(f"no mesh of {len(cluster)} × {device.name} fits a global batch of {G} at "
                              f"{options.precision} with {options.optimizer}: every dp × pp × tp "
                              f"({', '.join(str(m) for m in found[:6])}{', …' if len(found) > 6 else ''}), microbatch "
                              "size and recomputation exceeds some device's memory; use more devices, a smaller "
                              "global batch, or precision='bf16'")
    screened.sort(key=lambda c: (c[0].step_s, c[0].mesh.tp, c[0].mesh.pp, c[0].microbatch_size, c[0].memory_lean))
    logger.info("joint: %d candidates screened in %.2f s; best %s b=%d m=%d step %.4g s", len(screened),
                time.perf_counter() - start, screened[0][0].mesh, screened[0][0].microbatch_size,
                screened[0][0].microbatches, screened[0][0].step_s)
    best: Plan | None = None
    tried = []
    for candidate, shard in _distinct(screened, CANDIDATES_SOLVED, screened[0][0].step_s * (1 + SOLVED_WITHIN)):
        plan = _solve_candidate(graph, blocks, chain, cluster, options, candidate, shard, buffers, base)
        if plan is None:
            continue
        tried.append((candidate, plan))
        if best is None or plan.step_s < best.step_s:
            best = plan
    if best is None:
        raise InfeasibleError(f"the best screened meshes ({', '.join(str(c.mesh) for c, _ in screened[:3])}) do not fit "
                              "once priced op by op; use more devices or a smaller global batch")
    notes = [f"mesh {c.mesh}, microbatches {c.microbatches} × {c.microbatch_size}: step {_ms(p.step_s)}"
             for c, p in tried if p is not best]
    solved = {c.mesh for c, _ in tried}
    notes += [f"mesh {c.mesh}, microbatches {c.microbatches} × {c.microbatch_size}: step {_ms(c.step_s)} (screened)"
              for c, _ in _distinct(screened, CANDIDATES_SOLVED + len(solved), math.inf) if c.mesh not in solved]
    report = dataclasses.replace(best.solver, wall_s=time.perf_counter() - start,
                                 method=f"joint search ({len(screened)} candidates screened) + {best.solver.method}",
                                 notes=(*best.solver.notes, *notes))
    return dataclasses.replace(best, solver=report)


def _screen_meshes(shard: Sharding, lean: bool, meshes_: Sequence[Mesh], cluster: Cluster, *, blocks: OpGraph,
                   chain: Sequence[str], options: SolverOptions, device: Any, base: Any, capacity: float, gpu: bool,
                   rules: Mapping[str, Any], policies: Sequence[str], train: bool
                   ) -> tuple[list[tuple[Screened, Sharding]], list[tuple[Mesh, float]]]:
    """``screen`` every mesh of one tp (all with ``shard``'s layouts) at every microbatch size;
    returns the candidates, and the meshes that fit at no microbatch size with a lower bound on
    their step with any layouts at least as slow: (m + pp − 1) × total work ÷ pp."""
    G, traced_b = options.global_batch, options.samples_per_microbatch
    groups = group_cluster(cluster, shard.tp)
    link = groups.link(0, 1) if len(groups) > 1 else None
    found: list[tuple[Screened, Sharding]] = []
    memory = block_memory(per_rank_graph(blocks, shard.placements, shard.tp, values_only=True), chain, shard.costs,
                          shard.parameters, train)
    fitting: set[Mesh] = set()
    bound_s: dict[Mesh, float] = {}
    for b in sorted({b for mesh in meshes_ for b in microbatch_sizes(G // mesh.dp, traced_b)}):
        factor = b / traced_b
        times = add_collectives(scaled_times(shard.costs, factor, device, base), shard.collectives_s, factor)
        sums = block_sums(blocks, chain, shard.costs, times, shard.parameters, train, factor, memory)
        for mesh in meshes_:
            if (G // mesh.dp) % b:
                continue
            m = G // mesh.dp // b
            if options.microbatches > 1 and m != options.microbatches:
                continue
            least = (m + mesh.pp - 1) * float(sums.time_s["none"].sum()) / mesh.pp
            bound_s[mesh] = min(bound_s.get(mesh, math.inf), least)
            result = screen(sums, stages=mesh.pp, microbatches=m, capacity_bytes=capacity,
                            hop_s_per_byte=1 / link.bandwidth_bytes_per_s if link else 0.0,
                            hop_latency_s=link.latency_s if link else 0.0, gpu=gpu,
                            rules=dict(rules, data_parallel=mesh.dp), schedule=options.schedule, policies=policies)
            if result is None:
                continue
            fitting.add(mesh)
            bottleneck, chosen, starts, _ = result
            step = (m + mesh.pp - 1) * bottleneck + _data_parallel_s(groups, mesh, options, sums, starts)
            found.append((Screened(mesh, b, m, lean, step, chosen, starts), shard))
    return found, [(mesh, bound_s.get(mesh, math.inf)) for mesh in meshes_ if mesh not in fitting]


def _distinct(screened: Sequence[tuple[Screened, Sharding]], count: int, within_s: float
              ) -> list[tuple[Screened, Sharding]]:
    """The best candidate of each of the ``count`` best meshes whose screened step is at most
    ``within_s`` (the first always)."""
    seen, found = set(), []
    for candidate, shard in screened:
        if found and candidate.step_s > within_s:
            break
        if candidate.mesh not in seen:
            seen.add(candidate.mesh)
            found.append((candidate, shard))
        if len(found) == count:
            break
    return found


def _data_parallel_s(groups: Cluster, mesh: Mesh, options: SolverOptions, sums: BlockSums, starts: Sequence[int]) -> float:
    """FSDP2's all-gather and reduce-scatter per step for the largest stage, over its replicas."""
    if mesh.dp == 1 or options.mode != "train":
        return 0.0
    bounds = [*starts, len(sums.params)]
    params = max(float(sums.params[a:b].sum()) for a, b in zip(bounds, bounds[1:]))
    p = TRAINING_PRECISIONS[options.precision]
    group = [k * mesh.pp for k in range(mesh.dp)]
    return float(sharded_data_parallel_s(groups, group, params * p.weight_bytes, params * p.grad_bytes))


def _solve_candidate(graph: OpGraph, blocks: OpGraph, chain: Sequence[str], cluster: Cluster, options: SolverOptions,
                     candidate: Screened, shard: Sharding, buffers: Mapping[str, Any] | None,
                     base: Any) -> Plan | None:
    """``solve`` on the cluster of tp groups with the candidate's mesh, microbatches and each
    block's recomputation; the plan relabelled with every group's devices and the layouts."""
    mesh = candidate.mesh
    factor = candidate.microbatch_size / options.samples_per_microbatch
    bounds = [*candidate.starts, len(chain)]
    policy_of_block = {chain[k]: candidate.policies[s] for s in range(mesh.pp) for k in range(bounds[s], bounds[s + 1])}
    costs = recompute_costs(scale_costs(shard.costs, factor), blocks, policy_of_block)
    inner = SolverOptions(**{**dataclasses.asdict(options), "no_split": options.no_split, "pin": options.pin,
                            "stages": mesh.pp, "microbatches": candidate.microbatches, "data_parallel": mesh.dp,
                            "samples_per_microbatch": candidate.microbatch_size, "global_batch": None,
                            "tensor_parallel": None, "recompute": None})
    try:
        plan = solve(scale_graph(per_rank_graph(graph, shard.placements, mesh.tp), factor),
                     group_cluster(cluster, mesh.tp), inner, costs=costs,
                     parameters=shard.parameters, buffers=buffers, cost_model=WithCollectives(base, shard.collectives_s, factor),
                     device_order=range(mesh.pp), near_cuts=[chain[k] for k in candidate.starts[1:]])
    except InfeasibleError as e:
        logger.info("joint: %s with %d microbatches of %d does not fit op by op: %s", mesh, candidate.microbatches,
                    candidate.microbatch_size, e)
        return None
    plan = _relabel(plan, cluster, options, candidate, shard, policy_of_block, blocks)
    # The exact solve priced the graph scaled to the microbatch; the plan names the graph as
    # traced (a runtime checks it against a capture at ``traced_batch`` samples), since scaling
    # cannot say which shapes hold the batch (position tables do not).
    return dataclasses.replace(plan, fingerprint=graph.fingerprint(), node_digests=graph.node_digests(),
                               options={**plan.options, "traced_batch": options.samples_per_microbatch})


def _relabel(plan: Plan, cluster: Cluster, options: SolverOptions, candidate: Screened, shard: Sharding,
             policy_of_block: Mapping[str, str], blocks: OpGraph) -> Plan:
    """The plan on the real devices: stage s of replica 0 on ranks s·tp .. s·tp + tp − 1."""
    tp = candidate.mesh.tp
    policy_of_node = {m: policy for block, policy in policy_of_block.items() for m in blocks[block]["members"]}
    stages = []
    for stage in plan.stages:
        rank = int(stage.devices[0].rpartition(":")[2]) * tp
        devices = tuple(f"{cluster.devices[r].name}:{r}" for r in range(rank, rank + tp))
        recomputed = sorted({policy_of_node[n] for n in stage.nodes if n in policy_of_node} - {"none"})
        stages.append(dataclasses.replace(stage, devices=devices, recompute="+".join(recomputed) or "none",
                                          recompute_blocks=_recomputed_blocks(stage.nodes, policy_of_block, blocks)))
    options_out = dict(plan.options, global_batch=options.global_batch, tensor_parallel=tp,
                       recompute=options.recompute)
    notes = list(plan.solver.notes)
    if tp > 1 and not any(p["output"] != "R" or any(i != "R" for i in p["inputs"]) for p in shard.placements.values()):
        notes.append(f"every node is replicated on the groups of {tp}: splitting any op costs more than it saves, so "
                     f"each group computes the same; a smaller tensor_parallel does the same work on fewer devices")
    unsplit = shard.replicated_only
    if unsplit:
        first = sorted(unsplit)[0]
        notes.append(f"{len(unsplit)} node{'s' if len(unsplit) > 1 else ''} can only be replicated on the groups of {tp} "
                     f"(e.g. {first}: {unsplit[first]})")
    return dataclasses.replace(plan, stages=tuple(stages), solver=dataclasses.replace(plan.solver, notes=tuple(notes)),
                               cluster=str(cluster), tensor_parallel=tp,
                               microbatch_size=candidate.microbatch_size, global_batch=options.global_batch,
                               layouts=dict(shard.placements), options=options_out)


def _recomputed_blocks(nodes: Sequence[str], policy_of_block: Mapping[str, str], blocks: OpGraph
                       ) -> tuple[RecomputedBlock, ...]:
    """The blocks of a stage that recompute, each with its policy and its ops on the stage (in
    graph order; weights, which nothing recomputes, left out), as ``recompute_costs`` priced
    them: the runtime reads these, so it recomputes what was priced without grouping the graph
    into blocks again."""
    on_stage = set(nodes)
    found = []
    for block in blocks.order:
        policy = policy_of_block.get(block, "none")
        members = tuple(m for m in blocks[block]["members"] if m in on_stage and blocks.infos[m].op != "get_attr"
                        ) if policy != "none" else ()
        if members:
            found.append(RecomputedBlock(block, policy, members))
    return tuple(found)


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"
