"""MegaAttention forward time vs full causal attention, a sliding window and a BigBird-style mask (CPU).

In one run, for each N: random q, k, v [1, H, L, d] (L = N leaves + N/32 + N/1024
summaries for MegaAttention, N for the others); the same FlexAttention kernel
(compiled) runs the MegaAttention, full causal, sliding-window (causal, W) and
BigBird-style (causal window W + 64 global tokens + ~3 pseudo-random 128-blocks per
query block) masks; SDPA's fused causal kernel is timed too up to 16k (beyond, its
CPU path materialises the N x N scores: 68 GB at 64k). MegaAttention's packed
kernel (SDPA per 128-leaf slice on its gathered keys) is timed forward and
forward+backward, against forward+backward of SDPA's fused causal kernel (the
CPU has no FlexAttention backward). Times are medians after a warm-up (compile)
call. At the smallest N both MegaAttention kernels are checked against the
dense-mask SDPA reference. Reported: ms per call, speed-ups over full causal,
and the growth factor per doubling of N.

    .venv/bin/python benchmarks/bench_mega_attention.py [--sizes 4096 16384 65536]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from megacontext.mega.attention import block_mask, compiled_flex, layout, mega_attention, packed_attention, packed_plan

BLOCK_SIZE = 128


def timed(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return 1000 * statistics.median(times)


def fwd_bwd(attention, q, k, v) -> None:
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    attention(q, k, v).sum().backward()


def causal(n: int):
    return create_block_mask(lambda b, h, q, kv: q >= kv, None, None, n, n, device="cpu", BLOCK_SIZE=BLOCK_SIZE,
                             _compile=True)


def sliding(n: int, window: int):
    return create_block_mask(lambda b, h, q, kv: (q >= kv) & (q - kv < window), None, None, n, n, device="cpu",
                             BLOCK_SIZE=BLOCK_SIZE, _compile=True)


def bigbird(n: int, window: int):
    blocks = (n + BLOCK_SIZE - 1) // BLOCK_SIZE

    def mask_mod(b, h, q, kv):
        qb, kb = q // BLOCK_SIZE, kv // BLOCK_SIZE
        random = (qb * 7_919 + kb * 104_729) % blocks < 3  # ~3 pseudo-random key blocks per query block
        return (q >= kv) & ((q - kv < window) | (kv < 64) | random)

    return create_block_mask(mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=BLOCK_SIZE, _compile=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4_096, 16_384, 65_536])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="artifacts/benchmarks/mega_attention.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    flex = compiled_flex()
    rows = []
    for n in args.sizes:
        lay = layout(n)
        row: dict = {"n": n, "mega_length": lay.length}
        tick = time.perf_counter()
        mega_mask = block_mask(lay, args.window, compile_mask=True)
        row["mega_block_mask_s"] = time.perf_counter() - tick
        row["mega_density"] = float(mega_mask.sparsity()) if hasattr(mega_mask, "sparsity") else None
        q, k, v = (torch.randn(1, args.heads, lay.length, args.dim) for _ in range(3))
        row["mega_ms"] = timed(lambda: flex(q, k, v, block_mask=mega_mask), args.repeats)
        plan = packed_plan(lay, args.window)
        row["packed_ms"] = timed(lambda: packed_attention(q, k, v, plan), args.repeats)
        row["packed_fwd_bwd_ms"] = timed(lambda: fwd_bwd(lambda a, b, c: packed_attention(a, b, c, plan), q, k, v),
                                         args.repeats)
        if n == min(args.sizes):
            ref = mega_attention(q, k, v, lay, args.window, kernel="sdpa")
            row["max_abs_diff_vs_dense_sdpa"] = float((flex(q, k, v, block_mask=mega_mask) - ref).abs().max())
            row["packed_max_abs_diff_vs_dense_sdpa"] = float((packed_attention(q, k, v, plan) - ref).abs().max())
        del plan
        q, k, v = (x[:, :, :n].contiguous() for x in (q, k, v))
        causal_mask = causal(n)
        row["full_causal_ms"] = timed(lambda: flex(q, k, v, block_mask=causal_mask), 1 if n >= 65_536 else args.repeats)
        if n <= 16_384:  # SDPA's fused causal kernel; beyond this the CPU path materialises N x N scores
            row["full_causal_sdpa_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                               args.repeats)
            row["full_causal_sdpa_fwd_bwd_ms"] = timed(
                lambda: fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v),
                args.repeats)
            row["packed_fwd_bwd_speedup_vs_full"] = row["full_causal_sdpa_fwd_bwd_ms"] / row["packed_fwd_bwd_ms"]
        window_mask = sliding(n, args.window)
        row["sliding_ms"] = timed(lambda: flex(q, k, v, block_mask=window_mask), args.repeats)
        bb_mask = bigbird(n, args.window)
        row["bigbird_ms"] = timed(lambda: flex(q, k, v, block_mask=bb_mask), args.repeats)
        row["speedup_vs_full"] = row["full_causal_ms"] / row["mega_ms"]
        rows.append(row)
        print(f"N={n:,}: mega {row['mega_ms']:.1f} ms, full causal {row['full_causal_ms']:.1f} ms "
              f"(SDPA {row.get('full_causal_sdpa_ms', float('nan')):.1f} ms), "
              f"sliding {row['sliding_ms']:.1f} ms, bigbird {row['bigbird_ms']:.1f} ms", flush=True)
    for prev, row in zip(rows, rows[1:]):
        doublings = math.log2(row["n"] / prev["n"])
        for key in ("mega_ms", "packed_ms", "packed_fwd_bwd_ms", "full_causal_ms", "sliding_ms", "bigbird_ms"):
            row[key.replace("_ms", "_growth_per_doubling")] = (row[key] / prev[key]) ** (1 / doublings)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"window": args.window, "heads": args.heads, "dim": args.dim,
                               "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print(f"\nCPU, {torch.get_num_threads()} threads, H={args.heads}, d={args.dim}, W={args.window}, fp32, forward only")
    print("| N | MegaAttention | full causal | full causal (SDPA fused) | sliding window | BigBird-style | "
          "Mega speed-up vs full | growth/doubling (Mega, full) |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        growth = (f"{row['mega_growth_per_doubling']:.2f}x, {row['full_causal_growth_per_doubling']:.2f}x"
                  if "mega_growth_per_doubling" in row else "—")
        sdpa = f"{row['full_causal_sdpa_ms']:.1f} ms" if "full_causal_sdpa_ms" in row else "— (N×N scores)"
        print(f"| {row['n']:,} | {row['mega_ms']:.1f} ms | {row['full_causal_ms']:.1f} ms | {sdpa} | {row['sliding_ms']:.1f} ms | "
              f"{row['bigbird_ms']:.1f} ms | {row['speedup_vs_full']:.1f}x | {growth} |")
    print("\nforward+backward (CPU: no FlexAttention backward)\n| N | MegaAttention packed fwd | packed fwd+bwd | "
          "full causal SDPA fwd+bwd | packed speed-up (fwd+bwd) | growth/doubling (packed fwd+bwd) |\n"
          "|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        full = f"{row['full_causal_sdpa_fwd_bwd_ms']:.1f} ms" if "full_causal_sdpa_fwd_bwd_ms" in row else "— (N×N scores)"
        speedup = f"{row['packed_fwd_bwd_speedup_vs_full']:.1f}x" if "packed_fwd_bwd_speedup_vs_full" in row else "—"
        growth = f"{row['packed_fwd_bwd_growth_per_doubling']:.2f}x" if "packed_fwd_bwd_growth_per_doubling" in row else "—"
        print(f"| {row['n']:,} | {row['packed_ms']:.1f} ms | {row['packed_fwd_bwd_ms']:.1f} ms | {full} | {speedup} | {growth} |")
    if "max_abs_diff_vs_dense_sdpa" in rows[0]:
        print(f"\nMegaAttention vs dense-mask SDPA at N={rows[0]['n']:,}: max |diff| flex "
              f"{rows[0]['max_abs_diff_vs_dense_sdpa']:.2e}, packed {rows[0]['packed_max_abs_diff_vs_dense_sdpa']:.2e}")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
