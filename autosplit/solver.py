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

Deterministic: fixed worker count with interleaved search, deterministic time limits, fixed seed.

Nothing falls back silently: ops priced as free, a search step skipped or stopped at its time
limit, a traffic bound that fell back to the work bound each add one sentence to
``SolverReport.notes`` (those about the search only when the plan is not proven optimal).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Collection, Iterator, Mapping, Sequence

import numpy as np
from ortools.graph.python import max_flow
from ortools.sat.python import cp_model

from autosplit.errors import ConfigError, InfeasibleError
from autosplit.graph import INPUT, OUTPUT, OpGraph, draws_random, writes_in_place
from autosplit.plan import Plan, SolverReport, Stage
from autosplit.schedule import pipeline_times
from cost_models import AnalyticCostModel, Cluster, Link, OpCost, all_reduce_s, sharded_data_parallel_s
from cost_models.memory import (
    FRAGMENTATION,
    GPU_CONTEXT_BYTES,
    INTERLEAVED,
    MODES,
    OPTIMIZER_STATES,
    OPTIMIZER_STEP_TEMPORARIES,
    SCHEDULES,
    TRAINING_PRECISIONS,
    MemoryBreakdown,
    OpsMemory,
    Storage,
    data_parallel_factors,
    device_peak_terms,
    in_flight_profile,
    microbatches_in_flight,
    peak_breakdown,
    training_state_bytes,
    weight_bytes,
)

logger = logging.getLogger(__name__)


SHARED_WEIGHTS = ("sent", "copies")
"""How weights read on several stages are held (``SolverOptions.shared_weights``)."""


@dataclass(frozen=True)
class SolverOptions:
    """How to split: stage count, schedule, memory rules, limits and constraints."""

    stages: int | None = None
    """Number of pipeline stages; default: one per device of a replica (the cluster's devices ÷
    ``data_parallel``), times ``stages_per_device``."""
    mode: str = "train"
    """``"train"`` (forward + backward, optimizer state) or ``"infer"`` (forward only)."""
    schedule: str = "1f1b"
    """``"gpipe"`` (all microbatches in flight), ``"1f1b"`` (stage s holds S − s) or
    ``"interleaved-1f1b"`` (``stages_per_device`` stages on each device, Megatron's virtual
    stages: a smaller bubble for more transfers; see ``autosplit.interleaved``)."""
    stages_per_device: int = 1
    """Stages each device runs, v (``"interleaved-1f1b"`` only): the pipeline's S stages go to
    D = S ÷ v devices, stage s to the (s mod D)-th, as PyTorch's ``ScheduleInterleaved1F1B``
    places them. E.g. 2 on 4 devices: 8 stages, device 0 runs stages 0 and 4."""
    microbatches: int = 1
    """Microbatches per step; the traced graph is one microbatch."""
    memory_headroom: float = 0.1
    """Share of every device's memory left free, e.g. 0.1 for 10%."""
    precision: str = "bf16-mixed"
    """Training state per parameter (see ``cost_models.memory.TRAINING_PRECISIONS``)."""
    optimizer: str = "adamw"
    weight_dtype: str = "bf16"
    """Inference weights: a dtype or a quantized format (``"int4"``)."""
    time_limit_s: float = 10.0
    """Deterministic time limit of each CP-SAT solve (about seconds)."""
    workers: int = 2
    """CP-SAT workers; the search is interleaved, so the result does not depend on timing."""
    seed: int = 0
    pin: Mapping[str, int] = field(default_factory=dict)
    """``{"module.path": stage}``: every op of that module runs on that stage."""
    no_split: tuple[type | str, ...] = ()
    """Module classes (``GPT2Attention`` or its name) or qualified paths never cut inside."""
    refine: bool = True
    """Try op-level cuts inside the blocks next to each cut."""
    samples_per_microbatch: int = 1
    """Batch size of the traced graph, for the predicted throughput."""
    tokens_per_sample: int | None = None
    """Sequence length, for tokens per second."""
    shared_weights: str = "sent"
    """How a weight read on several stages (a tied embedding and LM head) is held, as the runtime
    that runs the plan holds it. ``"sent"`` (``autosplit()`` in one process): stored on its first
    reader and sent once per call to the others, its gradient sent back; the others keep a copy
    and its gradient for the call. ``"copies"`` (``autosplit.distributed``): every stage that
    reads it keeps its own copy with gradient, master weight and optimizer state, and the copies'
    gradients are all-reduced once per step."""
    data_parallel: int = 1
    """Replicas of the pipeline, each on its own devices and its own slice of every batch, with
    each stage replicated over its replicas by FSDP2 (``autosplit.distributed``). The cluster
    holds all replicas' devices, ``data_parallel`` equal runs of them: the stages are planned on
    the first run (replica 0), and each stage's memory and per-step communication count what
    FSDP2 keeps and sends (``cost_models.memory.data_parallel_factors``,
    ``cost_models.sharded_data_parallel_s``). 1: no replicas."""
    global_batch: int | None = None
    """Samples per optimizer step over all replicas. Given, the mesh (data_parallel × stages ×
    tensor_parallel), the microbatch size and count, every node's tensor layout and each
    stage's recomputation are chosen together for the shortest step (``autosplit.joint``); the
    graph is traced at ``samples_per_microbatch`` samples and its costs scaled to the size chosen."""
    tensor_parallel: int | None = None
    """Devices that run each stage together, each node in a DTensor layout (needs
    ``global_batch``). None: chosen with ``global_batch``, else 1."""
    recompute: str | None = None
    """What every stage recomputes in backward: ``"none"``, ``"selective"`` or ``"full"``
    (``autosplit.joint.RECOMPUTE``; needs ``global_batch``). None: chosen per stage with
    ``global_batch``, else none."""

    def __post_init__(self) -> None:
        if self.global_batch is not None and (not isinstance(self.global_batch, int)
                                              or isinstance(self.global_batch, bool) or self.global_batch < 1):
            raise ValueError(f"global_batch must be a positive int (samples per step), e.g. 256; got {self.global_batch!r}")
        tp = self.tensor_parallel
        if tp is not None and (not isinstance(tp, int) or isinstance(tp, bool) or tp < 1):
            raise ValueError(f"tensor_parallel must be a positive int, e.g. 8; got {tp!r}")
        if self.recompute is not None and self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute must be 'none', 'selective' or 'full'; got {self.recompute!r}")
        if self.global_batch is None and ((tp or 1) > 1 or self.recompute not in (None, "none")):
            raise ValueError("tensor_parallel and recompute are chosen with the global batch: give global_batch "
                             "(samples per step), e.g. global_batch=256")
        if self.global_batch is not None and self.schedule == INTERLEAVED:
            raise ValueError(f"global_batch plans use schedule '1f1b' or 'gpipe'; got {self.schedule!r}")
        if self.stages is not None and (not isinstance(self.stages, int) or self.stages < 1):
            raise ValueError(f"stages must be a positive int, e.g. 4; got {self.stages!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, e.g. 'train'; got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, e.g. '1f1b'; got {self.schedule!r}")
        v = self.stages_per_device
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"stages_per_device must be a positive int, e.g. 2; got {v!r}")
        if v > 1 and self.schedule != INTERLEAVED:
            raise ValueError(f"stages_per_device={v} needs schedule={INTERLEAVED!r}, which runs several stages per "
                             f"device; schedule {self.schedule!r} runs one")
        if v > 1 and isinstance(self.data_parallel, int) and self.data_parallel > 1:
            raise ValueError(f"stages_per_device={v} with data_parallel={self.data_parallel}: interleaved plans run one "
                             "replica of the pipeline; use stages_per_device=1 with replicas, or data_parallel=1")
        if self.schedule == INTERLEAVED and self.mode != "train":
            raise ValueError(f"schedule {INTERLEAVED!r} interleaves forwards and backwards, so it trains: use "
                             f"mode='train', or schedule '1f1b' for mode={self.mode!r}")
        if self.stages is not None and isinstance(self.stages, int) and self.stages % v:
            raise ValueError(f"stages={self.stages} must be a multiple of stages_per_device={v}: every device runs "
                             f"{v} stages, e.g. stages={v * max(2, self.stages // v)}")
        if not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise ValueError(f"microbatches must be a positive int, e.g. 8; got {self.microbatches!r}")
        if not 0 <= self.memory_headroom < 1:
            raise ValueError(f"memory_headroom must be in [0, 1), e.g. 0.1; got {self.memory_headroom!r}")
        if self.precision not in TRAINING_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(TRAINING_PRECISIONS)}; got {self.precision!r}")
        if not isinstance(self.optimizer, str) or self.optimizer.lower() not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, e.g. 'adamw'; "
                             f"got {self.optimizer!r}")
        if self.shared_weights not in SHARED_WEIGHTS:
            raise ValueError(f"shared_weights must be one of {SHARED_WEIGHTS}: 'sent' for autosplit() in one process, "
                             f"'copies' for autosplit.distributed; got {self.shared_weights!r}")
        if not isinstance(self.data_parallel, int) or isinstance(self.data_parallel, bool) or self.data_parallel < 1:
            raise ValueError(f"data_parallel must be a positive int (replicas of the pipeline), e.g. 2; "
                             f"got {self.data_parallel!r}")
        if not self.time_limit_s > 0 or self.workers < 1:
            raise ValueError(f"time_limit_s and workers must be positive, e.g. 10.0 and 2; "
                             f"got {self.time_limit_s!r}, {self.workers!r}")
        no_split = tuple(rule.__name__ if isinstance(rule, type) else rule for rule in self.no_split)
        if not all(isinstance(rule, str) for rule in no_split):
            raise TypeError(f"no_split takes module classes or names, e.g. (GPT2Attention, 'model.layers.0'); "
                            f"got {self.no_split!r}")
        object.__setattr__(self, "no_split", no_split)
        object.__setattr__(self, "pin", dict(self.pin))


# --------------------------------------------------------------------------- the chain problem


@dataclass
class Chain:
    """Ops in a topological order with everything the interval formulations need, as arrays.

    Position k is the cut between op k−1 and op k (0 and n are the ends).
    """

    ops: list[str]
    """fx node names of the compute and weight ops, in chain order."""
    time_s: dict[str, np.ndarray]
    """Prefix sums of op time per microbatch, by device type: ``time_s[t][k]`` = ops < k."""
    state_bytes: np.ndarray
    """Prefix sums of the per-parameter training state (or inference weights) first used."""
    param_count: np.ndarray
    """Prefix sums of the parameters first used."""
    activation_bytes: np.ndarray
    """Prefix sums of saved-for-backward bytes per microbatch (0 for inference)."""
    cross_bytes: np.ndarray
    """Bytes crossing each cut position per microbatch, both ways (``link_load``; length n + 1)."""
    cross_count: np.ndarray
    """Transfers crossing each cut position per microbatch, both ways (each pays the link latency)."""
    pins: np.ndarray
    """Stage every op is pinned to, −1 for none."""
    block_starts: list[int]
    """Positions where a block starts (always valid cut positions)."""
    block_names: list[str]
    forbidden: set[int]
    """Cut positions inside a no-split module."""
    replicated: dict[str, tuple[str, ...]]
    """Values computed from the model inputs alone → those inputs; recomputed where read."""
    no_gradient: frozenset[str] = frozenset()
    """Values no gradient flows back to: the model inputs and what is computed from them alone."""
    rebuilt: frozenset[str] = frozenset()
    """The replicated values other ops need (see ``_rebuilt``): first in the chain, timed only
    through the rebuild groups, and computed on every stage that needs them."""
    rebuild_time_s: dict[str, np.ndarray] = field(default_factory=dict)
    """Per device type, seconds per microbatch to rebuild each group of replicated values on a
    stage that needs them (the groups' ops have no time of their own in ``time_s``)."""
    rebuild_needers: list[np.ndarray] = field(default_factory=list)
    """Per group, the positions of the ops that need it: a stage holding one of them rebuilds it."""
    rebuild_next: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), dtype=np.int64))
    """Per group and position i, the first position ≥ i of an op that needs it (n if none)."""
    weights: Mapping[str, Any] = field(default_factory=dict)
    """Every parameter and buffer by canonical name (``TensorInfo``: bytes, dtype, requires_grad)."""
    memory: OpsMemory | None = None
    """The ops' memory (``OpsMemory``): what a stage of them holds. Without it, each op keeps its
    own ``activation_bytes`` step for backward, and nothing else."""

    @property
    def n(self) -> int:
        return len(self.ops)


