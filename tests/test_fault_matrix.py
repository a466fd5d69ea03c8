"""The fault matrix (benchmarks/fault_matrix.py) runs on the tiny profile and every row passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {"kill + resume": 5, "flipped byte": 20, "concurrent writers": 5, "bad input": 15}


def test_every_row_of_the_fault_matrix_passes(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fault_matrix.py"), "--root", str(tmp_path)],
                          cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True,
                          timeout=1500)
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    failed = [" | ".join(r) for r in rows if not r[-1].startswith("pass")]
    assert done.returncode == 0 and not failed, "\n".join(failed) or done.stderr[-3000:]
    counts = {family: sum(r[0] == f"| {family}" for r in rows) for family in FAMILIES}
    assert counts == FAMILIES, counts  # every case ran (a row that silently vanished is a failure too)
    assert f"{len(rows)}/{len(rows)} rows pass" in done.stdout
