"""The Plan: which part of the model runs where, what it costs, and how sure the solver is.

    plan = autosplit.solve(graph, cluster, options, costs=costs, parameters=traced.parameters)
    plan.bottleneck_s, plan.stages[0].devices, plan.solver.status
    Plan.load(plan.save("plan.json")) == plan        # JSON with a format version

A plan is plain data: it names fx nodes and modules, never holds tensors or modules, and carries
the fingerprint of the graph it was made for, so it cannot be applied to another model by mistake.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from cost_models.memory import MemoryBreakdown, device_peak_terms, in_flight_profile

FORMAT_VERSION = 4
READABLE_VERSIONS = (3, 4)
"""Plans of version 3 lack the mesh and layouts, which default to one device per stage."""


@dataclass(frozen=True)
class RecomputedBlock:
    """One block of a stage that recomputes in backward, as the planner priced it
    (``autosplit.solver.joint.recompute_costs``): the runtime recomputes exactly these nodes
    under this policy, so what runs is what was priced."""

    block: str
    """The block (``OpGraph.coarsen``), e.g. ``transformer.h.3``."""
    policy: str
    """``"selective"`` or ``"full"`` (``autosplit.solver.joint.RECOMPUTE``)."""
    nodes: tuple[str, ...]
    """Its fx nodes on this stage that compute (not its weights), in graph order; a block cut by
    a stage boundary lists its part on each stage (what a stage receives is kept there)."""


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a contiguous part of the graph on one device (or a tensor-parallel group).
    With an interleaved schedule several stages share a device (``Plan.device_stages``)."""

    index: int
    devices: tuple[str, ...]
    """Device names with their rank in the cluster, e.g. ``("h100-sxm:3",)``."""
    nodes: tuple[str, ...]
    """fx node names, in graph order."""
    modules: tuple[str, ...]
    """The first and the last module the stage runs (qualified names)."""
    param_count: int
    """Parameters whose storage lives on this stage."""
    compute_s: float
    """Compute time per microbatch (forward + backward when training)."""
    comm_in_s: float
    """Time to receive from the previous stage per microbatch (and send gradients back)."""
    comm_out_s: float
    """Time to send to the next stage per microbatch (and receive gradients back)."""
    memory: MemoryBreakdown
    """Peak memory by kind (weights, gradients, optimizer state, activations, workspace). Where
    several stages share a device, the stage as if alone on it; what the device holds, all its
    stages together, is ``Plan.device_memory()``."""
    memory_capacity_bytes: float
    """What the stage's device may use: device memory minus the headroom."""
    weights: tuple[str, ...] = ()
    """Canonical names of the parameters and buffers stored on this stage: each lives on the
    first stage that reads it and is sent once per call to every later stage that reads it."""
    transfers_in: int = 0
    """Values this stage receives per call in the forward pass (one per microbatch for each
    activation crossing into it, relayed stage by stage, and one per call for each weight stored
    elsewhere); each sends its gradient back in training."""
    saved_bytes_per_microbatch: float = 0.0
    """Bytes its ops keep for backward per microbatch (each tensor once): ``memory.activations_bytes``
    is this times the microbatches in flight under the schedule (training)."""
    weight_copies: int = 0
    """Parameters stored on other stages that it reads: it holds a copy of each for the call
    (and, training, its gradient until sent back), in ``memory.weights_bytes``."""
    transient_bytes: float = 0.0
    """The peak of one microbatch through the stage (``cost_models.memory.OpsMemory``): training,
    its saved tensors with the gradients and temporaries live on top (``workspace_bytes`` is the
    part beyond its saved tensors); inference, its live activations."""
    device_kind: str = "gpu"
    """``"gpu"`` or ``"cpu"``: a GPU adds allocator fragmentation and the CUDA context."""
    data_parallel_s: float = 0.0
    """Communication per step among the stage's data-parallel replicas (``Plan.data_parallel`` >
    1): FSDP2's all-gather of its weights and reduce-scatter of its gradients over the ranks that
    run this stage (``cost_models.sharded_data_parallel_s``). Once per step, so it is in
    ``Plan.step_s`` and not in the per-microbatch ``time_s``."""
    recompute: str = "none"
    """What its blocks recompute in backward instead of keeping (``autosplit.solver.joint.RECOMPUTE``):
    ``"none"``, ``"selective"`` (all but the outputs of matmuls and attention), ``"full"`` (all
    but each block's inputs), or several joined by ``+`` when its blocks differ; which block
    does what is ``recompute_blocks``."""
    recompute_blocks: tuple[RecomputedBlock, ...] = ()
    """The blocks that recompute, each with its policy and nodes: what the distributed runtime
    runs with ``torch.utils.checkpoint`` (``autosplit.distributed.recompute``). Empty when
    nothing recomputes, and in plans saved before it was recorded."""

    @property
    def time_s(self) -> float:
        return self.compute_s + self.comm_in_s + self.comm_out_s

    @property
    def memory_bytes(self) -> float:
        return self.memory.total_bytes


