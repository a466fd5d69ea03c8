"""The greedy, discrete Focus Allocator (docs/architecture.md §2.6): LensNet scores -> expand/collapse edits within W_max.

Expands (score > τ_e) by score descending and collapses (mean score of a
complete aligned sibling group < −τ_c) by score ascending, alternating, at
most N_diff per refocus; an expand that does not fit is preceded by the best
pending collapse or skipped, so the budget holds at every moment. Hysteresis
is kept per tree node: a node created by an action stays `min_residency`
refocuses and cannot take the opposite action within `cooldown`. `reach` is the
same allocator without the N_diff cap, for a new window (a cold start, a
training snapshot, an evaluation cursor): best-first, collapses paying for
expands, rescoring between rounds, so it reaches the focus the scores ask for.
Scoring is LensNet's job; this module never looks at vectors.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from megacontext.config import AllocatorConfig
from megacontext.context.nodes import BLOCK, Node
from megacontext.context.working_context import BudgetExceeded, WorkingContext


@dataclass(frozen=True)
class Edit:
    action: str  # "expand" | "collapse"
    node: Node  # the gist expanded, or the parent created by a collapse
    score: float
    refocus: int


class FocusAllocator:
    def __init__(self, cfg: AllocatorConfig):
        self.cfg = cfg
        self.refocuses = 0
        self._created: dict[Node, tuple[int, str]] = {}  # node -> (refocus it was created at, by which action)
        self._swap_rates: list[float] = []
        self._utilisation: list[float] = []
        self._residency: list[int] = []
        self._reaching = False

    def _blocked(self, node: Node, action: str) -> bool:
        record = self._created.get(node)
        if record is None:
            return False
        when, how = record
        age = self.refocuses - when
        if age == 0 and self._reaching:  # made earlier in this reach: refine further, never reverse
            return how != action
        return age < self.cfg.min_residency or (how != action and age < self.cfg.cooldown)

    def collapsible(self, wc: WorkingContext) -> list[tuple[int, Node]]:
        """(index, parent) of every complete aligned run of 32 siblings that may legally collapse."""
        entries, groups = wc.entries, []
        i = 0
        while i + BLOCK <= len(entries):
            node = entries[i]
            parent = node.parent() if node.level < wc.levels else None
            if parent and node.start == parent.start and wc.may_collapse_into(parent) and entries[i + BLOCK - 1].end == parent.end \
                    and entries[i + BLOCK - 1].level == node.level:
                groups.append((i, parent))
                i += BLOCK
            else:
                i += 1
        return groups

    def _candidates(self, wc: WorkingContext, scores: np.ndarray):
        cfg, entries = self.cfg, wc.entries
        expands = [(float(scores[i]), node) for i, node in enumerate(entries)
                   if node.level > 0 and scores[i] > cfg.expand_threshold and not self._blocked(node, "expand")]
        collapses = []
        for i, parent in self.collapsible(wc):
            mean = float(np.mean(scores[i : i + BLOCK]))
            if mean < -cfg.collapse_threshold and not any(self._blocked(n, "collapse") for n in entries[i : i + BLOCK]):
                collapses.append((mean, parent))
        expands.sort(key=lambda c: -c[0])
        collapses.sort(key=lambda c: c[0])
        return expands, collapses

    def refocus(self, wc: WorkingContext, scores: np.ndarray) -> list[Edit]:
        """Choose and apply up to N_diff edits to `wc` in place; return them."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (len(wc),):
            raise ValueError(f"need one score per entry: got {scores.shape}, the WC has {len(wc)} entries")
        entries_before = len(wc)
        expands, collapses = self._candidates(wc, scores)
        edits: list[Edit] = []
        turn_expand = True
        while len(edits) < self.cfg.max_actions and (expands or collapses):
            if turn_expand and expands:
                score, node = expands.pop(0)
                if len(wc) + BLOCK - 1 > wc.w_max:  # make room first, or skip this expand
                    if not collapses:
                        continue
                    self._collapse(wc, *collapses.pop(0), edits)
                    if len(edits) >= self.cfg.max_actions or len(wc) + BLOCK - 1 > wc.w_max:
                        continue
                self._expand(wc, score, node, edits)
            elif collapses:
                self._collapse(wc, *collapses.pop(0), edits)
            turn_expand = not turn_expand
        self._swap_rates.append(len(edits) / max(entries_before, 1))
        self._utilisation.append(len(wc) / wc.w_max)
        self.refocuses += 1
        return edits

    def reach(self, wc: WorkingContext, score: Callable[[WorkingContext], np.ndarray], rounds: int = 4) -> list[Edit]:
        """Apply every edit the scores justify, in one refocus of the hysteresis clock; return them.

        For a new window (docs/architecture.md §2.6, "reach"): each round calls `score(wc)` for one
        score per entry [len(wc)] (rescoring sees the children of the last round's expands), then
        takes expand candidates best first; one that does not fit is paid for by the lowest-scored
        collapse candidate (every edit moves 31 positions, so score order is order per budget
        unit), and when no collapse is left to pay, the round ends. Collapses that pay for nothing
        are not made: unused budget would only lose detail. Thresholds and hysteresis against
        earlier refocuses hold as in `refocus`; inside one reach a node made by an expand may be
        expanded again (refining toward raw tokens) and one made by a collapse collapsed again,
        never the reverse, so a reach cannot ping-pong. Stops after `rounds` rounds or a round
        with no edit. The budget holds after every edit.
        """
        entries_before = len(wc)
        edits: list[Edit] = []
        self._reaching = True
        try:
            for _ in range(rounds):
                scores = np.asarray(score(wc), dtype=np.float64)
                if scores.shape != (len(wc),):
                    raise ValueError(f"need one score per entry: got {scores.shape}, the WC has {len(wc)} entries")
                made = len(edits)
                expands, collapses = self._candidates(wc, scores)
                for value, node in expands:
                    payers = [c for c in collapses if not c[1].start <= node.start < c[1].end]  # not its own group
                    while len(wc) + BLOCK - 1 > wc.w_max and payers:
                        payer = payers.pop(0)
                        collapses.remove(payer)
                        self._collapse(wc, *payer, edits)
                    if len(wc) + BLOCK - 1 > wc.w_max:
                        break
                    self._expand(wc, value, node, edits)
                if len(edits) == made:
                    break
        finally:
            self._reaching = False
        self._swap_rates.append(len(edits) / max(entries_before, 1))
        self._utilisation.append(len(wc) / wc.w_max)
        self.refocuses += 1
        return edits

    def make_room(self, wc: WorkingContext, free: int, scores: Mapping[Node, float] | None = None, *,
                  optional: bool = False) -> list[Edit]:
        """Collapse until at least `free` positions are free under W_max (the budget is a hard limit).

        With `optional` the room is wanted, not needed (the runtime's `room_slack`): collapsing stops
        before the first group hysteresis holds or LensNet wants kept, or when nothing is left to
        collapse, and never raises.

        Streaming appends grow the WC between refocuses, so the runtime keeps a block of
        headroom. Groups go in order: not held by hysteresis first; then the groups LensNet asks
        to collapse (mean score `scores` by node, unscored nodes 0, below −τ_c), lowest first; then
        the undecided groups coarser first, then oldest, whatever their score; last the groups it
        wants kept (mean above τ_e), in the same order. So the past is summarised
        and the recent tokens stay LOD0, the cold start's shape (docs/architecture.md §2.4), unless
        LensNet wants otherwise: scores inside the thresholds do not rank forced collapses (they
        used to, and an undecided LensNet then collapsed the raw tail first: a 105k-token
        document streamed into 268 raw tokens and 1,710 LOD1 gists). Hysteresis yields only
        when nothing else can free the room. Raises `BudgetExceeded` when no legal collapse is
        left (the budget cannot hold this history).
        """
        scores = scores or {}
        edits: list[Edit] = []
        while wc.w_max - len(wc) < free:
            groups = self.collapsible(wc)
            if not groups and optional:
                break
            if not groups:
                raise BudgetExceeded(
                    f"W_max {wc.w_max} cannot hold {wc.cursor:,} tokens with a {wc.protected_tail}-token protected tail "
                    f"and {free} positions of headroom: nothing is left to collapse; raise wc.w_max or wc.levels")

            def mean_score(group: tuple[int, Node]) -> float:
                return float(np.mean([scores.get(n, 0.0) for n in wc.entries[group[0] : group[0] + BLOCK]]))

            def order(group: tuple[int, Node]) -> tuple[bool, float, bool, int, int]:
                held = any(self._blocked(n, "collapse") for n in wc.entries[group[0] : group[0] + BLOCK])
                mean = mean_score(group)
                wanted = min(mean + self.cfg.collapse_threshold, 0.0)  # < 0 only where LensNet asks to collapse
                kept = mean > self.cfg.expand_threshold  # LensNet wants this detail: it goes last
                return held, wanted, kept, -group[1].level, group[1].start

            i, parent = min(groups, key=order)
            held, _, kept, _, _ = order((i, parent))
            if optional and (held or kept):
                break  # wanted room never overrides hysteresis nor detail LensNet wants
            self._collapse(wc, mean_score((i, parent)), parent, edits)
        return edits

    def _index(self, wc: WorkingContext, node: Node) -> int | None:
        i = bisect_left(wc.entries, node.start, key=lambda n: n.start)
        return i if i < len(wc.entries) and wc.entries[i] == node else None

    def _record(self, node: Node, action: str) -> None:
        previous = self._created.pop(node, None)
        if previous is not None:
            self._residency.append(self.refocuses - previous[0])

    def _expand(self, wc: WorkingContext, score: float, node: Node, edits: list[Edit]) -> None:
        index = self._index(wc, node)
        if index is None:  # consumed by an earlier collapse in this refocus
            return
        wc.expand(index)
        self._record(node, "expand")
        for child in node.children():
            self._created[child] = (self.refocuses, "expand")
        edits.append(Edit("expand", node, score, self.refocuses))

    def _collapse(self, wc: WorkingContext, score: float, parent: Node, edits: list[Edit]) -> None:
        first = parent.children()[0]
        index = self._index(wc, first)
        if index is None or wc.entries[index : index + BLOCK] != parent.children():
            return  # the group changed earlier in this refocus
        wc.collapse(index)
        for child in parent.children():
            self._record(child, "collapse")
        self._created[parent] = (self.refocuses, "collapse")
        edits.append(Edit("collapse", parent, score, self.refocuses))

    def telemetry(self) -> dict[str, float]:
        residency = np.asarray(self._residency, dtype=np.float64)
        return {
            "refocuses": float(self.refocuses),
            "swap_rate": float(np.mean(self._swap_rates)) if self._swap_rates else 0.0,
            "budget_utilisation_mean": float(np.mean(self._utilisation)) if self._utilisation else 0.0,
            "budget_utilisation_max": float(np.max(self._utilisation)) if self._utilisation else 0.0,
            "residency_mean": float(residency.mean()) if residency.size else 0.0,
            "residency_p95": float(np.percentile(residency, 95)) if residency.size else 0.0,
        }
