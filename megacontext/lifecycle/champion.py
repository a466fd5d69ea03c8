"""The champion: the latest accepted cycle (docs/lifecycle.md §3–4). Promotion only after the gate passed.

A cycle is *accepted* when its validation report (`<cycle>/evaluation`) passed
the gate. `previous_accepted` finds the warm start for cycle n in code (the
newest accepted cycle before it). `promote` records the champion in
`artifacts/champion/` (champion.json + manifest, published atomically, linked
to the cycle's evaluation in the lineage) with the numbers the nightly
regression compares against, and appends to `history.jsonl`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from megacontext.config import Config, config_hash
from megacontext.errors import GateError
from megacontext.lifecycle.locks import locked
from megacontext.lifecycle.lineage import (MANIFEST, manifest_digest, read_manifest, stale_inputs, staged_artifact,
                                           verify_artifact, write_manifest)

KIND = "champion"
FORMAT_VERSION = 1
RECORDED = ("nll_full", "nll_recency", "nll_mc", "delta_nll", "gap_recovery", "mc_minus_recency")


def champion_dir(cfg: Config) -> Path:
    return Path(cfg.paths.artifact_root) / "champion"


def report_dir(cfg: Config, cycle_folder: Path, without: tuple[str, ...] = ()) -> Path:
    """Where the validation report of `cycle_folder` goes: `<artifact_root>/reports/<cycle name>[-without-...]`.

    Outside the cycle folder, so that evaluating a cycle never changes the cycle (its manifest, the DVC
    `cycle` stage's output) and the CLI, Dagster and the DVC `validate` stage all write and read one place.
    """
    suffix = "-without-" + "-".join(sorted(without)) if without else ""
    return Path(cfg.paths.artifact_root) / "reports" / f"{Path(cycle_folder).name}{suffix}"


def gate_passed(cfg: Config, cycle_folder: Path) -> bool | None:
    """The gate verdict of a cycle's validation report; None when it has not been evaluated."""
    manifest = report_dir(cfg, cycle_folder) / MANIFEST
    if not manifest.is_file():
        return None
    return bool(json.loads(manifest.read_text())["gate_passed"])


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
    verdict = gate_passed(cfg, cycle_folder)
    if verdict is None:
        older = " (a report inside the cycle folder is from an older layout and is not read)" \
            if (cycle_folder / "evaluation" / MANIFEST).is_file() else ""
        raise GateError(f"{cycle_folder}: not evaluated{older}; run `megacontext evaluate --checkpoint "
                        f"{cycle_folder}` first")
    reevaluate = f"re-evaluate it with `megacontext evaluate --checkpoint {cycle_folder}`"
    verify_artifact(report, kind="validation_report", repair=reevaluate)  # the verdict read is the one written
    evaluated = {(report / entry["path"]).resolve() for entry in read_manifest(report).get("inputs", [])}
    if cycle_folder.resolve() not in evaluated:  # e.g. another folder of the same name was evaluated since
        raise GateError(f"{report}: a report of another checkpoint, not of {cycle_folder}; {reevaluate}")
    stale = stale_inputs(report)
    if stale:
        raise GateError(f"{report}: evaluated before {cycle_folder.name} last changed ({stale[0]}); "
                        f"{reevaluate}")
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
