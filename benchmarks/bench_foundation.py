"""Foundation benchmark: shard-building throughput and base-model load times.

Measures, on this machine, in one run:
  - corpus collection and shard building (tokenize + schema check + Parquet) in tokens/s,
    next to the raw tokenizer throughput on the same documents;
  - loading the cached fp32 base model in a fresh process (import time and load time, median of N);
  - the one-time GGUF -> safetensors conversion (into a scratch cache, so the real one is untouched).
Writes artifacts/benchmarks/foundation.json and prints a Markdown table.

    .venv/bin/python benchmarks/bench_foundation.py --profile default
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megacontext.model.base_model import GGUF_PACKAGES, ensure_gguf_cache, load_tokenizer
from megacontext.config import load_config
from megacontext.data.corpus import build_corpus, read_documents
from megacontext.data.shards import build_shards

LOAD_PROBE = """
import time, json
t0 = time.perf_counter()
from megacontext.model.base_model import load_base_model
from megacontext.config import load_config
t1 = time.perf_counter()
base = load_base_model(load_config({profile!r}))
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1}}))
"""


def bench_shards(profile: str, scratch: Path) -> dict:
    cfg = load_config(profile, [f"paths.artifact_root={scratch}"])
    start = time.perf_counter()
    corpus = build_corpus(cfg, force=True)
    corpus_s = time.perf_counter() - start
    start = time.perf_counter()
    shards = build_shards(cfg, force=True)
    shards_s = time.perf_counter() - start
    tokens = json.loads((shards / "summary.json").read_text())["tokens"]
    texts = read_documents(corpus).column("text").to_pylist()
    tokenizer = load_tokenizer(cfg)
    start = time.perf_counter()
    raw_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    tokenize_s = time.perf_counter() - start
    return {
        "documents": len(texts),
        "tokens": tokens,
        "corpus_s": corpus_s,
        "shards_s": shards_s,
        "shards_tokens_per_s": tokens / shards_s,
        "end_to_end_tokens_per_s": tokens / (corpus_s + shards_s),
        "tokenizer_only_tokens_per_s": raw_tokens / tokenize_s,
    }


def bench_load(profile: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", LOAD_PROBE.format(profile=profile)],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "repeats": repeats,
        "load_s_median": statistics.median(r["load_s"] for r in runs),
        "import_s_median": statistics.median(r["import_s"] for r in runs),
        "load_s_all": [round(r["load_s"], 3) for r in runs],
    }


def bench_conversion(kind: str, scratch: Path) -> dict:
    start = time.perf_counter()
    ensure_gguf_cache(GGUF_PACKAGES[kind], scratch / "models")
    return {"gguf_conversion_s": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-conversion", action="store_true")
    parser.add_argument("--out", default="artifacts/benchmarks/foundation.json")
    args = parser.parse_args()
    cfg = load_config(args.profile)
    results: dict = {"profile": args.profile, "model_kind": cfg.model.kind}
    with tempfile.TemporaryDirectory() as tmp:
        results["shards"] = bench_shards(args.profile, Path(tmp))
        if cfg.model.kind in GGUF_PACKAGES and not args.skip_conversion:
            results["conversion"] = bench_conversion(cfg.model.kind, Path(tmp))
    results["load"] = bench_load(args.profile, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    s, load = results["shards"], results["load"]
    rows = [
        ("documents / tokens", f"{s['documents']:,} / {s['tokens']:,}"),
        ("corpus collection", f"{s['corpus_s']:.2f} s"),
        ("shard building (tokenize + check + write)", f"{s['shards_s']:.2f} s = {s['shards_tokens_per_s']:,.0f} tokens/s"),
        ("end to end (corpus + shards)", f"{s['end_to_end_tokens_per_s']:,.0f} tokens/s"),
        ("tokenizer alone", f"{s['tokenizer_only_tokens_per_s']:,.0f} tokens/s"),
        ("cached model load (fresh process, median)", f"{load['load_s_median']:.2f} s (+ {load['import_s_median']:.2f} s imports)"),
    ]
    if "conversion" in results:
        rows.append(("one-time GGUF conversion", f"{results['conversion']['gguf_conversion_s']:.1f} s"))
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
