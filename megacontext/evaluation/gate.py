"""Summary statistics and the validation gate over a per-token results table (docs/lifecycle.md §4).

`summarize` turns an EVAL_SCHEMA table into mean NLLs, ΔNLL, gap recovery and per-level ΔNLL for
every method row (MegaContext, recency + LoRA, the attention oracle, the training-free focus, ...),
on all tokens, margin key tokens and LongPPL key tokens, each with a cluster bootstrap CI (samples
resampled, not tokens). `gate` decides on the point estimates only. Scoring the model is not done here.
Key tokens follow LongPPL (Fang et al. 2024, "What is Wrong with Perplexity for Long-context Language
Modeling?"); resampling whole samples rather than tokens is the cluster bootstrap (Field & Welsh 2007).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from megacontext.errors import MegaContextError
from megacontext.data.schemas import EVAL_SCHEMA, complete_eval_table, validate

LEVELS = ("lod1", "lod2")
_EPS = 1e-9  # nats/token: a recency-vs-full gap this small makes gap recovery undefined


class GateRefused(MegaContextError):
    """The evaluation setting cannot test compression (too long for the base, or nothing to compress)."""


class GateCheck(NamedTuple):
    name: str
    value: float
    threshold: float
    passed: bool


@dataclass(frozen=True)
class GateResult:
    passed: bool
    checks: tuple[GateCheck, ...]
    message: str


def check_gate_setting(*, history: int, horizon: int, w_max: int, base_positions: int) -> None:
    """Refuse a setting whose L + H exceeds the base's positions or whose L ≤ W_max."""
    if history + horizon > base_positions:
        raise GateRefused(
            f"eval.history + eval.horizon = {history} + {horizon} = {history + horizon} exceeds the base model's "
            f"{base_positions} positions; use a longer-context base (gate-8k needs >= 32k+H) or lower eval.history"
        )
    if history <= w_max:
        raise GateRefused(
            f"eval.history ({history}) <= wc.w_max ({w_max}): nothing to compress; raise eval.history above wc.w_max"
        )


# --- per-sample sums -------------------------------------------------------------------------
# S = samples, K = summed quantities, B = bootstrap resamples. Every metric is a ratio of sums, so
# resampling samples is a (B, S) count matrix times the (S, K) per-sample sums. Each method (a column
# of per-token NLLs) has four sums over the rows where it is present: count, its NLL, full, recency.

# method name -> results column; "full" and "recency" are the references every other row is measured against
METHODS = {
    "full": "nll_full", "recency": "nll_recency", "recency_adapted": "nll_recency_adapted", "mc": "nll_mc",
    "lod1": "nll_mc_lod1", "lod2": "nll_mc_lod2", "oracle": "nll_oracle", "training_free": "nll_training_free",
    "oracle_raw": "nll_oracle_raw", "training_free_raw": "nll_training_free_raw",
}
_PARTS = ("n", "nll", "full", "recency")
METHOD_METRICS = ("nll", "delta_nll", "minus_recency", "gap_recovery")


def _sum_exprs(mask: pl.Expr) -> list[pl.Expr]:
    exprs = []
    for method, column in METHODS.items():
        present = mask & pl.col(column).is_not_null()
        exprs.append(present.cast(pl.Float64).sum().alias(f"{method}:n"))
        for part, source in (("nll", column), ("full", "nll_full"), ("recency", "nll_recency")):
            exprs.append(pl.when(present).then(pl.col(source)).otherwise(None).sum().alias(f"{method}:{part}"))
    return exprs


def _columns() -> list[str]:
    return [f"{m}:{p}" for m in METHODS for p in _PARTS]


def _per_sample_sums(table: pl.DataFrame, mask: pl.Expr) -> np.ndarray:
    """(S, K) sums in _columns() order; sorted first so neither sample order nor summation order depends on row order."""
    sums = table.sort("doc_id", "cursor", "t").group_by("doc_id", "cursor", maintain_order=True).agg(_sum_exprs(mask))
    return sums.select(_columns()).fill_null(0.0).to_numpy().astype(np.float64)


