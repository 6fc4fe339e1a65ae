"""An order of layouts that makes every ordered pair of distinct layouts one switch.

The complete directed graph on n layouts has in-degree = out-degree everywhere, so it has an
Eulerian circuit: n·(n−1) switches in one sequence of n·(n−1)+1 layouts. A test or benchmark
that walks it covers the whole switch matrix with a single server start.
"""
from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def switch_tour(layouts: list[T]) -> list[T]:
    """Hierholzer's algorithm from layouts[0]; consecutive entries are the switches."""
    unused = {a: [b for b in reversed(layouts) if b != a] for a in layouts}
    stack, tour = [layouts[0]], []
    while stack:
        here = stack[-1]
        if unused[here]:
            stack.append(unused[here].pop())
        else:
            tour.append(stack.pop())
    return tour[::-1]
