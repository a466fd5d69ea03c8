"""Runtime benchmark: decode latency with the K/V cache vs full recompute, refocus overhead, memory.

In one run on this machine, over the same long prompt (real shard tokens):
two runtimes read the prompt (tree ingest, LensNet + allocator every 32 tokens),
then decode `--decode` tokens each, one reusing K/V across edits and one
recomputing the whole working context per token; the per-token latencies are
measured side by side. The refocus overhead is LensNet + allocator time per
32-token block as a fraction of the base-model forwards that decode that block
(the cached runtime). Memory: the tree's bytes on disk per million tokens next
to the base model's KV cache for the same tokens, and the working context's
own K/V (bounded by W_max). Needs `megacontext prepare-data` first.

    .venv/bin/python benchmarks/bench_runtime.py --profile default [--checkpoint artifacts/cycles/cycle-0001]

A book-length history (far past the base's own positions): the prompt is that many tokens of the
split's documents joined end to end (a concatenation, reported as such), read with compressed
positions; `--decode-recompute 0` skips the slow recompute runtime. Every run records peak RSS, the
largest working context seen at any step (the budget check) and the out-of-range-position warnings:

    .venv/bin/python benchmarks/bench_runtime.py --prompt-tokens 100000 --decode-recompute 0 \
        --set wc.positions=compressed --out artifacts/benchmarks/runtime-100k.json

Without `--checkpoint` the LensNet is untrained with a random head (so it edits):
its cost per refocus does not depend on its weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from megacontext.model.base_model import load_base_model
from megacontext.config import load_config
from megacontext.model.gistnet import build_gistnet
from megacontext.model.lensnet import build_lensnet
from megacontext.runtime.streaming import Runtime, load_runtime
from megacontext.data.shards import read_split, shards_dir


def make_runtime(cfg, base, checkpoint: Path | None, folder: Path, recompute: bool) -> Runtime:
    if checkpoint:
        return load_runtime(cfg, checkpoint, folder, recompute=recompute, base=base)
    gistnet = build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=cfg.seed, levels=cfg.wc.levels)
    return Runtime(cfg, base, gistnet, build_lensnet(cfg.lensnet, base.d_model, seed=cfg.seed, head_std=2.0), folder, recompute=recompute)


def decode(rt: Runtime, n: int) -> dict:
    focus0, refocus0, forwards0, decode0 = (rt.telemetry.focus_seconds, rt.telemetry.refocuses,
                                            rt.telemetry.decode_forwards, rt.telemetry.decode_seconds)
    computed0 = rt.cache.stats.computed
    start = time.perf_counter()
    tokens = list(rt.generate(n, stop_at_eos=False))  # throughput of exactly n tokens
    wall = time.perf_counter() - start
    t = rt.telemetry
    forwards = t.decode_forwards - forwards0
    return {"tokens": len(tokens), "wall_s": wall, "ms_per_token": 1000 * wall / len(tokens),
            "forward_ms_per_token": 1000 * (t.decode_seconds - decode0) / forwards,
            "refocuses": t.refocuses - refocus0, "focus_s": t.focus_seconds - focus0,
            "entries_computed_per_token": (rt.cache.stats.computed - computed0) / forwards, "generated": tokens}


def kv_bytes_per_token(model, bytes_per_value: int) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * bytes_per_value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--checkpoint", type=Path, help="a cycle folder; default: untrained parts")
    parser.add_argument("--prompt-tokens", type=int, default=8_192)
    parser.add_argument("--decode", type=int, default=96, help="tokens decoded with the cache (3 refocus blocks)")
    parser.add_argument("--decode-recompute", type=int, default=12, help="tokens decoded with full recompute")
    parser.add_argument("--out", default="artifacts/benchmarks/runtime.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, e.g. wc.positions=compressed (repeatable)")
    args = parser.parse_args()
    cfg = load_config(args.profile, args.overrides)
    torch.set_grad_enabled(False)
    base = load_base_model(cfg)
    docs = read_split(shards_dir(cfg), "val", base.tokenizer.name) + read_split(shards_dir(cfg), "train", base.tokenizer.name)
    joined, used = [], 0
    for d in docs:  # whole documents end to end until the prompt is long enough
        if used >= args.prompt_tokens:
            break
        joined.append(d.tokens)
        used += len(d.tokens)
    prompt = np.concatenate(joined)[: args.prompt_tokens].astype(np.int64)
    results: dict = {"profile": args.profile, "overrides": args.overrides, "model_id": base.model_id,
                     "threads": torch.get_num_threads(), "w_max": cfg.wc.w_max, "prompt_tokens": len(prompt),
                     "documents_joined": len(joined), "positions": cfg.wc.positions,
                     "base_positions": base.max_positions,
                     "lensnet": str(args.checkpoint) if args.checkpoint else "untrained (random head)"}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        plan = [("cached", False, args.decode)] + ([("recompute", True, args.decode_recompute)]
                                                     if args.decode_recompute else [])
        for name, recompute, n in plan:
            rt = make_runtime(cfg, base, args.checkpoint, Path(tmp) / name, recompute)
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rt.feed(prompt)
            ingest_s = time.perf_counter() - start
            refocuses = rt.telemetry.refocuses
            runs[name] = {"ingest_s": ingest_s, "ingest_tokens_per_s": len(prompt) / ingest_s,
                          "prompt_focus_ms_per_refocus": 1000 * rt.telemetry.focus_seconds / refocuses,
                          "prompt_tree_s": rt.telemetry.tree_seconds,
                          "wc_entries": len(rt.wc), "wc_levels": {str(k): v for k, v in rt.wc.levels_used.items()},
                          "position_warnings": [str(w.message) for w in caught if "positions" in str(w.message)]}
            rt.next_logits()  # the prompt's WC forward (prefill), not part of the per-token figure
            runs[name]["decode"] = decode(rt, n)
            runs[name]["summary"] = rt.summary()
            runs[name]["largest_position"] = rt.positions.after(rt.wc.entries) - 1  # of the final working context
            runs[name]["budget_respected"] = rt.telemetry.max_entries <= cfg.wc.w_max  # at every step
            if name == "cached":
                tree_bytes = sum(p.stat().st_size for p in (Path(tmp) / name).iterdir() if p.is_file())
                runs[name]["tree_bytes_per_token"] = tree_bytes / rt.cursor
                runs[name]["wc_kv_bytes"] = sum(layer.keys.numel() + layer.values.numel()
                                                for layer in rt.cache.cache.layers) * 4
            rt.close()
        results["runs"] = runs
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    cached = runs["cached"]["decode"]
    full = runs["recompute"]["decode"] if "recompute" in runs else None
    if full is not None:
        n_prefix = min(len(full["generated"]), len(cached["generated"]))
        results["same_tokens"] = cached["generated"][:n_prefix] == full["generated"][:n_prefix]
    block = cfg.allocator.refocus_every
    focus_ms = 1000 * cached["focus_s"] / max(cached["refocuses"], 1)
    block_ms = cached["forward_ms_per_token"] * block
    kv16 = kv_bytes_per_token(base.model, 2)
    results["summary"] = {
        "ingest_tokens_per_s": runs["cached"]["ingest_tokens_per_s"],
        "decode_ms_per_token_cached": cached["ms_per_token"],
        "decode_ms_per_token_recompute": full["ms_per_token"] if full else None,
        "speedup": full["ms_per_token"] / cached["ms_per_token"] if full else None,
        "focus_ms_per_refocus": focus_ms, "base_forward_ms_per_block": block_ms,
        "refocus_overhead_fraction": focus_ms / block_ms,
        "tree_mb_per_million_tokens": runs["cached"]["tree_bytes_per_token"],
        "kv_cache_mb_per_million_tokens_fp16": kv16,
        "tree_vs_kv_ratio": kv16 / runs["cached"]["tree_bytes_per_token"],
        "wc_kv_mb_fp32": runs["cached"]["wc_kv_bytes"] / 2**20,
        "peak_rss_mb": results["peak_rss_mb"],
        "max_wc_entries": max(r["summary"]["max_entries"] for r in runs.values()),
        "budget_respected": all(r["budget_respected"] for r in runs.values()),
        "largest_position": runs["cached"]["largest_position"],
        "position_warnings": sum(len(r["position_warnings"]) for r in runs.values()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    s = results["summary"]
    print(f"{base.model_id}, W_max {cfg.wc.w_max:,}, prompt {len(prompt):,} tokens ({len(joined)} documents joined), "
          f"{cfg.wc.positions} positions, LensNet: {results['lensnet']}, {results['threads']} threads")
    print("| measure | value |\n|---|---:|")
    print(f"| prompt ingest (tree + LensNet/allocator every {block}) | {runs['cached']['ingest_tokens_per_s']:,.0f} tokens/s |")
    print(f"| decode, K/V cache across edits | {s['decode_ms_per_token_cached']:.1f} ms/token |")
    if full:
        print(f"| decode, full recompute of the WC | {s['decode_ms_per_token_recompute']:.1f} ms/token |")
        print(f"| cache speed-up | {s['speedup']:.1f}x (same tokens: {results['same_tokens']}) |")
    print(f"| refocus (LensNet + allocator) per {block}-token block | {s['focus_ms_per_refocus']:.1f} ms |")
    print(f"| base forwards decoding that block (cached) | {s['base_forward_ms_per_block']:.0f} ms |")
    print(f"| refocus overhead | {100 * s['refocus_overhead_fraction']:.1f}% (target <= 10%) |")
    print(f"| tree on disk per 1M tokens | {s['tree_mb_per_million_tokens']:.1f} MB |")
    print(f"| base KV cache per 1M tokens (fp16) | {s['kv_cache_mb_per_million_tokens_fp16']:,.0f} MB "
          f"({s['tree_vs_kv_ratio']:.0f}x the tree) |")
    print(f"| the WC's own K/V (fp32, <= W_max entries) | {s['wc_kv_mb_fp32']:.1f} MB |")
    print(f"| peak RSS | {s['peak_rss_mb']:,.0f} MB |")
    print(f"| largest WC at any step / W_max | {s['max_wc_entries']:,} / {cfg.wc.w_max:,} "
          f"({'respected' if s['budget_respected'] else 'EXCEEDED'}) |")
    print(f"| largest position of the final WC / base positions | {s['largest_position']:,.0f} / "
          f"{base.max_positions:,} |")
    print(f"| out-of-range position warnings | {s['position_warnings']} |")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
