"""Live LoRA adapters on a test base: attached, then every B matrix drawn at random (peft starts B at 0,
which would leave the adapted model equal to the plain one)."""

from __future__ import annotations

import torch


def live_lora(base, settings, *, seed: int, b_seed: int):
    """`attach_lora(base, settings, seed=seed)` with every lora_B / lora_embedding_B drawn from N(0, 1)
    (generator `b_seed`); returns the PeftModel."""
    from megacontext.model.lora import attach_lora

    peft = attach_lora(base, settings, seed=seed)
    g = torch.Generator().manual_seed(b_seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return peft
