"""Evaluation and the validation gate: δNLL against the full context and truncation on cached references, key tokens, the passkey probe, bounds and baselines (attention oracle, training-free focus), the gate and the report.

See README.md in this folder and docs/architecture.md.
"""
