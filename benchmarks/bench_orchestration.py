"""Orchestration overhead: a tiny cycle through Dagster (in-process) vs the same through the CLI; a no-op `dvc repro`.

Both cycle runs start from the same prepared shards in fresh artifact folders and
run as fresh processes (imports included): the CLI as `train-cycle`, `evaluate
--checkpoint` and `promote`; Dagster as one `materialize` of the cycle group
(JT1 → labels → LensNet → LoRA → validation report + gate → champion) on an
ephemeral instance. Then the tiny `dvc.yaml` lifecycle is reproduced once in a
scratch repository and a second, no-op `dvc repro` is timed.

    .venv/bin/python -m benchmarks.bench_orchestration   (from the repository root)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.scratch_repo import DVC, scratch_dvc_repo

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
TINY = ["data.max_documents=5", "data.val_fraction=0.45", "data.test_fraction=0"]

DAGSTER_SCRIPT = """
import sys
from dagster import DagsterInstance, PipesSubprocessClient, materialize
from orchestration.assets.cycles import champion, gistnet, lens_labels, lensnet, lora_adapter, validation_report
from orchestration.resources import MegaContextConfig
mc = MegaContextConfig(profile="tiny", overrides=sys.argv[1:])
with DagsterInstance.ephemeral() as instance:
    instance.add_dynamic_partitions("cycles", ["cycle-0001"])
    result = materialize([gistnet, lens_labels, lensnet, lora_adapter, validation_report, champion],
                         partition_key="cycle-0001", instance=instance,
                         resources={"mc": mc, "pipes": PipesSubprocessClient()}, raise_on_error=False)
    print("materialized:", sorted(e.asset_key.to_user_string() for e in result.get_asset_materialization_events()))
"""


def _run(argv: list[str], cwd: Path = ROOT, check: bool = True) -> float:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    tick = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - tick
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds


def _overrides(root: Path, data: Path) -> list[str]:
    return [f"paths.artifact_root={root}", f"paths.data_root={data}", f"paths.corpus_dir={data / 'none'}", *TINY]


def cycle_overhead(work: Path) -> dict[str, float]:
    data = work / "shared"
    _run([str(BIN / "megacontext"), "prepare-data", "--profile", "tiny", *_overrides(work / "prep", data)])
    cli = work / "cli"
    mc = [str(BIN / "megacontext")]
    o = _overrides(cli, data)
    seconds_cli = _run([*mc, "train-cycle", "--profile", "tiny", "--cycle", "1", *o])
    seconds_cli += _run([*mc, "evaluate", "--profile", "tiny", "--checkpoint", str(cli / "cycles/cycle-0001"), *o])
    seconds_cli += _run([*mc, "promote", "--profile", "tiny", "--cycle", "1", *o], check=False)  # exit 1 = gate failed
    seconds_dagster = _run([str(BIN / "python"), "-c", DAGSTER_SCRIPT, *_overrides(work / "dagster", data)])
    return {"cli_seconds": seconds_cli, "dagster_seconds": seconds_dagster, "overhead_ratio": seconds_dagster / seconds_cli}


def noop_dvc_repro(work: Path, repeats: int) -> dict[str, float]:
    repo = scratch_dvc_repo(work / "dvc", lambda argv, cwd: _run(argv, cwd=cwd), profile="tiny")
    first = _run([str(DVC), "repro"], cwd=repo)
    noop = [_run([str(DVC), "repro"], cwd=repo) for _ in range(repeats)]
    return {"dvc_repro_full_tiny_seconds": first, "dvc_repro_noop_seconds_median": statistics.median(noop),
            "dvc_repro_noop_seconds_all": noop}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="no-op dvc repro timings")
    parser.add_argument("--out", default="artifacts/benchmarks/orchestration.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mc-bench-") as tmp:
        results = {**cycle_overhead(Path(tmp)), **noop_dvc_repro(Path(tmp), args.repeats)}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("| measure | value |\n|---|---|")
    print(f"| tiny cycle + evaluation + promotion via CLI (3 processes) | {results['cli_seconds']:.1f} s |")
    print(f"| the same via Dagster materialize, in-process executor (1 process) | {results['dagster_seconds']:.1f} s |")
    print(f"| overhead ratio Dagster / CLI | {results['overhead_ratio']:.2f} |")
    print(f"| dvc repro, tiny lifecycle from scratch | {results['dvc_repro_full_tiny_seconds']:.1f} s |")
    print(f"| dvc repro, nothing changed (median of {args.repeats}) | {results['dvc_repro_noop_seconds_median']:.2f} s |")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
