"""JT1 — train GistNet for substitutability (docs/architecture.md §2.3, docs/lifecycle.md §3).

For each training window the current policy builds the working context
(budget B_train); the frozen base reads it with gists computed live by GistNet
and is pulled towards its own predictions from the full window:
loss = KL(P_full ‖ P_WC) over the H horizon tokens. Gradients flow through
the frozen base into GistNet only; ΔNLL@H is logged. Cycle 1's policy is the
cold start; later cycles pass LensNet + allocator in as `policy`.
The objective is context distillation (Snell et al. 2022) with the full window as the teacher.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np
import torch

from megacontext.model.base_model import BaseLM, horizon_logprobs, target_nll, teacher_kl
from megacontext.config import Config
from megacontext.context.focus_policy import Policy, cold_start_policy
from megacontext.model.gaussian_rope import gaussian_positions, install_gaussian_rope
from megacontext.model.gistnet import GistNet, save_gistnet
from megacontext.context.nodes import BLOCK, span
from megacontext.data.shards import TokenizedDocument
from megacontext.data.windows import SeedOffset, Window, eligible, sample_window
from megacontext.context.working_context import ABSOLUTE, PositionScheme, WorkingContext, assemble_live


def wc_logprobs(base: BaseLM, gistnet: GistNet, wc: WorkingContext, window: Window,
                positions: PositionScheme = ABSOLUTE) -> torch.Tensor:
    """log P of the horizon read through the working context, gists computed live (differentiable) -> [1, H, V]."""
    h = len(window.horizon)
    tokens = torch.as_tensor(window.tokens.astype(np.int64))
    inputs = assemble_live(wc.entries, tokens, base.model.get_input_embeddings(), gistnet, horizon=h,
                           positions=positions)
    with gaussian_positions(base.model, inputs.mu, inputs.sigma):
        return horizon_logprobs(base, h, inputs_embeds=inputs.inputs_embeds)


class JT1GistNet:
    name = "jt1_gistnet"

    def __init__(self, cfg: Config, base: BaseLM, gistnet: GistNet, docs: list[TokenizedDocument],
                 policy: Policy | None = None):
        self.cfg, self.base, self.gistnet = cfg, base, gistnet
        self.docs = eligible(docs, cfg.train.history, cfg.train.horizon)
        self.policy = policy or cold_start_policy(cfg)
        install_gaussian_rope(base.model)
        base.model.requires_grad_(False)
        gistnet.requires_grad_(True)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {f"gistnet.{name}": p for name, p in self.gistnet.named_parameters()}

    def make_batch(self, step: int, items: list[int]) -> list[Window]:
        t = self.cfg.train
        return [sample_window(self.docs, history=t.history, horizon=t.horizon, align=span(self.cfg.wc.levels),
                              seed=self.cfg.seed + SeedOffset.JT1_WINDOWS, step=step, item=item) for item in items]

    def loss(self, batch: list[Window], global_batch: int) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros(())
        kl_sum = delta_sum = tokens = 0.0
        for window in batch:
            ids = torch.as_tensor(window.tokens.astype(np.int64))[None]
            targets = ids[:, window.history :]  # [1, H]
            with torch.no_grad():
                full = horizon_logprobs(self.base, len(window.horizon), input_ids=ids)  # [1, H, V]
            wc = self.policy(window)
            student = wc_logprobs(self.base, self.gistnet, wc, window, PositionScheme.of(self.cfg.wc))
            kl = teacher_kl(student, full)  # KL(P_full ‖ P_WC)
            total = total + kl / global_batch
            kl_sum += kl.item()
            delta_sum += target_nll(student.detach(), targets).item() - target_nll(full, targets).item()
            tokens += ids.shape[1] + len(wc) + len(window.horizon)
        metrics = {"kl": kl_sum, "delta_nll": delta_sum, "windows": float(len(batch)), "tokens": tokens,
                   "blocks": sum(len(w.tokens) for w in batch) / BLOCK}
        return total, metrics | self.policy.drain(len(batch))

    def export(self, folder: Path) -> None:
        save_gistnet(folder, self.gistnet)
