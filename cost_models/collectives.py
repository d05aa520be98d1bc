"""Time of collectives over a group of ranks of a Cluster, with the standard alpha-beta formulas.

For a group of ``p`` ranks, ``B`` is the bottleneck link bandwidth along the ring over the
ranks in the given order (:meth:`Cluster.group_bandwidth_bytes_per_s`) and ``a`` the largest
link latency on that ring (:meth:`Cluster.group_latency_s`); ``n`` is ``nbytes``, whose meaning
each function states. The formulas are those of Thakur, Rabenseifner & Gropp, "Optimization of
Collective Communication Operations in MPICH" (2005), and of NCCL's performance notes
(nccl-tests' PERFORMANCE.md):

    all-reduce, ring        2(p-1)/p * n/B + 2(p-1) * a     reduce-scatter then all-gather
    all-reduce, tree        2 n/B + 2 ceil(log2 p) * a      NCCL's double binary tree (approx.)
    all-gather              (p-1)/p * n/B + (p-1) * a       ring
    reduce-scatter          (p-1)/p * n/B + (p-1) * a       ring
    all-to-all              (p-1)/p * n/B + (p-1) * a       each rank sends n/p to every other
    broadcast               n/B + (p-1) * a                 pipelined ring (approx.)
    FSDP2 step              all-gather(weights) + reduce-scatter(gradients), once per step
    send/recv               a + n/B                         over link(src, dst)

Running example: all-reduce of 1 GiB of gradients over 8 H100 SXM on NVSwitch (B = 450e9 B/s
per direction, a = 2e-6 s): ring 2*7/8 * 2**30 / 450e9 + 14 * 2e-6 = 4.176 ms + 0.028 ms ≈ 4.20 ms;
tree 2 * 2**30 / 450e9 + 6 * 2e-6 ≈ 4.78 ms, so the ring wins. For 64 KiB the latency terms
dominate: ring 28.3 us, tree 12.3 us, and the tree wins.

Conventions: a group of one rank, and a transfer of zero bytes, cost 0. ``nbytes`` may be a
sympy expression (costs symbolic in batch size and sequence length); ``algorithm="auto"`` then
returns ``sympy.Min`` of the two all-reduce times.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Sequence

from cost_models.cluster import Cluster

logger = logging.getLogger(__name__)

ALL_REDUCE_ALGORITHMS = ("auto", "ring", "tree")


def all_reduce_s(cluster: Cluster, ranks: Sequence[int], nbytes: Any, algorithm: str = "auto") -> Any:
    """Time to all-reduce a tensor of ``nbytes`` (its size on every rank, before and after).

    Args:
        cluster: the devices and their links.
        ranks: the group, in ring order.
        nbytes: size of the tensor each rank holds.
        algorithm: ``"ring"``, ``"tree"`` or ``"auto"`` (the faster of the two, as NCCL picks).

    Example:
        >>> all_reduce_s(Cluster.parse("8xh100"), range(8), 2**30)   # 2*7/8 * 2**30/450e9 + 14 * 2e-6
        0.004203...
    """
    if algorithm not in ALL_REDUCE_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALL_REDUCE_ALGORITHMS}, e.g. 'ring'; got {algorithm!r}")
    p, bandwidth, latency = _group(cluster, ranks)
    n = _check_nbytes(nbytes)
    if p == 1 or _is_zero(n):
        return 0.0
    ring = 2 * (p - 1) / p * n / bandwidth + 2 * (p - 1) * latency
    tree = 2 * n / bandwidth + 2 * math.ceil(math.log2(p)) * latency
    if algorithm == "ring":
        return ring
    if algorithm == "tree":
        return tree
    return _min(ring, tree)


def all_gather_s(cluster: Cluster, ranks: Sequence[int], nbytes: Any) -> Any:
    """Time to all-gather into a tensor of ``nbytes`` on every rank (each contributes nbytes/p).

    Example:
        >>> all_gather_s(Cluster.parse("4xh100"), [0, 1, 2, 3], 2**30)   # 3/4 * 2**30/450e9 + 3 * 2e-6
        0.001795...
    """
    return _ring_pass(cluster, ranks, nbytes)


def reduce_scatter_s(cluster: Cluster, ranks: Sequence[int], nbytes: Any) -> Any:
    """Time to reduce-scatter a tensor of ``nbytes`` on every rank (each ends with nbytes/p).

    Example:
        >>> reduce_scatter_s(Cluster.parse("4xh100"), [0, 1, 2, 3], 2**30)
        0.001795...
    """
    return _ring_pass(cluster, ranks, nbytes)


def all_to_all_s(cluster: Cluster, ranks: Sequence[int], nbytes: Any) -> Any:
    """Time of an all-to-all where every rank holds ``nbytes`` and sends nbytes/p to each other rank.

    Priced at the bottleneck link of the group, every rank sending (p-1)/p of its buffer.

    Example:
        >>> all_to_all_s(Cluster.parse("2x8xh100"), range(16), 2**30)   # bound by the 50e9 network
        0.02020...
    """
    return _ring_pass(cluster, ranks, nbytes)


def broadcast_s(cluster: Cluster, ranks: Sequence[int], nbytes: Any) -> Any:
    """Time to broadcast a tensor of ``nbytes`` from ``ranks[0]`` to the others.

    A pipelined ring: chunks stream along the p-1 hops, so the tensor crosses the slowest link
    about once and each hop adds its latency.

    Example:
        >>> broadcast_s(Cluster.parse("4xh100"), [0, 1, 2, 3], 2**20)   # 2**20/450e9 + 3 * 2e-6
        8.33...e-06
    """
    p, bandwidth, latency = _group(cluster, ranks)
    n = _check_nbytes(nbytes)
    if p == 1 or _is_zero(n):
        return 0.0
    return n / bandwidth + (p - 1) * latency


def sharded_data_parallel_s(cluster: Cluster, ranks: Sequence[int], weight_bytes: Any, grad_bytes: Any) -> Any:
    """Communication of one training step of a model part replicated over ``ranks`` by FSDP2 and
    run in a pipeline: one all-gather of its ``weight_bytes`` of weights (before the first
    microbatch's forward; they stay gathered through the step) and one reduce-scatter of its
    ``grad_bytes`` of gradients (after the last microbatch's backward).

    Example:
        >>> sharded_data_parallel_s(Cluster.parse("4xh100"), [0, 2], 2**30, 2**30)   # 2 * (1/2 * 2**30/450e9 + 2e-6)
        0.002390...
    """
    return all_gather_s(cluster, ranks, weight_bytes) + reduce_scatter_s(cluster, ranks, grad_bytes)


def send_recv_s(cluster: Cluster, src: int, dst: int, nbytes: Any) -> Any:
    """Time to send ``nbytes`` from device ``src`` to device ``dst``: latency + nbytes / bandwidth.

    Example:
        >>> cluster = Cluster.parse("2x8xh100")
        >>> send_recv_s(cluster, 0, 1, 2**20) < send_recv_s(cluster, 0, 8, 2**20)   # NVLink vs network
        True
    """
    n = _check_nbytes(nbytes)
    link = cluster.link(src, dst)
    if src == dst or _is_zero(n):
        return 0.0
    return link.latency_s + n / link.bandwidth_bytes_per_s


def _ring_pass(cluster: Cluster, ranks: Sequence[int], nbytes: Any) -> Any:
    """(p-1)/p * n/B + (p-1) * a: one pass of every chunk around the ring."""
    p, bandwidth, latency = _group(cluster, ranks)
    n = _check_nbytes(nbytes)
    if p == 1 or _is_zero(n):
        return 0.0
    return (p - 1) / p * n / bandwidth + (p - 1) * latency


def _group(cluster: Cluster, ranks: Sequence[int]) -> tuple[int, float, float]:
    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster must be a Cluster, e.g. Cluster.parse('4xh100'); got {type(cluster).__name__}")
    ranks = list(ranks)
    return len(ranks), cluster.group_bandwidth_bytes_per_s(ranks), cluster.group_latency_s(ranks)


def _check_nbytes(nbytes: Any) -> Any:
    if isinstance(nbytes, numbers.Real) and not isinstance(nbytes, bool):
        if math.isnan(nbytes) or nbytes < 0:
            raise ValueError(f"nbytes must be a size in bytes >= 0, e.g. 2**30; got {nbytes!r}")
        return nbytes
    if hasattr(nbytes, "free_symbols"):  # a sympy expression
        if nbytes.is_negative:
            raise ValueError(f"nbytes must be a size in bytes >= 0; got {nbytes}, which is negative")
        return nbytes
    raise TypeError(f"nbytes must be a number of bytes, e.g. 2**30; got {type(nbytes).__name__}")


def _is_zero(n: Any) -> bool:
    return isinstance(n, numbers.Real) and n == 0


def _min(a: Any, b: Any) -> Any:
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real):
        return min(a, b)
    import sympy

    return sympy.Min(a, b)
