"""Which scorer finds the blocks the horizon needs? Block rankings side by side against the attention oracle.

On the evaluation's cached samples (`megacontext eval-references`: the full-context pass's attention
mass per 32-token block from the horizon's queries, the attention oracle, and from the history's last
`eval.tail_queries` tokens, the training-free focus), every scorer ranks the blocks older than the
raw tail (`eval.focus_tail`, default W_max/2) and a working context keeps the tail plus the scorer's
best K blocks raw, no gists (K fills the budget: the evaluation's `*_raw` rows). Per scorer it reports
recall@K of the oracle's K blocks (mean over samples; also without block 0, the attention sink, which
every attention scorer ranks high) and that working context's NLL@H, its
difference from recency and from the training-free focus, its gap recovery and its share of the
oracle's, with paired cluster-bootstrap CIs over samples (`compare_reports.compare`). Everything is
read by the plain base (no adapters), like the cached oracle; the oracle's raw selection is read
again here and must equal the cache's reading (`oracle_vs_cache_max_abs_nll`, a warning otherwise).

Scorers: `oracle` and `training_free` (cached; they need the full-context pass), `recent` (the newest
blocks: the recency window itself, recall only), `oldest` (the oldest blocks first: what a scorer that
learned "the blocks after the sink matter" from short windows picks at this length), `random`
(seeded), `probe:<gists>` (the gist probe, `focus_policy.gist_probe_scores`: the base reads the tail
plus every older block as its LOD1 gist and a block scores the attention the last `--queries` tail
tokens put on its gist; no full-context pass),
`lensnet` (the `--checkpoint` cycle's LensNet scoring the same probe working context's LOD1 gists,
read through that cycle's GistNet). `<gists>` as in bench_gist_harm.py: `mean` (an untrained
GistNet), `cycle:<folder>` (that cycle's), `zero`, `token:<text>`.

    .venv/bin/python benchmarks/bench_selection.py --profile default --probe mean --probe cycle:CYCLE \\
        --checkpoint CYCLE --out artifacts/benchmarks/selection.json \\
        eval.windows_per_doc=1 eval.cursors_per_window=3 eval.passkey.enabled=false
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from bench_gist_harm import gist_variant
from compare_reports import compare, print_comparison
from megacontext.config import load_config
from megacontext.context.block_selection import recall_at_k, select_blocks, tail_start
from megacontext.context.focus_policy import gist_probe_scores, lens_inputs_for, probe_entries
from megacontext.context.nodes import BLOCK
from megacontext.context.working_context import PositionScheme, WorkingContext, assemble_live
from megacontext.data.shards import read_split, shards_dir
from megacontext.errors import ArtifactError
from megacontext.evaluation.gate import cluster_mean_ci
from megacontext.evaluation.references import focus_tail, load_references
from megacontext.model.base_model import horizon_token_nll, load_base_model
from megacontext.model.gaussian_rope import gaussian_positions, install_gaussian_rope
from megacontext.model.lensnet import load_lensnet
from megacontext.progress import progress_bar


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--probe", action="append", default=[], metavar="GISTS",
                        help="a gist-probe scorer reading these gists: mean | cycle:<folder> | zero | token:<text> (repeat)")
    parser.add_argument("--checkpoint", type=Path, help="a cycle folder: adds its LensNet as the `lensnet` scorer")
    parser.add_argument("--queries", type=int, help="tail tokens whose attention the probe reads (default eval.tail_queries)")
    parser.add_argument("--samples", type=int, help="only the first this-many cached samples (>= 1)")
    parser.add_argument("--out", default="artifacts/benchmarks/selection.json")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.samples is not None and args.samples < 1:
        parser.error("--samples must be at least 1")
    cfg = load_config(args.profile, args.overrides)
    ev, wcc = cfg.eval, cfg.wc
    queries = args.queries or ev.tail_queries
    torch.set_grad_enabled(False)
    base = load_base_model(cfg)
    try:
        refs = load_references(cfg, base, build_missing=False)
    except ArtifactError as err:
        print(f"error: {err} (with the same overrides)", file=sys.stderr)
        return 2
    install_gaussian_rope(base.model)
    embedding = base.model.get_input_embeddings()
    label = lambda spec: f"cycle:{Path(spec[6:]).name}" if spec.startswith("cycle:") else spec  # noqa: E731
    probes = {f"probe:{label(spec)}": gist_variant(spec, base, cfg) for spec in args.probe}
    lens = None
    if args.checkpoint:
        lens = (load_lensnet(args.checkpoint / "jt2" / "final"), gist_variant(f"cycle:{args.checkpoint}", base, cfg))
    positions = PositionScheme.of(wcc)
    tail, h, w = focus_tail(cfg), ev.horizon, wcc.w_max
    docs = {d.doc_id: d for d in read_split(shards_dir(cfg), ev.split, tokenizer_name=base.tokenizer.name)}
    samples = list(refs.samples().iter_rows(named=True))[: args.samples]

    def nll(entries, tokens: torch.Tensor, n: int) -> np.ndarray:  # raw entries only: no gists to compute
        inputs = assemble_live(entries, tokens, embedding, None, horizon=h, cursor=n, positions=positions)
        with gaussian_positions(base.model, inputs.mu, inputs.sigma):
            return horizon_token_nll(base.model, h, inputs_embeds=inputs.inputs_embeds,
                                     targets=tokens[None, n:]).numpy()[0]

    frames, recalls, seconds, drift = [], {}, {}, 0.0
    with progress_bar("samples", total=len(samples), unit="samples") as advance:
        for i, row in enumerate(samples):
            doc, start, cursor = docs[row["doc_id"]], row["window_start"], row["cursor"]
            n = cursor - start
            tokens = torch.as_tensor(doc.tokens[start : cursor + h].astype(np.int64))
            n_blocks = tail_start(n, tail) // BLOCK
            k = (w - (n - n_blocks * BLOCK)) // BLOCK  # the blocks a raw selection has room for
            oracle = refs.block_scores(doc.doc_id, cursor, "mass_horizon")[:n_blocks]
            scores = {"training_free": refs.block_scores(doc.doc_id, cursor, "mass_tail")[:n_blocks],
                      "recent": np.arange(n_blocks, dtype=np.float64),
                      "oldest": -np.arange(n_blocks, dtype=np.float64),
                      "random": np.random.default_rng([cfg.seed, i]).random(n_blocks)}
            for name, gistnet in probes.items():
                tick = time.perf_counter()
                scores[name] = gist_probe_scores(base.model, tokens, embedding, gistnet, n=n, tail=tail,
                                                 queries=queries, positions=positions)
                seconds.setdefault(name, []).append(time.perf_counter() - tick)
            if lens is not None:
                lensnet, gistnet = lens
                tick = time.perf_counter()
                entries = probe_entries(n, tail)
                wc = WorkingContext(entries, n, max(w, len(entries)), wcc.protected_tail, wcc.levels)
                inputs = lens_inputs_for(wc, tokens, embedding, gistnet, lensnet.cfg.tail_lod1, model=base.model,
                                         queries=lensnet.cfg.wc_attention_queries, positions=positions)
                scores["lensnet"] = lensnet(inputs)[0, :n_blocks].float().numpy()
                seconds.setdefault("lensnet", []).append(time.perf_counter() - tick)
            for name, s in scores.items():
                recalls.setdefault(name, []).append(recall_at_k(s, oracle, k))
                # without block 0, the attention sink every attention scorer ranks high
                recalls.setdefault(f"{name} (no sink)", []).append(recall_at_k(s[1:], oracle[1:], k))
            cached = refs.tokens.filter((pl.col("doc_id") == doc.doc_id) & (pl.col("cursor") == cursor)).sort("t")
            columns = {"full": cached["nll_full"].to_numpy(), "recency": cached["nll_recency"].to_numpy(),
                       "oracle": cached["nll_oracle_raw"].to_numpy()}
            live = nll(select_blocks(n, w, tail, oracle, levels=wcc.levels, gists=False), tokens, n)
            drift = max(drift, float(np.abs(live - columns["oracle"]).max()))  # known answer: the cache's reading
            for name, s in scores.items():
                if name != "recent":  # the recent blocks are the recency window (n a multiple of 32), cached
                    columns[name] = nll(select_blocks(n, w, tail, s, levels=wcc.levels, gists=False), tokens, n)
            frames.append(pl.DataFrame({"doc_id": [doc.doc_id] * h, "cursor": [cursor] * h, "t": list(range(h)),
                                        **{c: v.astype(np.float64) for c, v in columns.items()}}))
            advance(1)
    table = pl.concat(frames)
    names = [c for c in table.columns if c not in ("doc_id", "cursor", "t", "full", "recency")]
    result = compare(table, names, baseline="training_free", bound="oracle", key_margin=ev.key_token_margin)
    ci = dict(bootstrap_samples=ev.bootstrap_samples, confidence=ev.confidence, seed=cfg.seed)
    recall = {name: cluster_mean_ci(np.asarray(v), np.ones(len(v)), **ci) for name, v in recalls.items()}
    print(f"recall@K of the attention oracle's K blocks (K = {k} at the last sample), {len(samples)} samples:")
    for name, r in recall.items():
        lo, hi = r["ci"] or (float("nan"), float("nan"))
        cost = f"  ({1000 * np.mean(seconds[name]):.0f} ms/sample)" if name in seconds else ""
        print(f"  {name:>16}: {r['value']:.3f} [{lo:.3f}, {hi:.3f}]{cost}")
    print_comparison(result)
    if drift > 1e-3:
        print(f"warning: the oracle's raw selection read here differs from the cache's by up to {drift:.4f} nats/token: "
              "the samples or the read path are misaligned", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "profile": cfg.profile, "base": base.model_id, "references": refs.folder.name, "samples": len(samples),
        "history": ev.history, "horizon": h, "w_max": w, "focus_tail": tail, "queries": queries,
        "positions": wcc.positions, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "oracle_vs_cache_max_abs_nll": drift, "recall_at_k": recall, "seconds_per_sample": {k: float(np.mean(v)) for k, v in seconds.items()},
        "per_sample_recall": recalls, **result}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
