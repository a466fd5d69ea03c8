"""One writer per artifact: a second writer refuses naming the holder, a killed holder frees the lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megacontext.cli import main
from megacontext.lifecycle.locks import ArtifactBusy, artifact_lock, lock_path

from conftest import tiny_config


def hold(folder: Path) -> subprocess.Popen:
    """A separate process that takes the lock on `folder` and sleeps until killed."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from megacontext.lifecycle.locks import artifact_lock
        with artifact_lock(Path({str(folder)!r})):
            print("held", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_lock(tmp_path: Path) -> None:
    folder = tmp_path / "cycles" / "cycle-0001"
    proc = hold(folder)
    try:
        with pytest.raises(ArtifactBusy) as busy:
            with artifact_lock(folder):
                pass
        assert str(busy.value).startswith(f"{folder}: being written by pid {proc.pid} on ")
        assert "\n" not in str(busy.value)
    finally:
        proc.kill()
        proc.wait()
    record = lock_path(folder).with_suffix(".lock.json")
    assert f'"pid": {proc.pid},' in record.read_text()  # the killed holder's record is left behind
    with artifact_lock(folder):  # the OS released the dead holder's lock
        with artifact_lock(folder):  # re-entrant within a process
            pass
        assert f'"pid": {os.getpid()},' in record.read_text()  # still ours: the inner exit kept it
    assert lock_path(folder).is_file() and not record.exists()  # a finished holder's record goes with it


def test_a_refused_writer_never_names_a_dead_holder_and_waits_for_the_live_ones_record(tmp_path: Path) -> None:
    import json
    import socket
    import threading

    from megacontext.lifecycle.locks import holder

    folder = tmp_path / "cycles" / "cycle-0002"
    folder.parent.mkdir(parents=True)
    record = lock_path(folder).with_suffix(".lock.json")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = {"pid": int(dead), "host": socket.gethostname(), "command": "old", "since": "then"}
    record.write_text(json.dumps(stale) + "\n")  # a killed holder's record, left behind
    start = time.perf_counter()
    assert holder(folder, settle=0.3) == "another process (no holder record)"
    assert time.perf_counter() - start >= 0.3
    live = {**stale, "pid": os.getpid(), "command": "megacontext train-cycle --cycle 2"}
    threading.Timer(0.3, lambda: record.write_text(json.dumps(live) + "\n")).start()  # the new holder, late
    assert holder(folder, settle=5.0).startswith(f"pid {live['pid']} on {socket.gethostname()} "
                                                 "(`megacontext train-cycle --cycle 2`")


def test_a_writer_refused_while_the_holder_finishes_takes_the_lock_instead_of_refusing(tmp_path: Path) -> None:
    folder = tmp_path / "champion"
    proc = hold(folder)
    lock_path(folder).with_suffix(".lock.json").unlink()  # the holder is finishing: its record is gone ...
    subprocess.Popen(["sh", "-c", f"sleep 0.5; kill {proc.pid}"])  # ... and its lock goes half a second later
    with artifact_lock(folder):  # no record turns up in 2 s; the second try finds the lock free
        assert f'"pid": {os.getpid()},' in lock_path(folder).with_suffix(".lock.json").read_text()
    proc.wait()


def test_a_waiting_writer_gets_the_lock_when_the_holder_finishes(tmp_path: Path) -> None:
    folder = tmp_path / "model-cache"
    proc = hold(folder)
    start = time.perf_counter()
    subprocess.Popen(["sh", "-c", f"sleep 1; kill {proc.pid}"])
    with artifact_lock(folder, wait=60):
        waited = time.perf_counter() - start
    proc.wait()
    assert waited >= 0.8


WRITERS = [  # (command line, the artifact folder it writes, relative to the artifact root)
    (["build-corpus"], "data/corpus"),
    (["build-shards"], "data/shards"),
    (["prepare-data"], "data/corpus"),
    (["build-trees"], "trees"),
    (["train-cycle", "--cycle", "1"], "cycles/cycle-0001"),
    (["train-phase", "--phase", "jt1", "--cycle", "1"], "cycles/cycle-0001"),
    (["promote", "--cycle", "1"], "champion"),
    (["evaluate"], "evaluation"),
    (["nightly"], "nightly"),
]


@pytest.mark.parametrize("argv, folder", WRITERS, ids=[" ".join(a) for a, _ in WRITERS])
def test_every_writing_command_refuses_while_another_process_writes_its_artifact(tmp_path: Path, capsys,
                                                                                  argv: list[str], folder: str) -> None:
    cfg = tiny_config(tmp_path)
    root = Path(cfg.paths.artifact_root)
    if argv[0] == "promote":  # promotion reads the cycle's verdict first: give it a passing one
        from megacontext.lifecycle.lineage import write_manifest

        report = root / "reports" / "cycle-0001"
        report.mkdir(parents=True)
        (root / "cycles" / "cycle-0001").mkdir(parents=True)
        write_manifest(root / "cycles" / "cycle-0001", kind="cycle", format_version=1, config_hash="c")
        write_manifest(report, kind="validation_report", format_version=1, config_hash="c",
                       inputs=[root / "cycles" / "cycle-0001"],
                       extra={"gate_passed": True})
    proc = hold(root / folder)
    try:
        code = main([*argv, "--profile", "tiny", f"paths.artifact_root={root}", f"paths.corpus_dir={tmp_path / 'data'}"])
        err = capsys.readouterr().err.strip()
    finally:
        proc.kill()
        proc.wait()
    assert code == 2, err
    assert f"being written by pid {proc.pid}" in err and len(err.splitlines()) == 1, err


def test_a_second_reference_build_waits_for_the_first_and_then_reuses(tmp_path: Path, capsys) -> None:
    from conftest import EVAL_ARGS

    cfg = tiny_config(tmp_path, *EVAL_ARGS)
    args = ["--profile", "tiny", f"paths.artifact_root={cfg.paths.artifact_root}",
            f"paths.corpus_dir={tmp_path / 'data'}", *EVAL_ARGS]
    assert main(["prepare-data", *args]) == 0
    proc = hold(Path(cfg.paths.artifact_root) / "eval_references")
    subprocess.Popen(["sh", "-c", f"sleep 2; kill {proc.pid}"])
    try:
        assert main(["eval-references", *args]) == 0
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err
    assert f"eval_references: waiting (up to 43,200 s) for pid {proc.pid}" in err
