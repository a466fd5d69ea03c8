"""Corpus, shards and tables: the raw corpus, tokenized Parquet shards split by document, the pandera schemas of every table the lifecycle writes, and deterministic training-window sampling.

See README.md in this folder and docs/architecture.md.
"""
