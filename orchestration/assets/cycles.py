"""Per-cycle assets (dynamic partitions `cycle-0001`, …): JT1 → JT2 labels → LensNet → LoRA → validation report.

Thin (docs/style.md §1–2): resolve the config, call the same library function as the
CLI (`megacontext train-phase` / `evaluate` / `promote`), return metadata. The
previous accepted cycle (warm start) is found in code (`previous_accepted`)
and recorded on every asset. The ΔNLL gate is a blocking asset check on the
validation report, so `champion` is only materialized after a pass.
"""


import json
import sys
from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    PipesSubprocessClient,
    asset,
)

from megacontext.training import cycle as lifecycle
from megacontext.lifecycle.champion import previous_accepted, promote
from megacontext.config import Config
from megacontext.evaluation.evaluate import evaluate, passkey_accuracy
from megacontext.lifecycle.lineage import manifest_digest, read_manifest
from megacontext.plots import png_markdown
from orchestration.assets.data import dataset_shards, eval_references, megacontext_trees
from orchestration.resources import MegaContextConfig

cycle_partitions = DynamicPartitionsDefinition(name="cycles")
GROUP = "cycle"


def cycle_number(partition_key: str) -> int:
    """`cycle-0007` -> 7 (the partition names are the cycle folder names; any other spelling is refused)."""
    return lifecycle.parse_cycle_name(partition_key)


def _cycle(context: AssetExecutionContext, mc: MegaContextConfig) -> tuple[Config, int, Path | None]:
    cfg = mc.resolve()
    n = cycle_number(context.partition_key)
    return cfg, n, previous_accepted(cfg, n)


def _train(context: AssetExecutionContext, mc: MegaContextConfig, pipes: PipesSubprocessClient, phase: str,
           run_in_process) -> tuple[Path, Path | None]:
    """Run one training phase: in-process, or (mc.nproc > 1) as a `torchrun` DDP subprocess through Dagster Pipes."""
    cfg, n, previous = _cycle(context, mc)
    if mc.nproc <= 1:
        return run_in_process(cfg, n, previous), previous
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(mc.nproc),
               "-m", "orchestration.pipes_phase", "--phase", phase, "--cycle", str(n), *mc.cli_args()]
    if previous:
        command += ["--previous", str(previous)]
    pipes.run(context=context, command=command, env={"OMP_NUM_THREADS": "1"})
    folder = lifecycle.cycle_dir(cfg, n) / phase / "final"
    if not lifecycle.phase_done(folder.parent):
        raise RuntimeError(f"torchrun {phase} finished without publishing {folder}")
    return folder, previous


def _artifact_metadata(folder: Path, previous: Path | None) -> dict:
    manifest = read_manifest(folder)
    meta = {
        "path": MetadataValue.path(str(folder)),
        "manifest_digest": manifest_digest(manifest),
        "parent_cycle": previous.name if previous else "none (cycle 1 starts from scratch)",
    }
    if manifest.get("wandb_run_id"):
        meta["wandb_run_id"] = manifest["wandb_run_id"]
    if manifest.get("wandb_run_url"):
        meta["wandb_run"] = MetadataValue.url(manifest["wandb_run_url"])
    return meta


def _phase_metadata(folder: Path, previous: Path | None) -> dict:
    rows = json.loads((folder / "telemetry.json").read_text())
    last = rows[-1]
    meta = _artifact_metadata(folder, previous)
    meta.update({"steps": len(rows), "final_loss": last["loss"],
                 "seconds": sum(r["seconds"] for r in rows),
                 "tokens_per_s": sum(r.get("tokens", 0.0) for r in rows) / max(sum(r["seconds"] for r in rows), 1e-9)})
    for key in ("delta_nll", "swap_rate", "budget_utilisation", "residency_mean", "ms_per_block"):
        if key in last:
            meta[key] = sum(r[key] for r in rows) / len(rows)
    if (folder / "telemetry.png").is_file():
        meta["curves"] = MetadataValue.md(png_markdown(folder / "telemetry.png", "training curves"))
    return meta


@asset(group_name=GROUP, partitions_def=cycle_partitions, deps=[dataset_shards, megacontext_trees],
       description="JT1: GistNet trained for substitutability under the previous cycle's focus policy.")
def gistnet(context: AssetExecutionContext, mc: MegaContextConfig, pipes: PipesSubprocessClient) -> MaterializeResult:
    return MaterializeResult(metadata=_phase_metadata(*_train(context, mc, pipes, "jt1", lifecycle.run_jt1)))


@asset(group_name=GROUP, partitions_def=cycle_partitions, deps=[gistnet],
       description="JT2 labels: counterfactual ΔNLL@H of expand/collapse candidates on on-policy snapshots.")
