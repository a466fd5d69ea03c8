from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megacontext.corpus import build_corpus
from megacontext.cycle import run_cycle
from megacontext.evaluation import evaluate
from megacontext.gistnet import load_gistnet
from megacontext.lensnet import load_lensnet
from megacontext.lineage import verify_files
from megacontext.shards import build_shards
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def first_cycle(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("cycle"), "data.max_documents=5", "data.val_fraction=0.45",
                      "data.test_fraction=0")
    build_corpus(cfg)
    build_shards(cfg)
    return cfg, run_cycle(cfg, 1)


def test_a_tiny_cycle_runs_end_to_end_and_is_evaluated(first_cycle) -> None:
    cfg, out = first_cycle
    summary = json.loads((out / "cycle.json").read_text())
    assert [len(summary["telemetry"][p]) for p in ("jt1", "jt2", "jt3")] == [4, 4, 4]
    assert (out / "jt2" / "labels" / "labels.parquet").is_file() and verify_files(out) == []
    report = evaluate(cfg, checkpoint=out)
    manifest = json.loads((report / "manifest.json").read_text())
    assert "LensNet + allocator + LoRA" in manifest["context"]["working context"]
    assert manifest["inputs"][1]["kind"] == "cycle"


def test_rerunning_a_finished_cycle_redoes_nothing(first_cycle) -> None:
    cfg, out = first_cycle
    stamp = (out / "jt1" / "final" / "telemetry.json").stat().st_mtime_ns
    run_cycle(cfg, 1)
    assert (out / "jt1" / "final" / "telemetry.json").stat().st_mtime_ns == stamp


def test_the_second_cycle_warm_starts_from_the_first(first_cycle, monkeypatch) -> None:
    cfg, first = first_cycle
    seen = {}
    import megacontext.cycle as cycle_module

    real_fit = cycle_module.fit

    def spy(phase, pcfg, out, **kw):
        seen.setdefault(phase.name, {k: v.detach().clone() for k, v in phase.trainable().items()})
        return real_fit(phase, pcfg, out, **kw)

    monkeypatch.setattr(cycle_module, "fit", spy)
    run_cycle(cfg, 2, previous=first)
    gist = load_gistnet(first / "jt1" / "final").state_dict()
    assert all(torch.equal(v, gist[k.removeprefix("gistnet.")]) for k, v in seen["jt1_gistnet"].items())
    lens = load_lensnet(first / "jt2" / "final").state_dict()
    assert all(torch.equal(v, lens[k.removeprefix("lensnet.")]) for k, v in seen["jt2_lensnet"].items())
    assert any(v.abs().sum() > 0 for k, v in seen["jt3_lora"].items() if "lora_B" in k or "embedding_B" in k)
