"""MegaAttention masks and kernels (docs/architecture.md §2.8): leaves attend locally, summaries stand in for the past.

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

One mask predicate (`visible`) serves every kernel: dense boolean masks for
SDPA (the reference, and CPU training of short WCs); FlexAttention (PyTorch; Dong et al. 2024) block masks
(`torch.compile`d; forward on CPU, forward+backward on GPU); and the packed
kernel, which attends per slice: each group of 128 leaves (with the summaries
anchored in it) gathers only the keys it can see — its window's leaves, the
wLOD1 runs of its 1,024 window, the wLOD2 summaries before it — and runs SDPA
on those, so memory and time are O(N·(W + 160 + N/1,024)), with a backward on
any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from megacontext.context.nodes import BLOCK

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


@dataclass(frozen=True)
class PackedPlan:
    """Slices of the layout: per group of `GROUP` leaves, its queries (the leaves and the summaries anchored
    in the group) and a superset of the keys any of them sees, padded; `mask` is `visible` on those pairs."""

    q_index: torch.Tensor  # [nb, Q] long (padding: 0)
    k_index: torch.Tensor  # [nb, K] long (padding: 0)
    mask: torch.Tensor  # [nb, Q, K] bool
    inverse: torch.Tensor  # [L] long: where each sequence index sits in the flattened valid queries


GROUP = 4 * BLOCK  # leaves per slice: bigger slices gather each key fewer times but attend to more keys


def packed_plan(lay: MegaLayout, window: int, near_causal: bool = False, group: int = GROUP) -> PackedPlan:
    if group % BLOCK or not BLOCK <= group <= TOP:
        raise ValueError(f"the packed kernel's group must be a multiple of {BLOCK} in [{BLOCK}, {TOP}], got {group}")
    n, device = lay.n, lay.level.device
    nb = (n + group - 1) // group
    b = torch.arange(nb, device=device)
    first, last = b * group, torch.clamp(b * group + group, max=n) - 1
    w0_lo = (first - window + 1).clamp(min=0) // BLOCK * BLOCK  # the window start of the group's first leaf
    w0_hi = (last - window + 1).clamp(min=0) // BLOCK * BLOCK  # ... and of its last
    # keys: leaves [w0_lo, last]; wLOD1 runs from the 1,024 window of w0_lo up to w0_hi (and up to the
    # group's own runs if near-causal); wLOD2 summaries before w0_hi
    leaf_len = last - w0_lo + 1
    r_lo = w0_lo // TOP * BLOCK
    r_hi = torch.maximum(w0_hi // BLOCK, last // BLOCK + 1) if near_causal else w0_hi // BLOCK
    r_len = (r_hi.clamp(max=lay.n1) - r_lo).clamp(min=0)
    t_len = w0_hi // TOP
    k_len = leaf_len + r_len + t_len
    j = torch.arange(int(k_len.max()), device=device)[None]
    in_leaf, in_mid = j < leaf_len[:, None], j < (leaf_len + r_len)[:, None]
    k_index = torch.where(in_leaf, w0_lo[:, None] + j,
                          torch.where(in_mid, n + r_lo[:, None] + j - leaf_len[:, None],
                                      n + lay.n1 + j - (leaf_len + r_len)[:, None]))
    k_valid = j < k_len[:, None]
    k_index = torch.where(k_valid, k_index, 0)
    # queries: the group's leaves, the wLOD1 summaries of its runs, the wLOD2 summary ending in it (if any)
    i = torch.arange(group, device=device)[None]
    leaves = torch.where(first[:, None] + i <= last[:, None], first[:, None] + i, -1)
    r = first[:, None] // BLOCK + torch.arange(group // BLOCK, device=device)[None]
    runs = torch.where(r < lay.n1, n + r, -1)
    t = (last + 1) // TOP - 1
    top = torch.where((t >= 0) & (t < lay.n2) & (t * TOP + TOP - 1 >= first), n + lay.n1 + t, -1)[:, None]
    q_index = torch.cat([leaves, runs, top], dim=1)
    q_valid = q_index >= 0
    q_index = q_index.clamp(min=0)
    mask = visible(lay, q_index[:, :, None], k_index[:, None, :], window, near_causal)
    mask = mask & q_valid[:, :, None] & k_valid[:, None, :]
    mask[:, :, 0] |= ~q_valid  # padding queries attend to one key (dropped), so no row is empty
    order = q_index.flatten()[q_valid.flatten()]
    positions = torch.arange(q_index.numel(), device=device)[q_valid.flatten()]
    inverse = torch.empty_like(order)
    inverse[order] = positions
    return PackedPlan(q_index, k_index, mask, inverse)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PackedPlan) -> torch.Tensor:
    """q, k, v [B, H, L, d] -> [B, H, L, d]: SDPA per slice on the gathered keys (differentiable)."""
    qg = q[:, :, plan.q_index]  # [B, H, nb, Q, d]
    kg, vg = k[:, :, plan.k_index], v[:, :, plan.k_index]  # [B, H, nb, K, d]
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=plan.mask)
    return out.flatten(2, 3)[:, :, plan.inverse]


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
    mask = build_mask(lay, window, kernel, near_causal) if mask is None else mask
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if kernel == "flex":
        return compiled_flex()(q, k, v, block_mask=mask)
    return packed_attention(q, k, v, mask)  # build_mask refused any other kernel


KERNELS = ("sdpa", "flex", "packed")


def build_mask(lay: MegaLayout, window: int, kernel: str, near_causal: bool = False):
    """The prebuilt mask `mega_attention(..., kernel=kernel, mask=...)` takes (built once, shared by layers)."""
    if kernel == "sdpa":
        return dense_mask(lay, window, near_causal)
    if kernel == "flex":
        return block_mask(lay, window, near_causal)
    if kernel == "packed":
        return packed_plan(lay, window, near_causal)
    raise ValueError(f"unknown kernel {kernel!r}: one of {', '.join(KERNELS)}")
