from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megacontext.config import Config
from megacontext.data.corpus import build_corpus, pack_files, read_documents, stdlib_files, stdlib_root
from megacontext.errors import InputDataError
from megacontext.lifecycle.lineage import verify_files
from megacontext.data.shards import build_shards
from tests.conftest import tiny_config

LONG_TEXT = "def f(x):\n    return x * 2\n" * 20


def _folder_cfg(tmp_path: Path) -> Config:
    (tmp_path / "data").mkdir(exist_ok=True)
    return tiny_config(tmp_path, "data.source=folder")


def test_user_files_of_every_supported_kind_become_documents(tmp_path: Path) -> None:
    cfg = _folder_cfg(tmp_path)
    data = tmp_path / "data"
    (data / "a.txt").write_text("plain " + LONG_TEXT)
    (data / "b.md").write_text("# md\n" + LONG_TEXT)
    (data / "sub").mkdir()
    (data / "sub" / "c.py").write_text("# py\n" + LONG_TEXT)
    (data / "d.jsonl").write_text(json.dumps({"text": "j1 " + LONG_TEXT}) + "\n\n" + json.dumps({"text": "j2 " + LONG_TEXT}) + "\n")
    pq.write_table(pa.table({"text": ["p1 " + LONG_TEXT]}), data / "e.parquet")
    (data / ".hidden").write_text("ignored")
    sources = read_documents(build_corpus(cfg)).column("source").to_pylist()
    root = str(data)
    assert sources == [f"{root}/a.txt", f"{root}/b.md", f"{root}/d.jsonl:1", f"{root}/d.jsonl:3",
                       f"{root}/e.parquet#row0", f"{root}/sub/c.py"]


