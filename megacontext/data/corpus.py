"""Raw corpus -> the `corpus` artifact (one row per document, untokenized).

Two sources: the user's files in the corpus folder (`data/`: .txt .md .py, .jsonl
with a text field, .parquet with a text column), or, when that folder is empty,
the running interpreter's standard-library sources packed into long documents
(files in path order, concatenated up to `doc_target_chars`) so many documents
exceed 8k tokens and most exceed 32k. User files are checked strictly: each bad
file stops the build with one line naming it and the fix; nothing already
built is touched. Tokenization and splitting are `shards`' job.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from megacontext.config import Config, DataConfig, config_hash
from megacontext.errors import InputDataError
from megacontext.lifecycle.locks import locked
from megacontext.lifecycle.lineage import (is_reusable, read_manifest, repair_advice, sha256_file, staged_artifact,
                                           verify_artifact, write_manifest)

KIND = "corpus"
FORMAT_VERSION = 1
DOCUMENTS_FILE = "documents.parquet"
TEXT_SUFFIXES = {".txt", ".md", ".py"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}
# Tests are excluded (not long real documents), and so are generated lookup tables
# (codec maps, pydoc topic strings) that any short context predicts perfectly.
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data"}


@dataclass(frozen=True)
class Document:
    source: str  # file (or file:line / file#row) it came from
    text: str

    @property
    def doc_id(self) -> str:
        return document_id(self.text)


def document_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def corpus_dir(cfg: Config) -> Path:
    return cfg.paths.data_dir() / "corpus"


@locked(lambda cfg, **_: corpus_dir(cfg))
def build_corpus(cfg: Config, *, force: bool = False) -> Path:
    """Collect the documents into `<data_root>/corpus`; reuse an intact, identical build."""
    source_kind, root, files = _select_source(cfg)
    raw_inputs = {_display(path, root, source_kind): {"sha256": sha256_file(path), "bytes": path.stat().st_size} for path in files}
    out = corpus_dir(cfg)
    chash = config_hash(cfg, sections=["data"])
    if not force and is_reusable(out, kind=KIND, format_version=FORMAT_VERSION, config_hash=chash):
        if read_manifest(out)["raw_inputs"] == dict(sorted(raw_inputs.items())):
            return out
    if source_kind == "stdlib":
        documents = pack_files(files, root, cfg.data.doc_target_chars)
    else:
        documents = [doc for path in files for doc in read_user_file(path, root, cfg.data)]
    documents = _deduplicate(documents)[: cfg.data.max_documents]
    with staged_artifact(out) as staging:
        table = pa.table(
            {
                "doc_id": pa.array([d.doc_id for d in documents], pa.string()),
                "source": pa.array([d.source for d in documents], pa.string()),
                "text": pa.array([d.text for d in documents], pa.large_string()),
            }
        )
        pq.write_table(table, staging / DOCUMENTS_FILE, compression="zstd")
        stats = {"source": source_kind, "documents": len(documents), "chars": sum(len(d.text) for d in documents)}
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        write_manifest(staging, kind=KIND, format_version=FORMAT_VERSION, config_hash=chash,
                       raw_inputs=raw_inputs, extra={"stats": stats})
    return out


def read_documents(folder: Path) -> pa.Table:
    """The corpus table (doc_id, source, text), after checking its files against the manifest.

    Raises ArtifactError (one line naming the file and `megacontext build-corpus --force`) when
    the corpus was never built or a file differs from its manifest.
    """
    verify_artifact(folder, kind=KIND, repair=repair_advice(folder))
    return pq.read_table(Path(folder) / DOCUMENTS_FILE)


def _select_source(cfg: Config) -> tuple[str, Path, list[Path]]:
    folder = Path(cfg.paths.corpus_dir)
    user_files = list_user_files(folder) if folder.is_dir() else []
    source = cfg.data.source
    if source == "auto":
        source = "folder" if user_files else "stdlib"
    if source == "stdlib":
        if user_files and cfg.data.source == "stdlib":  # pinned by the profile: say so rather than ignore data/
            print(f"note: profile {cfg.profile!r} pins data.source=stdlib, so the {len(user_files):,} file(s) in "
                  f"{folder}/ are not used; add data.source=folder (or auto) to train on them", file=sys.stderr)
        root = stdlib_root()
        return "stdlib", root, stdlib_files(root)
    if not folder.is_dir():
        raise InputDataError(f"{folder}/: corpus folder does not exist; create it and add text files, or set data.source=stdlib")
    if not user_files:
        raise InputDataError(
            f"{folder}/: no usable text files (supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}); "
            "add some, or empty the folder to use the standard-library corpus"
        )
    return "folder", folder, user_files


def list_user_files(folder: Path) -> list[Path]:
    """Every non-hidden file below `folder`, in path order (DVC's *.dvc files excluded)."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts) and p.suffix != ".dvc"
    )


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*.py")
        if not STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts) and p.stat().st_size > 0
    )


