"""JT2 — generate counterfactual labels on on-policy snapshots, then train LensNet on them (docs/lifecycle.md §3).

Labels are regenerated every cycle, after JT1 (the gists changed). Snapshot
windows are a pure function of (seed, snapshot index), so a resumed run and
every rank rebuild the same working contexts from the label table alone. The
per-entry target merges an entry's expand label (≥ 0) and the collapse label of
the sibling group it starts (≤ 0, spread over its 32 members). With teacher
masses (`train.teacher_windows`, `teacher.py`), the first windows of the same
stream are also dense snapshots: every legal entry of their on-policy WC is
labelled from the teacher's attention mass, and the counterfactual labels
become the smaller calibration set beside them.

Every snapshot's working context, LensNet inputs and targets are built when the
phase starts, by the policy as it is then (the warm start's focus, the one the
labels were generated on): the LensNet being trained never refocuses its own
training snapshots (a label's entry index would point at another entry), and a
resumed run rebuilds the same ones. With held-out teacher windows
(`SeedOffset.JT2_HELDOUT`), `validate` is the same loss on them, for early stopping.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch

from megacontext.model.base_model import BaseLM
from megacontext.config import Config
from megacontext.context.focus_policy import Policy, lens_inputs_for
from megacontext.model.gaussian_rope import install_gaussian_rope
from megacontext.model.gistnet import GistNet
from megacontext.context.working_context import PositionScheme
from megacontext.training.jt2_labels import candidates, label_snapshot, label_table, to_targets
from megacontext.training.teacher import debiased, position_prior, relevance_targets
from megacontext.model.lensnet import LensInputs, LensNet, collate, legality_mask, lensnet_loss, pad_batch, save_lensnet
from megacontext.context.nodes import BLOCK, span
from megacontext.progress import progress_bar
from megacontext.data.schemas import LABEL_SCHEMA, validate
from megacontext.data.shards import TokenizedDocument
from megacontext.data.windows import SeedOffset, Window, eligible, sample_window
from megacontext.lifecycle.lineage import repair_advice, verify_artifact

LABELS_FILE = "labels.parquet"
DENSE = "t"  # snapshot ids of teacher-labelled windows: t00000, ...; counterfactual ones are s00000, ...


def snapshot_window(cfg: Config, docs: list[TokenizedDocument], index: int,
                    stream: SeedOffset = SeedOffset.JT2_SNAPSHOTS) -> Window:
    """Window `index` of a JT2 stream (snapshots, or `SeedOffset.JT2_HELDOUT` for validation)."""
    t = cfg.train
    return sample_window(docs, history=t.history, horizon=t.horizon, align=span(cfg.wc.levels),
                         seed=cfg.seed + stream, step=index, item=0)


def generate_labels(cfg: Config, base: BaseLM, gistnet: GistNet, docs: list[TokenizedDocument], policy: Policy,
                    out: Path) -> dict:
    """Label `train.label_snapshots` snapshots; write the schema-checked table to `out/labels.parquet`."""
    install_gaussian_rope(base.model)
    docs = eligible(docs, cfg.train.history, cfg.train.horizon)
    snapshots = []
    start = time.perf_counter()
    with progress_bar("JT2 labels", total=cfg.train.label_snapshots, unit="snapshots") as advance:
        for index in range(cfg.train.label_snapshots):
            window = snapshot_window(cfg, docs, index)
            wc = policy(window)
            cands = candidates(wc, cfg.train.label_candidates, np.random.default_rng([cfg.seed, index]))
            rows = to_targets(label_snapshot(base, gistnet, window, wc, cands, positions=PositionScheme.of(cfg.wc)))
            snapshots.append((f"s{index:05d}", window, wc, rows))
            advance(1)
    table = label_table(snapshots)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.to_arrow(), out / LABELS_FILE, compression="zstd")
    seconds = time.perf_counter() - start
    focus = {f"focus_{k}": v for k, v in policy.drain().items()}  # means over the on-policy snapshots
    return {"snapshots": len(snapshots), "labels": table.height, "seconds": seconds,
            "labels_per_s": table.height / seconds, **focus}


def entry_targets(rows: pl.DataFrame, n_entries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [N], labelled [N]) for one snapshot from its label rows."""
    target = torch.zeros(n_entries)
    labelled = torch.zeros(n_entries, dtype=torch.bool)
    ordered = pl.concat([rows.filter(pl.col("action") == "collapse"), rows.filter(pl.col("action") == "expand")])
    for row in ordered.iter_rows(named=True):  # collapse rows first; a positive expand target overrides them
        i = row["entry_index"]
        if row["action"] == "collapse":
            target[i : i + BLOCK] = row["target"]
            labelled[i : i + BLOCK] = True
        elif row["target"] > 0 or not labelled[i]:
            target[i] = row["target"]
            labelled[i] = True
    return target, labelled


