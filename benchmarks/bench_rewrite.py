"""What splitting costs and how fast planning is, on this machine.

1. devices=1 overhead: one training step (forward, backward, AdamW) of a GPT-2-shaped model,
   the original against ``autosplit(model, devices=1)``, timed in interleaved rounds (so both see
   the same machine), median of each. Target: the split module within 2% of the original.
2. ``autosplit plan llama-70b --devices 8 --gpu h100 --mode infer``, end to end as a user runs it
   (a new process: imports, building on meta, capture, pricing, solving, printing). Target: < 30 s.

    python benchmarks/bench_rewrite.py        # prints and records into benchmarks/RESULTS.md
"""

from __future__ import annotations

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


def overhead() -> tuple[str, float]:
    from transformers import GPT2LMHeadModel

    import models

    torch.manual_seed(0)
    config = models.tiny_gpt2_config(n_layer=4, n_embd=256, n_head=4, vocab_size=4096, n_positions=256)
    original = GPT2LMHeadModel(config)
    ids = torch.randint(0, config.vocab_size, (8, 128))
    split = autosplit.autosplit(copy.deepcopy(original), devices=1, example_inputs=(ids,))
    steps = {}
    for name, model in (("original", original), ("autosplit", split)):
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
    for r in range(ROUNDS + 3):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if r >= 3:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["autosplit"] / medians["original"]
    row = (f"| GPT-2 shape, 4 layers, d=256, 8×128, fp32 AdamW step | {medians['original'] * 1e3:.1f} | "
           f"{medians['autosplit'] * 1e3:.1f} | **{ratio:.3f}** (≤ 1.02) | {'yes' if ratio <= 1.02 else 'NO'} |")
    return row, ratio


def cli_end_to_end() -> tuple[str, float]:
    command = ["autosplit", "plan", "llama-70b", "--devices", "8", "--gpu", "h100", "--mode", "infer"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    row = f"| `{' '.join(command)}` | **{seconds:.1f}** (< 30) | {'yes' if seconds < 30 else 'NO'} |"
    return row, seconds


def main() -> None:
    overhead_row, _ = overhead()
    print(overhead_row, flush=True)
    cli_row, _ = cli_end_to_end()
    print(cli_row, flush=True)
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
        "Planning from a shell, process start to printed table:",
        "",
        "| command | seconds | target met |",
        "|---|---|---|",
        cli_row,
    ]))


if __name__ == "__main__":
    main()
