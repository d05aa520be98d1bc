"""Shared by the benchmarks: describe the machine and write a section of RESULTS.md in place."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
HEADER = "# Benchmark results\n\nEach section is rewritten by the script named in it; rerun a script to refresh its figures.\n"


def machine() -> str:
    """One line: CPU model, cores, memory, Python, torch and transformers versions, date."""
    import torch

    from cost_models.devices import cpu_model_name

    cpu = cpu_model_name()
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) / 2**20
    except (OSError, StopIteration):
        mem_gib = float("nan")
    try:
        import transformers

        hf = f", transformers {transformers.__version__}"
    except ImportError:
        hf = ""
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM; Python {platform.python_version()}, "
            f"torch {torch.__version__}{hf}; {datetime.date.today().isoformat()}; reference loop "
            f"{reference_s():.3f} s (a fixed Python workload: this shared machine's speed varies by up to 2× "
            "over a day, and times scale with it)")


def reference_s() -> float:
    """Median seconds of a fixed pure-Python workload (capture and planning are Python-bound),
    so figures from different runs can be compared."""
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i % 7
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def record(section: str, body: str) -> None:
    """Replace (or append) the section called ``section`` of RESULTS.md with ``body``."""
    text = open(RESULTS).read() if os.path.exists(RESULTS) else HEADER
    block = f"<!-- {section}:start -->\n{body.rstrip()}\n<!-- {section}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(section)}:start -->.*?<!-- {re.escape(section)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    with open(RESULTS, "w") as f:
        f.write(text)
