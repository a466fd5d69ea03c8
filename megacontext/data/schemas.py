"""Pandera (polars) schemas for the tables the lifecycle writes (docs/lifecycle.md §5).

A table is validated before it is written and when it is read back; a bad row
raises `SchemaViolation` with the offending row shown. Label, evaluation and
telemetry tables join this module as their phases arrive.
"""

from __future__ import annotations

import pandera.polars as pa
import polars as pl

from megacontext.errors import ArtifactError

SPLITS = ("train", "val", "test")


class SchemaViolation(ArtifactError):
    """A table does not match its schema; the message shows the failing rows."""


def _tokens_match_count(data: pa.PolarsData) -> pl.LazyFrame:
    return data.lazyframe.select(pl.col("tokens").list.len() == pl.col("n_tokens"))


SHARD_SCHEMA = pa.DataFrameSchema(
    {
        "doc_id": pa.Column(pl.Utf8, unique=True, checks=pa.Check.str_matches(r"^[0-9a-f]{16}$")),
        "source": pa.Column(pl.Utf8, checks=pa.Check.str_length(min_value=1)),
        "split": pa.Column(pl.Utf8, checks=pa.Check.isin(SPLITS)),
        "n_tokens": pa.Column(pl.Int64, checks=pa.Check.ge(1)),
        "tokens": pa.Column(pl.List(pl.UInt32)),
    },
    checks=[pa.Check(_tokens_match_count, name="tokens_length_equals_n_tokens")],
    strict=True,
    ordered=True,
    name="dataset_shard",
)


def validate(df: pl.DataFrame, schema: pa.DataFrameSchema, where: str) -> pl.DataFrame:
    """Validate `df` or raise `SchemaViolation` naming `where` and showing the bad rows."""
    try:
        with pl.Config(tbl_cols=-1, tbl_width_chars=10_000, fmt_str_lengths=64):  # show failing rows whole
            return schema.validate(df)
    except (pa.errors.SchemaError, pa.errors.SchemaDefinitionError) as exc:
        message = " ".join(str(exc).split())
        raise SchemaViolation(f"{where}: violates schema '{schema.name}': {message}") from None


# Evaluation results (docs/lifecycle.md §4): one row per scored horizon token of one sample (doc_id, cursor).
EVAL_NLL_COLUMNS = ("nll_full", "nll_recency", "nll_mc")
# Optional rows (null where a sample has no such working context): per-level WCs, the bounds and baselines.
EVAL_LEVEL_COLUMNS = ("nll_mc_lod1", "nll_mc_lod2", "nll_recency_adapted", "nll_oracle", "nll_training_free",
                      "nll_oracle_raw", "nll_training_free_raw")
_SAMPLE = ("doc_id", "cursor")


def _nlls_are_finite(data: pa.PolarsData) -> pl.LazyFrame:
    # A frame-level check (not nullable=False) so a NaN or missing NLL is reported with its row.
    required = [pl.col(c).is_finite().fill_null(False) for c in EVAL_NLL_COLUMNS]
    optional = [pl.col(c).is_null() | pl.col(c).is_finite() for c in EVAL_LEVEL_COLUMNS]
    return data.lazyframe.select(pl.all_horizontal(*required, *optional))


def _t_is_contiguous_from_zero(data: pa.PolarsData) -> pl.LazyFrame:
    # With (doc_id, cursor, t) unique, min 0 and max n-1 means t runs 0..n-1 within each sample.
    t = pl.col("t")
    return data.lazyframe.select(
        (t.min().over(_SAMPLE) == 0) & (t.max().over(_SAMPLE) == pl.len().over(_SAMPLE).cast(pl.Int64) - 1)
    )


def complete_eval_table(df: pl.DataFrame) -> pl.DataFrame:
    """Add the optional NLL columns a table lacks (as nulls), in schema order: tables from before they existed."""
    missing = [c for c in EVAL_LEVEL_COLUMNS if c not in df.columns]
    if not missing:
        return df
    df = df.with_columns(pl.lit(None, dtype=pl.Float64).alias(c) for c in missing)
    return df.select([c for c in ("doc_id", "cursor", "t", "token", *EVAL_NLL_COLUMNS, *EVAL_LEVEL_COLUMNS)
                      if c in df.columns] + [c for c in df.columns if c not in {"doc_id", "cursor", "t", "token",
                                                                                    *EVAL_NLL_COLUMNS, *EVAL_LEVEL_COLUMNS}])


EVAL_SCHEMA = pa.DataFrameSchema(
    {
        "doc_id": pa.Column(pl.Utf8, checks=pa.Check.str_matches(r"^[0-9a-f]{16}$")),
        "cursor": pa.Column(pl.Int64, checks=pa.Check.ge(1)),
        "t": pa.Column(pl.Int32, checks=pa.Check.ge(0)),
        "token": pa.Column(pl.UInt32),
        # nullable=True on all NLLs: presence of the required ones is checked by nlls_finite_and_present.
        **{
            c: pa.Column(pl.Float64, nullable=True, checks=pa.Check.ge(0.0))
            for c in EVAL_NLL_COLUMNS + EVAL_LEVEL_COLUMNS
        },
    },
    checks=[
        pa.Check(_nlls_are_finite, name="nlls_finite_and_present"),
        pa.Check(_t_is_contiguous_from_zero, name="t_contiguous_from_zero_per_sample"),
    ],
    unique=["doc_id", "cursor", "t"],
    strict=True,
    ordered=True,
    name="eval_results",
)


def _finite(*columns: str):
    def check(data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.all_horizontal(*(pl.col(c).is_finite() for c in columns)))

    return check


def _cost_matches_action(data: pa.PolarsData) -> pl.LazyFrame:
    action, cost = pl.col("action"), pl.col("cost")
    return data.lazyframe.select(((action == "expand") & (cost == 31)) | ((action == "collapse") & (cost == -31)))


