"""W&B tracking: offline by default, never blocking, never failing a step; manifests record the run."""

from __future__ import annotations

import logging
import time
from pathlib import Path


from megacontext.lifecycle import tracking
from megacontext.lifecycle.lineage import manifest_digest, read_manifest, write_manifest


def test_disabled_mode_is_a_no_op_run(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with tracking.start_run({"a": 1}, name="t", group="cycle-0001", job_type="jt1", directory=tmp_path) as run:
        run.log({"loss": 1.0}, step=1)
        run.summary({"x": 1})
        assert not run.active and run.id is None and tracking.current_run() is run
    assert tracking.current_run() is None and not (tmp_path / "wandb").exists()


def test_offline_run_writes_locally_and_its_id_goes_into_manifests(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    art = tmp_path / "art"
    art.mkdir()
    (art / "w.txt").write_text("weights")
    with tracking.start_run({"lr": 0.5}, name="cycle-0001-jt1", group="cycle-0001", job_type="jt1",
                            directory=tmp_path) as run:
        run.log_telemetry([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
        run.summary({"final_loss": 1.5})
        manifest = write_manifest(art, kind="demo", format_version=1, config_hash="c")
    assert run.active and manifest["wandb_run_id"] == run.id
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run.id}"))
    [data] = runs[0].glob("*.wandb")  # the run's records (protobuf), uploaded later with `wandb sync`
    deadline = time.monotonic() + 30
    while b"final_loss" not in (records := data.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)  # wandb-core's writer may still be flushing after finish() returned
    for expected in (b"final_loss", b"cycle-0001", b"jt1", b"lr", b"loss"):
        assert expected in records, expected
    # the run id is volatile: the same content built in another run has the same digest
    again = write_manifest(art, kind="demo", format_version=1, config_hash="c")
    assert manifest_digest(read_manifest(art)) == manifest_digest(again) and "wandb_run_id" not in again


def test_a_failing_wandb_gives_a_warning_and_a_no_op_run(monkeypatch, tmp_path: Path, caplog) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")

    def broken(**kwargs):
        raise RuntimeError("no route to host")

    monkeypatch.setattr(wandb, "init", broken)
    with caplog.at_level(logging.WARNING, logger="megacontext.lifecycle.tracking"):
        with tracking.start_run({}, name="t", group="g", job_type="jt2", directory=tmp_path) as run:
            run.log({"loss": 1.0}, step=1)
    assert not run.active and "could not start" in caplog.text and "no route to host" in caplog.text


def test_an_unknown_mode_falls_back_to_offline(monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    assert tracking.mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert tracking.mode() == "offline"
