"""Costs as sympy expressions in the symbolic dimensions of a graph (batch size, sequence length).

    traced = autosplit.capture(model, (spec((8, 1024), dtype=torch.long, dims=("batch", "seq")),),
                               dynamic=True)
    costs = symbolic_costs(traced.graph_module, traced.symbols)
    costs["addmm"].fwd_flops                  # 2359296*batch*seq
    costs.at(batch=32, seq=2048)              # {node: OpCost}, no new trace

A graph captured with dynamic shapes carries sympy symbols in its shapes. Every cost of an op is a
polynomial in them (a linear layer's FLOPs grow with batch·seq, attention's with batch·seq²), so
each is found exactly by pricing the graph at a small grid of sizes — (degree + 1) values per
symbol, the traced size and its multiples — and solving for the coefficients in rational
arithmetic. One more size checks the fit; a cost that is not such a polynomial is reported.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Iterator, Mapping

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from cost_models.ops import OpCost, price_graph

logger = logging.getLogger(__name__)

FIELDS = ("fwd_flops", "bwd_flops", "fwd_bytes", "bwd_bytes", "output_bytes")


@dataclass(frozen=True)
class SymbolicCost:
    """An op's costs as polynomials in the graph's named dimensions."""

    base: OpCost
    """The cost at the traced sizes (op class, dtype and kernel counts come from here)."""
    fwd_flops: sympy.Expr
    bwd_flops: sympy.Expr
    fwd_bytes: sympy.Expr
    bwd_bytes: sympy.Expr
    output_bytes: sympy.Expr
    saved: Mapping[str, sympy.Expr] = field(default_factory=dict)

    def at(self, values: Mapping[sympy.Symbol, int]) -> OpCost:
        """The concrete cost at the sizes ``values`` (symbol → int)."""
        number = lambda e: int(e.xreplace(values))  # noqa: E731
        return replace(self.base, **{f: number(getattr(self, f)) for f in FIELDS},
                       saved={k: number(e) for k, e in self.saved.items()})


class SymbolicCosts(dict):
    """``{node name: SymbolicCost}`` plus the symbols, by dimension name."""

    def __init__(self, costs: Mapping[str, SymbolicCost], symbols: Mapping[str, sympy.Symbol]):
        super().__init__(costs)
        self.symbols = dict(symbols)

    def values_of(self, **sizes: int) -> dict[sympy.Symbol, int]:
        unknown = set(sizes) - set(self.symbols)
        if unknown:
            raise ValueError(f"unknown dimension(s) {sorted(unknown)}; this graph has {sorted(self.symbols)}")
        missing = set(self.symbols) - set(sizes)
        if missing:
            raise ValueError(f"give a size for every dimension: missing {sorted(missing)}, e.g. "
                             + ", ".join(f"{m}=8" for m in sorted(missing)))
        return {self.symbols[name]: int(size) for name, size in sizes.items()}

    def at(self, **sizes: int) -> dict[str, OpCost]:
        """Every op's concrete cost at the given sizes, e.g. ``at(batch=32, seq=2048)``."""
        values = self.values_of(**sizes)
        return {name: cost.at(values) for name, cost in self.items()}

    def total(self, field_name: str, nodes: Any = None) -> sympy.Expr:
        """The sum of one field (``fwd_flops``...) over ``nodes`` (default: all)."""
        names = self.keys() if nodes is None else nodes
        return sympy.expand(sum((getattr(self[n], field_name) for n in names), sympy.Integer(0)))

    def activation_bytes(self, nodes: Any = None) -> sympy.Expr:
        """Saved-for-backward bytes of one microbatch through ``nodes``; each tensor once."""
        kept: dict[str, sympy.Expr] = {}
        for name in self.keys() if nodes is None else nodes:
            for key, expr in self[name].saved.items():
                kept.setdefault(key, expr)
        return sympy.expand(sum(kept.values(), sympy.Integer(0)))


