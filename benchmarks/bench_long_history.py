"""Long-history benchmark: MegaContext's working context vs truncation at histories past the base's window.

For each history length L (default 8,128, 16,320, 32,704 and 65,472 tokens) and each held-out
sample (a val document, or consecutive val documents joined where one is too short: the report
says how many), the H horizon tokens after L tokens of history are scored by:

- `recency`: the base model on the last W_max tokens (plain truncation);
- `mc_absolute`, `mc_compressed`: the cold-start working context (the longest raw tail plus gists
  of everything older, docs/architecture.md §2.4) read at absolute or compressed Gaussian-RoPE
  positions (§2.7); gists from the checkpoint's GistNet (`--checkpoint`) or an untrained one;
- `probe_raw`, `probe_gists`: the gist probe's focus (`focus_policy.gist_probe_scores`: the base reads
  every block older than the `eval.focus_tail` raw tail as its gist and the last `eval.tail_queries`
  tokens' attention scores them; no full-context pass), keeping the tail plus the best-scored blocks
  raw, the rest left out (`_raw`) or as gists (`_gists`, `select_blocks`), compressed positions (their
  largest position is the larger of the probe's and the working context's);
- `full`: the whole history, only where L + H fits the base's positions.

It also runs the passkey probe (key sentence outside the recency window) at each length with
the same rows. NLLs are nats/token over the horizon; differences vs recency, and compressed vs
absolute positions, are paired per sample with a bootstrap 95 % CI (samples resampled); the JSON
holds the per-sample NLLs. Positions past the base's trained range are
reported as the largest position each row reads.

    .venv/bin/python benchmarks/bench_long_history.py --profile default --docs 8 --passkey-trials 4 \
        [--checkpoint artifacts/cycles/cycle-0001] [--lengths 8128 16320 32704 65472] [--out FILE.json]

Needs `megacontext prepare-data --profile <profile>` first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from megacontext.config import load_config
from megacontext.context.block_selection import select_blocks
from megacontext.context.focus_policy import gist_probe_scores, probe_entries
from megacontext.context.nodes import span
from megacontext.context.working_context import PositionScheme, assemble_live, cold_start
from megacontext.data.shards import TokenizedDocument, read_split, shards_dir
from megacontext.evaluation.passkey import answer_scores, make_trials
from megacontext.evaluation.references import focus_tail
from megacontext.model.base_model import last_logits, load_base_model, token_nll
from megacontext.model.gaussian_rope import install_gaussian_rope
from megacontext.model.gistnet import build_gistnet, load_gistnet
from megacontext.progress import progress_bar

ROWS = ("recency", "mc_absolute", "mc_compressed", "probe_raw", "probe_gists", "full")
WC_ROWS = ROWS[1:-1]


def samples(docs: list[TokenizedDocument], length: int, n: int) -> tuple[list[TokenizedDocument], int]:
    """`n` token streams of >= `length` tokens: whole documents first, then consecutive documents joined.

    Returns the streams and how many of them are joins."""
    whole = [d for d in docs if len(d.tokens) >= length]
    out, joined = whole[:n], 0
    rest = [d for d in docs if len(d.tokens) < length]
    parts: list[TokenizedDocument] = []
    for doc in rest + whole[n:]:
        if len(out) >= n:
            break
        parts.append(doc)
        tokens = np.concatenate([p.tokens for p in parts])
        if len(tokens) >= length:
            out.append(TokenizedDocument("+".join(p.doc_id[:6] for p in parts), "joined", parts[0].split, tokens))
            joined, parts = joined + 1, []
    return out, joined


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator, draws: int = 2_000) -> list[float]:
    """95 % percentile CI of the mean of per-sample values [S] (samples resampled with replacement)."""
    idx = rng.integers(0, len(values), size=(draws, len(values)))
    return [float(v) for v in np.percentile(values[idx].mean(axis=1), [2.5, 97.5])]


def probe_scores(base, gistnet, tokens: torch.Tensor, history: int, cfg, scheme: PositionScheme) -> tuple[np.ndarray, float]:
    """The gist probe's block scores over `tokens[:history]` and the largest position the probe reads."""
    tail = focus_tail(cfg)
    scores = gist_probe_scores(base.model, tokens, base.model.get_input_embeddings(), gistnet, n=history, tail=tail,
                               queries=cfg.eval.tail_queries, positions=scheme)
    mu, _, _ = scheme.place(probe_entries(history, tail))
    return scores, float(mu.max())


