"""MegaContextTree: incremental ingest of any chunking, gist correctness, crash safety, refusals, refresh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.errors import ArtifactError
from megacontext.context.nodes import BLOCK, Node
from megacontext.context.tree import HEADER_BYTES, MegaContextTree, level_file

BASE = "tiny-llama-test"


class TableEncoder:
    """Deterministic numpy GistEncoder: position-weighted means, so a misaligned block gives another gist."""

    def __init__(self, d: int = 8, seed: int = 0, vocab: int = 101):
        rng = np.random.default_rng(seed)
        self.table = rng.standard_normal((vocab, d)).astype(np.float32)  # [V, d]
        self.weights = rng.uniform(0.5, 1.5, (1, BLOCK, 1)).astype(np.float32)  # [1, 32, 1]
        self.identity, self.d, self.calls = f"table-d{d}-seed{seed}", d, []

    def encode_tokens(self, blocks: np.ndarray) -> np.ndarray:
        assert blocks.dtype == np.uint32 and blocks.shape[1:] == (BLOCK,)
        self.calls.append((1, len(blocks)))
        return self._pool(self.table[blocks % len(self.table)])  # [N, 32, d] -> [N, d]

    def encode_gists(self, blocks: np.ndarray, level: int) -> np.ndarray:
        assert blocks.dtype == np.float32 and blocks.shape[1:] == (BLOCK, self.d) and level >= 2
        self.calls.append((level, len(blocks)))
        return self._pool(blocks) + 0.25 * level

    def _pool(self, x: np.ndarray) -> np.ndarray:
        return (x * self.weights).sum(axis=1) / self.weights.sum()


def doc_tokens(start: int, end: int) -> np.ndarray:
    """Token ids that depend only on their position, so any prefix can be rebuilt."""
    return (np.arange(start, end, dtype=np.uint64) * 2654435761 % 50_000).astype(np.uint32)


def build(path: Path, tokens: np.ndarray, chunks: list[int] | None = None, enc: TableEncoder | None = None,
          **kw) -> MegaContextTree:
    enc = enc or TableEncoder()
    tree = MegaContextTree.create(path, base_model_id=BASE, encoder=enc, **kw)
    bounds = np.cumsum([0, *(chunks or [len(tokens)])])
    for a, b in zip(bounds[:-1], bounds[1:]):
        tree.append(tokens[a:b], enc)
    if bounds[-1] < len(tokens):
        tree.append(tokens[bounds[-1]:], enc)
    return tree


def committed(tree: MegaContextTree) -> list[bytes]:
    """Each level file up to its committed end (header included)."""
    item = [4] + [tree.d * np.dtype(tree.gist_dtype).itemsize] * tree.levels
    return [(tree.path / level_file(k)).read_bytes()[: HEADER_BYTES + tree.count(k) * item[k]]
            for k in range(tree.levels + 1)]


def file_bytes(tree: MegaContextTree) -> list[bytes]:
    return [(tree.path / level_file(k)).read_bytes() for k in range(tree.levels + 1)]


# ---- 1. any chunking gives the same tree ------------------------------------------------------
def test_token_by_token_equals_one_big_append(tmp_path: Path) -> None:
    tokens = doc_tokens(0, 2 * 1024 + 40)  # two LOD2 gists and a partial trailing block
    big = build(tmp_path / "big", tokens)
    one = build(tmp_path / "one", tokens, chunks=[1] * len(tokens))
    assert [big.count(k) for k in range(3)] == [2088, 65, 2]
    assert file_bytes(one) == file_bytes(big)
    assert one.meta["crc32"] == big.meta["crc32"]
    np.testing.assert_array_equal(one.gists(2, 0, 2), big.gists(2, 0, 2))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 700), min_size=1, max_size=12))
def test_random_chunkings_equal_one_big_append(tmp_path_factory: pytest.TempPathFactory, chunks: list[int]) -> None:
    root = tmp_path_factory.mktemp("chunks")
    tokens = doc_tokens(0, min(sum(chunks), 2100))
    big = build(root / "big", tokens)
    pieces = build(root / "pieces", tokens, chunks=chunks)
    assert pieces.n_tokens == len(tokens)
    assert file_bytes(pieces) == file_bytes(big)
    assert pieces.meta["crc32"] == big.meta["crc32"]
    MegaContextTree.open(pieces.path).check_invariants()


# ---- 2. gists are the encoder over the right children ---------------------------------------
def test_gists_are_the_encoder_over_aligned_children(tmp_path: Path) -> None:
    enc = TableEncoder()
    tokens = doc_tokens(0, 2 * 1024 + 3 * 32 + 5)
    tree = build(tmp_path / "t", tokens, chunks=[700, 1], enc=enc, gist_dtype="float32")
    assert (tree.count(1), tree.count(2)) == (len(tokens) // 32, 2)  # the trailing 5 tokens make no gist
    lod1 = enc.encode_tokens(tokens[: 32 * tree.count(1)].reshape(-1, 32))
    np.testing.assert_array_equal(tree.gists(1, 0, tree.count(1)), lod1)
    np.testing.assert_array_equal(tree.gists(2, 0, 2), enc.encode_gists(lod1[:64].reshape(2, 32, -1), 2))
    np.testing.assert_array_equal(tree.gist(Node(1024, 2)), tree.gists(2, 1, 2)[0])
    np.testing.assert_array_equal(tree.tokens(1000, 1100), tokens[1000:1100])
    with pytest.raises(IndexError):
        tree.gists(1, 0, tree.count(1) + 1)


def test_a_multi_token_append_creates_gists_in_one_batched_call_per_level(tmp_path: Path) -> None:
    enc = TableEncoder()
    tree = MegaContextTree.create(tmp_path / "t", base_model_id=BASE, encoder=enc)
    tree.append(doc_tokens(0, 31), enc)
    assert tree.count(1) == 0 and enc.calls == []  # a partial block makes no gist and no encoder call
    tree.append(doc_tokens(31, 5000), enc)  # completes the first block, then 155 more and 4 LOD2 spans
    assert (tree.count(1), tree.count(2)) == (156, 4)
    assert enc.calls == [(1, 156), (2, 4)]
    for level, n in [(1, 156), (2, 4)]:
        assert np.abs(tree.gists(level, 0, n)).sum(axis=1).min() > 0  # no zero (missing) gists


def test_three_levels(tmp_path: Path) -> None:
    tokens = doc_tokens(0, 32**3 + 100)
    enc = TableEncoder()
    tree = build(tmp_path / "a", tokens, chunks=[20_000], enc=enc, levels=3, gist_dtype="float32")
    assert [tree.count(k) for k in range(4)] == [len(tokens), 1027, 32, 1]
    lod2 = tree.gists(2, 0, 32)
    np.testing.assert_array_equal(tree.gists(3, 0, 1), enc.encode_gists(lod2[None], 3))
    assert file_bytes(tree) == file_bytes(build(tmp_path / "b", tokens, levels=3, gist_dtype="float32"))


# ---- 3. kill safety ---------------------------------------------------------------------------
def test_a_failed_meta_commit_leaves_the_previous_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = TableEncoder()
    tree = build(tmp_path / "t", doc_tokens(0, 1000), enc=enc)
    before = file_bytes(tree)

    def killed(*args: object) -> None:
        raise KeyboardInterrupt("killed before the commit")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        tree.append(doc_tokens(1000, 3000), enc)  # data bytes are written, meta.json is not replaced
    monkeypatch.undo()
    assert [len(b) for b in file_bytes(tree)] > [len(b) for b in before]  # garbage past the committed end
    reopened = MegaContextTree.open(tree.path)
    assert reopened.n_tokens == 1000 and committed(reopened) == before
    reopened.append(doc_tokens(1000, 3000), enc)
    assert file_bytes(reopened) == file_bytes(build(tmp_path / "clean", doc_tokens(0, 3000)))


def test_garbage_past_the_committed_end_is_ignored_then_truncated(tmp_path: Path) -> None:
    enc = TableEncoder()
    tree = build(tmp_path / "t", doc_tokens(0, 1500), enc=enc)
    for k in range(3):
        with open(tree.path / level_file(k), "ab") as fh:
            fh.write(os.urandom(100))
    reopened = MegaContextTree.open(tree.path)
    np.testing.assert_array_equal(reopened.tokens(0, 1500), doc_tokens(0, 1500))
    reopened.append(doc_tokens(1500, 1510), enc)  # adds no gist, still truncates every level
    assert file_bytes(reopened) == file_bytes(build(tmp_path / "clean", doc_tokens(0, 1510)))


def _append_forever(path: str, seed: int) -> None:
    tree, enc, rng = MegaContextTree.open(path), TableEncoder(), np.random.default_rng(seed)
    print("ready", flush=True)
    while True:
        n = tree.n_tokens
        tree.append(doc_tokens(n, n + int(rng.integers(1, 300))), enc)


def test_sigkilled_appender_leaves_a_valid_prefix_tree(tmp_path: Path) -> None:
    path = tmp_path / "t"
    build(path, doc_tokens(0, 0))
    rng, sizes = np.random.default_rng(0), []
    for i in range(4):
        proc = subprocess.Popen([sys.executable, __file__, str(path), str(i)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.2))
        proc.kill()
        proc.wait()
        proc.stdout.close()
        tree = MegaContextTree.open(path)  # verifies CRCs and invariants
        clean = build(tmp_path / f"clean{i}", doc_tokens(0, tree.n_tokens))
        assert committed(tree) == file_bytes(clean)
        sizes.append(tree.n_tokens)
    assert sizes[-1] > 0 and sizes == sorted(sizes)


# ---- 4. corruption and foreign trees are refused ----------------------------------------------
def _sealed_trees(folder: Path) -> Path:
    """`folder` as a published trees artifact (its manifest written), holding `val/doc`."""
    from megacontext.lifecycle.lineage import write_manifest

    build(folder / "val" / "doc", doc_tokens(0, 2048))
    write_manifest(folder, kind="megacontext_trees", format_version=1, config_hash="test")
    return folder / "val" / "doc"


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("where, advice", [
    ("bare", "rebuild {tree} with the command that made it"),  # e.g. `generate`'s scratch tree: rerun it
    ("artifacts/trees", "rebuild it with `megacontext build-trees --force` (and the --profile that built it)"),
    ("artifacts/cycles/cycle-0003/trees", "delete {trees} and rerun `megacontext train-cycle --cycle 3`"),
])
def test_a_corrupt_committed_byte_is_refused_with_the_command_that_rebuilds_that_tree(
        tmp_path: Path, level: int, where: str, advice: str) -> None:
    if where == "bare":
        tree, trees = build(tmp_path / "t", doc_tokens(0, 2048)).path, None
    else:
        trees = tmp_path / where
        tree = _sealed_trees(trees)
    file = tree / level_file(level)
    data = bytearray(file.read_bytes())
    data[HEADER_BYTES + 3] ^= 0x40
    file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as error:
        MegaContextTree.open(tree)
    assert str(error.value) == f"{file}: CRC mismatch in committed data (corrupt); " + advice.format(tree=tree, trees=trees)
    assert MegaContextTree.open(tree, verify=False).n_tokens == 2048  # only the CRC check reads every byte


def test_truncated_files_bad_headers_and_bad_meta_are_refused(tmp_path: Path) -> None:
    tree = build(tmp_path / "t", doc_tokens(0, 2048))
    lod1 = tree.path / level_file(1)
    good = lod1.read_bytes()
    lod1.write_bytes(good[:-1])
    with pytest.raises(ArtifactError, match="lod1.bin: truncated"):
        MegaContextTree.open(tree.path, verify=False)
    lod1.write_bytes(b"XXTREE" + good[6:])
    with pytest.raises(ArtifactError, match="lod1.bin: not a MegaContext tree file"):
        MegaContextTree.open(tree.path)
    lod1.write_bytes(good[:6] + (99).to_bytes(2, "little") + good[8:])
    with pytest.raises(ArtifactError, match="lod1.bin: tree format version 99"):
        MegaContextTree.open(tree.path)
    lod1.write_bytes(good)
    meta = json.loads((tree.path / "meta.json").read_text())
    (tree.path / "meta.json").write_text(json.dumps({**meta, "counts": [2048, 64, 1]}))
    with pytest.raises(ArtifactError, match="1 LOD2 gists over 2048 tokens, expected 2"):
        MegaContextTree.open(tree.path)
    (tree.path / "meta.json").unlink()
    with pytest.raises(ArtifactError, match="no meta.json"):
        MegaContextTree.open(tree.path)


def test_create_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    MegaContextTree.create(tmp_path / "t", base_model_id=BASE, encoder=TableEncoder())  # an empty folder is fine
    with pytest.raises(ArtifactError, match="not an empty folder"):
        MegaContextTree.create(tmp_path / "t", base_model_id=BASE, encoder=TableEncoder())


# ---- 5. base model / encoder identity, refresh ------------------------------------------------
def test_another_base_model_or_encoder_is_refused(tmp_path: Path) -> None:
    tree = build(tmp_path / "t", doc_tokens(0, 100))
    with pytest.raises(ArtifactError, match=f"built with base model {BASE}, not other-model; rebuild .* with the "
                                            "command that made it"):
        MegaContextTree.open(tree.path, base_model_id="other-model")
    with pytest.raises(ArtifactError, match="holds gists of encoder table-d8-seed0, not table-d8-seed1"):
        MegaContextTree.open(tree.path, base_model_id=BASE, encoder_identity="table-d8-seed1")
    with pytest.raises(ArtifactError, match="cannot append to it with table-d8-seed1"):
        tree.append(doc_tokens(100, 200), TableEncoder(seed=1))
    assert MegaContextTree.open(tree.path, base_model_id=BASE, encoder_identity="table-d8-seed0").n_tokens == 100


def test_refresh_recomputes_gists_and_bumps_the_version(tmp_path: Path) -> None:
    tokens = doc_tokens(0, 2100)
    tree = build(tmp_path / "t", tokens)
    old = tree.gists(1, 0, tree.count(1))
    new_enc = TableEncoder(seed=1)
    tree.refresh(new_enc)
    assert (tree.gist_version, tree.encoder_identity) == (2, new_enc.identity)
    assert not np.allclose(tree.gists(1, 0, tree.count(1)), old)
    clean = build(tmp_path / "clean", tokens, enc=TableEncoder(seed=1))
    assert file_bytes(tree) == file_bytes(clean)
    assert sorted(p.name for p in tree.path.iterdir()) == ["lod0.bin", "lod1.bin", "lod2.bin", "meta.json"]
    reopened = MegaContextTree.open(tree.path, encoder_identity=new_enc.identity)
    assert reopened.gist_version == 2
    with pytest.raises(ArtifactError, match="not table-d8-seed0"):
        MegaContextTree.open(tree.path, encoder_identity="table-d8-seed0")


@pytest.mark.parametrize("killed_at", [1, 2, 3, 4])
def test_a_killed_refresh_leaves_the_old_or_the_new_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        killed_at: int) -> None:
    """os.replace calls in a refresh: 1 commits meta, 2-3 rename the new level files, 4 commits their names."""
    tokens = doc_tokens(0, 2100)
    tree = build(tmp_path / "t", tokens)
    old, real_replace, calls = file_bytes(tree), os.replace, []

    def replace(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == killed_at:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        tree.refresh(TableEncoder(seed=1))
    monkeypatch.undo()
    reopened = MegaContextTree.open(tree.path)
    new_enc = TableEncoder(seed=1)
    if killed_at == 1:
        assert reopened.gist_version == 1 and committed(reopened) == old
        reopened.refresh(new_enc)
    assert (reopened.gist_version, reopened.encoder_identity) == (2, new_enc.identity)
    reopened.append(doc_tokens(2100, 3100), new_enc)  # a half-tidied refresh still takes appends
    reopened.refresh(new_enc)  # and another refresh, which must not overwrite the committed files
    assert committed(reopened) == file_bytes(build(tmp_path / "clean", doc_tokens(0, 3100), enc=new_enc))


# ---- 6. storage dtypes, access counts --------------------------------------------------------
@pytest.mark.parametrize("gist_dtype, rtol", [("float32", 0), ("float16", 1e-3), ("bfloat16", 8e-3)])
def test_gist_dtypes_round_trip(tmp_path: Path, gist_dtype: str, rtol: float) -> None:
    enc = TableEncoder()
    tokens = doc_tokens(0, 1024)
    tree = build(tmp_path / "t", tokens, enc=enc, gist_dtype=gist_dtype)
    want = enc.encode_tokens(tokens.reshape(-1, 32))
    got = MegaContextTree.open(tree.path).gists(1, 0, 32)
    assert got.dtype == np.float32 and got.shape == (32, enc.d)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
    item = {"float32": 4, "float16": 2, "bfloat16": 2}[gist_dtype]
    assert (tree.path / "lod1.bin").stat().st_size == HEADER_BYTES + 32 * enc.d * item


def test_token_ids_use_the_full_uint32_range(tmp_path: Path) -> None:
    tokens = np.array([0, 1, 2**32 - 1, 49_151] * 10, dtype=np.int64)
    tree = build(tmp_path / "t", tokens)
    np.testing.assert_array_equal(MegaContextTree.open(tree.path).tokens(0, 40), tokens)
    with pytest.raises(ValueError, match="token ids"):
        tree.append(np.array([-1]), TableEncoder())


def test_access_counts_persist_at_the_next_commit(tmp_path: Path) -> None:
    enc = TableEncoder()
    tree = build(tmp_path / "t", doc_tokens(0, 1024), enc=enc)
    for node in [Node(0, 1), Node(32, 1), Node(0, 2)]:
        tree.touch(node)
    assert MegaContextTree.open(tree.path).access_counts == [0, 0, 0]  # in memory only, until a commit
    tree.append(doc_tokens(1024, 1030), enc)
    assert MegaContextTree.open(tree.path).access_counts == [0, 2, 1]
    tree.touch(Node(5, 0))
    tree.flush()
    assert MegaContextTree.open(tree.path).access_counts == [1, 2, 1]


if __name__ == "__main__":  # the appender that test_sigkilled_appender_leaves_a_valid_prefix_tree kills
    _append_forever(sys.argv[1], int(sys.argv[2]))