def symbolic_costs(gm: fx.GraphModule, symbols: Mapping[str, Any], *, training: bool = True,
                   degree: int = 2) -> SymbolicCosts:
    """Price ``gm`` (captured with dynamic shapes) as polynomials in its named dimensions.

    Args:
        gm: a graph whose ``meta["val"]`` shapes hold the symbols (``capture(..., dynamic=True)``).
        symbols: dimension name → the symbol in the shapes (``Traced.symbols``).
        training: price backward and saved tensors too.
        degree: highest power of any one dimension (2 covers attention's seq²).

    Returns:
        :class:`SymbolicCosts`, whose expressions use symbols named after the dimensions.
    """
    if not symbols:
        raise ValueError("symbolic_costs needs a graph with named symbolic dimensions: "
                         "capture(..., dynamic=True) with spec(..., dims=('batch', 'seq'))")
    if degree < 1:
        raise ValueError(f"degree must be >= 1, e.g. 2; got {degree}")
    names = sorted(symbols)
    graph_syms = [symbols[n] for n in names]
    hints = _hints(gm, graph_syms)
    public = [sympy.Symbol(n, positive=True, integer=True) for n in names]
    exponents = list(itertools.product(range(degree + 1), repeat=len(names)))
    grid = list(itertools.product(*[[h * k for k in range(1, degree + 2)] for h in hints]))
    priced = [price_at(gm, dict(zip(graph_syms, point)), training=training) for point in grid]
    inverse = _inverse([[_monomial(point, e) for e in exponents] for point in grid])
    monomials = [sympy.Mul(*[s**k for s, k in zip(public, e)]) for e in exponents]
    memo: dict[tuple[int, ...], sympy.Expr] = {}

    def fit(samples: list[int]) -> sympy.Expr:
        key = tuple(samples)
        if key not in memo:
            coefficients = [sum(row[j] * samples[j] for j in range(len(samples))) for row in inverse]
            memo[key] = sympy.Add(*[sympy.Rational(c.numerator, c.denominator) * m
                                    for c, m in zip(coefficients, monomials) if c])
        return memo[key]

    costs = {}
    for node in priced[0]:
        base = priced[0][node]
        fields = {f: fit([getattr(p[node], f) for p in priced]) for f in FIELDS}
        keys = {k for p in priced for k in p[node].saved}
        saved = {k: fit([p[node].saved.get(k, 0) for p in priced]) for k in sorted(keys)}
        costs[node] = SymbolicCost(base=base, saved=saved, **fields)
    result = SymbolicCosts(costs, dict(zip(names, public)))
    _check(gm, result, graph_syms, public, [h * (degree + 2) for h in hints], training)
    return result


def price_at(gm: fx.GraphModule, values: Mapping[Any, int], *, training: bool = True) -> dict[str, OpCost]:
    """:func:`cost_models.ops.price_graph` of a symbolic-shape graph at concrete sizes."""
    with _concrete(gm, values):
        return price_graph(gm, training=training)


@contextlib.contextmanager
def _concrete(gm: fx.GraphModule, values: Mapping[Any, int]) -> Iterator[None]:
    """Temporarily replace every symbolic value in ``node.meta["val"]`` by its value at ``values``."""
    original = {}
    for node in gm.graph.nodes:
        if "val" in node.meta:
            original[node] = node.meta["val"]
            node.meta["val"] = pytree.tree_map(lambda v: _concrete_value(v, values), node.meta["val"])
    try:
        yield
    finally:
        for node, value in original.items():
            node.meta["val"] = value


def _concrete_value(v: Any, values: Mapping[Any, int]) -> Any:
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        result = sympy.sympify(sympy.sympify(v.node.expr).xreplace(values))
        if result.free_symbols:
            raise ValueError(f"size {v.node.expr} depends on {sorted(map(str, result.free_symbols))}, "
                             "which have no value: name every symbolic dimension")
        return {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}[type(v)](result)
    if isinstance(v, torch.Tensor):
        shape = [_concrete_value(d, values) if isinstance(d, torch.SymInt) else int(d) for d in v.shape]
        stride = [_concrete_value(d, values) if isinstance(d, torch.SymInt) else int(d) for d in v.stride()]
        return torch.empty_strided(shape, stride, dtype=v.dtype, device="meta")
    return v


def _hints(gm: fx.GraphModule, syms: list[Any]) -> list[int]:
    """The traced size of every symbol, from the shape environment of the graph's values."""
    for node in gm.graph.nodes:
        for v in pytree.tree_leaves(node.meta.get("val")):
            sizes = list(v.shape) if isinstance(v, torch.Tensor) else [v]
            for d in sizes:
                if isinstance(d, torch.SymInt):
                    env = d.node.shape_env
                    known = getattr(env, "backed_var_to_val", None) or env.var_to_val
                    return [int(known[s]) for s in syms]
    raise ValueError("the graph has no symbolic shapes: capture it with dynamic=True")


def _monomial(point: tuple[int, ...], exponents: tuple[int, ...]) -> int:
    value = 1
    for x, k in zip(point, exponents):
        value *= x**k
    return value


def _inverse(matrix: list[list[int]]) -> list[list[Fraction]]:
    inverse = sympy.Matrix(matrix).inv()
    return [[Fraction(int(x.p), int(x.q)) for x in inverse.row(i)] for i in range(inverse.rows)]


def _check(gm: fx.GraphModule, costs: SymbolicCosts, graph_syms: list[Any], public: list[sympy.Symbol],
           point: list[int], training: bool) -> None:
    """Compare the polynomials with a direct pricing at a size outside the fitting grid."""
    direct = price_at(gm, dict(zip(graph_syms, point)), training=training)
    values = dict(zip(public, point))
    wrong = [name for name, cost in costs.items()
             if any(int(getattr(cost, f).xreplace(values)) != getattr(direct[name], f) for f in FIELDS)]
    if wrong:
        logger.warning("%d op costs are not polynomials of the chosen degree (e.g. %s); their "
                       "expressions are exact only at the fitted sizes", len(wrong), wrong[:3])
