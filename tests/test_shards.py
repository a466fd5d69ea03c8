from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from megacontext.config import Config
from megacontext.data.corpus import build_corpus
from megacontext.errors import ArtifactError
from megacontext.lifecycle.lineage import manifest_digest, read_manifest, write_manifest
from megacontext.data.schemas import SHARD_SCHEMA, SchemaViolation, validate
from megacontext.data.shards import build_shards, read_split, split_of
from tests.conftest import tiny_config


def _build(cfg: Config) -> Path:
    build_corpus(cfg)
    return build_shards(cfg)


def test_same_corpus_gives_byte_identical_shards_and_manifest_digests(tmp_path: Path) -> None:
    a = _build(tiny_config(tmp_path / "a", "data.max_documents=4"))
    b = _build(tiny_config(tmp_path / "b", "data.max_documents=4"))
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.name != "manifest.json")
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.name != "manifest.json")
    assert any(p.suffix == ".parquet" for p in files_a) and Path("lengths.png") in files_a
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert manifest_digest(read_manifest(a)) == manifest_digest(read_manifest(b))
    assert manifest_digest(read_manifest(a.parent / "corpus")) == manifest_digest(read_manifest(b.parent / "corpus"))


def test_shards_cover_the_corpus_and_summary_adds_up(tiny_cfg: Config) -> None:
    out = _build(tiny_cfg)
    summary = json.loads((out / "summary.json").read_text())
    docs = [d for split in ("train", "val", "test") for d in read_split(out, split)]
    assert summary["documents"] == len(docs) == 4
    assert summary["tokens"] == sum(len(d.tokens) for d in docs)
    assert sum(summary["length_histogram"].values()) == 4
    assert all(d.split == split_of(d.doc_id, 0.1, 0.1) for d in docs)
    assert "| **all** | 4 |" in (out / "summary.md").read_text()


def test_shard_size_limit_splits_into_several_files(tmp_path: Path) -> None:
    out = _build(tiny_config(tmp_path, "data.max_documents=6", "data.val_fraction=0", "data.test_fraction=0",
                             "data.shard_max_tokens=30000"))
    train = sorted(out.glob("train-*.parquet"))
    assert len(train) >= 3
    for path in train:
        rows = pq.read_table(path).column("n_tokens").to_pylist()
        assert sum(rows) <= 30_000 or len(rows) == 1


def test_split_is_a_pure_function_of_the_document_hash() -> None:
    ids = [f"{i:016x}" for i in range(0, 2**64, 2**58)]
    splits = [split_of(i, 0.1, 0.1) for i in ids]
    assert splits[0] == "val" and splits[-1] == "train"
    assert splits == [split_of(i, 0.1, 0.1) for i in reversed(ids)][::-1]
    fractions = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert fractions == pytest.approx({"train": 0.8, "val": 0.1, "test": 0.1}, abs=0.05)


def test_schema_rejects_a_bad_row_and_shows_it() -> None:
    good = pl.DataFrame({
        "doc_id": ["0123456789abcdef"], "source": ["x.txt"], "split": ["train"],
        "n_tokens": pl.Series([3], dtype=pl.Int64), "tokens": pl.Series([[1, 2, 3]], dtype=pl.List(pl.UInt32)),
    })
    validate(good, SHARD_SCHEMA, where="good")
    bad = good.with_columns(pl.lit(4, dtype=pl.Int64).alias("n_tokens"))
    with pytest.raises(SchemaViolation, match=r"bad: violates schema 'dataset_shard'.*tokens_length_equals_n_tokens.*'n_tokens': 4"):
        validate(bad, SHARD_SCHEMA, where="bad")
    with pytest.raises(SchemaViolation, match="isin"):
        validate(good.with_columns(pl.lit("holdout").alias("split")), SHARD_SCHEMA, where="split")


def test_reading_a_tampered_shard_fails_with_the_row(tiny_cfg: Config) -> None:
    out = _build(tiny_cfg)
    path = sorted(out.glob("train-*.parquet"))[0]
    df = pl.read_parquet(path)
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("bogus")).otherwise(pl.col("split")).alias("split"))
    df.write_parquet(path)
    with pytest.raises(ArtifactError, match=r"train-00000\.parquet: content differs from the manifest"):
        read_split(out, "train")  # changed after the build: caught by the digest before the schema
    manifest = read_manifest(out)  # a build that wrote the bad row itself: the digests agree, the schema does not
    write_manifest(out, kind=manifest["kind"], format_version=manifest["format_version"],
                   config_hash=manifest["config_hash"], extra={"tokenizer": manifest["tokenizer"]})
    with pytest.raises(SchemaViolation, match=r"train-00000\.parquet: violates schema.*bogus"):
        read_split(out, "train")


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_flipped_byte_in_a_shard_is_one_line_naming_it_and_the_advice_repairs_it(tmp_path: Path, split: str) -> None:
    cfg = tiny_config(tmp_path, "data.max_documents=6", "data.val_fraction=0.5", "data.test_fraction=0")
    out = _build(cfg)
    path = sorted(out.glob(f"{split}-*.parquet"))[0]
    pristine = path.read_bytes()
    data = bytearray(pristine)
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as error:
        read_split(out, split)
    message = str(error.value)
    assert message.startswith(f"{path}: content differs from the manifest") and "\n" not in message
    assert message.endswith("rebuild it with `megacontext build-shards --force` (and the --profile that built it)")
    build_shards(cfg, force=True)  # the advice
    assert path.read_bytes() == pristine and read_split(out, split)


def test_a_flipped_byte_in_the_corpus_stops_the_shard_build_naming_it_and_the_advice_repairs_it(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "data.max_documents=4")
    out = _build(cfg)
    corpus = out.parent / "corpus"
    path = next(p for p in corpus.iterdir() if p.suffix == ".parquet")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as error:
        build_shards(cfg, force=True)
    message = str(error.value)
    assert message.startswith(f"{path}: content differs from the manifest") and "\n" not in message
    assert message.endswith("rebuild it with `megacontext build-corpus --force` (and the --profile that built it)")
    assert read_split(out, "train")  # the shards built before are untouched
    build_corpus(cfg, force=True)  # the advice
    assert build_shards(cfg, force=True) == out and read_split(out, "train")


def test_shards_of_another_tokenizer_are_refused(tiny_cfg: Config) -> None:
    out = _build(tiny_cfg)
    with pytest.raises(ArtifactError, match=r"tokenized with bytes-v1, but the model uses hf:"):
        read_split(out, "train", tokenizer_name="hf:0123")


def test_rebuild_reuses_unless_forced_or_config_changes(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "data.max_documents=3")
    out = _build(cfg)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert build_shards(cfg) == out and (out / "manifest.json").stat().st_mtime_ns == stamp
    build_shards(cfg, force=True)
    assert (out / "manifest.json").stat().st_mtime_ns != stamp
    changed = tiny_config(tmp_path, "data.max_documents=3", "data.max_doc_tokens=4096")
    build_shards(changed)
    assert max(d.tokens.size for d in read_split(out, "train")) <= 4096
