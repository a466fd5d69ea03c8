"""The focusing policy: cold start, then LensNet scores -> Focus Allocator edits (DESIGN §2.5-2.6).

`lens_inputs_for` turns a working context into LensNet's inputs (entry vectors
exactly as the base reads them, tail gists, features); `lens_policy` refocuses a
window's cold-start WC a few times, which is how training phases get on-policy
working contexts. Streaming refocus every 32 tokens belongs to the runtime.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from megacontext.config import Config
from megacontext.focus_allocator import FocusAllocator
from megacontext.lensnet import LensInputs, LensNet, lens_inputs, tail_nodes
from megacontext.windows import Window
from megacontext.working_context import WorkingContext, assemble_live, cold_start

Policy = Callable[[Window], WorkingContext]
REFOCUSES = 4  # allocator passes per training window (each at most N_diff edits)


@torch.no_grad()
def lens_inputs_for(wc: WorkingContext, tokens: torch.Tensor, embedding: nn.Module, gistnet: nn.Module,
                    tail_lod1: int) -> LensInputs:
    vectors = assemble_live(wc.entries, tokens, embedding, gistnet).inputs_embeds[0]  # [N, d]
    tail = [n for n in tail_nodes(wc.cursor, tail_lod1, top_level=wc.levels) if n.level <= wc.levels]
    tail_vectors = assemble_live(tail, tokens, embedding, gistnet, cursor=wc.cursor).inputs_embeds[0] if tail \
        else vectors[:0]
    return lens_inputs(wc.entries, wc.cursor, vectors, tail, tail_vectors)


def cold_start_policy(cfg: Config, budget: int | None = None) -> Policy:
    budget = budget or cfg.train.budget
    return lambda w: cold_start(w.history, budget, cfg.wc.protected_tail, cfg.wc.levels)


def lens_policy(cfg: Config, embedding: nn.Module, gistnet: nn.Module, lensnet: LensNet,
                budget: int | None = None, refocuses: int = REFOCUSES) -> Policy:
    """Cold start, then up to `refocuses` LensNet + allocator passes (stops early when nothing changes)."""
    start = cold_start_policy(cfg, budget)

    @torch.no_grad()
    def policy(window: Window) -> WorkingContext:
        wc = start(window)
        tokens = torch.as_tensor(window.tokens.astype(np.int64))
        allocator = FocusAllocator(cfg.allocator)
        for _ in range(refocuses):
            scores = lensnet(lens_inputs_for(wc, tokens, embedding, gistnet, cfg.lensnet.tail_lod1))[0]
            if not allocator.refocus(wc, scores.numpy()):
                break
        return wc

    return policy
