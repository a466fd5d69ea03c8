"""The evaluation's reference cache: everything that does not depend on the cycle, computed once.

For a base model, a tokenizer, an eval split and the eval settings, the cache holds:

- per sample (doc, cursor) and horizon token: NLL_full, NLL_recency and NLL of the attention
  oracle without gists (raw tail + the top blocks raw, nothing else: the value of gists);
- per sample and history block: the attention mass from the horizon's queries (the oracle's
  ranking) and from the last `tail_queries` history tokens (the training-free focus' ranking);
- per passkey trial: the prompt, the answer, and the same three methods' answer log-probability
  and greedy exact match, plus both block rankings.

A window's single full-context pass serves all its cursors (histories L, L − stride, ...):
the NLL of each horizon and both attention masses come out of that one forward
(`attention_mass`). The artifact (`<artifact_root>/eval_references/<split>-<digest>/`) has a manifest
whose `key` names everything the numbers depend on (base model, tokenizer, split, L, H, W_max,
the sampling and focus settings, the passkey settings, the seed and the shards' digest).
The settings name the cache's folder (`<split>-<digest>`), so another setting gets a cache of
its own and never reads these numbers; `load_references` refuses a cache whose inputs changed
(another base model, tokenizer or shards), naming what changed and the command that rebuilds
it. Evaluations, the nightly run and Dagster all read the same cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl
import torch
from torch import nn

from megacontext.model.attention_mass import attention_mass, block_sums
from megacontext.model.base_model import PREFILL_CHUNK, BaseLM, last_logits, load_base_model
from megacontext.model.base_model import token_nll as base_token_nll
from megacontext.context.block_selection import select_blocks
from megacontext.config import Config, MegaConfig
from megacontext.errors import ArtifactError, InputDataError
from megacontext.model.gaussian_rope import install_gaussian_rope
from megacontext.mega.model import mega_forward
from megacontext.lifecycle.locks import locked
from megacontext.lifecycle.lineage import (is_reusable, manifest_digest, read_manifest, sha256_json, staged_artifact,
                                 verify_files, write_manifest)
from megacontext.context.nodes import BLOCK, Node, span
from megacontext.evaluation.passkey import PasskeyTrial, answer_scores, make_trials, passkey_templates
from megacontext.progress import progress_bar
from megacontext.data.schemas import (BLOCK_MASS_DTYPES, BLOCK_MASS_SCHEMA, PASSKEY_REFERENCE_DTYPES,
                                 PASSKEY_REFERENCE_SCHEMA, REFERENCE_DTYPES, REFERENCE_SCHEMA, validate)
from megacontext.data.shards import TokenizedDocument, read_split, shards_dir
from megacontext.context.working_context import ABSOLUTE, PositionScheme, assemble

KIND = "eval_references"
PASSKEY_KIND = "passkey_references"
FORMAT_VERSION = 1
FILES = {"tokens": "tokens.parquet", "blocks": "blocks.parquet", "passkey": "passkey.parquet"}


class StaleReferences(ArtifactError):
    """The cached references were computed for other settings, data or base model."""


@dataclass(frozen=True)
class RefWindow:
    """One full-context pass: tokens [start, cursors[-1] + H) of `doc`, scored at every cursor."""

    doc: TokenizedDocument
    start: int
    cursors: tuple[int, ...]  # ascending, document positions


@dataclass(frozen=True)
class References:
    folder: Path
    tokens: pl.DataFrame  # REFERENCE_SCHEMA
    blocks: pl.DataFrame  # BLOCK_MASS_SCHEMA
    passkey: pl.DataFrame | None  # PASSKEY_REFERENCE_SCHEMA
    manifest: dict[str, Any]

    def samples(self) -> pl.DataFrame:
        """(doc_id, window_start, cursor) of every sample, in order."""
        return self.tokens.select("doc_id", "window_start", "cursor").unique(maintain_order=True)

    def block_scores(self, doc_id: str, cursor: int, column: str) -> np.ndarray:
        rows = self.blocks.filter((pl.col("doc_id") == doc_id) & (pl.col("cursor") == cursor)).sort("block")
        return rows[column].to_numpy()


def reference_settings(cfg: Config) -> dict[str, Any]:
    """The settings a cache is for (they name its folder): split, L, H, W_max, sampling, focus, seed."""
    ev = cfg.eval
    return {
        "format_version": FORMAT_VERSION,
        "split": ev.split,
        "L": ev.history,
        "H": ev.horizon,
        "W_max": cfg.wc.w_max,
        "levels": cfg.wc.levels,
        "sampling": {"max_docs": ev.max_docs, "windows_per_doc": ev.windows_per_doc,
                     "cursors_per_window": ev.cursors_per_window, "cursor_stride": ev.cursor_stride},
        "focus": {"tail": focus_tail(cfg), "tail_queries": ev.tail_queries},
        "seed": cfg.seed,
        # the oracle-without-gists row is read at these positions (absolute: the key of every earlier cache)
        **({"positions": {"kind": cfg.wc.positions, "widths": list(cfg.wc.slot_widths)}}
           if cfg.wc.positions != "absolute" else {}),
    }


def passkey_settings(cfg: Config) -> dict[str, Any]:
    """The passkey cache's settings: not the NLL sampling ones, plus the passkey probe's."""
    settings = {k: v for k, v in reference_settings(cfg).items() if k not in ("L", "H", "sampling")}
    return {**settings, "passkey": cfg.eval.passkey.model_dump(mode="json"), "templates": passkey_templates()}


def _inputs(cfg: Config, base_model_id: str, tokenizer_name: str) -> dict[str, Any]:
    """What the cached numbers were computed from; a change makes a cache stale."""
    return {"base_model": base_model_id, "dtype": cfg.model.dtype, "tokenizer": tokenizer_name,
            "shards": manifest_digest(read_manifest(shards_dir(cfg))),
            # numbers from an accelerator differ in rounding: a cache says where it was computed (cpu: every earlier key)
            **({"device": cfg.model.device} if cfg.model.device != "cpu" else {})}


def reference_key(cfg: Config, base_model_id: str, tokenizer_name: str) -> dict[str, Any]:
    """Everything the cached NLL references depend on: their settings and their inputs."""
    return {**reference_settings(cfg), **_inputs(cfg, base_model_id, tokenizer_name)}


def passkey_key(cfg: Config, base_model_id: str, tokenizer_name: str) -> dict[str, Any]:
    """Everything the cached passkey references depend on."""
    return {**passkey_settings(cfg), **_inputs(cfg, base_model_id, tokenizer_name)}


def references_dir(cfg: Config) -> Path:
    """`<artifact_root>/eval_references/<split>-<settings digest>`: other settings get a cache of their own."""
    digest = sha256_json(reference_settings(cfg))[:12]
    return Path(cfg.paths.artifact_root) / "eval_references" / f"{cfg.eval.split}-{digest}"


def passkey_dir(cfg: Config) -> Path:
    digest = sha256_json(passkey_settings(cfg))[:12]
    return Path(cfg.paths.artifact_root) / "eval_references" / f"{cfg.eval.split}-passkey-{digest}"


def yardstick(cfg: Config) -> dict[str, str | None]:
    """Which eval set a number was measured on: the reference caches' folder names (settings digests).

    Two evaluations are comparable only when their yardsticks are equal; the nightly regression
    refuses to compare a champion with numbers from another one.
    """
    return {"references": references_dir(cfg).name,
            "passkey": passkey_dir(cfg).name if cfg.eval.passkey.enabled else None}


def focus_tail(cfg: Config) -> int:
    return cfg.eval.focus_tail or cfg.wc.w_max // 2


def plan_windows(docs: list[TokenizedDocument], cfg: Config) -> list[RefWindow]:
    """`windows_per_doc` windows per document long enough, starts aligned to the top gist span, spread over it."""
    ev, align = cfg.eval, span(cfg.wc.levels)
    windows = []
    usable = [d for d in docs if len(d.tokens) >= ev.history + ev.horizon]
    for doc in usable[: ev.max_docs]:
        room = (len(doc.tokens) - ev.horizon - ev.history) // align  # aligned shifts that fit
        shifts = sorted({round(j * room / max(ev.windows_per_doc - 1, 1)) for j in range(ev.windows_per_doc)})
        taken: set[int] = set()  # windows of a short document can overlap: each cursor is scored once
        for s in shifts if room else [0]:
            start = s * align
            cursors = tuple(sorted({start + ev.history - j * ev.cursor_stride for j in range(ev.cursors_per_window)}
                                   - taken))
            if cursors:
                taken.update(cursors)
                windows.append(RefWindow(doc, start, cursors))
    return windows


class _Tokens:
    """A NodeSource over raw token ids (no gists): enough for working contexts made only of tokens."""

    def __init__(self, tokens: np.ndarray):
        self._tokens = tokens

    def tokens(self, start: int, end: int) -> np.ndarray:
        return self._tokens[start:end]

    def gists(self, level: int, start_index: int, end_index: int) -> np.ndarray:
        raise ValueError("a raw-token source has no gists")


@torch.no_grad()
def entries_logits(base: BaseLM, entries: Sequence[Node], source: Any, *, offset: int, horizon: np.ndarray,
                   mega: tuple[nn.Module, MegaConfig] | None = None, positions: PositionScheme = ABSOLUTE) -> torch.Tensor:
    """Logits [H, V] predicting `horizon` after the entries (read from `source`, Gaussian-RoPE positions).

    The entries need not tile the history (the oracle without gists skips spans): each keeps its
    own position, and the horizon follows the last entry. `install_gaussian_rope` first.
    `mega` = (GistNet, settings): read through MegaAttention (`install_mega_attention` first).
    """
    inputs = assemble(entries, source, base.model.get_input_embeddings(), offset=offset, horizon=horizon,
                      positions=positions)
    h = len(horizon)
    if mega is not None:
        gistnet, settings = mega
        return mega_forward(base, gistnet, inputs, settings.window, kernel=settings.kernel)[0, -h - 1 : -1].float()
    logits = last_logits(base.model, h + 1, mu=inputs.mu, sigma=inputs.sigma, inputs_embeds=inputs.inputs_embeds)
    return logits[0, :-1].float()


def token_nll(logits: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    """Per-token NLL (nats) [H] of token ids `targets` under logits [H, V]: `base_model.token_nll` for numpy."""
    return base_token_nll(logits, torch.as_tensor(targets.astype(np.int64))).cpu().numpy()


def _score_window(base: BaseLM, window: RefWindow, cfg: Config) -> tuple[list[dict], list[dict]]:
    ev, w, tail = cfg.eval, cfg.wc.w_max, focus_tail(cfg)
    h = ev.horizon
    doc_tokens = window.doc.tokens
    end = window.cursors[-1] + h
    ids = torch.as_tensor(doc_tokens[window.start : end].astype(np.int64))[None]
    rel = [c - window.start for c in window.cursors]
    groups = [torch.arange(r - 1, r + h - 1) for r in rel] + [torch.arange(r - ev.tail_queries, r) for r in rel]
    logits_at = torch.cat(groups[: len(rel)])
    mass, logits = attention_mass(base.model, groups, logits_at=logits_at, prefill_chunk=PREFILL_CHUNK, input_ids=ids)
    token_rows, block_rows = [], []
    for j, (cursor, r) in enumerate(zip(window.cursors, rel)):
        horizon = doc_tokens[cursor : cursor + h]
        nll_full = token_nll(logits[0, j * h : (j + 1) * h], horizon)
        recent = torch.as_tensor(doc_tokens[cursor - w : cursor + h].astype(np.int64))[None]
        nll_recency = token_nll(last_logits(base.model, h + 1, input_ids=recent)[0, :-1], horizon)
        n_blocks = r // BLOCK
        by_horizon = block_sums(mass[j], 0, n_blocks * BLOCK, BLOCK).cpu().numpy()
        by_tail = block_sums(mass[len(rel) + j], 0, n_blocks * BLOCK, BLOCK).cpu().numpy()
        entries = select_blocks(r, w, tail, by_horizon, levels=cfg.wc.levels, gists=False)
        nll_raw = token_nll(entries_logits(base, entries, _Tokens(doc_tokens), offset=window.start, horizon=horizon,
                                           positions=PositionScheme.of(cfg.wc)), horizon)
        token_rows.append({"doc_id": [window.doc.doc_id] * h, "window_start": [window.start] * h, "cursor": [cursor] * h,
                           "t": list(range(h)), "token": horizon.tolist(), "nll_full": nll_full.tolist(),
                           "nll_recency": nll_recency.tolist(), "nll_oracle_raw": nll_raw.tolist()})
        block_rows.append({"doc_id": [window.doc.doc_id] * n_blocks, "cursor": [cursor] * n_blocks,
                           "block": list(range(n_blocks)), "mass_horizon": by_horizon.tolist(),
                           "mass_tail": by_tail.tolist()})
    return token_rows, block_rows


def passkey_trials(cfg: Config, docs: list[TokenizedDocument], tokenizer) -> list[PasskeyTrial]:
    pk = cfg.eval.passkey
    return make_trials(docs, tokenizer, lengths=pk.lengths, trials=pk.trials, recency=cfg.wc.w_max,
                       seed=cfg.seed, align=span(cfg.wc.levels))


@torch.no_grad()
def _score_trial(base: BaseLM, trial: PasskeyTrial, cfg: Config) -> dict:
    w, tail, q = cfg.wc.w_max, focus_tail(cfg), cfg.eval.tail_queries
    n, a = trial.length, len(trial.answer)
    tokens = trial.tokens
    ids = torch.as_tensor(tokens.astype(np.int64))[None]
    groups = [torch.arange(n - 1, n + a - 1), torch.arange(n - q, n)]
    mass, logits = attention_mass(base.model, groups, logits_at=groups[0], prefill_chunk=PREFILL_CHUNK, input_ids=ids)
    logp_full, exact_full = answer_scores(logits[0].float().cpu().numpy(), trial.answer)
    recent = torch.as_tensor(tokens[n - w :].astype(np.int64))[None]
    rec_logits = last_logits(base.model, a + 1, input_ids=recent)[0, :-1]
    logp_recency, exact_recency = answer_scores(rec_logits.float().cpu().numpy(), trial.answer)
    n_blocks = n // BLOCK
    by_horizon = block_sums(mass[0], 0, n_blocks * BLOCK, BLOCK).cpu().numpy()
    by_tail = block_sums(mass[1], 0, n_blocks * BLOCK, BLOCK).cpu().numpy()
    entries = select_blocks(n, w, tail, by_horizon, levels=cfg.wc.levels, gists=False)
    raw_logits = entries_logits(base, entries, _Tokens(tokens), offset=0, horizon=trial.answer,
                                positions=PositionScheme.of(cfg.wc))
    logp_raw, exact_raw = answer_scores(raw_logits.cpu().numpy(), trial.answer)
    return {"trial_id": trial.trial_id, "doc_id": trial.doc_id, "length": n, "placement": trial.placement,
            "key": trial.key, "depth": trial.depth, "distance": trial.distance, "needle_tokens": trial.needle_tokens,
            "prompt": trial.prompt.tolist(), "answer": trial.answer.tolist(),
            "logp_full": logp_full, "exact_full": exact_full, "logp_recency": logp_recency,
            "exact_recency": exact_recency, "logp_oracle_raw": logp_raw, "exact_oracle_raw": exact_raw,
            "mass_horizon": by_horizon.tolist(), "mass_tail": by_tail.tolist()}


def _concat(chunks: list[dict], dtypes: dict[str, pl.DataType]) -> pl.DataFrame:
    """Column chunks (dicts of equal-length lists) -> one frame with the given dtypes."""
    return pl.DataFrame({k: pl.Series(k, [v for c in chunks for v in c[k]], dtype=t) for k, t in dtypes.items()})


def _rows(rows: list[dict], dtypes: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame({k: pl.Series(k, [r[k] for r in rows], dtype=t) for k, t in dtypes.items()})


def _check_fits(cfg: Config, base: BaseLM) -> None:
    ev = cfg.eval
    if ev.history + ev.horizon > base.max_positions:
        raise InputDataError(f"eval.history + eval.horizon = {ev.history + ev.horizon} exceeds the base model's "
                             f"{base.max_positions} positions; lower eval.history")


# both caches (NLL and passkey) of the root; a second builder (two evaluations on a fresh root) waits, then reuses
@locked(lambda cfg, **_: references_dir(cfg).parent, wait=12 * 3600)
def build_references(cfg: Config, *, base: BaseLM | None = None, force: bool = False) -> Path:
    """Compute and publish the reference caches (NLL samples, then passkey trials); reuse intact current ones
    unless `force`. Returns the NLL cache's folder (the passkey cache is `passkey_dir(cfg)`)."""
    base = base or load_base_model(cfg)
    if hasattr(base.model, "peft_config"):
        raise ArtifactError("evaluation references are the base model's own numbers: build them before adapters are applied")
    _check_fits(cfg, base)
    install_gaussian_rope(base.model)
    docs = read_split(shards_dir(cfg), cfg.eval.split, tokenizer_name=base.tokenizer.name)
    out = references_dir(cfg)
    key = reference_key(cfg, base.model_id, base.tokenizer.name)
    if force or not _current(out, key):
        _build_nll(cfg, base, docs, out, key)
    if cfg.eval.passkey.enabled:
        pk_out, pk_key = passkey_dir(cfg), passkey_key(cfg, base.model_id, base.tokenizer.name)
        if force or not _current(pk_out, pk_key):
            _build_passkey(cfg, base, docs, pk_out, pk_key)
    return out