BAD_INPUTS = {
    "empty": ("empty.txt", b"", r"empty\.txt: file is empty; add text"),
    "binary": ("blob.txt", b"\x00\x01\x02binary", r"blob\.txt: looks binary"),
    "unsupported": ("image.png", b"\x89PNG", r"image\.png: unsupported file type '\.png'"),
    "non_utf8": ("latin.txt", "caf\xe9 au lait".encode("latin-1"), r"latin\.txt: not UTF-8 \(byte 0xe9 at offset 3\).*iconv"),
    "bad_jsonl": ("r.jsonl", b'{"text": "ok ok ok"}\n{"txt": "x"}\n', r"r\.jsonl:2: no non-empty string field 'text'"),
    "bad_json": ("r.jsonl", b"{not json\n", r"r\.jsonl:1: not valid JSON"),
    "whitespace": ("w.md", b"  \n\n ", r"w\.md: file holds only whitespace"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_file_and_nothing_is_lost(tmp_path: Path, case: str) -> None:
    cfg = _folder_cfg(tmp_path)
    (tmp_path / "data" / "good.txt").write_text(LONG_TEXT)
    out = build_corpus(cfg)
    before = (out / "documents.parquet").read_bytes()
    name, content, pattern = BAD_INPUTS[case]
    (tmp_path / "data" / name).write_bytes(content)
    with pytest.raises(InputDataError, match=pattern) as err:
        build_corpus(cfg)
    assert "\n" not in str(err.value)
    assert (out / "documents.parquet").read_bytes() == before and verify_files(out) == []


def test_document_shorter_than_a_block_fails_at_tokenization_naming_it(tmp_path: Path) -> None:
    cfg = _folder_cfg(tmp_path)
    (tmp_path / "data" / "good.txt").write_text(LONG_TEXT)
    build_corpus(cfg)
    shards = build_shards(cfg)
    before = (shards / "manifest.json").read_bytes()
    (tmp_path / "data" / "short.txt").write_text("tiny")
    build_corpus(cfg)
    with pytest.raises(InputDataError, match=r"short\.txt: only 4 tokens, shorter than one block \(32\)"):
        build_shards(cfg)
    assert (shards / "manifest.json").read_bytes() == before and verify_files(shards) == []


def test_folder_without_usable_text_is_refused(tmp_path: Path) -> None:
    cfg = _folder_cfg(tmp_path)
    (tmp_path / "data" / ".DS_Store").write_bytes(b"\x00")
    with pytest.raises(InputDataError, match=r"data/: no usable text files.*empty the folder"):
        build_corpus(cfg)


def test_auto_source_uses_the_folder_when_it_has_files_else_the_stdlib(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "data.source=auto", "data.max_documents=2")
    (tmp_path / "data").mkdir()
    assert json.loads((build_corpus(cfg) / "stats.json").read_text())["source"] == "stdlib"
    (tmp_path / "data" / "mine.txt").write_text(LONG_TEXT)
    assert json.loads((build_corpus(cfg) / "stats.json").read_text())["source"] == "folder"


def test_stdlib_packing_makes_long_documents_and_keeps_every_file() -> None:
    root = stdlib_root()
    files = stdlib_files(root)[:60]
    docs = pack_files(files, root, target_chars=50_000)
    assert all(len(d.text) >= 50_000 for d in docs[:-1])
    text = "".join(d.text for d in docs)
    assert all(f"# ---- file: {f.relative_to(root).as_posix()} ----" in text for f in files)
    assert docs[0].source.startswith("stdlib:") and ".." in docs[0].source


def test_rebuild_reuses_an_identical_corpus_and_notices_new_files(tmp_path: Path) -> None:
    cfg = _folder_cfg(tmp_path)
    (tmp_path / "data" / "a.txt").write_text(LONG_TEXT)
    out = build_corpus(cfg)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert build_corpus(cfg) == out and (out / "manifest.json").stat().st_mtime_ns == stamp
    (tmp_path / "data" / "b.txt").write_text("b " + LONG_TEXT)
    assert read_documents(build_corpus(cfg)).num_rows == 2
    assert build_corpus(cfg, force=True) == out


def test_jsonl_records_split_only_on_newlines_not_on_unicode_line_separators(tmp_path: Path) -> None:
    cfg = _folder_cfg(tmp_path)
    texts = ["line\u2028separator " + LONG_TEXT, "para\u2029graph\x85next\x0cfeed " + LONG_TEXT]
    raw = "\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\r\n"  # CRLF, raw U+2028
    assert "\u2028" in raw
    (tmp_path / "data" / "u.jsonl").write_text(raw, newline="")
    table = read_documents(build_corpus(cfg))
    assert table.column("source").to_pylist() == [f"{tmp_path / 'data'}/u.jsonl:1", f"{tmp_path / 'data'}/u.jsonl:2"]
    assert table.column("text").to_pylist() == texts


def test_prepare_data_publishes_corpus_and_shards_all_or_nothing(tmp_path: Path, capsys) -> None:
    from megacontext.cli import main
    from megacontext.lifecycle.audit import audit
    from megacontext.lifecycle.lineage import manifest_digest, read_manifest

    cfg = _folder_cfg(tmp_path)
    args = ["--profile", "tiny", f"paths.artifact_root={cfg.paths.artifact_root}", f"paths.corpus_dir={tmp_path / 'data'}",
            "data.source=folder"]
    (tmp_path / "data" / "good.txt").write_text(LONG_TEXT)
    assert main(["prepare-data", *args]) == 0
    corpus, shards = Path(cfg.paths.artifact_root) / "data" / "corpus", Path(cfg.paths.artifact_root) / "data" / "shards"
    corpus_before, shards_before = manifest_digest(read_manifest(corpus)), manifest_digest(read_manifest(shards))
    (tmp_path / "data" / "short.txt").write_text("tiny")  # a new corpus whose shards cannot be built
    assert main(["prepare-data", *args]) == 2
    assert "short.txt: only 4 tokens" in capsys.readouterr().err
    assert manifest_digest(read_manifest(corpus)) == corpus_before  # the old corpus is back, not the new one
    assert manifest_digest(read_manifest(shards)) == shards_before
    assert audit(shards).ok  # the shards on disk still come from the corpus on disk
    # nothing left over: the lock files stay, their holders' records went with the finished holders
    assert sorted(p.name for p in corpus.parent.iterdir()) == [".corpus.lock", ".shards.lock", "corpus", "shards"]


@pytest.mark.parametrize("killed", ["between the publications", "after both"])
def test_a_killed_prepare_data_is_finished_by_the_next_one(tmp_path: Path, killed: str) -> None:
    import shutil
    import subprocess

    from megacontext.data.shards import _recover_prepare
    from megacontext.lifecycle.lineage import manifest_digest, read_manifest

    cfg = _folder_cfg(tmp_path)
    (tmp_path / "data" / "good.txt").write_text(LONG_TEXT)
    build_corpus(cfg)
    shards = build_shards(cfg)
    corpus = shards.parent / "corpus"
    old = manifest_digest(read_manifest(corpus))
    proc = subprocess.Popen(["true"])
    proc.wait()
    backup = corpus.parent / f".corpus.prepare-{proc.pid}"  # what the killed run had saved
    shutil.copytree(corpus, backup)
    (tmp_path / "data" / "more.txt").write_text(LONG_TEXT.upper())
    build_corpus(cfg)  # the killed run published the new corpus ...
    if killed == "after both":
        build_shards(cfg)  # ... and its shards
    new = manifest_digest(read_manifest(corpus))
    _recover_prepare(corpus, shards)
    assert not backup.exists()
    expected = old if killed == "between the publications" else new
    assert manifest_digest(read_manifest(corpus)) == expected
    assert read_manifest(shards)["inputs"][0]["digest"] == expected  # shards and corpus agree again


def test_a_profile_that_pins_the_stdlib_corpus_says_that_the_files_in_data_are_not_used(tmp_path: Path, capsys) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text(LONG_TEXT)
    build_corpus(tiny_config(tmp_path, "data.max_documents=2"))  # the tiny profile pins data.source=stdlib
    err = capsys.readouterr().err
    assert f"profile 'tiny' pins data.source=stdlib, so the 1 file(s) in {tmp_path / 'data'}/ are not used" in err
    build_corpus(tiny_config(tmp_path, "data.source=folder"), force=True)  # the hint's fix uses them, silently
    assert "not used" not in capsys.readouterr().err
