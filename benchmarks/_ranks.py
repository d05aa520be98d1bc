"""Spawned gloo ranks on localhost for the multi-process benchmarks.

    reports = run_on_ranks(measure, world=4, timeout_s=600, args=(plan,))   # measure(rank, plan) on each

Each rank runs with one thread, joins a process group started from torchrun-style environment
variables (``autosplit.distributed.init_process_group``), runs ``fn(rank, *args)`` and sends its
result back; a rank that raises ends the benchmark with its traceback, and ranks that do not
finish within ``timeout_s`` end it too.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence


def run_on_ranks(fn: Callable[..., Any], *, world: int, timeout_s: float, args: Sequence[Any] = (),
                 group_timeout_s: float | None = None) -> list[Any]:
    """``fn(rank, *args)`` on ``world`` spawned ranks; each rank's result, in rank order."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [context.Process(target=_rank, args=(fn, rank, world, port, tuple(args), group_timeout_s, results))
                 for rank in range(world)]
    for process in processes:
        process.start()
    reports = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(reports) < world:
            rank, ok, report = results.get(timeout=max(1.0, deadline - time.monotonic()))
            if not ok:
                raise SystemExit(f"rank {rank} failed:\n{report}")
            reports[rank] = report
    except queue.Empty:
        raise SystemExit(f"the ranks did not finish within {timeout_s} s") from None
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return [reports[rank] for rank in range(world)]


def _rank(fn, rank: int, world: int, port: int, args: tuple, group_timeout_s: float | None, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    import autosplit.distributed

    torch.set_num_threads(1)
    try:
        if group_timeout_s is None:
            autosplit.distributed.init_process_group()
        else:
            autosplit.distributed.init_process_group(group_timeout_s)
        results.put((rank, True, fn(rank, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
