"""One training cycle: JT1 (GistNet) -> JT2 (labels, LensNet) -> JT3 (LoRA), warm-started (DESIGN §3).

Cycle 1 starts from nothing (mean-initialised GistNet; an untrained LensNet
scores 0, so the allocator keeps the cold start); cycle n starts from cycle
n−1's checkpoints. Every phase resumes from its own checkpoints and a finished
phase is not redone, so a killed cycle picks up where it stopped. The cycle
folder gets the resolved config, per-phase telemetry, trees of the evaluation
split rebuilt with the new GistNet, and a lineage manifest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from peft import PeftModel

from megacontext.base_model import load_base_model
from megacontext.config import Config, config_hash
from megacontext.focus_policy import lens_policy
from megacontext.gaussian_rope import install_gaussian_rope
from megacontext.gistnet import build_gistnet, load_gistnet
from megacontext.jt1_gistnet import JT1GistNet
from megacontext.jt2_lensnet import JT2LensNet, generate_labels
from megacontext.jt3_lora import JT3LoRA, attach_lora
from megacontext.lensnet import build_lensnet, load_lensnet
from megacontext.lineage import write_manifest
from megacontext.shards import read_split, shards_dir
from megacontext.train_loop import fit
from megacontext.tree_build import build_trees

KIND = "cycle"
FORMAT_VERSION = 1


def cycle_dir(cfg: Config, cycle: int) -> Path:
    return Path(cfg.paths.artifact_root) / "cycles" / f"cycle-{cycle:04d}"


def run_cycle(cfg: Config, cycle: int, *, previous: Path | None = None) -> Path:
    """Run (or resume) cycle `cycle`; return its folder."""
    out = cycle_dir(cfg, cycle)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    began = time.perf_counter()
    base = load_base_model(cfg)
    install_gaussian_rope(base.model)
    embedding = base.model.get_input_embeddings()
    docs = read_split(shards_dir(cfg), "train", tokenizer_name=base.tokenizer.name)
    gistnet = load_gistnet(previous / "jt1" / "final") if previous else \
        build_gistnet(cfg.gistnet, embedding, seed=cfg.seed, levels=cfg.wc.levels)
    lensnet = load_lensnet(previous / "jt2" / "final") if previous else \
        build_lensnet(cfg.lensnet, base.d_model, seed=cfg.seed)
    timings = {}
    every = cfg.train.checkpoint_every

    def phase_done(name: str) -> bool:
        return (out / name / "final" / "telemetry.json").is_file()

    tick = time.perf_counter()
    if phase_done("jt1"):
        gistnet = load_gistnet(out / "jt1" / "final")
    else:
        policy = lens_policy(cfg, embedding, gistnet, lensnet, budget=cfg.train.budget)
        fit(JT1GistNet(cfg, base, gistnet, docs, policy), cfg.train.jt1, out / "jt1", checkpoint_every=every)
    gistnet.requires_grad_(False)
    timings["jt1"] = time.perf_counter() - tick

    tick = time.perf_counter()
    policy = lens_policy(cfg, embedding, gistnet, lensnet, budget=cfg.train.budget)
    labels = out / "jt2" / "labels"
    if not (labels / "labels.parquet").is_file():
        stats = generate_labels(cfg, base, gistnet, docs, policy, labels)
        (labels / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if phase_done("jt2"):
        lensnet = load_lensnet(out / "jt2" / "final")
    else:
        fit(JT2LensNet(cfg, base, gistnet, lensnet, docs, policy, labels), cfg.train.jt2, out / "jt2",
            checkpoint_every=every)
    lensnet.requires_grad_(False)
    timings["jt2"] = time.perf_counter() - tick

    tick = time.perf_counter()
    if not phase_done("jt3"):
        policy = lens_policy(cfg, embedding, gistnet, lensnet, budget=cfg.train.budget)
        peft = PeftModel.from_pretrained(base.model, previous / "jt3" / "final", is_trainable=True) if previous \
            else attach_lora(base, cfg.train.lora, seed=cfg.seed)
        fit(JT3LoRA(cfg, base, gistnet, docs, policy, peft_model=peft), cfg.train.jt3, out / "jt3",
            checkpoint_every=every)
    timings["jt3"] = time.perf_counter() - tick

    tick = time.perf_counter()
    with torch.no_grad():
        build_trees(cfg, base=load_base_model(cfg), gistnet=gistnet, out=out / "trees", splits=(cfg.eval.split,))
    timings["trees"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - began
    summary = {"cycle": cycle, "previous": str(previous) if previous else None, "seconds": timings,
               "telemetry": {name: json.loads((out / name / "final" / "telemetry.json").read_text())
                             for name in ("jt1", "jt2", "jt3")}}
    (out / "cycle.json").write_text(json.dumps(summary, indent=1) + "\n")
    inputs = [shards_dir(cfg), out / "trees"] + ([previous] if previous and (previous / "manifest.json").is_file() else [])
    write_manifest(out, kind=KIND, format_version=FORMAT_VERSION, config_hash=config_hash(cfg), inputs=inputs,
                   extra={"cycle": cycle, "base_model_id": base.model_id, "seconds": timings})
    return out