def _build_nll(cfg: Config, base: BaseLM, docs: list[TokenizedDocument], out: Path, key: dict[str, Any]) -> None:
    ev = cfg.eval
    windows = plan_windows(docs, cfg)
    if not windows:
        raise InputDataError(f"no {ev.split} document has {ev.history + ev.horizon} tokens for an L={ev.history} "
                             "history; add longer documents or lower eval.history")
    tick = time.perf_counter()
    token_rows, block_rows = [], []
    with progress_bar("references (full-context passes)", total=len(windows), unit="windows") as advance:
        for window in windows:
            tokens, blocks = _score_window(base, window, cfg)
            token_rows += tokens
            block_rows += blocks
            advance(1)
    seconds = time.perf_counter() - tick
    with staged_artifact(out) as staging:
        validate(_concat(token_rows, REFERENCE_DTYPES), REFERENCE_SCHEMA,
                 str(out / FILES["tokens"])).write_parquet(staging / FILES["tokens"])
        validate(_concat(block_rows, BLOCK_MASS_DTYPES), BLOCK_MASS_SCHEMA,
                 str(out / FILES["blocks"])).write_parquet(staging / FILES["blocks"])
        write_manifest(staging, kind=KIND, format_version=FORMAT_VERSION, config_hash=_key_hash(key),
                       inputs=[shards_dir(cfg)],
                       extra={"key": key, "seconds": round(seconds, 1), "windows": len(windows),
                              "samples": sum(len(w.cursors) for w in windows)})


