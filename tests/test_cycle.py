from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megacontext.data.corpus import build_corpus
from megacontext.training.cycle import run_cycle
from megacontext.errors import ArtifactError, ConfigError
from megacontext.evaluation.evaluate import evaluate
from megacontext.model.gistnet import load_gistnet
from megacontext.model.lensnet import load_lensnet
from megacontext.lifecycle.champion import report_dir
from megacontext.lifecycle.lineage import verify_files
from megacontext.data.shards import build_shards
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def first_cycle(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("cycle"), "data.max_documents=5", "data.val_fraction=0.45",
                      "data.test_fraction=0", "train.teacher_windows=3", "lensnet.listwise_weight=1.0",
                      "allocator.new_window=reach")  # the dense-supervision path and the reach allocator
    build_corpus(cfg)
    build_shards(cfg)
    return cfg, run_cycle(cfg, 1)


def test_a_tiny_cycle_runs_end_to_end_and_is_evaluated(first_cycle) -> None:
    cfg, out = first_cycle
    summary = json.loads((out / "cycle.json").read_text())
    assert [len(summary["telemetry"][p]) for p in ("jt1", "jt2", "jt3")] == [4, 4, 4]
    assert (out / "jt2" / "labels" / "labels.parquet").is_file() and verify_files(out) == []
    for phase in ("jt1", "jt3"):  # focus telemetry and latency per block on every step
        for row in summary["telemetry"][phase]:
            assert 0 < row["budget_utilisation"] <= 1 and row["swap_rate"] >= 0 and row["ms_per_block"] > 0
    assert summary["labels"]["focus_budget_utilisation"] > 0
    guard = summary["lora_guard"]  # the plain-reading guard ran on JT3's adapters and its record is sealed
    assert guard["windows"] == cfg.train.lora.guard_windows and guard["tokens"] == guard["windows"] * cfg.train.horizon
    assert "guard.json" in json.loads((out / "jt3/final/manifest.json").read_text())["files"]
    gists = summary["gist_guard"]  # and the gist guard on JT1's GistNet
    assert gists["windows"] == cfg.train.gist_guard_windows and gists["tokens"] == gists["windows"] * cfg.train.horizon
    assert "guard.json" in json.loads((out / "jt1/final/manifest.json").read_text())["files"]
    validated = [row["step"] for row in summary["telemetry"]["jt1"] if "val_loss" in row]
    assert validated == [2, 4] and summary["best_steps"]["jt1"]["step"] in (0, 2, 4)  # tiny: eval_every 2
    assert "best.json" in json.loads((out / "jt1/final/manifest.json").read_text())["files"]
    validated = [row["step"] for row in summary["telemetry"]["jt2"] if "val_loss" in row]  # JT2 on held-out teacher windows
    assert validated == [2, 4] and summary["best_steps"]["jt2"]["step"] in (0, 2, 4)
    jt2_inputs = [i["kind"] for i in json.loads((out / "jt2/final/manifest.json").read_text())["inputs"]]
    assert "lens-teacher" in jt2_inputs  # the held-out masses are part of its lineage
    report = evaluate(cfg, checkpoint=out)
    assert report == report_dir(cfg, out) and not report.is_relative_to(out)
    assert verify_files(out) == []  # evaluating a cycle leaves the cycle (the DVC `cycle` stage's output) untouched
    manifest = json.loads((report / "manifest.json").read_text())
    assert "LensNet + allocator + LoRA" in manifest["context"]["working context"]
    assert 0 < manifest["context"]["budget utilisation"] <= 1 and manifest["context"]["MC latency ms / block"] > 0
    assert manifest["inputs"][1]["kind"] == "cycle"
    assert verify_files(out) == [] and not (out / "evaluation").exists()  # reports live outside the cycle
    import polars as pl
    passkey = pl.read_parquet(report / "passkey.parquet")  # recency through the cycle's LoRA, every trial
    assert passkey["logp_recency_adapted"].null_count() == 0
    assert passkey["logp_recency_adapted"].to_list() != passkey["logp_recency"].to_list()


def test_every_phase_output_has_its_own_lineage(first_cycle) -> None:
    cfg, out = first_cycle
    kinds = {"jt1/final": "gistnet", "jt2/labels": "lens_labels", "jt2/final": "lensnet", "jt3/final": "lora_adapter"}
    for folder, kind in kinds.items():
        manifest = json.loads((out / folder / "manifest.json").read_text())
        assert manifest["kind"] == kind and verify_files(out / folder) == []
    lora_inputs = {i["kind"] for i in json.loads((out / "jt3/final/manifest.json").read_text())["inputs"]}
    assert lora_inputs == {"dataset_shards", "gistnet", "lensnet"}
    lens_inputs = {i["kind"] for i in json.loads((out / "jt2/final/manifest.json").read_text())["inputs"]}
    assert lens_inputs == {"dataset_shards", "lens_labels", "gistnet", "lens-teacher"}  # the teacher cache is an input
    cycle_inputs = [i["kind"] for i in json.loads((out / "manifest.json").read_text())["inputs"]]
    assert sorted(cycle_inputs) == sorted(["dataset_shards", *kinds.values(), "megacontext_trees"])


