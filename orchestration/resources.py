"""Typed Dagster resources: the seam between the asset graph and the library config."""

from __future__ import annotations

from dagster import ConfigurableResource

from megacontext.config import Config, load_config


class MegaContextConfig(ConfigurableResource):
    """Which profile and `key.sub=value` overrides the assets resolve (same syntax as the CLI)."""

    profile: str = "default"
    overrides: list[str] = []

    def resolve(self) -> Config:
        return load_config(self.profile, self.overrides)