@dataclass(frozen=True)
class SolverReport:
    status: str
    """``OPTIMAL``: no op-level split on this device order is faster (within 0.1%), or with
    ``refine=False`` no block-level split; ``FEASIBLE``: the best found, ``gap`` from the bound."""
    gap: float
    """Relative gap between the plan's bottleneck and the best proven bound."""
    wall_s: float
    bound_s: float
    """The best lower bound on the bottleneck the solver proved."""
    method: str = ""
    """What found the plan, e.g. ``cp-sat blocks + dp refinement``."""
    notes: tuple[str, ...] = ()
    """One short sentence per thing that makes the plan less than it claims: ops priced as
    free, a search step skipped or stopped at its time limit, a bound that fell back."""
    orders_tried: int = 1
    """Device orders along the pipeline priced one by one (each with the chain DP)."""
    orders_total: int = 1
    """Distinct device orders: sequences of the cluster's device kinds (type and host), one per
    stage, each kind used at most as often as it has devices. 1 on identical devices of one host."""
    order_gap: float | None = 0.0
    """How much faster, relatively, the best order's block-level split could be than the chosen
    order's: 0 when the order is proven best (every distinct order priced, or the exact order
    search met it), None when unknown (too many orders to search). The status and ``gap`` speak
    of splits on the chosen order."""


