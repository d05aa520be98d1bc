"""Capture speed and memory: GPT-2-XL-shaped and Llama-70B-shaped models on ``meta``.

Each model is captured in a fresh process, so its peak RSS is its own (it includes importing
torch and transformers). Timed: capture() (trace + annotate) and OpGraph + coarsen(), not the
imports or building the model on meta. Targets: GPT-2-XL under 10 s, Llama-70B under 30 s, each
under 2 GB peak RSS.

    python benchmarks/bench_trace.py            # prints and records into benchmarks/RESULTS.md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import machine, record  # noqa: E402

CASES = [  # preset, batch, seq, target seconds
    ("gpt2-xl", 1, 1024, 10.0),
    ("llama-70b", 1, 4096, 30.0),
]
RSS_TARGET_BYTES = 2 * 10**9

CHILD = r"""
import json, resource, sys, time
import torch
from autosplit import OpGraph, capture, presets
name, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, inputs = presets.build(name, batch=batch, seq=seq)
start = time.perf_counter()
traced = capture(model, inputs)
captured = time.perf_counter()
graph = OpGraph.from_traced(traced)
blocks = graph.coarsen()
fingerprint = graph.fingerprint()
done = time.perf_counter()
assert all(p.is_meta for p in model.parameters())
print(json.dumps(dict(
    capture_s=captured - start, graph_s=done - captured, total_s=done - start,
    peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    params=traced.parameter_count(), nodes=len(traced.nodes), blocks=len(blocks), tracer=traced.tracer,
)))
"""


def run(name: str, batch: int, seq: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, name, str(batch), str(seq)],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"capturing {name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = []
    for name, batch, seq, target_s in CASES:
        r = run(name, batch, seq)
        ok = r["total_s"] < target_s and r["peak_rss_bytes"] < RSS_TARGET_BYTES
        rows.append(
            f"| {name} | {r['params'] / 1e9:.2f}B | {batch}×{seq} | {r['tracer']} | {r['nodes']:,} | {r['blocks']} | "
            f"{r['capture_s']:.2f} | {r['graph_s']:.2f} | **{r['total_s']:.2f}** (< {target_s:.0f}) | "
            f"**{r['peak_rss_bytes'] / 1e9:.2f}** (< 2) | {'yes' if ok else 'NO'} |"
        )
        print(rows[-1], flush=True)
    body = "\n".join([
        "## Capture on meta (`benchmarks/bench_trace.py`)",
        "",
        f"Machine: {machine()}.",
        "",
        "Time from a built meta model to an annotated graph, its OpGraph, blocks and fingerprint; peak RSS of",
        "the whole process (imports included), each model in its own process.",
        "",
        "| model | params | input | tracer | nodes | blocks | capture s | graph s | total s | peak RSS GB | target met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    record("trace", body)


if __name__ == "__main__":
    main()
