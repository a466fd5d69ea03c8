"""Artifacts, lineage and the champion: crash-safe publication with lineage manifests, the audit that walks them, W&B tracking, champion promotion and the nightly regression.

See README.md in this folder and docs/architecture.md.
"""