def build_chain(graph: OpGraph, blocks: OpGraph, costs: Mapping[str, OpCost], parameters: Mapping[str, Any],
                times_by_type: Mapping[str, Mapping[str, Any]], options: SolverOptions,
                link: Link | None = None, buffers: Mapping[str, Any] | None = None) -> Chain:
    """Lay the blocks' ops (of the op-level ``graph``) out in one topological order and compute
    the prefix sums. ``link`` (the fastest between the devices) decides which values computed
    from the inputs alone travel instead of being rebuilt (``_cheaper_to_send``); without it
    all are rebuilt."""
    train = options.mode == "train"
    infos = blocks.infos
    members = [(block, list(blocks[block]["members"])) for block in blocks.order
               if blocks[block]["kind"] not in (INPUT, OUTPUT)]
    # Values computed from the model inputs alone (masks, position ids, `replicable`) are rebuilt
    # by every stage that needs them, but those cheaper to send (`_cheaper_to_send`). The rebuilt
    # ones go first, glued together, with no time of their own: each stage pays for the groups it
    # needs (`_rebuild_groups`).
    replicated = replicable(graph)
    no_gradient = frozenset(replicated) | {op for op in graph.order if graph.infos[op].op == "placeholder"}
    in_chain = [op for _, ops_ in members for op in ops_]
    if link is not None:
        send = _cheaper_to_send(graph, in_chain, replicated, times_by_type, link, train)
        if send:
            replicated = replicable(graph, exclude=send)
    rebuilt = _rebuilt(graph, in_chain, replicated)
    front = [op for op in in_chain if op in rebuilt]
    members = [(block, [op for op in ops_ if op not in rebuilt]) for block, ops_ in members]
    if front:
        home = next(k for k, (_, ops_) in enumerate(members) if ops_)
        members[home] = (members[home][0], front + members[home][1])
    # A weight lives on the stage of its first reader (the rewriter puts it there): each weight op
    # goes right before that reader, in the reader's block, and no cut separates them. An op
    # nothing reads (a shape check) goes right after the last op it reads, likewise.
    laid_out = {op: k for k, op in enumerate(op for _, ops_ in members for op in ops_)}
    before: dict[str, list[str]] = {}
    after: dict[str, list[str]] = {}
    for op in laid_out:
        if infos[op].op == "get_attr":
            readers = [v for v in graph.dag.successors(op) if v in laid_out and infos[v].op != "get_attr"]
            if readers:
                before.setdefault(min(readers, key=laid_out.__getitem__), []).append(op)
        elif graph.dag.out_degree(op) == 0:
            inputs = [u for u in graph.dag.predecessors(op) if u in laid_out and infos[u].op != "get_attr"]
            if inputs:
                after.setdefault(max(inputs, key=laid_out.__getitem__), []).append(op)
    attached = {w for ws in [*before.values(), *after.values()] for w in ws}
    ops, block_starts, block_names = [], [], []
    glued: set[int] = set()
    for block, ops_ in members:
        laid = []

        def lay(op: str) -> None:
            for weight in before.get(op, ()):
                glued.add(len(ops) + len(laid) + 1)
                laid.append(weight)
            laid.append(op)
            for sink in after.get(op, ()):
                glued.add(len(ops) + len(laid))
                lay(sink)

        for op in ops_:
            if op not in attached:
                lay(op)
        if laid:
            block_starts.append(len(ops))
            block_names.append(block)
            ops.extend(laid)
    n = len(ops)
    position = {op: k for k, op in enumerate(ops)}
    if front:  # no cut inside the rebuilt values or right after them
        glued.update(range(1, max(position[op] for op in front) + 2))

    def prefix(values: Sequence[float]) -> np.ndarray:
        out = np.zeros(n + 1)
        np.cumsum(values, out=out[1:])
        return out

    time_s = {}
    for device_type, times in times_by_type.items():
        time_s[device_type] = prefix([(times[op].total_s if train else times[op].fwd_s)
                                      if op in times and op not in rebuilt else 0.0 for op in ops])
    per_param = _state_bytes_per_param(options)
    seen: set[str] = set()
    state, params = np.zeros(n), np.zeros(n)
    for k, op in enumerate(ops):
        for name in infos[op].reads:
            if name in parameters and name not in seen:
                seen.add(name)
                numel = math.prod(parameters[name].shape)
                params[k] += numel
                state[k] += per_param * numel
    activations = [costs[op].saved_bytes if train and op in costs else 0.0 for op in ops]

    # Every activation is live from its producer to its last reader; each cut in between
    # carries it. Model inputs are produced before the first op. A rebuilt value is recomputed by
    # every stage that reads it, so the inputs it comes from travel instead. Weights read on
    # several stages go straight from their owner to each reader once per step, which `evaluate`
    # prices; they do not ride along the chain.
    cross = np.zeros(n + 2)
    count = np.zeros(n + 2)
    for producer, readers in travelling_readers(graph, ops, replicated).items():
        start, last = position[producer] + 1 if producer in position else 0, max(readers)
        if last < start:
            continue
        nbytes, tensors = link_load(infos[producer], train and producer not in no_gradient)
        cross[start] += nbytes
        cross[last + 1] -= nbytes
        count[start] += tensors
        count[last + 1] -= tensors
    cross = np.cumsum(cross)[: n + 1]
    count = np.cumsum(count)[: n + 1]

    pins = np.full(n, -1)
    for path, stage in options.pin.items():
        matched = [k for k, op in enumerate(ops) if _under(infos[op].module_path, path)
                   or (infos[op].op == "get_attr" and any(_under(r.rpartition(".")[0], path) for r in infos[op].reads))]
        if not matched:
            raise ConfigError(f"pin names module {path!r}, which runs no op of this model; "
                             f"pin takes qualified module names such as 'transformer.h.0'")
        pins[matched] = stage
    forbidden: set[int] = set(glued)
    for rule in options.no_split:
        spans: dict[str, list[int]] = {}
        for k, op in enumerate(ops):
            for site in infos[op].scope:
                path = site.partition("@")[0]
                cls = blocks.module_types.get(path, "").rsplit(".", 1)[-1]
                if rule in (path, cls):
                    spans.setdefault(site, []).append(k)
        for ks in spans.values():
            forbidden.update(range(min(ks) + 1, max(ks) + 1))
    forbidden.update(_written_spans(ops, infos))
    weight_reads = []  # the parameters each op reads, itself or through the weight ops it reads
    for op in ops:
        names = [] if infos[op].op == "get_attr" else list(infos[op].reads) + [
            r for u in graph.dag.predecessors(op) if infos[u].op == "get_attr" for r in infos[u].reads]
        weight_reads.append({name: math.prod(parameters[name].shape) for name in names if name in parameters})
    chain = Chain(ops, time_s, prefix(state), prefix(params), prefix(activations), cross, count, pins, block_starts,
                  block_names, forbidden, replicated, no_gradient, weights={**(buffers or {}), **parameters},
                  memory=OpsMemory.from_costs(ops, costs if train else _unsaved(costs), params,
                                              weight_reads=weight_reads, train=train))

    _rebuild_groups(chain, graph, rebuilt, times_by_type, train)
    return chain


def _unsaved(costs: Mapping[str, OpCost]) -> dict[str, OpCost]:
    """Inference keeps nothing for backward."""
    return {name: dataclasses.replace(cost, saved={}) for name, cost in costs.items()}


def link_load(info: Any, gradient: bool) -> tuple[float, float]:
    """Bytes and transfers one value puts on a link per microbatch: the value, and with
    ``gradient`` (training, and the value depends on weights) the gradient of its floating-point
    tensors coming back; integer ids and boolean masks have none."""
    graded = sum(math.prod(shape) * dtype.itemsize for shape, dtype in zip(info.shapes, info.dtypes)
                 if dtype.is_floating_point or dtype.is_complex) if gradient else 0
    return info.output_bytes + graded, 1.0 + (1.0 if graded else 0.0)


def _cheaper_to_send(graph: OpGraph, ops: Sequence[str], replicated: Mapping[str, tuple[str, ...]],
                     times_by_type: Mapping[str, Mapping[str, Any]], link: Link, train: bool) -> set[str]:
    """The replicated values read by ordinary ops that cost a stage less to receive and pass on
    over ``link`` than to rebuild along with everything they are built from: an attention mask of
    batch × seq² booleans crosses NVLink in a fraction of the dozens of small kernels that
    build it. They travel like activations instead (so do the values built from them)."""
    inside = set(ops)
    send = set()
    for u in ops:
        if u not in replicated or all(v not in inside or v in replicated for v in graph.dag.successors(u)):
            continue
        closure, todo = set(), [u]
        while todo:
            w = todo.pop()
            if w not in closure:
                closure.add(w)
                todo.extend(p for p in graph.dag.predecessors(w) if p in replicated and p in inside)
        rebuild_s = min(sum(times[w].fwd_s for w in closure if w in times) for times in times_by_type.values())
        nbytes, tensors = link_load(graph.infos[u], False)  # built from the inputs alone: no gradient
        if 2 * (nbytes / link.bandwidth_bytes_per_s + tensors * link.latency_s) < rebuild_s:  # in and out
            send.add(u)
    return send


def _rebuilt(graph: OpGraph, ops: Sequence[str], replicated: Mapping[str, tuple[str, ...]]) -> dict[str, set[str]]:
    """The replicated values some op reads, each with the ops that need it: the ops that are
    not rebuilt themselves and read it, directly or through other rebuilt values. (A replicated
    value nothing reads, such as a shape check on a mask, is an ordinary op.)"""
    inside = set(ops)
    rebuilt = {u for u in ops if u in replicated and any(v in inside for v in graph.dag.successors(u))}
    needers: dict[str, set[str]] = {u: set() for u in rebuilt}
    for op in ops:
        if op in rebuilt:
            continue
        todo = [u for u in graph.dag.predecessors(op) if u in rebuilt]
        while todo:
            u = todo.pop()
            if op not in needers[u]:
                needers[u].add(op)
                todo.extend(p for p in graph.dag.predecessors(u) if p in rebuilt)
    return needers


def _rebuild_groups(chain: Chain, graph: OpGraph, rebuilt: Mapping[str, set[str]],
                    times_by_type: Mapping[str, Mapping[str, Any]], train: bool) -> None:
    """Group the rebuilt values by the ops that need them (an attention mask and everything it is
    built from form one group, read by every attention op) and fill the chain's rebuild fields."""
    n = chain.n
    chain.rebuilt = frozenset(rebuilt)
    position = {op: k for k, op in enumerate(chain.ops)}
    groups: dict[tuple[int, ...], list[str]] = {}
    for value, needers in rebuilt.items():
        groups.setdefault(tuple(sorted(position[v] for v in needers)), []).append(value)
    keys = sorted(groups)
    chain.rebuild_needers = [np.array(key, dtype=np.int64) for key in keys]
    chain.rebuild_next = np.full((len(keys), n + 1), n, dtype=np.int64)
    for g, key in enumerate(keys):
        after = np.searchsorted(np.array(key), np.arange(n + 1))  # index of the first needer ≥ i
        within = after < len(key)
        chain.rebuild_next[g][within] = np.array(key)[after[within]]
    for device_type, times in times_by_type.items():
        chain.rebuild_time_s[device_type] = np.array([
            sum((times[v].total_s if train else times[v].fwd_s) for v in groups[key] if v in times) for key in keys])


def replicable(graph: OpGraph, exclude: Collection[str] = ()) -> dict[str, tuple[str, ...]]:
    """Values that depend on the model inputs only (no weight, no randomness, no in-place
    write), but those in ``exclude`` and what is built from them: each maps to the inputs it is
    computed from. A stage that reads such a value may rebuild it from those inputs instead of
    receiving it (position ids from the ids they index)."""
    found: dict[str, tuple[str, ...]] = {}
    for name in graph.order:
        info = graph.infos[name]
        if info.op == "placeholder" or name in exclude:
            continue
        if info.op not in ("call_function", "call_method") or draws_random(info.target) \
                or writes_in_place(info.target):
            continue
        preds = list(graph.dag.predecessors(name))  # none: a constant such as arange(seq)
        if not all(p in found or graph.infos[p].op == "placeholder" for p in preds):
            continue
        sources = set()
        for p in preds:
            sources.update(found.get(p, (p,)))
        found[name] = tuple(sorted(sources))
    return found


