"""Training pipelined over 2 processes (``autosplit.distributed``, gloo on localhost), one thread each.

1. Throughput: a small GPT (the model of ``examples/torchrun_train.py``) trained in 2 processes,
   one stage each, with autosplit's plan (1F1B, 16 microbatches), against the same model and batch
   trained in one process on one thread. Both steps are forward, backward and AdamW; they are
   timed in interleaved rounds (the one-process step on rank 0 while rank 1 waits), so both see
   the same machine, and each is the best of its rounds. Target: 2 processes ≥ 1.6 × one
   process. The model is shaped so that what crosses the cut (one microbatch of activations each
   way) is small next to a stage's compute.
2. Balance: an MLP whose layer widths differ a lot, run by the same runtime with autosplit's plan
   and with a uniform split (the same number of layers per stage, made a Plan by pinning each
   layer to its stage: ``SolverOptions.pin``). Measured: the step time of each (best of
   interleaved rounds); and each stage's forward and backward of one microbatch, timed alone on
   its rank (best of 7), next to the plan's ``Stage.compute_s``.

Each process sets ``torch.set_num_threads(1)``; rank 0 plans (``plan_and_broadcast``) with its CPU
measured at that thread count. The machine's other work loads it unevenly: rerun when figures
look disturbed (the reference-loop time in the machine line helps compare runs).

    python benchmarks/bench_distributed.py        # prints and records into benchmarks/RESULTS.md
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from _ranks import run_on_ranks  # noqa: E402
from _results import machine, record  # noqa: E402

import autosplit.distributed  # noqa: E402

WORLD = 2
ROUNDS = 6
STEPS = 2
"""Timed steps per round (after a warm-up round). Each figure is the best round: other work on this
shared machine only ever slows a round down, and a 2-process round needs both of its cores."""
TARGET = 1.6
TIMEOUT_S = 900

GPT_BATCH, GPT_SEQ, GPT_MICROBATCHES = 128, 64, 16
"""Microbatches of 8 × 64 tokens, 16 of them: the 2 stages are idle 1/17 of the step (the 1F1B fill
and drain; 8 microbatches would leave 1/9). With microbatches of 4 the per-microbatch overhead cost
about 8% per sample and the ratio measured 1.26-1.61×. The one-process step of the whole batch of
128 costs somewhat more per sample than one of 64 (a larger working set), which this comparison,
the same model and batch both ways, counts in the pipeline's favour."""
MLP_WIDTHS = (512, 2048, 512, 2048, 512, 256, 128, 128, 128)
"""Layer i maps MLP_WIDTHS[i] features to MLP_WIDTHS[i + 1]: the first four layers do almost all the
work, so a split with four layers per stage leaves the second stage nearly idle."""
MLP_BATCH, MLP_MICROBATCHES = 384, 8


