"""JT1 — train GistNet for substitutability (docs/architecture.md §2.3, docs/lifecycle.md §3).

For each training window the current policy builds the working context
(budget B_train); the frozen base reads it with gists computed live by GistNet
and is pulled towards its own predictions from the full window:
loss = KL(P_full ‖ P_WC) over the H horizon tokens. Gradients flow through
the frozen base into GistNet only; ΔNLL@H is logged. Cycle 1's policy is the
cold start; later cycles pass LensNet + allocator in as `policy`.
The objective is context distillation (Snell et al. 2022) with the full window as the teacher.
`gist_guard` checks the trained gists against the warm start's (and against leaving the spans out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from megacontext.evaluation.gate import cluster_mean_ci
from megacontext.model.base_model import BaseLM, horizon_logprobs, horizon_token_nll, target_nll, teacher_kl
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

    @torch.no_grad()
    def validate(self, windows: int) -> float:
        """Held-out NLL@H (nats/token) of the policy's WC read with the current gists, on `windows` unseen
        training windows (their own seed stream, `SeedOffset.JT1_HELDOUT`: neither JT1's nor the guard's).
        The loop's early stopping minimises it (docs/lifecycle.md §3.2)."""
        nll = tokens = 0.0
        for item in range(windows):
            window = self.unseen_window(SeedOffset.JT1_HELDOUT, item)
            wc = self.policy(window)
            nll += read_nll(self, window, wc.entries, self.gistnet)
            tokens += len(window.horizon)
        self.policy.drain(windows)  # focus telemetry of a validation is not training telemetry
        return nll / tokens

    def unseen_window(self, stream: SeedOffset, item: int) -> Window:
        t = self.cfg.train
        return sample_window(self.docs, history=t.history, horizon=t.horizon, align=span(self.cfg.wc.levels),
                             seed=self.cfg.seed + stream, step=0, item=item)


def read_nll(phase: JT1GistNet, window: Window, entries: list, gistnet: GistNet | None) -> float:
    """Summed NLL@H (nats) of the window's horizon read by the frozen base through `entries` (gists from `gistnet`)."""
    tokens = torch.as_tensor(window.tokens.astype(np.int64))
    h, n = len(window.horizon), window.history
    inputs = assemble_live(entries, tokens, phase.base.model.get_input_embeddings(), gistnet, horizon=h, cursor=n,
                           positions=PositionScheme.of(phase.cfg.wc))
    with gaussian_positions(phase.base.model, inputs.mu, inputs.sigma):
        return horizon_token_nll(phase.base.model, h, inputs_embeds=inputs.inputs_embeds,
                                 targets=tokens[None, n:]).sum().item()


@torch.no_grad()
def gist_guard(phase: JT1GistNet, warm: GistNet, *, windows: int) -> dict[str, Any]:
    """Do the trained gists read better than the warm start's? Measured on unseen training windows.

    For each of `windows` windows (their own seed stream, drawn like JT1's) the phase's policy builds
    the working context and the frozen base reads the horizon three ways: with the trained GistNet's
    gists, with the warm start's (`warm`: the previous cycle's GistNet, or at cycle 1 the mean-initialised
    one), and with every gisted span left out (the raw entries at their own positions, no gists). The
    trained gists are kept ("accepted") only if they lower NLL@H against the warm start's (mean
    difference < 0): JT1 must never leave a cycle with gists that read worse than what it started from.

    Returns {"accepted", "windows", "tokens", "unchanged" (the two GistNets read identically, e.g. early
    stopping kept the warm start), "trained_minus_warm", "trained_minus_left_out",
    "warm_minus_left_out", "nll": {"trained", "warm", "left_out"}}: differences in nats/token with 95 %
    cluster-bootstrap CIs over windows. Raises ValueError for windows < 1.
    """
    if windows < 1:
        raise ValueError(f"the gist guard needs at least 1 window; got {windows}")
    cfg = phase.cfg
    sums = np.zeros((windows, 3))  # trained, warm, left out
    counts = np.zeros(windows)
    for item in range(windows):
        window = phase.unseen_window(SeedOffset.JT1_GUARD, item)
        wc = phase.policy(window)
        raw = [e for e in wc.entries if e.level == 0]
        for column, (entries, gistnet) in enumerate([(wc.entries, phase.gistnet), (wc.entries, warm), (raw, None)]):
            sums[item, column] = read_nll(phase, window, entries, gistnet)
        counts[item] = len(window.horizon)
    phase.policy.drain(windows)  # focus telemetry of the guard is not training telemetry
    ci = {"bootstrap_samples": 1_000, "confidence": 0.95, "seed": cfg.seed}
    differences = {"trained_minus_warm": (0, 1), "trained_minus_left_out": (0, 2), "warm_minus_left_out": (1, 2)}
    out = {name: cluster_mean_ci(sums[:, a] - sums[:, b], counts, **ci) for name, (a, b) in differences.items()}
    total = counts.sum()
    return {"accepted": bool(out["trained_minus_warm"]["value"] < 0), "windows": windows, "tokens": int(total),
            "unchanged": bool(np.array_equal(sums[:, 0], sums[:, 1])), **out,
            "nll": {name: sums[:, i].sum() / total for i, name in enumerate(("trained", "warm", "left_out"))}}
