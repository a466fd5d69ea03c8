"""Write an evaluation's artifacts: results table, summary JSON, Markdown report and plot (docs/lifecycle.md §4).

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

from megacontext.evaluation.gate import GateResult
from megacontext.data.schemas import EVAL_SCHEMA, complete_eval_table, validate

_ROWS = (  # (summary key, Markdown label)
    ("nll_full", "NLL full (nats/token)"),
    ("nll_recency", "NLL recency"),
    ("nll_mc", "NLL MegaContext"),
    ("delta_nll", "ΔNLL = mc − full"),
    ("mc_minus_recency", "mc − recency"),
    ("gap_recovery", "gap recovery"),
)
_LEVEL_ROWS = (("delta_nll", "all levels (mc)"), ("delta_nll_lod1", "LOD1 only"), ("delta_nll_lod2", "LOD2 only"))
_SUBSETS = (("all", "all tokens"), ("key", "key tokens"), ("longppl", "LongPPL key tokens"))
# The bounds and baselines at the same budget, in the order the report lists them.
ROW_LABELS = {
    "full": "full context (no budget)",
    "recency": "recency (last W_max tokens)",
    "recency_adapted": "recency + the cycle's LoRA",
    "mc": "MegaContext (this evaluation's focus)",
    "lod1": "LOD1-only working context",
    "lod2": "LOD2-only working context",
    "oracle": "attention oracle (raw tail + top blocks, gists)",
    "training_free": "training-free focus (last-token attention, gists)",
    "oracle_raw": "attention oracle without gists",
    "training_free_raw": "training-free focus without gists",
}


def write_report(
    folder: Path, table: pl.DataFrame, summary: dict[str, Any], gate_result: GateResult | None,
    *, title: str, context: dict[str, Any], passkey: pl.DataFrame | None = None,
) -> dict[str, Path]:
    """Write results.parquet, summary.json, report.md and report.png (+ passkey.parquet and passkey.png
    when the summary has a passkey section) into `folder`; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": folder / "results.parquet",
        "summary": folder / "summary.json",
        "report": folder / "report.md",
        "plot": folder / "report.png",
    }
    validate(complete_eval_table(table), EVAL_SCHEMA, where=str(paths["results"])).write_parquet(paths["results"])
    if passkey is not None and "passkey" in summary:
        paths["passkey"], paths["passkey_plot"] = folder / "passkey.parquet", folder / "passkey.png"
        passkey.write_parquet(paths["passkey"])
        _plot_passkey(summary["passkey"], paths["passkey_plot"])
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
        *([["LongPPL key tokens", f"{summary['longppl']['n_tokens']} in {summary['longppl']['n_samples']} samples "
                                  f"(recency − full > {summary['longppl_thresholds']['gain']:g} nats and "
                                  f"log p_full > {summary['longppl_thresholds']['floor']:g})"]]
          if "longppl" in summary else []),
        ["bootstrap", f"{boot['resamples']} resamples of {boot['unit']}s, seed {boot['seed']}, {level} percentile CI"],
    ]
    subsets = [f"{label} (n={summary[name]['n_tokens']})" for name, label in _SUBSETS]
    metrics = [[label, *(_cell(summary[name][m]) for name, _ in _SUBSETS)] for m, label in _ROWS]
    levels = [[label, *(_cell(summary[name][m]) for name, _ in _SUBSETS)] for m, label in _LEVEL_ROWS]
    lines = [f"# {title}", "", f"Gate: {verdict}", ""]
    health = summary.get("focus_health", {})
    if health.get("never_edits"):
        lines += ["**Warning: the learned focus never edits** — LensNet's scores never crossed the allocator's "
                  "thresholds (swap rate 0, no block expanded in any sample), so NLL_mc is the cold start's.", ""]
    if result is not None:
        lines += [f"> {result.message}", ""]
    lines += ["## Setting", "", *_table(["setting", "value"], setting), ""]
    lines += [f"## Metrics (mean, {level} CI)", "", *_table(["metric", *subsets], metrics), ""]
    lines += [f"## Per-level ΔNLL (mean − full, {level} CI)", "", *_table(["working context", *subsets], levels), ""]
    lines += _bounds_section(summary, level)
    lines += _passkey_section(summary)
    lines += _health_section(summary)
    if result is not None:
        rows = [[c.name, f"{c.value:.4f}", f"{c.threshold:.4f}", "pass" if c.passed else "FAIL"] for c in result.checks]
        lines += ["## Gate", "", *_table(["check", "value", "threshold", "result"], rows), ""]
    lines += [f"![NLL and per-level ΔNLL]({plot})", ""]
    return "\n".join(lines)


def _gap_cell(summary: dict[str, Any], subset: str, method: str, metric: str = "gap_recovery") -> str:
    entry = summary.get(subset, {}).get("methods", {}).get(method)
    return _cell(entry[metric]) if entry else "—"