class JT2LensNet:
    name = "jt2_lensnet"

    def __init__(self, cfg: Config, base: BaseLM, gistnet: GistNet, lensnet: LensNet,
                 docs: list[TokenizedDocument], policy: Policy, labels: Path, teacher: Sequence[np.ndarray] = (),
                 heldout: Sequence[np.ndarray] = ()):
        """`teacher`: block masses of windows 0, 1, ... of the snapshot stream (`teacher_masses`);
        `heldout`: the same for windows 0, 1, ... of `SeedOffset.JT2_HELDOUT` (what `validate` scores).
        Builds every snapshot now, with `policy` as it is (module docstring)."""
        self.cfg, self.base, self.gistnet, self.lensnet = cfg, base, gistnet, lensnet
        self.docs = eligible(docs, cfg.train.history, cfg.train.horizon)
        self.policy = policy
        verify_artifact(labels, repair=repair_advice(labels))  # a sealed label table, unchanged since JT2 wrote it
        self.labels = validate(pl.read_parquet(labels / LABELS_FILE), LABEL_SCHEMA, where=str(labels / LABELS_FILE))
        self.teacher, self.heldout = list(teacher), list(heldout)
        if cfg.train.teacher_debias:  # each training window by the others' prior; held-out ones by all of theirs
            prior = position_prior(self.teacher)
            self.teacher = [debiased(m, position_prior(self.teacher, leave_out=i)) for i, m in enumerate(self.teacher)]
            self.heldout = [debiased(m, prior) for m in self.heldout]
        self.snapshot_ids = sorted(self.labels["snapshot_id"].unique().to_list()) + \
            [f"{DENSE}{i:05d}" for i in range(len(self.teacher))]
        base.model.requires_grad_(False)
        gistnet.requires_grad_(False)
        lensnet.requires_grad_(True)
        self._cache: dict[str, tuple] = {}
        self._heldout: list[tuple] = []
        with progress_bar("JT2 snapshots", total=len(self.snapshot_ids) + len(self.heldout), unit="snapshots") as advance:
            for sid in self.snapshot_ids:
                self._cache[sid] = self._build(snapshot_window(cfg, self.docs, int(sid[1:])),
                                               self.teacher[int(sid[1:])] if sid.startswith(DENSE) else sid)
                advance(1)
            for i, masses in enumerate(self.heldout):
                self._heldout.append(self._build(snapshot_window(cfg, self.docs, i, SeedOffset.JT2_HELDOUT), masses))
                advance(1)
        policy.drain()  # building snapshots is not training telemetry

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {f"lensnet.{name}": p for name, p in self.lensnet.named_parameters()}

    @torch.no_grad()
    def _build(self, window: Window, source: np.ndarray | str) -> tuple:
        """(LensNet inputs, targets, labelled, can_expand, can_collapse) of the policy's WC for `window`;
        `source`: the window's teacher block masses (dense) or its snapshot id in the label table."""
        wc = self.policy(window)
        tokens = torch.as_tensor(window.tokens.astype(np.int64))
        inputs = lens_inputs_for(wc, tokens, self.base.model.get_input_embeddings(), self.gistnet,
                                 self.cfg.lensnet.tail_lod1, model=self.base.model,
                                 queries=self.lensnet.cfg.wc_attention_queries, positions=PositionScheme.of(self.cfg.wc))
        if isinstance(source, str):
            target, labelled = entry_targets(self.labels.filter(pl.col("snapshot_id") == source), len(wc))
        else:
            target, labelled = relevance_targets(wc.entries, wc.cursor, wc.protected_tail, wc.w_max, source, wc.sink)
        return (inputs, target, labelled, *legality_mask(wc.entries, wc.levels, wc.cursor, wc.protected_tail, wc.sink))

    def _snapshot(self, sid: str) -> tuple:
        """LensNet inputs, targets and legality of one snapshot (built when the phase started)."""
        return self._cache[sid]

    def _loss(self, parts: list[tuple]) -> tuple[torch.Tensor, dict[str, float], LensInputs]:
        inputs = collate([p[0] for p in parts])
        scores = self.lensnet(inputs)  # [B, N]
        total, terms = lensnet_loss(scores, pad_batch([p[1] for p in parts]), pad_batch([p[2] for p in parts], False),
                                    pad_batch([p[3] for p in parts], False), pad_batch([p[4] for p in parts], False),
                                    self.cfg.lensnet, mask=inputs.mask)
        return total, terms, inputs

    @torch.no_grad()
    def validate(self, windows: int) -> float:
        """The JT2 loss (`lensnet_loss`, dense targets) on the first `windows` held-out teacher windows: the
        loop's early stopping minimises it (docs/lifecycle.md §3.2). ValueError without held-out masses."""
        if len(self._heldout) < windows:
            raise ValueError(f"JT2 validation needs {windows} held-out teacher windows, has {len(self._heldout)}")
        return sum(self._loss([part])[0].item() for part in self._heldout[:windows]) / windows

    def make_batch(self, step: int, items: list[int]) -> list[str]:
        return [self.snapshot_ids[int(np.random.default_rng([self.cfg.seed, step, item]).integers(len(self.snapshot_ids)))]
                for item in items]

    def loss(self, batch: list[str], global_batch: int) -> tuple[torch.Tensor, dict[str, float]]:
        total, terms, inputs = self._loss([self._snapshot(sid) for sid in batch])
        n = float(len(batch))
        metrics = {k: v * n for k, v in terms.items() if k != "total"}  # sums; the loop logs means
        metrics.update({"windows": n, "tokens": float(inputs.mask.sum())})
        return total * n / global_batch, metrics

    def export(self, folder: Path) -> None:
        save_lensnet(folder, self.lensnet)