LABEL_SCHEMA = pa.DataFrameSchema(
    {
        "snapshot_id": pa.Column(pl.Utf8, checks=pa.Check.str_length(min_value=1)),
        "doc_id": pa.Column(pl.Utf8, checks=pa.Check.str_matches(r"^[0-9a-f]{16}$")),
        "window_start": pa.Column(pl.Int64, checks=pa.Check.ge(0)),
        "cursor": pa.Column(pl.Int64, checks=pa.Check.ge(1)),
        "entry_index": pa.Column(pl.Int32, checks=pa.Check.ge(0)),
        "level": pa.Column(pl.Int32, checks=pa.Check.in_range(0, 4)),
        "start": pa.Column(pl.Int64, checks=pa.Check.ge(0)),
        "action": pa.Column(pl.Utf8, checks=pa.Check.isin(["expand", "collapse"])),
        "delta_nll": pa.Column(pl.Float64),
        "cost": pa.Column(pl.Int32),
        "utility": pa.Column(pl.Float64),
        "target": pa.Column(pl.Float64, checks=pa.Check.in_range(-1.0, 1.0)),
    },
    checks=[
        pa.Check(_finite("delta_nll", "utility", "target"), name="finite_numbers"),
        pa.Check(_cost_matches_action, name="cost_matches_action"),
    ],
    unique=["snapshot_id", "entry_index", "action"],
    strict=True,
    ordered=True,
    name="jt2_labels",
)


# Evaluation references: what does not depend on the cycle, cached per base model and eval set.
_DOC_ID = pa.Check.str_matches(r"^[0-9a-f]{16}$")

REFERENCE_SCHEMA = pa.DataFrameSchema(
    {
        "doc_id": pa.Column(pl.Utf8, checks=_DOC_ID),
        "window_start": pa.Column(pl.Int64, checks=pa.Check.ge(0)),
        "cursor": pa.Column(pl.Int64, checks=pa.Check.ge(1)),
        "t": pa.Column(pl.Int32, checks=pa.Check.ge(0)),
        "token": pa.Column(pl.UInt32),
        **{c: pa.Column(pl.Float64, checks=pa.Check.ge(0.0)) for c in ("nll_full", "nll_recency", "nll_oracle_raw")},
    },
    checks=[pa.Check(_finite("nll_full", "nll_recency", "nll_oracle_raw"), name="finite_nlls"),
            pa.Check(lambda d: d.lazyframe.select(pl.col("cursor") > pl.col("window_start")), name="cursor_after_start"),
            pa.Check(_t_is_contiguous_from_zero, name="t_contiguous_from_zero_per_sample")],
    unique=["doc_id", "cursor", "t"],
    strict=True,
    ordered=True,
    name="eval_references",
)

BLOCK_MASS_SCHEMA = pa.DataFrameSchema(
    {
        "doc_id": pa.Column(pl.Utf8, checks=_DOC_ID),
        "cursor": pa.Column(pl.Int64, checks=pa.Check.ge(1)),
        "block": pa.Column(pl.Int32, checks=pa.Check.ge(0)),
        "mass_horizon": pa.Column(pl.Float64, checks=pa.Check.ge(0.0)),
        "mass_tail": pa.Column(pl.Float64, checks=pa.Check.ge(0.0)),
    },
    checks=[pa.Check(_finite("mass_horizon", "mass_tail"), name="finite_mass")],
    unique=["doc_id", "cursor", "block"],
    strict=True,
    ordered=True,
    name="eval_block_mass",
)

PASSKEY_REFERENCE_SCHEMA = pa.DataFrameSchema(
    {
        "trial_id": pa.Column(pl.Utf8, unique=True),
        "doc_id": pa.Column(pl.Utf8, checks=_DOC_ID),
        "length": pa.Column(pl.Int64, checks=pa.Check.ge(1)),
        "placement": pa.Column(pl.Utf8, checks=pa.Check.isin(["inside", "outside"])),
        "key": pa.Column(pl.Utf8, checks=pa.Check.str_matches(r"^[0-9]{5}$")),
        "depth": pa.Column(pl.Int64, checks=pa.Check.ge(0)),
        "distance": pa.Column(pl.Int64, checks=pa.Check.ge(0)),
        "needle_tokens": pa.Column(pl.Int64, checks=pa.Check.ge(1)),
        "prompt": pa.Column(pl.List(pl.UInt32)),
        "answer": pa.Column(pl.List(pl.UInt32)),
        **{name: column for m in ("full", "recency", "oracle_raw")
           for name, column in ((f"logp_{m}", pa.Column(pl.Float64, checks=pa.Check.le(0.0))),
                                (f"exact_{m}", pa.Column(pl.Boolean)))},
        "mass_horizon": pa.Column(pl.List(pl.Float64)),
        "mass_tail": pa.Column(pl.List(pl.Float64)),
    },
    checks=[pa.Check(lambda d: d.lazyframe.select(pl.col("prompt").list.len() == pl.col("length")),
                     name="prompt_length_matches")],
    strict=True,
    ordered=True,
    name="passkey_references",
)


def column_dtypes(schema: pa.DataFrameSchema) -> dict[str, pl.DataType]:
    """The polars dtype of every column of `schema`, in order: what an empty or built frame is cast to."""
    return {name: column.dtype.type for name, column in schema.columns.items()}


REFERENCE_DTYPES = column_dtypes(REFERENCE_SCHEMA)
BLOCK_MASS_DTYPES = column_dtypes(BLOCK_MASS_SCHEMA)
PASSKEY_REFERENCE_DTYPES = column_dtypes(PASSKEY_REFERENCE_SCHEMA)
