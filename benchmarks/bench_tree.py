"""Tree benchmark: ingest throughput next to the base model's forward throughput, and bytes per token.

In one run on this machine: build MegaContext trees from real shard tokens with
the profile's GistNet (bulk appends and 32-token streaming appends), time a
no-grad base-model forward over `--context` tokens, and report on-disk bytes
per token for each gist dtype. Needs `megacontext prepare-data` first.

    .venv/bin/python benchmarks/bench_tree.py --profile default
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megacontext.model.base_model import load_base_model
from megacontext.config import load_config
from megacontext.model.gistnet import TreeGistEncoder, build_gistnet
from megacontext.data.shards import read_split, shards_dir
from megacontext.context.tree import MegaContextTree


def ingest(folder: Path, tokens: np.ndarray, encoder: TreeGistEncoder, base_id: str, chunk: int, dtype: str) -> dict:
    tree = MegaContextTree.create(folder, base_model_id=base_id, encoder=encoder, gist_dtype=dtype)
    start = time.perf_counter()
    for i in range(0, len(tokens), chunk):
        tree.append(tokens[i : i + chunk], encoder)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {"chunk": chunk, "dtype": dtype, "tokens": len(tokens), "seconds": seconds,
            "tokens_per_s": len(tokens) / seconds, "bytes_per_token": size / len(tokens)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--tokens", type=int, default=131_072)
    parser.add_argument("--stream-tokens", type=int, default=16_384, help="tokens for the 32-token streaming ingest")
    parser.add_argument("--context", type=int, default=2_048)
    parser.add_argument("--out", default="artifacts/benchmarks/tree.json")
    args = parser.parse_args()
    cfg = load_config(args.profile)
    torch.set_grad_enabled(False)
    base = load_base_model(cfg)
    embedding = base.model.get_input_embeddings()
    encoder = TreeGistEncoder(build_gistnet(cfg.gistnet, embedding, seed=cfg.seed, levels=cfg.wc.levels,
                                         model=base.model), embedding)
    tokens = np.concatenate([d.tokens for d in read_split(shards_dir(cfg), "train", base.tokenizer.name)])[: args.tokens]
    results: dict = {"profile": args.profile, "model_id": base.model_id, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        results["ingest"] = [
            ingest(Path(tmp) / "bulk16", tokens, encoder, base.model_id, 8_192, "float16"),
            ingest(Path(tmp) / "bulk32", tokens, encoder, base.model_id, 8_192, "float32"),
            ingest(Path(tmp) / "stream", tokens[: args.stream_tokens], encoder, base.model_id, 32, "float16"),
        ]
    ids = torch.as_tensor(tokens[: args.context].astype(np.int64))[None]
    base.model(input_ids=ids[:, :256], logits_to_keep=1)  # warm-up
    start = time.perf_counter()
    base.model(input_ids=ids, logits_to_keep=1, use_cache=False)
    forward_s = time.perf_counter() - start
    results["base_forward"] = {"context": args.context, "seconds": forward_s, "tokens_per_s": args.context / forward_s}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    fwd = results["base_forward"]["tokens_per_s"]
    print("| measure | tokens/s | vs base forward | bytes/token on disk |\n|---|---:|---:|---:|")
    for r in results["ingest"]:
        print(f"| tree ingest, {r['chunk']}-token appends, {r['dtype']} gists | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / fwd:.1f}x | {r['bytes_per_token']:.1f} |")
    print(f"| base forward, {args.context} tokens, no grad | {fwd:,.0f} | 1.0x | |")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
