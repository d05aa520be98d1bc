"""Splits of the chain into contiguous stages: the exact DP, and the stages each op can take.

    bottleneck_s, cuts = chain_dp(model, range(chain.n + 1))   # cut positions: where stages 1.. start

``chain_dp`` is a linear partition by dynamic programming over cut positions: f[s][j] = min over i
of max(f[s − 1][i], time of stage s on [i, j)), least traffic among ties. ``stage_ranges`` bounds
the stages each op can take in any split at least as fast as a given one (its ancestors must fit
in the stages before, its descendants in those after), which narrows every later search to a few
cut positions. ``_fill`` fills the stages greedily from the front: it finds a split that fits by
memory whenever one exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from autosplit.graph import OpGraph
from autosplit.solver.stage_model import StageModel


def chain_dp(model: StageModel, candidates: Sequence[int],
             ranges: tuple[np.ndarray, np.ndarray] | None = None,
             upper_s: float | None = None) -> tuple[float, list[int]] | None:
    """The best split of the chain into len(model.device_order) non-empty intervals whose ends
    lie in ``candidates`` (which include 0 and n): minimal bottleneck, then minimal traffic.

    f[s][j] = min over i of max(f[s − 1][i], time of stage s on [i, j)), O(S · |candidates|²),
    vectorized over i. With ``ranges`` (``stage_ranges``), stage s only starts where op k − 1
    can be on s − 1 and op k on s. With ``upper_s`` only splits whose bottleneck is at most
    ``upper_s`` are searched: a stage over it ends every split through it, so a stage is priced
    only on the starts whose work fits. Returns (bottleneck seconds, cut positions) or None if
    nothing fits (under ``upper_s``).

    The memory check (and pins) costs most per call, so the DP first runs without it: when every
    stage of that split fits, no split that fits can be faster, and it is the answer (the same
    bottleneck; among equal ones, the DP's choice may differ). Otherwise the DP runs again with
    the check on every stage.
    """
    c = np.array(sorted(set(candidates)))
    n = model.chain.n
    assert c[0] == 0 and c[-1] == n
    S = len(model.device_order)
    starts = np.ones((S + 1, len(c)), dtype=bool)
    if ranges is not None:
        first, last = ranges
        inner = c[1:-1]
        for s in range(1, S):
            starts[s, 1:-1] = (first[inner] <= s) & (s <= last[inner]) \
                & (first[inner - 1] <= s - 1) & (s - 1 <= last[inner - 1])
    limit = math.inf if upper_s is None else upper_s * (1 + 1e-9) + 1e-15
    relaxed = _dp_pass(model, c, starts, limit, check=False)
    if relaxed is None:
        return None
    ends = [0, *relaxed[1], n]
    if all(model.allowed(s, np.array([ends[s]]), ends[s + 1])[0] for s in range(S)):
        return relaxed
    for gpu in set(model.device_order.gpu):  # the stage memory of every candidate run, as a table
        model.memory.prepare(c, cpu=not gpu)
    return _dp_pass(model, c, starts, limit, check=True)


def _dp_pass(model: StageModel, c: np.ndarray, starts: np.ndarray, limit: float,
             check: bool) -> tuple[float, list[int]] | None:
    """``chain_dp`` over the sorted candidates ``c``: stage s starts only where ``starts[s]``,
    no stage above ``limit``; memory and pins checked when ``check``."""
    n, S = model.chain.n, len(model.device_order)
    inf = math.inf
    best = np.full((S, len(c)), inf)
    traffic = np.full((S, len(c)), inf)
    back = np.full((S, len(c)), -1, dtype=np.int64)
    for s in range(S):
        ops_s = model.chain.time_s[model.device_order.types[s]][c]  # the ops of [i, j) alone take t[j] − t[i]
        for jj in range(1, len(c)):
            j = int(c[jj])
            if (s == S - 1 and j != n) or (s < S - 1 and not starts[s + 1][jj]):
                continue
            if s == 0:
                ii = np.array([0])
            else:
                ii = np.arange(max(1, int(np.searchsorted(ops_s, ops_s[jj] - limit))), jj)
                ii = ii[np.isfinite(best[s - 1][ii]) & starts[s][ii]]
                if not len(ii):
                    continue
            i = c[ii]
            comm = model.traffic_s(s, i, j)
            stage = model.work_s(s, i, j) + comm
            if s == 0:
                value, moved = stage, comm
            else:
                value, moved = np.maximum(best[s - 1][ii], stage), traffic[s - 1][ii] + comm
            ok = value <= limit
            if check and ok.any():
                ok[ok] = model.allowed(s, i[ok], j)
            if not ok.any():
                continue
            ii, value, moved = ii[ok], value[ok], moved[ok]
            lowest = value.min()
            ties = np.nonzero(value <= lowest * (1 + 1e-9) + 1e-15)[0]
            k = ties[np.argmin(moved[ties])]
            best[s][jj], traffic[s][jj], back[s][jj] = value[k], moved[k], ii[k]
    if not np.isfinite(best[S - 1][-1]):
        return None
    cuts, jj = [], len(c) - 1
    for s in range(S - 1, 0, -1):
        jj = int(back[s][jj])
        cuts.append(int(c[jj]))
    return float(best[S - 1][-1]), sorted(cuts)


def stage_ranges(model: StageModel, graph: OpGraph, bound_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The stages each op can take in any split whose bottleneck is at most ``bound_s``.

    An op on stage s has all its ancestors on stages 0..s and all its descendants on stages
    s..S − 1. Priced on the fastest device type per op, stage q holds at most share[q] · bound_s
    of work (``stage_shares``: 1 on identical devices), so (ancestors' work) ≤ Σ_{q ≤ s} share[q]
    · bound_s and (descendants' work) ≤ Σ_{q ≥ s} share[q] · bound_s. Traffic and memory only
    shrink the ranges further, so they hold for every split at or below the bound. Returns
    (first, last) stage per chain op; first > last where the op fits no stage.
    """
    S = len(model.device_order)
    up, down = model.closure_work(graph)
    slack = 1 + 1e-9
    share = stage_shares(model, bound_s)
    # first: the fewest leading stages that hold the ancestors; last: likewise from the end.
    first = np.searchsorted(np.cumsum(share), up / (bound_s * slack), side="left").astype(np.int64)
    last = (S - 1 - np.searchsorted(np.cumsum(share[::-1]), down / (bound_s * slack), side="left")).astype(np.int64)
    return first, last


def stage_shares(model: StageModel, bound_s: float) -> np.ndarray:
    """Per stage, the most work its device runs in ``bound_s``, each op priced on the fastest
    device type (as ``closure_work`` prices it), as a share of ``bound_s``: 1 on a device type
    that is the fastest for every op, less on a slower one.

    A fractional knapsack: the stage fills its ``bound_s`` with the ops it is least slow at.
    E.g. gpt2-xl on H100s and CPUs: a launch-bound op takes 5 µs on both, a matmul a hundred
    times longer on the CPU, so in 20 ms a CPU stage holds about 0.2 ms of H100 work: 1% of an
    H100 stage, where counting it as a whole one widens every op's range by a stage. A stage also
    spends time on traffic and must fit its memory, which only lowers what it holds, so the share
    bounds every split.
    """
    chain, types = model.chain, model.device_order.types
    if not 0 < bound_s < math.inf:
        return np.ones(len(types))
    own = {t: np.diff(chain.time_s[t]) for t in set(types)}
    fastest = np.min(np.stack(list(own.values())), axis=0)
    share = {}
    for t, work in own.items():
        if np.array_equal(work, fastest):
            share[t] = 1.0
            continue
        runs = work > 0  # an op free on this type is free on the fastest too
        ratio = fastest[runs] / work[runs]
        order = np.argsort(-ratio, kind="stable")
        spent, held = np.cumsum(work[runs][order]), np.cumsum(fastest[runs][order])
        whole = int(np.searchsorted(spent, bound_s, side="right"))  # ops that fit entirely
        value = float(held[whole - 1]) if whole else 0.0
        if whole < len(order):  # and a fraction of the next one
            value += (bound_s - (float(spent[whole - 1]) if whole else 0.0)) * float(ratio[order[whole]])
        share[t] = min(1.0, value / bound_s)
    return np.array([share[t] for t in types])


def assignment_from_cuts(n: int, cuts: Sequence[int]) -> list[int]:
    """The stage of each of ``n`` chain positions, given the positions where stages start."""
    stages, s, bounds = [], 0, list(cuts) + [n]
    for k in range(n):
        while k >= bounds[s]:
            s += 1
        stages.append(s)
    return stages


def _cut_positions(first: np.ndarray, last: np.ndarray, stages: int) -> np.ndarray:
    """Positions k where some stage s can start, given each op's stage range: op k − 1 can be on
    s − 1 and op k on s, for some 1 ≤ s ≤ stages − 1."""
    low = np.maximum(first[1:], first[:-1] + 1)
    high = np.minimum(last[1:], last[:-1] + 1)
    ok = (low <= high) & (high >= 1) & (low <= stages - 1)
    return np.nonzero(ok)[0] + 1


@dataclass
class _Fill:
    stage: int | None
    """The stage that cannot take the next op (None: all ops placed)."""
    position: int
    unit_too_big: bool
    """Whether that stage cannot take even the next indivisible run of ops on its own."""


def _fill(model: StageModel, cuts: Sequence[int]) -> _Fill:
    """Fill the stages from the front, each as far as its memory allows (pins ignored)."""
    n, S = model.chain.n, len(model.device_order)
    cuts_arr = np.array(cuts)
    i = 0
    for s in range(S):
        later = cuts_arr[cuts_arr > i]
        capacity = model.device_order.capacity_bytes[s]
        fits = lambda k: model.memory_bytes(s, np.array([i]), int(later[k]))[0] <= capacity  # noqa: E731
        if not len(later) or not fits(0):
            return _Fill(s, i, True)
        lo, hi = 0, len(later)  # memory grows with the stage's end: the last end that fits
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        i = int(later[lo])
        if i == n:
            return _Fill(None, n, False)
    return _Fill(S - 1, i, False)
