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

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from megacontext.base_model import BaseLM, horizon_token_nll, load_base_model
from megacontext.config import Config, MegaConfig, config_hash
from megacontext.errors import ConfigError, InputDataError
from megacontext.eval_report import write_report
from megacontext.focus_policy import Policy, cold_start_policy, lens_policy
from megacontext.gistnet import gistnet_identity
from megacontext.jt3_lora import load_lora
from megacontext.lensnet import load_lensnet
from megacontext.mega_model import install_mega_attention, mega_forward
from megacontext.gate import check_gate_setting, gate, summarize
from megacontext.gaussian_rope import gaussian_positions, install_gaussian_rope
from megacontext.lineage import staged_artifact, write_manifest
from megacontext.nodes import BLOCK, span
from megacontext.plots import plot_lod_map
from megacontext.tracking import current_run, start_run
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


def wc_token_nll(base: BaseLM, wc: WorkingContext, tree: MegaContextTree, sample: Sample, horizon: np.ndarray,
                 mega: tuple[nn.Module, MegaConfig] | None = None) -> np.ndarray:
    """Per-token NLL of the horizon read after the working context (Gaussian RoPE positions).

    `mega` = (GistNet, settings): read the WC + horizon through MegaAttention (`install_mega_attention` first).
    """
    inputs = assemble(wc.entries, tree, base.model.get_input_embeddings(), offset=sample.window_start, horizon=horizon)
    targets = torch.as_tensor(horizon.astype(np.int64))[None]
    if mega is not None:
        gistnet, settings = mega
        with torch.no_grad():
            logits = mega_forward(base, gistnet, inputs, settings.window, kernel=settings.kernel)[0]
        return F.cross_entropy(logits[-len(horizon) - 1 : -1].float(), targets[0], reduction="none").numpy()
    with gaussian_positions(base.model, inputs.mu, inputs.sigma):
        return horizon_token_nll(base.model, len(horizon), inputs_embeds=inputs.inputs_embeds, targets=targets)[0].numpy()


def score_sample(base: BaseLM, tree: MegaContextTree, sample: Sample, cfg: Config, *,
                 policy: Policy, plain: Callable[[], ContextManager],
                 timings: dict[str, float] | None = None,
                 mega: tuple[nn.Module, MegaConfig] | None = None) -> dict[str, np.ndarray]:
    """Per-token NLLs of one sample; `plain()` switches adapters off for the full/recency baselines.

    `timings` accumulates the MegaContext path's wall seconds (focus + WC forward) under "mc_seconds".
    """
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
    tick = time.perf_counter()
    columns["nll_mc"] = wc_token_nll(base, policy(window), tree, sample, horizon, mega)
    if timings is not None:
        timings["mc_seconds"] = timings.get("mc_seconds", 0.0) + time.perf_counter() - tick
    for level in (1, 2):  # per-level ΔNLL; null where that level alone cannot fit the budget
        columns[f"nll_mc_lod{level}"] = np.full(h, np.nan)
        if level <= wcc.levels:
            try:
                wc = single_level_start(ev.history, w, wcc.protected_tail, level, wcc.levels)
            except BudgetExceeded:
                continue
            columns[f"nll_mc_lod{level}"] = wc_token_nll(base, wc, tree, sample, horizon)
    return columns


def focus_telemetry(focus: dict[str, float], mc_seconds: float, *, blocks: float) -> dict[str, float]:
    """Focus telemetry of the MegaContext path (means per sample) for the report's context table."""
    return {"swap rate": round(focus.get("swap_rate", 0.0), 4), "residency (refocuses)": round(focus.get("residency_mean", 0.0), 2),
            "budget utilisation": round(focus.get("budget_utilisation", 0.0), 4),
            "focus ms / sample": round(focus.get("focus_ms", 0.0), 1),
            "MC latency ms / block": round(1000 * mc_seconds / max(blocks, 1.0), 2)}


ABLATABLE = ("gistnet", "lensnet", "lora")


def evaluate(cfg: Config, *, checkpoint: Path | None = None, out: Path | None = None,
             without: tuple[str, ...] = ()) -> Path:
    """`_evaluate` inside its own W&B run (job type "evaluate", grouped by cycle) unless a run is already active."""
    if current_run() is not None:  # e.g. the nightly regression's run
        return _evaluate(cfg, checkpoint=checkpoint, out=out, without=without)
    group = checkpoint.name if checkpoint else "baseline"
    with start_run(cfg.model_dump(mode="json"), name=f"{group}-evaluate", group=group, job_type="evaluate",
                   directory=Path(cfg.paths.artifact_root)) as run:
        report = _evaluate(cfg, checkpoint=checkpoint, out=out, without=without)
        summary = json.loads((report / "summary.json").read_text())
        run.summary({k: v["value"] for k, v in summary["all"].items() if isinstance(v, dict)}
                    | {"gate_passed": summary["gate"]["passed"], "without": ",".join(without)})
        return report


