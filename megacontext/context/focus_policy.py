"""The focusing policy: cold start, then LensNet scores -> Focus Allocator edits (docs/architecture.md §2.5-2.6).

`lens_inputs_for` turns a working context into LensNet's inputs (entry vectors
exactly as the base reads them, tail gists, features); `lens_policy` refocuses a
window's cold-start WC a few times, which is how training phases get on-policy
working contexts. Streaming refocus every 32 tokens belongs to the runtime.
A policy keeps focus telemetry (swap rate, residency, budget utilisation, time
spent focusing) that phases and the evaluation drain into their own telemetry.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from megacontext.config import Config
from megacontext.context.focus_allocator import FocusAllocator
from megacontext.model.lensnet import LensInputs, LensNet, lens_inputs, tail_nodes
from megacontext.context.nodes import Node
from megacontext.data.windows import Window
from megacontext.context.working_context import WorkingContext, assemble_live, cold_start

REFOCUSES = 4  # allocator passes per training window (each at most N_diff edits)
FOCUS_METRICS = ("swap_rate", "residency_mean", "budget_utilisation", "focus_ms")


class Policy:
    """Window -> working context, keeping per-window focus telemetry until drained."""

    def __init__(self, focus: Callable[[Window], tuple[WorkingContext, dict[str, float]]]):
        self._focus = focus
        self._sums = dict.fromkeys(FOCUS_METRICS, 0.0)
        self._windows = 0

    def __call__(self, window: Window) -> WorkingContext:
        tick = time.perf_counter()
        wc, stats = self._focus(window)
        stats = {"budget_utilisation": len(wc) / wc.w_max, "focus_ms": 1000 * (time.perf_counter() - tick), **stats}
        for key in FOCUS_METRICS:
            self._sums[key] += stats.get(key, 0.0)
        self._windows += 1
        return wc

    def drain(self, windows: float | None = None) -> dict[str, float]:
        """Means per window since the last drain; times `windows` when given (the training loop logs sums / windows)."""
        if not self._windows:
            return {}
        scale = (windows if windows is not None else 1.0) / self._windows
        out = {key: value * scale for key, value in self._sums.items()}
        self._sums, self._windows = dict.fromkeys(FOCUS_METRICS, 0.0), 0
        return out


@torch.no_grad()
def wc_lens_inputs(wc: WorkingContext, tail_lod1: int, read: Callable[[Sequence[Node]], torch.Tensor]) -> LensInputs:
    """LensNet's inputs for `wc`; `read(nodes)` gives the nodes' vectors [n, d] (live GistNet or a tree)."""
    vectors = read(wc.entries)  # [N, d]
    tail = [n for n in tail_nodes(wc.cursor, tail_lod1, top_level=wc.levels) if n.level <= wc.levels]
    tail_vectors = read(tail) if tail else vectors[:0]
    return lens_inputs(wc.entries, wc.cursor, vectors, tail, tail_vectors)


def lens_inputs_for(wc: WorkingContext, tokens: torch.Tensor, embedding: nn.Module, gistnet: nn.Module,
                    tail_lod1: int) -> LensInputs:
    """LensNet's inputs with gists computed live from the window's tokens."""
    return wc_lens_inputs(wc, tail_lod1, lambda nodes: assemble_live(nodes, tokens, embedding, gistnet,
                                                                      cursor=wc.cursor).inputs_embeds[0])


def cold_start_policy(cfg: Config, budget: int | None = None) -> Policy:
    budget = budget or cfg.train.budget
    return Policy(lambda w: (cold_start(w.history, budget, cfg.wc.protected_tail, cfg.wc.levels), {}))


def lens_policy(cfg: Config, embedding: nn.Module, gistnet: nn.Module, lensnet: LensNet,
                budget: int | None = None, refocuses: int = REFOCUSES) -> Policy:
    """Cold start, then up to `refocuses` LensNet + allocator passes (stops early when nothing changes).

    `cfg.allocator.new_window` picks the passes: N_diff-capped refocuses, or the rounds of one
    uncapped `FocusAllocator.reach`. Training snapshots and the evaluation both focus here.
    """
    budget = budget or cfg.train.budget

    @torch.no_grad()
    def focus(window: Window) -> tuple[WorkingContext, dict[str, float]]:
        wc = cold_start(window.history, budget, cfg.wc.protected_tail, cfg.wc.levels)
        tokens = torch.as_tensor(window.tokens.astype(np.int64))
        allocator = FocusAllocator(cfg.allocator)

        def score(wc: WorkingContext) -> np.ndarray:
            return lensnet(lens_inputs_for(wc, tokens, embedding, gistnet, cfg.lensnet.tail_lod1))[0].cpu().numpy()

        if cfg.allocator.new_window == "reach":
            allocator.reach(wc, score, rounds=refocuses)
        else:
            for _ in range(refocuses):
                if not allocator.refocus(wc, score(wc)):
                    break
        stats = allocator.telemetry()
        return wc, {"swap_rate": stats["swap_rate"], "residency_mean": stats["residency_mean"]}

    return Policy(focus)
