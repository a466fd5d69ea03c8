"""ΔNLL evaluation (DESIGN §4): full context vs recency window vs MegaContext working context.

For held-out documents, at cursor c with an L-token history window [c − L, c)
(window starts aligned to the top gist span, so whole-document trees serve
every window), the base model is scored on the next H true tokens given:
the full window (NLL_full), its last W_max tokens (NLL_recency), and the
working context at budget W_max (NLL_mc; cold start until LensNet exists),
plus WCs compressing with LOD1 only / LOD2 only (per-level ΔNLL). The
per-token table, its summary with bootstrap intervals, the gate verdict and
a Markdown/PNG report are written as the `validation_report` artifact.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import polars as pl
import torch

from megacontext.base_model import BaseLM, horizon_token_nll, load_base_model
from megacontext.config import Config, config_hash
from megacontext.errors import InputDataError
from megacontext.eval_report import write_report
from megacontext.focus_policy import Policy, cold_start_policy, lens_policy
from megacontext.gistnet import gistnet_identity
from megacontext.jt3_lora import load_lora
from megacontext.lensnet import load_lensnet
from megacontext.gate import check_gate_setting, gate, summarize
from megacontext.gaussian_rope import gaussian_positions, install_gaussian_rope
from megacontext.lineage import staged_artifact, write_manifest
from megacontext.nodes import span
from megacontext.progress import progress_bar
from megacontext.shards import TokenizedDocument, read_split, shards_dir
from megacontext.tree import MegaContextTree
from megacontext.tree_build import load_tree_gistnet, open_tree, trees_dir
from megacontext.windows import Window
from megacontext.working_context import BudgetExceeded, WorkingContext, assemble, single_level_start

KIND = "validation_report"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Sample:
    doc: TokenizedDocument
    cursor: int  # position in the document; history = [cursor - L, cursor), horizon = [cursor, cursor + H)
    window_start: int


def sample_cursors(docs: list[TokenizedDocument], *, history: int, horizon: int, per_doc: int, align: int) -> list[Sample]:
    """Up to `per_doc` cursors per document, window starts on multiples of `align`, spread over the document."""
    samples = []
    for doc in docs:
        room = (len(doc.tokens) - horizon - history) // align  # how many aligned shifts fit
        if room < 0:
            continue
        shifts = sorted({round(j * room / max(per_doc - 1, 1)) for j in range(per_doc)}) if room else [0]
        samples.extend(Sample(doc, s * align + history, s * align) for s in shifts[:per_doc])
    return samples


def wc_token_nll(base: BaseLM, wc: WorkingContext, tree: MegaContextTree, sample: Sample, horizon: np.ndarray) -> np.ndarray:
    """Per-token NLL of the horizon read after the working context (Gaussian RoPE positions)."""
    inputs = assemble(wc.entries, tree, base.model.get_input_embeddings(), offset=sample.window_start, horizon=horizon)
    targets = torch.as_tensor(horizon.astype(np.int64))[None]
    with gaussian_positions(base.model, inputs.mu, inputs.sigma):
        return horizon_token_nll(base.model, len(horizon), inputs_embeds=inputs.inputs_embeds, targets=targets)[0].numpy()


def score_sample(base: BaseLM, tree: MegaContextTree, sample: Sample, cfg: Config, *,
                 policy: Policy, plain: Callable[[], ContextManager]) -> dict[str, np.ndarray]:
    """Per-token NLLs of one sample; `plain()` switches adapters off for the full/recency baselines."""
    ev, wcc = cfg.eval, cfg.wc
    tokens = sample.doc.tokens.astype(np.int64)
    c, h, w = sample.cursor, ev.horizon, wcc.w_max
    horizon = sample.doc.tokens[c : c + h]
    full_ids = torch.as_tensor(tokens[sample.window_start : c + h])[None]
    recent_ids = torch.as_tensor(tokens[c - w : c + h])[None]
    with plain():
        columns = {
            "nll_full": horizon_token_nll(base.model, h, input_ids=full_ids)[0].numpy(),
            "nll_recency": horizon_token_nll(base.model, h, input_ids=recent_ids)[0].numpy(),
        }
    window = Window(sample.doc.doc_id, sample.window_start, sample.doc.tokens[sample.window_start : c + h], ev.history)
    columns["nll_mc"] = wc_token_nll(base, policy(window), tree, sample, horizon)
    for level in (1, 2):  # per-level ΔNLL; null where that level alone cannot fit the budget
        columns[f"nll_mc_lod{level}"] = np.full(h, np.nan)
        if level <= wcc.levels:
            try:
                wc = single_level_start(ev.history, w, wcc.protected_tail, level, wcc.levels)
            except BudgetExceeded:
                continue
            columns[f"nll_mc_lod{level}"] = wc_token_nll(base, wc, tree, sample, horizon)
    return columns


def evaluate(cfg: Config, *, checkpoint: Path | None = None, out: Path | None = None) -> Path:
    """Score every sample, summarise, gate, and publish the report folder.

    Without `checkpoint`: the untrained system (tree gists from `build-trees`, cold-start WC).
    With a cycle folder: its trees (its GistNet), LensNet + allocator focus, and LoRA adapters for NLL_mc.
    """
    ev = cfg.eval
    base = load_base_model(cfg)
    check_gate_setting(history=ev.history, horizon=ev.horizon, w_max=cfg.wc.w_max, base_positions=base.max_positions)
    install_gaussian_rope(base.model)
    trees = checkpoint / "trees" if checkpoint else trees_dir(cfg)
    gistnet = load_tree_gistnet(trees, base.model_id)
    identity = gistnet_identity(gistnet)
    policy, plain, focus = cold_start_policy(cfg, budget=cfg.wc.w_max), nullcontext, "cold start (no LensNet)"
    if checkpoint:
        policy = lens_policy(cfg, base.model.get_input_embeddings(), gistnet, load_lensnet(checkpoint / "jt2" / "final"),
                             budget=cfg.wc.w_max)
        peft = load_lora(base, checkpoint / "jt3" / "final")
        plain, focus = peft.disable_adapter, f"LensNet + allocator + LoRA ({checkpoint.name})"
    docs = read_split(shards_dir(cfg), ev.split, tokenizer_name=base.tokenizer.name)
    samples = sample_cursors(docs, history=ev.history, horizon=ev.horizon, per_doc=ev.cursors_per_doc,
                             align=span(cfg.wc.levels))
    samples = samples[: ev.max_docs * ev.cursors_per_doc]
    if not samples:
        raise InputDataError(
            f"no {ev.split} document has {ev.history + ev.horizon} tokens for an L={ev.history} history; "
            "add longer documents or lower eval.history"
        )
    frames = []
    start = time.perf_counter()
    with progress_bar("evaluating", total=len(samples), unit="samples") as advance:
        for sample in samples:
            tree = open_tree(trees, ev.split, sample.doc.doc_id, base_model_id=base.model_id, encoder_identity=identity)
            columns = score_sample(base, tree, sample, cfg, policy=policy, plain=plain)
            frames.append(pl.DataFrame({
                "doc_id": [sample.doc.doc_id] * ev.horizon,
                "cursor": pl.Series([sample.cursor] * ev.horizon, dtype=pl.Int64),
                "t": pl.Series(range(ev.horizon), dtype=pl.Int32),
                "token": pl.Series(sample.doc.tokens[sample.cursor : sample.cursor + ev.horizon], dtype=pl.UInt32),
                **{k: pl.Series(v.astype(np.float64), dtype=pl.Float64) for k, v in columns.items()},
            }))
            advance(1)
    table = pl.concat(frames).with_columns(pl.col("nll_mc_lod1", "nll_mc_lod2").fill_nan(None))
    summary = summarize(table, key_token_margin=ev.key_token_margin, bootstrap_samples=ev.bootstrap_samples,
                        confidence=ev.confidence, seed=cfg.seed)
    verdict = gate(summary, delta_nll_max=ev.delta_nll_max)
    context = {"profile": cfg.profile, "base model": base.model_id, "GistNet": identity, "W_max": cfg.wc.w_max,
               "L (history)": ev.history, "H (horizon)": ev.horizon, "split": ev.split,
               "working context": focus, "seconds": round(time.perf_counter() - start, 1)}
    out = out or (checkpoint / "evaluation" if checkpoint else Path(cfg.paths.artifact_root) / "evaluation")
    with staged_artifact(out) as staging:
        write_report(staging, table, summary, verdict, title="MegaContext validation report", context=context)
        write_manifest(staging, kind=KIND, format_version=FORMAT_VERSION,
                       config_hash=config_hash(cfg, sections=["eval", "wc", "gistnet"]),
                       inputs=[shards_dir(cfg), checkpoint or trees], extra={"gate_passed": verdict.passed, "context": context})
    return out
