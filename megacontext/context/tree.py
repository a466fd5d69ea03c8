"""MegaContext Tree (docs/architecture.md §2.2): one document's append-only, memory-mapped store of
LOD0 token ids and LOD1..LODk gists, with crash-safe incremental ingest and refresh.

`meta.json` is the commit point: level files only grow past their committed end, then
meta (counts + running CRC32s) is atomically replaced. Gists come from a `GistEncoder`;
this module imports no torch or model, and it does not decide what is in focus.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from megacontext.errors import ArtifactError
from megacontext.lifecycle.lineage import repair_advice
from megacontext.context.nodes import BLOCK, Node, complete_count

FORMAT_VERSION = 1
MAGIC = b"MCTREE"
META = "meta.json"
# magic, format version, level, dtype code, block size, d (1 for tokens), base-model id (UTF-8, NUL-padded)
HEADER = struct.Struct("<6sHBBII128s")
HEADER_BYTES = 256  # the header padded so every array starts at the same aligned offset
STORAGE = {"uint32": (1, np.uint32), "float16": (2, np.float16), "bfloat16": (3, np.uint16), "float32": (4, np.float32)}
GIST_DTYPES = ("float16", "bfloat16", "float32")
READ_CHUNK = 1 << 22  # bytes per read when recomputing a CRC
META_FIELDS = {"base_model_id", "encoder_identity", "gist_version", "gist_dtype", "d", "levels", "files", "counts",
               "crc32", "access_counts"}


class GistEncoder(Protocol):
    """Makes gists from numpy arrays; the tree records `identity` and refuses to mix encoders."""

    identity: str  # e.g. GistNet checkpoint hash
    d: int  # gist width (the base model's embedding dim)

    def encode_tokens(self, blocks: np.ndarray) -> np.ndarray: ...  # [N, 32] uint32 -> [N, d] float32 LOD1

    def encode_gists(self, blocks: np.ndarray, level: int) -> np.ndarray: ...  # [N, 32, d] LOD(k-1) -> [N, d] LODk


def level_file(level: int) -> str:
    return f"lod{level}.bin"


def to_storage(x: np.ndarray, gist_dtype: str) -> np.ndarray:
    """float32 gists -> the stored dtype (bfloat16 as uint16, rounded to nearest even)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if gist_dtype == "bfloat16":
        bits = x.view(np.uint32).astype(np.uint64)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return x.astype(STORAGE[gist_dtype][1])


def from_storage(x: np.ndarray, gist_dtype: str) -> np.ndarray:
    """Stored gists -> a float32 copy (never a view into the memory map)."""
    if gist_dtype == "bfloat16":
        return (np.asarray(x).astype(np.uint32) << 16).view(np.float32)
    return np.array(x, dtype=np.float32)


def _header(level: int, dtype: str, d: int, base_model_id: str) -> bytes:
    packed = HEADER.pack(MAGIC, FORMAT_VERSION, level, STORAGE[dtype][0], BLOCK, d, base_model_id.encode()[:128])
    return packed.ljust(HEADER_BYTES, b"\0")


