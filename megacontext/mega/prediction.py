"""MegaPrediction (docs/architecture.md §2.9): the frozen base also predicts the gists of what comes next.

On the MegaAttention layout `[leaves | wLOD1 | wLOD2]` of a working context
followed by its teacher-forced horizon, the shared (tied) LM head reads out:
- at leaves: next-token logits (L_tok, the horizon NLL);
- at the latest wLOD1 node before each 32-token block of the horizon: a
  predicted gist of that block, ĝ = softmax(lm_head(h)) @ E (L_lod1);
- at the latest wLOD2 node before the horizon: a predicted gist of the next
  1,024 tokens from the horizon start (L_lod2, when those tokens are given:
  the horizon is their first H).
Targets are GistNet's gists of the true tokens (two-stage for LOD2), under
no_grad unless `unfreeze_targets`. Gist losses are cosine distances; the
weights follow linear schedules α1 0.02→0.05, α2 0.01→0.03 (α1 > α2).
LOD agreement = mean cos(ĝ, g) per level. Readout nodes are strictly causal:
a summary attends like its last child, which precedes the block it predicts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megacontext.model.base_model import BaseLM
from megacontext.mega.attention import TOP, MegaLayout
from megacontext.mega.model import mega_inputs
from megacontext.context.nodes import BLOCK
from megacontext.context.working_context import WCInputs


@dataclass(frozen=True)
class Alphas:
    """Linear schedules of the gist-loss weights over training progress in [0, 1]."""

    lod1: tuple[float, float] = (0.02, 0.05)
    lod2: tuple[float, float] = (0.01, 0.03)

    def __post_init__(self) -> None:
        if not all(a1 > a2 >= 0 for a1, a2 in zip(self.lod1, self.lod2)):
            raise ValueError(f"MegaPrediction needs α1 > α2 ≥ 0 at both ends, got {self.lod1} and {self.lod2}")

    def at(self, progress: float) -> tuple[float, float]:
        t = min(max(progress, 0.0), 1.0)
        return tuple(a + t * (b - a) for a, b in (self.lod1, self.lod2))  # type: ignore[return-value]


def predicted_gist(hidden: torch.Tensor, lm_head: nn.Module, embedding_weight: torch.Tensor) -> torch.Tensor:
    """ĝ = softmax(lm_head(h)) @ E: the head's distribution projected back into embedding space. [..., d]."""
    return torch.softmax(lm_head(hidden).float(), dim=-1) @ embedding_weight.float()


