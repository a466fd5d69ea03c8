"""ΔNLL evaluation (docs/lifecycle.md §4): full context vs recency window vs MegaContext working context.

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
import tempfile
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import polars as pl
import torch
from torch import nn

from megacontext.model.base_model import BaseLM, last_logits, load_base_model
from megacontext.config import Config, MegaConfig, config_hash
from megacontext.errors import ConfigError
from megacontext.evaluation.report import write_report
from megacontext.context.focus_policy import Policy, cold_start_policy, lens_policy
from megacontext.context.block_selection import expanded_blocks, select_blocks
from megacontext.model.gistnet import TreeGistEncoder, gistnet_identity
from megacontext.model.lora import load_lora
from megacontext.model.lensnet import load_lensnet
from megacontext.mega.model import install_mega_attention
from megacontext.evaluation.gate import check_gate_setting, gate, summarize
from megacontext.model.gaussian_rope import install_gaussian_rope
from megacontext.lifecycle.champion import report_dir
from megacontext.lifecycle.lineage import staged_artifact, write_manifest
from megacontext.lifecycle.locks import artifact_lock
from megacontext.context.nodes import BLOCK, Node
from megacontext.evaluation.passkey import answer_scores
from megacontext.evaluation.references import (References, entries_logits, focus_tail, load_references, passkey_dir,
                                    token_nll, trial_from_row, yardstick)
from megacontext.data.schemas import EVAL_LEVEL_COLUMNS, EVAL_NLL_COLUMNS
from megacontext.plots import plot_lod_map
from megacontext.lifecycle.tracking import current_run, start_run
from megacontext.progress import progress_bar
from megacontext.data.shards import TokenizedDocument, read_split, shards_dir
from megacontext.context.tree import MegaContextTree
from megacontext.context.tree_build import load_tree_gistnet, open_tree, trees_dir
from megacontext.data.windows import Window
from megacontext.context.working_context import ABSOLUTE, BudgetExceeded, NodeSource, PositionScheme, single_level_start

KIND = "validation_report"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Sample:
    doc: TokenizedDocument
    cursor: int  # position in the document; history = [window_start, cursor), horizon = [cursor, cursor + H)
    window_start: int

    @property
    def history(self) -> int:
        return self.cursor - self.window_start


def wc_token_nll(base: BaseLM, entries: Sequence[Node], tree: NodeSource, window_start: int, horizon: np.ndarray,
                 mega: tuple[nn.Module, MegaConfig] | None = None, positions: PositionScheme = ABSOLUTE) -> np.ndarray:
    """Per-token NLL [H] of the horizon read after the working context's `entries` (Gaussian RoPE positions).

    `mega` = (GistNet, settings): read the WC + horizon through MegaAttention (`install_mega_attention` first).
    """
    return token_nll(entries_logits(base, entries, tree, offset=window_start, horizon=horizon, mega=mega,
                                    positions=positions), horizon)


@dataclass
class Rows:
    """How one evaluation reads a sample: the policy, the adapters, the baselines it adds."""

    cfg: Config
    policy: Policy
    plain: Callable[[], ContextManager]  # adapters off (trees are built by the base embedding alone)
    adapted: bool  # the cycle's LoRA is on: also score recency through it
    mega: tuple[nn.Module, MegaConfig] | None = None
    health: dict[str, list[float]] | None = None  # per row: expanded blocks per sample, their distances


def score_sample(base: BaseLM, tree: NodeSource, sample: Sample, refs: References, rows: Rows,
                 timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Per-token NLLs of every row for one sample: full/recency/oracle-raw from the cache, the rest scored now.

    Working contexts that come out identical (e.g. the cold start and the LOD1-only WC) are scored once.
    `timings` accumulates the MegaContext path's wall seconds (focus + WC forward) under "mc_seconds".
    """
    cfg = rows.cfg
    ev, wcc = cfg.eval, cfg.wc
    c, h, w, n = sample.cursor, ev.horizon, wcc.w_max, sample.history
    pos = PositionScheme.of(wcc)
    horizon = sample.doc.tokens[c : c + h]
    cached = refs.tokens.filter((pl.col("doc_id") == sample.doc.doc_id) & (pl.col("cursor") == c)).sort("t")
    columns = {name: cached[name].to_numpy() for name in ("nll_full", "nll_recency")}
    scored: dict[tuple, np.ndarray] = {}

    def score(entries: Sequence[Node]) -> np.ndarray:
        key = tuple(entries)
        if key not in scored:
            scored[key] = wc_token_nll(base, entries, tree, sample.window_start, horizon, positions=pos)
        return scored[key]

    window = Window(sample.doc.doc_id, sample.window_start, sample.doc.tokens[sample.window_start : c + h], n)
    tick = time.perf_counter()
    wc = rows.policy(window)
    columns["nll_mc"] = (wc_token_nll(base, wc.entries, tree, sample.window_start, horizon, rows.mega, pos)
                         if rows.mega else score(wc.entries))
    if timings is not None:
        timings["mc_seconds"] = timings.get("mc_seconds", 0.0) + time.perf_counter() - tick
    _health(rows, "mc", wc.entries, n)
    for level in (1, 2):  # per-level ΔNLL; null where that level alone cannot fit the budget
        columns[f"nll_mc_lod{level}"] = np.full(h, np.nan)
        if level <= wcc.levels:
            try:
                single = single_level_start(n, w, wcc.protected_tail, level, wcc.levels, wcc.sink_tokens)
            except BudgetExceeded:
                continue
            columns[f"nll_mc_lod{level}"] = score(single.entries)
    nan = np.full(h, np.nan)
    columns["nll_recency_adapted"] = nan
    if rows.adapted:
        recent = torch.as_tensor(sample.doc.tokens[c - w : c + h].astype(np.int64))[None]
        columns["nll_recency_adapted"] = token_nll(last_logits(base.model, h + 1, input_ids=recent)[0, :-1],
                                                   sample.doc.tokens[c : c + h])
    columns["nll_oracle"] = columns["nll_training_free"] = columns["nll_training_free_raw"] = nan
    columns["nll_oracle_raw"] = cached["nll_oracle_raw"].to_numpy()  # the base alone reads the raw oracle
    if ev.baselines:  # read exactly like NLL_mc (same adapters, same attention), so only the focus differs
        tail = focus_tail(cfg)
        by_horizon = refs.block_scores(sample.doc.doc_id, c, "mass_horizon")
        for name, mass in (("oracle", by_horizon), ("training_free", refs.block_scores(sample.doc.doc_id, c, "mass_tail"))):
            try:
                entries = select_blocks(n, w, tail, mass, levels=wcc.levels)
            except BudgetExceeded:  # the tail and the coarsest gists do not fit: recorded as null, like a level
                continue
            columns[f"nll_{name}"] = (wc_token_nll(base, entries, tree, sample.window_start, horizon, rows.mega, pos)
                                      if rows.mega else score(entries))
            _health(rows, name, entries, n)
        if rows.adapted or rows.mega:  # the value of gists: the same raw oracle through this read path
            raw = select_blocks(n, w, tail, by_horizon, levels=wcc.levels, gists=False)
            columns["nll_oracle_raw"] = wc_token_nll(base, raw, tree, sample.window_start, horizon, rows.mega, pos)
        # the training-free selection's raw blocks and tail only: is a cheap focus worth more without gists?
        raw = select_blocks(n, w, tail, refs.block_scores(sample.doc.doc_id, c, "mass_tail"), levels=wcc.levels,
                            gists=False)
        columns["nll_training_free_raw"] = (wc_token_nll(base, raw, tree, sample.window_start, horizon, rows.mega, pos)
                                            if rows.mega else score(raw))
    return columns


