"""The evaluation report: files written, numbers and verdict in report.md, a byte-stable PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from megacontext.evaluation.report import write_report
from megacontext.evaluation.gate import gate, summarize
from megacontext.data.schemas import SchemaViolation
from tests.test_gate import BOOT, make_table, random_table

CONTEXT = {"model": "HuggingFaceTB/SmolLM2-135M", "w_max": 2048, "history": 8128, "horizon": 8}


def _write(folder: Path, table: pl.DataFrame, delta_nll_max: float = 0.1) -> tuple[dict[str, Path], dict]:
    summary = summarize(table, **BOOT)
    return write_report(folder, table, summary, gate(summary, delta_nll_max=delta_nll_max),
                        title="gate-cpu eval", context=CONTEXT), summary


def test_report_files_hold_the_table_the_numbers_and_the_verdict(tmp_path: Path) -> None:
    table = random_table(12)
    paths, summary = _write(tmp_path / "eval", table)
    assert {k: p.name for k, p in paths.items()} == {
        "results": "results.parquet", "summary": "summary.json", "report": "report.md", "plot": "report.png"}
    assert pl.read_parquet(paths["results"]).equals(table)

    saved = json.loads(paths["summary"].read_text())
    assert saved["all"] == summary["all"] and saved["key"] == summary["key"] and saved["context"] == CONTEXT
    assert saved["gate"]["passed"] is True
    assert [c["name"] for c in saved["gate"]["checks"]] == ["delta_nll <= delta_nll_max", "nll_mc < nll_recency"]

    md = paths["report"].read_text()
    assert md.startswith("# gate-cpu eval\n\nGate: **PASSED**")
    a, k = summary["all"], summary["key"]
    delta = f"{a['delta_nll']['value']:.4f} [{a['delta_nll']['ci'][0]:.4f}, {a['delta_nll']['ci'][1]:.4f}]"
    key_delta = f"{k['delta_nll']['value']:.4f} [{k['delta_nll']['ci'][0]:.4f}, {k['delta_nll']['ci'][1]:.4f}]"
    assert f"| ΔNLL = mc − full | {delta} | {key_delta} |" in md
    lod2 = f"{a['delta_nll_lod2']['value']:.4f}"
    assert f"| LOD2 only | {lod2} [" in md
    assert f"| all tokens (n={summary['n_tokens']}) | key tokens (n={k['n_tokens']}) |" in md
    assert "| w_max | `2048` |" in md and "| samples (doc, cursor) | 12 |" in md
    assert f"| delta_nll <= delta_nll_max | {a['delta_nll']['value']:.4f} | 0.1000 | pass |" in md
    assert "![NLL and per-level ΔNLL](report.png)" in md


def test_a_failing_gate_and_missing_metrics_read_as_such(tmp_path: Path) -> None:
    full = np.full((4, 4), 2.0)
    paths, _ = _write(tmp_path, make_table(full, full + 0.25, full + 0.25))  # mc == recency, no key tokens
    md = paths["report"].read_text()
    assert "Gate: **FAILED**" in md and "| nll_mc < nll_recency | 2.2500 | 2.2500 | FAIL |" in md
    assert "| LOD1 only | n/a | n/a |" in md and "| NLL MegaContext | 2.2500 [2.2500, 2.2500] | n/a |" in md
    assert json.loads(paths["summary"].read_text())["gate"]["passed"] is False
    assert paths["plot"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_png_is_valid_and_byte_identical_across_writes(tmp_path: Path) -> None:
    table = random_table(10)
    first, _ = _write(tmp_path / "a", table)
    second, _ = _write(tmp_path / "b", table)
    png = first["plot"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR"
    assert int.from_bytes(png[16:20], "big") == 1000 and int.from_bytes(png[20:24], "big") == 400  # 10x4 in at 100 dpi
    assert b"Software" not in png
    assert png == second["plot"].read_bytes()
    assert first["report"].read_text() == second["report"].read_text()


def test_an_invalid_table_is_not_written(tmp_path: Path) -> None:
    table = random_table(3)
    summary = summarize(table, **BOOT)
    bad = table.with_columns(pl.lit(-1.0).alias("nll_mc"))
    with pytest.raises(SchemaViolation, match=r"results\.parquet: violates schema 'eval_results'"):
        write_report(tmp_path, bad, summary, None, title="t", context={})
    assert not (tmp_path / "results.parquet").exists()


def test_a_report_whose_learned_focus_never_edits_says_so_at_the_top(tmp_path: Path) -> None:
    table = random_table(6)
    summary = summarize(table, **BOOT)
    rows = {"mc": {"expanded_blocks_per_sample": 0.0, "samples_with_expansions": 0.0, "median_distance_tokens": None,
                   "max_distance_tokens": None}}
    for never, name in ((True, "idle"), (False, "busy")):
        summary["focus_health"] = {"swap_rate": 0.0, "rows": rows, "learned_focus": True, "never_edits": never}
        write_report(tmp_path / name, table, summary, gate(summary, delta_nll_max=0.1), title="t", context=CONTEXT)
        text = (tmp_path / name / "report.md").read_text()
        assert ("**Warning: the learned focus never edits**" in text.split("## Setting")[0]) == never
        assert "## Focus health" in text and "| MegaContext (this evaluation's focus) | 0 | 0% | — | — |" in text
