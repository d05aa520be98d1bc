"""Balanced pipeline cuts under memory: exact DP on chains, OR-Tools CP-SAT on block graphs.

    plan = solve(graph, Cluster.parse("4xh100"), SolverOptions(microbatches=8),
                 costs=price_graph(traced.graph_module), parameters=traced.parameters)

The problem. Every op gets a stage; stage(u) ≤ stage(v) for every edge u → v, so the stages form a
pipeline. A stage's time per microbatch is the compute of its ops on its device plus the time to
receive the tensors crossing its input boundary and send those crossing its output boundary
over the actual link — a tensor used k stages later is relayed across all k hops, and paid on
each. Training doubles the traffic (gradients flow back). The slowest stage sets the pipeline's
period: minimize it, then the total traffic. Each stage's memory — weights, gradients and
optimizer state of the parameters it owns, saved activations of the microbatches in flight under
the schedule, workspace — must fit its device minus the headroom.

How it is solved, coarse to fine:

1. Blocks (``OpGraph.coarsen``: a transformer layer, an embedding, a head) in topological order
   form a chain of units. ``chain_dp`` finds the best split into contiguous intervals exactly
   (linear partition by dynamic programming over cut positions, with link costs and memory).
   With mixed devices the order of the devices along the pipeline matters too (which kind runs
   which stage, and which devices are left out when there are fewer stages): up to
   ``ORDERS_PRICED`` distinct orders each get the DP; beyond, ``search_orders`` finds the best
   order exactly by a DP over how many devices of each kind the stages so far use, without
   listing the orders (63 million for 4 × 4 kinds, searched in about a second). The report
   says whether the order is proven best (``SolverReport.order_gap``).
2. CP-SAT assigns a stage to every block of the block DAG (booleans ``stage[b] == s``,
   precedence on every edge, crossing indicators per tensor and hop, memory per stage), warm
   started with the DP answer, each block confined to the stages its ops can take in a split at
   least as good (``stage_ranges``, below), and proves optimality or reports its gap. It can find
   splits a single chain order cannot (parallel branches) and is what certifies the answer.
3. Refinement: whole-layer cuts cannot balance a GPT-2 whose head is a quarter of the work; the
   DP is run again over every op position where a cut of a split at least as good as the best
   so far can fall (``stage_ranges``, below): exact among contiguous op-level splits.
4. Single ops: in a split at least as good as the incumbent, an op's ancestors must fit in the
   stages up to its own and its descendants in the stages from it (``stage_ranges``), so most
   ops have one possible stage and the rest a window of a few. While the plan is more than
   ``OPS_GAP`` above the bound, CP-SAT runs once more with every op that could move as a block
   of its own and proves the split optimal among all op-level splits (OPTIMAL in the report
   means that) or finds a better one: around a cut the op DAG has parallel branches (the halves
   of a GELU, q/k/v), and a split that is not contiguous in the chain order can send less or
   balance better. Past ``OPS_CHOICES_PER_S`` × ``OPS_TIME_S`` op-stage choices only the ops
   within ``WINDOW_OPS`` of a cut move, and the status stays FEASIBLE.

Values computed from the model inputs alone (attention masks, position ids) need not travel: a
stage that reads one can rebuild it from the inputs. Each such value read by an ordinary op is
rebuilt where rebuilding it, with everything it is built from, costs less than receiving and
passing it on over the fastest link (``_cheaper_to_send``); otherwise it travels like an
activation. Rebuilt values have no place of their own in the chain: each stage pays for the ones
its ops need (``StageModel.rebuild_s``, ``evaluate``), and the plan lists them on every such
stage, where the rewriter computes them. Only values that depend on weights send a gradient back
(``link_load``).

The bound. Total work ÷ combined speed and the heaviest op bound any split. On identical devices
the cuts' traffic raises it (``traffic_bound_s``): the same ranges confine each cut to a window of
the DAG, a minimum cut there is the least any split better than the plan sends over that hop,
and the mean stage pays every cut twice. Weights stay with their first reader and shape checks
with what they read (no cut separates them), as the rewriter places them.

Several stages per device (``schedule="interleaved-1f1b"``, ``stages_per_device`` = v): stage s
runs on the device of stage s mod D, a device's time is the sum of its stages' and its memory
holds them all; the objective is the slowest device. CP-SAT and the bounds take the sums as
they are; the chain DP, exact only for one stage per device, is followed by a descent that
balances the devices (``autosplit.interleaved``).

Data parallel (``SolverOptions.data_parallel`` = k): the cluster holds k equal runs of devices, one
pipeline on each. The stages are placed on the first run (``replica_cluster``) exactly as for one
replica, with each stage's memory counting what FSDP2 keeps on a rank (1/k of the state, the
stage's weights and gradients whole through the step: ``cost_models.memory.data_parallel_factors``);
its all-gather and reduce-scatter over the same device of every run happen once per step, so
they add to the step (``data_parallel_s``), not to the per-microbatch bottleneck that is minimized.

A global batch (``SolverOptions.global_batch``, ``joint``): the mesh dp × pp × tp, the microbatch
size and count, every node's tensor layout on its stage's tp devices (``autosplit.sharding``) and
each stage's recomputation are chosen together for the shortest step. A screening DP over block
cuts prices every combination; the best meshes are then solved as above on the cluster of tp
groups, in the mesh's device order, with the layouts' per-rank costs and collectives.

Deterministic: fixed worker count with interleaved search, deterministic time limits, fixed seed.

Nothing falls back silently: ops priced as free, a search step skipped or stopped at its time
limit, a traffic bound that fell back to the work bound each add one sentence to
``SolverReport.notes`` (those about the search only when the plan is not proven optimal).

Where each part lives: ``options`` (``SolverOptions``), ``chain`` (the ops in order, rebuilt
values), ``orders`` (device orders and their search), ``stage_model`` (what a stage costs:
work, traffic, memory; ``evaluate``), ``dp`` (the chain DP, stage ranges), ``cpsat`` (the block
and op models), ``bounds`` (the lower bounds), ``driver`` (``solve``), ``assemble`` (the Plan),
``infeasible`` (why nothing fits) and ``joint`` (meshes, layouts, microbatches, recomputation).
"""

