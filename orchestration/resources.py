"""Typed Dagster resources: the seam between the asset graph and the library config."""

from __future__ import annotations

import os
import shlex

from dagster import ConfigurableResource

from megacontext.config import Config, load_config


def env_overrides() -> list[str]:
    """`key.sub=value` overrides from MEGACONTEXT_OVERRIDES (shell-quoted, space-separated) for `dagster dev`."""
    return shlex.split(os.environ.get("MEGACONTEXT_OVERRIDES", ""))


class MegaContextConfig(ConfigurableResource):
    """Which profile and `key.sub=value` overrides the assets resolve (same syntax as the CLI)."""

    profile: str = "default"
    overrides: list[str] = []
    nproc: int = 1  # > 1: training phases run as `torchrun` subprocesses (DDP) launched through Dagster Pipes

    def cli_args(self) -> list[str]:
        """The same profile and overrides as CLI arguments (for subprocesses)."""
        return ["--profile", self.profile, *self.overrides]

    def resolve(self) -> Config:
        return load_config(self.profile, self.overrides)


GATE_8K_PROFILE = "gate-8k-cpu"
GATE_8K_ROOT = "artifacts/gate-8k"


def gate_8k_config(env: dict[str, str] | None = None) -> MegaContextConfig:
    """The gate-8k lifecycle's config: profile MEGACONTEXT_GATE_8K_PROFILE (default gate-8k-cpu; gate-8k on an
    accelerator) under its own artifact root MEGACONTEXT_GATE_8K_ROOT (default artifacts/gate-8k), data included
    (a MEGACONTEXT_DATA_ROOT meant for the default profile is not used), so that its corpus, cycles, champion
    and nightly history never mix with the default profile's."""
    env = os.environ if env is None else env
    root = env.get("MEGACONTEXT_GATE_8K_ROOT", GATE_8K_ROOT)
    return MegaContextConfig(profile=env.get("MEGACONTEXT_GATE_8K_PROFILE", GATE_8K_PROFILE),  # its own data too:
                             overrides=[f"paths.artifact_root={root}", f"paths.data_root={root}/data"])
