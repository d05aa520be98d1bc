"""Shared by the benchmarks: describe the machine and write a section of RESULTS.md in place."""

from __future__ import annotations

import datetime
import os
import platform
import re

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
            f"torch {torch.__version__}{hf}; {datetime.date.today().isoformat()}")


def record(section: str, body: str) -> None:
    """Replace (or append) the section called ``section`` of RESULTS.md with ``body``."""
    text = open(RESULTS).read() if os.path.exists(RESULTS) else HEADER
    block = f"<!-- {section}:start -->\n{body.rstrip()}\n<!-- {section}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(section)}:start -->.*?<!-- {re.escape(section)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    with open(RESULTS, "w") as f:
        f.write(text)