def _written_spans(ops: Sequence[str], infos: Mapping[str, Any]) -> set[int]:
    """Cut positions between the first op that reads or writes a parameter or buffer the model
    writes in place (a counter, an EMA, running statistics) and the last op that writes it.

    The tensor is stored on the stage of its first reader, and a write on any other stage
    would change a copy sent there: so every access up to the last write stays on one stage.
    Reads after the last write may lie on later stages; the updated tensor is sent to them.
    """
    first: dict[str, int] = {}
    last_write: dict[str, int] = {}
    for k, op in enumerate(ops):
        for name in [*infos[op].reads, *infos[op].writes]:
            first.setdefault(name, k)
        for name in infos[op].writes:
            last_write[name] = k
    return {cut for name, end in last_write.items() for cut in range(first[name] + 1, end + 1)}


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def memory_rules(options: SolverOptions) -> dict[str, Any]:
    """The options that set what a parameter and an activation cost (``cost_models.memory.peak_terms``)."""
    return dict(mode=options.mode, precision=options.precision, optimizer=options.optimizer,
                weight_dtype=options.weight_dtype, data_parallel=options.data_parallel,
                shared_weights=options.shared_weights)


def _state_bytes_per_param(options: SolverOptions) -> float:
    if options.mode == "train":
        return training_state_bytes(1, precision=options.precision, optimizer=options.optimizer).total_bytes
    return weight_bytes(1, options.weight_dtype)


# --------------------------------------------------------------------------- devices along the pipeline


@dataclass(frozen=True)
class Layout:
    """Which device runs each stage, what it may hold, and the links between consecutive stages."""

    ranks: tuple[int, ...]
    types: tuple[str, ...]
    capacity_bytes: tuple[float, ...]
    gpu: tuple[bool, ...]
    hop_s_per_byte: tuple[float, ...]
    """1 / bandwidth of the link from stage s to s + 1 (length S − 1)."""
    hop_latency_s: tuple[float, ...]

    @classmethod
    def of(cls, cluster: Cluster, ranks: Sequence[int], headroom: float) -> "Layout":
        devices = [cluster.devices[r] for r in ranks]
        links = [cluster.link(a, b) for a, b in zip(ranks, ranks[1:])]
        return cls(tuple(ranks), tuple(d.name for d in devices),
                   tuple(d.memory_bytes * (1 - headroom) for d in devices), tuple(d.kind == "gpu" for d in devices),
                   tuple(1 / link.bandwidth_bytes_per_s for link in links), tuple(link.latency_s for link in links))

    def __len__(self) -> int:
        return len(self.ranks)


ORDERS_PRICED = 48
"""Up to this many distinct device orders, each is priced with the chain DP; beyond, the exact
order search (``search_orders``) finds the best one."""

ORDER_SEARCH_MAX_CELLS = 4e8
"""Largest order search run, in cells (count vectors × kinds³ × block cut positions², about one
array operation each: ~1 s on this 2-core machine per 1e8). Beyond it (many hosts of many kinds)
a few orders are priced and the plan says the order is not proven best."""


def device_kinds(cluster: Cluster) -> dict[tuple[str, int], list[int]]:
    """The cluster's device kinds, (device type, host), each with its ranks in increasing order;
    kinds in the order of their first rank. Two devices of one kind are interchangeable: the same
    speed and memory, and the same link to every other device."""
    kinds: dict[tuple[str, int], list[int]] = {}
    for rank, (device, host) in enumerate(zip(cluster.devices, cluster.hosts)):
        kinds.setdefault((device.name, host), []).append(rank)
    return kinds


def order_count(counts: Sequence[int], stages: int) -> int:
    """Distinct sequences of ``stages`` kinds drawn from kinds with ``counts`` devices each: the
    distinct device orders along a pipeline of that many stages.

    With every device used this is the multinomial n! ÷ Π cₖ!; with fewer stages, the sum of
    stages! ÷ Π mₖ! over the selections m ≤ c with Σ m = stages. ``ways[t]`` counts sequences of
    length t over the kinds so far; a kind with c devices adds m ≤ c of them in C(t + m, m) ways
    of placing them. E.g. counts (2, 1) and 3 stages: 3 (aab, aba, baa); 2 stages: 3 (aa, ab, ba).
    """
    ways = [1] + [0] * stages
    for c in counts:
        new = [0] * (stages + 1)
        for t, w in enumerate(ways):
            if w:
                for m in range(min(c, stages - t) + 1):
                    new[t + m] += w * math.comb(t + m, m)
        ways = new
    return ways[stages]


def device_orders(cluster: Cluster, stages: int) -> Iterator[tuple[int, ...]]:
    """Every distinct order of ``stages`` of the cluster's devices along the pipeline, as ranks, in
    increasing lexicographic order; the k-th device of a kind used is its k-th rank. Built kind by
    kind (multiset permutations with selection): ``order_count`` orders, never the n! tuples of
    all rank permutations."""
    pools = list(device_kinds(cluster).values())
    used = [0] * len(pools)
    prefix: list[int] = []

    def extend() -> Iterator[tuple[int, ...]]:
        if len(prefix) == stages:
            yield tuple(prefix)
            return
        for k in sorted((k for k in range(len(pools)) if used[k] < len(pools[k])), key=lambda k: pools[k][used[k]]):
            prefix.append(pools[k][used[k]])
            used[k] += 1
            yield from extend()
            used[k] -= 1
            prefix.pop()

    return extend()


@dataclass(frozen=True)
class OrderChoice:
    """The device order chosen for the pipeline and how sure the choice is."""

    model: StageModel
    """The chain priced on the chosen order."""
    bottleneck_s: float
    cuts: list[int]
    """The chain DP's split on that order."""
    tried: int
    """Orders priced one by one with the chain DP."""
    total: int
    """Distinct orders (``order_count``)."""
    gap: float | None
    """(chosen − best order's bottleneck) ÷ chosen, proven; 0 when the order is proven best,
    None when no bound is known."""


def choose_order(chain: Chain, cluster: Cluster, stages: int, options: SolverOptions,
                 block_cuts: Sequence[int]) -> OrderChoice | None:
    """The device order along the pipeline whose block-level split is best, with its split.

    Up to ``ORDERS_PRICED`` distinct orders, each is priced with ``chain_dp`` (on ops where no block
    split fits). Beyond, ``search_orders`` finds the best order exactly over all of them, which is
    then priced with ``chain_dp``; where that search is too large, the cluster's order and its
    orders by speed are priced, unproven. Ties go to the first order in ``device_orders``.
    Returns None when no order has a split that fits.
    """
    if stages > len(cluster):
        raise ValueError(f"{stages} stages need at least {stages} devices; the cluster {cluster} has {len(cluster)}")
    kinds = device_kinds(cluster)
    total = order_count([len(ranks) for ranks in kinds.values()], stages)

    def price(order: Sequence[int]) -> tuple[float, StageModel, list[int]] | None:
        model = StageModel(chain, Layout.of(cluster, order, options.memory_headroom), options, cluster)
        found = chain_dp(model, block_cuts)
        if found is None and options.refine:  # a block may be too big for any device: cut inside
            positions = sorted(set(range(chain.n + 1)) - chain.forbidden)
            if _fill(model, positions).stage is None:  # some split fits by memory (checked greedily first)
                found = chain_dp(model, positions)
        return None if found is None else (found[0], model, found[1])

    def best_of(orders: Sequence[Sequence[int]]) -> tuple[float, StageModel, list[int]] | None:
        best = None
        for order in orders:
            found = price(order)
            if found is not None and (best is None or found[0] < best[0] * (1 - 1e-9)):
                best = found
        return best

    gap: float | None = 0.0
    if total <= ORDERS_PRICED:
        orders = list(device_orders(cluster, stages))
        best = best_of(orders)
    else:
        searched = None
        cells = search_cells(kinds, stages, len(block_cuts))
        if cells <= ORDER_SEARCH_MAX_CELLS:
            start = time.perf_counter()
            searched = search_orders(chain, cluster, stages, options, block_cuts)
            logger.info("order search over %d device orders in %.2f s (%.3g cells): %s", total,
                        time.perf_counter() - start, cells,
                        "no block split fits" if searched is None else f"best {searched[0]:.4g} s")
        else:
            logger.info("order search skipped: %.3g cells > %.3g; pricing the cluster's order and its orders "
                        "by speed", cells, ORDER_SEARCH_MAX_CELLS)
        if searched is not None:
            best_s, order = searched
            orders = [order]
            best = price(order)
            if best is not None:
                gap = max(0.0, (best[0] - best_s) / best[0]) if best[0] > 0 else 0.0
                gap = 0.0 if gap <= 1e-9 else gap
        else:
            speed = [d.flops_for("fp32") for d in cluster.devices]
            ranks = range(len(cluster))
            orders = sorted({tuple(order)[:stages] for order in (
                ranks, sorted(ranks, key=lambda r: -speed[r]), sorted(ranks, key=lambda r: speed[r]))})
            best = best_of(orders)
            gap = None
    if best is None:
        return None
    return OrderChoice(best[1], best[0], best[2], len(orders), total, gap)


def search_cells(kinds: Mapping[tuple[str, int], Sequence[int]], stages: int, positions: int) -> float:
    """An upper bound on the cells ``search_orders`` computes (see ``ORDER_SEARCH_MAX_CELLS``)."""
    vectors = math.prod(min(len(ranks), stages) + 1 for ranks in kinds.values())
    return float(vectors) * len(kinds) ** 3 * positions ** 2


