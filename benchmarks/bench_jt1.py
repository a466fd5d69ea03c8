"""JT1 schedules side by side: which learning rate, warm-up and step count make gists better, not worse?

Each `--setting` (phase-config fields, e.g. `lr=3e-4,warmup=4`) trains GistNet from the same
warm start (the mean-initialised GistNet, as at cycle 1) under the cold-start policy of cycle 1,
on the same training windows, with the loop's held-out validation every `--eval-every` steps
(NLL@H of the working context on unseen training windows, `SeedOffset.JT1_HELDOUT`) and the best
step exported (docs/lifecycle.md §3.2). Then the gist guard reads its own unseen windows
(`SeedOffset.JT1_GUARD`, never the ones early stopping chose on) three ways: with the exported gists,
with the mean-initialised ones and with the gisted spans left out (§3.3). Differences are nats/token
with 95 % cluster-bootstrap CIs over windows. Each setting's GistNet is kept at
`<workdir>/<setting>/jt1/final`, so `bench_gist_harm.py --variant cycle:<workdir>/<setting>` reads it at
the evaluation's geometry.

    .venv/bin/python benchmarks/bench_jt1.py --profile default --steps 24 --eval-every 4 \\
        --setting lr=1e-3 --setting lr=3e-4,warmup=4 --setting lr=1e-4 \\
        --workdir artifacts/benchmarks/jt1 --out artifacts/benchmarks/jt1.json

Needs `megacontext prepare-data --profile <profile>` first. A setting whose folder already holds a
finished run is read back, not retrained (delete the folder to rerun it).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from megacontext.config import PhaseConfig, load_config
from megacontext.data.shards import read_split, shards_dir
from megacontext.model.base_model import load_base_model
from megacontext.model.gistnet import build_gistnet
from megacontext.training.jt1_gistnet import JT1GistNet, gist_guard
from megacontext.training.loop import fit


def parse_setting(text: str, defaults: PhaseConfig) -> PhaseConfig:
    """`lr=3e-4,warmup=4` -> a PhaseConfig (defaults for the rest); SystemExit naming a bad field or value."""
    fields: dict[str, str] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in PhaseConfig.model_fields:
            raise SystemExit(f"--setting {text!r}: {part!r} is not FIELD=VALUE with FIELD one of {sorted(PhaseConfig.model_fields)}")
        fields[key] = value
    try:
        return PhaseConfig.model_validate(defaults.model_dump() | fields)
    except ValueError as exc:
        raise SystemExit(f"--setting {text!r}: {exc}".splitlines()[0]) from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--setting", action="append", required=True, help="FIELD=VALUE[,FIELD=VALUE] of the JT1 phase config (repeat)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--guard-windows", type=int, default=8)
    parser.add_argument("--workdir", default="artifacts/benchmarks/jt1")
    parser.add_argument("--out", default="artifacts/benchmarks/jt1.json")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.profile, args.overrides)
    defaults = cfg.train.jt1.model_copy(update={"steps": args.steps, "eval_every": args.eval_every,
                                                "eval_windows": args.eval_windows})
    settings = {re.sub(r"[^A-Za-z0-9.=_-]+", "_", text): parse_setting(text, defaults) for text in args.setting}
    base = load_base_model(cfg)
    docs = read_split(shards_dir(cfg), "train", tokenizer_name=base.tokenizer.name)
    embedding = base.model.get_input_embeddings()

    def mean_init():
        return build_gistnet(cfg.gistnet, embedding, seed=cfg.seed, levels=cfg.wc.levels, model=base.model)

    results = {}
    for name, pcfg in settings.items():
        out = Path(args.workdir) / name / "jt1"
        began = time.perf_counter()
        phase = JT1GistNet(cfg, base, mean_init(), docs)
        fitted = fit(phase, pcfg, out, checkpoint_every=cfg.train.checkpoint_every)
        best = json.loads((out / "final" / "best.json").read_text())
        guard = gist_guard(phase, mean_init(), windows=args.guard_windows)
        curve = [{"step": 0, "val_loss": best["start_val_loss"]}] + [
            {"step": row["step"], "val_loss": row["val_loss"]} for row in fitted.telemetry if "val_loss" in row]
        results[name] = {"phase": pcfg.model_dump(), "best_step": best["step"], "best_val_loss": best["val_loss"],
                         "curve": curve, "train_kl": [row["kl"] for row in fitted.telemetry],
                         "guard": guard, "seconds": round(time.perf_counter() - began, 1)}
        g = guard
        print(f"{name}: best step {best['step']} (held-out NLL@H {best['val_loss']:.3f}; step 0 {curve[0]['val_loss']:.3f}); "
              f"guard trained - mean {_fmt(g['trained_minus_warm'])}, trained - left out {_fmt(g['trained_minus_left_out'])}, "
              f"mean - left out {_fmt(g['warm_minus_left_out'])}; {results[name]['seconds']:.0f} s", flush=True)
    result = {"profile": cfg.profile, "base": base.model_id, "history": cfg.train.history, "budget": cfg.train.budget,
              "horizon": cfg.train.horizon, "positions": cfg.wc.positions, "eval_windows": args.eval_windows,
              "guard_windows": args.guard_windows, "settings": results}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def _fmt(d: dict) -> str:
    lo, hi = d["ci"] or (float("nan"), float("nan"))
    return f"{d['value']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
