"""Data assets: raw corpus -> tokenized, split dataset shards. Thin: config -> library -> metadata."""

from __future__ import annotations

import polars as pl
from dagster import MaterializeResult, MetadataValue, asset

from megacontext.data.corpus import build_corpus
from megacontext.evaluation.references import build_references, passkey_dir
from megacontext.lifecycle.lineage import manifest_digest, read_manifest
from megacontext.data.shards import build_shards
from megacontext.context.tree_build import build_trees
from orchestration.resources import MegaContextConfig


@asset(group_name="data", description="Raw documents from data/ (or the stdlib sources when data/ is empty).")
def corpus(mc: MegaContextConfig) -> MaterializeResult:
    out = build_corpus(mc.resolve())
    manifest = read_manifest(out)
    return MaterializeResult(metadata={
        "path": MetadataValue.path(str(out)),
        "manifest_digest": manifest_digest(manifest),
        "documents": manifest["stats"]["documents"],
        "source": manifest["stats"]["source"],
    })


@asset(group_name="data", deps=[corpus], description="Tokenized Parquet shards, split by document hash.")
def dataset_shards(mc: MegaContextConfig) -> MaterializeResult:
    out = build_shards(mc.resolve())
    manifest = read_manifest(out)
    return MaterializeResult(metadata={
        "path": MetadataValue.path(str(out)),
        "manifest_digest": manifest_digest(manifest),
        "tokens": manifest["summary"]["tokens"],
        "summary": MetadataValue.md((out / "summary.md").read_text()),
        "lengths": MetadataValue.md(f"![lengths]({(out / 'lengths.png').resolve().as_uri()})"),
    })


@asset(group_name="data", deps=[dataset_shards],
       description="A MegaContext tree per document with the untrained GistNet: the baseline every cycle must beat.")
def megacontext_trees(mc: MegaContextConfig) -> MaterializeResult:
    out = build_trees(mc.resolve())
    manifest = read_manifest(out)
    return MaterializeResult(metadata={
        "path": MetadataValue.path(str(out)),
        "manifest_digest": manifest_digest(manifest),
        "tokens": manifest["tokens"],
        "documents": MetadataValue.json(manifest["documents"]),
        "gistnet": manifest["gistnet"],
    })


@asset(group_name="evaluation", deps=[dataset_shards],
       description="The evaluation's cycle-independent references, computed once: NLL_full and NLL_recency per "
                   "sample, the attention mass per history block, the oracle without gists, the passkey trials.")
def eval_references(mc: MegaContextConfig) -> MaterializeResult:
    cfg = mc.resolve()
    out = build_references(cfg)
    manifest = read_manifest(out)
    tokens = pl.read_parquet(out / "tokens.parquet")
    meta = {"path": MetadataValue.path(str(out)), "manifest_digest": manifest_digest(manifest),
            "samples": manifest["samples"], "windows": manifest["windows"], "build_seconds": manifest["seconds"],
            **{f"mean_{c}": float(tokens[c].mean()) for c in ("nll_full", "nll_recency", "nll_oracle_raw")}}
    if cfg.eval.passkey.enabled:
        trials = pl.read_parquet(passkey_dir(cfg) / "passkey.parquet")
        meta["passkey_trials"] = trials.height
        accuracy = trials.group_by("length", "placement").agg(pl.col("exact_full").mean(), pl.col("exact_recency").mean())
        meta["passkey"] = MetadataValue.md(_markdown_table(accuracy.sort("length", "placement")))
    return MaterializeResult(metadata=meta)


def _markdown_table(frame: pl.DataFrame) -> str:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * frame.width]
    lines += ["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |"
              for row in frame.iter_rows()]
    return "\n".join(lines)
