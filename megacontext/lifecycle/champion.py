"""The champion: the latest accepted cycle (docs/lifecycle.md §3–4). Promotion only after the gate passed.

A cycle is *accepted* when its validation report (`<artifact_root>/reports/<cycle>`,
`report_dir`) is a report of that cycle as it is now and passed the gate. `previous_accepted` finds the warm start for cycle n in code (the
newest accepted cycle before it). `promote` records the champion in
`artifacts/champion/` (champion.json + manifest, published atomically, linked
to the cycle's validation report in the lineage) with the numbers the nightly
regression compares against, and appends to `history.jsonl`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Sequence

from megacontext.config import Config, config_hash
from megacontext.errors import ConfigError, GateError
from megacontext.lifecycle.locks import locked
from megacontext.lifecycle.lineage import (MANIFEST, manifest_digest, read_manifest, stale_inputs, staged_artifact,
                                           verify_artifact, write_manifest)

KIND = "champion"
FORMAT_VERSION = 1
RECORDED = ("nll_full", "nll_recency", "nll_mc", "delta_nll", "gap_recovery", "mc_minus_recency")


def champion_dir(cfg: Config) -> Path:
    return Path(cfg.paths.artifact_root) / "champion"


CYCLE_NAME = re.compile(r"cycle-(\d{4,})")


def report_dir(cfg: Config, cycle_folder: Path, without: Sequence[str] = ()) -> Path:
    """Where the validation report of `cycle_folder` goes: `<artifact_root>/reports/<cycle name>[-without-...]`.

    Outside the cycle folder, so that evaluating a cycle never changes the cycle (its manifest, the DVC
    `cycle` stage's output) and the CLI, Dagster and the DVC `validate` stage all write and read one place.

    Raises:
        ConfigError: `cycle_folder` (resolved: `.`, `..` and links followed) is not
            `<artifact_root>/cycles/cycle-NNNN`; a report of any other folder needs an explicit `--out`.
    """
    folder = Path(cycle_folder).resolve()
    cycles = (Path(cfg.paths.artifact_root) / "cycles").resolve()
    match = CYCLE_NAME.fullmatch(folder.name)
    if folder.parent != cycles or match is None or int(match[1]) < 1 or folder.name != f"cycle-{int(match[1]):04d}":
        raise ConfigError(f"{cycle_folder}: not a cycle folder of this artifact root ({cycles}/cycle-NNNN); "
                          "give its report a folder with --out")
    parts = sorted(set(without))
    return Path(cfg.paths.artifact_root) / "reports" / (folder.name + ("-without-" + "-".join(parts) if parts else ""))


def report_problem(cfg: Config, cycle_folder: Path) -> str | None:
    """Why the report at `report_dir` cannot stand for `cycle_folder` as it is now, or None when it can.

    Missing; written for another checkpoint (its recorded inputs do not include this folder); or stale (the
    cycle, or another input, changed after it was written: a retrained or rebuilt cycle keeps no old verdict).
    """
    report = report_dir(cfg, cycle_folder)
    reevaluate = f"re-evaluate it with `megacontext evaluate --checkpoint {cycle_folder}`"
    if not (report / MANIFEST).is_file():
        older = " (a report inside the cycle folder is from an older layout and is not read)" \
            if (Path(cycle_folder) / "evaluation" / MANIFEST).is_file() else ""
        return f"{cycle_folder}: not evaluated{older}; run `megacontext evaluate --checkpoint {cycle_folder}` first"
    evaluated = {(report / entry["path"]).resolve() for entry in read_manifest(report).get("inputs", [])}
    if Path(cycle_folder).resolve() not in evaluated:
        return f"{report}: a report of another checkpoint, not of {cycle_folder}; {reevaluate}"
    stale = stale_inputs(report)
    if stale:
        return f"{report}: evaluated before {Path(cycle_folder).name} last changed ({stale[0]}); {reevaluate}"
    return None


def gate_passed(cfg: Config, cycle_folder: Path) -> bool | None:
    """The gate verdict of the cycle's validation report; None when there is no report of it as it is now."""
    if report_problem(cfg, cycle_folder) is not None:
        return None
    return bool(read_manifest(report_dir(cfg, cycle_folder))["gate_passed"])


def cycle_folders(cfg: Config) -> dict[int, Path]:
    root = Path(cfg.paths.artifact_root) / "cycles"
    found = {}
    for folder in root.glob("cycle-*") if root.is_dir() else ():
        number = folder.name.removeprefix("cycle-")
        if number.isdigit() and folder.is_dir():
            found[int(number)] = folder
    return dict(sorted(found.items()))


def previous_accepted(cfg: Config, cycle: int) -> Path | None:
    """The newest cycle before `cycle` whose validation report passed the gate (its warm start), else None."""
    earlier = [folder for n, folder in cycle_folders(cfg).items() if n < cycle and gate_passed(cfg, folder)]
    return earlier[-1] if earlier else None


def current_champion(cfg: Config) -> dict[str, Any] | None:
    """The champion record (verified against its manifest first), or None when nothing was promoted.

    Raises:
        ArtifactError: the record or its history differs from the manifest: one line naming the file and
            the repair (delete the folder and promote the champion cycle again; the history restarts).
    """
    folder = champion_dir(cfg)
    path = folder / "champion.json"
    if not path.is_file() and not (folder / MANIFEST).is_file():
        return None
    verify_artifact(folder, kind=KIND, repair=f"delete {folder} and promote the champion cycle again "
                                               "(`megacontext promote --cycle N`; its history restarts)")
    return json.loads(path.read_text())


@locked(lambda cfg, cycle_folder: champion_dir(cfg))
def promote(cfg: Config, cycle_folder: Path) -> Path:
    """Make `cycle_folder` the champion; refuses (GateError) unless its validation report passed the gate."""
    cycle_folder = Path(cycle_folder)
    report = report_dir(cfg, cycle_folder)
    problem = report_problem(cfg, cycle_folder)
    if problem is not None:
        raise GateError(problem)
    reevaluate = f"re-evaluate it with `megacontext evaluate --checkpoint {cycle_folder}`"
    manifest = verify_artifact(report, kind="validation_report", repair=reevaluate)  # the verdict as written
    verdict = bool(manifest["gate_passed"])  # (report_problem above already vouched for this cycle)
    summary = json.loads((report / "summary.json").read_text())
    if not verdict:
        raise GateError(f"{cycle_folder.name} not promoted: {summary['gate']['message']}")
    previous = current_champion(cfg)
    record = {
        "cycle": int(cycle_folder.name.removeprefix("cycle-")),
        "cycle_path": str(cycle_folder),
        "evaluation_digest": manifest_digest(read_manifest(report)),
        "recorded": {k: summary["all"][k] for k in RECORDED if k in summary["all"]},
        "context": summary["context"],
        "yardstick": summary.get("yardstick"),  # the eval set the recorded numbers were measured on
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "previous_champion": previous["cycle"] if previous else None,
    }
    out = champion_dir(cfg)
    history = (out / "history.jsonl").read_text() if (out / "history.jsonl").is_file() else ""
    with staged_artifact(out) as staging:
        (staging / "champion.json").write_text(json.dumps(record, indent=2) + "\n")
        (staging / "history.jsonl").write_text(history + json.dumps(record) + "\n")
        write_manifest(staging, kind=KIND, format_version=FORMAT_VERSION,
                       config_hash=config_hash(cfg, sections=["eval", "wc"]), inputs=[report],
                       extra={"cycle": record["cycle"]})
    return out
