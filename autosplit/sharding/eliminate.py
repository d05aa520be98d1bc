"""Exact minimization of a sum of cost tables over discrete variables, by variable elimination.

    best, total = eliminate({0: 3, 1: 2}, [((0,), [1., 0., 2.]), ((0, 1), [[0., 5.], [4., 0.], [0., 0.]])])
    # best == {0: 1, 1: 1}, total == 0.0

Each table (a factor) charges a cost for every combination of the variables in its scope.
Eliminating a variable v adds up the tables that mention v and keeps, for every combination of
their other variables, the minimum over v and the value of v reaching it (min-sum bucket
elimination). The last table is a number, the optimum; walking the eliminations backwards reads
off an optimal assignment. The cost is the size of the largest table built, which the order
keeps small (greedy: next the variable whose table would be smallest, ties by id). Layer graphs
are nearly chains (a residual stream, the q/k/v branches), so tables stay at a few thousand
entries; past ``max_entries`` it gives up (returns None) and the caller solves another way.
"""

from __future__ import annotations

import heapq
import math
from typing import Mapping, Sequence

import numpy as np

Factor = tuple[tuple[int, ...], np.ndarray]


def eliminate(domains: Mapping[int, int], factors: Sequence[Factor], *,
              max_entries: int = 2_000_000) -> tuple[dict[int, int], float] | None:
    """An assignment of every variable minimizing the sum of ``factors``, and that sum.

    Args:
        domains: number of values of each variable.
        factors: (scope, table): the scope's variables in increasing order, the table with one
            axis per scope variable, of that variable's domain size.
        max_entries: the largest table it may build; None is returned past it.
    """
    tables: list[Factor | None] = []
    touching: dict[int, set[int]] = {v: set() for v in domains}
    for scope, table in factors:
        table = np.asarray(table, dtype=np.float64)
        assert tuple(scope) == tuple(sorted(set(scope))), "a scope lists distinct variables in increasing order"
        assert table.shape == tuple(domains[v] for v in scope), (scope, table.shape)
        for v in scope:
            touching[v].add(len(tables))
        tables.append((tuple(scope), table))
    constant = 0.0
    steps: list[tuple[int, tuple[int, ...], np.ndarray]] = []
    remaining = set(domains)

    def merged_scope(v: int) -> tuple[int, ...]:
        scope: set[int] = set()
        for i in touching[v]:
            scope.update(tables[i][0])
        return tuple(sorted(scope))

    def table_size(u: int) -> int:
        return math.prod(domains[w] for w in merged_scope(u))

    # The next variable is the least (table size, id); a variable's size changes only when a
    # neighbour is eliminated, so sizes sit in a heap and an entry whose size is out of date
    # is skipped when it comes up.
    size_of = {u: table_size(u) for u in remaining}
    queue = [(size, u) for u, size in size_of.items()]
    heapq.heapify(queue)
    while remaining:
        size, v = heapq.heappop(queue)
        if v not in remaining or size != size_of[v]:
            continue
        scope = merged_scope(v)
        if size > max_entries:
            return None
        total = np.zeros(tuple(domains[w] for w in scope))
        for i in sorted(touching[v]):
            fscope, table = tables[i]
            shape = [domains[w] if w in fscope else 1 for w in scope]
            total = total + table.reshape(shape)
            tables[i] = None
            for w in fscope:
                if w != v:
                    touching[w].discard(i)
        axis = scope.index(v)
        rest = scope[:axis] + scope[axis + 1:]
        argmin = np.argmin(total, axis=axis)
        reduced = np.take_along_axis(total, np.expand_dims(argmin, axis), axis=axis).squeeze(axis)
        steps.append((v, rest, argmin))
        touching[v] = set()
        remaining.discard(v)
        if rest:
            for w in rest:
                touching[w].add(len(tables))
            tables.append((rest, reduced))
            for w in rest:
                size_of[w] = table_size(w)
                heapq.heappush(queue, (size_of[w], w))
        else:
            constant += float(reduced)
    best: dict[int, int] = {}
    for v, rest, argmin in reversed(steps):
        best[v] = int(argmin[tuple(best[w] for w in rest)]) if rest else int(argmin)
    return best, constant