def _write_new(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / META
    if not file.is_file():
        raise ArtifactError(f"{path}: no {META}, not a complete MegaContext tree; {repair_advice(path)}")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{file}: corrupt ({exc}); {repair_advice(path)}") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise ArtifactError(f"{file}: tree format version {found}, expected {FORMAT_VERSION}; {repair_advice(path)}")
    missing = sorted(META_FIELDS - meta.keys())
    if missing:
        raise ArtifactError(f"{file}: missing fields {missing}; {repair_advice(path)}")
    return meta


def _as_token_ids(tokens: Any) -> np.ndarray:
    ids = np.asarray(tokens)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ValueError(f"tokens must be a 1-D array of integer ids, got {ids.dtype} of shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.uint32).max):
        raise ValueError("token ids must lie in [0, 2**32)")
    return ids.astype(np.uint32)


class MegaContextTree:
    """An open tree folder. Reads are memory-mapped; writes go through `append` and `refresh`."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path, self.meta = Path(path), meta
        self._access = list(meta["access_counts"])
        self._views: dict[int, np.ndarray] = {}

    # ---- create / open -------------------------------------------------------------
    @classmethod
    def create(cls, path: Path | str, *, base_model_id: str, encoder: GistEncoder, levels: int = 2,
               gist_dtype: str = "float16") -> "MegaContextTree":
        """An empty tree at `path` (a new or empty folder) for gists of `encoder`."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ArtifactError(f"{path}: already exists and is not an empty folder; a new tree needs a fresh path")
        if gist_dtype not in GIST_DTYPES or levels < 1:
            raise ValueError(f"gist_dtype must be one of {GIST_DTYPES} and levels >= 1, got {gist_dtype!r}, {levels}")
        path.mkdir(parents=True, exist_ok=True)
        for level in range(levels + 1):
            dtype, d = ("uint32", 1) if level == 0 else (gist_dtype, encoder.d)
            _write_new(path / level_file(level), _header(level, dtype, d, base_model_id))
        n = levels + 1
        meta = {"format_version": FORMAT_VERSION, "base_model_id": base_model_id, "encoder_identity": encoder.identity,
                "gist_version": 1, "gist_dtype": gist_dtype, "d": int(encoder.d), "levels": levels, "block": BLOCK,
                "files": [level_file(k) for k in range(n)], "counts": [0] * n, "crc32": [0] * n,
                "access_counts": [0] * n, "created_at": _now(), "modified_at": _now()}
        tree = cls(path, meta)
        tree._commit(meta)
        return tree

    @classmethod
    def open(cls, path: Path | str, *, base_model_id: str | None = None, encoder_identity: str | None = None,
             verify: bool = True) -> "MegaContextTree":
        """Open a committed tree; refuses foreign, truncated or (with `verify`) corrupt ones."""
        path = Path(path)
        meta = _read_meta(path)
        tree, built_with = cls(path, meta), (meta["base_model_id"], meta["encoder_identity"])
        if base_model_id is not None and built_with[0] != base_model_id:
            raise ArtifactError(f"tree at {path} was built with base model {built_with[0]}, not {base_model_id}; {repair_advice(path)}")
        if encoder_identity is not None and built_with[1] != encoder_identity:
            raise ArtifactError(f"tree at {path} holds gists of encoder {built_with[1]}, not {encoder_identity}; "
                                f"{repair_advice(path)} (or refresh it)")
        tree.check_invariants()
        if verify:
            tree.verify()
        return tree

    # ---- reads -----------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return self.meta["counts"][0]

    @property
    def levels(self) -> int:
        return self.meta["levels"]

    @property
    def d(self) -> int:
        return self.meta["d"]

    @property
    def gist_dtype(self) -> str:
        return self.meta["gist_dtype"]

    @property
    def base_model_id(self) -> str:
        return self.meta["base_model_id"]

    @property
    def encoder_identity(self) -> str:
        return self.meta["encoder_identity"]

    @property
    def gist_version(self) -> int:
        return self.meta["gist_version"]

    @property
    def access_counts(self) -> list[int]:
        return list(self._access)

    def count(self, level: int) -> int:
        return self.meta["counts"][level]

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Token ids [start, end) as a uint32 copy."""
        self._check_range(0, start, end)
        return np.array(self._view(0)[start:end])

    def gists(self, level: int, start_index: int, end_index: int) -> np.ndarray:
        """Level-`level` gists [start_index, end_index) as float32 [n, d]."""
        if not 1 <= level <= self.levels:
            raise ValueError(f"gist level must be in 1..{self.levels}, got {level}")
        self._check_range(level, start_index, end_index)
        return from_storage(self._view(level)[start_index:end_index], self.gist_dtype)

    def gist(self, node: Node) -> np.ndarray:
        return self.gists(node.level, node.index, node.index + 1)[0]

    def touch(self, node: Node) -> None:
        """Count an access to `node`'s level (in memory; persisted at the next commit or `flush`)."""
        self._access[node.level] += 1

    def flush(self) -> None:
        """Persist the access counts now."""
        self._commit(dict(self.meta))

    def close(self) -> None:
        self._views.clear()

    def __enter__(self) -> "MegaContextTree":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- checks ----------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Counts agree across levels and with the files; headers match meta. Raises ArtifactError."""
        meta, n = self.meta, self.levels + 1
        if any(len(meta[key]) != n for key in ("files", "counts", "crc32", "access_counts")):
            raise ArtifactError(f"{self.path / META}: per-level lists do not have {n} entries; {repair_advice(self.path)}")
        for level in range(1, n):
            if self.count(level) != complete_count(self.n_tokens, level):
                raise ArtifactError(f"{self.path / META}: {self.count(level)} LOD{level} gists over {self.n_tokens} "
                                    f"tokens, expected {complete_count(self.n_tokens, level)}; {repair_advice(self.path)}")
        for level in range(n):
            self._check_file(level)

    def _check_file(self, level: int) -> None:
        file = self._file(level)
        if not file.is_file():
            raise ArtifactError(f"{file}: missing; {repair_advice(self.path)}")
        with open(file, "rb") as fh:
            raw = fh.read(HEADER.size)
        dtype, d = ("uint32", 1) if level == 0 else (self.gist_dtype, self.d)
        expected = _header(level, dtype, d, self.base_model_id)[: HEADER.size]
        if raw[:6] != MAGIC:
            raise ArtifactError(f"{file}: not a MegaContext tree file (bad magic); {repair_advice(self.path)}")
        if raw[6:8] != expected[6:8]:
            version = int.from_bytes(raw[6:8], "little")
            raise ArtifactError(f"{file}: tree format version {version}, expected {FORMAT_VERSION}; {repair_advice(self.path)}")
        if raw != expected:
            raise ArtifactError(f"{file}: header (level, dtype, d or base model) does not match {META}; {repair_advice(self.path)}")
        need = self._committed_end(level)
        if file.stat().st_size < need:
            raise ArtifactError(f"{file}: truncated ({file.stat().st_size} bytes, committed data needs {need}); {repair_advice(self.path)}")

    def verify(self) -> None:
        """Recompute every level's CRC32 over its committed bytes (reads the whole tree)."""
        for level in range(self.levels + 1):
            file = self._file(level)
            left, crc = self.count(level) * self._itemsize(level), 0
            with open(file, "rb") as fh:
                fh.seek(HEADER_BYTES)
                while left:
                    chunk = fh.read(min(left, READ_CHUNK))
                    if not chunk:
                        break
                    crc, left = zlib.crc32(chunk, crc), left - len(chunk)
            if left or crc != self.meta["crc32"][level]:
                raise ArtifactError(f"{file}: CRC mismatch in committed data (corrupt); {repair_advice(self.path)}")

    # ---- writes ----------------------------------------------------------------------
    def append(self, tokens: np.ndarray, encoder: GistEncoder) -> None:
        """Add tokens; make every LOD-k gist whose aligned span they complete. One commit."""
        ids = _as_token_ids(tokens)
        if not ids.size:
            return
        self._check_encoder(encoder, "append to")
        old = list(self.meta["counts"])
        n_tokens = old[0] + len(ids)
        fresh: dict[int, np.ndarray] = {0: ids}  # per level, the rows this append adds (stored dtype)
        for level in range(1, self.levels + 1):
            first, last = old[level], complete_count(n_tokens, level)
            children = self._rows_being_appended(level - 1, BLOCK * first, BLOCK * last, old, fresh)
            fresh[level] = self._encode(encoder, children, level, last - first)
        crcs = list(self.meta["crc32"])
        for level, rows in fresh.items():
            data = rows.tobytes()
            if data or self._file(level).stat().st_size > self._committed_end(level):  # also drop a killed append's tail
                self._write_past_end(level, data)
                crcs[level] = zlib.crc32(data, crcs[level])
        counts = [old[k] + len(fresh[k]) for k in range(self.levels + 1)]
        self._commit({**self.meta, "counts": counts, "crc32": crcs})

    def refresh(self, encoder: GistEncoder) -> None:
        """Recompute every gist with `encoder`; bump the gist version and record its identity.

        New level files are written beside the old ones and committed through meta.json,
        then renamed to their usual names; a kill at any point leaves the old or the new tree.
        """
        if encoder.d != self.d:
            raise ArtifactError(f"tree at {self.path} holds d={self.d} gists; encoder {encoder.identity} makes d={encoder.d}")
        files, crcs = list(self.meta["files"]), list(self.meta["crc32"])
        below = self._view(0)[: self.count(0)]
        for level in range(1, self.levels + 1):
            n = self.count(level)
            rows = self._encode(encoder, below[: n * BLOCK], level, n)
            usual = level_file(level)
            files[level] = usual + ".refresh" if self._file(level).name == usual else usual  # never the committed one
            data = rows.tobytes()
            _write_new(self.path / files[level], _header(level, self.gist_dtype, self.d, self.base_model_id) + data)
            crcs[level], below = zlib.crc32(data), rows
        self._commit({**self.meta, "files": files, "crc32": crcs, "encoder_identity": encoder.identity,
                      "gist_version": self.gist_version + 1})
        for level in range(1, self.levels + 1):  # tidy up: usual names again, stale copies gone
            usual = self.path / level_file(level)
            if files[level] != usual.name:
                os.replace(self.path / files[level], usual)
            (self.path / (usual.name + ".refresh")).unlink(missing_ok=True)
        _fsync_dir(self.path)
        self._commit({**self.meta, "files": [level_file(k) for k in range(self.levels + 1)]})

    # ---- internals -------------------------------------------------------------------
    def _file(self, level: int) -> Path:
        name = self.meta["files"][level]
        file = self.path / name
        if name != level_file(level) and not file.exists():  # a refresh renamed it into place, then was killed
            return self.path / level_file(level)
        return file

    def _itemsize(self, level: int) -> int:
        return 4 if level == 0 else self.d * np.dtype(STORAGE[self.gist_dtype][1]).itemsize

    def _view(self, level: int) -> np.ndarray:
        """The committed rows of `level`, memory-mapped (cached until the next commit)."""
        if level not in self._views:
            n, dtype = self.count(level), STORAGE["uint32" if level == 0 else self.gist_dtype][1]
            shape = (n,) if level == 0 else (n, self.d)
            self._views[level] = (np.memmap(self._file(level), dtype=dtype, mode="r", offset=HEADER_BYTES, shape=shape)
                                  if n else np.zeros(shape, dtype))
        return self._views[level]

    def _check_range(self, level: int, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.count(level):
            raise IndexError(f"[{start}, {end}) is outside the {self.count(level)} LOD{level} entries of {self.path}")

    def _check_encoder(self, encoder: GistEncoder, doing: str) -> None:
        if encoder.identity != self.encoder_identity or encoder.d != self.d:
            raise ArtifactError(f"tree at {self.path} holds gists of encoder {self.encoder_identity} (d={self.d}); "
                                f"cannot {doing} it with {encoder.identity} (d={encoder.d}); refresh it first")

    def _rows_being_appended(self, level: int, start: int, end: int, old: list[int], fresh: dict[int, np.ndarray]):
        """Rows [start, end) of `level` during an append: committed ones from disk, then this append's."""
        committed = old[level]
        disk = self._view(level)[start : min(end, committed)] if start < committed else fresh[level][:0]
        return np.concatenate([disk, fresh[level][max(start - committed, 0) : max(end - committed, 0)]])

    def _encode(self, encoder: GistEncoder, children: np.ndarray, level: int, n: int) -> np.ndarray:
        """[n*32] tokens or [n*32, d] stored gists -> [n, d] stored level-`level` gists (one encoder call)."""
        if n == 0:
            return np.zeros((0, self.d), STORAGE[self.gist_dtype][1])
        if level == 1:
            out = encoder.encode_tokens(np.ascontiguousarray(children).reshape(n, BLOCK))
        else:
            out = encoder.encode_gists(from_storage(children, self.gist_dtype).reshape(n, BLOCK, self.d), level)
        out = np.asarray(out, dtype=np.float32)
        if out.shape != (n, self.d):
            raise ValueError(f"encoder {encoder.identity} returned shape {out.shape} for LOD{level}, expected {(n, self.d)}")
        return to_storage(out, self.gist_dtype)

    def _committed_end(self, level: int) -> int:
        return HEADER_BYTES + self.count(level) * self._itemsize(level)

    def _write_past_end(self, level: int, data: bytes) -> None:
        end = self._committed_end(level)
        with open(self._file(level), "r+b") as fh:
            fh.truncate(end)  # drop whatever a killed append left past the committed end
            fh.seek(end)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def _commit(self, meta: dict[str, Any]) -> None:
        """Atomically replace meta.json: the single commit point of every write."""
        meta = {**meta, "access_counts": list(self._access), "modified_at": _now()}
        tmp = self.path / (META + ".tmp")
        _write_new(tmp, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        os.replace(tmp, self.path / META)
        _fsync_dir(self.path)
        self.meta = meta
        self._views.clear()
