"""The focusing policy: cold start, then LensNet scores -> Focus Allocator edits (docs/architecture.md §2.5-2.6).

`lens_inputs_for` turns a working context into LensNet's inputs (entry vectors
exactly as the base reads them, tail gists, features); `lens_policy` refocuses a
window's cold-start WC a few times, which is how training phases get on-policy
working contexts. Streaming refocus every 32 tokens belongs to the runtime.
`gist_probe_scores` is a training-free block relevance that needs no full-context pass: the
base's own attention to each block's gist. A policy keeps focus telemetry (swap rate, residency, budget utilisation, time
spent focusing) that phases and the evaluation drain into their own telemetry.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch
from torch import nn

from megacontext.config import Config
from megacontext.errors import ConfigError
from megacontext.context.focus_allocator import FocusAllocator
from megacontext.model.lensnet import LensInputs, LensNet, lens_inputs, tail_nodes
from megacontext.context.block_selection import tail_start
from megacontext.context.nodes import BLOCK, Node
from megacontext.data.windows import Window
from megacontext.context.working_context import ABSOLUTE, PositionScheme, WCInputs, WorkingContext, assemble_live, cold_start
from megacontext.model.attention_mass import attention_mass
from megacontext.model.gaussian_rope import gaussian_positions, install_gaussian_rope

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
def wc_attention(model: nn.Module, inputs: WCInputs, queries: int) -> np.ndarray:
    """[N] the mean attention probability the working context's last `queries` entries put on each entry.

    One forward of the base over the WC as it reads it (`inputs`: embeddings and Gaussian-RoPE
    positions), watching the last `queries` rows (raw tail tokens): softmax weights summed over
    layers, heads and those rows, divided by their count, so the values sum to 1. What the model is
    about to need, as its own queries say: the observation-window vote of SnapKV (Li et al., 2024).
    """
    n = inputs.inputs_embeds.shape[1]
    q = min(queries, n)
    install_gaussian_rope(model)
    with gaussian_positions(model, inputs.mu, inputs.sigma):
        mass, _ = attention_mass(model, [torch.arange(n - q, n)], inputs_embeds=inputs.inputs_embeds)
    return (mass[0] / mass[0].sum()).float().numpy()  # every watched row's softmax sums to 1 in each layer and head


def probe_entries(n: int, tail: int) -> list[Node]:
    """The gist probe's working context over an n-token history: every aligned 32-token block before the raw
    tail (`tail` tokens, widened back to a block boundary as `select_blocks` widens it) as its LOD1 gist, then
    the tail raw. Length start/32 + (n - start): not bounded by any budget."""
    start = tail_start(n, tail)
    return [Node(s, 1) for s in range(0, start, BLOCK)] + [Node(t, 0) for t in range(start, n)]


@torch.no_grad()
def gist_probe_scores(model: nn.Module, tokens: torch.Tensor, embedding: nn.Module, gistnet: nn.Module, *, n: int,
                      tail: int, queries: int, positions: PositionScheme = ABSOLUTE) -> np.ndarray:
    """[n_blocks] relevance of every 32-token block before the raw tail, read from gists: no full-context pass.

    The base `model` reads the probe working context (`probe_entries`: each older block as its LOD1
    gist, computed now by `gistnet` from `tokens` [≥ n], then the raw tail) and a block's score is the
    attention the last `queries` tail tokens put on its gist (`wc_attention`: mean softmax weight over
    layers, heads and those rows). It is SnapKV's observation-window vote (Li et al., 2024) cast on
    gists instead of cached keys, so it costs one forward of n/32 + tail entries instead of n tokens.
    Block b's score is comparable with `select_blocks`' scores (higher = keep raw). Apply the
    adapters the reader should see (e.g. none: the plain base) before calling.
    """
    entries = probe_entries(n, tail)
    n_blocks = tail_start(n, tail) // BLOCK
    if queries > n - n_blocks * BLOCK:
        raise ValueError(f"{queries} query tokens is more than the probe's {n - n_blocks * BLOCK}-token raw tail")
    inputs = assemble_live(entries, tokens, embedding, gistnet, cursor=n, positions=positions)
    return wc_attention(model, inputs, queries)[:n_blocks]


@torch.no_grad()
def wc_lens_inputs(wc: WorkingContext, tail_lod1: int, read: Callable[[Sequence[Node]], torch.Tensor],
                   attention: Callable[[], np.ndarray] | None = None) -> LensInputs:
    """LensNet's inputs for `wc`; `read(nodes)` gives the nodes' vectors [n, d] (live GistNet or a tree);
    `attention()` the entries' attention from the WC's last tail tokens [N] (`wc_attention`), None: not used."""
    vectors = read(wc.entries)  # [N, d]
    tail = [n for n in tail_nodes(wc.cursor, tail_lod1, top_level=wc.levels) if n.level <= wc.levels]
    tail_vectors = read(tail) if tail else vectors[:0]
    return lens_inputs(wc.entries, wc.cursor, vectors, tail, tail_vectors,
                       torch.as_tensor(attention()) if attention is not None else None)


def lens_inputs_for(wc: WorkingContext, tokens: torch.Tensor, embedding: nn.Module, gistnet: nn.Module,
                    tail_lod1: int, *, model: nn.Module | None = None, queries: int = 0,
                    positions: PositionScheme = ABSOLUTE, plain: Callable[[], ContextManager] = nullcontext) -> LensInputs:
    """LensNet's inputs with gists computed live from the window's tokens.

    `queries` > 0 (`lensnet.wc_attention_queries`): also the entries' attention from the last
    `queries` tokens, read by the base `model` with `positions` and its adapters off (`plain()`:
    LensNet learns it in JT2 from the plain base, so every reader measures it there; ValueError
    without a model). `embedding` is the plain base embedding.
    """
    if queries and model is None:
        raise ValueError("a LensNet that reads the working context's attention needs the base model")
    # the WC's gists once: LensNet's entry vectors and the base's input are the same vectors
    whole = assemble_live(wc.entries, tokens, embedding, gistnet, cursor=wc.cursor, positions=positions)

    def read(nodes: Sequence[Node]) -> torch.Tensor:
        if nodes is wc.entries:
            return whole.inputs_embeds[0]
        return assemble_live(nodes, tokens, embedding, gistnet, cursor=wc.cursor).inputs_embeds[0]

    def attention() -> np.ndarray:
        with plain():
            return wc_attention(model, whole, queries)

    return wc_lens_inputs(wc, tail_lod1, read, attention if queries else None)


def check_attention_queries(queries: int, protected_tail: int) -> None:
    """ConfigError when a LensNet reads the attention of more tail tokens than the protected tail keeps raw."""
    if queries > protected_tail:
        raise ConfigError(f"this LensNet reads the attention of the last {queries} tokens, more than "
                          f"wc.protected_tail ({protected_tail}) keeps raw; use the profile it was trained with")


def cold_start_policy(cfg: Config, budget: int | None = None) -> Policy:
    budget = budget or cfg.train.budget
    return Policy(lambda w: (cold_start(w.history, budget, cfg.wc.protected_tail, cfg.wc.levels, cfg.wc.sink_tokens), {}))


def lens_policy(cfg: Config, embedding: nn.Module, gistnet: nn.Module, lensnet: LensNet,
                budget: int | None = None, refocuses: int = REFOCUSES, *, model: nn.Module | None = None,
                plain: Callable[[], ContextManager] = nullcontext) -> Policy:
    """Cold start, then up to `refocuses` LensNet + allocator passes (stops early when nothing changes).

    `cfg.allocator.new_window` picks the passes: N_diff-capped refocuses, or the rounds of one
    uncapped `FocusAllocator.reach`. Training snapshots and the evaluation both focus here.
    A LensNet that reads the WC's attention (`lensnet.wc_attention_queries`) needs the base `model`
    (and `plain`, a context that turns its adapters off, when it carries any): every pass then
    costs one forward of the working context.
    """
    budget = budget or cfg.train.budget
    queries = getattr(lensnet, "cfg", cfg.lensnet).wc_attention_queries  # the checkpoint's own setting
    if queries and model is None:
        raise ValueError("this LensNet reads the working context's attention: lens_policy needs the base model")
    check_attention_queries(queries, cfg.wc.protected_tail)
    positions = PositionScheme.of(cfg.wc)

    @torch.no_grad()
    def focus(window: Window) -> tuple[WorkingContext, dict[str, float]]:
        wc = cold_start(window.history, budget, cfg.wc.protected_tail, cfg.wc.levels, cfg.wc.sink_tokens)
        tokens = torch.as_tensor(window.tokens.astype(np.int64))
        allocator = FocusAllocator(cfg.allocator)

        def score(wc: WorkingContext) -> np.ndarray:
            return lensnet(lens_inputs_for(wc, tokens, embedding, gistnet, cfg.lensnet.tail_lod1, model=model,
                                           queries=queries, positions=positions, plain=plain))[0].cpu().numpy()

        if cfg.allocator.new_window == "reach":
            allocator.reach(wc, score, rounds=refocuses)
        else:
            for _ in range(refocuses):
                if not allocator.refocus(wc, score(wc)):
                    break
        stats = allocator.telemetry()
        return wc, {"swap_rate": stats["swap_rate"], "residency_mean": stats["residency_mean"]}

    return Policy(focus)
