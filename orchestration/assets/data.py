"""Data assets: raw corpus -> tokenized, split dataset shards. Thin: config -> library -> metadata."""

from __future__ import annotations

from dagster import MaterializeResult, MetadataValue, asset

from megacontext.corpus import build_corpus
from megacontext.lineage import manifest_digest, read_manifest
from megacontext.shards import build_shards
from megacontext.tree_build import build_trees
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
