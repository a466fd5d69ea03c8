"""JT2 labels — counterfactual ΔNLL@H of expand/collapse actions on on-policy snapshots (docs/lifecycle.md §3).

A snapshot is the policy's working context for a training window. Each
candidate action (expand one gist; collapse one complete aligned group of 32
siblings outside the protected tail) is scored by re-reading the horizon after
the edited WC. An edit at entry i leaves entries [0, i) unchanged, so their
K/V are computed once per snapshot and every candidate only runs its edited
suffix (`prefix reuse`); `naive=True` recomputes whole WCs for comparison.

Utility = NLL gain per budget unit: expand u = (NLL_before − NLL_after)/31,
collapse u = (NLL_before − NLL_after)/31 as well (negative: collapsing costs
NLL but frees 31 positions). The exchange rate ū is the snapshot's median
expand utility (what a position is worth here). Targets in [−1, 1]:
expand → max(0, tanh((u − ū)/s)); collapse → −max(0, tanh((ū + u)/s)): −u is the NLL a
collapse costs per freed position, so collapse when that is less than what a position buys
(ū). A collapse that lowers NLL (u > 0) is the strongest collapse of all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from transformers import DynamicCache

from megacontext.model.base_model import BaseLM, has_sliding_window_layers, token_nll
from megacontext.model.gaussian_rope import gaussian_positions
from megacontext.model.gistnet import GistNet
from megacontext.context.nodes import BLOCK, Node
from megacontext.data.schemas import LABEL_SCHEMA, validate
from megacontext.data.windows import Window
from megacontext.context.working_context import ABSOLUTE, PositionScheme, WCInputs, WorkingContext, assemble_live

UTILITY_SCALE = 0.002  # s: nats per position; |u - ū| of this size maps to tanh(1) ≈ 0.76


@dataclass(frozen=True)
class Candidate:
    index: int  # first entry the edit touches
    action: str  # "expand" | "collapse"
    node: Node  # the entry expanded, or the first of the collapsed siblings
    edited: list[Node]  # what replaces the touched entries


def candidates(wc: WorkingContext, limit: int, rng: np.random.Generator) -> list[Candidate]:
    """Every legal expand and collapse of the snapshot (a seeded subset of at most `limit`)."""
    found = []
    for i, node in enumerate(wc.entries):
        if node.level > 0:
            found.append(Candidate(i, "expand", node, node.children()))
        if (node.level < wc.levels and node.start == node.parent().start and wc.may_collapse_into(node.parent())
                and wc.entries[i : i + BLOCK] == node.siblings()):
            found.append(Candidate(i, "collapse", node, [node.parent()]))
    if len(found) > limit:
        keep = np.sort(rng.choice(len(found), size=limit, replace=False))
        found = [found[k] for k in keep]
    return found


def _forward(base: BaseLM, inputs: WCInputs, cache: DynamicCache | None = None, keep: int = 1):
    with gaussian_positions(base.model, inputs.mu, inputs.sigma):
        return base.model(inputs_embeds=inputs.inputs_embeds, past_key_values=cache, use_cache=cache is not None,
                          logits_to_keep=keep)


def _horizon_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean NLL of `targets` [H] from the logits of the positions just before them [1, H, V]."""
    return token_nll(logits[0], targets).mean().item()


@torch.no_grad()
def label_snapshot(base: BaseLM, gistnet: GistNet, window: Window, wc: WorkingContext, cands: list[Candidate],
                   *, naive: bool = False, positions: PositionScheme = ABSOLUTE) -> list[dict]:
    """ΔNLL@H of each candidate against the unedited snapshot (entries placed by `positions`)."""
    embedding = base.model.get_input_embeddings()
    tokens = torch.as_tensor(window.tokens.astype(np.int64))
    horizon = len(window.horizon)
    naive = naive or has_sliding_window_layers(base.model)  # a sliding-window cache holds no reusable prefix
    targets = tokens[window.history :]

    def score(entries: list[Node], start: int, cache: DynamicCache | None) -> float:
        first = positions.after(entries[:start])  # an edit shifts compressed positions after it, not before
        suffix = assemble_live(entries[start:], tokens, embedding, gistnet, horizon=horizon, cursor=window.history,
                               positions=positions, first=first)
        # the last H+1 positions predict the horizon: [last entry, horizon tokens except the final one]
        return _horizon_nll(_forward(base, suffix, cache, keep=horizon + 1).logits[:, :-1], targets)

    def reuse(upto: int) -> DynamicCache:  # K/V of entries [0, upto): views, never mutated
        layers = [(layer.keys[:, :, :upto], layer.values[:, :, :upto]) for layer in prefix.layers]
        return DynamicCache(ddp_cache_data=layers, config=base.model.config)

    prefix = None
    if not naive:
        full = assemble_live(wc.entries, tokens, embedding, gistnet, positions=positions)
        prefix = _forward(base, full, DynamicCache(config=base.model.config)).past_key_values
    last = len(wc.entries) - 1  # the last entry's logits predict the first horizon token
    before = score(wc.entries, 0, None) if naive else score(wc.entries, last, reuse(last))
    rows = []
    for cand in cands:
        touched = BLOCK if cand.action == "collapse" else 1
        entries = wc.entries[: cand.index] + cand.edited + wc.entries[cand.index + touched :]
        if naive:
            after = score(entries, 0, None)
        else:
            after = score(entries, cand.index, reuse(cand.index))
        rows.append({"entry_index": cand.index, "level": cand.node.level, "start": cand.node.start,
                     "action": cand.action, "delta_nll": after - before,
                     "cost": (BLOCK - 1) if cand.action == "expand" else -(BLOCK - 1)})
    return rows


def to_targets(rows: list[dict]) -> list[dict]:
    """Add utility (NLL gain per budget unit) and the [−1, 1] target to each label row (see module doc)."""
    for row in rows:
        row["utility"] = -row["delta_nll"] / abs(row["cost"])
    expand = [r["utility"] for r in rows if r["action"] == "expand"]
    rate = float(np.median(expand)) if expand else 0.0
    for row in rows:
        if row["action"] == "expand":
            row["target"] = max(0.0, float(np.tanh((row["utility"] - rate) / UTILITY_SCALE)))
        else:
            row["target"] = -max(0.0, float(np.tanh((rate + row["utility"]) / UTILITY_SCALE)))
    return rows


def label_table(snapshots: list[tuple[str, Window, WorkingContext, list[dict]]]) -> pl.DataFrame:
    """Schema-checked label table: one row per (snapshot, candidate action)."""
    records = [{"snapshot_id": sid, "doc_id": w.doc_id, "window_start": w.start, "cursor": w.start + w.history,
                **row} for sid, w, _, rows in snapshots for row in rows]
    df = pl.DataFrame(records, schema={
        "snapshot_id": pl.Utf8, "doc_id": pl.Utf8, "window_start": pl.Int64, "cursor": pl.Int64,
        "entry_index": pl.Int32, "level": pl.Int32, "start": pl.Int64, "action": pl.Utf8,
        "delta_nll": pl.Float64, "cost": pl.Int32, "utility": pl.Float64, "target": pl.Float64})
    return validate(df, LABEL_SCHEMA, where="JT2 labels")


def timed_labels(base: BaseLM, gistnet: GistNet, window: Window, wc: WorkingContext, cands: list[Candidate],
                 naive: bool, positions: PositionScheme = ABSOLUTE) -> tuple[list[dict], float]:
    start = time.perf_counter()
    rows = label_snapshot(base, gistnet, window, wc, cands, naive=naive, positions=positions)
    return rows, time.perf_counter() - start
