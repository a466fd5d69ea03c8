"""MegaPrediction in JT3: LOD agreement and ΔNLL@H per level on held-out windows, before and after training.

On `--windows` held-out (val) windows of the training shape (history L_train,
horizon H, plus the next 1,024 tokens for the LOD2 target): NLL@H of the plain
base on the full window; of the working context (the cycle's LensNet focus at
B_train) with full attention and through MegaAttention (window `mega.window`);
ΔNLL@H per level through MegaAttention (the history compressed with LOD1 gists
only / LOD2 gists only, as the evaluation's per-level rows); and the
MegaPrediction LOD agreement per level (mean cos(ĝ, g)). Then JT3 trains fresh
LoRA adapters with MegaAttention + MegaPrediction (`train.jt3` steps) and the
same windows are measured again. L_lod2 needs a wLOD2 node, i.e. a WC of
≥ 1,024 entries before the horizon: pass train.budget ≥ 1,056 for it. Needs
`megacontext prepare-data`; uses the GistNet and LensNet of `--checkpoint`
(untrained parts without it).

    .venv/bin/python benchmarks/bench_mega_prediction.py --profile default \
        --checkpoint artifacts/cycles/cycle-0001 train.history=3072 train.budget=1536
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from megacontext.model.base_model import horizon_logprobs, load_base_model
from megacontext.config import load_config
from megacontext.context.focus_policy import cold_start_policy, lens_policy
from megacontext.model.gaussian_rope import gaussian_positions, install_gaussian_rope
from megacontext.model.gistnet import build_gistnet, load_gistnet
from megacontext.training.jt3_lora import JT3LoRA
from megacontext.model.lensnet import load_lensnet
from megacontext.mega.attention import TOP
from megacontext.mega.model import install_mega_attention
from megacontext.mega.prediction import mega_prediction_loss
from megacontext.context.nodes import span
from megacontext.data.shards import read_split, shards_dir
from megacontext.training.loop import fit
from megacontext.data.windows import eligible, sample_window
from megacontext.context.working_context import BudgetExceeded, assemble_live, single_level_start


def level_nll(cfg, base, gistnet, wc, ids, targets, plain_embedding) -> float:
    """NLL@H of `wc` (+ the horizon) read through MegaAttention, no gist readouts."""
    inputs = assemble_live(wc.entries, ids, base.model.get_input_embeddings(), gistnet, horizon=len(targets),
                           gist_embedding=plain_embedding)
    return mega_prediction_loss(base, gistnet, inputs, targets, cfg.mega.window, gist_embedding=plain_embedding,
                                kernel=cfg.mega.kernel, predict=False).metrics["nll"]


@torch.no_grad()
def measure(cfg, base, gistnet, policy, windows, plain_embedding, plain=nullcontext) -> dict[str, float | None]:
    """Means over `windows`; `plain()` switches adapters off for the full-context baseline (as the evaluation)."""
    rows = []
    t, wcc = cfg.train, cfg.wc
    for window in windows:
        ids = torch.as_tensor(window.tokens.astype(np.int64))
        h = len(window.horizon)
        targets = ids[window.history :]
        with plain():
            full = -horizon_logprobs(base, h, input_ids=ids[None])[0].gather(-1, targets[:, None]).mean().item()
        wc = policy(window)
        inputs = assemble_live(wc.entries, ids, base.model.get_input_embeddings(), gistnet, horizon=h,
                               gist_embedding=plain_embedding)
        with gaussian_positions(base.model, inputs.mu, inputs.sigma):
            wc_nll = -horizon_logprobs(base, h, inputs_embeds=inputs.inputs_embeds)[0].gather(-1, targets[:, None]).mean().item()
        future = torch.as_tensor(window.future.astype(np.int64))
        out = mega_prediction_loss(base, gistnet, inputs, targets, cfg.mega.window, gist_embedding=plain_embedding,
                                   kernel=cfg.mega.kernel, lod2_future=future)
        row = {"nll_full": full, "nll_wc": wc_nll, "nll_mega": out.metrics["nll"],
               "lod1_agreement": out.metrics.get("lod1_agreement", float("nan")),
               "lod2_agreement": out.metrics.get("lod2_agreement", float("nan")), "wc_entries": len(wc)}
        for level in (1, 2):  # ΔNLL@H per level: the history compressed with gists of one level only
            try:
                one = single_level_start(window.history, t.budget, wcc.protected_tail, level, wcc.levels,
                                         wcc.sink_tokens)
                row[f"nll_mega_lod{level}"] = level_nll(cfg, base, gistnet, one, ids, targets, plain_embedding)
            except BudgetExceeded:
                row[f"nll_mega_lod{level}"] = float("nan")
        rows.append(row)
    mean = {k: float(np.nanmean([r[k] for r in rows])) if not all(np.isnan(r[k]) for r in rows) else None
            for k in rows[0]}
    for key, nll in (("delta_nll_wc", "nll_wc"), ("delta_nll_mega", "nll_mega"),
                     ("delta_nll_mega_lod1", "nll_mega_lod1"), ("delta_nll_mega_lod2", "nll_mega_lod2")):
        mean[key] = mean[nll] - mean["nll_full"] if mean[nll] is not None else None
    return mean


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--out", default="artifacts/benchmarks/mega_prediction.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.profile, ["mega.attention=true", "mega.prediction=true", *args.overrides])
    base = load_base_model(cfg)
    install_gaussian_rope(base.model)
    install_mega_attention(base.model, cfg.mega.layers)
    embedding = base.model.get_input_embeddings()
    if args.checkpoint:
        gistnet = load_gistnet(args.checkpoint / "jt1" / "final", base.model)
        policy = lens_policy(cfg, embedding, gistnet, load_lensnet(args.checkpoint / "jt2" / "final"), model=base.model)
    else:
        gistnet = build_gistnet(cfg.gistnet, embedding, seed=cfg.seed, levels=cfg.wc.levels, model=base.model)
        policy = cold_start_policy(cfg)
    gistnet.requires_grad_(False)
    t = cfg.train
    docs = eligible(read_split(shards_dir(cfg), "val", base.tokenizer.name), t.history, t.horizon, TOP)
    windows = [sample_window(docs, history=t.history, horizon=t.horizon, align=span(cfg.wc.levels),
                             seed=cfg.seed + 99, step=0, item=i, lookahead=TOP) for i in range(args.windows)]
    results = {"profile": args.profile, "checkpoint": str(args.checkpoint), "mega": cfg.mega.model_dump(mode="json"),
               "windows": len(windows), "history": t.history, "budget": t.budget, "horizon": t.horizon}
    tick = time.perf_counter()
    results["before"] = measure(cfg, base, gistnet, policy, windows, embedding)
    train_docs = read_split(shards_dir(cfg), "train", base.tokenizer.name)
    phase = JT3LoRA(cfg, base, gistnet, train_docs, policy)
    with tempfile.TemporaryDirectory() as tmp:
        fit_result = fit(phase, t.jt3, Path(tmp) / "jt3", checkpoint_every=t.jt3.steps)
    results["train"] = {"steps": t.jt3.steps, "seconds": fit_result.seconds,
                        "first": fit_result.telemetry[0], "last": fit_result.telemetry[-1]}
    results["after"] = measure(cfg, base, gistnet, policy, windows, phase.plain_embedding, phase.peft.disable_adapter)
    results["seconds"] = time.perf_counter() - tick
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{base.model_id}, L={t.history}, B={t.budget}, H={t.horizon}, W={cfg.mega.window}, {len(windows)} val windows, "
          f"JT3 {t.jt3.steps} steps with MegaAttention + MegaPrediction")
    def cell(value, fmt, missing):
        return missing if value is None else format(value, fmt)

    print("| | NLL full | ΔNLL@H WC (full attention) | ΔNLL@H WC (MegaAttention) | ΔNLL@H LOD1 only (Mega) | "
          "ΔNLL@H LOD2 only (Mega) | LOD1 agreement | LOD2 agreement |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("before", "after"):
        r = results[name]
        print(f"| {name} | {r['nll_full']:.3f} | {r['delta_nll_wc']:+.3f} | {r['delta_nll_mega']:+.3f} | "
              f"{cell(r['delta_nll_mega_lod1'], '+.3f', '— (does not fit)')} | "
              f"{cell(r['delta_nll_mega_lod2'], '+.3f', '— (does not fit)')} | {r['lod1_agreement']:.3f} | "
              f"{cell(r['lod2_agreement'], '.3f', '— (no wLOD2 node: train.budget < 1,024)')} |")
    first, last = results["train"]["first"], results["train"]["last"]
    lod2 = (f", LOD2 agreement {first['lod2_agreement']:.3f} -> {last['lod2_agreement']:.3f}"
            if "lod2_agreement" in last else "")
    norms = " / ".join(f"{k.removeprefix('grad_norm_')} {v:.3g}" for k, v in last.items() if k.startswith("grad_norm_"))
    print(f"\ntraining: loss {first['loss']:.3f} -> {last['loss']:.3f}, LOD1 agreement {first['lod1_agreement']:.3f} -> "
          f"{last['lod1_agreement']:.3f}{lod2}, last-step grad norms {norms}, {results['train']['seconds']:.0f} s")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
