"""Device orders: which device runs each stage, and the search for the best order.

    order = DeviceOrder.of(cluster, (2, 0, 1), headroom=0.1)   # stage 0 on device 2, stage 1 on 0, ...

On identical devices every order is the same. With mixed devices the order matters: which kind
runs which stage, and which devices are left out when there are fewer stages. Two devices of one
kind (type and host, ``device_kinds``) are interchangeable, so only distinct orders count
(``order_count``, listed by ``device_orders``). ``choose_order`` prices up to ``ORDERS_PRICED`` of
them with the chain DP; beyond, ``search_orders`` finds the best order exactly by a DP over how
many devices of each kind the stages so far use, without listing the orders.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from autosplit.solver.chain import Chain
from autosplit.solver.dp import _fill, chain_dp
from autosplit.solver.options import SolverOptions
from autosplit.solver.stage_model import StageModel
from cost_models import Cluster

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceOrder:
    """Which device runs each stage, what it may hold, and the links between consecutive stages."""

    ranks: tuple[int, ...]
    types: tuple[str, ...]
    capacity_bytes: tuple[float, ...]
    gpu: tuple[bool, ...]
    hop_s_per_byte: tuple[float, ...]
    """1 / bandwidth of the link from stage s to s + 1 (length S − 1)."""
    hop_latency_s: tuple[float, ...]

    @classmethod
    def of(cls, cluster: Cluster, ranks: Sequence[int], headroom: float) -> "DeviceOrder":
        devices = [cluster.devices[r] for r in ranks]
        links = [cluster.link(a, b) for a, b in zip(ranks, ranks[1:])]
        return cls(tuple(ranks), tuple(d.name for d in devices),
                   tuple(d.memory_bytes * (1 - headroom) for d in devices), tuple(d.kind == "gpu" for d in devices),
                   tuple(1 / link.bandwidth_bytes_per_s for link in links), tuple(link.latency_s for link in links))

    def __len__(self) -> int:
        return len(self.ranks)


ORDERS_PRICED = 48
"""Up to this many distinct device orders, each is priced with the chain DP; beyond, the exact
order search (``search_orders``) finds the best one."""

ORDER_SEARCH_MAX_CELLS = 4e8
"""Largest order search run, in cells (count vectors × kinds³ × block cut positions², about one
array operation each: ~1 s on this 2-core machine per 1e8). Beyond it (many hosts of many kinds)
a few orders are priced and the plan says the order is not proven best."""


def device_kinds(cluster: Cluster) -> dict[tuple[str, int], list[int]]:
    """The cluster's device kinds, (device type, host), each with its ranks in increasing order;
    kinds in the order of their first rank. Two devices of one kind are interchangeable: the same
    speed and memory, and the same link to every other device."""
    kinds: dict[tuple[str, int], list[int]] = {}
    for rank, (device, host) in enumerate(zip(cluster.devices, cluster.hosts)):
        kinds.setdefault((device.name, host), []).append(rank)
    return kinds


def order_count(counts: Sequence[int], stages: int) -> int:
    """Distinct sequences of ``stages`` kinds drawn from kinds with ``counts`` devices each: the
    distinct device orders along a pipeline of that many stages.

    With every device used this is the multinomial n! ÷ Π cₖ!; with fewer stages, the sum of
    stages! ÷ Π mₖ! over the selections m ≤ c with Σ m = stages. ``ways[t]`` counts sequences of
    length t over the kinds so far; a kind with c devices adds m ≤ c of them in C(t + m, m) ways
    of placing them. E.g. counts (2, 1) and 3 stages: 3 (aab, aba, baa); 2 stages: 3 (aa, ab, ba).
    """
    ways = [1] + [0] * stages
    for c in counts:
        new = [0] * (stages + 1)
        for t, w in enumerate(ways):
            if w:
                for m in range(min(c, stages - t) + 1):
                    new[t + m] += w * math.comb(t + m, m)
        ways = new
    return ways[stages]


def device_orders(cluster: Cluster, stages: int) -> Iterator[tuple[int, ...]]:
    """Every distinct order of ``stages`` of the cluster's devices along the pipeline, as ranks, in
    increasing lexicographic order; the k-th device of a kind used is its k-th rank. Built kind by
    kind (multiset permutations with selection): ``order_count`` orders, never the n! tuples of
    all rank permutations."""
    pools = list(device_kinds(cluster).values())
    used = [0] * len(pools)
    prefix: list[int] = []

    def extend() -> Iterator[tuple[int, ...]]:
        if len(prefix) == stages:
            yield tuple(prefix)
            return
        for k in sorted((k for k in range(len(pools)) if used[k] < len(pools[k])), key=lambda k: pools[k][used[k]]):
            prefix.append(pools[k][used[k]])
            used[k] += 1
            yield from extend()
            used[k] -= 1
            prefix.pop()

    return extend()


@dataclass(frozen=True)
class OrderChoice:
    """The device order chosen for the pipeline and how sure the choice is."""

    model: StageModel
    """The chain priced on the chosen order."""
    bottleneck_s: float
    cuts: list[int]
    """The chain DP's split on that order."""
    tried: int
    """Orders priced one by one with the chain DP."""
    total: int
    """Distinct orders (``order_count``)."""
    gap: float | None
    """(chosen − best order's bottleneck) ÷ chosen, proven; 0 when the order is proven best,
    None when no bound is known."""


