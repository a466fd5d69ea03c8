"""dvc.yaml stays in step with the CLI (DVC runs from its own environment, .venv-dvc)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from megacontext.cli import _parser
from megacontext.lifecycle.dvc_pipeline import command_code, handler_name, import_closure, synced
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


def test_every_stage_calls_a_real_cli_subcommand_and_lists_its_whole_import_closure() -> None:
    text = (ROOT / "dvc.yaml").read_text()
    assert synced(text) == text, "dvc.yaml's code deps are stale: run `python -m megacontext.lifecycle.dvc_pipeline`"
    pipeline = yaml.safe_load(text)
    profile = pipeline["vars"][0]["profile"]
    parser = _parser()
    for name, stage in pipeline["stages"].items():
        argv = shlex.split(stage["cmd"].replace("${profile}", profile))
        assert argv[0] == ".venv/bin/megacontext", name
        args = parser.parse_args(argv[1:])  # exits (fails the test) on an unknown subcommand or flag
        assert args.handler.__name__ == handler_name(args.command)  # the closure starts from the right function
        code = [dep for dep in stage["deps"] if dep.startswith("megacontext/")]
        assert code == command_code(args.command) and f"megacontext/{STAGE_CODE[args.command]}" in code, name
        assert all((ROOT / dep).exists() or dep.startswith(("artifacts/", "data")) for dep in stage["deps"])
        assert all(str(out).startswith("artifacts/") for out in stage["outs"])
        assert stage["params"] == [{"configs/${profile}.yaml": None}], f"stage {name} must track the selected profile"
    # the case that once slipped through: the cycle trains on trees, so editing tree.py must re-run it
    assert "megacontext/context/tree.py" in pipeline["stages"]["cycle"]["deps"]
    assert "megacontext/training/cycle.py" not in pipeline["stages"]["references"]["deps"]


def test_every_subcommand_has_its_handler_by_name() -> None:
    parser = _parser()
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sub in subcommands.items():
        assert sub.get_default("handler").__name__ == handler_name(name), name


def test_the_import_closure_follows_lazy_relative_and_from_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "megacontext"
    files = {
        "__init__.py": "",
        "cli.py": "import os\nfrom megacontext.a import x\ndef main():\n    _parser()\n    check()\n"
                  "def check():\n    from megacontext import checked\ndef _parser():\n    return cmd_other\n"
                  "def cmd_go(cfg, args):\n    helper()\n"
                  "def helper():\n    from megacontext.sub import lazy\ndef cmd_other(cfg, args):\n"
                  "    import megacontext.unused\n",
        "a.py": "x = 1\n",
        "unused.py": "",
        "sub/__init__.py": "",
        "sub/lazy.py": "def f():\n    from . import sibling\n    from ..b import y\n",
        "sub/sibling.py": "import torch\n",
        "b.py": "y = 2\n",
        "checked.py": "",
    }
    for name, body in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(body)
    assert command_code("go", tmp_path) == ["megacontext/__init__.py", "megacontext/a.py", "megacontext/b.py",
                                            "megacontext/checked.py", "megacontext/cli.py",
                                            "megacontext/sub/__init__.py", "megacontext/sub/lazy.py",
                                            "megacontext/sub/sibling.py"]
    assert command_code("other", tmp_path) == ["megacontext/__init__.py", "megacontext/a.py",
                                               "megacontext/checked.py", "megacontext/cli.py", "megacontext/unused.py"]
    assert import_closure({"megacontext.a.x"}, tmp_path) == {pkg / "__init__.py", pkg / "a.py"}


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
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    assert all("configs/tiny.yaml" in stage["params"] for stage in lock["stages"].values())  # the selected profile
    # the README's own commands after a repro: promotion reads DVC's report, an ablation writes beside it,
    # the audit only reads; none of them touches a stage's output, so DVC stays clean
    cli = [".venv/bin/megacontext"]
    assert "is the champion" in run(*cli, "promote", "--profile", "tiny", "--cycle", "1")
    run(*cli, "evaluate", "--profile", "tiny", "--checkpoint", "artifacts/cycles/cycle-0001", "--without", "lora")
    run(*cli, "audit", "artifacts/champion")
    assert "up to date" in run(str(DVC), "status")


def test_the_deps_rewrite_restores_a_stale_list_keeps_comments_and_refuses_layouts_it_cannot_edit() -> None:
    text = (ROOT / "dvc.yaml").read_text()
    commented = text.replace("  shards:\n", "# --- data ---\n  shards:\n").replace(
        "      - artifacts/data/corpus\n", "      # the raw documents\n      - artifacts/data/corpus\n")
    stale = commented.replace("      - megacontext/context/tree.py\n", "")  # an import nobody listed
    assert stale != commented and synced(stale) == commented
    for bad in (text.replace("    deps:\n      - data\n", "    deps: [data]\n", 1),
                text.replace("  corpus:\n", "  corpus:\n    foreach: [a, b]\n", 1)):
        with pytest.raises(ValueError, match="dvc.yaml: stage corpus"):
            synced(bad)
