"""Nightly regression: re-evaluate a champion on its fixed eval set and compare with its recorded numbers.

Two assets, one per lifecycle: `nightly_regression_report` for the default profile's champion
(resource `mc`) and `gate_8k_nightly_report` for the plan-of-record gate-8k champion (resource
`mc_gate_8k`: W_max 8,192 on 32k-token histories with Gemma-3-270M, under an artifact root of its own).
"""


import json

from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, AssetsDefinition,
                     MaterializeResult, MetadataValue, asset)

from megacontext.config import Config
from megacontext.lifecycle.lineage import manifest_digest, read_manifest
from megacontext.lifecycle.nightly import run_nightly
from megacontext.plots import png_markdown

CHECK = "within_noise_band"


def nightly_report(cfg: Config) -> MaterializeResult:
    """Run the nightly regression for `cfg`'s champion; its report as metadata, the verdict as a check."""
    result = run_nightly(cfg)
    record = json.loads((result.report / "nightly.json").read_text())
    meta = {"path": MetadataValue.path(str(result.report)), "manifest_digest": manifest_digest(read_manifest(result.report)),
            "passed": result.passed, "profile": cfg.profile,
            "report": MetadataValue.md((result.report / "report.md").read_text())}
    pngs = sorted(result.report.glob("*.png"))
    if pngs:
        meta["plot"] = MetadataValue.md(png_markdown(pngs[0], "recorded vs now"))
    check = AssetCheckResult(check_name=CHECK, passed=result.passed, severity=AssetCheckSeverity.ERROR,
                             metadata={"champion_cycle": str(record.get("cycle")),
                                       "noise_band": float(record.get("noise_band", 0.0))})
    return MaterializeResult(metadata=meta, check_results=[check])


def nightly_asset(name: str, resource_key: str, description: str) -> AssetsDefinition:
    """A nightly-regression asset that re-evaluates the champion of the config in resource `resource_key`."""

    @asset(name=name, group_name="nightly", required_resource_keys={resource_key}, description=description,
           check_specs=[AssetCheckSpec(CHECK, asset=name, description="the champion is no worse than its recorded "
                                                                      "numbers beyond eval.noise_band")])
    def _nightly(context: AssetExecutionContext) -> MaterializeResult:
        return nightly_report(getattr(context.resources, resource_key).resolve())

    return _nightly


nightly_regression_report = nightly_asset(
    "nightly_regression_report", "mc",
    "Re-evaluate the champion (latest accepted cycle); a dated report under artifacts/nightly/.")
gate_8k_nightly_report = nightly_asset(
    "gate_8k_nightly_report", "mc_gate_8k",
    "Re-evaluate the gate-8k champion (W_max 8,192 on 32k-token histories, Gemma-3-270M: the `gemma` extra); "
    "a dated report under <gate-8k artifact root>/nightly/.")
