"""`megacontext audit`: lineage walked back to the corpus; tampering and missing parents are found and named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megacontext.lifecycle.audit import audit
from megacontext.cli import main
from megacontext.errors import ArtifactError
from megacontext.lifecycle.lineage import staged_artifact, write_manifest


def _artifact(final: Path, kind: str, content: bytes, inputs=()) -> Path:
    with staged_artifact(final) as staging:
        (staging / f"{kind}.bin").write_bytes(content)
        write_manifest(staging, kind=kind, format_version=1, config_hash="c", inputs=inputs)
    return final


@pytest.fixture
def chain(tmp_path: Path) -> dict[str, Path]:
    corpus = _artifact(tmp_path / "data" / "corpus", "corpus", b"documents")
    shards = _artifact(tmp_path / "data" / "shards", "dataset_shards", b"tokens", [corpus])
    cycle = _artifact(tmp_path / "cycles" / "cycle-0001", "cycle", b"config", [shards])
    gistnet = _artifact(cycle / "jt1" / "final", "gistnet", bytes(range(64)), [shards])
    return {"corpus": corpus, "shards": shards, "cycle": cycle, "gistnet": gistnet}


def test_an_intact_chain_verifies_back_to_the_corpus(chain) -> None:
    result = audit(chain["cycle"])
    kinds = [n.kind for n in result.walk() if not n.seen_before]
    assert result.ok and kinds == ["cycle", "dataset_shards", "corpus", "gistnet"]
    assert main(["audit", str(chain["cycle"])]) == 0


def test_one_modified_byte_of_a_checkpoint_is_found_and_named(chain, capsys) -> None:
    weights = chain["gistnet"] / "gistnet.bin"
    data = bytearray(weights.read_bytes())
    data[10] ^= 1
    weights.write_bytes(bytes(data))
    result = audit(chain["cycle"])
    [bad] = [n for n in result.walk() if n.problems]
    assert not result.ok and bad.kind == "gistnet" and str(weights) in bad.problems[0]
    assert main(["audit", str(chain["gistnet"] / "gistnet.bin")]) == 1  # a file inside audits its artifact
    assert "content differs from the manifest" in capsys.readouterr().out


def test_a_modified_parent_file_is_found_at_the_parent(chain) -> None:
    (chain["corpus"] / "corpus.bin").write_bytes(b"documentz")
    bad = [n for n in audit(chain["cycle"]).walk() if n.problems]
    assert {n.kind for n in bad} == {"corpus"}


def test_a_replaced_parent_is_a_digest_mismatch(chain) -> None:
    _artifact(chain["shards"], "dataset_shards", b"other tokens", [chain["corpus"]])  # rebuilt after the cycle
    bad = [n for n in audit(chain["cycle"]).walk() if n.problems]
    assert bad and all(n.kind == "dataset_shards" for n in bad)
    assert "changed after cycle-0001 was built from it" in bad[0].problems[0]


def test_a_deleted_parent_is_a_missing_parent(chain, capsys) -> None:
    import shutil

    shutil.rmtree(chain["corpus"])
    bad = [n for n in audit(chain["gistnet"]).walk() if n.problems]
    assert [n.kind for n in bad] == ["corpus"] and bad[0].problems[0].startswith("missing parent")
    assert main(["audit", "--json", str(chain["gistnet"])]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_a_path_outside_any_artifact_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "loose").mkdir()
    with pytest.raises(ArtifactError, match="not part of an artifact"):
        audit(tmp_path / "loose")
    assert main(["audit", str(tmp_path / "loose")]) == 2
    err = capsys.readouterr().err
    assert "not part of an artifact" in err and len(err.strip().splitlines()) == 1


def test_two_runs_mixed_in_one_cycle_are_found_even_when_every_digest_agrees(tmp_path: Path) -> None:
    def sealed(final: Path, kind: str, config: str, inputs=()) -> Path:
        with staged_artifact(final) as staging:
            (staging / f"{kind}.bin").write_bytes(kind.encode())
            write_manifest(staging, kind=kind, format_version=1, config_hash=config, inputs=inputs,
                           extra={"cycle": 1})
        return final

    cycle = tmp_path / "cycles" / "cycle-0001"
    gistnet = sealed(cycle / "jt1" / "final", "gistnet", "seed-0")
    lensnet = sealed(cycle / "jt2" / "final", "lensnet", "seed-7", [gistnet])  # a second run, other seed
    result = audit(lensnet)
    problems = [p for n in result.walk() for p in n.problems]
    assert not result.ok and len(problems) == 1
    assert problems[0].startswith(f"{gistnet.resolve()}: built with config seed-0, but this lensnet of the same cycle")
    assert "two runs with different settings wrote this cycle" in problems[0]
    consistent = sealed(cycle / "jt2" / "final", "lensnet", "seed-0", [gistnet])
    assert audit(consistent).ok