def _build_passkey(cfg: Config, base: BaseLM, docs: list[TokenizedDocument], out: Path, key: dict[str, Any]) -> None:
    trials = passkey_trials(cfg, docs, base.tokenizer)
    too_long = [t.trial_id for t in trials if len(t.tokens) > base.max_positions]
    if too_long:
        worst = max(trials, key=lambda t: len(t.tokens))
        raise InputDataError(f"passkey trial {worst.trial_id} needs {len(worst.tokens)} positions, more than the "
                             f"base model's {base.max_positions}; lower eval.passkey.lengths")
    tick = time.perf_counter()
    rows = []
    with progress_bar("references (passkey trials)", total=len(trials), unit="trials") as advance:
        for trial in trials:
            rows.append(_score_trial(base, trial, cfg))
            advance(1)
    seconds = time.perf_counter() - tick
    with staged_artifact(out) as staging:
        validate(_rows(rows, PASSKEY_REFERENCE_DTYPES), PASSKEY_REFERENCE_SCHEMA,
                 str(out / FILES["passkey"])).write_parquet(staging / FILES["passkey"])
        write_manifest(staging, kind=PASSKEY_KIND, format_version=FORMAT_VERSION, config_hash=_key_hash(key),
                       inputs=[shards_dir(cfg)], extra={"key": key, "seconds": round(seconds, 1), "trials": len(trials)})