class UnevenMLP(nn.Module):
    def __init__(self, widths=MLP_WIDTHS):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.GELU()) for a, b in zip(widths, widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _gpt():
    from torchrun_train import GPT, GPTConfig, counting_batch, lm_loss

    config = GPTConfig(vocab_size=512, block_size=GPT_SEQ, n_layer=8, n_head=4, n_embd=256)
    torch.manual_seed(0)
    ids, targets = counting_batch(config, GPT_BATCH, GPT_SEQ, torch.Generator().manual_seed(1))
    description = (f"GPT, {config.n_layer} layers, d={config.n_embd}, vocab {config.vocab_size}, batch "
                   f"{GPT_BATCH}×{GPT_SEQ}")
    return description, GPT(config), ids, targets, lm_loss


def _timed(step, steps: int) -> float:
    """Seconds per step of ``steps`` calls, started together on every rank."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def _training_step(model_or_pipe, optimizer, x, y, loss_fn):
    if isinstance(model_or_pipe, autosplit.distributed.DistributedPipeline):
        def step():
            model_or_pipe.step(x, target=y)
            optimizer.step()
            optimizer.zero_grad()
    else:
        def step():
            loss_fn(model_or_pipe(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    return step


def throughput(rank: int) -> dict:
    """Rank 0: one-process steps; both ranks: pipelined steps; interleaved rounds."""
    description, model, ids, targets, loss_fn = _gpt()
    single = None
    if rank == 0:
        import copy

        single = copy.deepcopy(model)
    batch_dims = {"ids": 0}  # the batch and the sequence are both 64 long
    plan = autosplit.distributed.plan_and_broadcast(model, example_inputs=(ids,), microbatches=GPT_MICROBATCHES,
                                                    batch_dims=batch_dims,
                                                    samples_per_microbatch=GPT_BATCH // GPT_MICROBATCHES)
    pipe = autosplit.distributed.build(model, plan, loss_fn=loss_fn, example_inputs=(ids,), batch_dims=batch_dims)
    pipe_step = _training_step(pipe, torch.optim.AdamW(pipe.parameters(), lr=1e-4), ids, targets, loss_fn)
    single_step = (_training_step(single, torch.optim.AdamW(single.parameters(), lr=1e-4), ids, targets, loss_fn)
                   if rank == 0 else None)
    one, two = [], []
    for r in range(ROUNDS + 1):  # round 0 warms up
        dist.barrier()
        if rank == 0:
            one.append(_timed_alone(single_step, STEPS if r else 2))
        two.append(_timed(pipe_step, STEPS if r else 2))
    return {"description": description, "plan": plan, "one_s": one[1:], "two_s": two[1:],
            "stage_s": _stage_seconds_in_turn(pipe)}


def _timed_alone(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def _stage_seconds(pipe, reps: int = 7) -> float:
    """The best seconds of the forward and backward of one microbatch through this rank's stage
    alone, on inputs of the shapes it receives."""
    inputs = []
    for meta in pipe._chain.received[pipe.stage]:
        if meta.is_floating_point():
            inputs.append(torch.randn(meta.shape, dtype=meta.dtype).requires_grad_(not pipe.is_first))
        else:
            inputs.append(torch.zeros(meta.shape, dtype=meta.dtype))

    def once():
        outputs = [o for o in pipe.module(*inputs) if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])

    times = []
    for i in range(reps + 2):
        start = time.perf_counter()
        once()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return min(times)


def _stage_seconds_in_turn(pipe) -> float:
    """This rank's :func:`_stage_seconds`, timed while the other ranks wait (not on its core)."""
    seconds = None
    for rank in range(WORLD):
        dist.barrier()
        if rank == pipe.stage:
            seconds = _stage_seconds(pipe)
    dist.barrier()
    return seconds


def balance(rank: int) -> dict:
    """autosplit's plan and a uniform split of the uneven MLP, in interleaved rounds."""
    torch.manual_seed(0)
    model = UnevenMLP()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(MLP_BATCH, MLP_WIDTHS[0], generator=g), torch.randn(MLP_BATCH, MLP_WIDTHS[-1], generator=g)
    half = (len(MLP_WIDTHS) - 1) // WORLD
    uniform_pin = {f"blocks.{i}": min(i // half, WORLD - 1) for i in range(len(MLP_WIDTHS) - 1)}
    runs = {}
    for name, pin in (("autosplit", {}), ("uniform", uniform_pin)):
        plan = autosplit.distributed.plan_and_broadcast(model, example_inputs=(x,), microbatches=MLP_MICROBATCHES,
                                                        samples_per_microbatch=MLP_BATCH // MLP_MICROBATCHES, pin=pin)
        pipe = autosplit.distributed.build(model, plan, loss_fn=F.mse_loss, example_inputs=(x,))
        step = _training_step(pipe, torch.optim.AdamW(pipe.parameters(), lr=1e-4), x, y, F.mse_loss)
        runs[name] = {"plan": plan, "pipe": pipe, "step": step, "step_s": []}
    for r in range(ROUNDS + 1):
        for run in runs.values():
            seconds = _timed(run["step"], STEPS if r else 2)
            if r:
                run["step_s"].append(seconds)
    return {name: {"plan": run["plan"], "step_s": run["step_s"], "stage_s": _stage_seconds_in_turn(run["pipe"])}
            for name, run in runs.items()}


def _measure(rank: int) -> dict:
    return {"throughput": throughput(rank), "balance": balance(rank)}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _step_s(reports: list[dict], part: str, name: str | None = None) -> float:
    """The best round's step time, each round timed on its slower rank."""
    rounds = [r[part][name]["step_s"] if name else r[part]["two_s"] for r in reports]
    return min(max(times) for times in zip(*rounds))


def throughput_rows(reports: list[dict]) -> tuple[list[str], float]:
    first = reports[0]["throughput"]
    plan = first["plan"]
    one_s, two_s = min(first["one_s"]), _step_s(reports, "throughput")
    ratio = one_s / two_s
    alone = [r["throughput"]["stage_s"] for r in reports]
    ideal_s = (GPT_MICROBATCHES + len(plan.stages) - 1) * max(alone)
    rows = [
        "| model | one process ms/step | 2 processes ms/step (predicted) | one process samples/s | "
        "2 processes samples/s | ratio | target met |",
        "|---|---|---|---|---|---|---|",
        f"| {first['description']}, {GPT_MICROBATCHES} microbatches of {GPT_BATCH // GPT_MICROBATCHES}, 1F1B | "
        f"{_ms(one_s)} | {_ms(two_s)} ({_ms(plan.step_s)}) | {GPT_BATCH / one_s:.1f} | {GPT_BATCH / two_s:.1f} | "
        f"**{ratio:.2f}×** (≥ {TARGET}) | {'yes' if ratio >= TARGET else 'NO'} |",
        "",
        "| stage | modules | fwd+bwd per microbatch, measured alone ms | predicted compute ms | "
        "predicted transfers ms |",
        "|---|---|---|---|---|",
        *(f"| {s.index} | `{s.modules[0]} → {s.modules[-1]}` | {_ms(alone[s.index])} | {_ms(s.compute_s)} | "
          f"{_ms(s.comm_in_s + s.comm_out_s)} |" for s in plan.stages),
        "",
        f"With the stages' measured times, a step of (microbatches + stages − 1) × the slower stage would take "
        f"{_ms(ideal_s)} ms; the measured step takes {two_s / ideal_s:.2f}× that (the rest: the optimizer, the tied "
        "embedding's gradient sum, the agreement before each step, transfers and waits between the ranks, and both "
        "ranks computing at once where each was timed alone; not measured apart). "
        f"Per sample: {_ms(one_s / GPT_BATCH)} ms in the one-process step, "
        f"{_ms(sum(alone) / (GPT_BATCH // GPT_MICROBATCHES))} ms through both stages in microbatches (measured alone).",
    ]
    return rows, ratio


def balance_rows(reports: list[dict]) -> tuple[list[str], float]:
    rows = ["| split | stages | step ms, measured (predicted) | stage | measured fwd+bwd ms | predicted compute ms | "
            "measured ÷ predicted |", "|---|---|---|---|---|---|---|"]
    steps, ratios = {}, []
    for name in ("autosplit", "uniform"):
        plan = reports[0]["balance"][name]["plan"]
        steps[name] = _step_s(reports, "balance", name)
        cuts = " \\| ".join(f"`{s.modules[0]} → {s.modules[-1]}`" for s in plan.stages)
        for stage in plan.stages:
            measured = reports[stage.index]["balance"][name]["stage_s"]
            ratios.append(measured / stage.compute_s)
            head = f"| {name} | {cuts} | {_ms(steps[name])} ({_ms(plan.step_s)}) " if stage.index == 0 else "| | | "
            rows.append(f"{head}| {stage.index} | {_ms(measured)} | {_ms(stage.compute_s)} | "
                        f"{measured / stage.compute_s:.2f} |")
    ratio = steps["uniform"] / steps["autosplit"]
    predicted = {name: reports[0]["balance"][name]["plan"].step_s for name in steps}
    rows += ["", f"Uniform split ÷ autosplit's plan, step time: **{ratio:.2f}×** measured, "
                 f"{predicted['uniform'] / predicted['autosplit']:.2f}× predicted. Measured ÷ predicted stage times "
                 f"range {min(ratios):.2f}–{max(ratios):.2f} here (the analytic cost model with its default "
                 "efficiencies, not fitted to this CPU)."]
    return rows, ratio


def main() -> None:
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    reports = run_on_ranks(_measure, world=WORLD, timeout_s=TIMEOUT_S)
    load_after = os.getloadavg()[0]
    throughput_table, ratio = throughput_rows(reports)
    balance_table, _ = balance_rows(reports)
    print("\n".join(throughput_table + [""] + balance_table))
    print(f"wall time {time.perf_counter() - start:.0f} s; load average {load_before:.1f} before, "
          f"{load_after:.1f} after")
    widths = " → ".join(map(str, MLP_WIDTHS))
    record("distributed", "\n".join([
        "## Pipelined training across processes (`benchmarks/bench_distributed.py`)",
        "",
        f"Machine: {machine()}.",
        "",
        "2 processes on localhost (gloo), one pipeline stage and one thread (`torch.set_num_threads(1)`) each. The",
        "machine has 2 cores, one per process, and is shared with other work (1-minute load average",
        f"{load_before:.1f} when the run began, {load_after:.1f} when it ended). Each step time is the best of "
        f"{ROUNDS} interleaved",
        f"rounds of {STEPS} steps (forward, backward, AdamW), a 2-process step timed on the slower rank. Predicted:",
        "the plan's `step_s`, (microbatches + stages − 1) × the bottleneck stage, with the CPU calibrated on rank 0",
        "at one thread. Measured alone: one microbatch's forward and backward through the rank's stage (inputs of",
        "the shapes it receives, a gradient of ones), best of 7, while the other rank waits.",
        "",
        "Throughput: the same model and batch in one process on one thread, and in 2 processes with autosplit's",
        "plan.",
        "",
        *throughput_table,
        "",
        f"Balance: an MLP whose layer widths differ a lot ({widths}; Linear + GELU",
        f"per layer, batch {MLP_BATCH} in {MLP_MICROBATCHES} microbatches, 1F1B), with autosplit's plan and with a "
        "uniform split (the same",
        "number of layers per stage, pinned with `SolverOptions.pin`), run by the same runtime.",
        "",
        *balance_table,
    ]))
    if ratio < TARGET:
        print(f"throughput ratio {ratio:.2f} is below the target {TARGET}")


if __name__ == "__main__":
    main()
