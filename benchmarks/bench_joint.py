"""Joint pipeline × tensor × data-parallel plans for Llama-70B against the plans people use.

    python benchmarks/bench_joint.py        # prints and records into benchmarks/RESULTS.md

Llama-2-70B shaped (the ``llama-70b`` preset on meta), training at bf16-mixed with AdamW, sequence
4096, a global batch of 256 sequences, on 4 × 8 and 8 × 8 H100 SXM (NVLink inside a host,
InfiniBand across). Three plans, each priced by the same cost model and memory model:

* **joint**: ``SolverOptions(global_batch=256)``, everything chosen (``autosplit.solver.joint``);
* **pipeline**: the best pure-pipeline plan, data parallel where it fits (the joint search held to
  tensor_parallel=1);
* **Megatron**: the hand plan — TP = 8 inside a host, PP across the fewest hosts whose memory holds
  the model, DP for the rest, 1F1B, selective recomputation, microbatches of 1 sequence — with its
  cuts and layouts solved (its layouts are the column-then-row ones the layout search picks).

Also the wall time of the joint solve on this machine, and of ``autosplit plan llama-70b
--cluster 4x8xh100 --mode train --global-batch 256`` from process start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _results import machine, record  # noqa: E402
from autosplit import presets  # noqa: E402
from autosplit.api import solve_traced  # noqa: E402
from autosplit.errors import InfeasibleError  # noqa: E402
from autosplit.solver import SolverOptions  # noqa: E402
from autosplit.trace import capture  # noqa: E402
from cost_models import Cluster, price_graph  # noqa: E402

SEQ = 4096
GLOBAL_BATCH = 256
CLUSTERS = ("4x8xh100", "8x8xh100")
HOSTS_FOR_MEGATRON = 4
"""Pipeline stages of the hand plan: Llama-70B's weights and AdamW state (about 1.1 TB) on tp = 8 fit
in 4 hosts of 8 × 80 GB, not in 2."""


def _row(label: str, plan, wall_s: float) -> str:
    mesh = plan.mesh
    memory = max(s.memory_bytes for s in plan.stages) / 2**30
    recompute = ", ".join(sorted({s.recompute for s in plan.stages}))
    return (f"| {label} | dp={mesh['dp']} × pp={mesh['pp']} × tp={mesh['tp']} | {plan.microbatches} × "
            f"{plan.microbatch_size} | {recompute} | {plan.step_s:.2f} | {plan.bubble_fraction:.1%} | "
            f"{plan.tokens_per_s:,.0f} | {memory:.1f} | {wall_s:.1f} |")


def main() -> None:
    model, inputs = presets.build("llama-70b", batch=1, seq=SEQ)
    model = model.to(torch.bfloat16)
    start = time.perf_counter()
    traced = capture(model, inputs)
    costs = price_graph(traced.graph_module, training=True)
    capture_s = time.perf_counter() - start
    rows = []
    joint_s = {}
    for text in CLUSTERS:
        cluster = Cluster.parse(text)
        base = dict(global_batch=GLOBAL_BATCH, tokens_per_sample=SEQ, samples_per_microbatch=1)
        found = {}
        for label, extra in [("joint", {}), ("pipeline (tp = 1)", dict(tensor_parallel=1)),
                             ("Megatron hand plan", dict(tensor_parallel=8, stages=HOSTS_FOR_MEGATRON,
                                                         recompute="selective",
                                                         microbatches=GLOBAL_BATCH // (len(cluster) // 8 // HOSTS_FOR_MEGATRON)))]:
            t = time.perf_counter()
            try:
                plan = solve_traced(traced, cluster, SolverOptions(**base, **extra), costs)
            except InfeasibleError as e:
                rows.append(f"| {text} | {label} | does not fit: {str(e)[:120]} | | | | | | | |")
                continue
            wall = time.perf_counter() - t
            found[label] = plan
            rows.append(f"| {text} " + _row(label, plan, wall))
            if label == "joint":
                joint_s[text] = wall
        if "joint" in found:
            others = [p.step_s for k, p in found.items() if k != "joint"]
            verdict = "yes" if all(found["joint"].step_s <= s * (1 + 1e-9) for s in others) else "NO"
            rows.append(f"| {text} | joint ≤ the better of the others | {verdict} | | | | | | | |")
    start = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "autosplit", "plan", "llama-70b", "--cluster", "4x8xh100", "--mode",
                          "train", "--global-batch", str(GLOBAL_BATCH)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cli_s = time.perf_counter() - start
    if cli.returncode:
        raise SystemExit(f"the CLI failed: {cli.stderr}")
    body = "\n".join([
        "## Joint pipeline × tensor × data-parallel plans (`benchmarks/bench_joint.py`)",
        "",
        f"Machine: {machine()}.",
        "",
        f"Llama-2-70B shaped (`llama-70b` preset on meta), training at bf16-mixed with AdamW, sequence {SEQ}, a",
        f"global batch of {GLOBAL_BATCH} sequences; H100 SXM hosts of 8 (NVLink inside, 400 Gb/s InfiniBand",
        "across). Every plan priced by the same cost and memory model; step = (microbatches + stages − 1) ×",
        "the slowest stage's time per microbatch + the replicas' FSDP2 gradient reduction. The Megatron hand",
        f"plan fixes TP = 8, PP = {HOSTS_FOR_MEGATRON} hosts, DP for the rest, selective recomputation, microbatches",
        "of one sequence; its cuts and layouts are solved. `memory` is the fullest device's plan.",
        "",
        "| cluster | plan | mesh | microbatches × size | recompute | step s | bubble | tokens/s | memory GiB | solve s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Capture and pricing of the 70B graph on meta: {capture_s:.1f} s. Joint solve (all meshes, layouts, "
        f"microbatches and recomputation): {', '.join(f'{k} {v:.1f} s' for k, v in joint_s.items())} (target < 10 s "
        f"on 4x8). `autosplit plan llama-70b --cluster 4x8xh100 --mode train --global-batch {GLOBAL_BATCH}` from "
        f"process start: {cli_s:.1f} s (target < 20 s).",
    ])
    print(body)
    record("joint", body)


if __name__ == "__main__":
    main()
