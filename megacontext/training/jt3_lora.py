"""JT3 — LoRA adapters (Hu et al. 2021) on the frozen base so it reads gists well (docs/lifecycle.md §3).

Adapters (peft) go on the input embedding and the q/k/v/o projections of the
first and last decoder blocks, by config. Loss: NLL@H of the horizon read
through the discrete working context, plus a weak substitutability keep-alive
KL(P_full ‖ P_WC) against the plain base on the full window. GistNet is frozen
and reads the plain embedding, exactly as the trees were built. With `mega.attention`
the WC is read through MegaAttention, and with `mega.prediction` the MegaPrediction
gist losses are added (LOD agreement and per-level gradient norms are logged);
windows then carry the next 1,024 tokens for the LOD2 target, which trains when
the WC holds a wLOD2 node (≥ 1,024 entries: train.budget 1,056+).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from megacontext.config import Config
from megacontext.context.focus_policy import Policy, cold_start_policy
from megacontext.context.nodes import BLOCK, span
from megacontext.context.working_context import PositionScheme, WorkingContext, assemble_live
from megacontext.data.shards import TokenizedDocument
from megacontext.data.windows import SeedOffset, Window, eligible, sample_window
from megacontext.evaluation.gate import cluster_mean_ci
from megacontext.mega.attention import TOP
from megacontext.mega.model import install_mega_attention
from megacontext.mega.prediction import Alphas, PredictionOutput, level_grad_norms, mega_prediction_loss
from megacontext.model.base_model import (
    BaseLM,
    horizon_logprobs,
    target_nll,
    teacher_kl,
    token_nll,
)
from megacontext.model.gaussian_rope import gaussian_positions, install_gaussian_rope
from megacontext.model.gistnet import GistNet
from megacontext.model.lora import attach_lora


class JT3LoRA:
    name = "jt3_lora"

    def __init__(self, cfg: Config, base: BaseLM, gistnet: GistNet, docs: list[TokenizedDocument],
                 policy: Policy | None = None, peft_model: PeftModel | None = None):
        self.cfg, self.base, self.gistnet = cfg, base, gistnet
        # MegaPrediction's LOD2 target is the gist of the next 1,024 tokens from the horizon start
        self.lookahead = TOP if cfg.mega.prediction else 0
        if cfg.mega.prediction and cfg.train.budget < TOP:
            warnings.warn(f"train.budget {cfg.train.budget} < {TOP}: the WC has no wLOD2 node, so MegaPrediction "
                          f"trains L_tok + α1·L_lod1 only (raise train.budget to {TOP + BLOCK}+ for L_lod2)")
        self.docs = eligible(docs, cfg.train.history, cfg.train.horizon, self.lookahead)
        self.policy = policy or cold_start_policy(cfg)
        install_gaussian_rope(base.model)
        base.model.requires_grad_(False)
        gistnet.requires_grad_(False)
        self.peft = peft_model or attach_lora(base, cfg.train.lora, seed=cfg.seed)
        self.plain_embedding = self.peft.get_input_embeddings()
        self.plain_embedding = getattr(self.plain_embedding, "base_layer", self.plain_embedding)
        self.mega = cfg.mega
        self.alphas = Alphas(cfg.mega.alpha1, cfg.mega.alpha2)
        self._progress = 0.0
        if self.mega.attention:  # the marked attention modules read the WC through MegaAttention
            install_mega_attention(base.model, cfg.mega.layers)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.peft.named_parameters() if "lora_" in name}

    def make_batch(self, step: int, items: list[int]) -> list[Window]:
        t = self.cfg.train
        self._progress = step / max(t.jt3.steps - 1, 1)  # for the MegaPrediction α schedules
        return [sample_window(self.docs, history=t.history, horizon=t.horizon, align=span(self.cfg.wc.levels),
                              seed=self.cfg.seed + SeedOffset.JT3_WINDOWS, step=step, item=item, lookahead=self.lookahead)
                for item in items]

    def loss(self, batch: list[Window], global_batch: int) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros(())
        nll_sum = kl_sum = delta_sum = tokens = 0.0
        mega: dict[str, float] = {}
        weight = self.cfg.train.lora.keepalive_weight
        for i, window in enumerate(batch):
            ids = torch.as_tensor(window.tokens.astype(np.int64))
            h = len(window.horizon)
            targets = ids[None, window.history :]
            with torch.no_grad(), self.peft.disable_adapter():
                full = horizon_logprobs(self.base, h, input_ids=ids[None])  # the plain base, full window
            wc = self.policy(window)
            student, gist_terms, out = self.read(window, wc, ids)
            if out is not None:
                for key in ("lod1_agreement", "lod2_agreement", "alpha1", "alpha2"):
                    if key in out.metrics:
                        mega[key] = mega.get(key, 0.0) + out.metrics[key]
                if self.mega.prediction and i == 0:  # per-level gradient norms on one window per step
                    norms = level_grad_norms(out.terms, list(self.trainable().values()))
                    mega.update({k: v * len(batch) for k, v in norms.items()})  # logged as means per window
            nll = target_nll(student, targets)
            kl = teacher_kl(student, full)
            total = total + (nll + weight * kl + gist_terms) / global_batch
            nll_sum += nll.item()
            kl_sum += kl.item()
            delta_sum += nll.item() - target_nll(full, targets).item()
            tokens += len(ids) + len(wc) + h
        metrics = {"nll": nll_sum, "kl": kl_sum, "delta_nll": delta_sum, "windows": float(len(batch)),
                   "tokens": tokens, "blocks": sum(len(w.tokens) for w in batch) / BLOCK, **mega}
        return total, metrics | self.policy.drain(len(batch))

    def read(self, window: Window, wc: WorkingContext, ids: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, PredictionOutput | None]:
        """The horizon's log-probabilities [1, H, V] read through `wc` (with the adapters as they are set now).

        Tokens read the (adapted) embedding; gists come from the frozen GistNet over the plain one.
        Returns (log-probs, MegaPrediction's gist loss terms (0 without it), its full output or None).
        """
        h = len(window.horizon)
        inputs = assemble_live(wc.entries, ids, self.peft.get_input_embeddings(), self.gistnet, horizon=h,
                               gist_embedding=self.plain_embedding, positions=PositionScheme.of(self.cfg.wc))
        if not self.mega.attention:
            with gaussian_positions(self.base.model, inputs.mu, inputs.sigma):
                return horizon_logprobs(self.base, h, inputs_embeds=inputs.inputs_embeds), torch.zeros(()), None
        out = mega_prediction_loss(self.base, self.gistnet, inputs, ids[window.history :], self.mega.window,
                                   alphas=self.alphas, progress=self._progress, kernel=self.mega.kernel,
                                   lod2_future=None if window.future is None else
                                   torch.as_tensor(window.future.astype(np.int64)),
                                   gist_embedding=self.plain_embedding, predict=self.mega.prediction,
                                   unfreeze_targets=self.mega.unfreeze_targets)
        return out.logprobs[None], out.loss - out.terms["tok"], out

    def export(self, folder: Path) -> None:
        self.peft.save_pretrained(folder)  # adapter_model.safetensors + adapter_config.json


@torch.no_grad()
def plain_reading_guard(phase: JT3LoRA, *, windows: int, tolerance: float) -> dict[str, Any]:
    """Measure what the trained adapters do on unseen training windows; decide whether to keep them.

    For each of `windows` windows (their own seed stream, drawn like JT3's: train.history of history,
    train.horizon scored) the horizon's per-token NLL is read four ways: the working context of the
    phase's focus policy and the recency window (the last train.budget history tokens, the same budget),
    each with the adapters on and off. The adapters are kept ("accepted") only if they lower the working
    context's NLL@H (mean difference < 0) and raise the recency window's by at most `tolerance`
    nats/token: adapters that make the frozen base read plain text worse are a regression the
    evaluation's recency + LoRA row would show (docs/lifecycle.md §3).

    Returns {"accepted", "windows", "tokens", "wc_delta", "recency_delta", "wc_nll", "recency_nll", ...}:
    deltas are adapted − plain (nats/token) with 95 % cluster-bootstrap CIs over windows.
    Raises ValueError for windows < 1.
    """
    if windows < 1:
        raise ValueError(f"the plain-reading guard needs at least 1 window; got {windows}")
    t = phase.cfg.train
    sums = np.zeros((windows, 4))  # wc adapted, wc plain, recency adapted, recency plain
    counts = np.zeros(windows)
    for item in range(windows):
        window = sample_window(phase.docs, history=t.history, horizon=t.horizon, align=span(phase.cfg.wc.levels),
                               seed=phase.cfg.seed + SeedOffset.JT3_GUARD, step=0, item=item, lookahead=phase.lookahead)
        ids = torch.as_tensor(window.tokens.astype(np.int64))
        h = len(window.horizon)
        targets = ids[window.history :]
        recent = ids[None, max(window.history - t.budget, 0) :]
        wc = phase.policy(window)
        row = []
        for adapted in (True, False):
            with nullcontext() if adapted else phase.peft.disable_adapter():
                row.append(-phase.read(window, wc, ids)[0][0].gather(-1, targets[:, None]).sum().item())
                row.append(token_nll(horizon_logprobs(phase.base, h, input_ids=recent)[0], targets).sum().item())
        sums[item] = [row[0], row[2], row[1], row[3]]
        counts[item] = h
    phase.policy.drain(windows)  # focus telemetry of the guard is not training telemetry
    ci = {"bootstrap_samples": 1_000, "confidence": 0.95, "seed": phase.cfg.seed}
    wc_delta = cluster_mean_ci(sums[:, 0] - sums[:, 1], counts, **ci)
    recency_delta = cluster_mean_ci(sums[:, 2] - sums[:, 3], counts, **ci)
    accepted = wc_delta["value"] < 0 and recency_delta["value"] <= tolerance
    total = counts.sum()
    return {"accepted": bool(accepted), "windows": windows, "tokens": int(total), "tolerance": tolerance,
            "wc_delta": wc_delta, "recency_delta": recency_delta,
            "wc_nll": {"adapted": sums[:, 0].sum() / total, "plain": sums[:, 1].sum() / total},
            "recency_nll": {"adapted": sums[:, 2].sum() / total, "plain": sums[:, 3].sum() / total}}
