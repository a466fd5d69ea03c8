"""A cycle SIGKILLed mid-phase resumes to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from megacontext.data.corpus import build_corpus
from megacontext.data.shards import build_shards
from tests.conftest import tiny_config

ARGS = ["data.max_documents=5", "data.val_fraction=0.45", "data.test_fraction=0", "train.jt1.steps=6",
        "train.checkpoint_every=1", "train.jt1.eval_every=2", "train.jt1.eval_windows=2"]  # JT1 early stopping too


def _train(root: Path) -> subprocess.Popen:
    overrides = [f"paths.artifact_root={root / 'artifacts'}", f"paths.corpus_dir={root / 'data'}", *ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "megacontext", "train-cycle", "--profile", "tiny", *overrides],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _final_weights(root: Path) -> dict[str, torch.Tensor]:
    cycle = root / "artifacts" / "cycles" / "cycle-0001"
    weights = {}
    for name in ("jt1/final/gistnet.safetensors", "jt2/final/lensnet.safetensors", "jt3/final/adapter_model.safetensors"):
        weights.update({f"{name}:{k}": v for k, v in load_file(cycle / name).items()})
    return weights


def test_killed_cycle_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    for root in (tmp_path / "straight", tmp_path / "killed"):
        cfg = tiny_config(root, *ARGS)
        build_corpus(cfg)
        build_shards(cfg)
    assert _train(tmp_path / "straight").wait(timeout=300) == 0
    victim = _train(tmp_path / "killed")
    checkpoints = tmp_path / "killed" / "artifacts" / "cycles" / "cycle-0001" / "jt1" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(checkpoints.glob("step-*"))) < 2:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)  # mid-JT1, after at least two checkpoints
    victim.wait()
    resumed = _train(tmp_path / "killed")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    best = [json.loads((root / "artifacts/cycles/cycle-0001/cycle.json").read_text())["best_steps"]
            for root in (tmp_path / "straight", tmp_path / "killed")]
    assert best[0] == best[1] and set(best[0]) == {"jt1", "jt2"} and best[0]["jt1"]["step"] in (0, 2, 4, 6)
    assert best[0]["jt2"]["step"] in (0, 2, 4)  # the tiny profile validates JT2 too