def lod1_readouts(lay: MegaLayout, first: int, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each whole 32-token block of the horizon [first, first + horizon): (its first leaf index, the
    sequence index of the latest wLOD1 node wholly before it — the summary of the last complete aligned
    32-leaf run ending at or before the block's start)."""
    starts = first + BLOCK * torch.arange(horizon // BLOCK)
    runs = starts // BLOCK - 1
    keep = runs >= 0
    return starts[keep], lay.n + runs[keep]


def lod2_readout(lay: MegaLayout, first: int) -> int | None:
    """Sequence index of the latest wLOD2 node wholly before `first`, if any."""
    r = first // TOP - 1
    return lay.n + lay.n1 + r if r >= 0 else None


def tied_weight(base: BaseLM) -> torch.Tensor:
    """The tied embedding matrix E (under a LoRA-wrapped embedding, its base layer's)."""
    embedding = base.model.get_input_embeddings()
    return getattr(embedding, "base_layer", embedding).weight


def mega_hidden(base: BaseLM, gistnet: nn.Module, inputs: WCInputs, window: int,
                kernel: str) -> tuple[MegaLayout, torch.Tensor]:
    """(layout, final normed hidden states [L, d]) of the WC's MegaAttention sequence."""
    with mega_inputs(base, gistnet, inputs, window, kernel) as (lay, seq):
        return lay, base.model.get_decoder()(inputs_embeds=seq, use_cache=False).last_hidden_state[0]


@dataclass
class PredictionOutput:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]  # tok, lod1, lod2 (each a scalar tensor in the graph)
    metrics: dict[str, float]
    predictions: dict[str, torch.Tensor]  # lod1 [R, d], lod2 [d]: ĝ
    targets: dict[str, torch.Tensor]  # lod1 [R, d], lod2 [d]: g
    logprobs: torch.Tensor  # [H, V] log P of the horizon tokens' positions (for KL terms)


def mega_prediction_loss(base: BaseLM, gistnet: nn.Module, inputs: WCInputs, horizon_ids: torch.Tensor, window: int,
                         *, alphas: Alphas = Alphas(), progress: float = 0.0, lod2_future: torch.Tensor | None = None,
                         gist_embedding: nn.Module | None = None, unfreeze_targets: bool = False,
                         kernel: str = "sdpa", predict: bool = True) -> PredictionOutput:
    """L_tok + α1·L_lod1 + α2·L_lod2 on a WC whose last H leaves are the teacher-forced `horizon_ids` [H].

    `inputs` come from `assemble(..., horizon=...)` (the horizon appended); `lod2_future` [1024] are the
    true next 1,024 tokens from the horizon start (so they begin with `horizon_ids`), when known; L_lod2
    needs them and a wLOD2 node wholly before the horizon (≥ 1,024 leaves before it). `gist_embedding`:
    what GistNet reads (the plain base embedding when LoRA adapts the model's). `install_mega_attention(base.model)` first.
    `predict=False`: MegaAttention only (L_tok, no gist readouts).
    """
    gist_embedding = gist_embedding or base.model.get_input_embeddings()
    lm_head, weight = base.model.get_output_embeddings(), tied_weight(base)
    lay, hidden = mega_hidden(base, gistnet, inputs, window, kernel)
    n, h = lay.n, len(horizon_ids)
    first = n - h
    logprobs = F.log_softmax(lm_head(hidden[first - 1 : n - 1]).float(), dim=-1)  # [H, V]
    nll = F.nll_loss(logprobs, horizon_ids)
    terms = {"tok": nll}
    metrics: dict[str, float] = {"nll": nll.item()}
    a1, a2 = alphas.at(progress)
    loss = nll
    starts, nodes = lod1_readouts(lay, first, h)
    if not predict:
        starts, nodes, lod2_future = starts[:0], nodes[:0], None
    with torch.set_grad_enabled(unfreeze_targets and torch.is_grad_enabled()):
        tokens = horizon_ids[(starts[:, None] - first + torch.arange(BLOCK))]  # [R, 32] each block's true tokens
        target1 = gistnet(gist_embedding(tokens).float(), 1) if len(starts) else None
        target2 = None
        if lod2_future is not None and lod2_readout(lay, first) is not None:
            if lod2_future.shape != (TOP,):
                raise ValueError(f"lod2_future must hold the next {TOP} tokens, got shape {tuple(lod2_future.shape)}")
            k = min(h, TOP)
            if not torch.equal(lod2_future[:k], horizon_ids[:k]):
                raise ValueError("lod2_future must start at the horizon: its first tokens differ from horizon_ids")
            lod1 = gistnet(gist_embedding(lod2_future.reshape(BLOCK, BLOCK)).float(), 1)  # two-stage, as the tree
            target2 = gistnet(lod1[None], 2)[0]
    predictions, targets = {}, {}
    if target1 is not None:
        predictions["lod1"], targets["lod1"] = predicted_gist(hidden[nodes], lm_head, weight), target1
        cos1 = F.cosine_similarity(predictions["lod1"], target1, dim=-1)
        terms["lod1"] = (1 - cos1).mean()
        loss = loss + a1 * terms["lod1"]
        metrics.update(lod1_agreement=cos1.mean().item(), lod1_blocks=float(len(starts)))
    if target2 is not None:
        predictions["lod2"], targets["lod2"] = predicted_gist(hidden[lod2_readout(lay, first)], lm_head, weight), target2
        cos2 = F.cosine_similarity(predictions["lod2"], target2, dim=0)
        terms["lod2"] = 1 - cos2
        loss = loss + a2 * terms["lod2"]
        metrics["lod2_agreement"] = cos2.item()
    metrics.update(alpha1=a1, alpha2=a2, loss=loss.item())
    return PredictionOutput(loss, terms, metrics, predictions, targets, logprobs)


@torch.no_grad()
def next_block_prediction(base: BaseLM, gistnet: nn.Module, inputs: WCInputs, window: int, *,
                          kernel: str = "sdpa") -> torch.Tensor | None:
    """ĝ [d] of the 32 tokens after a WC's last leaf, read out at its latest wLOD1 node — the readout
    `mega_prediction_loss` trains (strictly causal, so the block itself is not needed). None without a
    complete 32-leaf run. `install_mega_attention(base.model)` first."""
    n = inputs.inputs_embeds.shape[1]
    if n < BLOCK:
        return None
    lay, hidden = mega_hidden(base, gistnet, inputs, window, kernel)
    _, nodes = lod1_readouts(lay, n, BLOCK)
    return predicted_gist(hidden[nodes[0]], base.model.get_output_embeddings(), tied_weight(base))


def level_grad_norms(terms: dict[str, torch.Tensor], params: list[torch.nn.Parameter]) -> dict[str, float]:
    """‖∂term/∂params‖ per loss term (per level), for telemetry; the graph is kept for the real backward."""
    norms = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        norms[f"grad_norm_{name}"] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)
                                                      or torch.zeros(())))
    return norms
