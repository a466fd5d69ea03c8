"""Tree node arithmetic (docs/architecture.md §1): levels, aligned spans, parents, children, positions.

A level-k node covers `K**k` tokens (K = 32) and starts at a multiple of that
span; its parent, children and Gaussian position (μ, σ) follow by arithmetic.
Nothing here touches storage or models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

BLOCK = 32  # K: children per node; LOD1 = 32 tokens, LOD2 = 1,024 tokens


def span(level: int) -> int:
    return BLOCK**level


@dataclass(frozen=True, order=True)
class Node:
    """A node of the MegaContext tree: `level` 0 is a token, 1 a 32-token gist, 2 a 1,024-token gist."""

    start: int
    level: int

    def __post_init__(self) -> None:
        if self.level < 0 or self.start < 0 or self.start % span(self.level):
            raise ValueError(f"node (level {self.level}, start {self.start}) is not aligned to {span(self.level)}")

    @property
    def span(self) -> int:
        return span(self.level)

    @property
    def end(self) -> int:
        return self.start + self.span

    @property
    def index(self) -> int:
        """Position of this node within its level's storage."""
        return self.start // self.span

    @property
    def mu(self) -> float:
        """Centre of the span: the node's (float) position."""
        return self.start + (self.span - 1) / 2

    @property
    def sigma(self) -> float:
        """Gaussian scale: the std of a uniform span (w/√12) for gists, 0 for tokens."""
        return 0.0 if self.level == 0 else self.span / math.sqrt(12)

    def parent(self) -> "Node":
        up = span(self.level + 1)
        return Node(self.start - self.start % up, self.level + 1)

    def children(self) -> list["Node"]:
        if self.level == 0:
            raise ValueError("a token has no children")
        step = span(self.level - 1)
        return [Node(self.start + i * step, self.level - 1) for i in range(BLOCK)]

    def siblings(self) -> list["Node"]:
        """The 32 aligned nodes that share this node's parent (itself included)."""
        return self.parent().children()

    def contains(self, other: "Node") -> bool:
        return self.start <= other.start and other.end <= self.end


def complete_count(n_tokens: int, level: int) -> int:
    """How many level-`level` nodes exist over `n_tokens` tokens (only complete spans exist)."""
    return n_tokens // span(level)


def tile(start: int, end: int, level: int) -> Iterator[Node]:
    """The level-`level` nodes tiling [start, end) (both aligned to the level's span)."""
    step = span(level)
    if start % step or end % step:
        raise ValueError(f"[{start}, {end}) is not aligned to {step}")
    for s in range(start, end, step):
        yield Node(s, level)
