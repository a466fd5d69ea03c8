"""LensNet (docs/architecture.md §2.5): a small non-causal scorer of working-context entries, one score in [-1, 1] each.

Positive = expand (show more detail), negative = collapse. Entries are the base model's
`inputs_embeds` plus node features; "tail gists" (the latest LOD2 gist and the latest LOD1
gists) first read the whole WC, then every entry reads the enriched tail. Also: legality
masks, the JT2 loss and checkpoints. Choosing edits is the allocator's job, not this module's.
The loss's ranking term is RankNet's pairwise logistic loss (Burges et al. 2005).
With `wc_attention_queries` > 0 LensNet also sees the question: per entry, the attention the base
model's last tail tokens put on it when reading this working context (`attention_feature`), the
same signal as SnapKV's observation window (Li et al., 2024), here an input to a learned scorer.

Notation: B working contexts, N entries, T tail gists (+1 learned default), d base width,
w = d_lens, F = N_FEATURES entry features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megacontext.config import LensNetConfig
from megacontext.model.checkpoints import load_module, module_identity, save_module
from megacontext.context.nodes import BLOCK, Node, span
from megacontext.context.working_context import collapse_allowed

MAX_LEVEL = 4  # the highest gist level a config allows (WorkingContextConfig.levels <= 4)
N_FEATURES = 3
LISTWISE_SHARPNESS = 4.0  # listwise term: scores and targets in [-1, 1] become logits in [-4, 4]
LOG2_SCALE = 20.0  # log2 of distances/widths is divided by this: 2**20 tokens -> 1.0
ATTENTION_SCALE = 1e4  # attention feature: log1p(p * this) / log1p(this), p = mean attention probability


# --- inputs -------------------------------------------------------------------------------


def entry_features(entries: Sequence[Node], cursor: int) -> torch.Tensor:
    """[N, F]: log2 span width, log2(1 + cursor - end), start / cursor, each scaled to ~[0, 1]."""
    width = torch.tensor([math.log2(n.span) for n in entries], dtype=torch.float32) / LOG2_SCALE
    dist = torch.tensor([math.log2(1 + cursor - n.end) for n in entries], dtype=torch.float32) / LOG2_SCALE
    frac = torch.tensor([n.start / max(cursor, 1) for n in entries], dtype=torch.float32)
    return torch.stack([width, dist, frac], dim=-1).reshape(len(entries), N_FEATURES)


def attention_feature(p: torch.Tensor) -> torch.Tensor:
    """Mean attention probabilities p in [0, 1] (any shape) -> log1p(p · 1e4) / log1p(1e4) in [0, 1].

    A log scale: a uniform share of a 2,048-entry context (p ≈ 5e-4) maps to ≈ 0.19, an attention
    sink (p ≈ 0.5) to ≈ 0.93."""
    return torch.log1p(p.clamp(0, 1) * ATTENTION_SCALE) / math.log1p(ATTENTION_SCALE)


def entry_levels(entries: Sequence[Node]) -> torch.Tensor:
    return torch.tensor([n.level for n in entries], dtype=torch.long)  # [N]


def tail_nodes(cursor: int, n_lod1: int, top_level: int = 2) -> list[Node]:
    """The tail gists before `cursor`: the latest LOD2 gist (if any) then the `n_lod1` latest LOD1
    gists, newest first. Fewer when the history is short. Their vectors come from the tree, e.g.
    `assemble(tail_nodes(...), source, embedding).inputs_embeds[0]`."""
    nodes = [Node((cursor // span(2) - 1) * span(2), 2)] if top_level >= 2 and cursor >= span(2) else []
    last = cursor // span(1)
    return nodes + [Node(i * span(1), 1) for i in range(last - 1, max(last - n_lod1, 0) - 1, -1)]


@dataclass(frozen=True)
class LensInputs:
    """One batch for LensNet; `mask`/`tail_mask` are True on real (not padded) rows."""

    vectors: torch.Tensor  # [B, N, d] the WC's inputs_embeds
    features: torch.Tensor  # [B, N, F]
    levels: torch.Tensor  # [B, N] long
    mask: torch.Tensor  # [B, N] bool
    tail: torch.Tensor  # [B, T, d]
    tail_features: torch.Tensor  # [B, T, F]
    tail_levels: torch.Tensor  # [B, T] long
    tail_mask: torch.Tensor  # [B, T] bool
    attention: torch.Tensor  # [B, N] mean attention probability from the WC's last tail tokens (0: not measured)
    tail_attention: torch.Tensor  # [B, T] the same summed over each tail gist's span

    def to(self, device: torch.device | str) -> "LensInputs":
        return LensInputs(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def lens_inputs(
    entries: Sequence[Node], cursor: int, vectors: torch.Tensor, tail: Sequence[Node], tail_vectors: torch.Tensor,
    attention: torch.Tensor | None = None,
) -> LensInputs:
    """A batch of one WC: `vectors` [N, d] (or [1, N, d]) for `entries`, `tail_vectors` [T, d] for `tail`.

    `attention` [N]: each entry's mean attention probability from the WC's last tail tokens
    (`focus_policy.wc_attention`); a tail gist gets the sum over the entries inside its span. None: zeros.
    """
    d = vectors.shape[-1]
    attention = torch.zeros(len(entries)) if attention is None else torch.as_tensor(attention, dtype=torch.float32)
    if attention.shape != (len(entries),):
        raise ValueError(f"attention must have one value per entry ({len(entries)}), got shape {tuple(attention.shape)}")
    starts = torch.tensor([n.start for n in entries], dtype=torch.long)
    tail_attention = torch.stack([attention[(starts >= n.start) & (starts < n.end)].sum() for n in tail]) \
        if tail else torch.zeros(0)
    return LensInputs(
        vectors.reshape(1, len(entries), d), entry_features(entries, cursor)[None], entry_levels(entries)[None],
        torch.ones(1, len(entries), dtype=torch.bool),
        tail_vectors.reshape(1, len(tail), d), entry_features(tail, cursor)[None], entry_levels(tail)[None],
        torch.ones(1, len(tail), dtype=torch.bool), attention[None], tail_attention[None],
    )  # fmt: skip


def pad_batch(rows: Sequence[torch.Tensor], value: float | bool = 0) -> torch.Tensor:
    """Stack per-WC [n_i, ...] tensors (targets, legality masks, ...) into [B, max n_i, ...]."""
    return nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=float(value))


def collate(items: Sequence[LensInputs]) -> LensInputs:
    """Batch single-WC inputs of different lengths (padded rows have mask False)."""
    return LensInputs(**{f.name: pad_batch([getattr(x, f.name)[0] for x in items]) for f in fields(LensInputs)})


# --- legality -----------------------------------------------------------------------------


def legality_mask(entries: Sequence[Node], levels: int, cursor: int, protected_tail: int,
                  sink: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(can_expand [N], can_collapse [N]) bool. Tokens cannot expand. An entry can collapse only as
    part of a complete aligned run of its 32 siblings, below the top level, wholly before the
    protected tail and clear of the first `sink` tokens (the same rule as `WorkingContext.collapse`)."""
    can_expand = torch.tensor([n.level > 0 for n in entries], dtype=torch.bool)
    can_collapse = torch.zeros(len(entries), dtype=torch.bool)
    i = 0
    while i < len(entries):
        node = entries[i]
        group = entries[i : i + BLOCK]
        if (
            node.level < levels
            and node.start % span(node.level + 1) == 0  # cheap pre-check: a run starts at its parent's start
            and list(group) == node.siblings()
            and collapse_allowed(node.parent(), cursor, protected_tail, levels, sink)
        ):
            can_collapse[i : i + BLOCK] = True
            i += BLOCK
        else:
            i += 1
    return can_expand, can_collapse


