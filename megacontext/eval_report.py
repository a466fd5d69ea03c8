"""Write an evaluation's artifacts: results table, summary JSON, Markdown report and plot (DESIGN §4).

Input is what `gate.summarize` and `gate.gate` return; nothing is recomputed here except layout.
The plot uses the Agg backend on a private Figure and drops the Software tag, so it is byte-stable.
It deliberately computes no statistics and makes no pass/fail decision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megacontext.gate import GateResult
from megacontext.schemas import EVAL_SCHEMA, validate

_ROWS = (  # (summary key, Markdown label)
    ("nll_full", "NLL full (nats/token)"),
    ("nll_recency", "NLL recency"),
    ("nll_mc", "NLL MegaContext"),
    ("delta_nll", "ΔNLL = mc − full"),
    ("mc_minus_recency", "mc − recency"),
    ("gap_recovery", "gap recovery"),
)
_LEVEL_ROWS = (("delta_nll", "all levels (mc)"), ("delta_nll_lod1", "LOD1 only"), ("delta_nll_lod2", "LOD2 only"))
_SUBSETS = (("all", "all tokens"), ("key", "key tokens"))


def write_report(
    folder: Path, table: pl.DataFrame, summary: dict[str, Any], gate_result: GateResult | None,
    *, title: str, context: dict[str, Any],
) -> dict[str, Path]:
    """Write results.parquet, summary.json, report.md and report.png into `folder`; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": folder / "results.parquet",
        "summary": folder / "summary.json",
        "report": folder / "report.md",
        "plot": folder / "report.png",
    }
    validate(table, EVAL_SCHEMA, where=str(paths["results"])).write_parquet(paths["results"])
    payload = {"title": title, "context": context, **summary, "gate": _gate_dict(gate_result)}
    paths["summary"].write_text(json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False, default=str) + "\n")
    threshold = gate_result.checks[0].threshold if gate_result else None
    paths["report"].write_text(_markdown(summary, gate_result, title=title, context=context, plot=paths["plot"].name))
    _plot(summary, paths["plot"], title=title, delta_nll_max=threshold)
    return paths


def _gate_dict(result: GateResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    checks = [c._asdict() for c in result.checks]
    return {"passed": result.passed, "checks": checks, "message": result.message}


# --- Markdown --------------------------------------------------------------------------------


def _cell(metric: dict[str, Any]) -> str:
    if metric["value"] is None:
        return "n/a"
    ci = metric["ci"]
    return f"{metric['value']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else " (no CI)")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _markdown(
    summary: dict[str, Any], result: GateResult | None, *, title: str, context: dict[str, Any], plot: str
) -> str:
    boot = summary["bootstrap"]
    level = f"{boot['confidence']:.0%}"
    verdict = "not gated" if result is None else ("**PASSED**" if result.passed else "**FAILED**")
    key = summary["key"]
    setting = [[str(k), f"`{v}`"] for k, v in context.items()] + [
        ["documents", str(summary["n_docs"])],
        ["samples (doc, cursor)", str(summary["n_samples"])],
        ["tokens scored", str(summary["n_tokens"])],
        ["key tokens", f"{key['n_tokens']} in {key['n_samples']} samples "
                       f"(recency − full > {summary['key_token_margin']:g} nats)"],
        ["bootstrap", f"{boot['resamples']} resamples of {boot['unit']}s, seed {boot['seed']}, {level} percentile CI"],
    ]
    subsets = [f"{label} (n={summary[name]['n_tokens']})" for name, label in _SUBSETS]
    metrics = [[label, *(_cell(summary[name][m]) for name, _ in _SUBSETS)] for m, label in _ROWS]
    levels = [[label, *(_cell(summary[name][m]) for name, _ in _SUBSETS)] for m, label in _LEVEL_ROWS]
    lines = [f"# {title}", "", f"Gate: {verdict}", ""]
    if result is not None:
        lines += [f"> {result.message}", ""]
    lines += ["## Setting", "", *_table(["setting", "value"], setting), ""]
    lines += [f"## Metrics (mean, {level} CI)", "", *_table(["metric", *subsets], metrics), ""]
    lines += [f"## Per-level ΔNLL (mean − full, {level} CI)", "", *_table(["working context", *subsets], levels), ""]
    if result is not None:
        rows = [[c.name, f"{c.value:.4f}", f"{c.threshold:.4f}", "pass" if c.passed else "FAIL"] for c in result.checks]
        lines += ["## Gate", "", *_table(["check", "value", "threshold", "result"], rows), ""]
    lines += [f"![NLL and per-level ΔNLL]({plot})", ""]
    return "\n".join(lines)


# --- plot ------------------------------------------------------------------------------------


def _bars(ax: Any, summary: dict[str, Any], metrics: tuple[str, ...], labels: tuple[str, ...]) -> None:
    """Grouped bars: one group per metric, one bar per subset (all / key), CI as error bars."""
    width = 0.38
    for j, (name, subset_label) in enumerate(_SUBSETS):
        for i, metric in enumerate(metrics):
            m = summary[name][metric]
            x = i + (j - 0.5) * width
            if m["value"] is None:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7)
                continue
            err = None
            if m["ci"]:
                err = [[max(m["value"] - m["ci"][0], 0.0)], [max(m["ci"][1] - m["value"], 0.0)]]
            label = f"{subset_label} (n={summary[name]['n_tokens']})" if i == 0 else None
            ax.bar(x, m["value"], width, yerr=err, capsize=3, color=f"C{j}", label=label)
    ax.set_xticks(range(len(metrics)), labels)
    ax.axhline(0.0, color="black", linewidth=0.6)


def _plot(summary: dict[str, Any], path: Path, *, title: str, delta_nll_max: float | None) -> None:
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    _bars(left, summary, ("nll_full", "nll_recency", "nll_mc"), ("full", "recency", "MegaContext"))
    left.set_ylabel("NLL (nats/token)")
    left.set_title("Mean NLL")
    left.legend(fontsize=8)
    _bars(right, summary, tuple(m for m, _ in _LEVEL_ROWS), ("mc", "LOD1 only", "LOD2 only"))
    if delta_nll_max is not None:
        right.axhline(delta_nll_max, color="red", linestyle="--", linewidth=1, label=f"gate ΔNLL ≤ {delta_nll_max:g}")
        right.legend(fontsize=8)
    right.set_ylabel("ΔNLL vs full (nats/token)")
    right.set_title("Per-level ΔNLL")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
