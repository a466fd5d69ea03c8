"""The evaluation yardstick: attention mass, block selection, passkey trials, key tokens and the reference cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.model.attention_mass import attention_mass, block_sums
from megacontext.model.base_model import load_base_model
from megacontext.context.block_selection import expanded_blocks, select_blocks, tail_start
from megacontext.data.corpus import build_corpus
from megacontext.errors import ArtifactError
from megacontext.evaluation.gate import gate, key_token_masks, summarize
from megacontext.context.nodes import Node
from megacontext.evaluation.passkey import PLACEMENTS, answer_scores, make_trials
from megacontext.evaluation.references import (StaleReferences, _Tokens, build_references, load_references, passkey_dir, plan_windows,
                                    references_dir)
from megacontext.data.shards import TokenizedDocument, build_shards, read_split, shards_dir
from megacontext.model.tokenizer import ByteTokenizer
from megacontext.context.working_context import assemble, check_invariants
from tests.conftest import EVAL_ARGS, eval_corpus, tiny_config
from tests.test_gate import BOOT, make_table


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    cfg = eval_corpus(root)
    build_references(cfg)
    return root, cfg


# --- attention mass ---------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA and GQA (KV heads repeated)
def test_attention_mass_equals_a_dense_softmax_reference(tmp_path: Path, kv_heads: int) -> None:
    cfg = tiny_config(tmp_path, f"model.tiny.n_kv_heads={kv_heads}")
    model = load_base_model(cfg).model
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(0))
    groups = [torch.arange(250, 300), torch.arange(10, 20), torch.tensor([5, 299])]
    mass, logits = attention_mass(model, groups, logits_at=torch.tensor([3, 100, 299]), input_ids=ids)
    assert torch.allclose(logits[0], model(input_ids=ids).logits[0, [3, 100, 299]], atol=1e-5)
    assert model.config._attn_implementation != "megacontext_mass"  # restored afterwards
    model.set_attn_implementation("eager")
    weights = torch.stack(model(input_ids=ids, output_attentions=True).attentions)[:, 0]  # [layers, heads, T, T]
    reference = torch.stack([weights[:, :, g, :].sum(dim=(0, 1, 2)) for g in groups]).double()  # [G, T]
    assert torch.allclose(mass, reference, atol=1e-5)
    layers_heads = cfg.model.tiny.n_layers * cfg.model.tiny.n_heads
    assert torch.allclose(mass.sum(1), torch.tensor([50.0, 10.0, 2.0], dtype=torch.float64) * layers_heads)
    assert torch.equal(block_sums(mass, 0, 288, 32), mass[:, :288].reshape(3, 9, 32).sum(-1))


def test_attention_mass_follows_a_sliding_window_mask(tmp_path: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=48,
                                             max_position_embeddings=512)).eval()
    ids = torch.randint(0, 64, (1, 200), generator=torch.Generator().manual_seed(1))
    groups = [torch.arange(150, 200), torch.tensor([20, 199])]
    mass, _ = attention_mass(model, groups, input_ids=ids)
    model.set_attn_implementation("eager")
    weights = torch.stack(model(input_ids=ids, output_attentions=True).attentions)[:, 0]
    reference = torch.stack([weights[:, :, g, :].sum(dim=(0, 1, 2)) for g in groups]).double()
    assert torch.allclose(mass, reference, atol=1e-5)
    assert mass[0, :100].abs().max() < 1e-9  # rows 150.. see only the last 48 keys


def _sliding_window_model():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, sliding_window=48,
                                            max_position_embeddings=512)).eval()


@pytest.mark.parametrize("kind", ["llama", "sliding"])
def test_attention_mass_with_a_cached_prefill_equals_one_pass(tmp_path: Path, kind: str) -> None:
    model = load_base_model(tiny_config(tmp_path, "model.tiny.n_kv_heads=2")).model if kind == "llama" else (
        _sliding_window_model())
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(2))
    groups = [torch.arange(230, 300), torch.tensor([210, 299])]
    at = torch.tensor([205, 250, 299])
    one, logits_one = attention_mass(model, groups, logits_at=at, input_ids=ids)
    chunked, logits_chunked = attention_mass(model, groups, logits_at=at, prefill_chunk=64, input_ids=ids)
    assert torch.allclose(chunked, one, atol=1e-5) and torch.allclose(logits_chunked, logits_one, atol=1e-5)
    assert one[:, :200].abs().sum() > 1.0  # the prefilled part does receive mass (it is not merely zero)
    with pytest.raises(ValueError, match="prefill_chunk"):
        attention_mass(model, groups, prefill_chunk=64, input_ids=ids, attention_mask=torch.ones_like(ids))


def test_last_logits_with_a_chunked_prefill_equal_one_forward(tmp_path: Path) -> None:
    from megacontext.model.base_model import last_logits
    from megacontext.model.gaussian_rope import gaussian_positions, install_gaussian_rope

    model = load_base_model(tiny_config(tmp_path, "model.tiny.n_kv_heads=2")).model
    install_gaussian_rope(model)
    entries = [Node(0, 2), *[Node(s, 1) for s in range(1_024, 2_048, 32)], *[Node(t, 0) for t in range(2_048, 2_200)]]
    class Source(_Tokens):  # tokens, and a fixed random vector per gist
        def gists(self, level: int, start_index: int, end_index: int) -> np.ndarray:
            rng = np.random.default_rng(level)
            return rng.normal(0, 0.1, (end_index, 64)).astype(np.float32)[start_index:]

    inputs = assemble(entries, Source(np.arange(2_200, dtype=np.uint32) % 250), model.get_input_embeddings())
    with gaussian_positions(model, inputs.mu, inputs.sigma):
        one = model(inputs_embeds=inputs.inputs_embeds, logits_to_keep=9, use_cache=False).logits
    chunked = last_logits(model, 9, chunk=64, mu=inputs.mu, sigma=inputs.sigma, inputs_embeds=inputs.inputs_embeds)
    assert torch.allclose(chunked, one, atol=1e-4) and inputs.inputs_embeds.shape[1] > 2 * 64  # 3 prefill chunks
    sliding = _sliding_window_model()
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(3))
    one = sliding(input_ids=ids, logits_to_keep=5, use_cache=False).logits
    assert torch.allclose(last_logits(sliding, 5, chunk=64, input_ids=ids), one, atol=1e-5)
    assert torch.equal(last_logits(sliding, 5, chunk=None, input_ids=ids), one)


# --- block selection --------------------------------------------------------------------------


def test_block_selection_keeps_the_tail_and_the_best_blocks_known_answer() -> None:
    # n = 4,096, W_max 1,100, tail 1,024 -> tail from 3,072; 96 older blocks = 3 LOD2 spans
    scores = np.zeros(96)
    scores[[5, 40, 41, 90]] = [4.0, 3.0, 2.0, 1.0]
    entries = select_blocks(4_096, 1_100, 1_024, scores)
    # base cost 1,024 + 3 = 1,027; block 5 opens span 0 (+62), 40 opens span 1 (+62) -> 1,151 > 1,100: stop
    # at 5 alone: 1,089 left 11 < 31, so nothing else fits
    raw = sorted({n.start // 32 for n in entries if n.level == 0 and n.start < 3_072})
    assert raw == [5] and len(entries) == 1_089
    assert [n for n in entries if n.level == 2] == [Node(1_024, 2), Node(2_048, 2)]
    check_invariants(entries, 4_096, 1_100, 256, 2)
    dropped = select_blocks(4_096, 1_100, 1_024, scores, gists=False)  # (1,100 − 1,024) // 32 = 2 blocks, no gists
    assert sorted({n.start // 32 for n in dropped if n.start < 3_072}) == [5, 40] and len(dropped) == 1_088


@settings(max_examples=60, deadline=None)
@given(n=st.integers(600, 9_000), budget=st.integers(300, 2_500), tail_frac=st.floats(0.2, 0.6),
       seed=st.integers(0, 1_000), gists=st.booleans())
def test_block_selection_never_exceeds_the_budget_and_stays_a_legal_working_context(n, budget, tail_frac, seed, gists):
    tail = max(64, int(budget * tail_frac))
    scores = np.random.default_rng(seed).random(n // 32)
    start = tail_start(n, tail)
    spans = start // 1024
    cheapest = (n - start) + (spans + start // 32 - spans * 32 if gists else 0)  # tail + coarsest gists
    if cheapest > budget:
        with pytest.raises(ValueError, match="W_max"):
            select_blocks(n, budget, tail, scores, gists=gists)
        return
    entries = select_blocks(n, budget, tail, scores, gists=gists)
    assert len(entries) <= budget
    assert [n_.start for n_ in entries if n_.start >= tail_start(n, tail)] == list(range(tail_start(n, tail), n))
    if gists:
        check_invariants(entries, n, budget, min(64, tail), 2)
    else:
        assert all(e.level == 0 for e in entries) and len({e.start for e in entries}) == len(entries)


def test_windows_of_a_short_document_never_score_a_cursor_twice(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "eval.windows_per_doc=2", "eval.cursors_per_window=5", "eval.cursor_stride=256",
                      "eval.history=1984", "wc.w_max=512", "eval.focus_tail=256")
    doc = TokenizedDocument("0" * 16, "x", "val", np.zeros(1984 + 32 + 1024, np.uint32))  # room for one shift
    windows = plan_windows([doc], cfg)
    cursors = [c for w in windows for c in w.cursors]
    assert [w.start for w in windows] == [0, 1024] and len(cursors) == len(set(cursors))
    assert all(w.start < c and c + 32 <= len(doc.tokens) for w in windows for c in w.cursors)


def test_expanded_blocks_count_what_the_cold_start_gists() -> None:
    scores = np.zeros(8_128 // 32)
    scores[10] = 1.0
    entries = select_blocks(8_128, 2_048, 1_024, scores)
    distances = expanded_blocks(entries, 8_128, 2_048, 256, 2)
    assert 8_128 - 11 * 32 in distances  # block 10 ends 11 blocks in: that far back
    from megacontext.context.working_context import cold_start

    assert expanded_blocks(cold_start(8_128, 2_048, 256).entries, 8_128, 2_048, 256, 2) == []
    sunk = cold_start(8_128, 2_048, 256, sink=32).entries  # its raw [0, 32) is the sink, not an expansion
    assert expanded_blocks(sunk, 8_128, 2_048, 256, 2) == [8_128 - 32]  # against the plain cold start it is one
    assert expanded_blocks(sunk, 8_128, 2_048, 256, 2, sink=32) == []
    opened = sunk[:32] + [Node(t, 0) for t in range(32, 64)] + sunk[33:]  # block 1 read raw: 8,064 tokens back
    assert expanded_blocks(opened, 8_128, 2_048, 256, 2, sink=32) == [8_128 - 64]


# --- passkey ----------------------------------------------------------------------------------


def _docs() -> list[TokenizedDocument]:
    rng = np.random.default_rng(0)
    return [TokenizedDocument(f"{i:016x}", "x", "val", rng.integers(32, 127, 6_000).astype(np.uint32)) for i in range(3)]


def test_passkey_trials_are_deterministic_and_placed_as_they_say() -> None:
    tok, docs = ByteTokenizer(), _docs()
    kwargs = dict(lengths=[2_000, 4_000], trials=6, recency=1_024, align=32)
    trials = make_trials(docs, tok, seed=7, **kwargs)
    again = make_trials(docs, tok, seed=7, **kwargs)
    other = make_trials(docs, tok, seed=8, **kwargs)
    assert [(t.key, t.depth, t.prompt.tobytes()) for t in trials] == [(t.key, t.depth, t.prompt.tobytes()) for t in again]
    assert [t.key for t in trials] != [t.key for t in other]
    assert len(trials) == 2 * len(PLACEMENTS) * 6
    for t in trials:
        assert len(t.prompt) == t.length and t.key.isdigit() and len(t.key) == 5
        needle = tok.decode(t.prompt[t.depth : t.depth + t.needle_tokens].tolist())
        assert f"The pass key is {t.key}." in needle and tok.decode(t.answer.tolist()) == f" {t.key}"
        recency_starts = t.length - 1_024
        if t.placement == "outside":  # the whole key sentence before the recency window
            assert t.depth + t.needle_tokens <= recency_starts
        else:  # the whole key sentence inside it
            assert t.depth >= recency_starts


def test_answer_scores_are_the_teacher_forced_log_prob_and_greedy_match() -> None:
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    logp, exact = answer_scores(logits, np.array([0, 2]))
    assert logp == pytest.approx(np.log(0.7) + np.log(0.6)) and exact
    logp, exact = answer_scores(logits, np.array([0, 1]))
    assert logp == pytest.approx(np.log(0.7) + np.log(0.3)) and not exact


# --- key tokens and the gate ------------------------------------------------------------------


def test_key_token_masks_follow_their_definitions_on_a_hand_made_table() -> None:
    #                  t:   0     1     2     3     4
    full = np.array([[0.1, 1.0, 2.5, 0.5, 1.9]])
    recency = np.array([[0.3, 1.6, 5.0, 3.0, 4.0]])
    # margin 0.5: gains 0.2, 0.6, 2.5, 2.5, 2.1 -> t 1, 2, 3, 4
    # LongPPL: gain > 2 and log p_full > -2 (nll_full < 2) -> t 3 (gain 2.5, nll 0.5), t 4 (2.1, 1.9); not t 2 (nll 2.5)
    table = make_table(full, recency, full)
    masks = key_token_masks(margin=0.5, longppl_gain=2.0, longppl_floor=-2.0)
    assert table.select(masks["key"])["nll_recency"].to_list() == [False, True, True, True, True]
    assert table.select(masks["longppl"])["nll_recency"].to_list() == [False, False, False, True, True]
    s = summarize(table, **BOOT)
    assert (s["key"]["n_tokens"], s["longppl"]["n_tokens"]) == (4, 2)
    assert s["longppl"]["nll_full"]["value"] == pytest.approx((0.5 + 1.9) / 2)


def test_the_gate_compares_with_the_stronger_recency_baseline() -> None:
    full = np.full((4, 8), 1.0)
    recency, mc = full + 1.0, full + 0.05
    weak_lora = summarize(make_table(full, recency, mc, recency_adapted=recency + 0.5), **BOOT)
    assert weak_lora["best_recency"] == "recency" and gate(weak_lora, delta_nll_max=0.1).passed
    strong_lora = summarize(make_table(full, recency, mc, recency_adapted=full + 0.02), **BOOT)
    verdict = gate(strong_lora, delta_nll_max=0.1)
    assert strong_lora["best_recency"] == "recency_adapted" and not verdict.passed
    assert strong_lora["all"]["mc_minus_best_recency"]["value"] == pytest.approx(0.03)
    assert "NLL_recency_adapted" in verdict.message


# --- the reference cache ----------------------------------------------------------------------


def _count_long_forwards(base, threshold: int) -> list[int]:
    lengths: list[int] = []

    def hook(module, args, kwargs):  # positions a forward reaches: its inputs plus a K/V cache before them
        seq = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        cache = kwargs.get("cache")
        reach = (seq.shape[1] if seq is not None else 0) + (cache.get_seq_length() if cache is not None else 0)
        if reach > threshold:
            lengths.append(reach)

    base.model.register_forward_pre_hook(hook, with_kwargs=True)
    return lengths


def test_a_cached_reference_is_reused_with_no_full_context_forward(built, monkeypatch) -> None:
    from megacontext.evaluation import evaluate as evaluation

    root, cfg = built
    seen: list[list[int]] = []

    def counting_base(c):
        base = load_base_model(c)
        seen.append(_count_long_forwards(base, c.wc.w_max + c.eval.horizon))
        return base

    monkeypatch.setattr(evaluation, "load_base_model", counting_base)
    before = (references_dir(cfg) / "manifest.json").read_text()
    report = evaluation.evaluate(cfg, out=root / "eval-again")
    assert seen[-1] == []  # no forward longer than a working context: full and recency came from the cache
    assert (references_dir(cfg) / "manifest.json").read_text() == before
    inputs = {Path(i["path"]).name for i in json.loads((report / "manifest.json").read_text())["inputs"]}
    assert {references_dir(cfg).name, passkey_dir(cfg).name} <= inputs  # the report's lineage names the caches


def test_a_fresh_build_does_run_the_full_context(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, *EVAL_ARGS, "data.max_documents=3", "eval.passkey.enabled=false")
    build_corpus(cfg)
    build_shards(cfg)
    base = load_base_model(cfg)
    long = _count_long_forwards(base, cfg.wc.w_max + cfg.eval.horizon)
    build_references(cfg, base=base)
    windows = plan_windows(read_split(shards_dir(cfg), "val"), cfg)
    assert sum(len(w.cursors) for w in windows) > len(windows)  # several cursors per window ...
    full = cfg.eval.history + cfg.eval.horizon
    assert [n for n in long if n == full] == [full] * len(windows)  # ... and one full pass per window
    assert all(n < full for n in long if n != full)  # besides its cached prefill (the history before the rows)
    assert not passkey_dir(cfg).exists()


@pytest.mark.parametrize("override", ["eval.history=1920", "eval.horizon=16", "wc.w_max=320", "eval.cursor_stride=64",
                                      "eval.focus_tail=96", "seed=3", "eval.windows_per_doc=2"])
def test_other_settings_never_read_the_cached_numbers(built, override: str) -> None:
    root, cfg = built
    other = tiny_config(root, *EVAL_ARGS, override)
    assert references_dir(other) != references_dir(cfg)  # the settings name the cache
    with pytest.raises(ArtifactError, match=r"no evaluation references; build them with "
                                            r"`megacontext eval-references --profile tiny`"):
        load_references(other, load_base_model(other), build_missing=False)


def test_a_passkey_change_keeps_the_nll_cache(built) -> None:
    root, cfg = built
    other = tiny_config(root, *EVAL_ARGS, "eval.passkey.trials=3")
    assert references_dir(other) == references_dir(cfg) and passkey_dir(other) != passkey_dir(cfg)


def test_a_cache_of_another_base_model_is_refused_naming_what_changed(built) -> None:
    root, cfg = built
    other = tiny_config(root, *EVAL_ARGS, "model.tiny.d_model=32")
    assert references_dir(other) == references_dir(cfg)  # same settings, other input
    with pytest.raises(StaleReferences, match=r"stale evaluation references \(base_model 'tiny-llama-.*' -> "
                                             r"'tiny-llama-.*'\); rebuild them with `megacontext eval-references "
                                             r"--profile tiny`"):
        load_references(other, load_base_model(other))


def test_references_of_other_shards_or_a_corrupt_file_are_refused(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, *EVAL_ARGS, "data.max_documents=3", "eval.passkey.enabled=false")
    build_corpus(cfg)
    build_shards(cfg)
    base = load_base_model(cfg)
    build_references(cfg, base=base)
    tokens = references_dir(cfg) / "tokens.parquet"
    data = bytearray(tokens.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tokens.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"tokens.parquet: content differs.*eval-references --profile tiny --force"):
        load_references(cfg, base)
    build_references(cfg, base=base, force=True)
    assert load_references(cfg, base).tokens.height > 0
    rebuilt = tiny_config(tmp_path, *EVAL_ARGS, "data.max_documents=4", "eval.passkey.enabled=false")
    build_corpus(rebuilt, force=True)
    build_shards(rebuilt, force=True)
    with pytest.raises(StaleReferences, match=r"shards '"):
        load_references(rebuilt, base)


def test_the_cache_holds_the_schema_checked_tables(built) -> None:
    root, cfg = built
    refs = load_references(cfg, load_base_model(cfg), build_missing=False)
    samples = refs.samples()
    assert samples.height == 4 * cfg.eval.cursors_per_window
    assert refs.blocks.group_by("doc_id", "cursor").len()["len"].min() >= (cfg.eval.history - cfg.eval.cursor_stride) // 32
    assert refs.passkey.height == len(cfg.eval.passkey.lengths) * 2 * cfg.eval.passkey.trials
    assert (refs.tokens["nll_full"] >= 0).all() and pl.Series(refs.blocks["mass_horizon"]).sum() > 0


def test_passkey_references_are_the_base_models_own_answer_scores(built) -> None:
    from megacontext.evaluation.references import trial_from_row

    root, cfg = built
    base = load_base_model(cfg)
    refs = load_references(cfg, base, build_missing=False)
    for row in refs.passkey.head(3).iter_rows(named=True):
        trial = trial_from_row(row)
        n, a = trial.length, len(trial.answer)
        logits = base.model(input_ids=torch.as_tensor(trial.tokens.astype(np.int64))[None]).logits[0, n - 1 : n + a - 1]
        logp, exact = answer_scores(logits.detach().numpy(), trial.answer)
        assert row["logp_full"] == pytest.approx(logp, abs=1e-3) and row["exact_full"] == exact
        recent = torch.as_tensor(trial.tokens[n - cfg.wc.w_max :].astype(np.int64))[None]
        logp_r, _ = answer_scores(base.model(input_ids=recent).logits[0, -a - 1 : -1].detach().numpy(), trial.answer)
        assert row["logp_recency"] == pytest.approx(logp_r, abs=1e-3)
