"""Shared fixtures: tiny profile configs rooted in a temporary folder, offline W&B."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megacontext.config import Config, load_config

os.environ.setdefault("WANDB_MODE", "disabled")


def tiny_config(root: Path, *overrides: str) -> Config:
    """The tiny profile with every output under `root` and the corpus folder `root/data`."""
    return load_config(
        "tiny",
        [f"paths.artifact_root={root / 'artifacts'}", f"paths.corpus_dir={root / 'data'}", *overrides],
        env={},
    )


# Five tiny documents, all in the validation split: the evaluation tests' corpus.
EVAL_ARGS = ("data.max_documents=5", "data.val_fraction=0.999", "data.test_fraction=0")


def eval_corpus(root: Path) -> Config:
    """The tiny evaluation corpus under `root`: corpus, shards and baseline trees built."""
    from megacontext.corpus import build_corpus
    from megacontext.shards import build_shards
    from megacontext.tree_build import build_trees

    cfg = tiny_config(root, *EVAL_ARGS)
    build_corpus(cfg)
    build_shards(cfg)
    build_trees(cfg)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Config:
    return tiny_config(tmp_path, "data.max_documents=4")
