"""The streaming runtime: ingest a long prompt into a tree, refocus with LensNet every block, decode through the working context with a K/V cache that survives edits, and picture what it looks at.

See README.md in this folder and docs/architecture.md.
"""
