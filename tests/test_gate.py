"""Summary statistics, cluster bootstrap, refusal rules and the gate on synthetic tables with known answers."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from megacontext.errors import MegaContextError
from megacontext.evaluation.gate import GateRefused, check_gate_setting, gate, summarize
from megacontext.data.schemas import EVAL_LEVEL_COLUMNS, EVAL_SCHEMA, SchemaViolation, validate

BOOT = {"key_token_margin": 0.5, "bootstrap_samples": 400, "confidence": 0.95, "seed": 0}


def make_table(full, recency, mc, lod1=None, lod2=None, *, first_doc: int = 0, **rows) -> pl.DataFrame:
    """An EVAL_SCHEMA table from (S, H) arrays: sample s is doc s (+first_doc) at cursor 100.

    `rows`: optional method columns by name without the `nll_` prefix (recency_adapted, oracle, ...)."""
    full, recency, mc = (np.asarray(a, dtype=np.float64) for a in (full, recency, mc))
    n_samples, horizon = full.shape

    def level(values) -> pl.Series:
        if values is None:
            return pl.Series([None] * full.size, dtype=pl.Float64)
        return pl.Series(np.asarray(values, dtype=np.float64).ravel(), dtype=pl.Float64)

    return pl.DataFrame({
        "doc_id": pl.Series([f"{first_doc + s:016x}" for s in range(n_samples) for _ in range(horizon)], dtype=pl.Utf8),
        "cursor": pl.Series([100] * full.size, dtype=pl.Int64),
        "t": pl.Series(np.tile(np.arange(horizon), n_samples), dtype=pl.Int32),
        "token": pl.Series(np.arange(full.size) % 50_000, dtype=pl.UInt32),
        "nll_full": full.ravel(), "nll_recency": recency.ravel(), "nll_mc": mc.ravel(),
        "nll_mc_lod1": level(lod1), "nll_mc_lod2": level(lod2),
        **{c: level(rows.get(c.removeprefix("nll_"))) for c in EVAL_LEVEL_COLUMNS[2:]},
    })


def random_table(n_samples: int, horizon: int = 8, seed: int = 1, *, mc_gap: float = 0.05) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    full = rng.gamma(2.0, 1.0, (n_samples, horizon)) + rng.normal(0, 0.5, (n_samples, 1)).clip(-1, None) + 1
    recency = full + rng.exponential(0.6, (n_samples, horizon))
    mc = full + rng.exponential(mc_gap, (n_samples, horizon))
    return make_table(full, recency, mc, lod1=mc + 0.02, lod2=mc + 0.08)


def width(metric: dict) -> float:
    return metric["ci"][1] - metric["ci"][0]


# --- known answers -------------------------------------------------------------------------


def test_mc_equal_to_full_recovers_the_whole_gap_and_passes() -> None:
    full = np.full((5, 4), 2.0)
    s = summarize(make_table(full, full + 1.0, full), **BOOT)
    a = s["all"]
    assert (a["nll_full"]["value"], a["nll_recency"]["value"], a["nll_mc"]["value"]) == (2.0, 3.0, 2.0)
    assert a["delta_nll"] == {"value": 0.0, "ci": [0.0, 0.0]}
    assert a["gap_recovery"]["value"] == 1.0
    assert (s["n_docs"], s["n_samples"], s["n_tokens"], s["horizon"]) == (5, 5, 20, 4)
    result = gate(s, delta_nll_max=0.1)
    assert result.passed and [c.passed for c in result.checks] == [True, True]


def test_mc_equal_to_recency_recovers_nothing_and_fails_the_second_check() -> None:
    full = np.full((5, 4), 2.0)
    s = summarize(make_table(full, full + 0.0625, full + 0.0625), **BOOT)
    assert s["all"]["gap_recovery"]["value"] == 0.0
    assert s["all"]["delta_nll"]["value"] == 0.0625
    result = gate(s, delta_nll_max=0.1)
    assert not result.passed
    assert [(c.name, c.passed) for c in result.checks] == [("delta_nll <= delta_nll_max", True), ("nll_mc < nll_recency", False)]
    assert result.message.startswith("gate FAILED") and "NLL_mc 2.0625 [2.0625, 2.0625] >= NLL_recency" in result.message


def test_gap_recovery_is_a_ratio_of_means() -> None:
    full = np.array([[1.0, 3.0], [2.0, 2.0]])
    recency = full + np.array([[2.0, 0.0], [1.0, 1.0]])  # mean gap 1.0
    mc = full + np.array([[0.5, 0.0], [0.25, 0.25]])  # mean ΔNLL 0.25
    s = summarize(make_table(full, recency, mc), **BOOT)["all"]
    assert s["delta_nll"]["value"] == pytest.approx(0.25)
    assert s["gap_recovery"]["value"] == pytest.approx(0.75)
    assert s["mc_minus_recency"]["value"] == pytest.approx(-0.75)


@pytest.mark.parametrize(("delta", "threshold", "passes"), [(0.099, 0.1, True), (0.101, 0.1, False), (0.125, 0.125, True)])
def test_delta_nll_threshold_is_inclusive_on_the_point_estimate(delta: float, threshold: float, passes: bool) -> None:
    full = np.full((6, 4), 2.0)
    s = summarize(make_table(full, full + 1.0, full + delta), **BOOT)
    result = gate(s, delta_nll_max=threshold)
    assert result.passed is passes
    assert result.checks[0].value == pytest.approx(delta) and result.checks[0].threshold == threshold
    assert result.checks[1].passed
    assert f"ΔNLL {delta:.4f} [{delta:.4f}, {delta:.4f}] {'<=' if passes else '>'} {threshold:g}" in result.message


def test_gap_recovery_is_none_when_recency_matches_full() -> None:
    full = np.full((3, 4), 2.0)
    s = summarize(make_table(full, full, full + 0.5), **BOOT)
    assert s["all"]["gap_recovery"] == {"value": None, "ci": None}
    assert s["all"]["delta_nll"]["value"] == 0.5
    rounding = full.copy()
    rounding[0, 0] += 1e-12  # a rounding-size gap is no gap: no ratio blown up to ~1e11
    assert summarize(make_table(full, rounding, full + 0.5), **BOOT)["all"]["gap_recovery"]["value"] is None


# --- key tokens and levels -----------------------------------------------------------------


def test_key_tokens_are_those_recency_loses_by_more_than_the_margin() -> None:
    full = np.tile([1.0, 1.0, 1.0, 1.0], (3, 1))
    recency = full + np.array([0.0, 0.5, 0.625, 2.0])  # 0.5 is not > 0.5: two key tokens per sample
    mc = full + np.array([0.0, 0.0, 0.125, 0.5])
    s = summarize(make_table(full, recency, mc), **BOOT)
    key = s["key"]
    assert (key["n_tokens"], key["n_samples"], s["all"]["n_tokens"]) == (6, 3, 12)
    assert key["nll_recency"]["value"] == pytest.approx((1.625 + 3.0) / 2)
    assert key["delta_nll"]["value"] == pytest.approx((0.125 + 0.5) / 2)
    assert key["gap_recovery"]["value"] == pytest.approx(1 - 0.3125 / 1.3125)
    strict = summarize(make_table(full, recency, mc), **{**BOOT, "key_token_margin": 1.0})["key"]
    assert (strict["n_tokens"], strict["delta_nll"]["value"]) == (3, 0.5)


def test_no_key_tokens_reports_none_not_nan() -> None:
    full = np.full((3, 4), 2.0)
    key = summarize(make_table(full, full + 0.25, full), **BOOT)["key"]
    assert (key["n_tokens"], key["n_samples"]) == (0, 0)
    assert key["nll_mc"] == {"value": None, "ci": None} and key["delta_nll"] == {"value": None, "ci": None}


def test_per_level_delta_nll_pairs_present_rows_and_is_none_when_absent() -> None:
    full = np.array([[1.0, 2.0], [3.0, 4.0]])
    lod1 = full + np.array([[0.25, 0.25], [0.75, 0.75]])
    s = summarize(make_table(full, full + 1, full, lod1=lod1), **BOOT)["all"]
    assert s["delta_nll_lod1"]["value"] == pytest.approx(0.5)
    assert s["delta_nll_lod2"] == {"value": None, "ci": None}
    partial = make_table(full, full + 1, full, lod1=lod1).with_columns(
        pl.when(pl.col("cursor") == 100, pl.col("t") == 0).then(None).otherwise(pl.col("nll_mc_lod1")).alias("nll_mc_lod1"))
    assert summarize(partial, **BOOT)["all"]["delta_nll_lod1"]["value"] == pytest.approx(0.5)  # t=1 rows only


# --- bootstrap -----------------------------------------------------------------------------


def test_ci_contains_the_point_estimate_and_narrows_with_more_samples() -> None:
    small = summarize(random_table(20), **BOOT)["all"]
    large = summarize(random_table(320), **BOOT)["all"]
    for metric in ("nll_full", "nll_recency", "nll_mc", "delta_nll", "gap_recovery", "delta_nll_lod1", "delta_nll_lod2"):
        for s in (small, large):
            assert s[metric]["ci"][0] <= s[metric]["value"] <= s[metric]["ci"][1], metric
        assert width(large[metric]) < 0.5 * width(small[metric]), metric  # ~1/sqrt(16) expected


def test_bootstrap_is_deterministic_for_a_seed_and_ignores_row_order() -> None:
    table = random_table(30)
    first = summarize(table, **BOOT)
    assert summarize(table, **BOOT) == first
    assert summarize(table.sample(fraction=1.0, shuffle=True, seed=3), **BOOT) == first
    other = summarize(table, **{**BOOT, "seed": 1})
    assert other["all"]["nll_mc"]["value"] == first["all"]["nll_mc"]["value"]
    assert other["all"]["nll_mc"]["ci"] != first["all"]["nll_mc"]["ci"]


def test_bootstrap_resamples_samples_not_tokens() -> None:
    rng = np.random.default_rng(7)
    per_sample = rng.gamma(2.0, 1.0, (40, 1))  # one value per sample
    one = make_table(per_sample, per_sample + 1, per_sample + 0.1 * per_sample)
    # The same value repeated over 16 tokens of each sample: no new information, same CI.
    rep = np.repeat(per_sample, 16, axis=1)
    copied = summarize(make_table(rep, rep + 1, rep + 0.1 * rep), **BOOT)["all"]
    base = summarize(one, **BOOT)["all"]
    for metric in ("nll_full", "delta_nll"):
        assert copied[metric]["ci"] == pytest.approx(base[metric]["ci"], rel=1e-12)
    # Those 640 tokens as 640 independent one-token samples: a token-level bootstrap, ~4x narrower.
    flat = rep.reshape(-1, 1)
    token_level = summarize(make_table(flat, flat + 1, flat + 0.1 * flat), **BOOT)["all"]
    assert width(token_level["nll_full"]) < 0.35 * width(copied["nll_full"])
    # Twice as many distinct samples (each duplicated under a new doc id): ~1/sqrt(2) narrower.
    doubled = pl.concat([one, make_table(per_sample, per_sample + 1, per_sample + 0.1 * per_sample, first_doc=40)])
    ratio = width(summarize(doubled, **{**BOOT, "bootstrap_samples": 2000})["all"]["nll_full"]) / width(
        summarize(one, **{**BOOT, "bootstrap_samples": 2000})["all"]["nll_full"])
    assert 0.6 < ratio < 0.85


# --- refusal and validation ----------------------------------------------------------------


def test_settings_that_cannot_test_compression_are_refused() -> None:
    check_gate_setting(history=8_128, horizon=64, w_max=2_048, base_positions=8_192)
    with pytest.raises(GateRefused, match=r"^eval.history \+ eval.horizon = 32768 \+ 64 = 32832 exceeds the base "
                                          r"model's 8192 positions; use a longer-context base \(gate-8k needs >= 32k\+H\)"):
        check_gate_setting(history=32_768, horizon=64, w_max=8_192, base_positions=8_192)
    with pytest.raises(GateRefused, match=r"eval.history \(8129\) \+|8129 \+ 64 = 8193 exceeds"):
        check_gate_setting(history=8_129, horizon=64, w_max=2_048, base_positions=8_192)
    with pytest.raises(GateRefused, match=r"^eval.history \(2048\) <= wc.w_max \(2048\): nothing to compress"):
        check_gate_setting(history=2_048, horizon=64, w_max=2_048, base_positions=8_192)
    assert issubclass(GateRefused, MegaContextError)


def test_schema_rejects_bad_nlls_and_duplicate_rows_showing_the_row() -> None:
    good = make_table(np.full((2, 3), 1.0), np.full((2, 3), 2.0), np.full((2, 3), 1.5))
    validate(good, EVAL_SCHEMA, where="good")

    def poke(column: str, value) -> pl.DataFrame:
        row = pl.int_range(pl.len()) == 4
        return good.with_columns(pl.when(row).then(pl.lit(value, dtype=pl.Float64)).otherwise(pl.col(column)).alias(column))

    with pytest.raises(SchemaViolation, match=r"nan: violates schema 'eval_results'.*nlls_finite_and_present.*'t': 1.*'nll_mc': nan"):
        validate(poke("nll_mc", float("nan")), EVAL_SCHEMA, where="nan")
    with pytest.raises(SchemaViolation, match=r"nlls_finite_and_present.*'nll_full': None"):
        validate(poke("nll_full", None), EVAL_SCHEMA, where="missing")
    with pytest.raises(SchemaViolation, match=r"nlls_finite_and_present.*'nll_mc_lod2': inf"):
        validate(poke("nll_mc_lod2", float("inf")), EVAL_SCHEMA, where="inf")
    with pytest.raises(SchemaViolation, match=r"'nll_recency' failed .*greater_than_or_equal_to.*-0.5"):
        validate(poke("nll_recency", -0.5), EVAL_SCHEMA, where="negative")
    with pytest.raises(SchemaViolation, match=r"not unique.*0000000000000001"):
        validate(pl.concat([good, good[4:5]]), EVAL_SCHEMA, where="duplicate")
    gap = good.filter(pl.int_range(pl.len()) != 4)  # sample 1 has t = 0, 2
    with pytest.raises(SchemaViolation, match=r"t_contiguous_from_zero_per_sample.*'t': 0"):
        validate(gap, EVAL_SCHEMA, where="gap")
    with pytest.raises(SchemaViolation, match="eval results: violates schema"):
        summarize(poke("nll_mc", float("nan")), **BOOT)


def test_an_empty_table_is_refused() -> None:
    empty = make_table(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(MegaContextError, match="table is empty"):
        summarize(empty, **BOOT)


def test_cluster_mean_ci_is_the_token_weighted_mean_with_a_cluster_bootstrap() -> None:
    from megacontext.evaluation.gate import cluster_mean_ci

    kw = {"bootstrap_samples": 500, "confidence": 0.95, "seed": 0}
    one = cluster_mean_ci(np.array([3.0]), np.array([4.0]), **kw)
    assert one == {"value": 0.75, "ci": None}  # one cluster: no interval
    same = cluster_mean_ci(np.array([2.0, 4.0]), np.array([4.0, 8.0]), **kw)  # both clusters at 0.5 per token
    assert same["value"] == 0.5 and same["ci"] == [0.5, 0.5]
    spread = cluster_mean_ci(np.array([0.0, 10.0]), np.array([10.0, 10.0]), **kw)
    assert spread["value"] == 0.5 and spread["ci"][0] == 0.0 and spread["ci"][1] == 1.0  # all-0 and all-1 resamples
