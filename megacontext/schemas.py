"""Pandera (polars) schemas for the tables the lifecycle writes (DESIGN §5).

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
        return schema.validate(df)
    except (pa.errors.SchemaError, pa.errors.SchemaDefinitionError) as exc:
        message = " ".join(str(exc).split())
        raise SchemaViolation(f"{where}: violates schema '{schema.name}': {message}") from None
