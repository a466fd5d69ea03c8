"""Compare rows of several validation reports on the same samples: paired differences and gap-recovery ratios.

Each `--row NAME=REPORT:METHOD` names one reading (METHOD: mc, recency_adapted, training_free, oracle,
oracle_raw, training_free_raw, lod1, lod2, recency, full) of one report folder (its results.parquet). All reports must
hold the same samples (the same cached references: equal full and recency NLLs, checked). For every
row, on all tokens and on key tokens (full beats recency by > --key-margin nats), it prints the NLL,
the row minus recency, the gap recovery, the row minus the `--baseline` row, and the ratio of its gap
recovery to the `--bound` row's; 95 % CIs by a cluster bootstrap over samples (doc, cursor), the same
resamples for every figure. Used for the focus issue's must-show comparisons (learned focus vs the
training-free focus; share of the attention oracle's gap recovery).

    .venv/bin/python benchmarks/compare_reports.py --row "c1=artifacts/reports/c1:mc" \\
        --row "free=artifacts/reports/c1:training_free" --row "oracle=artifacts/reports/c1:oracle" \\
        --baseline free --bound oracle --out comparison.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

from megacontext.evaluation.gate import METHODS

KEYS = ["doc_id", "cursor", "t"]


def load_rows(specs: list[str]) -> tuple[pl.DataFrame, list[str]]:
    """One table: KEYS, full, recency and one column per row name; ValueError on a mismatch."""
    table, names = None, []
    for spec in specs:
        name, _, rest = spec.partition("=")
        folder, _, method = rest.rpartition(":")
        if not name or not folder or method not in METHODS:
            raise ValueError(f"--row {spec!r}: expected NAME=REPORT:METHOD with METHOD one of {', '.join(METHODS)}")
        results = pl.read_parquet(Path(folder) / "results.parquet")
        part = results.select(*KEYS, pl.col("nll_full").alias("full"), pl.col("nll_recency").alias("recency"),
                              pl.col(METHODS[method]).alias(name))
        if table is None:
            table = part
        else:
            joined = table.join(part, on=KEYS, how="full", coalesce=True, suffix="_other")
            if joined.height != table.height or joined.height != part.height:
                raise ValueError(f"{folder}: its samples differ from the first report's")
            if not (np.allclose(joined["full"], joined["full_other"]) and np.allclose(joined["recency"], joined["recency_other"])):
                raise ValueError(f"{folder}: its full/recency references differ from the first report's")
            table = joined.drop("full_other", "recency_other")
        names.append(name)
    return table.sort(KEYS), names


def compare(table: pl.DataFrame, names: list[str], *, baseline: str, bound: str | None, key_margin: float,
            bootstrap: int = 2_000, seed: int = 0) -> dict:
    table = table.drop_nulls()
    out = {}
    for subset, frame in (("all", table), ("key", table.filter(pl.col("recency") - pl.col("full") > key_margin))):
        if frame.is_empty():
            out[subset] = {"samples": 0, "tokens": 0}
            continue
        sums = frame.group_by("doc_id", "cursor", maintain_order=True).agg(
            pl.len().alias("n"), *[pl.col(c).sum() for c in ["full", "recency", *names]])
        n = sums["n"].to_numpy().astype(np.float64)
        cols = {c: sums[c].to_numpy() for c in ["full", "recency", *names]}
        rng = np.random.default_rng(seed)
        weights = np.stack([np.bincount(rng.integers(0, len(n), len(n)), minlength=len(n)) for _ in range(bootstrap)])

        def stat(f):  # point and 95 % CI of f(mean per column) over the cluster bootstrap
            point = f({c: v @ np.ones(len(n)) / n.sum() for c, v in cols.items()})
            draws = f({c: weights @ v / (weights @ n) for c, v in cols.items()})
            return {"value": float(point), "ci": [float(x) for x in np.nanquantile(draws, [0.025, 0.975])]}

        gap = lambda m, name: (m["recency"] - m[name]) / (m["recency"] - m["full"])  # noqa: E731
        rows = {}
        for name in names:
            rows[name] = {"nll": stat(lambda m: m[name]), "minus_recency": stat(lambda m: m[name] - m["recency"]),
                          "gap_recovery": stat(lambda m: gap(m, name)),
                          f"minus_{baseline}": stat(lambda m: m[name] - m[baseline])}
            if bound:
                rows[name][f"share_of_{bound}"] = stat(lambda m: gap(m, name) / gap(m, bound))
        out[subset] = {"samples": len(n), "tokens": int(n.sum()), "full": stat(lambda m: m["full"]),
                       "recency": stat(lambda m: m["recency"]), "rows": rows}
    return out


def print_comparison(result: dict) -> None:
    """The comparison as text: per subset, each row's NLL, − recency, gap recovery and − baseline / share, CIs."""
    fmt = lambda s: f"{s['value']:+.3f} [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]"  # noqa: E731
    for subset, block in result.items():
        if not block["tokens"]:
            print(f"\n{subset} tokens: none")
            continue
        print(f"\n{subset} tokens: {block['samples']} samples, {block['tokens']} tokens; "
              f"full {block['full']['value']:.3f}, recency {block['recency']['value']:.3f}")
        for name, r in block["rows"].items():
            extra = "".join(f"  {k} {fmt(v)}" for k, v in r.items() if k.startswith(("minus_", "share_"))
                            and k != "minus_recency")
            print(f"  {name:>16}: NLL {r['nll']['value']:.3f}  - recency {fmt(r['minus_recency'])}  "
                  f"gap recovery {fmt(r['gap_recovery'])}{extra}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row", action="append", required=True, help="NAME=REPORT_FOLDER:METHOD (repeat)")
    p.add_argument("--baseline", help="row every other row is differenced against (default: the first)")
    p.add_argument("--bound", help="row whose gap recovery the others are a share of (e.g. the oracle)")
    p.add_argument("--key-margin", type=float, default=0.5)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    try:
        table, names = load_rows(args.row)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    baseline = args.baseline or names[0]
    if baseline not in names or (args.bound and args.bound not in names):
        print("error: --baseline and --bound must name rows", file=sys.stderr)
        return 2
    result = compare(table, names, baseline=baseline, bound=args.bound, key_margin=args.key_margin)
    print_comparison(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": args.row, "baseline": baseline, "bound": args.bound,
                                        "key_margin": args.key_margin, **result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
