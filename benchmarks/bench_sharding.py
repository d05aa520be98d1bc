"""Tensor-parallel layout planning speed on the Llama-70B graph (batch 1, seq 4096, bf16, on meta).

A joint planner asks, for tp = 2, 4 and 8, for every node's layouts and a choice of them under
two memory weights. Timed per tp: ``node_layouts`` plus ``choose_layouts`` with weight 0 (the
first call), and ``choose_layouts`` with weight 1e-9 given those layouts (the second call), in
one process after one capture, in order tp = 2, 4, 8 (tp = 2 also pays the one-off work: DTensor's
first decomposition tracing, the graph's repeated blocks). Targets: first call ≤ 0.8 s, second
≤ 0.3 s for tp 4 and 8.

    python benchmarks/bench_sharding.py         # prints and records into benchmarks/RESULTS.md
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _results import machine, record  # noqa: E402

FIRST_TARGET_S = 0.8
SECOND_TARGET_S = 0.3


def main() -> None:
    import torch

    from autosplit import presets
    from autosplit.sharding import choose_layouts, node_layouts
    from autosplit.trace import capture
    from cost_models import Cluster, price_graph

    model, inputs = presets.build("llama-70b", batch=1, seq=4096)
    traced = capture(model.to(torch.bfloat16), inputs)
    costs = price_graph(traced.graph_module, training=True)
    cluster = Cluster.parse("4x8xh100")
    rows = []
    for tp in (2, 4, 8):
        ranks = list(range(tp))
        start = time.perf_counter()
        layouts = node_layouts(traced.graph_module, tp)
        enumerated = time.perf_counter()
        choose_layouts(traced, costs, cluster, ranks, layouts=layouts, memory_weight_s_per_byte=0.0)
        first = time.perf_counter()
        choose_layouts(traced, costs, cluster, ranks, layouts=layouts, memory_weight_s_per_byte=1e-9)
        second = time.perf_counter()
        rows.append(f"| {tp} | {enumerated - start:.2f} | {first - enumerated:.2f} | **{first - start:.2f}** | "
                    f"**{second - first:.2f}** |")
        print(rows[-1], flush=True)
    body = "\n".join([
        "## Tensor-parallel layouts of Llama-70B (`benchmarks/bench_sharding.py`)",
        "",
        f"Machine: {machine()}.",
        "",
        f"{len(traced.graph.nodes):,} nodes, cluster 4x8xh100. Targets: first call ≤ {FIRST_TARGET_S} s, "
        f"second ≤ {SECOND_TARGET_S} s (tp = 2 also pays one-off work).",
        "",
        "| tp | node_layouts s | choose_layouts (weight 0) s | first call s | second call (weight 1e-9) s |",
        "|---|---|---|---|---|",
        *rows,
    ])
    record("sharding", body)


if __name__ == "__main__":
    main()