def search_orders(chain: Chain, cluster: Cluster, stages: int, options: SolverOptions,
                  candidates: Sequence[int]) -> tuple[float, tuple[int, ...]] | None:
    """The best bottleneck over every distinct device order and every split at ``candidates``
    (block cut positions), and the first order in ``device_orders`` that reaches it; None when no
    order has a split that fits.

    Exact dynamic programming over orders, without listing them. Stage s of kind κ on [i, j)
    costs its work and memory check on κ (``StageModel`` of a layout of κ alone: stage index s
    sets the microbatches in flight and the pins), plus the traffic at i over the link from the
    previous stage's kind and at j over the link to the next stage's kind. The next kind is part
    of the state so each stage is priced exactly:

        G(s, U, κₚ, κ)[i] = min over κₙ, j of
                            max(cost(s, κₚ → κ → κₙ, [i, j)), G(s + 1, U + e_κ, κ, κₙ)[j])

    the best bottleneck of stages s.. when stage s has kind κ and starts at i, the one before it
    had kind κₚ and U counts the kinds of stages 0..s − 1 (each kind at most its devices). A
    16-device cluster of 4 kinds has 625 count vectors where it has 63 million orders. Then a walk
    from stage 0 takes at each stage the kind with the lowest next rank whose best completion
    (the exact prefix value, max'ed with G) still reaches the optimum: the lexicographically
    first optimal order, the one ``choose_order`` keeps when it prices every order.
    """
    kinds = device_kinds(cluster)
    pools = list(kinds.values())
    K, S = len(pools), stages
    avail = [len(p) for p in pools]
    c = np.array(sorted(set(candidates)))
    C = len(c)
    inf = math.inf
    # Work (and memory, pins) of every stage on every kind, as matrices over (i, j) indices.
    base = np.full((S, K, C, C), inf)
    for k, pool in enumerate(pools):
        alone = StageModel(chain, Layout.of(cluster, [pool[0]] * S, options.memory_headroom), options, cluster)
        for gpu in set(alone.layout.gpu):
            alone.memory.prepare(c, cpu=not gpu)
        for s in range(S):
            for jj in range(1, C):
                if s == S - 1 and jj != C - 1:
                    continue
                ii = np.array([0]) if s == 0 else np.arange(1, jj)
                if not len(ii):
                    continue
                ok = alone.allowed(s, c[ii], int(c[jj]))
                base[s, k, ii[ok], jj] = alone.work_s(s, c[ii[ok]], int(c[jj]))
    # Traffic at every cut position over the link between two kinds (two devices of one kind: the
    # link between its first two).
    comm = np.full((K, K, C), inf)
    for a in range(K):
        for b in range(K):
            ra, rb = pools[a][0], (pools[b][0] if a != b else (pools[b][1] if avail[b] > 1 else None))
            if rb is None:
                continue
            link = cluster.link(ra, rb)
            comm[a, b] = chain.cross_bytes[c] / link.bandwidth_bytes_per_s + chain.cross_count[c] * link.latency_s

    def vectors(total: int) -> Iterator[tuple[int, ...]]:
        def fill(k: int, left: int) -> Iterator[tuple[int, ...]]:
            if k == K:
                if left == 0:
                    yield ()
                return
            for m in range(min(avail[k], left) + 1):
                for rest in fill(k + 1, left - m):
                    yield (m, *rest)
        return fill(0, total)

    # G[s][(U, κ)]: rows κₚ (K: no previous stage, for s = 0) × start index i.
    G: list[dict[tuple[tuple[int, ...], int], np.ndarray]] = [{} for _ in range(S)]
    for s in range(S - 1, -1, -1):
        for U in vectors(s):
            kps = [K] if s == 0 else [kp for kp in range(K) if U[kp] > 0]
            for k in range(K):
                if U[k] >= avail[k]:
                    continue
                table = np.full((K + 1, C), inf)
                incoming = np.stack([np.zeros(C) if kp == K else comm[kp, k] for kp in kps])  # (kp, i)
                if s == S - 1:
                    table[kps] = base[s, k, :, C - 1][None, :] + incoming
                else:
                    after = tuple(u + (q == k) for q, u in enumerate(U))
                    kns = [kn for kn in range(K) if after[kn] < avail[kn]]
                    if not kns:
                        continue
                    rest = np.stack([G[s + 1][(after, kn)][k] for kn in kns])  # (kn, j)
                    cost = base[s, k][None, None] + comm[k, kns][None, :, None, :] + incoming[:, None, :, None]
                    table[kps] = np.maximum(cost, rest[None, :, None, :]).min(axis=(1, 3))
                G[s][(U, k)] = table
    start = tuple([0] * K)
    best_s = min((float(G[0][(start, k)][K][0]) for k in range(K) if (start, k) in G[0]), default=inf)
    if not np.isfinite(best_s):
        return None
    reach = best_s * (1 + 1e-9) + 1e-15

    def by_rank(U: Sequence[int]) -> list[int]:
        return sorted((k for k in range(K) if U[k] < avail[k]), key=lambda k: pools[k][U[k]])

    # The walk: the prefix's exact value F[i] (max over its stages, the next stage starting at i).
    U, kinds_used = start, [next(k for k in by_rank(start) if (start, k) in G[0] and G[0][(start, k)][K][0] <= reach)]
    F = np.full(C, inf)
    F[0] = 0.0
    for s in range(S - 1):
        k, kp = kinds_used[-1], (kinds_used[-2] if s > 0 else K)
        incoming = np.zeros(C) if kp == K else comm[kp, k]
        after = tuple(u + (q == k) for q, u in enumerate(U))
        for kn in by_rank(after):
            cost = base[s, k] + incoming[:, None] + comm[k, kn][None, :]
            nxt = np.maximum(F[:, None], cost).min(axis=0)
            if (after, kn) in G[s + 1] and np.maximum(nxt, G[s + 1][(after, kn)][k]).min() <= reach:
                break
        else:  # cannot happen: G is exact
            raise AssertionError("order search: no kind continues an optimal prefix")
        U, F = after, nxt
        kinds_used.append(kn)
    used = [0] * K
    order = []
    for k in kinds_used:
        order.append(pools[k][used[k]])
        used[k] += 1
    return best_s, tuple(order)


# --------------------------------------------------------------------------- stage costs


class StageModel:
    """Time and memory of a stage [i, j) of a chain on a layout, vectorized over i."""

    def __init__(self, chain: Chain, layout: Layout, options: SolverOptions, cluster: Cluster):
        self.chain, self.layout, self.options, self.cluster = chain, layout, options, cluster
        train = options.mode == "train"
        self.directions = 2 if train else 1
        S = len(layout)
        self.in_flight = [microbatches_in_flight(options.schedule, num_stages=S, stage=s,
                                                 microbatches=options.microbatches,
                                                 stages_per_device=options.stages_per_device)
                          if train else 1 for s in range(S)]
        self.memory = chain.memory or OpsMemory(
            chain.n, np.diff(chain.param_count),
            [Storage(float(b), k, (k,), (k,)) for k, b in enumerate(np.diff(chain.activation_bytes)) if b > 0],
            train=train)
        self.rules = memory_rules(options)
        self.other_pins = []
        for s in range(S):
            other = (chain.pins >= 0) & (chain.pins != s)
            self.other_pins.append(np.concatenate([[0], np.cumsum(other)]))
        self.pin_span = []
        for s in range(S):
            where = np.nonzero(chain.pins == s)[0]
            self.pin_span.append((int(where.min()), int(where.max())) if len(where) else None)
        self._closure: tuple[OpGraph, np.ndarray, np.ndarray] | None = None
        self.weights = chain.weights
        devices: dict[int, list[int]] = {}
        for s, rank in enumerate(layout.ranks):
            devices.setdefault(rank, []).append(s)
        self.devices = [tuple(stages) for stages in devices.values()]
        """The stages of each device, devices in the order of their first stage: one stage each,
        but with an interleaved schedule (stage s on the device of stage s mod D)."""
        self._profiles: list[np.ndarray] | None = None

    def closure_work(self, graph: OpGraph) -> tuple[np.ndarray, np.ndarray]:
        """Work of every op with all its ancestors, and with all its descendants, each op priced
        on the fastest device type (computed once per graph)."""
        if self._closure is None or self._closure[0] is not graph:
            chain, n = self.chain, self.chain.n
            work = np.min(np.stack([np.diff(chain.time_s[t]) for t in set(self.layout.types)]), axis=0)
            position = {op: k for k, op in enumerate(chain.ops)}
            before = [[position[u] for u in graph.dag.predecessors(op) if u in position] for op in chain.ops]
            after: list[list[int]] = [[] for _ in range(n)]
            for k, preds in enumerate(before):
                for j in preds:
                    after[n - 1 - j].append(n - 1 - k)  # the reversed chain, for descendants
            self._closure = (graph, _closure_work(before, work), _closure_work(after, work[::-1])[::-1])
        return self._closure[1], self._closure[2]

    def gradient(self, value: str) -> bool:
        """Whether ``value``'s gradient comes back over the links (training, a weight-dependent value)."""
        return self.directions == 2 and value not in self.chain.no_gradient

    def cluster_link(self, a: int, b: int):
        """The link between the devices of stages a and b."""
        return self.cluster.link(self.layout.ranks[a], self.layout.ranks[b])

    def comm_s(self, k: np.ndarray | int, hop: int) -> np.ndarray | float:
        """Seconds per microbatch to move what crosses cut position(s) ``k`` over hop ``hop``."""
        return self.hop_s(self.chain.cross_bytes[k], hop, self.chain.cross_count[k])

    def hop_s(self, nbytes: np.ndarray | float, hop: int, count: np.ndarray | float = 1) -> np.ndarray | float:
        """Seconds per microbatch to make ``count`` transfers of ``nbytes`` in all over hop ``hop``
        (a value's ``link_load``: its gradient coming back included)."""
        return nbytes * self.layout.hop_s_per_byte[hop] + count * self.layout.hop_latency_s[hop]

    def rebuild_s(self, s: int, i: np.ndarray | int, j: int) -> np.ndarray | float:
        """Seconds stage s spends on [i, j) rebuilding the replicated values its ops need."""
        c = self.chain
        if not len(c.rebuild_needers):
            return 0.0 * np.asarray(i)
        needed = c.rebuild_next[:, i] < j  # groups × len(i)
        return c.rebuild_time_s[self.layout.types[s]] @ needed

    def work_s(self, s: int, i: np.ndarray, j: int) -> np.ndarray:
        """Compute seconds of stage s on [i, j): its ops and the values it rebuilds."""
        t = self.chain.time_s[self.layout.types[s]]
        return t[j] - t[i] + self.rebuild_s(s, i, j)

    def traffic_s(self, s: int, i: np.ndarray, j: int) -> np.ndarray | float:
        """Seconds stage s on [i, j) spends receiving at cut i and sending at cut j."""
        total = self.comm_s(i, s - 1) if s > 0 else 0.0 * np.asarray(i)
        if s < len(self.layout) - 1:
            total = total + self.comm_s(j, s)
        return total

    def time_s(self, s: int, i: np.ndarray, j: int) -> np.ndarray:
        return self.work_s(s, i, j) + self.traffic_s(s, i, j)

    def memory_bytes(self, s: int, i: np.ndarray, j: int) -> np.ndarray:
        """Peak bytes of stage s on ops [i, j) (``OpsMemory.total_bytes``: the one memory model)."""
        return self.memory.total_bytes(i, j, in_flight=self.in_flight[s], gpu=self.layout.gpu[s], **self.rules)

    def breakdown(self, s: int, stage_of_op: Sequence[int]) -> MemoryBreakdown:
        """Peak memory by kind of stage s in any op → stage assignment (chain order); equals
        ``memory_bytes`` where the stage is a run of the chain."""
        quantities = self.memory.quantities_of(stage_of_op, s, cpu=not self.layout.gpu[s])
        return peak_breakdown(quantities, in_flight=self.in_flight[s], gpu=self.layout.gpu[s], **self.rules)

    def device_breakdown(self, d: int, quantities: Sequence[Mapping[str, float]]) -> MemoryBreakdown:
        """Peak memory by kind of device d (``self.devices[d]``) given its stages' quantities
        (``OpsMemory.quantities``), in stage order: ``device_peak_terms`` with the microbatches
        each holds in flight through the schedule; a device of one stage is that stage's
        ``peak_breakdown``."""
        stages = self.devices[d]
        first = stages[0]
        if len(stages) == 1:
            return peak_breakdown(quantities[0], in_flight=self.in_flight[first], gpu=self.layout.gpu[first],
                                  **self.rules)
        if self._profiles is None:  # several stages per device: an interleaved schedule, which trains
            S, v = len(self.layout), self.options.stages_per_device
            self._profiles = [in_flight_profile(self.options.schedule, num_stages=S, stages_per_device=v, device=k,
                                                microbatches=self.options.microbatches)
                              for k in range(len(self.devices))]
        terms = device_peak_terms(quantities, profile=self._profiles[d], gpu=self.layout.gpu[first], **self.rules)
        return MemoryBreakdown(**{k: float(v) for k, v in terms.items()})

    def device_fits(self, stage_of_op: Sequence[int]) -> bool:
        """Whether every device fits its stages of any op → stage assignment (chain order)."""
        for d, stages in enumerate(self.devices):
            cpu = not self.layout.gpu[stages[0]]
            quantities = [self.memory.quantities_of(stage_of_op, s, cpu=cpu) for s in stages]
            if self.device_breakdown(d, quantities).total_bytes > self.layout.capacity_bytes[stages[0]]:
                return False
        return True

    def allowed(self, s: int, i: np.ndarray, j: int) -> np.ndarray:
        ok = self.memory_bytes(s, i, j) <= self.layout.capacity_bytes[s]
        ok &= (self.other_pins[s][j] - self.other_pins[s][i]) == 0
        span = self.pin_span[s]
        if span is not None:
            ok &= (i <= span[0]) & (j > span[1])
        return ok


# --------------------------------------------------------------------------- exact DP over cut positions