from autosplit.solver.assemble import fastest_link, replica_cluster, unpriced_notes
from autosplit.solver.bounds import lower_bound_s, traffic_bound_s
from autosplit.solver.chain import Chain, build_chain, link_load, replicable
from autosplit.solver.cpsat import CpResult, cp_sat_blocks
from autosplit.solver.dp import assignment_from_cuts, chain_dp, stage_ranges, stage_shares
from autosplit.solver.driver import solve
from autosplit.solver.options import SHARED_WEIGHTS, SolverOptions, memory_rules
from autosplit.solver.orders import (
    ORDERS_PRICED,
    DeviceOrder,
    OrderChoice,
    choose_order,
    device_kinds,
    device_orders,
    order_count,
    search_orders,
)
from autosplit.solver.stage_model import StageModel, WeightUse, evaluate, transfers_per_call, weight_readers

__all__ = [
    "ORDERS_PRICED",
    "SHARED_WEIGHTS",
    "Chain",
    "CpResult",
    "DeviceOrder",
    "OrderChoice",
    "SolverOptions",
    "StageModel",
    "WeightUse",
    "assignment_from_cuts",
    "build_chain",
    "chain_dp",
    "choose_order",
    "cp_sat_blocks",
    "device_kinds",
    "device_orders",
    "evaluate",
    "fastest_link",
    "link_load",
    "lower_bound_s",
    "memory_rules",
    "order_count",
    "replica_cluster",
    "replicable",
    "search_orders",
    "solve",
    "stage_ranges",
    "stage_shares",
    "traffic_bound_s",
    "transfers_per_call",
    "unpriced_notes",
    "weight_readers",
]
