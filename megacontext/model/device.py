"""Where the pipeline computes: `model.device` (cpu, or cuda[:N] on a machine with an accelerator)."""

from __future__ import annotations

import torch

from megacontext.config import Config
from megacontext.errors import ConfigError


def use_device(cfg: Config) -> torch.device:
    """Make `cfg.model.device` this process's default device (torch.set_default_device) and return it.

    Every tensor and module the pipeline creates then lives there; numbers leave it only at the
    numpy boundaries (`.cpu()`). A no-op for "cpu". Raises ConfigError when CUDA is asked for on a
    machine without it.
    """
    device = torch.device(cfg.model.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={cfg.model.device} but this machine has no CUDA device "
                          f"(torch {torch.__version__}); use model.device=cpu")
    if device.type != "cpu":
        torch.set_default_device(device)
    return device
