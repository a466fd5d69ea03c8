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
    from megacontext.data.corpus import build_corpus
    from megacontext.data.shards import build_shards
    from megacontext.context.tree_build import build_trees

    cfg = tiny_config(root, *EVAL_ARGS)
    build_corpus(cfg)
    build_shards(cfg)
    build_trees(cfg)
    return cfg


def _fingerprint(model) -> tuple:
    """What a test could change on a shared model: weights, attention implementation, module types, hooks."""
    weights = tuple(round(p.detach().double().sum().item(), 9) for p in model.parameters())
    modules = tuple(type(m).__name__ for m in model.modules())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return weights, model.config._attn_implementation, modules, hooks, model.training


@pytest.fixture(scope="session")
def _shared_tiny_base(tmp_path_factory):
    from megacontext.model.base_model import load_base_model

    return load_base_model(tiny_config(tmp_path_factory.mktemp("tiny-base")))


@pytest.fixture
def tiny_base(_shared_tiny_base):
    """The tiny profile's random base model, built once per session. Read it, never change it: a test that
    does (weights, attention implementation, hooks, Gaussian RoPE) fails here; build your own instead."""
    before = _fingerprint(_shared_tiny_base.model)
    yield _shared_tiny_base
    assert _fingerprint(_shared_tiny_base.model) == before, \
        "this test changed the session's shared tiny base; build its own with load_base_model(cfg)"


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Config:
    return tiny_config(tmp_path, "data.max_documents=4")
