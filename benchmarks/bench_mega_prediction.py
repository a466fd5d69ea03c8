"""MegaPrediction in JT3: LOD agreement and ΔNLL@H on held-out windows before and after training.

On `--windows` held-out (val) windows of the training shape (history L_train,
horizon H, the cycle's LensNet focus at B_train): NLL@H of the plain base on
the full window, of the working context with full attention, and of the same
working context through MegaAttention (window `mega.window`), plus the
MegaPrediction LOD agreement per level (mean cos(ĝ, g)). Then JT3 trains fresh
LoRA adapters with MegaAttention + MegaPrediction (`train.jt3` steps) and the
same windows are measured again. Needs `megacontext prepare-data`; uses the
GistNet and LensNet of `--checkpoint` (untrained parts without it).

    .venv/bin/python benchmarks/bench_mega_prediction.py --profile default --checkpoint artifacts/cycles/cycle-0001
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

from megacontext.base_model import load_base_model
from megacontext.config import load_config
from megacontext.focus_policy import cold_start_policy, lens_policy
from megacontext.gaussian_rope import gaussian_positions, install_gaussian_rope
from megacontext.gistnet import build_gistnet, load_gistnet
from megacontext.jt1_gistnet import horizon_logprobs
from megacontext.jt3_lora import JT3LoRA
from megacontext.lensnet import load_lensnet
from megacontext.mega_model import install_mega_attention
from megacontext.mega_prediction import mega_prediction_loss
from megacontext.nodes import span
from megacontext.shards import read_split, shards_dir
from megacontext.train_loop import fit
from megacontext.windows import eligible, sample_window
from megacontext.working_context import assemble_live


@torch.no_grad()
def measure(cfg, base, gistnet, policy, windows, plain_embedding, plain=nullcontext) -> dict[str, float]:
    """`plain()` switches adapters off for the full-context baseline (as the evaluation does)."""
    rows = []
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
        out = mega_prediction_loss(base, gistnet, inputs, targets, cfg.mega.window, gist_embedding=plain_embedding,
                                   kernel=cfg.mega.kernel)
        rows.append({"nll_full": full, "nll_wc": wc_nll, "nll_mega": out.metrics["nll"],
                     "lod1_agreement": out.metrics.get("lod1_agreement", float("nan")),
                     "lod2_agreement": out.metrics.get("lod2_agreement", float("nan")), "wc_entries": len(wc)})
    mean = {k: float(np.nanmean([r[k] for r in rows])) if not all(np.isnan(r[k]) for r in rows) else None
            for k in rows[0]}
    mean["delta_nll_wc"] = mean["nll_wc"] - mean["nll_full"]
    mean["delta_nll_mega"] = mean["nll_mega"] - mean["nll_full"]
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
        gistnet = load_gistnet(args.checkpoint / "jt1" / "final")
        policy = lens_policy(cfg, embedding, gistnet, load_lensnet(args.checkpoint / "jt2" / "final"))
    else:
        gistnet = build_gistnet(cfg.gistnet, embedding, seed=cfg.seed, levels=cfg.wc.levels)
        policy = cold_start_policy(cfg)
    gistnet.requires_grad_(False)
    t = cfg.train
    docs = eligible(read_split(shards_dir(cfg), "val", base.tokenizer.name), t.history, t.horizon)
    windows = [sample_window(docs, history=t.history, horizon=t.horizon, align=span(cfg.wc.levels),
                             seed=cfg.seed + 99, step=0, item=i) for i in range(args.windows)]
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
    print("| | NLL full | ΔNLL@H WC (full attention) | ΔNLL@H WC (MegaAttention) | LOD1 agreement | LOD2 agreement |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("before", "after"):
        r = results[name]
        lod2 = f"{r['lod2_agreement']:.3f}" if r["lod2_agreement"] is not None else "— (no wLOD2 node)"
        print(f"| {name} | {r['nll_full']:.3f} | {r['delta_nll_wc']:+.3f} | {r['delta_nll_mega']:+.3f} | "
              f"{r['lod1_agreement']:.3f} | {lod2} |")
    first, last = results["train"]["first"], results["train"]["last"]
    print(f"\ntraining: loss {first['loss']:.3f} -> {last['loss']:.3f}, LOD1 agreement {first['lod1_agreement']:.3f} -> "
          f"{last['lod1_agreement']:.3f}, grad norms tok {last['grad_norm_tok']:.3g} / lod1 {last['grad_norm_lod1']:.3g}, "
          f"{results['train']['seconds']:.0f} s")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
