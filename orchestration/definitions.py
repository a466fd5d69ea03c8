"""Wires the MegaContext code location: assets, jobs, schedule, sensor, resources, executor. Nothing else lives here."""

from __future__ import annotations

import os
from typing import Callable

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    PipesSubprocessClient,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    in_process_executor,
    sensor,
)

from megacontext.lifecycle.champion import gate_passed
from megacontext.training.cycle import cycle_dir, cycle_name, parse_cycle_name
from orchestration.assets.cycles import GROUP, champion, cycle_partitions, gistnet, lens_labels, lensnet, lora_adapter, \
    validation_report
from orchestration.assets.data import corpus, dataset_shards, eval_references, megacontext_trees
from orchestration.assets.nightly import gate_8k_nightly_report, nightly_regression_report
from orchestration.resources import MegaContextConfig, env_overrides, gate_8k_config

mc = MegaContextConfig(profile=os.environ.get("MEGACONTEXT_PROFILE", "default"), overrides=env_overrides(),
                       nproc=int(os.environ.get("MEGACONTEXT_NPROC", "1")))
mc_gate_8k = gate_8k_config()

cycle_job = define_asset_job("cycle", selection=AssetSelection.groups(GROUP), partitions_def=cycle_partitions,
                             description="One training cycle: JT1 -> JT2 labels -> LensNet -> LoRA -> gate -> champion.")
data_job = define_asset_job("data", selection=AssetSelection.groups("data", "evaluation"),
                            description="Corpus -> shards -> baseline trees, and the evaluation's references.")
nightly_job = define_asset_job("nightly_regression", selection=AssetSelection.assets(nightly_regression_report),
                               description="Re-evaluate the champion and compare with its recorded numbers.")
nightly_schedule = ScheduleDefinition(job=nightly_job, cron_schedule="0 3 * * *", execution_timezone="UTC",
                                      default_status=DefaultScheduleStatus.RUNNING)
gate_8k_nightly_job = define_asset_job("nightly_gate_8k", selection=AssetSelection.assets(gate_8k_nightly_report),
                                       description="Re-evaluate the gate-8k champion (W_max 8,192, 32k histories).")
# Off until there is a gate-8k champion and the `gemma` extra is installed; ~1 h on 2 CPU cores (gate-8k-cpu).
gate_8k_nightly_schedule = ScheduleDefinition(job=gate_8k_nightly_job, cron_schedule="0 1 * * *",
                                              execution_timezone="UTC", default_status=DefaultScheduleStatus.STOPPED)


def next_cycle_key(existing: list[str], evaluated: Callable[[int], bool]) -> str | None:
    """The partition to add next: cycle-0001 first, then n+1 once cycle n has its validation report."""
    numbers = sorted(parse_cycle_name(k) for k in existing)
    if not numbers:
        return "cycle-0001"
    return cycle_name(numbers[-1] + 1) if evaluated(numbers[-1]) else None


@sensor(job=cycle_job, minimum_interval_seconds=60, default_status=DefaultSensorStatus.STOPPED,
        description="Adds the next cycle partition and launches it once the latest cycle has been evaluated.")
def next_cycle(context: SensorEvaluationContext) -> SensorResult | SkipReason:
    cfg = mc.resolve()
    existing = list(context.instance.get_dynamic_partitions(cycle_partitions.name))
    key = next_cycle_key(existing, lambda n: gate_passed(cfg, cycle_dir(cfg, n)) is not None)
    if key is None:
        return SkipReason("the latest cycle has no validation report yet")
    return SensorResult(run_requests=[RunRequest(partition_key=key, run_key=key)],
                        dynamic_partitions_requests=[cycle_partitions.build_add_request([key])])


defs = Definitions(
    assets=[corpus, dataset_shards, megacontext_trees, eval_references, gistnet, lens_labels, lensnet, lora_adapter, validation_report,
            champion, nightly_regression_report, gate_8k_nightly_report],
    jobs=[cycle_job, data_job, nightly_job, gate_8k_nightly_job],
    schedules=[nightly_schedule, gate_8k_nightly_schedule],
    sensors=[next_cycle],
    resources={"mc": mc, "mc_gate_8k": mc_gate_8k, "pipes": PipesSubprocessClient()},
    executor=in_process_executor,  # 2-core machines: the multiprocess executor re-imports torch per step
)
