"""One training cycle: JT1 (GistNet) -> JT2 (labels, LensNet) -> JT3 (LoRA), warm-started (DESIGN §3).

Each phase is its own function that reads what it needs from disk (the cycle
folder and the previous accepted cycle), so the CLI runs them in a row and
Dagster runs them as separate assets. Cycle 1 starts from nothing
(mean-initialised GistNet; an untrained LensNet scores 0, so the allocator
keeps the cold start); cycle n from cycle n−1's checkpoints. A finished phase
is not redone and an interrupted one resumes from its checkpoints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from peft import PeftModel

from megacontext.base_model import BaseLM, load_base_model
from megacontext.config import Config, config_hash
from megacontext.focus_policy import lens_policy
from megacontext.gaussian_rope import install_gaussian_rope
from megacontext.gistnet import GistNet, build_gistnet, load_gistnet
from megacontext.jt1_gistnet import JT1GistNet
from megacontext.jt2_lensnet import JT2LensNet, generate_labels
from megacontext.jt3_lora import JT3LoRA, attach_lora
from megacontext.lensnet import LensNet, build_lensnet, load_lensnet
from megacontext.lineage import write_manifest
from megacontext.shards import TokenizedDocument, read_split, shards_dir
from megacontext.train_loop import fit
from megacontext.tree_build import build_trees

KIND = "cycle"
FORMAT_VERSION = 1
PHASES = ("jt1", "jt2", "jt3")


def cycle_dir(cfg: Config, cycle: int) -> Path:
    return Path(cfg.paths.artifact_root) / "cycles" / f"cycle-{cycle:04d}"


def phase_done(folder: Path) -> bool:
    return (folder / "final" / "telemetry.json").is_file()


def _setup(cfg: Config, cycle: int) -> tuple[Path, BaseLM, list[TokenizedDocument]]:
    out = cycle_dir(cfg, cycle)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    base = load_base_model(cfg)
    install_gaussian_rope(base.model)
    return out, base, read_split(shards_dir(cfg), "train", tokenizer_name=base.tokenizer.name)


def _gistnet(cfg: Config, base: BaseLM, out: Path, previous: Path | None) -> GistNet:
    """This cycle's GistNet if JT1 finished, else the warm start (previous cycle's, or fresh)."""
    if phase_done(out / "jt1"):
        return load_gistnet(out / "jt1" / "final")
    if previous:
        return load_gistnet(previous / "jt1" / "final")
    return build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=cfg.seed, levels=cfg.wc.levels)


def _lensnet(cfg: Config, base: BaseLM, out: Path, previous: Path | None) -> LensNet:
    if phase_done(out / "jt2"):
        return load_lensnet(out / "jt2" / "final")
    if previous:
        return load_lensnet(previous / "jt2" / "final")
    return build_lensnet(cfg.lensnet, base.d_model, seed=cfg.seed)


def run_jt1(cfg: Config, cycle: int, previous: Path | None = None) -> Path:
    """JT1: train GistNet under the current (previous cycle's) focus policy."""
    out, base, docs = _setup(cfg, cycle)
    if not phase_done(out / "jt1"):
        gistnet, lensnet = _gistnet(cfg, base, out, previous), _lensnet(cfg, base, out, previous)
        policy = lens_policy(cfg, base.model.get_input_embeddings(), gistnet, lensnet)
        fit(JT1GistNet(cfg, base, gistnet, docs, policy), cfg.train.jt1, out / "jt1",
            checkpoint_every=cfg.train.checkpoint_every)
    return out / "jt1" / "final"


def run_jt2_labels(cfg: Config, cycle: int, previous: Path | None = None) -> Path:
    """JT2 labels: counterfactual ΔNLL on on-policy snapshots, with this cycle's GistNet."""
    out, base, docs = _setup(cfg, cycle)
    labels = out / "jt2" / "labels"
    if not (labels / "stats.json").is_file():
        gistnet, lensnet = _gistnet(cfg, base, out, previous), _lensnet(cfg, base, out, previous)
        gistnet.requires_grad_(False)
        policy = lens_policy(cfg, base.model.get_input_embeddings(), gistnet, lensnet)
        stats = generate_labels(cfg, base, gistnet, docs, policy, labels)
        (labels / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")  # written last: labels complete
    return labels


def run_jt2(cfg: Config, cycle: int, previous: Path | None = None) -> Path:
    """JT2: train LensNet on this cycle's labels."""
    labels = run_jt2_labels(cfg, cycle, previous)
    out, base, docs = _setup(cfg, cycle)
    if not phase_done(out / "jt2"):
        gistnet, lensnet = _gistnet(cfg, base, out, previous), _lensnet(cfg, base, out, previous)
        gistnet.requires_grad_(False)
        policy = lens_policy(cfg, base.model.get_input_embeddings(), gistnet, lensnet)
        fit(JT2LensNet(cfg, base, gistnet, lensnet, docs, policy, labels), cfg.train.jt2, out / "jt2",
            checkpoint_every=cfg.train.checkpoint_every)
    return out / "jt2" / "final"


def run_jt3(cfg: Config, cycle: int, previous: Path | None = None) -> Path:
    """JT3: train LoRA adapters with this cycle's GistNet and LensNet frozen."""
    out, base, docs = _setup(cfg, cycle)
    if not phase_done(out / "jt3"):
        gistnet, lensnet = _gistnet(cfg, base, out, previous), _lensnet(cfg, base, out, previous)
        gistnet.requires_grad_(False)
        lensnet.requires_grad_(False)
        policy = lens_policy(cfg, base.model.get_input_embeddings(), gistnet, lensnet)
        peft = PeftModel.from_pretrained(base.model, previous / "jt3" / "final", is_trainable=True) if previous \
            else attach_lora(base, cfg.train.lora, seed=cfg.seed)
        fit(JT3LoRA(cfg, base, gistnet, docs, policy, peft_model=peft), cfg.train.jt3, out / "jt3",
            checkpoint_every=cfg.train.checkpoint_every)
    return out / "jt3" / "final"


def finish_cycle(cfg: Config, cycle: int, previous: Path | None = None) -> Path:
    """Trees of the evaluation split with the new GistNet, the cycle summary and its lineage manifest."""
    out = cycle_dir(cfg, cycle)
    missing = [p for p in PHASES if not phase_done(out / p)]
    if missing:
        raise RuntimeError(f"{out}: phases {missing} have not finished; run them first")
    base = load_base_model(cfg)  # plain (no adapters): trees hold what GistNet makes of the base embedding
    tick = time.perf_counter()
    with torch.no_grad():
        build_trees(cfg, base=base, gistnet=load_gistnet(out / "jt1" / "final"), out=out / "trees",
                    splits=(cfg.eval.split,))
    telemetry = {p: json.loads((out / p / "final" / "telemetry.json").read_text()) for p in PHASES}
    labels = json.loads((out / "jt2" / "labels" / "stats.json").read_text())
    seconds = {p: sum(r["seconds"] for r in rows) for p, rows in telemetry.items()}
    seconds.update({"jt2_labels": labels["seconds"], "trees": time.perf_counter() - tick})
    seconds["total"] = sum(seconds.values())
    summary = {"cycle": cycle, "previous": str(previous) if previous else None, "seconds": seconds,
               "labels": labels, "telemetry": telemetry}
    (out / "cycle.json").write_text(json.dumps(summary, indent=1) + "\n")
    inputs = [shards_dir(cfg), out / "trees"] + ([previous] if previous and (previous / "manifest.json").is_file() else [])
    write_manifest(out, kind=KIND, format_version=FORMAT_VERSION, config_hash=config_hash(cfg), inputs=inputs,
                   extra={"cycle": cycle, "base_model_id": base.model_id, "previous": summary["previous"]})
    return out


def run_cycle(cfg: Config, cycle: int, *, previous: Path | None = None) -> Path:
    """Run (or resume) the whole cycle; return its folder."""
    run_jt1(cfg, cycle, previous)
    run_jt2(cfg, cycle, previous)
    run_jt3(cfg, cycle, previous)
    return finish_cycle(cfg, cycle, previous)