NEAR_BLOCKS = 2
"""With a fixed order and cuts from a coarser search, the block-level DP looks this many block
cuts either side of each."""


def choose_order(chain: Chain, cluster: Cluster, stages: int, options: SolverOptions,
                 block_cuts: Sequence[int], fixed: Sequence[int] | None = None,
                 near: Sequence[int] | None = None) -> OrderChoice | None:
    """The device order along the pipeline whose block-level split is best, with its split.

    Up to ``ORDERS_PRICED`` distinct orders, each is priced with ``chain_dp`` (on ops where no block
    split fits). Beyond, ``search_orders`` finds the best order exactly over all of them, which is
    then priced with ``chain_dp``; where that search is too large, the cluster's order and its
    orders by speed are priced, unproven. Ties go to the first order in ``device_orders``.
    ``fixed`` gives the order instead (stage s on device ``fixed[s]``, as a mesh places them):
    it alone is priced, with ``near`` (cut positions found by a coarser search) its DP looks only
    at the block cuts within ``NEAR_BLOCKS`` blocks of them, then at all if none fits there.
    Returns None when no order has a split that fits.
    """
    if stages > len(cluster):
        raise ValueError(f"{stages} stages need at least {stages} devices; the cluster {cluster} has {len(cluster)}")
    kinds = device_kinds(cluster)
    total = order_count([len(ranks) for ranks in kinds.values()], stages)

    def price(order: Sequence[int]) -> tuple[float, StageModel, list[int]] | None:
        model = StageModel(chain, DeviceOrder.of(cluster, order, options.memory_headroom), options, cluster)
        found = chain_dp(model, block_cuts)
        if found is None and options.refine:  # a block may be too big for any device: cut inside
            positions = sorted(set(range(chain.n + 1)) - chain.forbidden)
            if _fill(model, positions).stage is None:  # some split fits by memory (checked greedily first)
                found = chain_dp(model, positions)
        return None if found is None else (found[0], model, found[1])

    def best_of(orders: Sequence[Sequence[int]]) -> tuple[float, StageModel, list[int]] | None:
        best = None
        for order in orders:
            found = price(order)
            if found is not None and (best is None or found[0] < best[0] * (1 - 1e-9)):
                best = found
        return best

    gap: float | None = 0.0
    if fixed is not None:
        if len(fixed) != stages:
            raise ValueError(f"the fixed device order {list(fixed)} must name one device per stage ({stages})")
        orders, total = [tuple(fixed)], 1
        best = None
        if near is not None:
            cuts = sorted(block_cuts)
            at = {c: k for k, c in enumerate(cuts)}
            keep = {cuts[j] for c in near if c in at
                    for j in range(max(0, at[c] - NEAR_BLOCKS), min(len(cuts), at[c] + NEAR_BLOCKS + 1))}
            window = sorted(keep | {cuts[0], cuts[-1]})
            found = chain_dp(StageModel(chain, DeviceOrder.of(cluster, fixed, options.memory_headroom), options,
                                        cluster), window)
            if found is not None:
                best = (found[0], StageModel(chain, DeviceOrder.of(cluster, fixed, options.memory_headroom), options,
                                             cluster), found[1])
        if best is None:
            best = best_of(orders)
    elif total <= ORDERS_PRICED:
        orders = list(device_orders(cluster, stages))
        best = best_of(orders)
    else:
        searched = None
        cells = search_cells(kinds, stages, len(block_cuts))
        if cells <= ORDER_SEARCH_MAX_CELLS:
            start = time.perf_counter()
            searched = search_orders(chain, cluster, stages, options, block_cuts)
            logger.info("order search over %d device orders in %.2f s (%.3g cells): %s", total,
                        time.perf_counter() - start, cells,
                        "no block split fits" if searched is None else f"best {searched[0]:.4g} s")
        else:
            logger.info("order search skipped: %.3g cells > %.3g; pricing the cluster's order and its orders "
                        "by speed", cells, ORDER_SEARCH_MAX_CELLS)
        if searched is not None:
            best_s, order = searched
            orders = [order]
            best = price(order)
            if best is not None:
                gap = max(0.0, (best[0] - best_s) / best[0]) if best[0] > 0 else 0.0
                gap = 0.0 if gap <= 1e-9 else gap
        else:
            speed = [d.flops_for("fp32") for d in cluster.devices]
            ranks = range(len(cluster))
            orders = sorted({tuple(order)[:stages] for order in (
                ranks, sorted(ranks, key=lambda r: -speed[r]), sorted(ranks, key=lambda r: speed[r]))})
            best = best_of(orders)
            gap = None
    if best is None:
        return None
    return OrderChoice(best[1], best[0], best[2], len(orders), total, gap)


