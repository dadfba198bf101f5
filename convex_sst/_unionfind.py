"""A tiny union–find (disjoint sets) used by Kruskal, the enumeration of Kruskal orderings, and
the solver's block detection."""

from __future__ import annotations


class UnionFind:
    """Disjoint sets over ``0..n-1`` with path halving."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> bool:
        """Merge the sets of ``a`` and ``b``; False if they were already one set."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[ra] = rb
        return True
