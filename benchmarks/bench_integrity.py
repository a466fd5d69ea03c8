"""Integrity benchmark: what verification on load costs, per artifact, next to what loading it costs.

Every loader checks the files of the artifact it reads against the artifact's manifest
(size, then sha256) before using them. This times that check for each artifact under an
artifact root (corpus, shards, a cycle's phase outputs, its trees, the evaluation
references) side by side with the load it guards, in one run, and prints a table plus
a JSON line. Needs `megacontext prepare-data` (and, for the cycle rows, a trained cycle).

    .venv/bin/python benchmarks/bench_integrity.py --profile default [--cycle 1] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from megacontext.config import load_config
from megacontext.lifecycle.lineage import MANIFEST, read_manifest, repair_advice, verify_artifact


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        tick = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - tick))
    return statistics.median(times)


def _loads(root: Path, cycle: Path) -> dict[str, Callable[[], object]]:
    """The load each verification guards (without the verification: the raw read)."""
    import polars as pl
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    def tensors(path: Path) -> Callable[[], object]:  # load_file maps lazily: copy to read every byte
        return lambda: {k: v.clone() for k, v in load_file(path).items()}

    def parquet_files(folder: Path) -> Callable[[], object]:
        return lambda: [pl.read_parquet(p) for p in sorted(folder.glob("*.parquet"))]

    return {
        "data/corpus": lambda: pq.read_table(root / "data" / "corpus" / "documents.parquet"),
        "data/shards": parquet_files(root / "data" / "shards"),
        f"cycles/{cycle.name}/jt1/final": tensors(cycle / "jt1" / "final" / "gistnet.safetensors"),
        f"cycles/{cycle.name}/jt2/labels": parquet_files(cycle / "jt2" / "labels"),
        f"cycles/{cycle.name}/jt2/final": tensors(cycle / "jt2" / "final" / "lensnet.safetensors"),
        f"cycles/{cycle.name}/jt3/final": tensors(cycle / "jt3" / "final" / "adapter_model.safetensors"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--cycle", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cfg = load_config(args.profile)
    root = Path(cfg.paths.artifact_root)
    cycle = root / "cycles" / f"cycle-{args.cycle:04d}"
    folders = [root / "data" / "corpus", root / "data" / "shards", *sorted((root / "eval_references").glob("*")),
               *(cycle / p for p in ("jt1/final", "jt2/labels", "jt2/final", "jt3/final", "trees"))]
    loads = _loads(root, cycle)
    rows = []
    for folder in folders:
        if not (folder / MANIFEST).is_file():
            continue
        name = folder.relative_to(root).as_posix()
        files = read_manifest(folder)["files"]
        verify = _median_ms(lambda: verify_artifact(folder, repair=repair_advice(folder)), args.repeat)
        load = _median_ms(loads[name], args.repeat) if name in loads else None
        rows.append({"artifact": name, "kind": read_manifest(folder)["kind"], "files": len(files),
                     "mb": sum(e["bytes"] for e in files.values()) / 1e6, "verify_ms": verify, "load_ms": load})
    table = Table(title=f"verification on load ({args.profile}, median of {args.repeat})")
    for column in ("artifact", "kind", "files", "MB", "verify ms", "raw load ms", "verify / load"):
        table.add_column(column, justify="left" if column in ("artifact", "kind") else "right")
    for r in rows:
        ratio = f"{r['verify_ms'] / r['load_ms']:.2f}" if r["load_ms"] else "—"
        table.add_row(r["artifact"], r["kind"], f"{r['files']:,}", f"{r['mb']:.2f}", f"{r['verify_ms']:.1f}",
                      f"{r['load_ms']:.1f}" if r["load_ms"] is not None else "—", ratio)
    Console(width=150).print(table)
    print(json.dumps({"profile": args.profile, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
