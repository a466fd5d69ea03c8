"""Wires the MegaContext code location: assets, resources, executor. Nothing else lives here."""

from __future__ import annotations

import os

from dagster import Definitions, in_process_executor

from orchestration.assets.data import corpus, dataset_shards
from orchestration.resources import MegaContextConfig

defs = Definitions(
    assets=[corpus, dataset_shards],
    resources={"mc": MegaContextConfig(profile=os.environ.get("MEGACONTEXT_PROFILE", "default"))},
    executor=in_process_executor,  # 2-core machines: the multiprocess executor re-imports torch per step
)