def _method_metrics(totals: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per method: NLL, ΔNLL vs full, minus recency, gap recovery from (..., K) totals; NaN where undefined."""
    cols = dict(zip(_columns(), np.moveaxis(totals, -1, 0)))
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for method in METHODS:
            n = cols[f"{method}:n"]
            n = np.where(n > 0, n, np.nan)
            nll, full, recency = (cols[f"{method}:{p}"] / n for p in ("nll", "full", "recency"))
            gap = recency - full
            out[method] = {"nll": nll, "delta_nll": nll - full, "minus_recency": nll - recency,
                           "gap_recovery": np.where(np.abs(gap) > _EPS, (recency - nll) / gap, np.nan)}
    return out


def _metrics(totals: np.ndarray, best_recency: str) -> dict[str, np.ndarray]:
    """The flat metrics of the report and the gate (and every method's) from (..., K) totals."""
    m = _method_metrics(totals)
    flat = {
        "nll_full": m["full"]["nll"], "nll_recency": m["recency"]["nll"], "nll_mc": m["mc"]["nll"],
        "delta_nll": m["mc"]["delta_nll"], "mc_minus_recency": m["mc"]["minus_recency"],
        "gap_recovery": m["mc"]["gap_recovery"], "delta_nll_lod1": m["lod1"]["delta_nll"],
        "delta_nll_lod2": m["lod2"]["delta_nll"], "nll_recency_adapted": m["recency_adapted"]["nll"],
        # NLL_mc − the stronger recency baseline (on the rows where both exist)
        "mc_minus_best_recency": m["mc"]["nll"] - m[best_recency]["nll"] if best_recency == "recency"
        else m["mc"]["delta_nll"] - m[best_recency]["delta_nll"],
    }
    for method, metrics in m.items():
        for name, value in metrics.items():
            flat[f"{method}/{name}"] = value
    return flat


def _resample_counts(n_samples: int, bootstrap_samples: int, seed: int) -> np.ndarray:
    """(B, S) how often each sample is drawn in each resample (S draws with replacement)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_samples, size=(bootstrap_samples, n_samples))  # (B, S)
    flat = (np.arange(bootstrap_samples)[:, None] * n_samples + idx).ravel()
    return np.bincount(flat, minlength=bootstrap_samples * n_samples).reshape(bootstrap_samples, n_samples)


def _with_ci(point: np.ndarray, draws: np.ndarray, confidence: float) -> dict[str, Any]:
    if not np.isfinite(point):
        return {"value": None, "ci": None}
    finite = draws[np.isfinite(draws)]
    if finite.size == 0:
        return {"value": float(point), "ci": None}
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return {"value": float(point), "ci": [float(lo), float(hi)]}


def cluster_mean_ci(sums: np.ndarray, counts: np.ndarray, *, bootstrap_samples: int, confidence: float,
                    seed: int) -> dict[str, Any]:
    """Token-weighted mean sum(sums)/sum(counts) over clusters (windows, samples), with a cluster-bootstrap CI.

    `sums` and `counts` are [S] per cluster (e.g. a window's summed per-token NLL difference and its
    token count). Returns {"value", "ci": [lo, hi]} like the report's metrics (CI None for one cluster).
    """
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    point = sums.sum() / counts.sum()
    if len(sums) < 2:
        return {"value": float(point), "ci": None}
    draws = _resample_counts(len(sums), bootstrap_samples, seed)  # (B, S)
    return _with_ci(point, (draws @ sums) / (draws @ counts), confidence)


def _summarize_subset(sums: np.ndarray, counts: np.ndarray, confidence: float, best_recency: str) -> dict[str, Any]:
    point = _metrics(sums.sum(axis=0), best_recency)  # (K,) -> scalars
    draws = _metrics(counts @ sums, best_recency)  # (B, S) @ (S, K) -> (B, K) -> (B,) per metric
    flat = {name: _with_ci(point[name], draws[name], confidence) for name in point if "/" not in name}
    methods: dict[str, dict[str, Any]] = {}
    for name in point:
        if "/" in name:
            method, metric = name.split("/")
            methods.setdefault(method, {})[metric] = _with_ci(point[name], draws[name], confidence)
    present = {m: int(sums[:, _columns().index(f"{m}:n")].sum()) for m in METHODS}
    flat["methods"] = {m: {"n_tokens": present[m], **v} for m, v in methods.items() if present[m]}
    return flat


def key_token_masks(*, margin: float, longppl_gain: float, longppl_floor: float) -> dict[str, pl.Expr]:
    """The key-token definitions as row masks over nll_full / nll_recency (nats).

    key: the full context lowers the NLL by more than `margin` over the recency window.
    longppl (LongPPL, Fang et al., ICLR 2025): log p_full − log p_short > `longppl_gain` and
    log p_full > `longppl_floor`, with the recency window as the short context.
    """
    gain = pl.col("nll_recency") - pl.col("nll_full")
    return {"key": gain > margin, "longppl": (gain > longppl_gain) & (-pl.col("nll_full") > longppl_floor)}


SUBSETS = ("all", "key", "longppl")


def summarize(
    table: pl.DataFrame, *, key_token_margin: float, bootstrap_samples: int, confidence: float, seed: int,
    longppl_gain: float = 2.0, longppl_floor: float = -2.0,
) -> dict[str, Any]:
    """Means (nats/token), ΔNLL, gap recovery and per-level ΔNLL with cluster-bootstrap CIs.

    For every subset (all tokens, margin key tokens, LongPPL key tokens) and every method row present
    in the table (MegaContext, the per-level WCs, recency through the cycle's LoRA, the attention
    oracle with and without gists, the training-free focus). Metrics that are undefined (no key
    tokens, a column all null, recency ≈ full) are None; resamples where a metric is undefined are
    left out of its CI. `mc_minus_best_recency` compares NLL_mc with the stronger recency baseline.
    """
    table = validate(complete_eval_table(table), EVAL_SCHEMA, where="eval results")
    if table.height == 0:
        raise MegaContextError("eval results: the table is empty; score at least one sample before summarizing")
    masks = {"all": pl.col("t").is_not_null(),  # every row (a literal would not broadcast)
             **key_token_masks(margin=key_token_margin, longppl_gain=longppl_gain, longppl_floor=longppl_floor)}
    sums = {name: _per_sample_sums(table, mask) for name, mask in masks.items()}
    counts = _resample_counts(sums["all"].shape[0], bootstrap_samples, seed)
    best = _best_recency(sums["all"])
    tokens_per_sample = table.group_by("doc_id", "cursor").len()["len"]
    out = {
        "n_docs": table["doc_id"].n_unique(),
        "n_samples": sums["all"].shape[0],
        "n_tokens": table.height,
        "horizon": int(tokens_per_sample.max()) if tokens_per_sample.n_unique() == 1 else None,
        "key_token_margin": key_token_margin,
        "longppl_thresholds": {"gain": longppl_gain, "floor": longppl_floor},
        "best_recency": best,
        "bootstrap": {"unit": "sample", "resamples": bootstrap_samples, "confidence": confidence, "seed": seed},
    }
    for name in SUBSETS:
        n_tokens = int(sums[name][:, 0].sum())
        out[name] = {"n_tokens": n_tokens, **_summarize_subset(sums[name], counts, confidence, best)}
        if name != "all":
            out[name]["n_samples"] = int((sums[name][:, 0] > 0).sum())
    return out


def _best_recency(sums: np.ndarray) -> str:
    """The stronger recency baseline on the point estimate: `recency_adapted` when present and lower."""
    point = _method_metrics(sums.sum(axis=0))
    adapted = point["recency_adapted"]["delta_nll"]
    if np.isfinite(adapted) and adapted < point["recency"]["delta_nll"]:
        return "recency_adapted"
    return "recency"


# --- the gate ------------------------------------------------------------------------------


def _fmt(metric: dict[str, Any]) -> str:
    if metric["value"] is None:
        return "n/a"
    ci = metric["ci"]
    return f"{metric['value']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def gate(summary: dict[str, Any], *, delta_nll_max: float) -> GateResult:
    """Pass iff ΔNLL ≤ delta_nll_max and NLL_mc < the stronger recency baseline (all tokens, point estimates).

    The stronger recency baseline is NLL_recency, or NLL_recency_adapted (the same window read through the
    cycle's LoRA) when that is lower: adapters must not be credited to the working context.
    """
    metrics = summary["all"]
    delta, mc = metrics["delta_nll"]["value"], metrics["nll_mc"]["value"]
    best = summary.get("best_recency", "recency")
    recency = metrics["nll_recency_adapted" if best == "recency_adapted" else "nll_recency"]
    margin = metrics.get("mc_minus_best_recency", metrics["mc_minus_recency"])
    name = "NLL_recency_adapted" if best == "recency_adapted" else "NLL_recency"
    checks = (
        GateCheck("delta_nll <= delta_nll_max", delta, delta_nll_max, delta <= delta_nll_max),
        GateCheck(f"nll_mc < {name.lower()}", mc, recency["value"], margin["value"] < 0),
    )
    passed = all(c.passed for c in checks)
    level = int(round(summary["bootstrap"]["confidence"] * 100))
    message = (
        f"gate {'PASSED' if passed else 'FAILED'} ({level}% CIs): "
        f"ΔNLL {_fmt(metrics['delta_nll'])} {'<=' if checks[0].passed else '>'} {delta_nll_max:g}; "
        f"NLL_mc {_fmt(metrics['nll_mc'])} {'<' if checks[1].passed else '>='} "
        f"{name} {_fmt(recency)} (NLL_mc - {name} {_fmt(margin)})"
    )
    return GateResult(passed=passed, checks=checks, message=message)
