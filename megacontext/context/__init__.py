"""The MegaContext tree and the working context: node arithmetic, the append-only tree of tokens and gists, the budgeted working context and its invariants, and the focusing machinery (LensNet policy, Focus Allocator, attention-mass block selection). Never imports training code.

See README.md in this folder and docs/architecture.md.
"""
