"""A pp=2 × tp=2 training step on 4 gloo ranks, measured beside its plan: each rank's memory by
kind and the bytes it sends.

    python benchmarks/bench_tensor_parallel.py      # about 2 minutes; prints and records into RESULTS.md

The model: a GPT-2 (Hugging Face) of 4 layers, d=256, vocab 4096, sequence 128, 4.2 M
parameters; a global batch of 8 in 4 microbatches of 2, 1F1B, AdamW in fp32. The plan is made in
this process at the run's precision (``precision="fp32"``, ``optimizer="adamw"``), on a cluster of
4 devices priced 1,000 times slower than H100s in compute (links unchanged) and with a CPU's
memory model (no allocator fragmentation or CUDA context), so that splitting these small layers
pays and the planner lays them out on tp groups as it would real ones (as
``tests/test_distributed_tensor_parallel.py`` does). Every rank builds the model on ``meta`` and
gets memory for its own stage only; then runs warm-up steps, a step inside
``pipe.measure_memory`` (forward, backward and ``optimizer.step()``), and a step whose sends are
counted.

Memory: ``pipe.memory_report(optimizer)`` (``autosplit/distributed/memory.py``: a DTensor counts
its local shard) beside ``plan.stages[s].memory``, whose figures are one rank's of its tp group.
The peak on the CPU is what the rank held when the step began plus the allocator's highest growth
during it (profiler memory records); the plan's peak is the sum of its kinds. The last stage also
runs the loss, which the plan does not see; its memory, measured alone (``loss_alone``), is shown
left out in rows of their own.

Bytes sent, per rank and step, counted by a ``TorchDispatchMode`` around the step (run in the
calling thread): the stage's sends (``c10d.send``, which ``torch.distributed.pipelining``'s
``isend`` reaches), DTensor's collectives (``_c10d_functional.*``; a collective on a tensor of N
bytes counts as a ring sends it, per rank: all-reduce 2(n − 1)/n · N, all-gather and
reduce-scatter (n − 1)/n · N of the whole tensor), and the all-reduce that sums a tied weight's
gradient copies (``c10d.allreduce_``). gloo has no all-to-all: DTensor falls back to an
all-gather of the whole tensor and keeps its slice, (n − 1)/n · N sent where an all-to-all sends
(n − 1)/n of the 1/n shard, n times less. Beside them, the plan's: the values crossing each cut
(``Stage.transfers_in`` of them per call) forward and their gradients back, each as large as the
plan prices it (one rank's shard, as ``autosplit.solver.joint.per_rank_graph`` gives the solver);
the collectives of ``plan.layouts``
(``autosplit.sharding.price.plan_collectives``) × microbatches; the tied weight's gradient sum
(its shard on each rank, all-reduced over the 2 stages once per step). FSDP2 sends nothing at
dp = 1.

Times mean nothing here: 4 processes share 2 cores.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _ranks import run_on_ranks  # noqa: E402
from _results import machine, record  # noqa: E402

import autosplit  # noqa: E402
import autosplit.distributed  # noqa: E402
from autosplit.sharding.placements import is_shard  # noqa: E402
from autosplit.sharding.price import bytes_sent, plan_collectives  # noqa: E402
from cost_models import Cluster  # noqa: E402
from cost_models.devices import get_device  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORLD, STAGES, TP = 4, 2, 2
LAYERS, WIDTH, HEADS, VOCAB, SEQ = 4, 256, 4, 4096, 128
BATCH, MICROBATCHES = 8, 4
WARMUP_STEPS = 2
SLOWDOWN = 1e3
"""How much slower than an H100 the plan prices compute, links unchanged."""
TARGET = 0.10
"""Measured memory within 10% of the plan's."""
TIMEOUT_S = 600
GROUP_TIMEOUT_S = 300.0