def test_rerunning_a_finished_cycle_redoes_nothing(first_cycle) -> None:
    cfg, out = first_cycle
    stamp = (out / "jt1" / "final" / "telemetry.json").stat().st_mtime_ns
    run_cycle(cfg, 1)
    assert (out / "jt1" / "final" / "telemetry.json").stat().st_mtime_ns == stamp


def test_the_second_cycle_warm_starts_from_the_first(first_cycle, monkeypatch) -> None:
    cfg, first = first_cycle
    seen = {}
    import megacontext.training.cycle as cycle_module

    real_fit = cycle_module.fit

    def spy(phase, pcfg, out, **kw):
        seen.setdefault(phase.name, {k: v.detach().clone() for k, v in phase.trainable().items()})
        return real_fit(phase, pcfg, out, **kw)

    monkeypatch.setattr(cycle_module, "fit", spy)
    second = run_cycle(cfg, 2, previous=first)
    warm = {i["path"] for i in json.loads((second / "jt1/final/manifest.json").read_text())["inputs"]}
    assert "../../../cycle-0001/jt1/final" in warm  # the warm start is in the lineage
    gist = load_gistnet(first / "jt1" / "final").state_dict()
    assert all(torch.equal(v, gist[k.removeprefix("gistnet.")]) for k, v in seen["jt1_gistnet"].items())
    lens = load_lensnet(first / "jt2" / "final").state_dict()
    assert all(torch.equal(v, lens[k.removeprefix("lensnet.")]) for k, v in seen["jt2_lensnet"].items())
    assert any(v.abs().sum() > 0 for k, v in seen["jt3_lora"].items() if "lora_B" in k or "embedding_B" in k)


def test_an_ablation_evaluates_the_cycle_without_a_trained_part(first_cycle) -> None:
    cfg, out = first_cycle
    report = evaluate(cfg, checkpoint=out, without=("lora",))
    assert report == out.parent.parent / "reports" / "cycle-0001-without-lora"
    context = json.loads((report / "manifest.json").read_text())["context"]
    assert context["working context"].startswith("LensNet + allocator, GistNet")
    with_lora = json.loads((report_dir(cfg, out) / "summary.json").read_text())["all"]
    without = json.loads((report / "summary.json").read_text())["all"]
    assert without["nll_full"] == with_lora["nll_full"] and without["nll_mc"] != with_lora["nll_mc"]
    assert (report / "lod_map.png").is_file()
    with pytest.raises(ConfigError, match="--without takes"):
        evaluate(cfg, checkpoint=out, without=("lensnett",))


