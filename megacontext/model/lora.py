"""LoRA adapters (Hu et al. 2021) on the frozen base model, via peft: which modules, attach fresh, load saved.

Adapters go on the input embedding and the chosen attention projections of the first and last
decoder blocks (`train.lora`). JT3 trains them (`megacontext.training.jt3_lora`); evaluation and
the runtime load them from a cycle's `jt3/final`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from megacontext.config import LoraSettings
from megacontext.errors import ConfigError
from megacontext.lifecycle.lineage import repair_advice, verify_artifact
from megacontext.model.base_model import BaseLM


def lora_targets(model: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """Module names to adapt: the embedding and the chosen projections of the first/last blocks."""
    n_layers = model.config.num_hidden_layers
    blocks = sorted(set(range(min(settings.first_blocks, n_layers))) |
                    set(range(max(n_layers - settings.last_blocks, 0), n_layers)))
    names = {name for name, _ in model.named_modules()}
    targets = [f"model.layers.{i}.self_attn.{p}" for i in blocks for p in settings.projections]
    if settings.embedding:
        targets.insert(0, "model.embed_tokens")
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(f"train.lora targets not found in the base model: {missing[:3]}; check train.lora.projections")
    return targets


def attach_lora(base: BaseLM, settings: LoraSettings, *, seed: int) -> PeftModel:
    """Wrap the (frozen) base with fresh LoRA adapters; only the adapters require grad."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                            target_modules=lora_targets(base.model, settings))
        return get_peft_model(base.model, config)


def load_lora(base: BaseLM, folder: Path, *, trainable: bool = False) -> PeftModel:
    """Apply saved adapters (safetensors) to the base: frozen, or `trainable` for a warm start.

    `folder` is a sealed phase output (`<cycle>/jt3/final`): every file is checked against its
    manifest first. Raises ArtifactError (one line: the file and how to rebuild it) when the
    manifest is missing or a file differs from it.
    """
    verify_artifact(folder, repair=repair_advice(folder))
    return PeftModel.from_pretrained(base.model, folder, is_trainable=trainable)