def _health(rows: Rows, name: str, entries: Sequence[Node], n: int) -> None:
    """Record how many older blocks a working context reads raw (vs the cold start) and how far back."""
    if rows.health is None:
        return
    wcc = rows.cfg.wc
    distances = expanded_blocks(list(entries), n, wcc.w_max, wcc.protected_tail, wcc.levels, wcc.sink_tokens)
    rows.health.setdefault(f"{name}:count", []).append(float(len(distances)))
    rows.health.setdefault(f"{name}:distance", []).extend(float(d) for d in distances)


def focus_health(health: dict[str, list[float]]) -> dict[str, dict[str, float | None]]:
    """Per row: expanded blocks per sample (mean, and the share of samples with any) and their distance back."""
    out = {}
    for key in sorted(health):
        name, kind = key.split(":")
        if kind != "count":
            continue
        counts = np.asarray(health[key])
        distances = np.asarray(health.get(f"{name}:distance", []))
        out[name] = {"expanded_blocks_per_sample": round(float(counts.mean()), 2) if counts.size else 0.0,
                     "samples_with_expansions": round(float((counts > 0).mean()), 3) if counts.size else 0.0,
                     "median_distance_tokens": float(np.median(distances)) if distances.size else None,
                     "max_distance_tokens": float(distances.max()) if distances.size else None}
    return out


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
        run.summary({k: v["value"] for k, v in summary["all"].items() if isinstance(v, dict) and "value" in v}
                    | passkey_accuracy(summary)
                    | {"gate_passed": summary["gate"]["passed"], "without": ",".join(without)})
        return report


