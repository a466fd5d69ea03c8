"""Attention mass on the keys from chosen query rows, in one ordinary forward (no L×L matrix kept).

`attention_mass` runs the frozen base once over a sequence and, for a few groups of
query rows (e.g. the horizon of each cursor, or the last 64 history tokens before
it), returns how much softmax attention each group puts on every key position,
summed over layers, heads and the group's rows: mass [G, T]. Block-summed, this is
LensNet's dense relevance target and the ranking of the attention oracle and the
training-free focus of the evaluation (docs/lifecycle.md §4). The forward itself still runs SDPA;
only the chosen rows' scores are recomputed, per layer, in chunks, so memory is
O(rows × T) per layer, never O(T²).

Installed like MegaAttention: an attention function registered with transformers'
`AttentionInterface` and selected for the duration of the call, so no modeling code
is forked. Causal masks (and sliding-window masks, e.g. Gemma 3's local layers) are
taken from the mask the model passes in; `None` means plain causal.

Precedents: reader attention as retrieval labels (Izacard & Grave, "Distilling
Knowledge from Reader to Retriever", 2020); SnapKV's observation-window voting
(Li et al., 2024) and H2O's accumulated attention (Zhang et al., 2023) for the training-free variant.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from megacontext.model.base_model import prefill

IMPLEMENTATION = "megacontext_mass"
ROW_CHUNK = 256  # query rows whose scores are materialised at once: [chunk, T] per head


class _Capture:
    """Query rows to watch and the mass accumulated over the layers of one forward."""

    def __init__(self, groups: Sequence[torch.Tensor], length: int) -> None:
        rows = torch.cat([torch.as_tensor(g, dtype=torch.long) for g in groups]) if groups else torch.zeros(0, dtype=torch.long)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= length):
            raise ValueError(f"query rows must lie in [0, {length}); got {int(rows.min())}..{int(rows.max())}")
        self.rows, inverse = torch.unique(rows, return_inverse=True)  # [R] sorted
        self.member = torch.zeros(len(groups), len(self.rows))  # [G, R]: which rows each group sums
        offset = 0
        for g, group in enumerate(groups):
            n = len(group)
            self.member[g, inverse[offset : offset + n]] = 1.0
            offset += n
        self.mass = torch.zeros(len(groups), length, dtype=torch.float64)  # [G, T]
        self.layers = 0
        self.query_start = 0  # absolute position of the forward's first query (> 0 after a cached prefill)


_active: list[_Capture] = []


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if _active:
        _accumulate(_active[-1], module, query, key, attention_mask, scaling)
    return out


def _accumulate(capture: _Capture, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None) -> None:
    # query [B, Hq, q, D]: positions [query_start, T); key [B, Hkv, k, D]: positions [T - k, T) (all of them
    # without a cache; after a cached prefill, a sliding-window layer's cache holds only its window)
    length = capture.mass.shape[1]
    if query.shape[0] != 1 or query.shape[2] != length - capture.query_start or key.shape[2] > length:
        raise ValueError("attention_mass needs one sequence per forward (batch 1) covering every watched row")
    keys = repeat_kv(key, getattr(module, "num_key_value_groups", 1))[0].float()  # [Hq, k, D]
    first_key = length - keys.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    positions = torch.arange(first_key, length)
    if attention_mask is not None:
        attention_mask = attention_mask[..., : keys.shape[1]]
    for lo in range(0, len(capture.rows), ROW_CHUNK):
        rows = capture.rows[lo : lo + ROW_CHUNK]  # [r] absolute positions
        local = rows - capture.query_start  # their rows in this forward's queries
        scores = torch.einsum("hrd,htd->hrt", query[0][:, local].float(), keys) * scale  # [Hq, r, k]
        if attention_mask is None:
            allowed = positions[None, :] <= rows[:, None]  # [r, k] causal
            scores = scores.masked_fill(~allowed, float("-inf"))
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[0, :, local], float("-inf"))  # [1 or Hq, r, k]
        else:
            scores = scores + attention_mask[0, :, local].float()
        probs = torch.softmax(scores, dim=-1).sum(dim=0)  # [r, k] summed over heads
        capture.mass[:, first_key:] += (capture.member[:, lo : lo + ROW_CHUNK] @ probs).double()  # [G, k]
    capture.layers += 1


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@contextmanager
def _implementation(model: nn.Module, name: str) -> Iterator[None]:
    previous = model.config._attn_implementation
    if previous != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if previous != name:
            model.set_attn_implementation(previous)


@contextmanager
def capturing(model: nn.Module, groups: Sequence[torch.Tensor], length: int, query_start: int = 0) -> Iterator[_Capture]:
    """Watch the attention of the forwards run inside the block; the yielded capture's `mass` [G, length]
    (float64) accumulates as in `attention_mass`.

    For a forward the caller runs itself, e.g. the last entries of a working context against a K/V
    cache holding the first `query_start` positions: that forward's queries must be positions
    [query_start, length), one sequence, and every watched row must lie among them (ValueError).
    RuntimeError if no attention ran through the AttentionInterface.
    """
    capture = _Capture(list(groups), length)
    if len(capture.rows) and int(capture.rows.min()) < query_start:
        raise ValueError(f"watched rows must be queries of this forward (>= {query_start})")
    capture.query_start = query_start
    with _implementation(model, IMPLEMENTATION):
        _active.append(capture)
        try:
            yield capture
        finally:
            _active.pop()
    if capture.layers == 0:
        raise RuntimeError(f"{type(model).__name__} ran no attention through the AttentionInterface; cannot measure mass")


@torch.no_grad()
def attention_mass(model: nn.Module, groups: Sequence[torch.Tensor], *, logits_at: torch.Tensor | None = None,
                   prefill_chunk: int | None = None,
                   **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention mass per group of query rows on every key, and optionally some logits, from one forward.

    `inputs`: `input_ids` [1, T] or `inputs_embeds` [1, T, d] (plus anything else the model takes).
    `groups`: G tensors of query-row indices in [0, T). Returns (mass [G, T] float64: softmax weights
    summed over layers, heads and the group's rows, so each row contributes `layers × heads` in
    total; logits [1, len(logits_at), V] at the rows `logits_at`, or None). The model must be a
    Hugging Face model whose attention goes through `AttentionInterface` (Llama, Gemma 3, Qwen, ...).

    `prefill_chunk` (tokens): first run the positions before the earliest watched row or logit into a
    K/V cache, this many at a time, then only the rest with the watched rows: the same numbers up to
    float rounding. For long sequences whose watched rows lie near the end (the evaluation's horizons)
    this skips the O(T²) masked attention of sliding-window layers (their cache keeps only the window;
    Gemma 3: 15 of 18 layers) and keeps every mask small: a 16k-token Gemma-3 pass is ~2.6x faster on
    CPU. Only with `input_ids` or `inputs_embeds` alone (positions follow the cache); ValueError otherwise.
    """
    seq = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]
    length = seq.shape[1]
    capture = _Capture(list(groups), length)
    keep = torch.as_tensor(logits_at, dtype=torch.long) if logits_at is not None else torch.tensor([length - 1])
    split = 0
    if prefill_chunk is not None:
        if prefill_chunk < 1 or set(inputs) - {"input_ids", "inputs_embeds"} or len(inputs) != 1:
            raise ValueError("prefill_chunk needs a positive chunk and input_ids or inputs_embeds alone")
        split = min(int(keep.min()), int(capture.rows.min()) if len(capture.rows) else length - 1)
    cache = DynamicCache(config=model.config) if split else None
    with _implementation(model, IMPLEMENTATION):
        name = next(iter(inputs))
        if split:
            prefill(model, cache, name, seq, split, prefill_chunk)
        capture.query_start = split
        rest = {name: seq[:, split:]} if split else inputs
        _active.append(capture)
        try:
            out = model(**rest, logits_to_keep=keep - split, cache=cache, use_cache=cache is not None)
        finally:
            _active.pop()
    if capture.layers == 0:
        raise RuntimeError(f"{type(model).__name__} ran no attention through the AttentionInterface; cannot measure mass")
    return capture.mass, (out.logits if logits_at is not None else None)


def block_sums(mass: torch.Tensor, start: int, end: int, block: int) -> torch.Tensor:
    """Sum mass [..., T] over the aligned blocks of [start, end): [..., (end - start) // block]."""
    if (end - start) % block:
        raise ValueError(f"[{start}, {end}) is not a whole number of {block}-token blocks")
    part = mass[..., start:end]
    return part.reshape(*part.shape[:-1], -1, block).sum(-1)
