"""Nightly regression (docs/lifecycle.md §4): re-evaluate the champion on the fixed eval set, compare, write a dated report.

The eval set is fixed by the config (split by document hash, cursors and seed),
so an unchanged champion on unchanged code reproduces its recorded numbers; a champion
measured on another eval set (another reference-cache yardstick) is refused, not compared. A
metric that is now worse than recorded by more than `eval.noise_band` nats is a
regression. Each run publishes `artifacts/nightly/<YYYY-MM-DD>/` (nightly.json,
report.md, compare.png, the evaluation, a manifest linking the champion) and
appends a line to `artifacts/nightly/history.jsonl` (with a trend plot).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megacontext.lifecycle.champion import champion_dir, current_champion
from megacontext.config import Config, config_hash
from megacontext.errors import GateError
from megacontext.evaluation.evaluate import evaluate, passkey_accuracy
from megacontext.lifecycle.lineage import staged_artifact, write_manifest
from megacontext.lifecycle.locks import locked
from megacontext.evaluation.references import yardstick
from megacontext.lifecycle.tracking import start_run

KIND = "nightly_regression"
FORMAT_VERSION = 1
COMPARED = ("nll_mc", "delta_nll")  # lower is better; a rise beyond the band is a regression
SHOWN = ("nll_full", "nll_recency", "nll_mc", "delta_nll")


@dataclass(frozen=True)
class NightlyResult:
    passed: bool
    report: Path
    deltas: dict[str, float]


def nightly_root(cfg: Config) -> Path:
    return Path(cfg.paths.artifact_root) / "nightly"


def compare(recorded: dict, now: dict, band: float) -> tuple[bool, dict[str, float]]:
    """(passed, now − recorded per metric): fails when a compared metric rose by more than `band`."""
    deltas = {k: now[k]["value"] - recorded[k]["value"] for k in SHOWN if k in recorded and k in now}
    return all(deltas.get(k, 0.0) <= band for k in COMPARED), deltas


@locked(lambda cfg, **_: nightly_root(cfg))  # one nightly at a time: each appends to the shared history
def run_nightly(cfg: Config, *, day: dt.date | None = None) -> NightlyResult:
    champion = current_champion(cfg)
    if champion is None:
        raise GateError("no champion yet: run a cycle that passes the gate "
                        "(megacontext train-cycle, evaluate --checkpoint, then promote --cycle N)")
    if champion.get("yardstick") != yardstick(cfg):
        raise GateError(f"champion cycle {champion['cycle']} was measured on eval set {champion.get('yardstick')}, "
                        f"this config measures {yardstick(cfg)}: numbers from two eval sets are not comparable; "
                        f"re-evaluate it (megacontext evaluate --checkpoint {champion['cycle_path']}) and promote it "
                        "again, or run the nightly with the champion's eval settings")
    day = day or dt.datetime.now(dt.timezone.utc).date()
    root = nightly_root(cfg)
    out = root / day.isoformat()
    band = cfg.eval.noise_band
    with start_run(cfg.model_dump(mode="json"), name=f"nightly-{day.isoformat()}", group="nightly",
                   job_type="nightly_regression", directory=Path(cfg.paths.artifact_root)) as run:
        result = _run_nightly(cfg, champion, day, out, band)
        run.summary({"passed": result.passed, "cycle": champion["cycle"],
                     **{f"delta_{k}": v for k, v in result.deltas.items()}})
    return result


def _run_nightly(cfg: Config, champion: dict, day: dt.date, out: Path, band: float) -> NightlyResult:
    root = out.parent
    with staged_artifact(out) as staging:
        evaluation = evaluate(cfg, checkpoint=Path(champion["cycle_path"]), out=staging / "evaluation")
        summary = json.loads((evaluation / "summary.json").read_text())
        now = summary["all"]
        passed, deltas = compare(champion["recorded"], now, band)
        record = {"date": day.isoformat(), "cycle": champion["cycle"], "passed": passed, "noise_band": band,
                  "recorded": {k: champion["recorded"][k]["value"] for k in SHOWN if k in champion["recorded"]},
                  "now": {k: now[k]["value"] for k in SHOWN}, "deltas": deltas,
                  "passkey": passkey_accuracy(summary)}
        (staging / "nightly.json").write_text(json.dumps(record, indent=2) + "\n")
        (staging / "report.md").write_text(_markdown(record))
        _plot_compare(record, staging / "compare.png")
        write_manifest(staging, kind=KIND, format_version=FORMAT_VERSION,
                       config_hash=config_hash(cfg, sections=["eval", "wc"]), inputs=[champion_dir(cfg)],
                       extra={"cycle": champion["cycle"], "passed": passed})
    history = root / "history.jsonl"
    with history.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    if len(rows) >= 2:
        _plot_trend(rows, root / "trend.png")
    return NightlyResult(passed, out, deltas)


def _markdown(record: dict) -> str:
    verdict = "PASS" if record["passed"] else "REGRESSION"
    lines = [f"# Nightly regression {record['date']}: champion cycle {record['cycle']}", "",
             f"Verdict: **{verdict}** (noise band {record['noise_band']:g} nats/token on {', '.join(COMPARED)})", "",
             "| metric | recorded | now | now − recorded |", "|---|---|---|---|"]
    for key, delta in record["deltas"].items():
        flag = " ✗" if key in COMPARED and delta > record["noise_band"] else ""
        lines.append(f"| {key} | {record['recorded'][key]:.4f} | {record['now'][key]:.4f} | {delta:+.4f}{flag} |")
    if record.get("passkey"):
        lines += ["", "| passkey (length / key placement / row) | exact-digit accuracy |", "|---|---|"]
        lines += [f"| {key.removeprefix('passkey/')} | {value:.3f} |" for key, value in sorted(record["passkey"].items())]
    return "\n".join(lines + ["", "![recorded vs now](compare.png)", ""])


def _plot_compare(record: dict, path: Path) -> None:
    fig = Figure(figsize=(7, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    keys = list(record["deltas"])
    x = range(len(keys))
    ax.bar([i - 0.2 for i in x], [record["recorded"][k] for k in keys], width=0.4, label="recorded")
    ax.bar([i + 0.2 for i in x], [record["now"][k] for k in keys], width=0.4, label="now")
    ax.set_xticks(list(x), keys)
    ax.set_ylabel("nats/token")
    ax.set_title(f"champion cycle {record['cycle']}, {record['date']}: {'pass' if record['passed'] else 'REGRESSION'}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def _plot_trend(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(7, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for key in COMPARED:
        ax.plot([r["date"] for r in rows], [r["now"][key] for r in rows], marker="o", label=key)
    ax.set_ylabel("nats/token")
    ax.set_title("nightly regression trend")
    ax.legend(fontsize=8, loc="upper left")
    keys = sorted({k for r in rows for k in r.get("passkey", {}) if k.endswith("/outside/mc")})
    if keys:  # passkey accuracy with the key outside the recency window, on its own axis
        right = ax.twinx()
        for key in keys:
            right.plot([r["date"] for r in rows], [r.get("passkey", {}).get(key) for r in rows], marker="s",
                       linestyle="--", label=key.removeprefix("passkey/"))
        right.set_ylim(0, 1.05)
        right.set_ylabel("passkey accuracy (key outside recency)")
        right.legend(fontsize=7, loc="upper right")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