def masked_scores(scores: torch.Tensor, can_expand: torch.Tensor, can_collapse: torch.Tensor) -> torch.Tensor:
    """Zero the illegal directions: an illegal positive (expand) or negative (collapse) score -> 0."""
    return scores.clamp(min=0) * can_expand + scores.clamp(max=0) * can_collapse


# --- the network --------------------------------------------------------------------------


class CrossBlock(nn.Module):
    """Pre-norm cross-attention (queries <- keys) + feed-forward, both residual."""

    def __init__(self, w: int, heads: int):
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_ff = nn.LayerNorm(w), nn.LayerNorm(w), nn.LayerNorm(w)
        self.attn = nn.MultiheadAttention(w, heads, dropout=0.0, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(w, 4 * w), nn.GELU(), nn.Linear(4 * w, w))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_pad: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(kv)
        h = q + self.attn(self.ln_q(q), kv, kv, key_padding_mask=kv_pad, need_weights=False)[0]
        return h + self.ff(self.ln_ff(h))


class LensNet(nn.Module):
    def __init__(self, cfg: LensNetConfig, d_model: int):
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        w = cfg.width
        self.ln_in = nn.LayerNorm(d_model)  # tokens and gists arrive at different scales
        self.in_proj = nn.Linear(d_model, w)
        self.feat_proj = nn.Linear(N_FEATURES, w)
        self.level = nn.Embedding(MAX_LEVEL + 1, w)
        nn.init.normal_(self.level.weight, std=0.02)
        self.default_tail = nn.Parameter(torch.randn(1, 1, w) * 0.02)  # always-present query: T = 0 works
        self.gather = CrossBlock(w, cfg.heads)  # tail <- [tail; entries]
        self.scatter = CrossBlock(w, cfg.heads)  # entries <- enriched tail
        self.head = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, cfg.mlp_hidden), nn.GELU(), nn.Linear(cfg.mlp_hidden, 1))
        nn.init.zeros_(self.head[-1].weight)  # untrained LensNet scores 0: no edits, cold-start rule
        nn.init.zeros_(self.head[-1].bias)
        # made last, so that the other weights of a seed are the same with and without it
        self.attention_proj = nn.Linear(1, w) if cfg.wc_attention_queries else None

    def embed(self, v: torch.Tensor, feats: torch.Tensor, levels: torch.Tensor,
              attention: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.in_proj.weight.dtype
        x = self.in_proj(self.ln_in(v.to(dtype))) + self.feat_proj(feats.to(dtype)) + self.level(levels)  # [B, *, w]
        if self.attention_proj is not None and attention is not None:
            x = x + self.attention_proj(attention_feature(attention.to(dtype))[..., None])
        return x

    def forward(self, x: LensInputs) -> torch.Tensor:
        """-> scores [B, N] in [-1, 1]; padded entries score exactly 0."""
        if x.vectors.shape[-1] != self.d_model:
            raise ValueError(f"LensNet expects entry vectors of width {self.d_model}, got {x.vectors.shape[-1]}")
        B = x.vectors.shape[0]
        e = self.embed(x.vectors, x.features, x.levels, x.attention)  # [B, N, w]
        t = self.embed(x.tail, x.tail_features, x.tail_levels, x.tail_attention)  # [B, T, w]
        t = torch.cat([self.default_tail.expand(B, -1, -1), t], dim=1)  # [B, T+1, w]
        t_valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=t.device), x.tail_mask], dim=1)  # [B, T+1]
        t = self.gather(t, torch.cat([t, e], dim=1), ~torch.cat([t_valid, x.mask], dim=1))  # [B, T+1, w]
        e = self.scatter(e, t, ~t_valid)  # [B, N, w]
        return torch.tanh(self.head(e)[..., 0]) * x.mask  # [B, N]


