"""MegaAttention and MegaPrediction: extensions of the frozen base: attention masks/kernels where summaries stand in for the distant past, their installation into the base model without forking its modeling code, and gist prediction losses. Never imports training code.

See README.md in this folder and docs/architecture.md.
"""