def _evaluate(cfg: Config, *, checkpoint: Path | None = None, out: Path | None = None,
              without: tuple[str, ...] = ()) -> Path:
    """Score every sample, summarise, gate, and publish the report folder.

    Without `checkpoint`: the untrained system (tree gists from `build-trees`, cold-start WC).
    With a cycle folder: its trees (its GistNet), LensNet + allocator focus, and LoRA adapters for NLL_mc.
    `without` ablates trained parts of the cycle: "gistnet" (baseline trees), "lensnet" (cold start),
    "lora" (no adapters); the report goes to <cycle>/evaluation-without-<parts> unless `out` is given.
    """
    unknown = sorted(set(without) - set(ABLATABLE))
    if unknown or (without and not checkpoint):
        raise ConfigError(f"--without takes {', '.join(ABLATABLE)} and needs --checkpoint; got {', '.join(without)}")
    ev = cfg.eval
    base = load_base_model(cfg)
    check_gate_setting(history=ev.history, horizon=ev.horizon, w_max=cfg.wc.w_max, base_positions=base.max_positions)
    install_gaussian_rope(base.model)
    trees = checkpoint / "trees" if checkpoint and "gistnet" not in without else trees_dir(cfg)
    gistnet = load_tree_gistnet(trees, base.model_id)
    identity = gistnet_identity(gistnet)
    mega = None
    if cfg.mega.attention:  # NLL_mc through MegaAttention (per-level and baselines stay full attention)
        install_mega_attention(base.model, cfg.mega.layers)
        mega = (gistnet, cfg.mega)
    policy, plain, focus = cold_start_policy(cfg, budget=cfg.wc.w_max), nullcontext, "cold start (no LensNet)"
    if checkpoint:
        parts = []
        if "lensnet" not in without:
            policy = lens_policy(cfg, base.model.get_input_embeddings(), gistnet,
                                 load_lensnet(checkpoint / "jt2" / "final"), budget=cfg.wc.w_max)
            parts.append("LensNet + allocator")
        if "lora" not in without:
            plain = load_lora(base, checkpoint / "jt3" / "final").disable_adapter
            parts.append("LoRA")
        trained = "GistNet" if "gistnet" not in without else "baseline GistNet"
        focus = f"{' + '.join(parts) or 'cold start'}, {trained} ({checkpoint.name})"
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
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with progress_bar("evaluating", total=len(samples), unit="samples") as advance:
        for sample in samples:
            tree = open_tree(trees, ev.split, sample.doc.doc_id, base_model_id=base.model_id, encoder_identity=identity)
            columns = score_sample(base, tree, sample, cfg, policy=policy, plain=plain, timings=timings, mega=mega)
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
               "working context": focus, "seconds": round(time.perf_counter() - start, 1),
               "attention": f"MegaAttention W={cfg.mega.window} ({cfg.mega.kernel})" if mega else "full",
               **focus_telemetry(policy.drain(), timings["mc_seconds"], blocks=len(samples) * (ev.history + ev.horizon) / BLOCK)}
    suffix = "-without-" + "-".join(sorted(without)) if without else ""
    out = out or (checkpoint / f"evaluation{suffix}" if checkpoint else Path(cfg.paths.artifact_root) / "evaluation")
    with staged_artifact(out) as staging:
        write_report(staging, table, summary, verdict, title="MegaContext validation report", context=context)
        first = samples[0]  # the LOD map of one working context the policy built
        wc = policy(Window(first.doc.doc_id, first.window_start,
                           first.doc.tokens[first.window_start : first.cursor + ev.horizon], ev.history))
        plot_lod_map(wc.entries, wc.cursor, staging / "lod_map.png", w_max=wc.w_max,
                     title=f"{first.doc.doc_id} @ {first.cursor:,}")
        write_manifest(staging, kind=KIND, format_version=FORMAT_VERSION,
                       config_hash=config_hash(cfg, sections=["eval", "wc", "gistnet", "mega"]),
                       inputs=[shards_dir(cfg), checkpoint or trees], extra={"gate_passed": verdict.passed, "context": context})
    return out