def chain_dp(model: StageModel, candidates: Sequence[int],
             ranges: tuple[np.ndarray, np.ndarray] | None = None,
             upper_s: float | None = None) -> tuple[float, list[int]] | None:
    """The best split of the chain into len(layout) non-empty intervals whose ends lie in
    ``candidates`` (which include 0 and n): minimal bottleneck, then minimal traffic.

    f[s][j] = min over i of max(f[s − 1][i], time of stage s on [i, j)), O(S · |candidates|²),
    vectorized over i. With ``ranges`` (``stage_ranges``), stage s only starts where op k − 1
    can be on s − 1 and op k on s. With ``upper_s`` only splits whose bottleneck is at most
    ``upper_s`` are searched: a stage over it ends every split through it, so a stage is priced
    only on the starts whose work fits. Returns (bottleneck seconds, cut positions) or None if
    nothing fits (under ``upper_s``).

    The memory check (and pins) costs most per call, so the DP first runs without it: when every
    stage of that split fits, no split that fits can be faster, and it is the answer (the same
    bottleneck; among equal ones, the DP's choice may differ). Otherwise the DP runs again with
    the check on every stage.
    """
    c = np.array(sorted(set(candidates)))
    n = model.chain.n
    assert c[0] == 0 and c[-1] == n
    S = len(model.layout)
    starts = np.ones((S + 1, len(c)), dtype=bool)
    if ranges is not None:
        first, last = ranges
        inner = c[1:-1]
        for s in range(1, S):
            starts[s, 1:-1] = (first[inner] <= s) & (s <= last[inner]) \
                & (first[inner - 1] <= s - 1) & (s - 1 <= last[inner - 1])
    limit = math.inf if upper_s is None else upper_s * (1 + 1e-9) + 1e-15
    relaxed = _dp_pass(model, c, starts, limit, check=False)
    if relaxed is None:
        return None
    ends = [0, *relaxed[1], n]
    if all(model.allowed(s, np.array([ends[s]]), ends[s + 1])[0] for s in range(S)):
        return relaxed
    for gpu in set(model.layout.gpu):  # the stage memory of every candidate run, as a table
        model.memory.prepare(c, cpu=not gpu)
    return _dp_pass(model, c, starts, limit, check=True)


def _dp_pass(model: StageModel, c: np.ndarray, starts: np.ndarray, limit: float,
             check: bool) -> tuple[float, list[int]] | None:
    """``chain_dp`` over the sorted candidates ``c``: stage s starts only where ``starts[s]``,
    no stage above ``limit``; memory and pins checked when ``check``."""
    n, S = model.chain.n, len(model.layout)
    inf = math.inf
    best = np.full((S, len(c)), inf)
    traffic = np.full((S, len(c)), inf)
    back = np.full((S, len(c)), -1, dtype=np.int64)
    for s in range(S):
        ops_s = model.chain.time_s[model.layout.types[s]][c]  # the ops of [i, j) alone take t[j] − t[i]
        for jj in range(1, len(c)):
            j = int(c[jj])
            if (s == S - 1 and j != n) or (s < S - 1 and not starts[s + 1][jj]):
                continue
            if s == 0:
                ii = np.array([0])
            else:
                ii = np.arange(max(1, int(np.searchsorted(ops_s, ops_s[jj] - limit))), jj)
                ii = ii[np.isfinite(best[s - 1][ii]) & starts[s][ii]]
                if not len(ii):
                    continue
            i = c[ii]
            comm = model.traffic_s(s, i, j)
            stage = model.work_s(s, i, j) + comm
            if s == 0:
                value, moved = stage, comm
            else:
                value, moved = np.maximum(best[s - 1][ii], stage), traffic[s - 1][ii] + comm
            ok = value <= limit
            if check and ok.any():
                ok[ok] = model.allowed(s, i[ok], j)
            if not ok.any():
                continue
            ii, value, moved = ii[ok], value[ok], moved[ok]
            lowest = value.min()
            ties = np.nonzero(value <= lowest * (1 + 1e-9) + 1e-15)[0]
            k = ties[np.argmin(moved[ties])]
            best[s][jj], traffic[s][jj], back[s][jj] = value[k], moved[k], ii[k]
    if not np.isfinite(best[S - 1][-1]):
        return None
    cuts, jj = [], len(c) - 1
    for s in range(S - 1, 0, -1):
        jj = int(back[s][jj])
        cuts.append(int(c[jj]))
    return float(best[S - 1][-1]), sorted(cuts)


# --------------------------------------------------------------------------- stage ranges


