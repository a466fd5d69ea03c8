from __future__ import annotations

from pathlib import Path

import pytest

from megacontext.errors import ArtifactError
from megacontext.lifecycle.lineage import (
    is_reusable,
    manifest_digest,
    read_manifest,
    staged_artifact,
    verify_files,
    write_manifest,
)


def _publish(final: Path, content: str, inputs=()) -> dict:
    with staged_artifact(final) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "a.txt").write_text(content)
        write_manifest(staging, kind="demo", format_version=1, config_hash="c0", inputs=inputs)
    return read_manifest(final)


def test_published_artifact_lists_every_file_with_its_hash(tmp_path: Path) -> None:
    manifest = _publish(tmp_path / "art", "hello")
    assert list(manifest["files"]) == ["sub/a.txt"]
    assert manifest["files"]["sub/a.txt"]["bytes"] == 5
    assert verify_files(tmp_path / "art") == []
    assert not list(tmp_path.glob(".art*"))  # no staging or old folders left behind


def test_a_modified_byte_is_detected(tmp_path: Path) -> None:
    _publish(tmp_path / "art", "hello")
    path = tmp_path / "art" / "sub" / "a.txt"
    path.write_bytes(b"hellp")
    assert verify_files(tmp_path / "art") == [f"{path}: content differs from the manifest (modified or corrupt)"]
    assert not is_reusable(tmp_path / "art", kind="demo", format_version=1, config_hash="c0")


def test_missing_and_unlisted_files_are_reported(tmp_path: Path) -> None:
    _publish(tmp_path / "art", "hello")
    (tmp_path / "art" / "sub" / "a.txt").unlink()
    (tmp_path / "art" / "extra.bin").write_bytes(b"x")
    problems = verify_files(tmp_path / "art")
    assert any("a.txt: missing" in p for p in problems) and any("extra.bin: not in the manifest" in p for p in problems)


def test_failed_build_leaves_the_previous_artifact_untouched(tmp_path: Path) -> None:
    _publish(tmp_path / "art", "version one")
    with pytest.raises(RuntimeError):
        with staged_artifact(tmp_path / "art") as staging:
            (staging / "sub").mkdir()
            (staging / "sub" / "a.txt").write_text("half-written")
            raise RuntimeError("killed mid-build")
    assert (tmp_path / "art" / "sub" / "a.txt").read_text() == "version one"
    assert verify_files(tmp_path / "art") == []
    assert not list(tmp_path.glob(".art*"))


def test_build_without_manifest_is_never_published(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no manifest.json"):
        with staged_artifact(tmp_path / "art") as staging:
            (staging / "x").write_text("x")
    assert not (tmp_path / "art").exists()


def test_digest_ignores_run_fields_and_inputs_are_relative(tmp_path: Path) -> None:
    parent = _publish(tmp_path / "root" / "parent", "p")
    child = _publish(tmp_path / "root" / "child", "c", inputs=[tmp_path / "root" / "parent"])
    assert child["inputs"] == [{"path": "../parent", "kind": "demo", "digest": manifest_digest(parent)}]
    again = dict(child, created_at="1999-01-01T00:00:00Z", git={"commit": "x", "dirty": True})
    assert manifest_digest(again) == manifest_digest(child)
    assert manifest_digest(dict(child, config_hash="other")) != manifest_digest(child)


def test_corrupt_manifest_is_a_clear_error(tmp_path: Path) -> None:
    _publish(tmp_path / "art", "x")
    (tmp_path / "art" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        read_manifest(tmp_path / "art")
    assert not is_reusable(tmp_path / "art", kind="demo", format_version=1, config_hash="c0")


def test_a_nested_artifact_is_its_own_artifact_and_may_be_published_later(tmp_path: Path) -> None:
    parent = tmp_path / "cycle"
    _publish(parent, "weights")
    _publish(parent / "evaluation", "report")  # published after the parent, with its own manifest
    (parent / "loose.txt").write_text("x")  # an unlisted file directly in the parent still counts
    assert "evaluation/sub/a.txt" not in read_manifest(parent)["files"]
    assert verify_files(parent) == [f"{parent / 'loose.txt'}: not in the manifest"]
    assert verify_files(parent / "evaluation") == []
    (parent / "evaluation" / "sub" / "a.txt").write_text("tampered")
    assert verify_files(parent / "evaluation") != [] and verify_files(parent) == [f"{parent / 'loose.txt'}: not in the manifest"]


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_staging_folders_left_by_a_killed_process_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    import os

    from megacontext.lifecycle.lineage import sweep_leftovers

    dead = [tmp_path / f".corpus.staging-{_dead_pid()}", tmp_path / f".shards.old-{_dead_pid()}",
            tmp_path / f".corpus.failed-{_dead_pid()}"]
    live = tmp_path / f".shards.staging-{os.getppid()}"  # the test runner's parent: running
    unrelated = tmp_path / ".notes.staging-abc"
    for folder in (*dead, live, unrelated):
        folder.mkdir()
        (folder / "half-written.bin").write_bytes(b"x")
    with staged_artifact(tmp_path / "trees") as staging:  # any publication in the folder sweeps it
        write_manifest(staging, kind="t", format_version=1, config_hash="c")
    assert not any(d.exists() for d in dead) and live.is_dir() and unrelated.is_dir()
    assert sweep_leftovers(tmp_path) == [] and sweep_leftovers(tmp_path / "absent") == []
    # killed between moving `shards` aside and publishing its successor: the old version is put back
    assert (tmp_path / "shards" / "half-written.bin").is_file()
    stale_old = tmp_path / f".trees.old-{_dead_pid()}"  # `trees` is in place: this copy is just garbage
    stale_old.mkdir()
    assert sweep_leftovers(tmp_path) == [stale_old] and not stale_old.exists()


def test_taking_an_artifacts_lock_sweeps_only_that_artifacts_dead_leftovers(tmp_path: Path) -> None:
    import os

    from megacontext.lifecycle.locks import artifact_lock

    mine = tmp_path / f".champion.staging-{_dead_pid()}"
    sibling = tmp_path / f".corpus.staging-{_dead_pid()}"  # another artifact's: its own writer sweeps it
    live = tmp_path / f".champion.staging-{os.getppid()}"
    for folder in (mine, sibling, live):
        folder.mkdir()
    with artifact_lock(tmp_path / "champion"):
        assert not mine.exists() and sibling.is_dir() and live.is_dir()
