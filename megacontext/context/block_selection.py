"""Working contexts from per-block relevance scores: the attention oracle and the training-free focus.

Given a history of `n` tokens, a budget `W_max` and one score per aligned 32-token
block (the attention mass the horizon's queries put on it, or the mass from the last
history tokens), `select_blocks` keeps a raw tail of `tail` tokens and spends the rest
of the budget best-first: the highest-scored older blocks become raw tokens, each
paying +31 positions, plus +31 when it is the first block opened inside an untouched
1,024-token LOD2 gist. Every other older span stays a gist (LOD2 where a whole
1,024-span is untouched, LOD1 otherwise), so the result is a legal working context
(coverage, alignment, budget). With `gists=False` the unselected spans are dropped instead (the
"oracle without gists" bound: the value of the gists themselves).

`expanded_blocks` measures any working context against the cold start (how many
older blocks it reads raw, and how far back they are): the report's focus health.
`recall_at_k` measures a ranking of blocks against another (a scorer against the oracle).
Related: H2O (Zhang et al., 2023), SnapKV (Li et al., 2024) and NSA (Yuan et al., 2025) select tokens or blocks by
attention scores in the same spirit.
"""

from __future__ import annotations

import numpy as np

from megacontext.context.nodes import BLOCK, Node, span
from megacontext.context.working_context import BudgetExceeded, cold_start


def tail_start(n: int, tail: int) -> int:
    """First token of the raw tail: the last `tail` tokens, widened back to a block boundary."""
    return max(0, (n - tail) // BLOCK * BLOCK)


def select_blocks(n: int, budget: int, tail: int, scores: np.ndarray, *, levels: int = 2,
                  gists: bool = True) -> list[Node]:
    """Entries of the working context that keeps the raw tail and the best-scored older blocks.

    `scores` [≥ tail_start(n, tail) // 32]: one score per aligned 32-token block of the history,
    higher = keep raw. Returns the entries in time order: a tiling of [0, n) when `gists`, else
    only the raw tokens kept (selected blocks, then the tail). Never more than `budget` entries;
    raises BudgetExceeded when even the tail and the coarsest gists do not fit.
    """
    start = tail_start(n, tail)
    n_blocks = start // BLOCK
    scores = np.asarray(scores, dtype=np.float64)[:n_blocks]
    if len(scores) < n_blocks:
        raise ValueError(f"{len(scores)} block scores for {n_blocks} blocks before the tail")
    order = np.argsort(-scores, kind="stable")  # best first; ties keep time order
    region = span(2) if levels >= 2 else None
    complete = start // region if region else 0  # LOD2 spans wholly before the tail
    if not gists:
        room = (budget - (n - start)) // BLOCK
        if room < 0:
            raise BudgetExceeded(f"a {n - start}-token tail does not fit W_max {budget}")
        chosen = sorted(int(b) for b in order[:room])
        return [Node(t, 0) for b in chosen for t in range(b * BLOCK, (b + 1) * BLOCK)] + \
               [Node(t, 0) for t in range(start, n)]
    cost = (n - start) + complete + (n_blocks - complete * (BLOCK if region else 0))
    if cost > budget:
        raise BudgetExceeded(f"a {n - start}-token tail plus gists of the older {start} tokens needs {cost} "
                             f"> W_max {budget} positions; lower the tail")
    selected: set[int] = set()
    opened: set[int] = set()
    for b in (int(b) for b in order):
        r = b // BLOCK
        extra = (BLOCK - 1) + ((BLOCK - 1) if r < complete and r not in opened else 0)
        if cost + extra <= budget:
            cost += extra
            selected.add(b)
            if r < complete:
                opened.add(r)
    entries: list[Node] = []
    b = 0
    while b < n_blocks:
        r = b // BLOCK
        if r < complete and r not in opened:
            entries.append(Node(r * span(2), 2))
            b += BLOCK
            continue
        entries.extend(Node(t, 0) for t in range(b * BLOCK, (b + 1) * BLOCK)) if b in selected \
            else entries.append(Node(b * BLOCK, 1))
        b += 1
    entries.extend(Node(t, 0) for t in range(start, n))
    return entries


def expanded_blocks(entries: list[Node], n: int, w_max: int, protected_tail: int, levels: int, sink: int = 0) -> list[int]:
    """Distances (tokens before the cursor `n`) of the 32-blocks read raw here but gisted in the cold start
    (the cold start with an attention sink of `sink` tokens, which are raw there and never count)."""
    cold = cold_start(n, w_max, protected_tail, levels, sink).entries
    cold_raw_from = next((node.start for node in cold if node.level == 0 and node.start >= sink), n)
    raw = {node.start // BLOCK for node in entries if node.level == 0 and sink <= node.start and node.end <= cold_raw_from}
    return sorted(n - (b + 1) * BLOCK for b in raw)


def recall_at_k(scores: np.ndarray, reference: np.ndarray, k: int) -> float:
    """Share of `reference`'s k best blocks that are also among `scores`' k best ([B] each, higher = better).

    Ties are broken as `select_blocks` breaks them (stable: earlier blocks first), so with k = the
    budget's room the sets are the blocks `select_blocks(..., gists=False)` keeps (with gists its
    selection is greedy under LOD2-opening costs, not a top-k). k is clipped to [1, B]; ValueError on
    unequal lengths.
    """
    scores, reference = np.asarray(scores, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if scores.shape != reference.shape or scores.ndim != 1 or not len(scores):
        raise ValueError(f"recall_at_k needs two non-empty score vectors of one length; got {scores.shape} and {reference.shape}")
    k = min(max(k, 1), len(scores))
    best = lambda v: set(np.argsort(-v, kind="stable")[:k].tolist())  # noqa: E731
    return len(best(scores) & best(reference)) / k
