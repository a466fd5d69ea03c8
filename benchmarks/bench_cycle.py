"""Cycle benchmark: JT2 label generation with prefix K/V reuse vs naive recompute, side by side.

Labels the same on-policy snapshots both ways in one run (same candidates), reports
labels/s for each and their ratio, and checks the two agree. Per-phase tokens/s of a
finished cycle are read from its telemetry when `--cycle` points at one.

    .venv/bin/python benchmarks/bench_cycle.py --profile default --cycle artifacts/cycles/cycle-0001
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from megacontext.model.base_model import load_base_model
from megacontext.config import load_config
from megacontext.context.focus_policy import cold_start_policy
from megacontext.model.gaussian_rope import install_gaussian_rope
from megacontext.model.gistnet import build_gistnet
from megacontext.training.jt2_labels import candidates, timed_labels
from megacontext.training.jt2_lensnet import snapshot_window
from megacontext.data.shards import read_split, shards_dir
from megacontext.data.windows import eligible


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--snapshots", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--cycle", type=Path, help="a finished cycle folder: report its per-phase tokens/s")
    parser.add_argument("--out", default="artifacts/benchmarks/cycle.json")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.profile, args.overrides)
    torch.set_grad_enabled(False)
    base = load_base_model(cfg)
    install_gaussian_rope(base.model)
    gistnet = build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=cfg.seed, levels=cfg.wc.levels,
                            model=base.model)
    docs = eligible(read_split(shards_dir(cfg), "train", base.tokenizer.name), cfg.train.history, cfg.train.horizon)
    policy = cold_start_policy(cfg)
    totals = {"reuse": [0, 0.0], "naive": [0, 0.0]}
    max_diff = 0.0
    for index in range(args.snapshots):
        window = snapshot_window(cfg, docs, index)
        wc = policy(window)
        cands = candidates(wc, args.candidates, np.random.default_rng([cfg.seed, index]))
        reused, t_reuse = timed_labels(base, gistnet, window, wc, cands, naive=False)
        naive, t_naive = timed_labels(base, gistnet, window, wc, cands, naive=True)
        totals["reuse"][0] += len(reused)
        totals["reuse"][1] += t_reuse
        totals["naive"][0] += len(naive)
        totals["naive"][1] += t_naive
        max_diff = max(max_diff, max(abs(a["delta_nll"] - b["delta_nll"]) for a, b in zip(reused, naive)))
    rate = {k: n / s for k, (n, s) in totals.items()}
    results = {"profile": args.profile, "snapshots": args.snapshots, "candidates_per_snapshot": args.candidates,
               "wc_entries": len(wc), "labels_per_s": rate, "speedup": rate["reuse"] / rate["naive"],
               "max_abs_delta_nll_difference": max_diff}
    if args.cycle:
        summary = json.loads((args.cycle / "cycle.json").read_text())
        results["phase_tokens_per_s"] = {
            phase: float(np.median([r["tokens_per_s"] for r in rows])) for phase, rows in summary["telemetry"].items()}
        results["phase_seconds"] = summary["seconds"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("| measure | value |\n|---|---|")
    print(f"| JT2 labels/s, prefix reuse | {rate['reuse']:.2f} |")
    print(f"| JT2 labels/s, naive recompute | {rate['naive']:.2f} |")
    print(f"| speedup (same run, same candidates) | {results['speedup']:.2f}x |")
    print(f"| max |ΔNLL difference| reuse vs naive | {max_diff:.2e} |")
    for phase, tps in results.get("phase_tokens_per_s", {}).items():
        print(f"| {phase} tokens/s (median step) | {tps:,.0f} |")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