def _reseal(folder: Path) -> None:
    """Record `folder`'s current files in its manifest (a test standing in for a legitimate rewrite)."""
    from megacontext.lifecycle.lineage import file_entries

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = file_entries(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_promotion_needs_a_passing_evaluation_and_nightly_reproduces_the_champion(first_cycle, tmp_path) -> None:
    import shutil

    from megacontext.lifecycle.champion import current_champion, gate_passed, previous_accepted, promote
    from megacontext.errors import GateError
    from megacontext.lifecycle.lineage import write_manifest
    from megacontext.lifecycle.nightly import run_nightly

    cfg, out = first_cycle
    evaluated = json.loads((report_dir(cfg, out) / "summary.json").read_text())
    assert evaluated["gate"]["passed"], "the tiny cycle passes the gate (ΔNLL < 0.1 and NLL_mc < NLL_recency)"
    unevaluated = out.parent / "cycle-0009"
    unevaluated.mkdir()
    with pytest.raises(GateError, match="not evaluated"):
        promote(cfg, unevaluated)
    # one report folder per cycle of this artifact root: a namesake elsewhere, `..` or a bad name has none
    for elsewhere in (tmp_path / "elsewhere" / out.name, out / "..", out.parent / "cycle-9"):
        with pytest.raises(ConfigError, match="not a cycle folder of this artifact root"):
            promote(cfg, elsewhere)
    # a passing report written (with --out) for another checkpoint into cycle-0009's report folder
    impostor = report_dir(cfg, unevaluated)
    impostor.mkdir(parents=True)
    write_manifest(impostor, kind="validation_report", format_version=1, config_hash="c", inputs=[out],
                   extra={"gate_passed": True})
    assert gate_passed(cfg, unevaluated) is None
    with pytest.raises(GateError, match="a report of another checkpoint"):
        promote(cfg, unevaluated)
    shutil.rmtree(impostor)
    unevaluated.rmdir()
    # a cycle changed after its evaluation (retrained, rebuilt) keeps no verdict until it is re-evaluated
    manifest = out / "manifest.json"
    sealed = manifest.read_text()
    manifest.write_text(json.dumps({**json.loads(sealed), "config_hash": "retrained"}))
    assert gate_passed(cfg, out) is None and previous_accepted(cfg, 2) is None
    with pytest.raises(GateError, match="evaluated before cycle-0001 last changed"):
        promote(cfg, out)
    manifest.write_text(sealed)
    assert current_champion(cfg) is None
    promote(cfg, out)
    assert current_champion(cfg)["cycle"] == 1 and previous_accepted(cfg, 2) == out and previous_accepted(cfg, 1) is None

    import datetime as dt
    result = run_nightly(cfg, day=dt.date(2026, 1, 2))
    assert result.passed and result.deltas["nll_mc"] == 0.0  # same weights, same fixed eval set: same numbers
    assert (result.report / "report.md").read_text().count("PASS") == 1 and (result.report / "compare.png").is_file()

    champion_json = Path(cfg.paths.artifact_root) / "champion" / "champion.json"  # pretend it once scored 1 nat better
    record = json.loads(champion_json.read_text())
    record["recorded"]["nll_mc"]["value"] -= 1.0
    champion_json.write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match="champion.json: content differs from the manifest"):
        run_nightly(cfg, day=dt.date(2026, 1, 3))  # an edited record is never compared against
    _reseal(champion_json.parent)  # a record that really says so
    result = run_nightly(cfg, day=dt.date(2026, 1, 3))
    assert not result.passed and result.deltas["nll_mc"] == pytest.approx(1.0)
    assert "REGRESSION" in (result.report / "report.md").read_text()
    assert (Path(cfg.paths.artifact_root) / "nightly" / "trend.png").is_file()

    # numbers from another eval set (here: more cursors per window) are refused before anything runs
    other = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"cursors_per_window": cfg.eval.cursors_per_window + 1})})
    with pytest.raises(GateError, match="not comparable"):
        run_nightly(other, day=dt.date(2026, 1, 4))
    assert not (Path(cfg.paths.artifact_root) / "nightly" / "2026-01-04").exists()
    record["yardstick"] = None  # a champion recorded before the yardstick existed: refused too
    champion_json.write_text(json.dumps(record))
    _reseal(champion_json.parent)
    with pytest.raises(GateError, match="not comparable"):
        run_nightly(cfg, day=dt.date(2026, 1, 5))


def test_the_audit_walks_a_real_cycle_to_the_corpus_and_finds_a_modified_byte(first_cycle) -> None:
    from megacontext.lifecycle.audit import audit

    cfg, out = first_cycle
    result = audit(report_dir(cfg, out))
    kinds = {n.kind for n in result.walk()}
    assert result.ok, [p for n in result.walk() for p in n.problems]
    assert {"validation_report", "cycle", "gistnet", "lens_labels", "lensnet", "lora_adapter", "megacontext_trees",
            "dataset_shards", "corpus"} <= kinds
    weights = out / "jt3" / "final" / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        bad = [n for n in audit(report_dir(cfg, out)).walk() if n.problems]
        assert {n.kind for n in bad} == {"lora_adapter"} and str(weights) in bad[0].problems[0]
    finally:
        weights.write_bytes(original)


def test_a_cycle_has_one_spelling_and_zero_or_negative_numbers_are_refused(tmp_path) -> None:
    from megacontext.training.cycle import cycle_dir, cycle_name, parse_cycle_name

    assert [cycle_name(n) for n in (1, 12, 10_000)] == ["cycle-0001", "cycle-0012", "cycle-10000"]
    assert all(parse_cycle_name(cycle_name(n)) == n for n in (1, 7, 999, 10_000))
    for bad in (0, -1, True):
        with pytest.raises(ConfigError, match="start at 1"):
            cycle_dir(tiny_config(tmp_path), bad)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("phase, file", [("jt3/final", "adapter_model.safetensors"), ("jt1/final", "gistnet.safetensors"),
                                         ("jt2/final", "lensnet.json"), ("jt2/labels", "labels.parquet"),
                                         ("trees", "gistnet/gistnet.safetensors")])
