"""Corpus -> tokenized Parquet shards with a deterministic train/val/test split.

The split of a document is a pure function of its content hash, so adding or
removing other documents never moves it. Shards hold whole documents
(`tokens` as list<uint32>), are schema-checked before they are written, and are
byte-identical for the same corpus, config and tokenizer. A summary (documents,
tokens, length histogram) is written as JSON, Markdown and PNG.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from megacontext.model.base_model import load_tokenizer
from megacontext.config import Config, config_hash
from megacontext.data.corpus import build_corpus, corpus_dir, read_documents
from megacontext.errors import ArtifactError, InputDataError
from megacontext.lifecycle.locks import artifact_lock, locked
from megacontext.lifecycle.lineage import (is_reusable, manifest_digest, read_manifest, repair_advice, staged_artifact,
                                           running, verify_artifact, write_manifest)
from megacontext.progress import progress_bar
from megacontext.data.schemas import SHARD_SCHEMA, SPLITS, validate

KIND = "dataset_shards"
FORMAT_VERSION = 1
LENGTH_BINS = (0, 2_048, 8_192, 32_768)  # histogram edges in tokens; the last bin is open
ENCODE_BATCH = 8  # documents per tokenizer call (the Rust tokenizer parallelises inside one)


@dataclass(frozen=True)
class TokenizedDocument:
    doc_id: str
    source: str
    split: str
    tokens: np.ndarray  # [T] uint32


def shards_dir(cfg: Config) -> Path:
    return cfg.paths.data_dir() / "shards"


def split_of(doc_id: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from the document's content hash (a 64-bit uniform draw)."""
    u = int(doc_id, 16) / 16 ** len(doc_id)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


@locked(lambda cfg, **_: shards_dir(cfg))
def build_shards(cfg: Config, *, force: bool = False) -> Path:
    """Tokenize the corpus artifact into `<data_root>/shards`; reuse an intact, identical build."""
    source = corpus_dir(cfg)
    corpus_manifest = read_manifest(source)  # raises if the corpus was never built
    tokenizer = load_tokenizer(cfg)
    out = shards_dir(cfg)
    chash = config_hash(cfg, sections=["data"]) + ":" + tokenizer.name
    reusable = is_reusable(out, kind=KIND, format_version=FORMAT_VERSION, config_hash=chash)
    if not force and reusable and read_manifest(out)["inputs"][0]["digest"] == manifest_digest(corpus_manifest):
        return out
    table = read_documents(source)
    texts = table.column("text").to_pylist()
    ids = table.column("doc_id").to_pylist()
    sources = table.column("source").to_pylist()
    data = cfg.data
    rows: dict[str, list[TokenizedDocument]] = {split: [] for split in SPLITS}
    with progress_bar("tokenizing", total=len(texts), unit="docs") as advance:
        for start in range(0, len(texts), ENCODE_BATCH):
            batch = tokenizer.encode_batch(texts[start : start + ENCODE_BATCH])
            for offset, tokens in enumerate(batch):
                i = start + offset
                if len(tokens) < data.min_doc_tokens:
                    raise InputDataError(
                        f"{sources[i]}: only {len(tokens)} tokens, shorter than one block ({data.min_doc_tokens}); "
                        "make the document longer or remove it"
                    )
                tokens = tokens[: data.max_doc_tokens] if data.max_doc_tokens else tokens
                split = split_of(ids[i], data.val_fraction, data.test_fraction)
                rows[split].append(TokenizedDocument(ids[i], sources[i], split, np.asarray(tokens, dtype=np.uint32)))
            advance(len(batch))
    with staged_artifact(out) as staging:
        for split, docs in rows.items():
            for index, shard in enumerate(_pack_shards(docs, data.shard_max_tokens)):
                path = staging / f"{split}-{index:05d}.parquet"
                df = validate(_to_frame(shard), SHARD_SCHEMA, where=path.name)
                pq.write_table(df.to_arrow(), path, compression="zstd")
        summary = summarize(rows, tokenizer.name)
        write_summary(staging, summary)
        write_manifest(staging, kind=KIND, format_version=FORMAT_VERSION, config_hash=chash,
                       inputs=[source], extra={"tokenizer": tokenizer.name, "summary": summary})
    return out


