"""Summary statistics and the validation gate over a per-token results table (DESIGN §4).

`summarize` turns an EVAL_SCHEMA table into mean NLLs, ΔNLL, gap recovery and per-level ΔNLL,
for all tokens and for key tokens, each with a cluster bootstrap CI (samples resampled, not
tokens). `gate` decides on the point estimates only. Scoring the model is not done here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from megacontext.errors import MegaContextError
from megacontext.schemas import EVAL_SCHEMA, validate

LEVELS = ("lod1", "lod2")
METRICS = ("nll_full", "nll_recency", "nll_mc", "delta_nll", "mc_minus_recency", "gap_recovery",
           "delta_nll_lod1", "delta_nll_lod2")
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
# resampling samples is a (B, S) count matrix times the (S, K) per-sample sums.

_SUMS = ("n", "full", "recency", "mc", "n_lod1", "lod1_minus_full", "n_lod2", "lod2_minus_full")


def _sum_exprs(mask: pl.Expr) -> list[pl.Expr]:
    def masked(expr: pl.Expr) -> pl.Expr:
        return pl.when(mask).then(expr).otherwise(None)

    exprs = [mask.cast(pl.Float64).sum().alias("n")]
    exprs += [masked(pl.col(f"nll_{q}")).sum().alias(q) for q in ("full", "recency", "mc")]
    for level in LEVELS:
        present = mask & pl.col(f"nll_mc_{level}").is_not_null()
        exprs.append(present.cast(pl.Float64).sum().alias(f"n_{level}"))
        diff = pl.when(present).then(pl.col(f"nll_mc_{level}") - pl.col("nll_full")).otherwise(None)
        exprs.append(diff.sum().alias(f"{level}_minus_full"))
    return exprs


def _per_sample_sums(table: pl.DataFrame, mask: pl.Expr) -> np.ndarray:
    """(S, K) sums in _SUMS order; sorted first so neither sample order nor summation order depends on row order."""
    sums = table.sort("doc_id", "cursor", "t").group_by("doc_id", "cursor", maintain_order=True).agg(_sum_exprs(mask))
    return sums.select(_SUMS).fill_null(0.0).to_numpy().astype(np.float64)


def _metrics(totals: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics from (..., K) totals; NaN where undefined (no tokens, no level rows, no gap)."""
    t = dict(zip(_SUMS, np.moveaxis(totals, -1, 0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.where(t["n"] > 0, t["n"], np.nan)
        full, recency, mc = t["full"] / n, t["recency"] / n, t["mc"] / n
        gap = recency - full
        out = {
            "nll_full": full,
            "nll_recency": recency,
            "nll_mc": mc,
            "delta_nll": mc - full,
            "mc_minus_recency": mc - recency,
            "gap_recovery": np.where(np.abs(gap) > _EPS, (recency - mc) / gap, np.nan),
        }
        for level in LEVELS:
            n_level = np.where(t[f"n_{level}"] > 0, t[f"n_{level}"], np.nan)
            out[f"delta_nll_{level}"] = t[f"{level}_minus_full"] / n_level
    return out


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


def _summarize_subset(sums: np.ndarray, counts: np.ndarray, confidence: float) -> dict[str, Any]:
    point = _metrics(sums.sum(axis=0))  # (K,) -> scalars
    draws = _metrics(counts @ sums)  # (B, S) @ (S, K) -> (B, K) -> (B,) per metric
    return {name: _with_ci(point[name], draws[name], confidence) for name in METRICS}


def summarize(
    table: pl.DataFrame, *, key_token_margin: float, bootstrap_samples: int, confidence: float, seed: int
) -> dict[str, Any]:
    """Means (nats/token), ΔNLL, gap recovery and per-level ΔNLL with cluster-bootstrap CIs.

    Key tokens are rows with nll_recency - nll_full > key_token_margin. Metrics that are undefined
    (no key tokens, a level column all null, recency ≈ full) are None; resamples where a metric is
    undefined are left out of its CI.
    """
    table = validate(table, EVAL_SCHEMA, where="eval results")
    if table.height == 0:
        raise MegaContextError("eval results: the table is empty; score at least one sample before summarizing")
    key = (pl.col("nll_recency") - pl.col("nll_full")) > key_token_margin
    all_sums = _per_sample_sums(table, pl.col("t").is_not_null())  # every row (a literal would not broadcast)
    key_sums = _per_sample_sums(table, key)
    counts = _resample_counts(all_sums.shape[0], bootstrap_samples, seed)
    tokens_per_sample = table.group_by("doc_id", "cursor").len()["len"]
    n_key = int(key_sums[:, 0].sum())
    return {
        "n_docs": table["doc_id"].n_unique(),
        "n_samples": all_sums.shape[0],
        "n_tokens": table.height,
        "horizon": int(tokens_per_sample.max()) if tokens_per_sample.n_unique() == 1 else None,
        "key_token_margin": key_token_margin,
        "bootstrap": {"unit": "sample", "resamples": bootstrap_samples, "confidence": confidence, "seed": seed},
        "all": {"n_tokens": table.height, **_summarize_subset(all_sums, counts, confidence)},
        "key": {
            "n_tokens": n_key,
            "n_samples": int((key_sums[:, 0] > 0).sum()),
            **_summarize_subset(key_sums, counts, confidence),
        },
    }


# --- the gate ------------------------------------------------------------------------------


def _fmt(metric: dict[str, Any]) -> str:
    if metric["value"] is None:
        return "n/a"
    ci = metric["ci"]
    return f"{metric['value']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def gate(summary: dict[str, Any], *, delta_nll_max: float) -> GateResult:
    """Pass iff ΔNLL ≤ delta_nll_max and NLL_mc < NLL_recency (all tokens, point estimates)."""
    metrics = summary["all"]
    delta, mc, recency = (metrics[m]["value"] for m in ("delta_nll", "nll_mc", "nll_recency"))
    checks = (
        GateCheck("delta_nll <= delta_nll_max", delta, delta_nll_max, delta <= delta_nll_max),
        GateCheck("nll_mc < nll_recency", mc, recency, mc < recency),
    )
    passed = all(c.passed for c in checks)
    level = int(round(summary["bootstrap"]["confidence"] * 100))
    message = (
        f"gate {'PASSED' if passed else 'FAILED'} ({level}% CIs): "
        f"ΔNLL {_fmt(metrics['delta_nll'])} {'<=' if checks[0].passed else '>'} {delta_nll_max:g}; "
        f"NLL_mc {_fmt(metrics['nll_mc'])} {'<' if checks[1].passed else '>='} "
        f"NLL_recency {_fmt(metrics['nll_recency'])} (NLL_mc - NLL_recency {_fmt(metrics['mc_minus_recency'])})"
    )
    return GateResult(passed=passed, checks=checks, message=message)
