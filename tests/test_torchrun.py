"""A phase launched by `torchrun` on 2 processes (DDP, gloo) ends with the weights of a 1-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megacontext.data.corpus import build_corpus
from megacontext.data.shards import build_shards
from tests.conftest import tiny_config

TRAIN = ["train.jt1.steps=2", "train.jt1.batch=2", "data.max_documents=4", "data.val_fraction=0", "data.test_fraction=0"]


def _phase(root: Path, data: Path, *launcher: str) -> Path:
    overrides = [f"paths.artifact_root={root}", f"paths.data_root={data}", f"paths.corpus_dir={data / 'none'}", *TRAIN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run([*launcher, "-m", "megacontext", "train-phase", "--phase", "jt1", "--profile", "tiny", *overrides],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "cycles" / "cycle-0001" / "jt1" / "final"


def test_torchrun_two_processes_match_one_process(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, f"paths.data_root={tmp_path / 'shared'}", f"paths.corpus_dir={tmp_path / 'shared' / 'none'}",
                      *TRAIN)
    build_corpus(cfg)
    build_shards(cfg)
    data = tmp_path / "shared"
    single = _phase(tmp_path / "one", data, sys.executable)
    ddp = _phase(tmp_path / "two", data, sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "2")
    a, b = load_file(single / "gistnet.safetensors"), load_file(ddp / "gistnet.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    rows = [json.loads((f / "telemetry.json").read_text()) for f in (single, ddp)]
    assert [len(r) for r in rows] == [2, 2]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], rel=1e-5)  # same global batch
    assert (ddp / "manifest.json").is_file()  # rank 0 sealed the output once