def wc_logits(base, gistnet, tokens: torch.Tensor, history: int, answer_len: int, cfg, scheme: PositionScheme,
              focus: str = "cold_start", scores: np.ndarray | None = None):
    """Logits [a, V] predicting the `answer_len` tokens after a WC of `tokens[:history]`, and its largest position.

    `focus`: "cold_start", or "probe_raw" / "probe_gists" (the best `scores`-ranked blocks raw, the rest
    left out / as gists: `select_blocks`)."""
    wcc = cfg.wc
    if focus == "cold_start":
        entries = cold_start(history, wcc.w_max, wcc.protected_tail, wcc.levels, wcc.sink_tokens).entries
    else:
        entries = select_blocks(history, wcc.w_max, focus_tail(cfg), scores, levels=wcc.levels,
                                gists=focus == "probe_gists")
    with torch.no_grad():
        inputs = assemble_live(entries, tokens, base.model.get_input_embeddings(), gistnet, horizon=answer_len,
                               cursor=history, positions=scheme)
        logits = last_logits(base.model, answer_len + 1, mu=inputs.mu, sigma=inputs.sigma,
                             inputs_embeds=inputs.inputs_embeds)
    return logits[0, :-1].float(), float(inputs.mu.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8_128, 16_320, 32_704, 65_472])
    ap.add_argument("--docs", type=int, default=8, help="samples per length")
    ap.add_argument("--passkey-trials", type=int, default=4, help="trials per length (key outside the recency window)")
    ap.add_argument("--checkpoint", type=Path, help="a cycle folder: its GistNet (default: untrained, seeded)")
    ap.add_argument("--out", type=Path, default=Path("artifacts/benchmarks/long_history.json"))
    ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = ap.parse_args()
    cfg = load_config(args.profile, args.overrides)
    base = load_base_model(cfg)
    install_gaussian_rope(base.model)
    embedding = base.model.get_input_embeddings()
    gistnet = (load_gistnet(args.checkpoint / "jt1" / "final") if args.checkpoint else
               build_gistnet(cfg.gistnet, embedding, seed=cfg.seed, levels=cfg.wc.levels)).attach(base.model).eval()
    docs = read_split(shards_dir(cfg), "val", tokenizer_name=base.tokenizer.name)
    h, w = cfg.eval.horizon, cfg.wc.w_max
    absolute = PositionScheme("absolute", tuple(cfg.wc.slot_widths))
    compressed = PositionScheme("compressed", tuple(cfg.wc.slot_widths))
    wc_rows = (("mc_absolute", absolute, "cold_start"), ("mc_compressed", compressed, "cold_start"),
               ("probe_raw", compressed, "probe_raw"), ("probe_gists", compressed, "probe_gists"))
    rng = np.random.default_rng(cfg.seed)
    report = {"profile": args.profile, "base": base.model_id, "base_positions": base.max_positions, "W_max": w, "H": h,
              "gistnet": str(args.checkpoint) if args.checkpoint else "untrained (seeded)",
              "slot_widths": list(cfg.wc.slot_widths), "lengths": {}}
    for length in args.lengths:
        streams, joined = samples(docs, length + h, args.docs)
        fits = length + h <= base.max_positions
        nll = {row: [] for row in ROWS}
        reach = {row: 0.0 for row in WC_ROWS}
        tick = time.perf_counter()
        with progress_bar(f"L={length:,}: samples", total=len(streams), unit="samples") as advance:
            for doc in streams:
                tokens = torch.as_tensor(doc.tokens[: length + h].astype(np.int64))
                target = tokens[length:]
                nll["recency"].append(token_nll(last_logits(base.model, h + 1, input_ids=tokens[None, length - w :])[0, :-1],
                                                target).mean().item())
                scores, probe_top = probe_scores(base, gistnet, tokens, length, cfg, compressed)  # once for both rows
                for row, scheme, focus in wc_rows:
                    logits, top = wc_logits(base, gistnet, tokens, length, h, cfg, scheme, focus, scores)
                    nll[row].append(token_nll(logits, target).mean().item())
                    reach[row] = max(reach[row], top, probe_top if focus != "cold_start" else 0.0)
                if fits:
                    nll["full"].append(token_nll(last_logits(base.model, h + 1, input_ids=tokens[None])[0, :-1],
                                                 target).mean().item())
                advance(1)
        entry = {"samples": len(streams), "joined_documents": joined, "seconds": round(time.perf_counter() - tick, 1),
                 "largest_position": {k: round(v, 1) for k, v in reach.items()}, "nll": {}, "minus_recency": {}}
        for row in ROWS:
            if nll[row]:
                values = np.asarray(nll[row])
                entry["nll"][row] = {"mean": float(values.mean()), "ci95": bootstrap_ci(values, rng)}
                if row != "recency":
                    diff = values - np.asarray(nll["recency"])
                    entry["minus_recency"][row] = {"mean": float(diff.mean()), "ci95": bootstrap_ci(diff, rng)}
        pair = np.asarray(nll["mc_compressed"]) - np.asarray(nll["mc_absolute"])  # the position schemes, paired
        entry["compressed_minus_absolute"] = {"mean": float(pair.mean()), "ci95": bootstrap_ci(pair, rng)}
        entry["per_sample_nll"] = {row: [round(v, 5) for v in values] for row, values in nll.items() if values}
        if fits and nll["full"]:
            gap = np.asarray(nll["recency"]) - np.asarray(nll["full"])
            entry["gap_recency_minus_full"] = {"mean": float(gap.mean()), "ci95": bootstrap_ci(gap, rng)}
        if args.passkey_trials:
            trials = [t for t in make_trials(streams, base.tokenizer, lengths=[length], trials=args.passkey_trials,
                                             recency=w, seed=cfg.seed, align=span(cfg.wc.levels))
                      if t.placement == "outside"]
            exact = {row: [] for row in ROWS}
            with progress_bar(f"L={length:,}: passkey", total=len(trials), unit="trials") as advance:
                for trial in trials:
                    tokens = torch.as_tensor(trial.tokens.astype(np.int64))
                    n, a = trial.length, len(trial.answer)
                    logits = last_logits(base.model, a + 1, input_ids=tokens[None, n - w :])[0, :-1]
                    exact["recency"].append(answer_scores(logits.numpy(), trial.answer)[1])
                    scores, _ = probe_scores(base, gistnet, tokens, n, cfg, compressed)
                    for row, scheme, focus in wc_rows:
                        logits, _ = wc_logits(base, gistnet, tokens, n, a, cfg, scheme, focus, scores)
                        exact[row].append(answer_scores(logits.numpy(), trial.answer)[1])
                    if n + a <= base.max_positions:
                        logits = last_logits(base.model, a + 1, input_ids=tokens[None])[0, :-1]
                        exact["full"].append(answer_scores(logits.numpy(), trial.answer)[1])
                    advance(1)
            entry["passkey_outside"] = {row: {"exact": int(sum(v)), "trials": len(v)} for row, v in exact.items() if v}
        report["lengths"][str(length)] = entry
        print(json.dumps({str(length): entry}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
