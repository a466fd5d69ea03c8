from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from megacontext.cli import main


def _args(tmp_path: Path) -> list[str]:
    return ["--profile", "tiny", f"paths.artifact_root={tmp_path / 'artifacts'}", f"paths.corpus_dir={tmp_path / 'data'}",
            "data.max_documents=4"]


def test_unknown_key_is_a_one_line_error_with_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["prepare-data", *_args(tmp_path), "data.bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'data.bogus'") and "\n" not in err
    assert not (tmp_path / "artifacts").exists()


def test_prepare_data_then_score_on_the_tiny_profile(tmp_path: Path, capsys) -> None:
    args = [*_args(tmp_path), "data.val_fraction=0", "data.test_fraction=0"]  # every document in train
    assert main(["prepare-data", *args]) == 0
    assert (tmp_path / "artifacts" / "data" / "shards" / "manifest.json").is_file()
    capsys.readouterr()
    assert main(["score", *args, "--split", "train", "--context", "512", "--horizon", "32", "--max-docs", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["documents"] == 2 and 4.5 < result["mean_nll"] < 6.5  # random tiny model: about ln(258) = 5.55
    assert main(["score", *args, "--split", "train", "--context", "70000"]) == 2
    assert "exceeds the base model's 65536 positions" in capsys.readouterr().err
    assert main(["score", *args, "--split", "train", "--context", "50000"]) == 2
    assert "error: no document in this split has 50064 tokens" in capsys.readouterr().err


def test_python_dash_m_and_config_command(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "megacontext", "config", "--profile", "tiny", "seed=3"],
                          capture_output=True, text=True, check=True)
    assert "seed: 3" in done.stdout and "kind: tiny" in done.stdout


def _range_checked_arguments():
    """(subcommand, flag, a value below its range) for every numeric argument of every subcommand."""
    import argparse

    from megacontext.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            kind = getattr(action.type, "__name__", "")
            if action.type in (int, float):
                raise AssertionError(f"{name} {action.option_strings}: a bare int/float type is not range-checked")
            if kind.startswith("integer >= "):
                yield name, action.option_strings[0], str(int(kind.removeprefix("integer >= ")) - 1)
            elif kind == "_temperature":
                yield name, action.option_strings[0], "1e-45"


def test_every_numeric_argument_is_range_checked_at_parse_time(tmp_path: Path, capsys) -> None:
    import pytest

    cases = list(_range_checked_arguments())
    flags = {(name, flag) for name, flag, _ in cases}
    assert {("train-cycle", "--cycle"), ("promote", "--cycle"), ("generate", "--top-k"), ("generate", "--temperature"),
            ("score", "--horizon"), ("inspect", "--points")} <= flags
    for name, flag, bad in cases:
        required = {"generate": ["--prompt-file", "p.txt"], "inspect": ["--prompt-file", "p.txt"],
                    "train-phase": ["--phase", "jt1"], "promote": [] if flag == "--cycle" else ["--cycle", "1"]}
        with pytest.raises(SystemExit) as exit_:
            main([name, *required.get(name, []), flag, bad, *_args(tmp_path)])
        assert exit_.value.code == 2, (name, flag)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"argument {flag}" in err and ("minimum" in err or "greedy" in err), err
    assert not (tmp_path / "artifacts").exists()  # refused before anything ran
    for alias in ("0", "-1"):  # cycle-0000 / cycle--001 would alias real folders
        with pytest.raises(SystemExit):
            main(["train-cycle", "--cycle", alias, *_args(tmp_path)])
    assert "below the minimum, 1" in capsys.readouterr().err


def test_generate_and_inspect_stop_at_eos_by_default_with_an_opt_out() -> None:
    from megacontext.cli import _parser

    for name in ("generate", "inspect"):
        assert _parser().parse_args([name, "--prompt-file", "p.txt"]).stop_at_eos is True
        assert _parser().parse_args([name, "--prompt-file", "p.txt", "--no-stop-at-eos"]).stop_at_eos is False


def test_asking_for_cuda_on_a_machine_without_it_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():  # pragma: no cover - CI and the dev machines have no GPU
        import pytest

        pytest.skip("this machine has CUDA: model.device=cuda is valid here")
    assert main(["prepare-data", *_args(tmp_path), "model.device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.device=cuda but this machine has no CUDA device" in err and "\n" not in err
    assert torch.get_default_device().type == "cpu" and not (tmp_path / "artifacts").exists()


def test_train_cycle_runs_n_cycles_each_warm_started_from_the_one_before(tmp_path: Path, capsys) -> None:
    args = [*_args(tmp_path), "data.val_fraction=0.45", "data.test_fraction=0", "train.jt1.steps=1", "train.jt2.steps=1",
            "train.jt3.steps=1", "train.label_snapshots=1", "train.gist_guard_windows=1", "train.lora.guard_windows=1"]
    assert main(["prepare-data", *args]) == 0
    assert main(["train-cycle", *args, "--cycles", "2"]) == 0
    cycles = tmp_path / "artifacts" / "cycles"
    first = json.loads((cycles / "cycle-0001" / "cycle.json").read_text())
    second = json.loads((cycles / "cycle-0002" / "cycle.json").read_text())
    assert first["previous"] is None and Path(second["previous"]) == cycles / "cycle-0001"
    assert not (cycles / "cycle-0003").exists()
    assert "warm-started from" in capsys.readouterr().out
