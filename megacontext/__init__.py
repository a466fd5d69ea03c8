"""MegaContext: learned context compression and focus for frozen LLMs.

The library is orchestration-free: it imports neither Dagster nor DVC. The CLI
(`megacontext ...`), the Dagster code location and `dvc.yaml` all call the same
functions in these modules.
"""

__version__ = "0.1.0"
