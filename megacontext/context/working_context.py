"""The Working Context (docs/architecture.md §1, §2.4): the budgeted list of tokens and gists the base model sees.

Entries are tree nodes in time order tiling [0, cursor). The cold start keeps
as many recent tokens at LOD0 as fit while every older aligned span is covered
by gists (coarser levels only for the oldest part, and only when finer ones
would not fit). Edits are expand (gist -> its 32 children, +31) and collapse
(32 aligned siblings -> their parent, -31). `assemble` turns the entries into
`inputs_embeds` plus Gaussian-RoPE positions (μ, σ) in one call. Scoring and
choosing edits is LensNet's and the allocator's job, not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import nn

from megacontext.context.nodes import BLOCK, Node, span
from megacontext.model.gistnet import level1_reader


class BudgetExceeded(ValueError):
    """An edit would take the working context past W_max."""


class InvariantViolation(AssertionError):
    """A working context broke one of the invariants of docs/architecture.md §1."""


class NodeSource(Protocol):
    """Where entries get their vectors: a MegaContextTree (or anything with these reads)."""

    def tokens(self, start: int, end: int) -> np.ndarray: ...  # [end - start] token ids

    def gists(self, level: int, start_index: int, end_index: int) -> np.ndarray: ...  # [n, d] float32


@dataclass
class WorkingContext:
    entries: list[Node]
    cursor: int  # tokens of history covered: entries tile [0, cursor)
    w_max: int
    protected_tail: int
    levels: int = 2
    sink: int = 0  # the first `sink` tokens stay LOD0: the base's attention sink (StreamingLLM, Xiao et al. 2023)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def levels_used(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for node in self.entries:
            counts[node.level] = counts.get(node.level, 0) + 1
        return counts

    def expand(self, index: int) -> None:
        """Replace the gist at `index` by its 32 children (cost +31)."""
        node = self.entries[index]
        if node.level == 0:
            raise ValueError(f"entry {index} is a token; only gists expand")
        if len(self.entries) + BLOCK - 1 > self.w_max:
            raise BudgetExceeded(f"expanding entry {index} needs {len(self.entries) + BLOCK - 1} > W_max {self.w_max} positions")
        self.entries[index : index + 1] = node.children()

    def collapse(self, index: int) -> None:
        """Replace the 32 aligned siblings starting at `index` by their parent (cost -31)."""
        group = self.entries[index : index + BLOCK]
        first = group[0]
        if first.level >= self.levels:
            raise ValueError(f"entry {index} is a top-level gist (level {first.level}); it cannot collapse")
        if group != first.siblings() or first.start != first.parent().start:
            raise ValueError(f"entries {index}..{index + BLOCK - 1} are not 32 aligned siblings of one parent")
        if group[-1].end > self.cursor - self.protected_tail:
            raise ValueError(f"entries {index}..{index + BLOCK - 1} reach into the protected tail; it stays LOD0")
        if first.parent().start < self.sink:
            raise ValueError(f"entries {index}..{index + BLOCK - 1} cover the attention sink (the first {self.sink} "
                             "tokens); it stays LOD0")
        self.entries[index : index + BLOCK] = [first.parent()]

    def may_collapse_into(self, parent: Node) -> bool:
        """`collapse_allowed` for this working context: the rule `collapse` enforces."""
        return collapse_allowed(parent, self.cursor, self.protected_tail, self.levels, self.sink)

    def append_tokens(self, n: int) -> None:
        """Streaming: the next `n` tokens of the history join as LOD0 entries (cost +n)."""
        if len(self.entries) + n > self.w_max:
            raise BudgetExceeded(f"appending {n} tokens needs {len(self.entries) + n} > W_max {self.w_max} positions; "
                                 "collapse first")
        self.entries.extend(Node(t, 0) for t in range(self.cursor, self.cursor + n))
        self.cursor += n

    def check(self, tree_tokens: int | None = None) -> None:
        """Raise `InvariantViolation` unless coverage, alignment, budget and protected tail all hold."""
        check_invariants(self.entries, self.cursor, self.w_max, self.protected_tail, self.levels, tree_tokens, self.sink)


def collapse_allowed(parent: Node, cursor: int, protected_tail: int, levels: int, sink: int = 0) -> bool:
    """Whether the place rules (not the siblings' presence) allow a collapse into `parent`: below the top
    level, wholly before the protected tail, clear of the first `sink` tokens (the attention sink). The one
    rule `WorkingContext.collapse`, the allocator, LensNet's legality mask and JT2's candidates share."""
    return parent.level <= levels and parent.end <= cursor - protected_tail and parent.start >= sink


def check_invariants(
    entries: Sequence[Node], cursor: int, w_max: int, protected_tail: int, levels: int, tree_tokens: int | None = None,
    sink: int = 0,
) -> None:
    if len(entries) > w_max:
        raise InvariantViolation(f"budget: {len(entries)} entries > W_max {w_max}")
    expected = 0
    for i, node in enumerate(entries):
        if node.start != expected:
            raise InvariantViolation(f"coverage: entry {i} starts at {node.start}, expected {expected} (gap or overlap)")
        if node.start % span(node.level):
            raise InvariantViolation(f"alignment: entry {i} (level {node.level}) starts at {node.start}")
        if node.level > levels:
            raise InvariantViolation(f"entry {i} has level {node.level} > {levels}")
        if node.level > 0 and node.end > cursor - protected_tail:
            raise InvariantViolation(f"protected tail: entry {i} is a level-{node.level} gist within the last {protected_tail} tokens")
        if node.level > 0 and node.start < sink:
            raise InvariantViolation(f"attention sink: entry {i} is a level-{node.level} gist over the first {sink} tokens")
        expected = node.end
    if expected != cursor:
        raise InvariantViolation(f"coverage: entries end at {expected}, cursor is {cursor}")
    if tree_tokens is not None and cursor > tree_tokens:
        raise InvariantViolation(f"cursor {cursor} is past the tree's {tree_tokens} tokens")


def _check_sink(sink: int) -> None:
    """ValueError for a sink that is not a whole number of blocks."""
    if sink % BLOCK or sink < 0:
        raise ValueError(f"the attention sink must be a whole number of {BLOCK}-token blocks, got {sink}")


def _check_start(n_tokens: int, sink: int) -> None:
    """ValueError for a negative history or a sink that is not a whole number of blocks."""
    if n_tokens < 0:
        raise ValueError("n_tokens must be >= 0")
    _check_sink(sink)


def cold_start(n_tokens: int, w_max: int, protected_tail: int, levels: int = 2, sink: int = 0) -> WorkingContext:
    """The longest raw (LOD0) tail the budget allows, older spans as gists, the most recent of them refined.

    The raw tail starts at the earliest block boundary s for which [0, s), tiled by the coarsest
    aligned gists (LOD2 for whole 1,024-token spans, LOD1 for the rest), plus the tail fit `w_max`;
    what is left then refines the most recent coarse gists one level (LOD2 -> 32 LOD1, +31 each).
    So the cold start keeps nearly the recency baseline's detail plus a summary of everything older
    at any history length: at 100k tokens and W_max 2,048 a 1,920-token raw tail (docs/architecture.md §2.4).
    With `sink` (a multiple of 32 tokens) the history's first `sink` tokens stay raw too, the base's
    attention sink, and the aligned gists tile from there (LOD1 up to the next 1,024 boundary); the raw tail
    pays for it (a 32-token sink costs 62 positions with two levels).
    BudgetExceeded when even the coarsest gists and the protected tail do not fit.
    """
    _check_start(n_tokens, sink)
    if n_tokens <= w_max:
        entries = [Node(t, 0) for t in range(n_tokens)]
    else:
        latest = (n_tokens - min(protected_tail, n_tokens)) // BLOCK * BLOCK  # the tail starts at a block boundary
        sink = min(sink, latest)
        if _coarse_count(latest, levels, sink) + n_tokens - latest > w_max:
            raise BudgetExceeded(f"{n_tokens} tokens cannot fit W_max {w_max} with a {protected_tail}-token protected "
                                 f"tail using gist levels {list(range(1, levels + 1))}; raise wc.w_max or add a level")
        lo, hi = sink // BLOCK, latest // BLOCK  # binary search over block boundaries: the cost falls as the tail shrinks
        while lo < hi:
            mid = (lo + hi) // 2
            if _coarse_count(mid * BLOCK, levels, sink) + n_tokens - mid * BLOCK <= w_max:
                hi = mid
            else:
                lo = mid + 1
        start = lo * BLOCK
        entries = _coarse(start, levels, sink) + [Node(t, 0) for t in range(start, n_tokens)]
        room = w_max - len(entries)
        i = len(entries)
        while room >= BLOCK - 1:  # refine the most recent gists above LOD1, newest first
            i = next((j for j in range(min(i, len(entries)) - 1, -1, -1) if entries[j].level >= 2), -1)
            if i < 0:
                break
            entries[i : i + 1] = entries[i].children()
            room -= BLOCK - 1
            i += BLOCK  # search again from the new children's end (a LOD2 child of a LOD3 may refine next)
    wc = WorkingContext(entries, n_tokens, w_max, protected_tail, levels, sink)
    wc.check()
    return wc


def sink_cost(sink: int, levels: int = 2) -> int:
    """Positions the attention sink's top-level span takes in any working context past it: the `sink` raw
    tokens plus the fewest aligned gists for the rest of that span (no top-level gist may cover the sink),
    e.g. 63 for a 32-token sink with two levels (32 tokens + 31 LOD1), 32 with one level, 0 without a sink."""
    _check_sink(sink)
    if not sink:
        return 0
    top = span(levels)
    return _coarse_count(-(-sink // top) * top, levels, sink)


def _coarse_count(end: int, levels: int, sink: int = 0) -> int:
    """How many entries `_coarse(end, levels, sink)` has."""
    return len(_coarse(end, levels, sink))


def _coarse(end: int, levels: int, sink: int = 0) -> list[Node]:
    """[0, end) as the raw sink [0, sink) and then the fewest aligned gists (`end`, `sink` multiples of BLOCK):
    from each start the coarsest level aligned there that fits, so the oldest part is at the top level."""
    out = [Node(t, 0) for t in range(min(sink, end))]
    lo = len(out)
    while lo < end:
        level = next(k for k in range(levels, 0, -1) if lo % span(k) == 0 and lo + span(k) <= end)
        out.append(Node(lo, level))
        lo += span(level)
    return out


def single_level_start(n_tokens: int, w_max: int, protected_tail: int, level: int, levels: int = 2,
                       sink: int = 0) -> WorkingContext:
    """The compressed part uses gists of one level only (for per-level ΔNLL).

    With `sink` the first `sink` tokens stay raw, as in `cold_start`; the rest of the sink's level-`level`
    span is then LOD1, so e.g. the LOD2 row is 32 raw tokens, 31 LOD1 gists, LOD2 gists from token 1,024 on
    and the raw tail. BudgetExceeded when it cannot fit `w_max`, or when it fits a history longer than
    `w_max` without a single gist of `level` (the sink's LOD1 gists alone: no row for that level).
    """
    return _start(n_tokens, w_max, protected_tail, levels, allowed=(level,), sink=sink)


def _start(n_tokens: int, w_max: int, protected_tail: int, levels: int, allowed: tuple[int, ...],
           sink: int = 0) -> WorkingContext:
    _check_start(n_tokens, sink)
    tail = min(protected_tail, n_tokens)
    if n_tokens <= w_max:
        entries: list[Node] | None = [Node(t, 0) for t in range(n_tokens)]
    else:
        latest = (n_tokens - tail) // BLOCK * BLOCK  # as in cold_start: the sink never reaches into the tail
        sink = min(sink, latest)
        step = span(allowed[0])
        aligned = min(-(-sink // step) * step, latest)  # where gists of the allowed level may start
        head = [Node(t, 0) for t in range(sink)] + [Node(s, 1) for s in range(sink, aligned, BLOCK)]
        rest = _cover(aligned, n_tokens, w_max - len(head), tail, allowed if aligned % step == 0 else ())
        entries = None if rest is None else head + rest
        if entries is not None and not any(e.level in allowed for e in entries):
            entries = None  # the sink's LOD1 alone made it fit: not a row of this level (as without a sink)
    if entries is None:
        raise BudgetExceeded(
            f"{n_tokens} tokens cannot fit W_max {w_max} with a {protected_tail}-token protected tail "
            f"using gist levels {sorted(allowed)}; raise wc.w_max or add a level"
        )
    wc = WorkingContext(entries, n_tokens, w_max, protected_tail, levels, sink)
    wc.check()
    return wc


def _cover(lo: int, n: int, budget: int, tail: int, allowed: tuple[int, ...]) -> list[Node] | None:
    """Tile [lo, n): a prefix of level-allowed[0] gists as short as possible, the rest recursively.

    With no gist level left, the rest is LOD0 tokens. The first feasible (shortest)
    prefix is taken at every level, which leaves the most detail for the recent part.
    `lo` is aligned to allowed[0]'s span (it is 0 or the end of a coarser prefix).
    """
    if n - lo <= budget:
        return [Node(t, 0) for t in range(lo, n)]
    if not allowed:
        return None
    level, finer = allowed[0], allowed[1:]
    step = span(level)
    for a in range(lo, n - tail + 1, step):  # a: end of the level-`level` prefix
        used = (a - lo) // step
        if used > budget:
            return None
        rest = _cover(a, n, budget - used, tail, finer)
        if rest is not None:
            return [Node(s, level) for s in range(lo, a, step)] + rest
    return None


@dataclass(frozen=True)
class PositionScheme:
    """Where each working-context entry sits for Gaussian RoPE (docs/architecture.md §2.7).

    `absolute`: μ is the centre of the entry's token span and σ = span/√12 for a gist (0 for a
    token): positions grow with the history and pass the base's trained range once it does.
    `compressed`: positions count slots: entry i fills `widths[level]` slots right after entry
    i − 1 (a token 1, a 32-token gist e.g. 2, a 1,024-token gist 4), μ is the centre of its slots
    and σ = width/√12 for a gist. Raw runs stay contiguous, skipped spans take no slots, and a
    working context of W entries with an R-token raw tail never reaches `limit(W, R)`, whatever the
    history (cf. StreamingLLM's positions within the cache, Xiao et al. 2023; InfLLM, Xiao et al. 2024;
    Self-Extend's grouped positions, Jin et al. 2024).
    """

    kind: str = "absolute"
    widths: tuple[int, ...] = (1, 2, 4)

    @classmethod
    def of(cls, wc: "WorkingContextConfigLike") -> "PositionScheme":
        return cls(wc.positions, tuple(wc.slot_widths))

    def place(self, entries: Sequence[Node], first: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(μ [N], σ [N]) float64 of `entries` and the position of whatever follows them.

        `first` (compressed only): the slot where entries[0] starts; a suffix of a working context
        continues its prefix with `first = place(prefix)[2]`. Absolute positions ignore it.
        """
        if self.kind == "absolute":
            mu = torch.tensor([n.mu for n in entries], dtype=torch.float64)
            sigma = torch.tensor([n.sigma for n in entries], dtype=torch.float64)
            return mu, sigma, float(entries[-1].end) if entries else float(first)
        if self.kind != "compressed":
            raise ValueError(f"unknown position scheme {self.kind!r}: absolute or compressed")
        levels = np.fromiter((n.level for n in entries), dtype=np.int64, count=len(entries))
        if len(levels) and levels.max() >= len(self.widths):
            raise ValueError(f"a level-{int(levels.max())} entry has no slot width (slot_widths {list(self.widths)})")
        width = np.asarray(self.widths, dtype=np.float64)[levels]  # [N]
        ends = first + np.cumsum(width)
        mu = ends - width + (width - 1) / 2
        sigma = np.where(levels > 0, width / np.sqrt(12), 0.0)
        return torch.as_tensor(mu), torch.as_tensor(sigma), float(ends[-1]) if len(ends) else float(first)

    def after(self, entries: Sequence[Node], first: float = 0.0) -> float:
        """The position after `entries` (`place(entries, first)[2]` without building μ and σ)."""
        if self.kind == "absolute":
            return float(entries[-1].end) if entries else float(first)
        return float(first + sum(self.widths[n.level] for n in entries))

    def limit(self, w_max: int, raw_tail: int) -> float:
        """An upper bound on every position of a working context of <= `w_max` entries whose last `raw_tail`
        are tokens (compressed: the widest slots everywhere else; absolute: unbounded)."""
        if self.kind == "absolute":
            return float("inf")
        return float((w_max - raw_tail) * max(self.widths) + raw_tail)


ABSOLUTE = PositionScheme()


class WorkingContextConfigLike(Protocol):
    positions: str
    slot_widths: list[int]


@dataclass(frozen=True)
class WCInputs:
    """What the base model reads: embeddings and Gaussian-RoPE positions for each entry."""

    inputs_embeds: torch.Tensor  # [1, N, d]
    mu: torch.Tensor  # [1, N] float64
    sigma: torch.Tensor  # [1, N] float64


def assemble(
    entries: Sequence[Node],
    source: NodeSource,
    embedding: nn.Embedding,
    *,
    offset: int = 0,
    horizon: np.ndarray | None = None,
    positions: PositionScheme = ABSOLUTE,
    first: float = 0.0,
) -> WCInputs:
    """Gather each entry's vector (token embedding or stored gist) and its (μ, σ) in one call.

    `offset` maps window-relative node starts to the source's coordinates (a
    window starting at a multiple of the top span reuses a whole-document tree).
    `horizon` appends teacher-forced tokens after the entries at the next positions (σ = 0).
    `positions`: the position scheme; `first`: where entries[0] starts under a compressed one
    (a suffix of a working context: the position after its prefix).
    """
    d = embedding.weight.shape[1]
    vectors = torch.empty(len(entries), d, dtype=embedding.weight.dtype)  # [N, d]
    token_rows, token_ids = [], []
    i = 0
    while i < len(entries):
        node = entries[i]
        j = i
        while j + 1 < len(entries) and entries[j + 1].level == node.level and entries[j + 1].start == entries[j].end:
            j += 1  # a run of same-level contiguous entries: one read
        if node.level == 0:
            token_rows.extend(range(i, j + 1))
            token_ids.append(source.tokens(offset + node.start, offset + entries[j].end))
        else:
            index = (offset + node.start) // node.span
            gists = source.gists(node.level, index, index + j - i + 1)  # [j - i + 1, d]
            vectors[i : j + 1] = torch.as_tensor(np.asarray(gists, dtype=np.float32)).to(vectors.dtype)
        i = j + 1
    if token_rows:
        ids = torch.as_tensor(np.concatenate(token_ids).astype(np.int64))
        vectors[token_rows] = embedding(ids)
    mu, sigma, after = positions.place(entries, first)
    if horizon is not None and len(horizon):
        vectors = torch.cat([vectors, embedding(torch.as_tensor(horizon.astype(np.int64)))])
        mu = torch.cat([mu, after + torch.arange(len(horizon), dtype=torch.float64)])
        sigma = torch.cat([sigma, torch.zeros(len(horizon), dtype=torch.float64)])
    return WCInputs(vectors[None], mu[None], sigma[None])


def assemble_live(
    entries: Sequence[Node],
    tokens: torch.Tensor,
    embedding: nn.Module,
    gistnet: nn.Module,
    *,
    horizon: int = 0,
    gist_embedding: nn.Module | None = None,
    cursor: int | None = None,
    positions: PositionScheme = ABSOLUTE,
    first: float = 0.0,
) -> WCInputs:
    """Like `assemble`, but gists are computed now by `gistnet` from the window's tokens (differentiable).

    `tokens` [T] holds the window's history followed by `horizon` teacher-forced
    tokens. LOD2 gists are two-stage (32 LOD1 gists of their children, then 32 -> 1),
    exactly as the tree builds them, so gradients reach GistNet through both levels.
    `gist_embedding` (default: `embedding`) is what an embedding-input GistNet reads: the plain base
    embedding when `embedding` carries a LoRA adapter, as the trees were built.
    `entries` may be a suffix of a working context; `cursor` (default: the end of
    the last entry) is where the horizon starts in the tokens; `positions` and `first` as in `assemble`.
    """
    cursor = cursor if cursor is not None else entries[-1].end
    parts: list[torch.Tensor] = []
    by_level: dict[int, list[int]] = {}
    for i, node in enumerate(entries):
        by_level.setdefault(node.level, []).append(i)
    order = torch.empty(len(entries), dtype=torch.long)
    offset = 0
    for level, rows in sorted(by_level.items()):
        starts = torch.tensor([entries[i].start for i in rows])
        ids = starts[:, None] + torch.arange(span(level))  # [n, 32**level] token positions
        reader = embedding if level == 0 else level1_reader(gistnet, gist_embedding or embedding)
        x = reader(tokens[ids])  # [n, 32**level, d]: tokens, or what GistNet's level 1 reads
        for stage in range(1, level + 1):  # 32**level tokens -> 32**(level-1) gists -> ... -> 1
            x = gistnet(x.reshape(-1, BLOCK, x.shape[-1]), stage)  # [n * 32**(level-stage), d]
            x = x.reshape(len(rows), -1, x.shape[-1])
        parts.append(x[:, 0])  # [n, d]
        order[rows] = torch.arange(offset, offset + len(rows))
        offset += len(rows)
    vectors = torch.cat(parts)[order] if parts else embedding(tokens[:0])  # [N, d]
    mu, sigma, after = positions.place(entries, first)
    if positions.kind == "absolute":
        after = float(cursor)  # the horizon follows the history even when `entries` stop short of it
    if horizon:
        vectors = torch.cat([vectors, embedding(tokens[cursor : cursor + horizon])])
        mu = torch.cat([mu, after + torch.arange(horizon, dtype=torch.float64)])
        sigma = torch.cat([sigma, torch.zeros(horizon, dtype=torch.float64)])
    return WCInputs(vectors[None], mu[None], sigma[None])