def build_lensnet(cfg: LensNetConfig, d_model: int, *, seed: int, head_std: float = 0.0) -> LensNet:
    """A fresh LensNet; same seed -> same weights. Its scoring head starts at zero (no edits) unless
    `head_std` > 0 draws it from N(0, head_std²): an untrained LensNet that still takes decisions, for
    exercising the runtime's editing path (its cost does not depend on the weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LensNet(cfg, d_model)
    if head_std > 0:
        weight = net.head[-1].weight
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=torch.Generator(device="cpu").manual_seed(seed), device="cpu") * head_std)
    return net


# --- JT2 loss -----------------------------------------------------------------------------


def lensnet_loss(
    scores: torch.Tensor,
    targets: torch.Tensor,
    target_mask: torch.Tensor,
    can_expand: torch.Tensor,
    can_collapse: torch.Tensor,
    cfg: LensNetConfig,
    *,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """JT2 loss over [B, N] scores (docs/architecture.md §2.5): regression + ranking + budget + legality
    (+ listwise).

    `target_mask` marks labelled entries (targets in [-1, 1]); `mask` marks real entries (None:
    all). Ranking: softplus(-(s_i - s_j)) over labelled pairs of one WC with t_i > t_j. Budget:
    ((P - N) / (P + N + eps))^2 per WC with P, N the positive/negative score mass. Legality:
    mean over real entries of relu(s) where expand is illegal plus relu(-s) where collapse is.
    Listwise (ListNet, Cao et al. 2007), weight `cfg.listwise_weight`: per WC, the cross-entropy of
    softmax(LISTWISE_SHARPNESS · s) against softmax(LISTWISE_SHARPNESS · t) over its labelled entries.
    """
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask
    labelled = target_mask & mask
    n_lab = labelled.sum().clamp_min(1)
    regression = ((scores - targets).pow(2) * labelled).sum() / n_lab

    # Ranking on the labelled entries only, gathered to the front: [B, M], M = most labels in a WC.
    m = int(labelled.sum(dim=1).max()) if labelled.numel() else 0
    order = labelled.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :m]
    s, t, ok = scores.gather(1, order), targets.gather(1, order), labelled.gather(1, order)
    pairs = (t[:, :, None] > t[:, None, :]) & ok[:, :, None] & ok[:, None, :]  # [B, M, M]: i ranks above j
    margin = s[:, :, None] - s[:, None, :]
    ranking = (F.softplus(-margin) * pairs).sum() / pairs.sum().clamp_min(1)

    live = scores * mask
    pos, neg = live.clamp(min=0).sum(dim=1), (-live).clamp(min=0).sum(dim=1)  # [B]
    budget = ((pos - neg) / (pos + neg + 1e-6)).pow(2).mean()

    illegal = scores.clamp(min=0) * ~can_expand + (-scores).clamp(min=0) * ~can_collapse
    legality = (illegal * mask).sum() / mask.sum().clamp_min(1)

    total = regression + cfg.ranking_weight * ranking + cfg.budget_weight * budget + cfg.legality_weight * legality
    parts = {"regression": regression, "ranking": ranking, "budget": budget, "legality": legality}
    if cfg.listwise_weight:
        neg = torch.finfo(scores.dtype).min
        want = torch.softmax((LISTWISE_SHARPNESS * targets).masked_fill(~labelled, neg), dim=1)  # [B, N]
        got = torch.log_softmax((LISTWISE_SHARPNESS * scores).masked_fill(~labelled, neg), dim=1)
        rows = labelled.any(dim=1)
        listwise = -(want * got.masked_fill(~labelled, 0.0)).sum(dim=1)[rows].mean() if rows.any() else scores.sum() * 0
        total = total + cfg.listwise_weight * listwise
        parts["listwise"] = listwise
    parts["total"] = total
    return total, {k: float(v.detach()) for k, v in parts.items()}


# --- checkpoints --------------------------------------------------------------------------

def lensnet_identity(net: LensNet) -> str:
    """Content hash of the weights and config."""
    return module_identity("lensnet", net)


def save_lensnet(folder: Path, net: LensNet) -> None:
    """Weights as safetensors (never pickles) + the config needed to rebuild the module."""
    save_module(folder, "lensnet", net, {"d_model": net.d_model})


def load_lensnet(folder: Path) -> LensNet:
    """Rebuild a saved LensNet; refuses weights whose hash is not the recorded identity."""
    return load_module(folder, "lensnet", lambda meta: LensNet(LensNetConfig(**meta["config"]), meta["d_model"]),
                       label="LensNet")
