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