def _evaluate(cfg: Config, *, checkpoint: Path | None = None, out: Path | None = None,
              without: tuple[str, ...] = ()) -> Path:
    """`_evaluate_into` the report folder (settled first), holding its write lock: a second evaluation into
    the same folder refuses at once, naming the first, instead of racing it to publish."""
    unknown = sorted(set(without) - set(ABLATABLE))
    if unknown or (without and not checkpoint):
        raise ConfigError(f"--without takes {', '.join(ABLATABLE)} and needs --checkpoint; got {', '.join(without)}")
    # where the report goes, settled before any work (a checkpoint outside the artifact root needs `out`)
    out = out or (report_dir(cfg, checkpoint, without) if checkpoint else Path(cfg.paths.artifact_root) / "evaluation")
    with artifact_lock(out):
        return _evaluate_into(cfg, checkpoint=checkpoint, out=out, without=without)


def _evaluate_into(cfg: Config, *, checkpoint: Path | None, out: Path, without: tuple[str, ...]) -> Path:
    """Score every cached sample and passkey trial, summarise, gate, and publish the report folder.

    Without `checkpoint`: the untrained system (tree gists from `build-trees`, cold-start WC).
    With a cycle folder: its trees (its GistNet), LensNet + allocator focus, and LoRA adapters for NLL_mc.
    `without` ablates trained parts of the cycle: "gistnet" (baseline trees), "lensnet" (cold start),
    "lora" (no adapters). The report goes to `champion.report_dir` (`<artifact_root>/reports/<cycle>[-without-<parts>]`,
    never inside the cycle folder) unless `out` is given.
    NLL_full, NLL_recency, the oracle without gists and the passkey references come from the reference
    cache (`references.py`; built on first use, refused when stale), so a re-evaluation only runs the
    working-context passes.
    """
    ev = cfg.eval
    base = load_base_model(cfg)
    check_gate_setting(history=ev.history, horizon=ev.horizon, w_max=cfg.wc.w_max, base_positions=base.max_positions)
    refs = load_references(cfg, base)  # before any adapter or MegaAttention is installed: plain base numbers
    install_gaussian_rope(base.model)
    trees = checkpoint / "trees" if checkpoint and "gistnet" not in without else trees_dir(cfg)
    gistnet = load_tree_gistnet(trees, base.model_id, base.model)
    if cfg.mega.attention and gistnet.cfg.inputs != "embeddings":
        raise ConfigError(f"{trees}: its GistNet reads gistnet.inputs={gistnet.cfg.inputs}, which does not combine with "
                          "MegaAttention yet; evaluate it with mega.attention=false")
    identity = gistnet_identity(gistnet)
    mega = None
    if cfg.mega.attention:  # NLL_mc through MegaAttention (per-level and baselines stay full attention)
        install_mega_attention(base.model, cfg.mega.layers)
        mega = (gistnet, cfg.mega)
    policy, plain, focus = cold_start_policy(cfg, budget=cfg.wc.w_max), nullcontext, "cold start (no LensNet)"
    learned_focus = False
    if checkpoint:
        parts = []
        embedding = base.model.get_input_embeddings()  # the plain one: what GistNet and LensNet read
        if "lora" not in without:
            plain = load_lora(base, checkpoint / "jt3" / "final").disable_adapter
        if "lensnet" not in without:
            policy = lens_policy(cfg, embedding, gistnet, load_lensnet(checkpoint / "jt2" / "final"),
                                 budget=cfg.wc.w_max, model=base.model, plain=plain)
            parts.append("LensNet + allocator")
            learned_focus = True
        if "lora" not in without:
            parts.append("LoRA")
        trained = "GistNet" if "gistnet" not in without else "baseline GistNet"
        focus = f"{' + '.join(parts) or 'cold start'}, {trained} ({checkpoint.name})"
    rows = Rows(cfg, policy, plain, adapted=plain is not nullcontext, mega=mega, health={})
    docs = {d.doc_id: d for d in read_split(shards_dir(cfg), ev.split, tokenizer_name=base.tokenizer.name)}
    samples = [Sample(docs[r["doc_id"]], r["cursor"], r["window_start"]) for r in refs.samples().iter_rows(named=True)]
    frames = []
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with progress_bar("evaluating", total=len(samples), unit="samples") as advance:
        for sample in samples:
            tree = open_tree(trees, ev.split, sample.doc.doc_id, base_model_id=base.model_id, encoder_identity=identity)
            columns = score_sample(base, tree, sample, refs, rows, timings=timings)
            frames.append(pl.DataFrame({
                "doc_id": [sample.doc.doc_id] * ev.horizon,
                "cursor": pl.Series([sample.cursor] * ev.horizon, dtype=pl.Int64),
                "t": pl.Series(range(ev.horizon), dtype=pl.Int32),
                "token": pl.Series(sample.doc.tokens[sample.cursor : sample.cursor + ev.horizon], dtype=pl.UInt32),
                **{k: pl.Series(columns[k].astype(np.float64), dtype=pl.Float64)
                   for k in (*EVAL_NLL_COLUMNS, *EVAL_LEVEL_COLUMNS)},
            }))
            advance(1)
    focus_stats = policy.drain()
    table = pl.concat(frames).with_columns(pl.col(*EVAL_LEVEL_COLUMNS).fill_nan(None))
    summary = summarize(table, key_token_margin=ev.key_token_margin, bootstrap_samples=ev.bootstrap_samples,
                        confidence=ev.confidence, seed=cfg.seed, longppl_gain=ev.longppl_gain,
                        longppl_floor=ev.longppl_floor)
    passkey_table = None
    if refs.passkey is not None:
        passkey_table = score_passkey(base, refs.passkey, rows, gistnet)
        summary["passkey"] = summarize_passkey(passkey_table, bootstrap_samples=ev.bootstrap_samples,
                                               confidence=ev.confidence, seed=cfg.seed)
    health = focus_health(rows.health or {})
    summary["focus_health"] = {"swap_rate": round(focus_stats.get("swap_rate", 0.0), 5), "rows": health,
                               "learned_focus": learned_focus,
                               "never_edits": learned_focus and health.get("mc", {}).get("expanded_blocks_per_sample", 0) == 0
                               and focus_stats.get("swap_rate", 0.0) == 0.0}
    summary["yardstick"] = yardstick(cfg)
    verdict = gate(summary, delta_nll_max=ev.delta_nll_max)
    n_sample_tokens = sum(s.history + ev.horizon for s in samples)
    context = {"profile": cfg.profile, "base model": base.model_id, "GistNet": identity, "W_max": cfg.wc.w_max,
               "L (history)": f"{min(s.history for s in samples)}-{max(s.history for s in samples)}",
               "H (horizon)": ev.horizon, "split": ev.split,
               "working context": focus, "seconds": round(time.perf_counter() - start, 1),
               "references": f"{refs.folder} (full-context passes: {refs.manifest.get('seconds', '?')} s, once)",
               "oracle / training-free tail": f"{focus_tail(cfg)} raw tokens; ranking by attention mass "
                                              f"(horizon queries / last {ev.tail_queries} history tokens)",
               "attention": f"MegaAttention W={cfg.mega.window} ({cfg.mega.kernel})" if mega else "full",
               **focus_telemetry(focus_stats, timings["mc_seconds"], blocks=n_sample_tokens / BLOCK)}
    with staged_artifact(out) as staging:
        write_report(staging, table, summary, verdict, title="MegaContext validation report", context=context,
                     passkey=passkey_table)
        first = samples[0]  # the LOD map of one working context the policy built
        wc = policy(Window(first.doc.doc_id, first.window_start,
                           first.doc.tokens[first.window_start : first.cursor + ev.horizon], first.history))
        plot_lod_map(wc.entries, wc.cursor, staging / "lod_map.png", w_max=wc.w_max,
                     title=f"{first.doc.doc_id} @ {first.cursor:,}")
        write_manifest(staging, kind=KIND, format_version=FORMAT_VERSION,
                       config_hash=config_hash(cfg, sections=["eval", "wc", "gistnet", "mega"]),
                       inputs=[shards_dir(cfg), checkpoint or trees, refs.folder,
                               *([passkey_dir(cfg)] if refs.passkey is not None else [])],
                       extra={"gate_passed": verdict.passed, "context": context})
    return out


