"""dvc.yaml stays in step with the CLI (DVC runs from its own environment, .venv-dvc)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import yaml

from megacontext.cli import _parser
from tests.helpers.scratch_repo import DVC, scratch_dvc_repo

ROOT = Path(__file__).resolve().parent.parent
STAGE_CODE = {"build-corpus": "data/corpus.py", "build-shards": "data/shards.py", "build-trees": "context/tree_build.py",
              "eval-references": "evaluation/references.py", "evaluate": "evaluation/evaluate.py",
              "train-cycle": "training/cycle.py"}


def test_dvc_parses_the_pipeline_in_its_own_environment() -> None:
    assert DVC.is_file(), "DVC is installed by `make setup` into .venv-dvc"
    listed = subprocess.run([str(DVC), "stage", "list"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert [line.split()[0] for line in listed.splitlines() if line.strip()] == ["corpus", "shards", "trees", "references",
                                                                                    "evaluate", "cycle", "validate"]


def test_every_stage_calls_a_real_cli_subcommand_and_lists_its_code() -> None:
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    profile = pipeline["vars"][0]["profile"]
    parser = _parser()
    for name, stage in pipeline["stages"].items():
        argv = shlex.split(stage["cmd"].replace("${profile}", profile))
        assert argv[0] == ".venv/bin/megacontext", name
        args = parser.parse_args(argv[1:])  # exits (fails the test) on an unknown subcommand or flag
        module = f"megacontext/{STAGE_CODE[args.command]}"
        assert (ROOT / module).is_file() and module in stage["deps"], f"stage {name} must depend on its code {module}"
        assert all((ROOT / dep).exists() or dep.startswith(("artifacts/", "data")) for dep in stage["deps"])
        assert all(str(out).startswith("artifacts/") for out in stage["outs"])


def test_dvc_repro_runs_the_tiny_lifecycle_and_a_second_repro_does_nothing(tmp_path: Path) -> None:
    """The real pipeline file on the tiny profile in a fresh repository: everything runs, then nothing does."""
    env = {**os.environ, "WANDB_MODE": "disabled", "MEGACONTEXT_SEED": "0"}

    def run(*argv: str) -> str:
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    scratch_dvc_repo(tmp_path, lambda argv, cwd: run(*argv), profile="tiny")
    first = run(str(DVC), "repro")
    for stage in ("corpus", "shards", "trees", "references", "evaluate", "cycle", "validate"):
        assert f"Running stage '{stage}'" in first, stage
    assert (tmp_path / "artifacts/reports/cycle-0001/summary.json").is_file() and (tmp_path / "dvc.lock").is_file()
    second = run(str(DVC), "repro")
    assert "Running stage" not in second and "didn't change" in second
