"""Nightly regression: re-evaluate the champion on the fixed eval set and compare with its recorded numbers."""

from __future__ import annotations

import json

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MaterializeResult, MetadataValue, asset

from megacontext.lifecycle.lineage import manifest_digest, read_manifest
from megacontext.lifecycle.nightly import run_nightly
from megacontext.plots import png_markdown
from orchestration.resources import MegaContextConfig

CHECK = "within_noise_band"


@asset(group_name="nightly", check_specs=[AssetCheckSpec(CHECK, asset="nightly_regression_report",
                                                           description="the champion is no worse than its recorded "
                                                                       "numbers beyond eval.noise_band")],
       description="Re-evaluate the champion (latest accepted cycle); a dated report under artifacts/nightly/.")
def nightly_regression_report(mc: MegaContextConfig) -> MaterializeResult:
    result = run_nightly(mc.resolve())
    record = json.loads((result.report / "nightly.json").read_text())
    meta = {"path": MetadataValue.path(str(result.report)), "manifest_digest": manifest_digest(read_manifest(result.report)),
            "passed": result.passed, "report": MetadataValue.md((result.report / "report.md").read_text())}
    pngs = sorted(result.report.glob("*.png"))
    if pngs:
        meta["plot"] = MetadataValue.md(png_markdown(pngs[0], "recorded vs now"))
    check = AssetCheckResult(check_name=CHECK, passed=result.passed, severity=AssetCheckSeverity.ERROR,
                             metadata={"champion_cycle": str(record.get("cycle")),
                                       "noise_band": float(record.get("noise_band", 0.0))})
    return MaterializeResult(metadata=meta, check_results=[check])
