"""Dagster code location for the MegaContext lifecycle (docs/lifecycle.md §5).

Imports go one way: orchestration -> megacontext, never back.
"""
