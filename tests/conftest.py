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


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Config:
    return tiny_config(tmp_path, "data.max_documents=4")