def prepare_data(cfg: Config, *, force: bool = False) -> tuple[Path, Path]:
    """Corpus then shards, published all or nothing: returns (corpus folder, shards folder).

    If the shards cannot be built from the new corpus (e.g. a document shorter than one block),
    the previous corpus is put back, so the shards on disk always come from the corpus on disk.
    Holds both folders' write locks throughout.
    """
    corpus, shards = corpus_dir(cfg), shards_dir(cfg)
    with artifact_lock(corpus), artifact_lock(shards):
        _recover_prepare(corpus, shards)
        backup = corpus.parent / f".{corpus.name}.prepare-{os.getpid()}"
        shutil.rmtree(backup, ignore_errors=True)
        if corpus.exists():  # hard links: published files are never modified in place, only replaced
            shutil.copytree(corpus, backup, copy_function=os.link)
        try:
            build_corpus(cfg, force=force)
            return corpus, build_shards(cfg, force=force)
        except BaseException:
            if backup.exists():
                _put_back(backup, corpus)
            else:
                shutil.rmtree(corpus, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(backup, ignore_errors=True)


def _put_back(backup: Path, corpus: Path) -> None:
    """Replace `corpus` with its `backup` (renames only; the replaced copy is deleted last)."""
    failed = corpus.parent / f".{corpus.name}.failed-{os.getpid()}"
    if corpus.exists():
        os.replace(corpus, failed)
    os.replace(backup, corpus)
    shutil.rmtree(failed, ignore_errors=True)


def _recover_prepare(corpus: Path, shards: Path) -> None:
    """Finish what a killed `prepare_data` left: its backup of the old corpus is put back when the shards on
    disk were built from that old corpus (killed between the two publications), else dropped."""
    for backup in corpus.parent.glob(f".{corpus.name}.prepare-*"):
        pid = backup.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or running(int(pid)):
            continue
        try:
            built_from = read_manifest(shards)["inputs"][0]["digest"]
            restore = built_from == manifest_digest(read_manifest(backup)) != manifest_digest(read_manifest(corpus))
        except (ArtifactError, KeyError, IndexError):
            restore = False
        if restore:
            _put_back(backup, corpus)
        else:
            shutil.rmtree(backup, ignore_errors=True)


def read_split(folder: Path, split: str, tokenizer_name: str | None = None) -> list[TokenizedDocument]:
    """The documents of one split, schema-checked; refuses shards of another tokenizer.

    Every shard file is checked against the manifest (size, sha256) before it is read.
    Raises ArtifactError (one line naming the file and `megacontext build-shards --force`)
    when a file is missing, changed or corrupt.
    """
    manifest = verify_artifact(folder, kind=KIND, repair=repair_advice(folder))
    if tokenizer_name is not None and manifest["tokenizer"] != tokenizer_name:
        raise ArtifactError(
            f"{folder}: tokenized with {manifest['tokenizer']}, but the model uses {tokenizer_name}; "
            "rebuild the shards with this profile (megacontext build-shards)"
        )
    docs = []
    for path in sorted(Path(folder).glob(f"{split}-*.parquet")):
        df = validate(pl.read_parquet(path), SHARD_SCHEMA, where=str(path))
        tokens = df["tokens"].rechunk().to_arrow()  # large_list<uint32>: one flat buffer + offsets
        values, offsets = tokens.values.to_numpy(), tokens.offsets.to_numpy()
        for i, (doc_id, source, split_name) in enumerate(df.select("doc_id", "source", "split").iter_rows()):
            docs.append(TokenizedDocument(doc_id, source, split_name, values[offsets[i] : offsets[i + 1]].copy()))
    return docs


def summarize(rows: dict[str, list[TokenizedDocument]], tokenizer_name: str) -> dict:
    lengths = [len(d.tokens) for docs in rows.values() for d in docs]
    edges = list(LENGTH_BINS) + [None]
    labels = [f"{lo:,}-{hi:,}" if hi else f">={lo:,}" for lo, hi in zip(edges[:-1], edges[1:])]
    counts = [sum(1 for n in lengths if n >= lo and (hi is None or n < hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    return {
        "tokenizer": tokenizer_name,
        "documents": len(lengths),
        "tokens": int(sum(lengths)),
        "splits": {s: {"documents": len(d), "tokens": int(sum(len(x.tokens) for x in d))} for s, d in rows.items()},
        "length_histogram": dict(zip(labels, counts)),
        "max_doc_tokens": max(lengths, default=0),
        "median_doc_tokens": int(np.median(lengths)) if lengths else 0,
    }


def write_summary(folder: Path, summary: dict) -> None:
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| split | documents | tokens |", "|---|---:|---:|"]
    lines += [f"| {s} | {v['documents']:,} | {v['tokens']:,} |" for s, v in summary["splits"].items()]
    lines += [f"| **all** | {summary['documents']:,} | {summary['tokens']:,} |", "",
              "| document length (tokens) | documents |", "|---|---:|"]
    lines += [f"| {label} | {count:,} |" for label, count in summary["length_histogram"].items()]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    _plot_histogram(folder / "lengths.png", summary)


def _plot_histogram(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    labels, counts = zip(*summary["length_histogram"].items())
    ax.bar(labels, counts, color="#4878a8")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title(f"{summary['documents']:,} documents, {summary['tokens']:,} tokens")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: the PNG is byte-stable
    plt.close(fig)


def _pack_shards(docs: list[TokenizedDocument], max_tokens: int) -> list[list[TokenizedDocument]]:
    """Consecutive documents grouped into shards of at most `max_tokens` (one oversize doc = one shard)."""
    shards: list[list[TokenizedDocument]] = []
    size = 0
    for doc in docs:
        if not shards or size + len(doc.tokens) > max_tokens:
            shards.append([])
            size = 0
        shards[-1].append(doc)
        size += len(doc.tokens)
    return shards


def _to_frame(docs: list[TokenizedDocument]) -> pl.DataFrame:
    offsets = np.concatenate([[0], np.cumsum([len(d.tokens) for d in docs])]).astype(np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate([d.tokens for d in docs]), pa.uint32()))
    return pl.DataFrame(
        {
            "doc_id": [d.doc_id for d in docs],
            "source": [d.source for d in docs],
            "split": [d.split for d in docs],
            "n_tokens": pl.Series([len(d.tokens) for d in docs], dtype=pl.Int64),
            "tokens": pl.from_arrow(tokens),
        }
    )