def stage_ranges(model: StageModel, graph: OpGraph, bound_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The stages each op can take in any split whose bottleneck is at most ``bound_s``.

    An op on stage s has all its ancestors on stages 0..s and all its descendants on stages
    s..S − 1. Priced on the fastest device type per op, stage q holds at most share[q] · bound_s
    of work (``stage_shares``: 1 on identical devices), so (ancestors' work) ≤ Σ_{q ≤ s} share[q]
    · bound_s and (descendants' work) ≤ Σ_{q ≥ s} share[q] · bound_s. Traffic and memory only
    shrink the ranges further, so they hold for every split at or below the bound. Returns
    (first, last) stage per chain op; first > last where the op fits no stage.
    """
    S = len(model.layout)
    up, down = model.closure_work(graph)
    slack = 1 + 1e-9
    share = stage_shares(model, bound_s)
    # first: the fewest leading stages that hold the ancestors; last: likewise from the end.
    first = np.searchsorted(np.cumsum(share), up / (bound_s * slack), side="left").astype(np.int64)
    last = (S - 1 - np.searchsorted(np.cumsum(share[::-1]), down / (bound_s * slack), side="left")).astype(np.int64)
    return first, last


def stage_shares(model: StageModel, bound_s: float) -> np.ndarray:
    """Per stage, the most work its device runs in ``bound_s``, each op priced on the fastest
    device type (as ``closure_work`` prices it), as a share of ``bound_s``: 1 on a device type
    that is the fastest for every op, less on a slower one.

    A fractional knapsack: the stage fills its ``bound_s`` with the ops it is least slow at.
    E.g. gpt2-xl on H100s and CPUs: a launch-bound op takes 5 µs on both, a matmul a hundred
    times longer on the CPU, so in 20 ms a CPU stage holds about 0.2 ms of H100 work: 1% of an
    H100 stage, where counting it as a whole one widens every op's range by a stage. A stage also
    spends time on traffic and must fit its memory, which only lowers what it holds, so the share
    bounds every split.
    """
    chain, types = model.chain, model.layout.types
    if not 0 < bound_s < math.inf:
        return np.ones(len(types))
    own = {t: np.diff(chain.time_s[t]) for t in set(types)}
    fastest = np.min(np.stack(list(own.values())), axis=0)
    share = {}
    for t, work in own.items():
        if np.array_equal(work, fastest):
            share[t] = 1.0
            continue
        runs = work > 0  # an op free on this type is free on the fastest too
        ratio = fastest[runs] / work[runs]
        order = np.argsort(-ratio, kind="stable")
        spent, held = np.cumsum(work[runs][order]), np.cumsum(fastest[runs][order])
        whole = int(np.searchsorted(spent, bound_s, side="right"))  # ops that fit entirely
        value = float(held[whole - 1]) if whole else 0.0
        if whole < len(order):  # and a fraction of the next one
            value += (bound_s - (float(spent[whole - 1]) if whole else 0.0)) * float(ratio[order[whole]])
        share[t] = min(1.0, value / bound_s)
    return np.array([share[t] for t in types])


def _closure_work(before: Sequence[Sequence[int]], work: np.ndarray) -> np.ndarray:
    """Work of every op with all its ancestors, ops in topological order with their
    predecessors' indices. The ancestor sets are bitsets (Python ints); an op's set is its
    heaviest predecessor's plus the few ops the others add (the branches that rejoin)."""
    sets: list[int] = []
    totals = np.zeros(len(before))
    for k, preds in enumerate(before):
        if preds:
            base = max(preds, key=lambda p: (totals[p], p))
            bits, total = sets[base], float(totals[base])
        else:
            bits, total = 0, 0.0
        extra = 1 << k
        for p in preds:
            extra |= sets[p]
        extra &= ~bits
        bits |= extra
        while extra:
            low = extra & -extra
            total += work[low.bit_length() - 1]
            extra ^= low
        sets.append(bits)
        totals[k] = total
    return totals


# --------------------------------------------------------------------------- CP-SAT over the block DAG


@dataclass
class CpResult:
    assignment: list[int]
    """Stage of every block, in chain order."""
    bottleneck_s: float
    status: str
    bound_s: float
    wall_s: float


def cp_sat_blocks(model: StageModel, graph: OpGraph, hint: Sequence[int] | None,
                  options: SolverOptions, hint_s: float | None = None,
                  ranges: tuple[np.ndarray, np.ndarray] | None = None) -> CpResult | None:
    """Assign a stage to every block (any DAG split, not only chain intervals), minimizing the
    bottleneck (the slowest device: the sum of its stages' times where it runs several), then
    the traffic. Returns None when CP-SAT finds no feasible assignment.

    ``hint`` (a stage per block) with its bottleneck ``hint_s`` bounds the search from above; the
    lower bound of the problem bounds it from below. When CP-SAT proves the hint optimal, the
    hint is kept: it already has the least traffic among the chain splits of that bottleneck.
    ``ranges`` (``stage_ranges`` at ``hint_s``, per op) confine each block to the stages its ops
    can take in a split at least as good as the hint.
    """
    chain, layout = model.chain, model.layout
    S, B = len(layout), len(chain.block_names)
    bounds = chain.block_starts + [chain.n]
    block_of_op = np.zeros(chain.n, dtype=np.int64)
    for b in range(B):
        block_of_op[bounds[b]:bounds[b + 1]] = b
    position = {op: k for k, op in enumerate(chain.ops)}

    # Integer ticks: the total work of the slowest device type spread over ~10^6 ticks. Costs are
    # rounded down, so the model never prices a split above its true time and its bound holds.
    total = max(chain.time_s[t][-1] for t in set(layout.types))
    tick_s = max(total, 1e-12) / 1e6
    ticks = lambda seconds: int(round(seconds / tick_s))  # noqa: E731
    cost_ticks = lambda seconds: int(seconds / tick_s)  # noqa: E731

    if ranges is not None:
        first = [int(ranges[0][bounds[b]:bounds[b + 1]].max()) for b in range(B)]
        last = [int(ranges[1][bounds[b]:bounds[b + 1]].min()) for b in range(B)]
    else:
        first, last = [0] * B, [S - 1] * B
    if any(f > l for f, l in zip(first, last)):
        return None

    m = cp_model.CpModel()
    y = [[m.new_bool_var(f"y{b}_{s}") for s in range(S)] for b in range(B)]
    x = [m.new_int_var(first[b], last[b], f"x{b}") for b in range(B)]
    for b in range(B):
        m.add_exactly_one(y[b])
        m.add(x[b] == sum(s * y[b][s] for s in range(S)))
        for s in itertools.chain(range(first[b]), range(last[b] + 1, S)):
            m.add(y[b][s] == 0)
    for s in range(S):
        m.add(sum(y[b][s] for b in range(B)) >= 1)
        span = model.pin_span[s]
        if span is not None:
            for b in set(block_of_op[span[0]:span[1] + 1].tolist()):
                m.add(y[b][s] == 1)
    for b in range(B):
        pinned = {int(p) for p in chain.pins[bounds[b]:bounds[b + 1]] if p >= 0}
        if len(pinned) > 1:
            raise ConfigError(f"block {chain.block_names[b]} holds ops pinned to stages {sorted(pinned)}: "
                             "pin whole blocks (e.g. a layer) to one stage")

    # Tensors between blocks, grouped by (producer block, consumer blocks, weight): producer −1
    # stands for the model's inputs, which enter at stage 0.
    groups: dict[tuple[int, tuple[int, ...]], list[float]] = {}
    for producer, readers in chain_travellers(graph, chain).items():
        p_block = int(block_of_op[position[producer]]) if producer in position else -1
        # a returned value (read at position n) is priced up to the stage of the last block
        consumers = tuple(sorted({int(block_of_op[min(r, chain.n - 1)]) for r in readers} - {p_block}))
        if not consumers:
            continue
        entry = groups.setdefault((p_block, consumers), [0.0, 0])
        nbytes, tensors = link_load(graph.infos[producer], model.gradient(producer))
        entry[0] += nbytes
        entry[1] += tensors
    for u, v in blocks_dag_edges(chain, graph, block_of_op):
        m.add(x[u] <= x[v])

    stage_terms: list[list[Any]] = [[] for _ in range(S)]
    comm_terms: list[Any] = []
    hint_ticks = [0] * S  # the hint's stage times as this model prices them
    for (p, consumers), (nbytes, count) in groups.items():
        for hop in range(S - 1):
            seconds = model.hop_s(nbytes, hop, count)
            cost = cost_ticks(seconds)
            if hint is not None and (0 if p < 0 else hint[p]) <= hop < max(hint[c] for c in consumers):
                hint_ticks[hop] += cost
                hint_ticks[hop + 1] += cost
            if cost == 0 or (p >= 0 and first[p] > hop) or all(last[c] <= hop for c in consumers):
                continue  # free, or it cannot cross this hop
            cross = m.new_bool_var("")
            beyond = m.new_bool_var("")
            for c in consumers:
                for s in range(max(hop + 1, first[c]), last[c] + 1):
                    m.add_implication(y[c][s], beyond)
            up_to = 1 if p < 0 else sum(y[p][s] for s in range(hop + 1))
            m.add(cross >= up_to + beyond - 1)
            stage_terms[hop].append(cost * cross)
            stage_terms[hop + 1].append(cost * cross)
            comm_terms.append(cost * cross)

    # A weight read in several blocks lives with its first reader and goes once per step to each
    # other device that reads it (as `evaluate` prices it), over the cheapest link: a lower bound.
    # With one stage per device a device is a stage; interleaved, a device's stages share it.
    devices = model.devices
    D = len(devices)
    device_of = {s: d for d, stages in enumerate(devices) for s in stages}
    pairs = [(a[0], b[0]) for a in devices for b in devices if a != b]
    link_s_per_byte = min((1 / model.cluster_link(a, b).bandwidth_bytes_per_s for a, b in pairs), default=0.0)
    link_latency_s = min((model.cluster_link(a, b).latency_s for a, b in pairs), default=0.0)

    def on(b: int, stages: Sequence[int]) -> Any:
        """1 when block b runs on one of ``stages`` (a device's), else 0."""
        return sum(y[b][s] for s in stages)

    for use in weight_readers(graph, chain, chain.weights).values():
        owner = int(block_of_op[use.readers[0]])
        others = sorted({int(block_of_op[r]) for r in use.readers} - {owner})
        if not others or D == 1:
            continue
        directions = 2 if use.gradient and model.directions == 2 else 1
        cost = cost_ticks(directions * (use.nbytes * link_s_per_byte + link_latency_s) / options.microbatches)
        if cost == 0:
            continue
        away = []
        for stages in devices:  # the device reads the weight, and does not own it
            d = m.new_bool_var("")
            for r in others:
                m.add(d >= on(r, stages) - on(owner, stages))
            away.append(d)
            stage_terms[stages[0]].append(cost * d)
            comm_terms.append(cost * d)
        for stages in devices:  # the owner sends it to each of them
            e = m.new_int_var(0, D - 1, "")
            m.add(e >= sum(away) - (D - 1) * (1 - on(owner, stages)))
            stage_terms[stages[0]].append(cost * e)
        if hint is not None:
            readers_at = {device_of[hint[r]] for r in others} - {device_of[hint[owner]]}
            for d in readers_at:
                hint_ticks[devices[d][0]] += cost
            hint_ticks[devices[device_of[hint[owner]]][0]] += cost * len(readers_at)

    # A stage rebuilds each group of replicated values that one of its ops needs.
    for g, needers in enumerate(chain.rebuild_needers):
        needing = sorted({int(block_of_op[k]) for k in needers.tolist()})
        for s in range(S):
            cost = cost_ticks(chain.rebuild_time_s[layout.types[s]][g])
            here = [b for b in needing if first[b] <= s <= last[b]]
            if cost == 0 or not here:
                continue
            rebuilds = m.new_bool_var("")
            for b in here:
                m.add_implication(y[b][s], rebuilds)
            stage_terms[s].append(cost * rebuilds)
            if hint is not None and any(hint[b] == s for b in here):
                hint_ticks[s] += cost

    block_ticks = []
    for s in range(S):
        t = chain.time_s[layout.types[s]]
        block_ticks.append([cost_ticks(t[bounds[b + 1]] - t[bounds[b]]) for b in range(B)])
        if hint is not None:
            hint_ticks[s] += sum(block_ticks[s][b] for b in range(B) if hint[b] == s)
    slack = 2 * (B + len(groups) + len(chain.rebuild_needers)) + 10  # rounding of every term to whole ticks
    lowest = max(0, ticks(lower_bound_s(model)) - slack)
    hint_device_ticks = max(sum(hint_ticks[s] for s in stages) for stages in model.devices)
    highest = max(ticks(hint_s), hint_device_ticks) + slack if hint_s is not None else ticks(total) * 4 + 10**6
    bottleneck = m.new_int_var(lowest, max(highest, lowest), "bottleneck")
    for stages in model.devices:  # a device's time: its stage's, or the sum of its stages' (interleaved)
        m.add(bottleneck >= sum(block_ticks[s][b] * y[b][s] for s in stages for b in range(B))
              + sum(term for s in stages for term in stage_terms[s]))
    _memory_constraints(m, model, y, bounds, block_of_op, first, last)
    if hint is not None:
        for b in range(B):
            for s in range(S):
                m.add_hint(y[b][s], hint[b] == s)
    m.minimize(bottleneck)

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = options.workers
    solver.parameters.interleave_search = True
    solver.parameters.random_seed = options.seed
    solver.parameters.max_deterministic_time = options.time_limit_s
    solver.parameters.max_time_in_seconds = options.time_limit_s * 20  # a safety net: the deterministic limit decides
    start = time.perf_counter()
    status = solver.solve(m)
    logger.debug("cp-sat: %d blocks, %s in %.2f s", B, solver.status_name(status), solver.wall_time)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    best, bound, proven = solver.objective_value, solver.best_objective_bound, status == cp_model.OPTIMAL
    if proven and hint is not None and hint_s is not None and best >= hint_device_ticks:
        return CpResult(list(hint), hint_s, "OPTIMAL", min(bound * tick_s, hint_s), time.perf_counter() - start)
    # Second phase: the same bottleneck, least traffic.
    m.add(bottleneck <= int(round(best)))
    m.clear_hints()
    for b in range(B):
        for s in range(S):
            m.add_hint(y[b][s], bool(solver.value(y[b][s])))
    first = [[bool(solver.value(y[b][s])) for s in range(S)] for b in range(B)]
    if comm_terms:  # a polish: a quarter of the time
        m.minimize(sum(comm_terms))
        solver.parameters.max_deterministic_time = options.time_limit_s / 4
        solver.parameters.max_time_in_seconds = options.time_limit_s * 5
        status2 = solver.solve(m)
    else:
        status2 = cp_model.UNKNOWN
    chosen = ([[bool(solver.value(y[b][s])) for s in range(S)] for b in range(B)]
              if status2 in (cp_model.OPTIMAL, cp_model.FEASIBLE) else first)
    assignment = [row.index(True) for row in chosen]
    return CpResult(assignment, best * tick_s, "OPTIMAL" if proven else "FEASIBLE", bound * tick_s,
                    time.perf_counter() - start)


MEMORY_UNITS_PER_BYTE = 20
"""CP-SAT prices memory in 1/20 bytes, so that the GPU's 5% fragmentation allowance is integral."""


def _memory_constraints(m: cp_model.CpModel, model: StageModel, y: list[list[Any]], bounds: Sequence[int],
                        block_of_op: np.ndarray, first: Sequence[int], last: Sequence[int]) -> None:
    """A relaxation of every stage's memory (``OpsMemory``, ``peak_terms``) as linear constraints
    on the block → stage booleans ``y``, in 1/20 bytes: no split that fits is cut off, so
    CP-SAT's bound stays a bound, and every split it returns is priced again with the exact model
    (``_fits_memory``) before it is used.

    Parameters and saved tensors add up over the stage's blocks, exactly: a tensor saved in one
    block is that block's; one saved in several gets a boolean per stage, true when any of them
    is on it, so it counts once. Training holds the saved tensors of every in-flight microbatch
    (the microbatch being run adds its gradients and temporaries: at least 0); inference holds
    at least, at each op, its inputs, its output and its temporaries (``OpsMemory.floor_bytes``).
    """
    memory, layout, rules = model.memory, model.layout, model.rules
    S, B = len(layout), len(bounds) - 1
    train = rules["mode"] == "train"
    unit = MEMORY_UNITS_PER_BYTE
    params = [float(memory.params(bounds[b], bounds[b + 1])) for b in range(B)]
    own = [0.0] * B
    shared: dict[tuple[int, ...], float] = {}
    for tensor in memory.tensors if train else ():
        if not tensor.savers:
            continue
        held = tuple(sorted({int(block_of_op[k]) for k in tensor.savers}))
        if len(held) == 1:
            own[held[0]] += tensor.nbytes
        else:
            shared[held] = shared.get(held, 0.0) + tensor.nbytes
    beyond = [0.0 if train else float(memory.floor_bytes(bounds[b], bounds[b + 1])) for b in range(B)]
    for s in range(S):
        here = [b for b in range(B) if first[b] <= s <= last[b]]
        if not here:
            continue
        placeable = set(here)
        gpu = layout.gpu[s]
        frag = FRAGMENTATION if gpu else 0.0
        scale = 1 + frag
        capacity = int(math.floor((layout.capacity_bytes[s] - (GPU_CONTEXT_BYTES if gpu else 0.0)) * unit))
        saved = [math.ceil(own[b]) * y[b][s] for b in here]
        for held, nbytes in shared.items():
            on = [b for b in held if b in placeable]
            if on:
                u = m.new_bool_var("")
                for b in on:
                    m.add_implication(y[b][s], u)
                saved.append(math.ceil(nbytes) * u)
        top = max((beyond[b] for b in here), default=0.0)
        run = m.new_int_var(0, int(math.ceil(top)), "")
        for b in here:
            if beyond[b] > 0:
                m.add(run >= int(math.ceil(beyond[b])) * y[b][s])
        f = model.in_flight[s]
        if train:
            p = TRAINING_PRECISIONS[rules["precision"]]
            states = OPTIMIZER_STATES[rules["optimizer"].lower()]
            held, sharded = data_parallel_factors(rules["data_parallel"])
            state_per_param = ((p.weight_bytes + p.grad_bytes) * held
                               + (p.master_bytes + states * p.state_bytes) * sharded)
            step_per_param = p.state_bytes * OPTIMIZER_STEP_TEMPORARIES * sharded if states else 0.0
            # a microbatch: state and in-flight activations live (with fragmentation)
            m.add(sum(math.ceil(params[b] * scale * state_per_param * unit) * y[b][s] for b in here)
                  + round(scale * f * unit) * sum(saved) + unit * run <= capacity)
            # the optimizer step: activations freed (but their fragmentation), its temporaries live
            m.add(sum(math.ceil(params[b] * (scale * state_per_param + step_per_param) * unit) * y[b][s] for b in here)
                  + round(frag * f * unit) * sum(saved) <= capacity)
        else:
            per_param = weight_bytes(1, rules["weight_dtype"])
            m.add(sum(math.ceil(params[b] * scale * per_param * unit) * y[b][s] for b in here)
                  + round(scale * unit) * run <= capacity)


def _fits_memory(model: StageModel, stage_of_op: Sequence[int]) -> bool:
    """Whether every device fits its stages of an op → stage assignment (the exact model)."""
    return model.device_fits(stage_of_op)


# --------------------------------------------------------------------------- evaluating an assignment


def travelling_readers(graph: OpGraph, ops: Sequence[str], replicated: Mapping[str, tuple[str, ...]]
                       ) -> dict[str, list[int]]:
    """Chain positions reading every value that travels along the pipeline: activations and
    model inputs. A value rebuilt from the inputs counts as read of those inputs; weights do
    not travel (see `weight_readers`). A value the model returns is read at position
    ``len(ops)`` (``RETURNED``): it travels to the last stage, where the outputs are gathered."""
    position = {op: k for k, op in enumerate(ops)}
    position.update({op: len(ops) for op in graph.order if graph[op]["kind"] == OUTPUT})
    readers: dict[str, list[int]] = {}
    for v in position:
        for u in graph.dag.predecessors(v):
            if graph.infos[u].op == "get_attr" or not graph.dag.edges[u, v]["tensors"]:
                continue  # a weight, or an edge that only orders accesses to a written buffer
            for source in replicated.get(u, (u,)):
                readers.setdefault(source, []).append(position[v])
    return {u: r for u, r in readers.items() if u not in replicated}


def chain_travellers(graph: OpGraph, chain: Chain) -> dict[str, list[int]]:
    """``travelling_readers`` of the chain's ops, computed once per chain and graph."""
    cached = chain.__dict__.get("_travellers")
    if cached is None or cached[0] is not graph:
        cached = (graph, travelling_readers(graph, chain.ops, chain.replicated))
        chain.__dict__["_travellers"] = cached
    return cached[1]


def _travel_arrays(model: StageModel, graph: OpGraph) -> tuple[np.ndarray, ...]:
    """The travelling values as arrays (computed once per chain and graph): producer position
    (−1 for a model input), their readers' positions back to back with each value's first index,
    and the bytes and transfers each puts on a link (``link_load``)."""
    chain = model.chain
    cached = chain.__dict__.get("_travel_arrays")
    if cached is None or cached[0] is not graph or cached[1] != model.directions:
        position = {op: k for k, op in enumerate(chain.ops)}
        travellers = chain_travellers(graph, chain)
        producer = np.array([position.get(p, -1) for p in travellers], dtype=np.int64)
        readers = np.array([r for rs in travellers.values() for r in rs], dtype=np.int64)
        starts = np.cumsum([0] + [len(rs) for rs in travellers.values()])[:-1].astype(np.int64)
        loads = np.array([link_load(graph.infos[p], model.gradient(p)) for p in travellers], dtype=float).reshape(-1, 2)
        cached = (graph, model.directions, producer, readers, starts, loads[:, 0], loads[:, 1])
        chain.__dict__["_travel_arrays"] = cached
    return cached[2:]


def blocks_dag_edges(chain: Chain, graph: OpGraph, block_of_op: np.ndarray) -> set[tuple[int, int]]:
    """Precedence between blocks: every op-level edge between two different blocks."""
    position = {op: k for k, op in enumerate(chain.ops)}
    edges = set()
    for u, v in graph.dag.edges:
        if u in position and v in position:
            a, b = int(block_of_op[position[u]]), int(block_of_op[position[v]])
            if a != b:
                edges.add((a, b))
    return edges


@dataclass(frozen=True)
class WeightUse:
    """A parameter or buffer and the chain positions of the ops that compute with it."""

    nbytes: float
    gradient: bool
    """A trainable floating-point parameter: its gradient goes back to where it is stored."""
    readers: tuple[int, ...]


def weight_readers(graph: OpGraph, chain: Chain, weights: Mapping[str, Any]) -> dict[str, WeightUse]:
    """Every parameter and buffer (canonical name) read by the chain's ops, with the positions of
    the ops that compute with it: a module's call (``call_module``) or an op taking the tensor
    from a ``get_attr`` node. ``weights`` maps names to ``TensorInfo`` (nbytes, dtype,
    requires_grad). It is stored on the first stage that reads it (``weight_homes``) and sent
    from there once per call to every other stage that reads it, as the rewriter does."""
    cached = chain.__dict__.get("_weight_readers")
    if cached is not None and cached[0] is graph:
        return cached[1]
    found: dict[str, list[int]] = {}
    for k, op in enumerate(chain.ops):
        if graph.infos[op].op != "get_attr":
            for name in graph.infos[op].reads:
                found.setdefault(name, []).append(k)
    uses = {}
    for name, readers in found.items():
        info = weights.get(name)
        nbytes = info.nbytes if info is not None else 0
        gradient = info is not None and info.requires_grad and info.dtype.is_floating_point
        uses[name] = WeightUse(float(nbytes), gradient, tuple(sorted(set(readers))))
    chain.__dict__["_weight_readers"] = (graph, uses)
    return uses


def weight_homes(uses: Mapping[str, WeightUse], stage_of_op: Sequence[int]) -> dict[str, int]:
    """The stage storing each weight: the first (lowest) stage that reads it."""
    return {name: min(stage_of_op[r] for r in use.readers) for name, use in uses.items()}


def evaluate(model: StageModel, graph: OpGraph, stage_of_op: Sequence[int]) -> tuple[list[float], list[float], list[float]]:
    """Compute, incoming and outgoing traffic seconds per stage of any op → stage assignment
    (chain order): every value travels from its producer's stage to its last reader's, hop by hop."""
    chain, layout = model.chain, model.layout
    S = len(layout)
    stage = np.asarray(stage_of_op, dtype=np.int64)
    compute = [float(np.diff(chain.time_s[layout.types[s]])[stage == s].sum()) for s in range(S)]
    for g, needers in enumerate(chain.rebuild_needers):  # each stage rebuilds the values its ops need
        for s in np.unique(stage[needers]).tolist():
            compute[s] += float(chain.rebuild_time_s[layout.types[s]][g])
    comm_in, comm_out = [0.0] * S, [0.0] * S
    _, _, _, nbytes, tensors = _travel_arrays(model, graph)
    for hop, crossing in enumerate(_crossings(model, graph, stage)):
        seconds = float(model.hop_s(nbytes[crossing], hop, tensors[crossing]).sum())
        comm_out[hop] += seconds
        comm_in[hop + 1] += seconds
    # A weight read on several stages lives on the first and goes straight to each other reader
    # once per call, reused by every microbatch (its gradient comes back once): amortized. Held as
    # copies, the readers all-reduce its gradient once per step instead, each paying the collective.
    m = model.options.microbatches
    for use, owner, others in _weight_sends(model, graph, stage):
        if model.options.shared_weights == "copies":
            if use.gradient and model.directions == 2:
                group = [model.layout.ranks[s] for s in [owner, *others]]
                seconds = float(all_reduce_s(model.cluster, group, use.nbytes)) / m
                for s in [owner, *others]:
                    comm_out[s] += seconds
            continue
        directions = 2 if use.gradient and model.directions == 2 else 1
        for other in others:
            link = model.cluster_link(owner, other)
            seconds = directions * (use.nbytes / link.bandwidth_bytes_per_s + link.latency_s) / m
            comm_out[owner] += seconds
            comm_in[other] += seconds
    return compute, comm_in, comm_out


def _crossings(model: StageModel, graph: OpGraph, stage: np.ndarray) -> list[np.ndarray]:
    """Per hop, which travelling values cross it (``_travel_arrays`` order): produced on the hop's
    stage or before, read after it (returned values are read on the last stage)."""
    S = len(model.layout)
    producer, readers, starts, _, _ = _travel_arrays(model, graph)
    if not len(producer):
        return [np.zeros(0, dtype=bool)] * (S - 1)
    at = np.append(stage, S - 1)  # position n: the outputs, gathered on the last stage
    first = np.where(producer >= 0, at[np.maximum(producer, 0)], 0)
    last = np.maximum.reduceat(at[readers], starts)
    return [(first <= hop) & (last > hop) for hop in range(S - 1)]


def _weight_sends(model: StageModel, graph: OpGraph, stage: np.ndarray) -> list[tuple[WeightUse, int, list[int]]]:
    """Each weight read on several stages, its home stage and the other stages it is sent to.
    With several stages per device (interleaved schedules) a device holds the weight once: it
    goes to the first stage reading it on each other device, none on the home's device."""
    sends = []
    ranks = model.layout.ranks
    for use in weight_readers(graph, model.chain, model.weights).values():
        on = sorted(set(stage[list(use.readers)].tolist()))
        first_on_device = {}
        for s in on:
            first_on_device.setdefault(ranks[s], s)
        others = [s for s in first_on_device.values() if ranks[s] != ranks[on[0]]]
        if others:
            sends.append((use, on[0], others))
    return sends


def transfers_per_call(model: StageModel, graph: OpGraph, stage_of_op: Sequence[int]) -> list[int]:
    """Values each stage receives per call in the forward pass, as the runtime moves them: every
    travelling value once per microbatch over each hop it crosses (relayed stage by stage), and
    every weight once per call from its home to each other stage that reads it (none when the
    stages hold copies: ``SolverOptions.shared_weights``)."""
    stage = np.asarray(stage_of_op, dtype=np.int64)
    received = [0] * len(model.layout)
    for hop, crossing in enumerate(_crossings(model, graph, stage)):
        received[hop + 1] += int(crossing.sum()) * model.options.microbatches
    for _, _, others in _weight_sends(model, graph, stage) if model.options.shared_weights == "sent" else ():
        for other in others:
            received[other] += 1
    return received


def assignment_from_cuts(n: int, cuts: Sequence[int]) -> list[int]:
    """The stage of each of ``n`` chain positions, given the positions where stages start."""
    stages, s, bounds = [], 0, list(cuts) + [n]
    for k in range(n):
        while k >= bounds[s]:
            s += 1
        stages.append(s)
    return stages


def _cut_positions(first: np.ndarray, last: np.ndarray, stages: int) -> np.ndarray:
    """Positions k where some stage s can start, given each op's stage range: op k − 1 can be on
    s − 1 and op k on s, for some 1 ≤ s ≤ stages − 1."""
    low = np.maximum(first[1:], first[:-1] + 1)
    high = np.minimum(last[1:], last[:-1] + 1)
    ok = (low <= high) & (high >= 1) & (low <= stages - 1)
    return np.nonzero(ok)[0] + 1


# --------------------------------------------------------------------------- solve

OPS_CHOICES_PER_S = 12_000
"""Op-stage choices (each op that may move × the stages it may take) the op-level CP-SAT frees
per second of ``OPS_TIME_S``; beyond, only the ops within ``WINDOW_OPS`` of a cut.
Measured on gpt2-xl: 4,398 choices (8 stages) proven optimal in 0.5 s; 11,649 (16 stages) ran
out of the 0.5 s before even keeping its warm start, where the window improved the plan by 1%."""
WINDOW_OPS = 10
"""Ops on each side of a cut that may move when there are too many choices."""
OPS_TIME_S = 0.5
"""Deterministic time limit of the op-level CP-SAT (at most the solver's own limit)."""
OPS_GAP = 0.01
"""Above this distance to the bound (relative) the op-level CP-SAT runs."""


def solve(graph: OpGraph, cluster: Cluster, options: SolverOptions | None = None, *,
          costs: Mapping[str, OpCost], parameters: Mapping[str, Any], buffers: Mapping[str, Any] | None = None,
          cost_model: AnalyticCostModel | None = None) -> Plan:
    """Split ``graph`` into pipeline stages over ``cluster`` (see the module docstring).

    Args:
        graph: the op-level graph (``OpGraph.from_traced``), traced at the microbatch size.
        cluster: the devices, in the order of the cluster description.
        options: stage count, schedule, memory and solver settings.
        costs: ``cost_models.price_graph`` of the graph's module.
        parameters: ``Traced.parameters`` (canonical name → shape, dtype).
        buffers: ``Traced.buffers``: a buffer read on several stages is sent like a weight.
        cost_model: turns costs into seconds per device type; default: the analytic roofline.

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
        from autosplit import interleaved as looped  # it builds on this module

        looped.check(cluster, stages, options)
        chosen = looped.choose_order(chain, graph, cluster, stages, options, block_cuts)
        if chosen is None:
            raise looped.infeasible(chain, graph, cluster, stages, options)
    else:
        chosen = choose_order(chain, cluster, stages, options, block_cuts)
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
                                    f"({min(options.time_limit_s, OPS_TIME_S):g} s) without a proof")
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


def _refine_ops(model: StageModel, graph: OpGraph, assignment: Sequence[int], bottleneck: float,
                options: SolverOptions, notes: list[str] | None = None) -> tuple[CpResult, list[int], bool] | None:
    """CP-SAT with every op that could move in a split better than ``assignment`` (see
    ``stage_ranges``) as a block of its own, the others fixed, hinted and bounded by
    ``assignment``. Returns the result, its split per op, and whether every such op was free (then
    an OPTIMAL status proves the split optimal over all op-level splits on this device order).
    Appends to ``notes`` why it returns None or leaves ops fixed."""
    notes = notes if notes is not None else []
    chain = model.chain
    n = chain.n
    first, last = stage_ranges(model, graph, bottleneck)
    stage = np.asarray(assignment)
    if np.any(stage < first) or np.any(stage > last):  # priced differently from the ranges
        notes.append("op-level CP-SAT skipped: the plan lies outside the stage ranges of its own bottleneck")
        return None
    free = last > first
    choices = int((last - first + 1)[free].sum())
    most = OPS_CHOICES_PER_S * OPS_TIME_S
    complete = choices <= most
    if not complete:  # too many: the ops around the cuts
        notes.append(f"op-level CP-SAT moved only ops within {WINDOW_OPS} of a cut: {int(free.sum())} could move "
                     f"with {choices} op-stage choices, more than the {most:.0f} it takes in {OPS_TIME_S:g} s")
        near = np.zeros(n, dtype=bool)
        for cut in np.nonzero(np.diff(stage))[0] + 1:
            near[max(0, cut - WINDOW_OPS):cut + WINDOW_OPS + 1] = True
        free &= near
    low, high = np.where(free, first, stage), np.where(free, last, stage)
    starts = [k for k in range(n) if k == 0 or (k not in chain.forbidden and (
        free[k] or free[k - 1] or low[k] != low[k - 1] or high[k] != high[k - 1]))]
    fine = dataclasses.replace(chain, block_starts=starts, block_names=[chain.ops[k] for k in starts])
    single = StageModel(fine, model.layout, options, model.cluster)
    limited = dataclasses.replace(options, time_limit_s=min(options.time_limit_s, OPS_TIME_S))
    found = cp_sat_blocks(single, graph, [assignment[k] for k in starts], limited, bottleneck, ranges=(low, high))
    if found is None:
        notes.append(f"op-level CP-SAT found no split within its time limit ({limited.time_limit_s:g} s)")
        return None
    bounds = starts + [n]
    per_op = [found.assignment[b] for b in range(len(starts)) for _ in range(bounds[b + 1] - bounds[b])]
    return found, per_op, complete


def _bottleneck(model: StageModel, graph: OpGraph, assignment: Sequence[int]) -> float:
    """The slowest device's time per microbatch: the sum of its stages' (one, but interleaved)."""
    compute, comm_in, comm_out = evaluate(model, graph, assignment)
    stage_s = [c + i + o for c, i, o in zip(compute, comm_in, comm_out)]
    return max(sum(stage_s[s] for s in stages) for stages in model.devices)


def lower_bound_s(model: StageModel) -> float:
    """max(total work ÷ combined speed of the stages' devices, heaviest op on the fastest device).
    A device that runs several stages (interleaved) counts once: the bound is on its time."""
    chain, layout = model.chain, model.layout
    kinds = dict(zip(layout.ranks, layout.types))  # one entry per device
    work = [chain.time_s[t][-1] for t in kinds.values()]
    combined = 1 / sum(1 / w for w in work) if all(w > 0 for w in work) else 0.0
    per_op = np.min(np.stack([np.diff(chain.time_s[t]) for t in set(layout.types)]), axis=0)
    return max(combined, float(per_op.max()) if len(per_op) else 0.0)


def traffic_bound_s(model: StageModel, graph: OpGraph, incumbent_s: float, *,
                    notes: list[str] | None = None) -> float:
    """A lower bound on the bottleneck that adds the traffic every split must send, given a split
    of bottleneck ``incumbent_s``: on identical devices, min(incumbent, (work + 2 · Σ_k least
    traffic over cut k) ÷ D) for D devices. The stages' times add up to the work plus each cut's
    traffic twice (sent by one stage, received by the next), and the slowest device is at least
    their mean (with one stage per device, D = S; interleaved, each device sums its stages,
    each of which is then at most the incumbent, so the ranges below hold too).

    The least traffic over cut k is a minimum cut (OR-Tools max flow): among the ideals of the op
    DAG (all of an op's ancestors with it) that put every op on its side of cut k as
    ``stage_ranges`` allows for any split at most ``incumbent_s``, the one whose crossing values
    cost least on hop k.
    Splits above the incumbent are bounded by the incumbent itself. Memory is ignored, so the
    bound holds for every split; mixed devices get the work bound (``lower_bound_s``). Where the
    max flow fails, the work bound is returned and ``notes`` says why.
    """
    chain, layout = model.chain, model.layout
    S = len(layout)
    plain = lower_bound_s(model)
    tick_s = incumbent_s / 1e9
    if S == 1 or len(set(layout.types)) > 1 or not np.isfinite(incumbent_s):
        return plain
    first, last = stage_ranges(model, graph, incumbent_s)
    if np.any(first > last):
        return incumbent_s  # nothing fits below the incumbent: it is optimal
    position = {op: k for k, op in enumerate(chain.ops)}
    producer, flat_readers, starts, nbytes, tensors = _travel_arrays(model, graph)
    readers = [sorted(set(r)) for r in chain_travellers(graph, chain).values()]
    first, last = np.append(first, S - 1), np.append(last, S - 1)  # position n: the returned values
    inputs = producer < 0
    # Producers of model inputs sit on stage 0 and never move.
    p_first = np.where(inputs, 0, first[np.maximum(producer, 0)])
    p_last = np.where(inputs, 0, last[np.maximum(producer, 0)])
    r_first = np.maximum.reduceat(first[flat_readers], starts)  # the reader that can start latest
    r_last = np.maximum.reduceat(last[flat_readers], starts)
    # A weight sends nothing along the pipeline and needs nothing before it: it can always sit
    # on the early side of a cut, so it is left out of the cuts.
    weight = np.array([graph.infos[op].op == "get_attr" for op in chain.ops] + [False], dtype=bool)
    pairs = [(position[a], position[b]) for a, b in graph.dag.edges if a in position and b in position]
    u = np.array([a for a, _ in pairs], dtype=np.int64)
    v = np.array([b for _, b in pairs], dtype=np.int64)
    least = 0.0
    for hop in range(S - 1):
        seconds = model.hop_s(nbytes, hop, tensors)
        # Always crossing: produced surely before the cut, read surely after it.
        least += float(seconds[(p_last <= hop) & (r_first > hop)].sum())
        free = (first <= hop) & (last > hop) & ~weight
        node = lambda k: k + 2 if free[k] else (0 if last[k] <= hop or weight[k] else 1)  # noqa: E731
        arcs: list[tuple[int, int, int]] = []  # capacity −1: infinite
        touching = free[u] | free[v]
        for a, b in zip(u[touching].tolist(), v[touching].tolist()):
            x, y = node(a), node(b)
            if x != y and x != 0 and y != 1:
                arcs.append((y, x, -1))  # b inside needs a inside
        maybe = np.nonzero((p_first <= hop) & (r_last > hop) & ~((p_last <= hop) & (r_first > hop)))[0]
        for relay, index in enumerate(maybe.tolist(), start=chain.n + 2):
            arcs.append((0 if producer[index] < 0 else node(int(producer[index])), relay,
                         int(seconds[index] / tick_s)))  # rounded down: the bound stays a bound
            arcs.extend((relay, r, -1) for r in {node(r) for r in readers[index]} - {0})
        flow = max_flow.SimpleMaxFlow()
        infinite = sum(c for _, _, c in arcs if c > 0) + 1
        for a, b, c in arcs:
            flow.add_arc_with_capacity(a, b, c if c >= 0 else infinite)
        solved = flow.solve(0, 1)
        if solved != flow.OPTIMAL or flow.optimal_flow() >= infinite:
            why = (f"max flow status {solved}" if solved != flow.OPTIMAL else
                   "the stage ranges contradict each other")  # not a valid incumbent
            if notes is not None:
                notes.append(f"the traffic bound fell back to the work bound: {why} on hop {hop}")
            return plain
        least += flow.optimal_flow() * tick_s
    work = chain.time_s[layout.types[0]][-1]
    return max(plain, min(incumbent_s, (work + 2 * least) / len(set(layout.ranks))))


def _plan(graph: OpGraph, chain: Chain, model: StageModel, cluster: Cluster, options: SolverOptions,
          assignment: list[int], costs: Mapping[str, OpCost], status: str, proven_s: float, bound: float,
          method: str, wall_s: float, notes: Sequence[str] = (), unproven: Sequence[str] = ()) -> Plan:
    """The Plan of ``assignment`` on ``cluster`` (every replica's devices). ``notes`` are shown
    always, ``unproven`` (why the search may have missed a better split) only when the plan does
    not meet its bound."""
    layout = model.layout
    S = len(layout)
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
    order = {name: k for k, name in enumerate(graph.infos)}
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
        nodes = sorted(nodes, key=order.__getitem__)
        if s == 0:
            nodes = [n for n in graph.order if graph[n]["kind"] == INPUT] + nodes
        if s == S - 1:
            nodes = nodes + [n for n in graph.order if graph[n]["kind"] == OUTPUT]
        owned = int(sum(params[k] for k, st in enumerate(assignment) if st == s))
        quantities = model.memory.quantities_of(assignment, s, cpu=not layout.gpu[s])
        memory = peak_breakdown(quantities, in_flight=model.in_flight[s], gpu=layout.gpu[s], **model.rules)
        modules = [graph.infos[n].module_path for n in sorted(stage_ops[s], key=order.__getitem__)
                   if graph.infos[n].module_path and graph.infos[n].op.startswith("call_")]
        stage_list.append(Stage(
            index=s,
            devices=(f"{layout.types[s]}:{layout.ranks[s]}",),
            nodes=tuple(nodes),
            modules=(modules[0], modules[-1]) if modules else ("", ""),
            param_count=owned,
            compute_s=compute[s],
            comm_in_s=comm_in[s],
            comm_out_s=comm_out[s],
            memory=memory,
            memory_capacity_bytes=layout.capacity_bytes[s],
            weights=tuple(stored[s]),
            transfers_in=received[s],
            saved_bytes_per_microbatch=quantities["activations"],
            weight_copies=int(quantities["copies"]),
            transient_bytes=quantities["transient"],
            device_kind="gpu" if layout.gpu[s] else "cpu",
            data_parallel_s=data_parallel_s(cluster, options, layout.ranks[s], replica_size,
                                            quantities["params"] + quantities["copies"]),
        ))
    m = options.microbatches
    bottleneck, step, bubble = pipeline_times([st.time_s for st in stage_list], layout.ranks, m)
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


def _infeasible(chain: Chain, cluster: Cluster, stages: int, options: SolverOptions) -> InfeasibleError:
    """Why no split fits, from the constraint that binds, and remedies checked against the same
    memory model (``OpsMemory``): each is tried by filling the stages greedily from the front,
    which finds a split of a chain whenever one fits (a stage's memory only grows as it takes
    more ops), so a remedy is named only if it would actually fit."""
    gib = 2**30
    layout = Layout.of(cluster, range(stages), options.memory_headroom)
    model = StageModel(chain, layout, options, cluster)
    cuts = [k for k in range(chain.n + 1) if k not in chain.forbidden]
    device = layout.types[0] if len(set(layout.types)) == 1 else "devices"
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
    q = model.memory.quantities(i, unit_end, cpu=not layout.gpu[s])
    m = peak_breakdown(q, in_flight=model.in_flight[s], gpu=layout.gpu[s], **model.rules)
    capacity = layout.capacity_bytes[s]
    ops = chain.ops[i:unit_end]
    paths = [_block_of(chain, i), _block_of(chain, unit_end - 1)]
    where = paths[0] + (f" … {paths[-1]}" if paths[-1] != paths[0] else "")
    state_gib = (m.weights_bytes + m.grads_bytes + m.optimizer_bytes) / gib
    if fill.unit_too_big:
        reason = (f"stage {s} ({layout.types[s]}:{layout.ranks[s]}) must hold at least the ops no cut can separate "
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


@dataclass
class _Fill:
    stage: int | None
    """The stage that cannot take the next op (None: all ops placed)."""
    position: int
    unit_too_big: bool
    """Whether that stage cannot take even the next indivisible run of ops on its own."""


def _fill(model: StageModel, cuts: Sequence[int]) -> _Fill:
    """Fill the stages from the front, each as far as its memory allows (pins ignored)."""
    n, S = model.chain.n, len(model.layout)
    cuts_arr = np.array(cuts)
    i = 0
    for s in range(S):
        later = cuts_arr[cuts_arr > i]
        fits = lambda k: model.memory_bytes(s, np.array([i]), int(later[k]))[0] <= model.layout.capacity_bytes[s]  # noqa: E731
        if not len(later) or not fits(0):
            return _Fill(s, i, True)
        lo, hi = 0, len(later)  # memory grows with the stage's end: the last end that fits
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        i = int(later[lo])
        if i == n:
            return _Fill(None, n, False)
    return _Fill(S - 1, i, False)


def _fits(chain: Chain, cluster: Cluster, stages: int, options: SolverOptions, cuts: Sequence[int],
          activation_scale: float = 1.0) -> bool:
    """Whether some split fits by memory (``_fill``), with activations scaled (a smaller microbatch)."""
    if stages > len(cluster):
        cluster = Cluster.from_specs([max(cluster.devices, key=lambda d: d.memory_bytes)] * stages)
    model = StageModel(chain, Layout.of(cluster, range(stages), options.memory_headroom), options, cluster)
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
