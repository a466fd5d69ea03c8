"""Dagster code location for the MegaContext lifecycle (DESIGN §5).

Imports go one way: orchestration -> megacontext, never back.
"""