def pack_files(files: list[Path], root: Path, target_chars: int) -> list[Document]:
    """Concatenate files (in path order) into documents of at least `target_chars`.

    Each file is preceded by a `# ---- file: <path> ----` line. A trailing
    remainder shorter than the target joins the previous document.
    """
    documents: list[list[str]] = []
    current: list[str] = []
    size = 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        current.append(f"# ---- file: {path.relative_to(root).as_posix()} ----\n{text}\n")
        size += len(current[-1])
        if size >= target_chars:
            documents.append(current)
            current, size = [], 0
    if current:
        if documents:
            documents[-1].extend(current)
        else:
            documents.append(current)
    return [Document(source=_pack_source(parts), text="".join(parts)) for parts in documents]


def _pack_source(parts: list[str]) -> str:
    first, last = (p.split(" ----\n", 1)[0].removeprefix("# ---- file: ") for p in (parts[0], parts[-1]))
    return f"stdlib:{first}" if first == last else f"stdlib:{first}..{last}"


def read_user_file(path: Path, root: Path, data: DataConfig) -> list[Document]:
    """The documents in one user file; any problem raises `InputDataError` naming the file."""
    name = _display(path, root, "folder")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise InputDataError(
            f"{name}: unsupported file type '{path.suffix or '(none)'}' (supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}); "
            "remove it or convert it to text"
        )
    if path.stat().st_size == 0:
        raise InputDataError(f"{name}: file is empty; add text to it or remove it")
    if suffix == ".parquet":
        return _read_parquet(path, name, data.text_field)
    text = _decode(path, name)
    if suffix == ".jsonl":
        return _read_jsonl(text, name, data.text_field)
    if not text.strip():
        raise InputDataError(f"{name}: file holds only whitespace; add text to it or remove it")
    return [Document(source=name, text=text)]


def _decode(path: Path, name: str) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise InputDataError(f"{name}: looks binary (NUL bytes); remove it or replace it with a text export")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputDataError(
            f"{name}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            f"convert it, e.g. `iconv -f latin1 -t utf-8`, or remove it"
        ) from None


def _read_jsonl(text: str, name: str, field: str) -> list[Document]:
    documents = []
    # JSON Lines records end at "\n" only: str.splitlines() would also split inside a string at U+2028,
    # U+2029, U+0085 or a form feed, which JSON allows unescaped.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputDataError(f"{name}:{lineno}: not valid JSON ({exc.msg}); fix or remove the line") from None
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise InputDataError(f"{name}:{lineno}: no non-empty string field '{field}'; fix the record or set data.text_field")
        documents.append(Document(source=f"{name}:{lineno}", text=value))
    if not documents:
        raise InputDataError(f"{name}: no records; add JSON lines with a '{field}' field or remove the file")
    return documents


def _read_parquet(path: Path, name: str, column: str) -> list[Document]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputDataError(f"{name}: not a readable Parquet file ({exc}); re-export it or remove it") from None
    if column not in table.column_names:
        raise InputDataError(f"{name}: no column '{column}' (has: {', '.join(table.column_names)}); set data.text_field")
    documents = []
    for row, value in enumerate(table.column(column).to_pylist()):
        if not isinstance(value, str) or not value.strip():
            raise InputDataError(f"{name}#row{row}: column '{column}' is empty or not text; fix the row or remove it")
        documents.append(Document(source=f"{name}#row{row}", text=value))
    if not documents:
        raise InputDataError(f"{name}: no rows; remove the file")
    return documents


def _deduplicate(documents: list[Document]) -> list[Document]:
    seen: set[str] = set()
    unique = []
    for doc in documents:
        if doc.doc_id not in seen:
            seen.add(doc.doc_id)
            unique.append(doc)
    return unique


def _display(path: Path, root: Path, source_kind: str) -> str:
    rel = path.relative_to(root).as_posix()
    return f"stdlib:{rel}" if source_kind == "stdlib" else f"{root.as_posix().rstrip('/')}/{rel}"