def test_a_flipped_byte_in_a_phase_output_stops_its_consumers_and_the_advice_repairs_it(first_cycle, tmp_path,
                                                                                         phase, file) -> None:
    import shutil

    from megacontext.errors import ArtifactError
    from megacontext.lifecycle.audit import audit
    from megacontext.runtime.streaming import load_runtime
    from megacontext.training.cycle import cycle_dir

    cfg, original = first_cycle
    root = tmp_path / "artifacts"
    # (a relocated root rewrites config.yaml with its paths, so the cycle is re-sealed: reports would go stale)
    shutil.copytree(Path(cfg.paths.artifact_root), root, ignore=shutil.ignore_patterns("reports", "wandb"))
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"artifact_root": str(root)})})
    out = cycle_dir(cfg, 1)
    target = out / phase / file
    pristine = target.read_bytes()
    _flip(target)
    consumers = {"generate": lambda: load_runtime(cfg, out, tmp_path / "tree")}
    if phase != "jt1/final":  # evaluation reads GistNet from the cycle's trees, which hold their own copy
        consumers["evaluate"] = lambda: evaluate(cfg, checkpoint=out, out=tmp_path / "report")
    if phase == "trees":  # the cycle's evaluation trees and the GistNet copy they were built with
        consumers = {"evaluate": consumers["evaluate"]}
    if phase == "jt2/labels":  # read by JT2 of this cycle only
        shutil.rmtree(out / "jt2" / "final")
        consumers = {"train-cycle": lambda: run_cycle(cfg, 1)}
    for name, consume in consumers.items():
        with pytest.raises(ArtifactError) as error:
            consume()
        message = str(error.value)
        assert str(target) in message and "\n" not in message, (name, message)
        doomed = [out / phase] + ([out / "jt2" / "final", out / "jt3" / "final"] if phase == "jt2/labels" else [])
        advice = f"delete {', '.join(map(str, doomed))} and rerun `megacontext train-cycle --cycle 1 --profile tiny`"
        assert advice in message, (name, message)
    for folder in doomed:  # the advice: each phase resumes from its last checkpoint and re-exports
        shutil.rmtree(folder, ignore_errors=True)
    run_cycle(cfg, 1)
    if phase != "jt2/labels":  # labels are recomputed (same rows, new timings); weights are re-exported as they were
        assert target.read_bytes() == pristine
    result = audit(out)
    assert result.ok, [p for n in result.walk() for p in n.problems]
    load_runtime(cfg, out, tmp_path / "tree2").close()


@pytest.mark.slow
@pytest.mark.parametrize("inputs", ["hidden", "embeddings+hidden"])
def test_a_cycle_with_contextual_gists_trains_builds_its_trees_from_hidden_states_and_streams(tmp_path, inputs) -> None:
    """Contextual gists end to end: JT1 -> JT2 -> JT3, the cycle's trees, the evaluation and the runtime."""
    from megacontext.context.tree_build import open_tree
    from megacontext.model.base_model import load_base_model
    from megacontext.model.gistnet import BlockReader, TreeGistEncoder
    from megacontext.runtime.streaming import load_runtime

    cfg = tiny_config(tmp_path, "data.max_documents=5", "data.val_fraction=0.45", "data.test_fraction=0",
                      f"gistnet.inputs={inputs}", "gistnet.input_layers=1")
    build_corpus(cfg)
    build_shards(cfg)
    out = run_cycle(cfg, 1)
    base = load_base_model(cfg)
    gistnet = load_gistnet(out / "jt1" / "final", base.model)
    assert gistnet.cfg.inputs == inputs and gistnet.reader is not None
    tree_manifest = json.loads((out / "trees" / "manifest.json").read_text())
    doc_id = next(iter((out / "trees" / "val").iterdir())).name
    tree = open_tree(out / "trees", "val", doc_id, base_model_id=base.model_id, encoder_identity=tree_manifest["gistnet"])
    blocks = tree.tokens(0, 4 * 32).reshape(4, 32)
    want = TreeGistEncoder(gistnet, base.model.get_input_embeddings()).encode_tokens(blocks)
    assert torch.allclose(torch.as_tensor(tree.gists(1, 0, 4)).float(), torch.as_tensor(want), atol=2e-3)  # fp16 tree
    assert (evaluate(cfg, checkpoint=out) / "report.md").is_file()
    runtime = load_runtime(cfg, out, tmp_path / "stream")
    try:
        runtime.feed(blocks.reshape(-1).tolist() * 3)
        assert isinstance(runtime.encoder.reader, BlockReader)
        lod1 = runtime.tree.gists(1, 0, 4)
        assert np.allclose(lod1.astype(np.float32), want, atol=2e-3)  # streamed gists = the cycle's trees'
    finally:
        runtime.close()
