"""The learned and frozen models: the frozen base LM and its tokenizer, the small learned modules (GistNet, LensNet, LoRA adapters) with their checkpoints, Gaussian RoPE positions and the attention-mass probe. Never imports training, evaluation or runtime code.

See README.md in this folder and docs/architecture.md.
"""
