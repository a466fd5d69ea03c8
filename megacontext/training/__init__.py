"""The training cycle: the one resumable, data-parallel training loop and the phases it runs: JT1 (GistNet), JT2 (counterfactual labels, LensNet), JT3 (LoRA), and the cycle that chains them with warm starts.

See README.md in this folder and docs/architecture.md.
"""