def lens_labels(context: AssetExecutionContext, mc: MegaContextConfig) -> MaterializeResult:
    cfg, n, previous = _cycle(context, mc)
    out = lifecycle.run_jt2_labels(cfg, n, previous)
    stats = json.loads((out / "stats.json").read_text())
    meta = _artifact_metadata(out, previous)
    meta.update({k: v for k, v in stats.items() if isinstance(v, (int, float))})
    return MaterializeResult(metadata=meta)


@asset(group_name=GROUP, partitions_def=cycle_partitions, deps=[lens_labels],
       description="JT2: LensNet trained on this cycle's labels (regression + ranking + budget + legality).")
def lensnet(context: AssetExecutionContext, mc: MegaContextConfig, pipes: PipesSubprocessClient) -> MaterializeResult:
    return MaterializeResult(metadata=_phase_metadata(*_train(context, mc, pipes, "jt2", lifecycle.run_jt2)))


@asset(group_name=GROUP, partitions_def=cycle_partitions, deps=[lensnet],
       description="JT3: LoRA adapters on the frozen base, NLL@H through the working context.")
def lora_adapter(context: AssetExecutionContext, mc: MegaContextConfig, pipes: PipesSubprocessClient) -> MaterializeResult:
    return MaterializeResult(metadata=_phase_metadata(*_train(context, mc, pipes, "jt3", lifecycle.run_jt3)))


GATE_CHECK = "delta_nll_gate"


@asset(group_name=GROUP, partitions_def=cycle_partitions, deps=[lora_adapter, eval_references],
       check_specs=[AssetCheckSpec(GATE_CHECK, asset="validation_report", blocking=True,
                                   partitions_def=cycle_partitions,
                                   description="ΔNLL ≤ eval.delta_nll_max and NLL_mc below the stronger of NLL_recency and "
                                               "NLL_recency_adapted; "
                                               "blocking: a failure stops champion promotion")],
       description="The cycle's trees, summary and lineage, then NLL_full / NLL_recency / NLL_mc and the gate.")
def validation_report(context: AssetExecutionContext, mc: MegaContextConfig) -> MaterializeResult:
    cfg, n, previous = _cycle(context, mc)
    folder = lifecycle.finish_cycle(cfg, n, previous)
    out = evaluate(cfg, checkpoint=folder)
    summary = json.loads((out / "summary.json").read_text())
    meta = _artifact_metadata(out, previous)
    meta.update({
        "gate_passed": summary["gate"]["passed"],
        "gate": summary["gate"]["message"],
        **{k: summary["all"][k]["value"] for k in ("nll_full", "nll_recency", "nll_recency_adapted", "nll_mc",
                                                   "delta_nll", "gap_recovery", "mc_minus_best_recency")
           if summary["all"][k]["value"] is not None},
        **{k: v for k, v in passkey_accuracy(summary).items() if v is not None},
        "focus_never_edits": bool(summary.get("focus_health", {}).get("never_edits", False)),
        "report": MetadataValue.md((out / "report.md").read_text()),
        "plots": MetadataValue.md(png_markdown(out / "report.png", "NLL and per-level ΔNLL")),
        **({"passkey_plot": MetadataValue.md(png_markdown(out / "passkey.png", "passkey accuracy"))}
           if (out / "passkey.png").is_file() else {}),
        "lod_map": MetadataValue.md(png_markdown(out / "lod_map.png", "LOD map")),
        "cycle_seconds": json.loads((folder / "cycle.json").read_text())["seconds"]["total"],
    })
    gate = AssetCheckResult(check_name=GATE_CHECK, passed=bool(summary["gate"]["passed"]),
                            severity=AssetCheckSeverity.ERROR, description=summary["gate"]["message"],
                            metadata={"delta_nll_max": cfg.eval.delta_nll_max,
                                      **{c["name"]: c["value"] for c in summary["gate"]["checks"]}})
    return MaterializeResult(metadata=meta, check_results=[gate])


@asset(group_name=GROUP, partitions_def=cycle_partitions, deps=[validation_report],
       description="Promote the cycle to champion (only reached after the blocking gate check passed).")
def champion(context: AssetExecutionContext, mc: MegaContextConfig) -> MaterializeResult:
    cfg = mc.resolve()
    out = promote(cfg, lifecycle.cycle_dir(cfg, cycle_number(context.partition_key)))
    record = json.loads((out / "champion.json").read_text())
    return MaterializeResult(metadata={"path": MetadataValue.path(str(out)), "cycle": record["cycle"],
                                       "manifest_digest": manifest_digest(read_manifest(out))})
