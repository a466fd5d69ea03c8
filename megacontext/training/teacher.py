"""Dense LensNet supervision: the attention mass a training window's horizon puts on each history block.

One full-context pass of the frozen base over a window (history + horizon) gives a relevance score for
every aligned 32-token block of its history: the softmax mass the horizon-predicting queries put on
the block, summed over layers and heads (docs/architecture.md §2.5; reader attention as retrieval
labels, Izacard & Grave 2020; SnapKV/NSA-style block selection). `relevance_targets` turns the masses
into a [-1, 1] target for every entry of a working context. The masses depend only on the base, the
data and the windows, never on a cycle, so `teacher_masses` builds them once into an artifact with a
lineage manifest and every later cycle reuses it; a damaged or stale cache is rebuilt, never read.
Not cached here (yet): the teacher's horizon log-probs for JT1/JT3, whose windows come from other seeds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megacontext.config import Config
from megacontext.context.nodes import BLOCK, Node
from megacontext.data.shards import shards_dir
from megacontext.data.windows import Window
from megacontext.lifecycle.lineage import (is_reusable, manifest_digest, read_manifest, sha256_json, staged_artifact,
                                           write_manifest)
from megacontext.model.attention_mass import attention_mass, block_sums
from megacontext.model.base_model import BaseLM
from megacontext.progress import progress_bar

KIND = "lens-teacher"
FORMAT_VERSION = 1
MASS_FILE = "block_mass.npz"
SINK_BLOCKS = 1  # the window's first block: the attention sink (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", 2023)
TARGET_RANGE = 4.0  # a block this many times above (below) the budget's threshold mass gets target +1 (-1)


@torch.no_grad()
def horizon_block_mass(base: BaseLM, window: Window) -> np.ndarray:
    """[history // 32] float64: attention mass of the horizon-predicting queries on each history block.

    The queries are the rows that predict the horizon tokens (the last history token, then the first
    H - 1 horizon tokens), as in the evaluation's attention oracle; the history's trailing partial
    block, if any, is left out. One forward of `history + horizon` tokens; no L×L matrix is kept.
    """
    n, h = window.history, len(window.horizon)
    ids = torch.as_tensor(window.tokens.astype(np.int64))[None]  # [1, n + h]
    mass, _ = attention_mass(base.model, [torch.arange(n - 1, n + h - 1)], input_ids=ids)  # [1, n + h]
    return block_sums(mass[0], 0, n // BLOCK * BLOCK, BLOCK).cpu().numpy()


def position_prior(masses: Sequence[np.ndarray], leave_out: int | None = None) -> np.ndarray:
    """[B] float64: the mean share of the horizon's mass on each block position, over windows.

    Each window's masses (`horizon_block_mass`, one length B for all) are first normalised to sum 1
    over its non-sink blocks; the prior is their mean per block index, floored at 1e-9 of its
    total. Dividing a window's masses by it (`debiased`) leaves how much more (or less) attention a
    block draws than blocks at that position usually do: the question-dependent part, without the
    attention sink's spill-over onto the next blocks and the recency slope near the cursor (what an
    unadjusted target teaches a LensNet that sees each entry's position).

    `leave_out`: the index of a window to leave out of the mean (a training window is debiased by the
    other windows' prior, as a held-out one is: a window in its own prior would have its peaks squashed).
    ValueError for no windows or windows of different lengths.
    """
    if len(masses) - (leave_out is not None) < 1:
        raise ValueError("a position prior needs at least one window")
    if len({len(m) for m in masses}) != 1:
        raise ValueError(f"windows of different lengths: {sorted({len(m) for m in masses})} blocks")
    stacked = np.asarray(masses, dtype=np.float64)  # [W, B]
    if leave_out is not None:
        stacked = np.delete(stacked, leave_out, axis=0)
    share = stacked / np.maximum(stacked[:, SINK_BLOCKS:].sum(axis=1, keepdims=True), 1e-30)
    prior = share.mean(axis=0)
    return np.maximum(prior, 1e-9 * prior[SINK_BLOCKS:].sum())


def debiased(mass: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """A window's block masses [B] divided by the position prior [B] (the sink blocks left as they are)."""
    if len(mass) != len(prior):
        raise ValueError(f"{len(mass)} block masses for a {len(prior)}-block position prior")
    out = np.asarray(mass, dtype=np.float64).copy()
    out[SINK_BLOCKS:] = out[SINK_BLOCKS:] / prior[SINK_BLOCKS:]
    return out


def relevance_targets(entries: Sequence[Node], cursor: int, protected_tail: int, w_max: int,
                      mass: np.ndarray, sink: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [N] in [-1, 1], labelled [N] bool) for a working context from its window's block masses.

    The budget decides how many 32-token blocks before the protected tail can be read raw: with all
    U of them as LOD1 gists, K = (w_max - protected_tail - U) // 31 more fit (at least 1). The
    threshold θ is the K-th largest block mass among them. An entry's value is its block's mass (a
    token) or the largest block mass it covers (a gist, whose expansion leads there), and its target
    is log(value / θ) / log(TARGET_RANGE) clipped to [-1, 1]: gists above θ should expand, blocks
    below it should collapse. A token's target is at most 0 (it cannot expand); tokens of the protected
    tail are unlabelled (no legal action). `mass` [≥ blocks before the cursor] from `horizon_block_mass`.

    The window's first `SINK_BLOCKS` blocks are the attention sink: the base's first positions draw a
    large share of every query's attention whatever they hold (36-51 % of the horizon's mass on
    SmolLM2 windows of 2,048 tokens), and whatever entry comes first in a working context plays that
    part. Their mass says nothing about relevance, so it takes no part in θ or in any entry's value;
    an entry that covers only sink blocks is unlabelled. So are the raw tokens of a working context's
    own attention sink (`sink`, `wc.sink_tokens`): they have no legal action either.
    """
    tail_from = max(0, cursor - protected_tail)
    free = tail_from // BLOCK  # U: blocks wholly before the protected tail
    if len(mass) < cursor // BLOCK:
        raise ValueError(f"{len(mass)} block masses for a {cursor}-token history ({cursor // BLOCK} blocks)")
    mass = np.asarray(mass, dtype=np.float64)
    floor = 1e-9 * max(float(mass[SINK_BLOCKS:].sum()), 1e-30)  # zero mass -> a finite, very negative log
    keep = max(1, (w_max - protected_tail - free) // (BLOCK - 1))
    ranked = np.sort(mass[SINK_BLOCKS:free])[::-1]
    theta = (ranked[min(keep, len(ranked)) - 1] if len(ranked) else float(mass[SINK_BLOCKS:].max(initial=0.0))) + floor
    target = torch.zeros(len(entries))
    labelled = torch.zeros(len(entries), dtype=torch.bool)
    for i, node in enumerate(entries):
        if node.level == 0 and (node.start >= tail_from or node.start < sink):
            continue
        first = max(node.start // BLOCK, SINK_BLOCKS)
        blocks = mass[first : max(node.end // BLOCK, node.start // BLOCK + 1)]
        if not len(blocks):  # only sink blocks
            continue
        value = float(blocks.max()) + floor
        t = float(np.clip(np.log(value / theta) / np.log(TARGET_RANGE), -1.0, 1.0))
        target[i] = min(t, 0.0) if node.level == 0 else t
        labelled[i] = True
    return target, labelled


def teacher_key(cfg: Config, base_model_id: str, windows: Sequence[Window]) -> dict:
    """What the masses depend on: the base, the shards, and exactly which windows."""
    windows = [[w.doc_id, int(w.start), int(w.history), len(w.tokens)] for w in windows]
    return {"base": base_model_id, "shards": manifest_digest(read_manifest(shards_dir(cfg))), "windows": windows}


def teacher_dir(cfg: Config) -> Path:
    return Path(cfg.paths.artifact_root) / "teacher"


def teacher_masses(cfg: Config, base: BaseLM, windows: Sequence[Window]) -> tuple[list[np.ndarray], Path]:
    """(each window's `horizon_block_mass`, the cache folder): from the cache when it holds exactly these
    windows, else built.

    The cache (`<artifact root>/teacher/<key digest>/`) is sealed with a manifest like every other
    artifact; a missing, damaged or different one is rebuilt in a staging folder and published
    atomically, so a crash leaves the previous cache or none.
    """
    key = teacher_key(cfg, base.model_id, windows)
    digest = sha256_json(key)[:16]
    folder = teacher_dir(cfg) / digest
    if is_reusable(folder, kind=KIND, format_version=FORMAT_VERSION, config_hash=digest):
        with np.load(folder / MASS_FILE) as saved:
            return [saved[f"w{i:05d}"] for i in range(len(windows))], folder
    masses = []
    start = time.perf_counter()
    with progress_bar("teacher passes", total=len(windows), unit="windows") as advance:
        for window in windows:
            masses.append(horizon_block_mass(base, window))
            advance(1)
    with staged_artifact(folder) as staging:
        np.savez_compressed(staging / MASS_FILE, **{f"w{i:05d}": m for i, m in enumerate(masses)})
        (staging / "key.json").write_text(json.dumps(key, indent=1) + "\n")
        write_manifest(staging, kind=KIND, format_version=FORMAT_VERSION, config_hash=digest,
                       inputs=[shards_dir(cfg)], extra={"windows": len(windows), "seconds": time.perf_counter() - start})
    return masses, folder