def config():
    from transformers import GPT2Config

    return GPT2Config(n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, vocab_size=VOCAB, n_positions=SEQ, use_cache=False,
                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def gpt(device: str = "cpu"):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    with torch.device(device):
        return GPT2LMHeadModel(config())


def lm_loss(output, target):
    return F.cross_entropy(output["logits"].flatten(0, 1), target.flatten())


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def slow_cluster(devices: int) -> Cluster:
    """H100s 1,000 times slower in compute, priced with a CPU's memory model (no allocator
    fragmentation or CUDA context: the ranks run on the CPU)."""
    h100 = get_device("h100")
    slow = dataclasses.replace(h100, peak_flops={k: v / SLOWDOWN for k, v in h100.peak_flops.items()},
                               memory_bandwidth_bytes_per_s=h100.memory_bandwidth_bytes_per_s / SLOWDOWN, kind="cpu")
    return Cluster(devices=(slow,) * devices)


def make_plan():
    ids, _ = batch(0)
    microbatch = ids[:BATCH // MICROBATCHES]
    model = gpt("meta")  # as the ranks capture it (on meta, Hugging Face's GPT-2 adds .contiguous() calls)
    plan = autosplit.plan(model, example_inputs=(microbatch,), cluster=slow_cluster(WORLD), tracer="export",
                          global_batch=BATCH, microbatches=MICROBATCHES, tensor_parallel=TP, data_parallel=1,
                          stages=STAGES, shared_weights="copies", precision="fp32", optimizer="adamw")
    traced = autosplit.capture(model, (microbatch,), tracer="export")
    return plan, traced


def loss_alone() -> tuple[float, float]:
    """What ``lm_loss`` keeps for backward, and the CPU allocator's peak growth over its forward
    and backward, on one microbatch's logits (held before, as the last stage holds them): the
    last stage runs the loss, which is not in the model's graph, so the plan does not price it."""
    from autosplit.distributed.memory import _peak_growth

    g = torch.Generator().manual_seed(0)
    b = BATCH // MICROBATCHES
    logits = torch.randn(b, SEQ, VOCAB, generator=g, requires_grad=True)
    target = torch.randint(0, VOCAB, (b, SEQ), generator=g)
    kept: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = lm_loss({"logits": logits}, target)
        saved = float(sum(kept.values()))
        loss.backward()
    return saved, _peak_growth(prof)


# --------------------------------------------------------------------------- counting what a rank sends


class SentBytes(TorchDispatchMode):
    """Bytes this rank sends, by what sends them, for the ops run inside it (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.bytes = defaultdict(float)
        self.calls = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            # Let DTensor run the op first (as CommDebugMode does): the collectives it issues
            # inside the op (a partial gradient added to a replicated one) then come back here;
            # handled here, the op would run with this mode off.
            return NotImplemented
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith("c10d::send"):
            self._add("pipeline send", sum(_nbytes(t) for t in args[0]))
        elif name.startswith("c10d::allreduce_"):
            n = _group_size(args[1])
            tensors = args[0]
            if n == 1:  # e.g. the loss averaged over the replicas, at dp = 1: nothing sent
                return func(*args, **kwargs)
            kind = "tied weight gradient sum" if all(t.is_floating_point() for t in tensors) else "control"
            self._add(kind, sum(2 * (n - 1) / n * _nbytes(t) for t in tensors))
        elif name.startswith("_c10d_functional::"):
            self._add_functional(name.split("::")[1].split(".")[0], args)
        elif name.startswith("c10d::") and not name.startswith("c10d::recv"):
            self._add(f"other c10d ({name})", sum(_nbytes(t) for t in args[0] if isinstance(t, torch.Tensor))
                      if isinstance(args[0], (list, tuple)) else 0.0)
        return func(*args, **kwargs)

    def _add_functional(self, op: str, args) -> None:
        tensor = args[0]
        if op == "all_reduce":  # (input, reduce_op, group_name)
            n = _group_size(args[2])
            self._add("tp all_reduce", bytes_sent("all_reduce", _nbytes(tensor), n))
        elif op == "all_gather_into_tensor":  # (input shard, group_size, group_name): the whole is n × input
            n = args[1]
            self._add("tp all_gather", bytes_sent("all_gather", _nbytes(tensor) * n, n))
        elif op == "reduce_scatter_tensor":  # (whole input, reduce_op, group_size, group_name)
            n = args[2]
            self._add("tp reduce_scatter", bytes_sent("reduce_scatter", _nbytes(tensor), n))
        elif op == "all_to_all_single":  # (input shard, output split sizes, input split sizes, group_name)
            n = _group_size(args[3])
            self._add("tp all_to_all", bytes_sent("all_to_all", _nbytes(tensor) * n, n))
        elif op not in ("wait_tensor", "_wrap_tensor_autograd"):
            self._add(f"tp {op} (not priced)", _nbytes(tensor))

    def _add(self, kind: str, nbytes: float) -> None:
        self.bytes[kind] += nbytes
        self.calls[kind] += 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _group_size(group) -> int:
    if isinstance(group, str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(group)
    elif not isinstance(group, dist.ProcessGroup):  # a c10d op's argument: the group as a script object
        group = dist.ProcessGroup.unbox(group)
    return group.size()


# --------------------------------------------------------------------------- what each rank runs


def run_rank(rank: int, plan) -> dict:
    model = gpt("meta")
    ids, targets = batch(0)
    pipe = autosplit.distributed.build(model, plan, loss_fn=lm_loss, example_inputs=(ids,), tracer="export",
                                       timeout_s=GROUP_TIMEOUT_S)
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=1e-4)

    def step(k):
        ids, targets = batch(k)
        pipe.step(ids, target=targets)
        optimizer.step()

    start = time.perf_counter()
    for k in range(WARMUP_STEPS):
        step(k)
        optimizer.zero_grad()
    warm_s = (time.perf_counter() - start) / WARMUP_STEPS
    with pipe.measure_memory(optimizer):
        step(WARMUP_STEPS)
    report = pipe.memory_report(optimizer)
    optimizer.zero_grad()
    counter = SentBytes()
    pipe._failures.inline = True  # the step in this thread, where the dispatch mode is
    try:
        with counter:
            step(WARMUP_STEPS + 1)
    finally:
        pipe._failures.inline = False
    optimizer.zero_grad()
    return {"rank": rank, "stage": pipe.stage, "report": report, "sent": dict(counter.bytes),
            "calls": dict(counter.calls), "step_s": warm_s,
            "placements": sorted({str(getattr(p, "placements", "plain")) for p in pipe.parameters()})}




# --------------------------------------------------------------------------- what the plan says each rank sends


def planned_sends(plan, traced) -> list[dict[str, float]]:
    """Per stage, the bytes one rank of its group sends per step, by kind, as the plan prices them."""
    gm = traced.graph_module
    m, tp = plan.microbatches, plan.tensor_parallel
    stage_of = {}
    for stage in plan.stages:
        for name in stage.nodes:
            stage_of.setdefault(name, stage.index)
    rebuilt = {name: {stage.index for stage in plan.stages if name in stage.nodes} for name in stage_of}
    from cost_models.ops import needs_grad_of

    needs = needs_grad_of(gm)
    sends: list[dict[str, float]] = [defaultdict(float) for _ in plan.stages]
    crossing = [0] * len(plan.stages)
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "output") or node.name not in stage_of:
            continue
        readers = [stage_of[u.name] for u in node.users if u.name in stage_of and stage_of[u.name] not in rebuilt[node.name]]
        last = max(readers, default=-1)
        val = node.meta.get("val")
        if last <= stage_of[node.name] or not isinstance(val, torch.Tensor):
            continue
        nbytes = val.numel() * val.element_size()
        if is_shard(plan.layouts[node.name]["output"].split()[0]):  # each rank sends its shard
            nbytes //= tp
        grad = nbytes if needs.get(node.name) and val.is_floating_point() else 0
        for hop in range(stage_of[node.name], last):  # relayed stage by stage
            sends[hop]["pipeline send"] += nbytes * m
            sends[hop + 1]["pipeline send"] += grad * m
            crossing[hop + 1] += m
    assert crossing == [s.transfers_in for s in plan.stages], (crossing, [s.transfers_in for s in plan.stages])
    for stage, collectives in zip(plan.stages, plan_collectives(gm, plan)):
        for c in collectives:
            if c.kind == "all_to_all":  # priced as an all-to-all, run on gloo as an all-gather of the whole
                sends[stage.index][ALL_TO_ALL_PRICED] += bytes_sent(c.kind, c.nbytes, tp) * m
                sends[stage.index]["tp all_gather"] += bytes_sent("all_gather", c.nbytes, tp) * m
            else:
                sends[stage.index][f"tp {c.kind}"] += bytes_sent(c.kind, c.nbytes, tp) * m
    tied = {}
    for node in gm.graph.nodes:  # a weight read on several stages: each holds a copy, its gradient summed per step
        if node.op == "get_attr":
            on = {stage_of[u.name] for u in node.users if u.name in stage_of}
            if len(on) > 1:
                placement = plan.layouts[node.name]["output"]
                val = node.meta["val"]
                tied[node.name] = (on, val.numel() * val.element_size() / (tp if placement.startswith("S(") else 1))
    for on, local_bytes in tied.values():
        for s in on:
            sends[s]["tied weight gradient sum"] += bytes_sent("all_reduce", local_bytes, len(on))
    return [dict(s) for s in sends]


ALL_TO_ALL_PRICED = "(tp all_to_all as the plan prices it)"
"""The plan's all-to-alls at their own price; the rows above count them as gloo runs them."""


# --------------------------------------------------------------------------- the tables


MEMORY_ROWS = [("weights", "weights_bytes"), ("gradients", "grads_bytes"), ("optimizer", "optimizer_bytes"),
               ("activations", "activations_bytes"), ("workspace", "workspace_bytes")]


def _mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.2f}"


def _ratio(measured: float | None, planned: float) -> str:
    if measured is None:
        return "-"
    if not planned:
        return "-"
    return f"{measured / planned:.2f}"


def memory_rows(reports: list[dict], loss: tuple[float, float], last: int
                ) -> tuple[list[str], list[tuple[int, str, float]]]:
    """The memory table; ``loss``: ``loss_alone()``, left out of the last stage's figures in the
    rows that say so (1F1B: the last stage holds one microbatch's loss at a time)."""
    header = "| kind | " + " | ".join(f"rank {r['rank']} (stage {r['stage']}) measured / planned MiB, ratio"
                                       for r in reports) + " |"
    rows = [header, "|---|" + "---|" * len(reports)]
    off = []
    rows_of = MEMORY_ROWS + [("peak", None), ("activations, the loss's left out", "activations_bytes"),
                             ("peak, the loss's left out", None)]
    for label, field in rows_of:
        cells = []
        for r in reports:
            rep = r["report"]
            if field is None:
                measured, planned = rep.measured_peak_bytes, rep.planned_peak_bytes
            elif field == "workspace_bytes":
                measured, planned = None, rep.planned.workspace_bytes
            else:
                measured, planned = getattr(rep.measured, field), getattr(rep.planned, field)
            if "left out" in label and r["stage"] == last and measured is not None:
                measured -= loss[0] if field else loss[1]
            cells.append(f"{_mb(measured)} / {_mb(planned)}, **{_ratio(measured, planned)}**")
            if measured is not None and planned and abs(measured / planned - 1) > TARGET:
                off.append((r["rank"], label, measured / planned))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows, off


def traffic_rows(reports: list[dict], planned: list[dict[str, float]]) -> list[str]:
    kinds = sorted({k for r in reports for k in r["sent"]} | {k for p in planned for k in p},
                   key=lambda k: (not k.startswith("pipeline"), not k.startswith("tp"), k))
    header = "| sent per step | " + " | ".join(f"rank {r['rank']} (stage {r['stage']}) measured / planned MiB, ratio"
                                                for r in reports) + " |"
    rows = [header, "|---|" + "---|" * len(reports)]
    kinds = [k for k in kinds if k != ALL_TO_ALL_PRICED]
    for kind in kinds + ["total"]:
        cells = []
        for r in reports:
            plan_s = planned[r["stage"]]
            if kind == "total":
                measured = sum(r["sent"].values())
                expected = sum(v for k, v in plan_s.items() if k != ALL_TO_ALL_PRICED)
            else:
                measured, expected = r["sent"].get(kind, 0.0), plan_s.get(kind, 0.0)
            calls = r["calls"].get(kind)
            cells.append(f"{_mb(measured)} / {_mb(expected)}, **{_ratio(measured, expected)}**"
                         + (f" ({calls} call{'s' if calls > 1 else ''})" if calls and kind != "total" else ""))
        rows.append(f"| {kind} | " + " | ".join(cells) + " |")
    if any(ALL_TO_ALL_PRICED in p for p in planned):
        rows.append(f"| {ALL_TO_ALL_PRICED} | " + " | ".join(
            f"- / {_mb(planned[r['stage']].get(ALL_TO_ALL_PRICED, 0.0))}" for r in reports) + " |")
    return rows


def main() -> None:
    start = time.perf_counter()
    plan, traced = make_plan()
    print(f"planned in {time.perf_counter() - start:.0f} s: mesh {plan.mesh}, {plan.microbatches} microbatches of "
          f"{plan.microbatch_size}, {plan.schedule}")
    planned = planned_sends(plan, traced)
    reports = run_on_ranks(run_rank, world=WORLD, timeout_s=TIMEOUT_S, args=(plan,),
                           group_timeout_s=GROUP_TIMEOUT_S)
    loss = loss_alone()
    memory_table, off = memory_rows(reports, loss, len(plan.stages) - 1)
    traffic_table = traffic_rows(reports, planned)
    print("\n".join(memory_table + [""] + traffic_table))
    for r in reports:
        print(f"rank {r['rank']}: {r['report']}\n  placements {r['placements']}")
    print(f"wall time {time.perf_counter() - start:.0f} s")
    params = sum(p.numel() for p in gpt("meta").parameters())
    cuts = " \\| ".join(f"`{s.modules[0]} → {s.modules[-1]}`" for s in plan.stages)
    record("tensor-parallel", "\n".join([
        "## Tensor-parallel pipeline: memory and bytes sent per rank (`benchmarks/bench_tensor_parallel.py`)",
        "",
        f"Machine: {machine()}.",
        "",
        f"4 gloo ranks on localhost, one thread each, a pp={STAGES} × tp={TP} plan: GPT-2 (Hugging Face), {LAYERS} "
        f"layers, d={WIDTH}, vocab {VOCAB}, sequence {SEQ}, {params / 1e6:.1f} M parameters (fp32); global batch "
        f"{BATCH} in {plan.microbatches} microbatches of {plan.microbatch_size}, {plan.schedule}, AdamW. Stages: "
        f"{cuts}; ranks 0, 1 run stage 0, ranks 2, 3 stage 1. Planned at fp32 with AdamW on 4 devices priced "
        f"{SLOWDOWN:,.0f}× slower than H100 in compute, with a CPU's memory model, so that the planner lays these "
        "small layers out on the tp groups. Times mean nothing here: 4 processes share 2 cores.",
        "",
        "Memory per rank: `pipe.memory_report(optimizer)` after a step (forward, backward, `optimizer.step()`) "
        "measured inside `pipe.measure_memory`, beside the plan's `Stage.memory` (one rank of the stage's tp "
        "group). Peak: on the CPU, what the rank held when the step began + the allocator's highest growth "
        "during it; planned, the sum of the kinds. Ratio: measured ÷ planned; target within 10%.",
        "",
        *memory_table,
        "",
        "Bytes each rank sends in one step, counted around the step by a `TorchDispatchMode` (`c10d.send` for "
        "the stage sends, `_c10d_functional.*` for DTensor's collectives, `c10d.allreduce_` for the tied "
        "weight's gradient sum and the control flags), a collective converted to what one rank sends under a "
        "ring: all-reduce 2(n − 1)/n · N, all-gather and reduce-scatter (n − 1)/n · N of the whole tensor. "
        "Planned: the values crossing each cut as the plan prices them (each rank's shard) forward and their "
        "gradients back, × microbatches; the collectives of `plan.layouts` "
        "(`autosplit.sharding.price.plan_collectives`) × microbatches; the tied weight's gradient sum once per "
        "step. gloo has no all-to-all: DTensor gathers the whole tensor and keeps its slice, so an all-to-all "
        "counts here as the all-gather it runs. FSDP2 sends nothing at dp=1.",
        "",
        *traffic_table,
        "",
        "What the figures say:",
        "",
        "- Weights, gradients and optimizer state: each rank holds its DTensor shards, as planned (the memory "
        "report counts a DTensor's local shard).",
        f"- Activations: the last stage also runs the loss, which is not in the model's graph and so not in "
        f"the plan: `F.cross_entropy` keeps the log-softmax of one microbatch's logits ({_mb(loss[0])} MiB, "
        f"measured alone) and grows the allocator by {_mb(loss[1])} MiB over its forward and backward (the "
        "log-softmax and the logits' gradient). The rows that leave it out subtract those figures from the "
        "last stage's measured ones (the peak's is an estimate: the loss alone, not within the step).",
        "- What a layout change makes is its own tensor: an op that reads its input through a collective "
        "(an all-gathered input of a column-parallel matmul, kept for its weight's gradient) keeps the "
        "collective's result, another storage than the producer's output that other readers keep; the plan "
        "prices it so (`autosplit.sharding.price.saved_as_read`). On gloo, `S(i) → S(j)` (no all-to-all) "
        "gathers the whole tensor and slices it; the runtime copies the slice out so that a saved shard "
        "does not keep the whole alive.",
        "- Pipeline sends: the runtime sends each rank's shard of a value crossing a cut (`WireLayout`), "
        "and the plan prices one rank's shard on each rank's link (`autosplit.solver.joint.per_rank_graph`): "
        "every value crossing this plan's cut is sharded (`S(0)`), half the whole tensor.",
        "- Tensor-parallel collectives: the plan's, per microbatch, at the sizes it prices; a weight read "
        "replicated by a split op all-reduces its partial gradient each microbatch (the first when its "
        "hook redistributes it, the later ones when DTensor adds a partial gradient to the replicated "
        "one). A collective a cut separates from its producer runs on the readers' stage (the next stage "
        "redistributes what it receives): `plan_collectives` counts it there, while the solver adds its "
        "time to the producer's stage.",
        "- Control: the one-element flags the ranks exchange before each step (not priced).",
        "- The CPU peak moves by a few MiB from run to run and between the two ranks of one stage (the "
        "profiler's allocation records, with the ranks' steps interleaving differently on 2 cores); the "
        "other figures repeat exactly.",
    ]))
    if off:
        print("off by more than 10%: " + ", ".join(f"rank {r} {label} {ratio:.2f}" for r, label, ratio in off))


if __name__ == "__main__":
    main()