def passkey_accuracy(summary: dict[str, Any]) -> dict[str, float]:
    """Flat passkey accuracies for trackers and metadata: `passkey/<length>/<placement>/<method>`."""
    out = {}
    for setting in summary.get("passkey", {}).get("settings", []):
        for method, m in setting["methods"].items():
            out[f"passkey/{setting['length']}/{setting['placement']}/{method}"] = m["accuracy"]["value"]
    return out


PASSKEY_METHODS = ("full", "recency", "recency_adapted", "oracle_raw", "mc", "lod1", "oracle", "training_free",
                   "training_free_raw")


@torch.no_grad()
def score_passkey(base: BaseLM, references: pl.DataFrame, rows: Rows, gistnet: nn.Module) -> pl.DataFrame:
    """Answer log-probability and greedy exact match per passkey trial for every method.

    Full, recency and the oracle without gists come from the cache; the working-context rows read a
    tree built now from the trial's prompt with this evaluation's GistNet (adapters off, as trees are).
    Like the NLL rows: "recency_adapted" (last W_max prompt tokens through the cycle's LoRA) only when
    adapters are on, and "lod1" (the LOD1-only cold start, full attention) reuses the learned focus's
    score when both build the same working context.
    """
    cfg = rows.cfg
    wcc, tail = cfg.wc, focus_tail(cfg)
    pos = PositionScheme.of(wcc)
    embedding = base.model.get_input_embeddings()
    out = []
    with tempfile.TemporaryDirectory(prefix="passkey-trees-") as tmp, \
            progress_bar("passkey", total=references.height, unit="trials") as advance:
        for row in references.iter_rows(named=True):
            trial = trial_from_row(row)
            with rows.plain():
                encoder = TreeGistEncoder(gistnet, embedding)
                tree = MegaContextTree.create(Path(tmp) / trial.trial_id, base_model_id=base.model_id,
                                              encoder=encoder, levels=wcc.levels, gist_dtype=cfg.gistnet.gist_dtype)
                tree.append(trial.prompt, encoder)
            record = {k: row[k] for k in ("trial_id", "doc_id", "length", "placement", "depth", "distance")}
            for method in ("full", "recency", "oracle_raw"):
                record[f"logp_{method}"], record[f"exact_{method}"] = row[f"logp_{method}"], row[f"exact_{method}"]
            record["logp_recency_adapted"], record["exact_recency_adapted"] = None, None
            if rows.adapted:
                recent = torch.as_tensor(trial.tokens[trial.length - wcc.w_max :].astype(np.int64))[None]
                logits = last_logits(base.model, len(trial.answer) + 1, input_ids=recent)
                record["logp_recency_adapted"], record["exact_recency_adapted"] = answer_scores(
                    logits[0, :-1].float().cpu().numpy(), trial.answer)
            wc = rows.policy(Window(trial.doc_id, 0, trial.tokens, trial.length))
            candidates = {"mc": (wc.entries, rows.mega)}
            try:
                candidates["lod1"] = (single_level_start(trial.length, wcc.w_max, wcc.protected_tail, 1,
                                                         wcc.levels, wcc.sink_tokens).entries, None)
            except BudgetExceeded:
                pass
            if cfg.eval.baselines:
                for name, mass in (("oracle", "mass_horizon"), ("training_free", "mass_tail")):
                    candidates[name] = (select_blocks(trial.length, wcc.w_max, tail, np.asarray(row[mass]),
                                                      levels=wcc.levels), rows.mega)
                if rows.adapted or rows.mega:  # the raw oracle through this evaluation's read path
                    candidates["oracle_raw"] = (select_blocks(trial.length, wcc.w_max, tail, np.asarray(row["mass_horizon"]),
                                                              levels=wcc.levels, gists=False), rows.mega)
                candidates["training_free_raw"] = (select_blocks(trial.length, wcc.w_max, tail, np.asarray(row["mass_tail"]),
                                                                 levels=wcc.levels, gists=False), rows.mega)
            for name in ("oracle_raw",) if "oracle_raw" in candidates else ():
                entries, mega = candidates[name]
                logits = entries_logits(base, entries, tree, offset=0, horizon=trial.answer, mega=mega, positions=pos)
                record[f"logp_{name}"], record[f"exact_{name}"] = answer_scores(logits.cpu().numpy(), trial.answer)
            scored: dict[tuple, tuple[float, bool]] = {}  # identical working contexts are read once
            for name in ("mc", "lod1", "oracle", "training_free", "training_free_raw"):
                record[f"logp_{name}"], record[f"exact_{name}"] = None, None
                if name in candidates:
                    entries, mega = candidates[name]
                    key = (tuple(entries), mega is not None)
                    if key not in scored:
                        logits = entries_logits(base, entries, tree, offset=0, horizon=trial.answer, mega=mega,
                                                positions=pos)
                        scored[key] = answer_scores(logits.cpu().numpy(), trial.answer)
                    record[f"logp_{name}"], record[f"exact_{name}"] = scored[key]
            out.append(record)
            advance(1)
    return pl.DataFrame(out, schema={"trial_id": pl.Utf8, "doc_id": pl.Utf8, "length": pl.Int64, "placement": pl.Utf8,
                                     "depth": pl.Int64, "distance": pl.Int64,
                                     **{f"{kind}_{m}": (pl.Float64 if kind == "logp" else pl.Boolean)
                                        for m in PASSKEY_METHODS for kind in ("logp", "exact")}})


