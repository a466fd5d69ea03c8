"""The quick-start notebook runs headless on the tiny profile (nbclient), so it cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _outputs(cell) -> tuple[str, set[str]]:
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.outputs)
    return text, {mime for o in cell.outputs for mime in o.get("data", {})}


def test_the_stored_notebook_carries_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_the_quickstart_notebook_trains_evaluates_and_shows_the_report(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEGACONTEXT_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("MEGACONTEXT_SEED", "3")
    monkeypatch.setenv("QUICKSTART_OVERRIDES", "data.max_documents=5 data.val_fraction=0.45 data.test_fraction=0")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    setup, _ = _outputs(code[1])
    assert "profile tiny" in setup and "seed 3" in setup and str(tmp_path / "artifacts") in setup
    cycle = tmp_path / "artifacts" / "cycles" / "cycle-0001"
    summary = json.loads((tmp_path / "artifacts" / "reports" / "cycle-0001" / "summary.json").read_text())
    pictures = [mimes for c in code for _, mimes in [_outputs(c)] if "image/png" in mimes]
    assert len(pictures) >= 4  # corpus lengths, training losses, the report's plot, the LOD map
    report, mimes = _outputs(code[4])
    assert "text/markdown" in mimes and "image/png" in mimes
    promotion, _ = _outputs(code[-1])
    assert summary["gate"]["message"] in promotion
    assert ((tmp_path / "artifacts" / "champion" / "champion.json").is_file()) == summary["gate"]["passed"]