def _key_hash(key: dict[str, Any]) -> str:
    return sha256_json(key)


def _current(folder: Path, key: dict[str, Any]) -> bool:
    kind = PASSKEY_KIND if "-passkey-" in folder.name else KIND
    return is_reusable(folder, kind=kind, format_version=FORMAT_VERSION, config_hash=_key_hash(key))


def _differences(recorded: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for name in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(name), wanted.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{name}.")
        elif a != b:
            out.append(f"{prefix}{name} {a!r} -> {b!r}")
    return out


def _checked(folder: Path, kind: str, key: dict[str, Any], rebuild: str) -> dict[str, Any]:
    """The manifest of a current, intact cache at `folder`; StaleReferences / ArtifactError otherwise."""
    manifest = read_manifest(folder)
    if manifest.get("kind") != kind or manifest.get("format_version") != FORMAT_VERSION:
        raise StaleReferences(f"{folder}: not {kind} of format {FORMAT_VERSION}; rebuild with `{rebuild}`")
    changed = _differences(manifest.get("key", {}), key)
    if changed:
        raise StaleReferences(f"{folder}: stale evaluation references ({'; '.join(changed[:4])}"
                              f"{'; ...' if len(changed) > 4 else ''}); rebuild them with `{rebuild}`")
    problems = verify_files(folder)
    if problems:
        raise ArtifactError(f"{problems[0]}; rebuild the evaluation references with `{rebuild} --force`")
    return manifest


def load_references(cfg: Config, base: BaseLM, *, build_missing: bool = True) -> References:
    """The caches for this config and base: built when absent (if `build_missing`), refused when stale or corrupt."""
    folder, pk_folder = references_dir(cfg), passkey_dir(cfg)
    rebuild = f"megacontext eval-references --profile {cfg.profile}"
    missing = not (folder / "manifest.json").is_file() or (
        cfg.eval.passkey.enabled and not (pk_folder / "manifest.json").is_file())
    if missing:
        if not build_missing:
            raise ArtifactError(f"{folder}: no evaluation references; build them with `{rebuild}`")
        build_references(cfg, base=base)
    manifest = _checked(folder, KIND, reference_key(cfg, base.model_id, base.tokenizer.name), rebuild)
    tokens = validate(pl.read_parquet(folder / FILES["tokens"]), REFERENCE_SCHEMA, str(folder / FILES["tokens"]))
    blocks = validate(pl.read_parquet(folder / FILES["blocks"]), BLOCK_MASS_SCHEMA, str(folder / FILES["blocks"]))
    passkey = None
    if cfg.eval.passkey.enabled:
        _checked(pk_folder, PASSKEY_KIND, passkey_key(cfg, base.model_id, base.tokenizer.name), rebuild)
        passkey = validate(pl.read_parquet(pk_folder / FILES["passkey"]), PASSKEY_REFERENCE_SCHEMA,
                           str(pk_folder / FILES["passkey"]))
    return References(folder, tokens, blocks, passkey, manifest)


def trial_from_row(row: dict) -> PasskeyTrial:
    return PasskeyTrial(row["trial_id"], row["doc_id"], row["length"], row["placement"], row["key"], row["depth"],
                        row["needle_tokens"], np.asarray(row["prompt"], dtype=np.uint32),
                        np.asarray(row["answer"], dtype=np.uint32))