def _bounds_section(summary: dict[str, Any], level: str) -> list[str]:
    methods = summary["all"].get("methods")
    if not methods:
        return []
    passkey = _passkey_by_placement(summary)
    header = ["row", "NLL (all)", "gap recovery (all)", f"gap recovery (key, n={summary['key']['n_tokens']})",
              f"gap recovery (LongPPL, n={summary.get('longppl', {}).get('n_tokens', 0)})", "− recency (all)",
              "passkey inside", "passkey outside"]
    rows = []
    for method, label in ROW_LABELS.items():
        if method not in methods:
            continue
        pk = passkey.get(method, {})
        rows.append([label, _gap_cell(summary, "all", method, "nll"), _gap_cell(summary, "all", method),
                     _gap_cell(summary, "key", method), _gap_cell(summary, "longppl", method),
                     _gap_cell(summary, "all", method, "minus_recency"), pk.get("inside", "—"), pk.get("outside", "—")])
    return [f"## Bounds and baselines at the same budget (mean, {level} CI)", "",
            "Gap recovery = (NLL_recency − NLL_row) / (NLL_recency − NLL_full). Passkey: exact-digit accuracy "
            "(greedy), all lengths.", "", *_table(header, rows), ""]


def _passkey_by_placement(summary: dict[str, Any]) -> dict[str, dict[str, str]]:
    """method -> placement -> "hits/trials" over all lengths."""
    out: dict[str, dict[str, list[float]]] = {}
    for setting in summary.get("passkey", {}).get("settings", []):
        for method, m in setting["methods"].items():
            hits = round(m["accuracy"]["value"] * setting["trials"])
            acc = out.setdefault(method, {}).setdefault(setting["placement"], [0, 0])
            acc[0] += hits
            acc[1] += setting["trials"]
    return {m: {p: f"{h}/{n}" for p, (h, n) in v.items()} for m, v in out.items()}


def _passkey_section(summary: dict[str, Any]) -> list[str]:
    if "passkey" not in summary:
        return []
    rows = []
    for s in summary["passkey"]["settings"]:
        for method, m in s["methods"].items():
            rows.append([f"{s['length']:,}", s["placement"], f"{s['median_distance']:,.0f}", ROW_LABELS.get(method, method),
                         str(s["trials"]), _cell(m["accuracy"]), _cell(m["logp"])])
    return ["## Passkey retrieval (exact digits, greedy; answer log-probability)", "",
            *_table(["prompt tokens", "key vs recency window", "median distance (tokens)", "row", "trials",
                     "accuracy", "log p(answer)"], rows), "", "![passkey accuracy](passkey.png)", ""]


def _health_section(summary: dict[str, Any]) -> list[str]:
    health = summary.get("focus_health")
    if not health:
        return []
    rows = [[ROW_LABELS.get(name, name), f"{h['expanded_blocks_per_sample']:g}", f"{h['samples_with_expansions']:.0%}",
             "—" if h["median_distance_tokens"] is None else f"{h['median_distance_tokens']:,.0f}",
             "—" if h["max_distance_tokens"] is None else f"{h['max_distance_tokens']:,.0f}"]
            for name, h in health["rows"].items()]
    return ["## Focus health", "", f"Swap rate of the learned focus: {health['swap_rate']:g} (actions per refocus per entry).",
            "", *_table(["row", "blocks read raw beyond the cold start (per sample)", "samples with any",
                         "median distance back (tokens)", "max distance back"], rows), ""]


def _plot_passkey(passkey: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(10, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    settings = passkey["settings"]
    methods = [m for m in ROW_LABELS if any(m in s["methods"] for s in settings)]
    width = 0.8 / max(len(methods), 1)
    for j, method in enumerate(methods):
        xs, ys, errs = [], [], [[], []]
        for i, s in enumerate(settings):
            m = s["methods"].get(method)
            if m is None:
                continue
            v, (lo, hi) = m["accuracy"]["value"], m["accuracy"]["ci"]
            xs.append(i + (j - (len(methods) - 1) / 2) * width)
            ys.append(v)
            errs[0].append(max(v - lo, 0.0))
            errs[1].append(max(hi - v, 0.0))
        ax.bar(xs, ys, width, yerr=errs, capsize=2, color=f"C{j}", label=method)
    ax.set_xticks(range(len(settings)), [f"{s['length']:,} tokens\nkey {s['placement']}" for s in settings])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact-digit accuracy")
    ax.set_title(f"Passkey retrieval ({passkey['bootstrap']['confidence']:.0%} bootstrap CI over trials)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


# --- plot ------------------------------------------------------------------------------------


def _bars(ax: Any, summary: dict[str, Any], metrics: tuple[str, ...], labels: tuple[str, ...]) -> None:
    """Grouped bars: one group per metric, one bar per subset (all / key), CI as error bars."""
    width = 0.8 / len(_SUBSETS)
    for j, (name, subset_label) in enumerate(_SUBSETS):
        for i, metric in enumerate(metrics):
            m = summary[name][metric]
            x = i + (j - (len(_SUBSETS) - 1) / 2) * width
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