@dataclass(frozen=True)
class Plan:
    """A partition of a model's graph into pipeline stages over a cluster's devices."""

    stages: tuple[Stage, ...]
    bottleneck_s: float
    """Time per microbatch of the slowest device: the pipeline's steady-state period. With one
    stage per device, the slowest stage's time; with several (interleaved), the sum of the
    times of the device's stages."""
    lower_bound_s: float
    """max(total work ÷ combined device speed, heaviest indivisible block on the fastest device),
    raised on identical devices by the traffic every split at least as fast as the plan must send
    (``solver.traffic_bound_s``): no split of the graph has a lower bottleneck."""
    step_s: float
    """Predicted time of one step: (microbatches + stages − 1) × bottleneck; with several stages
    per device, microbatches × bottleneck + (devices − 1) × the slowest stage's time
    (``autosplit.schedule.pipeline_times``); plus the largest ``Stage.data_parallel_s`` (the last
    stage to finish its backward reduces after it)."""
    bubble_fraction: float
    """Idle share of the pipeline: (stages − 1) ÷ (microbatches + stages − 1); with v stages on
    each of D devices, (D − 1) × the slowest stage's time ÷ step, which is (D − 1) ÷
    (v · microbatches + D − 1) for equal stages."""
    samples_per_s: float
    """Samples per second over all data-parallel replicas."""
    tokens_per_s: float | None
    mode: str
    schedule: str
    microbatches: int
    solver: SolverReport
    fingerprint: str
    """Fingerprint of the op graph the plan was made for (``OpGraph.fingerprint``)."""
    cluster: str
    """The cluster, as ``Cluster.parse`` reads it."""
    options: dict[str, Any] = field(default_factory=dict)
    node_digests: dict[str, str] = field(default_factory=dict)
    """Each node's part of the fingerprint (``OpGraph.node_digests``): names the first node
    where a model differs from the one planned."""
    data_parallel: int = 1
    """Replicas of the pipeline, each training on its own slice of every batch; each stage is
    replicated over its replicas' ranks with FSDP2, and its memory and ``data_parallel_s``
    count what that keeps and sends. The stages are replica 0's: the cluster holds
    ``data_parallel`` × the devices of one replica, replica k on the k-th run of them. 1 in
    plans saved before replicas could be planned."""
    tensor_parallel: int = 1
    """Devices that run each stage together, each node in its layout (``layouts``); a stage's
    ``devices`` are its group's, and its figures are those of one rank of the group."""
    microbatch_size: int | None = None
    """Samples per microbatch, when the plan was made for a global batch (``global_batch``)."""
    global_batch: int | None = None
    """Samples per optimizer step over all replicas: data_parallel × microbatches ×
    microbatch_size. None for plans made for a given microbatch count."""
    layouts: dict[str, Any] = field(default_factory=dict)
    """fx node → its layout on the stage's tensor-parallel group, as DTensor placements
    (``autosplit.sharding``). Empty when ``tensor_parallel`` is 1."""
    format_version: int = FORMAT_VERSION

    @property
    def traced_batch(self) -> int | None:
        """Samples per microbatch in the graph the plan was made from (its ``fingerprint``), when
        the plan runs microbatches of another size (``microbatch_size``: the joint search prices
        the traced graph scaled to it); None when the two are the same."""
        traced = self.options.get("traced_batch")
        return traced if traced is not None and traced != self.microbatch_size else None

    @property
    def mesh(self) -> dict[str, int]:
        """Sizes of the device mesh: ``{"dp": replicas, "pp": devices along the pipeline, "tp":
        devices per stage}``, whose product is the cluster's devices."""
        return {"dp": self.data_parallel, "pp": len(self.device_stages()), "tp": self.tensor_parallel}

    # ------------------------------------------------------------------ reading it

    def table(self):
        """The stages as a rich table: devices, first → last module, parameters, memory, time."""
        from rich.markup import escape
        from rich.table import Table

        per_device = self.stages_per_device
        shared = f" ({per_device} stages per device, {self.schedule})" if per_device > 1 else ""
        replicas = f" × {self.data_parallel} data-parallel replicas" if self.data_parallel > 1 else ""
        table = Table(title=f"{len(self.stages)}-stage {self.mode} plan{replicas} on {self.cluster}{shared}")
        for column, justify in [("stage", "right"), ("device", "left"), ("modules", "left"), ("params", "right"),
                                ("memory", "right"), ("compute", "right"), ("comm in", "right"),
                                ("comm out", "right")]:
            table.add_column(column, justify=justify)
        for stage in self.stages:
            share = stage.memory_bytes / stage.memory_capacity_bytes if stage.memory_capacity_bytes else 0.0
            first, last = stage.modules
            table.add_row(
                str(stage.index), device_group(stage.devices), escape(f"{first or '<root>'} → {last or '<root>'}"),
                human_count(stage.param_count), f"{stage.memory_bytes / 2**30:.1f} GiB ({share:.0%})",
                _seconds(stage.compute_s), _seconds(stage.comm_in_s), _seconds(stage.comm_out_s),
            )
        return table

    def summary(self) -> list[str]:
        """Bottleneck against the bound, throughput, bubble, and how the solver fared."""
        throughput = f"{self.samples_per_s:,.1f} samples/s"
        if self.tokens_per_s:
            throughput += f", {self.tokens_per_s:,.0f} tokens/s"
        return [
            f"bottleneck   {_seconds(self.bottleneck_s)} per microbatch, {self.bottleneck_s / self.lower_bound_s:.3f} × "
            f"the lower bound ({_seconds(self.lower_bound_s)})" if self.lower_bound_s else
            f"bottleneck   {_seconds(self.bottleneck_s)} per microbatch",
            f"throughput   {throughput}; step {_seconds(self.step_s)} with {self.microbatches} "
            f"microbatch{'es' if self.microbatches != 1 else ''} "
            f"({self.schedule}), bubble {self.bubble_fraction:.1%}",
            f"solver       {self.solver.status} by {self.solver.method}, gap {self.solver.gap:.2%}, "
            f"{self.solver.wall_s:.2f} s",
            *self._order_line(),
            *self._mesh_lines(),
            *self._device_lines(),
            *self._replica_line(),
        ] + [f"note         {note}" for note in self.solver.notes]

    def _mesh_lines(self) -> list[str]:
        """The mesh, the batch and the recomputation, for plans made for a global batch."""
        if self.global_batch is None:
            if self.mode == "train" and self.bubble_fraction > 0.5:
                return [f"bubble       the devices idle {self.bubble_fraction:.0%} of the step with {self.microbatches} "
                        f"microbatch{'es' if self.microbatches != 1 else ''}: give the global batch "
                        "(global_batch=, --global-batch) and the microbatches, mesh and recomputation are chosen"]
            return []
        mesh = self.mesh
        recompute = ", ".join(f"{s.index}: {s.recompute}" for s in self.stages) if len(
            {s.recompute for s in self.stages}) > 1 else self.stages[0].recompute
        return [f"mesh         dp={mesh['dp']} × pp={mesh['pp']} × tp={mesh['tp']}; global batch {self.global_batch} = "
                f"{mesh['dp']} replicas × {self.microbatches} microbatches × {self.microbatch_size} samples",
                f"recompute    {recompute}"]

    def layout_table(self):
        """Each module's tensor layout as a rich table: per module (repeated layers folded into
        one row, their index shown as ``*``), each op's input and output placements on its
        stage's devices (a weight's row is its own placement)."""
        import re

        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"tensor layouts on groups of {self.tensor_parallel} (R replicate, S(d) shard dim d, "
                            "P partial sum)")
        for column in ("module", "op", "inputs", "output", "count"):
            table.add_column(column, justify="right" if column == "count" else "left")
        rows: dict[tuple[str, str, str, str], int] = {}
        def fold(name: str) -> str:
            return re.sub(r"\.\d+(?=\.|$)", ".*", name)

        for layout in self.layouts.values():
            if not layout.get("output"):  # checks with no value of their own
                continue
            key = (fold(layout.get("module", "")) or "<root>", fold(layout.get("op", "")),
                   " ".join(layout.get("inputs", ())), layout.get("output", ""))
            rows[key] = rows.get(key, 0) + 1
        for (module, op, inputs, output), count in rows.items():
            if inputs.replace("R", "").strip() or output not in ("R", ""):  # all-replicated ops are left out
                table.add_row(escape(module), escape(op), inputs, output, str(count))
        return table

    def _device_lines(self) -> list[str]:
        """Per device that runs several stages: its stages, time per microbatch and memory."""
        devices = self.device_stages()
        if len(devices) == len(self.stages):
            return []
        memory = self.device_memory()
        lines = []
        for rank, indices in devices.items():
            first = self.stages[indices[0]]
            time_s = sum(self.stages[i].time_s for i in indices)
            share = memory[rank].total_bytes / first.memory_capacity_bytes if first.memory_capacity_bytes else 0.0
            lines.append(f"device       {first.devices[0]}: stages {', '.join(map(str, indices))}, "
                         f"{_seconds(time_s)} per microbatch, {memory[rank].total_bytes / 2**30:.1f} GiB ({share:.0%})")
        return lines

    def _replica_line(self) -> list[str]:
        """What the data-parallel replicas add to a step, for plans with several."""
        if self.data_parallel == 1:
            return []
        if self.mode != "train":
            return [f"replicas     {self.data_parallel}, each on its own share of the batch (no gradients to reduce)"]
        slowest = max(self.stages, key=lambda stage: stage.data_parallel_s)
        return [f"replicas     {self.data_parallel} (FSDP2 over each stage's replicas): all-gather and reduce-scatter "
                f"{_seconds(slowest.data_parallel_s)} per step on stage {slowest.index}, in the step time"]

    @property
    def data_parallel_step_s(self) -> float:
        """What the replicas' communication adds to a step: the largest ``Stage.data_parallel_s``."""
        return max((stage.data_parallel_s for stage in self.stages), default=0.0)

    @property
    def shared_weights(self) -> str:
        """How the plan holds weights read on several stages (``SolverOptions.shared_weights``):
        ``"sent"`` (``autosplit()`` in one process) or ``"copies"`` (``autosplit.distributed``)."""
        return self.options.get("shared_weights", "sent")

    @property
    def reads_weights_across_stages(self) -> bool:
        """Whether some stage reads a weight another stage stores (``Stage.weight_copies``)."""
        return any(stage.weight_copies for stage in self.stages)

    def _order_line(self) -> list[str]:
        """How sure the device order is, for clusters with more than one order."""
        report = self.solver
        if report.orders_total <= 1:
            return []
        total, tried = f"{report.orders_total:,}", f"{report.orders_tried:,}"
        if report.order_gap == 0:
            how = "each priced" if report.orders_tried >= report.orders_total else f"exact order search, {tried} priced"
            return [f"devices      order proven best of {total} distinct orders ({how})"]
        far = "gap unknown" if report.order_gap is None else f"at most {report.order_gap:.2%} from the best"
        return [f"devices      order not proven best: {tried} of {total} distinct orders priced, {far}"]

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, file=io.StringIO())
        console.print(self.table())
        for line in self.summary():
            console.print(line, soft_wrap=True, highlight=False)
        return console.export_text()

    def device_ranks(self) -> list[int]:
        """The cluster rank of each stage's device (``"h100-sxm:3"`` is rank 3), in stage order.
        With an interleaved schedule a rank appears once per stage it runs: v stages on each of
        D devices, stage s on the device of stage s mod D."""
        return [int(stage.devices[0].rpartition(":")[2]) for stage in self.stages]

    def device_stages(self) -> dict[int, tuple[int, ...]]:
        """Cluster rank → the stages its device runs, in pipeline order; ranks in the order of
        their first stage. One stage each, but with an interleaved schedule."""
        stages: dict[int, list[int]] = {}
        for stage, rank in zip(self.stages, self.device_ranks()):
            stages.setdefault(rank, []).append(stage.index)
        return {rank: tuple(indices) for rank, indices in stages.items()}

    @property
    def stages_per_device(self) -> int:
        """Stages each device runs: 1, or v with an interleaved schedule."""
        return len(self.stages) // len(self.device_stages())

    def device_memory(self) -> dict[int, MemoryBreakdown]:
        """Cluster rank → the peak memory of its device, by kind: its stages' training state
        together and the activations of the microbatches each stage holds in flight at the
        worst moment of the schedule (``cost_models.memory.device_peak_terms``, the model the
        solver checks against ``memory_capacity_bytes``). With one stage per device it is that
        stage's ``memory``."""
        rules = {k: self.options[k] for k in ("precision", "optimizer", "weight_dtype", "shared_weights") if k in self.options}
        devices = self.device_stages()
        found = {}
        for position, (rank, indices) in enumerate(devices.items()):
            stages = [self.stages[i] for i in indices]
            if len(stages) == 1:
                found[rank] = stages[0].memory
                continue
            profile = in_flight_profile(self.schedule, num_stages=len(self.stages),
                                        stages_per_device=len(stages), device=position,
                                        microbatches=self.microbatches)
            quantities = [dict(params=st.param_count, copies=st.weight_copies,
                               activations=st.saved_bytes_per_microbatch, transient=st.transient_bytes)
                          for st in stages]
            terms = device_peak_terms(quantities, profile=profile, gpu=stages[0].device_kind == "gpu", mode=self.mode,
                                      kv_cache=sum(st.memory.kv_cache_bytes for st in stages), **rules)
            found[rank] = MemoryBreakdown(**{k: float(v) for k, v in terms.items()})
        return found

    def require_pipeline_only(self, runtime: str, *, runs_recompute: bool = False) -> None:
        """Refuse, before anything moves, a plan whose stages run tensor-parallel, or recompute
        where ``runtime`` does not (``runs_recompute``): it runs one device per stage and, unless
        it runs recomputation (``autosplit.distributed`` does), keeps every activation.

        Raises:
            ValueError: says what the plan asks for and how to plan for ``runtime``.
        """
        recomputes = sorted({s.recompute for s in self.stages} - {"none"}) if not runs_recompute else []
        if self.tensor_parallel == 1 and not recomputes:
            return
        asks = []
        if self.tensor_parallel > 1:
            asks.append(f"runs each stage on {self.tensor_parallel} devices in tensor layouts")
        if recomputes:
            asks.append(f"recomputes activations ({', '.join(recomputes)})")
        fixes = [fix for fix, needed in (("tensor_parallel=1", self.tensor_parallel > 1),
                                         ("recompute='none'", bool(recomputes))) if needed]
        where = " (autosplit.distributed runs recomputation)" if recomputes else ""
        raise ValueError(f"this plan {' and '.join(asks)}, which {runtime} does not run: plan for it with "
                         f"{' and '.join(fixes)} (or without global_batch){where}")

    def stage_of(self) -> dict[str, int]:
        """fx node name → stage index."""
        return {node: stage.index for stage in self.stages for node in stage.nodes}

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for stage, raw in zip(self.stages, data["stages"]):
            raw["memory_bytes"] = stage.memory_bytes
            raw["time_s"] = stage.time_s
        return data

    def save(self, path: str | os.PathLike) -> str:
        """Write the plan as JSON; returns the path."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return os.fspath(path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"plan format version {version!r} is not supported by this autosplit "
                             f"(it reads version {FORMAT_VERSION}); make the plan again with this version")
        stages = []
        for raw in data["stages"]:
            raw = {k: v for k, v in raw.items() if k not in ("memory_bytes", "time_s")}
            raw["memory"] = MemoryBreakdown(**raw["memory"])
            for key in ("devices", "nodes", "modules", "weights"):
                raw[key] = tuple(raw[key])
            raw["recompute_blocks"] = tuple(RecomputedBlock(b["block"], b["policy"], tuple(b["nodes"]))
                                            for b in raw.get("recompute_blocks", ()))
            stages.append(Stage(**raw))
        fields = {k: v for k, v in data.items() if k not in ("stages", "solver")}
        solver = {**data["solver"], "notes": tuple(data["solver"].get("notes", ()))}  # older plans have none
        return cls(stages=tuple(stages), solver=SolverReport(**solver), **fields)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by :meth:`save`."""
        with open(path) as f:
            return cls.from_dict(json.load(f))


def device_group(devices: Sequence[str]) -> str:
    """``("h100-sxm:8", ..., "h100-sxm:15")`` → ``"h100-sxm:8-15"``; other lists joined by commas."""
    kinds = {d.rpartition(":")[0] for d in devices}
    ranks = [int(d.rpartition(":")[2]) for d in devices]
    if len(devices) > 2 and len(kinds) == 1 and ranks == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"{kinds.pop()}:{ranks[0]}-{ranks[-1]}"
    return ", ".join(devices)


def human_count(n: float) -> str:
    """A count in K, M or B: ``human_count(124_439_808)`` is ``'124M'``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"
