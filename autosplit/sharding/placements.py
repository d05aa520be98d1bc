"""DTensor placements as plain strings, so a layout is data a plan can save and read back.

    "R"      Replicate(): every rank holds the whole tensor
    "S(d)"   Shard(d): rank r holds the r-th slice of dimension d (d >= 0)
    "P"      Partial("sum"): every rank holds a whole-sized addend; the value is their sum
    "P(max)" Partial with another reduction (``avg``, ``max``, ``min``, ...)

    to_placement("S(1)")    # Shard(dim=1)
    from_placement(Partial())   # "P"
"""

from __future__ import annotations

import re

REPLICATE = "R"
PARTIAL = "P"

_SHARD = re.compile(r"S\((\d+)\)")
_PARTIAL = re.compile(r"P\((\w+)\)")


def shard(dim: int) -> str:
    """The string of ``Shard(dim)``; ``dim`` must already be non-negative."""
    if dim < 0:
        raise ValueError(f"a shard dimension must be normalized to >= 0, e.g. 1; got {dim}")
    return f"S({dim})"


def is_shard(placement: str) -> bool:
    return placement.startswith("S(")


def is_partial(placement: str) -> bool:
    return placement.startswith("P")


def shard_dim(placement: str) -> int:
    """The dimension of an ``"S(d)"`` placement."""
    match = _SHARD.fullmatch(placement)
    if match is None:
        raise ValueError(f"not a shard placement: {placement!r}; expected e.g. 'S(0)'")
    return int(match.group(1))


def validate(placement: str) -> str:
    """``placement`` if it is one of the forms above, else a ValueError naming them."""
    if placement in (REPLICATE, PARTIAL) or _SHARD.fullmatch(placement) or _PARTIAL.fullmatch(placement):
        return placement
    raise ValueError(f"unknown placement {placement!r}; expected 'R', 'P', 'P(max)' or 'S(d)', e.g. 'S(0)'")


def to_placement(placement: str):
    """The DTensor placement object for a placement string."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    validate(placement)
    if placement == REPLICATE:
        return Replicate()
    if placement == PARTIAL:
        return Partial()
    match = _PARTIAL.fullmatch(placement)
    if match:
        return Partial(match.group(1))
    return Shard(shard_dim(placement))


def from_placement(placement, ndim: int | None = None) -> str:
    """The string of a DTensor placement; ``ndim`` normalizes a negative shard dimension.

    Raises:
        ValueError: for placements with no string form (``_StridedShard``, ``MaskPartial``...).
    """
    from torch.distributed.tensor import Partial, Replicate, Shard

    if type(placement) is Replicate:
        return REPLICATE
    if isinstance(placement, Partial):  # MaskPartial too: an embedding's masked lookups, summed
        op = placement.reduce_op
        return PARTIAL if op == "sum" else f"P({op})"
    if type(placement) is Shard:
        dim = placement.dim
        if dim < 0:
            if ndim is None:
                raise ValueError(f"{placement} has a negative dimension: pass ndim to normalize it")
            dim += ndim
        return shard(dim)
    raise ValueError(f"placement {placement!r} ({type(placement).__name__}) has no string form; "
                     "only Replicate, Shard and Partial are planned")