def search_cells(kinds: Mapping[tuple[str, int], Sequence[int]], stages: int, positions: int) -> float:
    """An upper bound on the cells ``search_orders`` computes (see ``ORDER_SEARCH_MAX_CELLS``)."""
    vectors = math.prod(min(len(ranks), stages) + 1 for ranks in kinds.values())
    return float(vectors) * len(kinds) ** 3 * positions ** 2


def search_orders(chain: Chain, cluster: Cluster, stages: int, options: SolverOptions,
                  candidates: Sequence[int]) -> tuple[float, tuple[int, ...]] | None:
    """The best bottleneck over every distinct device order and every split at ``candidates``
    (block cut positions), and the first order in ``device_orders`` that reaches it; None when no
    order has a split that fits.

    Exact dynamic programming over orders, without listing them. Stage s of kind κ on [i, j)
    costs its work and memory check on κ (``StageModel`` of a device order of κ alone: stage
    index s sets the microbatches in flight and the pins), plus the traffic at i over the link
    from the previous stage's kind and at j over the link to the next stage's kind. The next kind
    is part of the state so each stage is priced exactly:

        G(s, U, κₚ, κ)[i] = min over κₙ, j of
                            max(cost(s, κₚ → κ → κₙ, [i, j)), G(s + 1, U + e_κ, κ, κₙ)[j])

    the best bottleneck of stages s.. when stage s has kind κ and starts at i, the one before it
    had kind κₚ and U counts the kinds of stages 0..s − 1 (each kind at most its devices). A
    16-device cluster of 4 kinds has 625 count vectors where it has 63 million orders. Then a walk
    from stage 0 takes at each stage the kind with the lowest next rank whose best completion
    (the exact prefix value, max'ed with G) still reaches the optimum: the lexicographically
    first optimal order, the one ``choose_order`` keeps when it prices every order.
    """
    kinds = device_kinds(cluster)
    pools = list(kinds.values())
    K, S = len(pools), stages
    avail = [len(p) for p in pools]
    c = np.array(sorted(set(candidates)))
    C = len(c)
    inf = math.inf
    # Work (and memory, pins) of every stage on every kind, as matrices over (i, j) indices.
    base = np.full((S, K, C, C), inf)
    for k, pool in enumerate(pools):
        alone = StageModel(chain, DeviceOrder.of(cluster, [pool[0]] * S, options.memory_headroom), options, cluster)
        for gpu in set(alone.device_order.gpu):
            alone.memory.prepare(c, cpu=not gpu)
        for s in range(S):
            for jj in range(1, C):
                if s == S - 1 and jj != C - 1:
                    continue
                ii = np.array([0]) if s == 0 else np.arange(1, jj)
                if not len(ii):
                    continue
                ok = alone.allowed(s, c[ii], int(c[jj]))
                base[s, k, ii[ok], jj] = alone.work_s(s, c[ii[ok]], int(c[jj]))
    # Traffic at every cut position over the link between two kinds (two devices of one kind: the
    # link between its first two).
    comm = np.full((K, K, C), inf)
    for a in range(K):
        for b in range(K):
            ra, rb = pools[a][0], (pools[b][0] if a != b else (pools[b][1] if avail[b] > 1 else None))
            if rb is None:
                continue
            link = cluster.link(ra, rb)
            comm[a, b] = chain.cross_bytes[c] / link.bandwidth_bytes_per_s + chain.cross_count[c] * link.latency_s

    def vectors(total: int) -> Iterator[tuple[int, ...]]:
        def fill(k: int, left: int) -> Iterator[tuple[int, ...]]:
            if k == K:
                if left == 0:
                    yield ()
                return
            for m in range(min(avail[k], left) + 1):
                for rest in fill(k + 1, left - m):
                    yield (m, *rest)
        return fill(0, total)

    # G[s][(U, κ)]: rows κₚ (K: no previous stage, for s = 0) × start index i.
    G: list[dict[tuple[tuple[int, ...], int], np.ndarray]] = [{} for _ in range(S)]
    for s in range(S - 1, -1, -1):
        for U in vectors(s):
            kps = [K] if s == 0 else [kp for kp in range(K) if U[kp] > 0]
            for k in range(K):
                if U[k] >= avail[k]:
                    continue
                table = np.full((K + 1, C), inf)
                incoming = np.stack([np.zeros(C) if kp == K else comm[kp, k] for kp in kps])  # (kp, i)
                if s == S - 1:
                    table[kps] = base[s, k, :, C - 1][None, :] + incoming
                else:
                    after = tuple(u + (q == k) for q, u in enumerate(U))
                    kns = [kn for kn in range(K) if after[kn] < avail[kn]]
                    if not kns:
                        continue
                    rest = np.stack([G[s + 1][(after, kn)][k] for kn in kns])  # (kn, j)
                    cost = base[s, k][None, None] + comm[k, kns][None, :, None, :] + incoming[:, None, :, None]
                    table[kps] = np.maximum(cost, rest[None, :, None, :]).min(axis=(1, 3))
                G[s][(U, k)] = table
    start = tuple([0] * K)
    best_s = min((float(G[0][(start, k)][K][0]) for k in range(K) if (start, k) in G[0]), default=inf)
    if not np.isfinite(best_s):
        return None
    reach = best_s * (1 + 1e-9) + 1e-15

    def by_rank(U: Sequence[int]) -> list[int]:
        return sorted((k for k in range(K) if U[k] < avail[k]), key=lambda k: pools[k][U[k]])

    # The walk: the prefix's exact value F[i] (max over its stages, the next stage starting at i).
    U, kinds_used = start, [next(k for k in by_rank(start) if (start, k) in G[0] and G[0][(start, k)][K][0] <= reach)]
    F = np.full(C, inf)
    F[0] = 0.0
    for s in range(S - 1):
        k, kp = kinds_used[-1], (kinds_used[-2] if s > 0 else K)
        incoming = np.zeros(C) if kp == K else comm[kp, k]
        after = tuple(u + (q == k) for q, u in enumerate(U))
        for kn in by_rank(after):
            cost = base[s, k] + incoming[:, None] + comm[k, kn][None, :]
            nxt = np.maximum(F[:, None], cost).min(axis=0)
            if (after, kn) in G[s + 1] and np.maximum(nxt, G[s + 1][(after, kn)][k]).min() <= reach:
                break
        else:  # cannot happen: G is exact
            raise AssertionError("order search: no kind continues an optimal prefix")
        U, F = after, nxt
        kinds_used.append(kn)
    used = [0] * K
    order = []
    for k in kinds_used:
        order.append(pools[k][used[k]])
        used[k] += 1
    return best_s, tuple(order)