def summarize_passkey(table: pl.DataFrame, *, bootstrap_samples: int, confidence: float, seed: int) -> dict[str, Any]:
    """Per (length, placement, method): trials, exact-match accuracy and mean answer log-prob, bootstrap CIs
    over trials (seeded)."""
    rng = np.random.default_rng(seed)
    alpha = (1.0 - confidence) / 2.0
    settings = []
    for (length, placement), group in sorted(table.group_by("length", "placement"), key=lambda kv: (kv[0][0], kv[0][1])):
        entry: dict[str, Any] = {"length": int(length), "placement": placement, "trials": group.height,
                                 "median_distance": float(group["distance"].median()), "methods": {}}
        idx = rng.integers(0, group.height, size=(bootstrap_samples, group.height))
        for method in PASSKEY_METHODS:
            exact = group[f"exact_{method}"]
            if exact.null_count() == group.height:
                continue
            values = {"accuracy": exact.cast(pl.Float64).to_numpy(), "logp": group[f"logp_{method}"].to_numpy()}
            entry["methods"][method] = {}
            for name, v in values.items():
                draws = v[idx].mean(axis=1)
                lo, hi = np.quantile(draws, [alpha, 1 - alpha])
                entry["methods"][method][name] = {"value": float(v.mean()), "ci": [float(lo), float(hi)]}
        settings.append(entry)
    return {"settings": settings, "bootstrap": {"unit": "trial", "resamples": bootstrap_samples,
                                                "confidence": confidence, "seed": seed}}
