"""Do gists harm? The same working contexts read with their gists and with those spans left out, side by side.

For N validation windows at the evaluation's geometry (history L = eval.history, horizon H,
budget W_max), each working-context structure is read (a) with every gist variant in its gist
slots and (b) with the gist entries removed, the raw entries kept where they were (the spans are
left out, as the oracle-without-gists row of the evaluation leaves them out). Per variant it
reports NLL@H(with gists) − NLL@H(left out) in nats/token with a cluster-bootstrap CI over
windows; a variant does no harm where that difference is ≤ 0. Every other variant is also compared
with the first `--variant`, paired on the same windows. The recency window of the same
budget is read alongside. Gists are computed live from the window's tokens (no trees needed).

Structures: `cold_start` (the runtime's cold start: the longest raw tail, the rest as LOD2/LOD1
gists), `lod2_only` (the raw tail and LOD2 gists only: the evaluation's LOD2-only row),
`tail1024_lod1` (a 1,024-token raw tail, every older block a LOD1 gist: as many gists as
the attention-oracle rows of the evaluation carry). `+sink`: the same with the window's first 32 tokens,
the base's attention sink, kept raw within the same budget. Gist variants: `mean` (an untrained GistNet:
the block's mean embedding at token norm; `mean@0.5` at half that norm), `token:<text>` (every gist is the embedding of one
filler token, e.g. `token:\\n`), `zero` (a zero vector), `cycle:<folder>` (that cycle's trained
GistNet, read from `<folder>/jt1/final`).

    .venv/bin/python benchmarks/bench_gist_harm.py --profile default --windows 12 \\
        --variant mean --variant 'token:\\n' --variant zero --out artifacts/benchmarks/gist-harm.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from megacontext.config import load_config
from megacontext.context.nodes import BLOCK, Node
from megacontext.context.working_context import (BudgetExceeded, PositionScheme, WorkingContext, assemble_live,
                                                 cold_start, single_level_start)
from megacontext.data.shards import read_split, shards_dir
from megacontext.data.windows import eligible, sample_window
from megacontext.evaluation.gate import cluster_mean_ci
from megacontext.model.base_model import horizon_token_nll, load_base_model
from megacontext.model.gaussian_rope import gaussian_positions, install_gaussian_rope
from megacontext.model.gistnet import build_gistnet, load_gistnet
from megacontext.progress import progress_bar

SEED_STREAM = 7  # windows drawn from their own stream: never the training phases' (SeedOffset 0-6)


def with_sink(start: Callable[[int], WorkingContext], w_max: int) -> list[Node]:
    """A working context built by `start(budget)` with its first 32 tokens raw, within `w_max`.

    (For the cold start this is exactly `cold_start(..., sink=32)`, checked at 2k-64k histories and
    budgets 512-2,048; the cold-start row uses that. This one serves the structures without a sink option.)

    The first block of a window is the base's attention sink (StreamingLLM, Xiao et al. 2023); here
    it stays raw: the start is built at a budget lowered by what that costs (+31 per level expanded),
    then its first gist is expanded down to the tokens, so the raw tail is that much shorter."""
    probe = start(w_max)
    cost = (BLOCK - 1) * probe.entries[0].level
    wc = start(w_max - cost)
    wc.w_max = w_max
    while wc.entries[0].level:
        wc.expand(0)
    return wc.entries


def structures(n: int, w_max: int, protected_tail: int, levels: int) -> dict[str, list[Node]]:
    """name -> entries of each working-context structure over an n-token history."""
    tail = min(1_024, n) // BLOCK * BLOCK
    lod1 = [Node(s, 1) for s in range(0, n - tail, BLOCK)] + [Node(t, 0) for t in range(n - tail, n)]
    out = {"cold_start": cold_start(n, w_max, protected_tail, levels, sink=0).entries,
           "cold_start+sink": cold_start(n, w_max, protected_tail, levels, sink=BLOCK).entries}  # wc.sink_tokens
    try:  # (with a sink its tail would shrink to the next 1,024 boundary: not compared)
        out["lod2_only"] = single_level_start(n, w_max, protected_tail, 2, levels).entries
    except BudgetExceeded:  # LOD2 alone cannot hold this history in the budget
        pass
    if len(lod1) + BLOCK - 1 <= w_max:
        out["tail1024_lod1"] = lod1
        out["tail1024_lod1+sink"] = with_sink(lambda _: WorkingContext(list(lod1), n, w_max, protected_tail, levels),
                                              w_max)
    return out


def gist_variant(spec: str, base, cfg) -> torch.nn.Module:
    """A callable (x [N, 32, d], level) -> [N, d] standing in for GistNet in `assemble_live`."""
    embedding = base.model.get_input_embeddings()
    if spec == "mean" or spec.startswith("mean@"):
        net = build_gistnet(cfg.gistnet, embedding, seed=cfg.seed, levels=cfg.wc.levels, model=base.model)
        with torch.no_grad():  # mean@s: the untrained gist at s times the token norm
            net.log_scale.fill_(float(np.log(float(spec[5:]))) if "@" in spec else 0.0)
        return net
    if spec.startswith("cycle:"):
        return load_gistnet(Path(spec.split(":", 1)[1]) / "jt1" / "final", base.model)
    if spec == "zero":
        return lambda x, level: torch.zeros(x.shape[0], x.shape[-1], dtype=x.dtype)
    if spec.startswith("token:"):
        text = spec.split(":", 1)[1].encode().decode("unicode_escape")
        ids = base.tokenizer.encode_batch([text])[0]
        if len(ids) != 1:
            raise SystemExit(f"--variant {spec!r}: {text!r} is {len(ids)} tokens, not one")
        vector = embedding(torch.tensor(ids)).detach()[0]  # [d]
        return lambda x, level: vector.expand(x.shape[0], -1)
    raise SystemExit(f"unknown --variant {spec!r}: mean, mean@<scale>, zero, token:<text> or cycle:<folder>")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--variant", action="append", help="mean | mean@<scale> | zero | token:<text> | cycle:<folder> (repeat)")
    parser.add_argument("--out", default="artifacts/benchmarks/gist-harm.json")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.profile, args.overrides)
    variants = args.variant or ["mean"]
    torch.set_grad_enabled(False)
    base = load_base_model(cfg)
    install_gaussian_rope(base.model)
    gists = {spec: gist_variant(spec, base, cfg) for spec in variants}
    ev, wcc = cfg.eval, cfg.wc
    n, h = ev.history, ev.horizon
    positions = PositionScheme.of(wcc)
    docs = eligible(read_split(shards_dir(cfg), ev.split, tokenizer_name=base.tokenizer.name), n, h)
    embedding = base.model.get_input_embeddings()

    def nll(entries: list[Node], tokens: torch.Tensor, gistnet) -> float:
        inputs = assemble_live(entries, tokens, embedding, gistnet, horizon=h, cursor=n, positions=positions)
        with gaussian_positions(base.model, inputs.mu, inputs.sigma):
            return float(horizon_token_nll(base.model, h, inputs_embeds=inputs.inputs_embeds,
                                           targets=tokens[None, n:]).sum())

    shapes = structures(n, wcc.w_max, wcc.protected_tail, wcc.levels)  # the same for every window

    rows: dict[str, list[float]] = {}
    start = time.perf_counter()
    with progress_bar("windows", total=args.windows, unit="windows") as advance:
        for i in range(args.windows):
            window = sample_window(docs, history=n, horizon=h, align=BLOCK**wcc.levels,
                                   seed=cfg.seed + SEED_STREAM, step=0, item=i)
            tokens = torch.as_tensor(window.tokens.astype(np.int64))
            recent = tokens[n - wcc.w_max :][None]
            rows.setdefault("recency", []).append(float(horizon_token_nll(base.model, h, input_ids=recent).sum()))
            for name, entries in shapes.items():
                raw = [e for e in entries if e.level == 0]
                rows.setdefault(f"{name}/left_out", []).append(nll(raw, tokens, None))
                for spec, gistnet in gists.items():
                    rows.setdefault(f"{name}/{spec}", []).append(nll(entries, tokens, gistnet))
            advance(1)
    counts = np.full(args.windows, float(h))
    ci = dict(bootstrap_samples=ev.bootstrap_samples, confidence=ev.confidence, seed=cfg.seed)
    sums = {k: np.asarray(v) for k, v in rows.items()}
    result = {
        "profile": cfg.profile, "base": base.model_id, "windows": args.windows, "history": n, "horizon": h,
        "w_max": wcc.w_max, "positions": wcc.positions, "seconds": round(time.perf_counter() - start, 1),
        "nll": {k: cluster_mean_ci(v, counts, **ci) for k, v in sums.items()},
        "gist_minus_left_out": {k: cluster_mean_ci(sums[k] - sums[k.split("/")[0] + "/left_out"], counts, **ci)
                                for k in sums if "/" in k and not k.endswith("/left_out")},
        "left_out_minus_recency": {k: cluster_mean_ci(v - sums["recency"], counts, **ci)
                                   for k, v in sums.items() if k.endswith("/left_out")},
        # paired: every other variant against the first `--variant`, on the same windows and structures
        "variant_minus_first": {f"{name}/{spec}": cluster_mean_ci(sums[f"{name}/{spec}"] - sums[f"{name}/{variants[0]}"],
                                                                  counts, **ci)
                                for name in shapes for spec in variants[1:]},
        # paired: each structure with the sink kept raw against the same structure without, per variant
        "sink_minus_plain": {k: cluster_mean_ci(sums[k] - sums[k.replace("+sink", "", 1)], counts, **ci)
                             for k in sums if "+sink/" in k and k.replace("+sink", "", 1) in sums},
        "per_window_nll_sums": {k: v.tolist() for k, v in sums.items()},  # nats over H tokens, window order
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for key in ("gist_minus_left_out", "left_out_minus_recency", "variant_minus_first", "sink_minus_plain"):
        for k, v in result[key].items():
            lo, hi = v["ci"] or (float("nan"), float("nan"))
            print(f"{key:24s} {k:28s} {v['value']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
