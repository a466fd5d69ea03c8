"""MegaAttention masks and kernels (DESIGN §2.8): leaves attend locally, summaries stand in for the past.

Sequence layout (contiguous segments, so that block sparsity survives):
`[n leaves | n//32 wLOD1 summaries | n//1024 wLOD2 summaries]`. A leaf is a WC
entry; a wLOD1 summary covers an aligned run of 32 leaves, a wLOD2 summary a
run of 1,024. Every node has an anchor: a leaf its own index, a summary its
last child (summary queries attend like their last child).

For a query anchored at p, with the local window starting at the block-aligned
w0 = 32·⌊max(p − W + 1, 0)/32⌋, the keys are:
- leaves in [w0, p] (causal local window);
- wLOD1 summaries wholly before w0 whose 1,024-run is not wholly before w0
  (mid range: the older runs of the current 1,024 window);
- wLOD2 summaries wholly before w0 (far range: all older 1,024 windows).
So every past position is covered exactly once and no visible summary's span
reaches past its query (strict causality). With W ≥ n nothing is summarised
and the leaves see exactly full causal attention. `near_causal=True` also lets
a leaf see the wLOD1 summary of its own run (up to 31 leaves of the future).

One mask predicate (`visible`) serves both kernels: dense boolean masks for
SDPA (the reference, and CPU training) and FlexAttention block masks
(`torch.compile`d; forward on CPU, forward+backward on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from megacontext.nodes import BLOCK

TOP = BLOCK * BLOCK  # leaves per wLOD2 summary


@dataclass(frozen=True)
class MegaLayout:
    """Index tables for n leaves and their summaries: level, span start/end and anchor per sequence index."""

    n: int
    level: torch.Tensor  # [L] long
    start: torch.Tensor  # [L] long
    end: torch.Tensor  # [L] long (exclusive)
    anchor: torch.Tensor  # [L] long

    @property
    def length(self) -> int:
        return int(self.level.numel())

    @property
    def n1(self) -> int:
        return self.n // BLOCK

    @property
    def n2(self) -> int:
        return self.n // TOP


def layout(n: int, device: torch.device | str = "cpu") -> MegaLayout:
    if n < 1:
        raise ValueError("MegaAttention needs at least one leaf")
    leaves = torch.arange(n, device=device)
    s1 = torch.arange(n // BLOCK, device=device) * BLOCK
    s2 = torch.arange(n // TOP, device=device) * TOP
    start = torch.cat([leaves, s1, s2])
    end = torch.cat([leaves + 1, s1 + BLOCK, s2 + TOP])
    level = torch.cat([torch.zeros_like(leaves), torch.ones_like(s1), torch.full_like(s2, 2)])
    return MegaLayout(n, level, start, end, end - 1)


def visible(lay: MegaLayout, q: torch.Tensor, kv: torch.Tensor, window: int, near_causal: bool = False) -> torch.Tensor:
    """Whether query index q sees key index kv (broadcasting tensors of sequence indices)."""
    p = lay.anchor[q]
    w0 = (p - window + 1).clamp(min=0) // BLOCK * BLOCK
    lk, a, e = lay.level[kv], lay.start[kv], lay.end[kv]
    leaf = (lk == 0) & (a >= w0) & (a <= p)
    mid = (lk == 1) & (e <= w0) & ((a // TOP) * TOP + TOP > w0)
    far = (lk == 2) & (e <= w0)
    ok = leaf | mid | far
    if near_causal:
        ok = ok | ((lk == 1) & (lay.level[q] == 0) & (a // BLOCK == p // BLOCK))
    return ok


def dense_mask(lay: MegaLayout, window: int, near_causal: bool = False) -> torch.Tensor:
    """[L, L] bool, True = attend (the SDPA reference)."""
    idx = torch.arange(lay.length, device=lay.level.device)
    return visible(lay, idx[:, None], idx[None, :], window, near_causal)


def block_mask(lay: MegaLayout, window: int, near_causal: bool = False, block_size: int = 128,
               compile_mask: bool = False):
    """FlexAttention block mask; `compile_mask` compiles its construction (worth it for long sequences)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(lay, q_idx, kv_idx, window, near_causal)

    return create_block_mask(mask_mod, None, None, lay.length, lay.length, device=lay.level.device,
                             BLOCK_SIZE=block_size, _compile=compile_mask)


@lru_cache(maxsize=1)
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # every (shape, mask) pair compiles once; past dynamo's default limit of 8 it would silently fall back
    # to eager FlexAttention, which materialises the full score matrix
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def mega_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: MegaLayout, window: int, *,
                   kernel: str = "sdpa", near_causal: bool = False, mask=None) -> torch.Tensor:
    """Attention over the MegaAttention layout; q, k, v [B, H, L, d]. `mask`: a prebuilt mask for `kernel`."""
    if q.shape[-2] != lay.length:
        raise ValueError(f"q has {q.shape[-2]} positions, the layout {lay.length}")
    if kernel == "sdpa":
        mask = dense_mask(lay, window, near_causal) if mask is None else mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if kernel == "flex":
        mask = block_mask(lay, window, near_causal) if mask is None else mask
        return compiled_flex()(q, k, v, block_mask=mask)
    raise ValueError(f"unknown kernel {kernel!r}: sdpa or flex (flash-attn only with the gpu extra)")
