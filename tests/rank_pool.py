"""Spawned gloo ranks on localhost that run test functions, for the multi-process tests.

    pool = Ranks(world=4, timeout_s=120)
    results = pool.run(fn, *args)      # fn(rank, *args) on every rank, each rank's result in rank order
    pool.close()

Starting a process costs seconds of imports (tens of seconds for 4 ranks on 2 cores), so the
ranks are kept for the whole test session: a module's fixture takes them with
``shared_ranks(world, timeout_s)``, and they are closed when the session ends. A run fails the
test with every failing rank's traceback, or after ``timeout_s``; either way the ranks are then
replaced, since their process group may be left waiting. The ranks keep their default process
group between runs (a run starts it if it is not there), so a rank function leaves no state
behind that the next one would trip over.
"""

import multiprocessing
import os
import queue
import socket
import time
import traceback

import pytest
import torch


class Ranks:
    """``world`` spawned ranks (gloo on localhost) that run functions one after another.
    ``run(fn, *args)`` runs ``fn(rank, *args)`` on every rank and returns each rank's result; it
    fails with every failing rank's traceback, or after ``timeout_s``, and then replaces the
    ranks."""

    def __init__(self, world: int = 2, timeout_s: float = 120.0):
        self.world = world
        self.timeout_s = timeout_s
        self.processes = []

    def run(self, fn, *args):
        if not self.processes:
            self._start()
        for tasks in self.tasks:
            tasks.put((fn, args))
        deadline = time.monotonic() + self.timeout_s
        reports = {}
        while len(reports) < self.world:
            try:
                rank, ok, value = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                pytest.fail(f"ranks {sorted(set(range(self.world)) - set(reports))} did not finish "
                            f"{fn.__name__} within {self.timeout_s:.0f} s")
            reports[rank] = (ok, value)
        failures = [f"rank {rank}:\n{value}" for rank, (ok, value) in sorted(reports.items()) if not ok]
        if failures:
            self.close()
            pytest.fail("\n".join(failures))
        return [reports[rank][1] for rank in range(self.world)]

    def _start(self):
        context = multiprocessing.get_context("spawn")
        self.tasks = [context.Queue() for _ in range(self.world)]
        self.results = context.Queue()
        port = _free_port()
        self.processes = [context.Process(target=_serve, args=(rank, self.world, port, self.tasks[rank], self.results),
                                          daemon=True) for rank in range(self.world)]
        for process in self.processes:
            process.start()

    def close(self):
        for tasks in self.tasks if self.processes else ():
            tasks.put(None)
        deadline = time.monotonic() + 10
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        self.processes = []


_SHARED: dict[int, Ranks] = {}


def shared_ranks(world: int, timeout_s: float = 120.0) -> Ranks:
    """The session's ``world`` ranks (started at their first run), failing a run after
    ``timeout_s``."""
    pool = _SHARED.setdefault(world, Ranks(world, timeout_s))
    pool.timeout_s = timeout_s
    return pool


def close_shared() -> None:
    """Stop the session's ranks."""
    for pool in _SHARED.values():
        pool.close()
    _SHARED.clear()


def _serve(rank, world, port, tasks, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, True, fn(rank, *args)))
        except BaseException:  # reported to the test with its traceback
            results.put((rank, False, traceback.format_exc()))
    # No orderly teardown: destroying groups waits on peers that may be gone already, and
    # threads still waiting on a group (a stopped pipeline's) would abort the exit.
    results.close()
    results.join_thread()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
