"""The working context's K/V cache across edits (docs/architecture.md §2.10).

The base model reads the WC's entries in order (tokens and gists of every
level, each with its Gaussian-RoPE position). An entry's K/V in every layer
depend on it and on everything before it, so an edit at entry i (an expand or
collapse replaces the node there; an append adds nodes at the end) invalidates
the edited node and every entry after it, while entries [0, i) are unchanged
and reused. The cache remembers which entries its K/V belong to, finds the
longest unchanged prefix of the next WC, drops the rest and runs only the
suffix. `recompute=True` (or `invalidate()`) is the full-recompute fallback.

`tail_attention` reads LensNet's question-aware input (architecture.md §2.5) from the cache:
only the last q entries run again, watched, against the cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from transformers import DynamicCache

from megacontext.model.attention_mass import capturing
from megacontext.model.base_model import BaseLM, has_sliding_window_layers
from megacontext.model.gaussian_rope import gaussian_positions
from megacontext.context.nodes import Node
from megacontext.context.working_context import ABSOLUTE, NodeSource, PositionScheme, assemble


def common_prefix(a: Sequence[Node], b: Sequence[Node]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class CacheStats:
    forwards: int = 0
    reused: int = 0  # entries whose K/V were reused
    computed: int = 0  # entries run through the base model
    invalidated: int = 0  # cached entries dropped by edits
    computed_by_level: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        total = self.reused + self.computed
        return {"forwards": self.forwards, "entries_reused": self.reused, "entries_computed": self.computed,
                "entries_invalidated": self.invalidated, "reuse_fraction": self.reused / total if total else 0.0,
                **{f"computed_lod{level}": n for level, n in sorted(self.computed_by_level.items())}}


class WCKVCache:
    """Logits of the next token after a working context, reusing K/V of its unchanged prefix."""

    def __init__(self, base: BaseLM, *, recompute: bool = False, positions: PositionScheme = ABSOLUTE):
        self.base, self.recompute, self.positions = base, recompute, positions
        self.sliding = has_sliding_window_layers(base.model)
        self.entries: list[Node] = []
        self.cache = DynamicCache(config=base.model.config)
        self.logits: torch.Tensor | None = None  # [V] after self.entries
        self.stats = CacheStats()

    def invalidate(self) -> None:
        self.entries, self.logits = [], None
        self.cache = DynamicCache(config=self.base.model.config)

    @torch.no_grad()
    def next_logits(self, entries: Sequence[Node], source: NodeSource) -> torch.Tensor:
        """[V] float32 logits for the token after `entries` (the WC tiling [0, cursor))."""
        if not entries:
            raise ValueError("the working context is empty: feed at least one token first")
        keep = common_prefix(self.entries, entries)
        if self.recompute or (self.sliding and keep < len(self.entries)):
            self.invalidate()  # a sliding-window cache keeps only its window: it cannot crop back to a prefix
            keep = 0
        if keep == len(entries) == len(self.entries) and self.logits is not None:
            return self.logits
        keep = min(keep, len(entries) - 1)  # the last entry's logits are needed: run at least it
        dropped = len(self.entries) - keep
        if dropped:
            self.cache.crop(-dropped)
        suffix = list(entries[keep:])
        first = self.positions.after(entries[:keep])  # compressed: the suffix continues its prefix's slots
        inputs = assemble(suffix, source, self.base.model.get_input_embeddings(), positions=self.positions, first=first)
        with gaussian_positions(self.base.model, inputs.mu, inputs.sigma):
            out = self.base.model(inputs_embeds=inputs.inputs_embeds, past_key_values=self.cache, use_cache=True,
                                  logits_to_keep=1)
        self.cache = out.past_key_values
        self.entries = list(entries)
        self.logits = out.logits[0, -1].float()
        s = self.stats
        s.forwards += 1
        s.reused += keep
        s.computed += len(suffix)
        s.invalidated += dropped
        for node in suffix:
            s.computed_by_level[node.level] = s.computed_by_level.get(node.level, 0) + 1
        return self.logits

    @torch.no_grad()
    def tail_attention(self, entries: Sequence[Node], source: NodeSource, queries: int) -> np.ndarray:
        """[N] the mean attention probability the last `queries` entries put on each entry (sums to 1).

        The same numbers as `focus_policy.wc_attention` over the whole WC (up to float rounding),
        at the cost of a `queries`-entry forward: the cache is brought up to `entries`, cropped to
        the first N - q, and the last q entries run again against it, watched; their K/V come back
        the same. The cache reads the base as it is: a caller that wants the plain base's attention
        of an adapted base measures it with a full forward instead (the cached prefix is adapted).
        ValueError for a cache that cannot crop (sliding-window layers) or recomputes.
        """
        if self.sliding or self.recompute:
            raise ValueError("this cache cannot crop back to a prefix; measure the attention with a full forward")
        n = len(entries)
        q = min(queries, n - 1)  # at least one cached entry before the watched ones
        self.next_logits(entries, source)
        model = self.base.model
        self.cache.crop(-q)  # keep the first n - q entries (the cache holds exactly `entries`)
        inputs = assemble(entries[n - q :], source, model.get_input_embeddings(), positions=self.positions,
                          first=self.positions.after(entries[: n - q]))
        with gaussian_positions(model, inputs.mu, inputs.sigma), \
                capturing(model, [torch.arange(n - q, n)], n, query_start=n - q) as capture:
            out = model(inputs_embeds=inputs.inputs_embeds, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        mass = capture.mass[0]
        return (mass / mass.sum()).float().numpy()
