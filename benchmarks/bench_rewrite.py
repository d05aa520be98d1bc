"""What splitting costs and how fast planning is, on this machine.

1. devices=1 overhead: one training step (forward, backward, AdamW) of a GPT-2-shaped model,
   the original against ``autosplit(model, devices=1)``, timed in interleaved rounds (so both see
   the same machine), median of each. Target: the split module within 2% of the original.
2. microbatching: the same step on 2 CPU devices with the batch in 1 and in 4 microbatches. CPU
   devices share this process's one thread, so the wavefront cannot overlap stages here: this is
   the cost of the runner and of smaller matmuls, the price paid before any overlap; the overlap
   itself needs CUDA devices (a stream each).
3. ``autosplit plan llama-70b --devices 8 --gpu h100 --mode infer``, end to end as a user runs it
   (a new process: imports, building on meta, capture, pricing, solving, printing). Target: < 30 s.
   ``--before CHECKOUT`` times another checkout's command beside it, runs alternating.

    python benchmarks/bench_rewrite.py        # prints and records into benchmarks/RESULTS.md
    python benchmarks/bench_rewrite.py --before /tmp/before   # after: git worktree add /tmp/before REV
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _results import machine, record  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import autosplit  # noqa: E402

ROUNDS = 30
CLI_RUNS = 3
CLI_COMMAND = ["autosplit", "plan", "llama-70b", "--devices", "8", "--gpu", "h100", "--mode", "infer"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpt2():
    from transformers import GPT2LMHeadModel

    import models

    torch.manual_seed(0)
    config = models.tiny_gpt2_config(n_layer=4, n_embd=256, n_head=4, vocab_size=4096, n_positions=256)
    return GPT2LMHeadModel(config), torch.randint(0, config.vocab_size, (8, 128))


def _interleaved(models: dict[str, torch.nn.Module], ids: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds of one AdamW training step of each model, timed in interleaved rounds."""
    steps = {}
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        kwargs = {"use_cache": False} if name == "original" else {}

        def step(model=model, optimizer=optimizer, kwargs=kwargs):
            logits = model(ids, **kwargs).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    times = {name: [] for name in steps}
    for r in range(rounds + 3):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if r >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def overhead() -> tuple[str, float]:
    original, ids = _gpt2()
    split = autosplit.autosplit(copy.deepcopy(original), devices=1, example_inputs=(ids,))
    medians = _interleaved({"original": original, "autosplit": split}, ids, ROUNDS)
    ratio = medians["autosplit"] / medians["original"]
    row = (f"| GPT-2 shape, 4 layers, d=256, 8×128, fp32 AdamW step | {medians['original'] * 1e3:.1f} | "
           f"{medians['autosplit'] * 1e3:.1f} | **{ratio:.3f}** (≤ 1.02) | {'yes' if ratio <= 1.02 else 'NO'} |")
    return row, ratio


def microbatching() -> tuple[str, float]:
    original, ids = _gpt2()
    one = autosplit.autosplit(copy.deepcopy(original), devices=2, example_inputs=(ids,))
    four = autosplit.autosplit(copy.deepcopy(original), devices=2, example_inputs=(ids,), microbatches=4)
    medians = _interleaved({"m=1": one, "m=4": four}, ids, ROUNDS // 2)
    ratio = medians["m=4"] / medians["m=1"]
    row = (f"| same model and step, 2 CPU devices | {medians['m=1'] * 1e3:.1f} | {medians['m=4'] * 1e3:.1f} | "
           f"**{ratio:.3f}** |")
    return row, ratio


def _plan_s(tree: str) -> float:
    """Seconds from process start to printed table of the planning command, run from ``tree``'s
    sources (PYTHONPATH), whatever copy of autosplit is installed."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "autosplit", *CLI_COMMAND[1:]], capture_output=True, text=True,
                          cwd=tree, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": tree})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(CLI_COMMAND)} failed in {tree}:\n{done.stderr}")
    return seconds


def _revision(tree: str) -> str:
    done = subprocess.run(["git", "-C", tree, "log", "-1", "--format=%h %cs"], capture_output=True, text=True)
    return done.stdout.strip() or os.path.basename(os.path.abspath(tree))


def cli_end_to_end(before: str | None = None) -> tuple[list[str], float]:
    """The planning command's median time over CLI_RUNS runs of this checkout; with ``before``
    (the root of another checkout, e.g. ``git worktree add /tmp/before HEAD~3``), that
    checkout's too, runs alternating so both see the same machine."""
    trees = {"now": ROOT} if before is None else {"before": before, "now": ROOT}
    runs: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(CLI_RUNS):
        for name, tree in trees.items():
            runs[name].append(_plan_s(tree))
    seconds = {name: statistics.median(r) for name, r in runs.items()}
    command = f"`{' '.join(CLI_COMMAND)}`"
    if before is None:
        rows = ["| command | seconds | target met |", "|---|---|---|",
                f"| {command} | **{seconds['now']:.1f}** (< 30) | {'yes' if seconds['now'] < 30 else 'NO'} |"]
    else:
        rows = [f"| command | before ({_revision(before)}) s | now ({_revision(ROOT)}) s | target met |",
                "|---|---|---|---|",
                f"| {command} | {seconds['before']:.1f} | **{seconds['now']:.1f}** (< 30) | "
                f"{'yes' if seconds['now'] < 30 else 'NO'} |"]
    return rows, seconds["now"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", metavar="CHECKOUT",
                        help="root of another checkout whose planning command is timed beside this one's")
    args = parser.parse_args()
    overhead_row, _ = overhead()
    print(overhead_row, flush=True)
    microbatch_row, _ = microbatching()
    print(microbatch_row, flush=True)
    cli_rows, _ = cli_end_to_end(args.before)
    print("\n".join(cli_rows), flush=True)
    record("rewrite", "\n".join([
        "## Split module and CLI (`benchmarks/bench_rewrite.py`)",
        "",
        f"Machine: {machine()}.",
        "",
        "devices=1: median training step of the original model and of `autosplit(model, devices=1)`, timed",
        f"in {ROUNDS} interleaved rounds.",
        "",
        "| model | original ms | autosplit ms | ratio | target met |",
        "|---|---|---|---|---|",
        overhead_row,
        "",
        "Microbatching in one process: the same step with the batch of 8 in 1 and in 4 microbatches (GPipe",
        f"wavefront), {ROUNDS // 2} interleaved rounds. CPU devices share one thread, so stages cannot overlap",
        "here: the ratio is what the runner and the smaller matmuls cost before any overlap. Overlap needs",
        "CUDA devices (a stream each) and was not measured on this machine.",
        "",
        "| case | m=1 ms | m=4 ms | m=4 ÷ m=1 |",
        "|---|---|---|---|",
        microbatch_row,
        "",
        f"Planning from a shell, process start to printed table, median of {CLI_RUNS} runs (of this checkout's",
        "sources, whichever autosplit is installed):",
        "",
        *cli_rows,
    ]))


if __name__ == "__main__":
    main()
