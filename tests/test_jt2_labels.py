from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from megacontext.model.base_model import load_base_model
from megacontext.config import load_config
from megacontext.model.gaussian_rope import install_gaussian_rope
from megacontext.model.gistnet import build_gistnet
from megacontext.training.jt2_labels import candidates, label_snapshot, label_table, to_targets
from megacontext.training.jt2_lensnet import entry_targets
from megacontext.data.schemas import SchemaViolation
from megacontext.data.windows import Window
from megacontext.context.working_context import ABSOLUTE, PositionScheme, cold_start


@pytest.fixture(scope="module")
def snapshot():
    cfg = load_config("tiny", env={})
    base = load_base_model(cfg)
    install_gaussian_rope(base.model)
    gistnet = build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=0)
    tokens = np.random.default_rng(0).integers(0, 256, 1_024 + 32).astype(np.uint32)
    window = Window("0123456789abcdef", 0, tokens, 1_024)
    wc = cold_start(1_024, w_max=192, protected_tail=64)
    return base, gistnet, window, wc


def test_candidates_cover_every_legal_action(snapshot) -> None:
    _, _, _, wc = snapshot
    cands = candidates(wc, limit=10_000, rng=np.random.default_rng(0))
    expands = [c for c in cands if c.action == "expand"]
    collapses = [c for c in cands if c.action == "collapse"]
    assert len(expands) == wc.levels_used[1]
    assert all(c.node.parent().end <= wc.cursor - wc.protected_tail for c in collapses) and collapses
    assert len(candidates(wc, limit=5, rng=np.random.default_rng(0))) == 5


def test_no_candidate_collapses_the_attention_sink() -> None:
    plain = candidates(cold_start(1_024, w_max=192, protected_tail=64), limit=10_000, rng=np.random.default_rng(0))
    wc = cold_start(1_024, w_max=192, protected_tail=64, sink=32)
    sunk = candidates(wc, limit=10_000, rng=np.random.default_rng(0))
    assert any(c.action == "collapse" for c in sunk)
    assert not any(c.action == "collapse" and c.node.parent().start < 32 for c in sunk)
    assert {c.node for c in plain if c.action == "collapse"} - {c.node for c in sunk if c.action == "collapse"}


@pytest.mark.parametrize("positions", [ABSOLUTE, PositionScheme("compressed", (1, 2, 4))])
def test_prefix_reuse_gives_the_same_labels_as_naive_recompute(snapshot, positions) -> None:
    base, gistnet, window, wc = snapshot
    cands = candidates(wc, limit=12, rng=np.random.default_rng(1))
    reused = label_snapshot(base, gistnet, window, wc, cands, positions=positions)
    naive = label_snapshot(base, gistnet, window, wc, cands, naive=True, positions=positions)
    assert [r["action"] for r in reused] == [c.action for c in cands]
    assert np.allclose([r["delta_nll"] for r in reused], [r["delta_nll"] for r in naive], atol=2e-5)
    assert any(abs(r["delta_nll"]) > 1e-4 for r in reused)  # the edits do change the prediction


def test_targets_and_schema(snapshot) -> None:
    base, gistnet, window, wc = snapshot
    rows = to_targets(label_snapshot(base, gistnet, window, wc, candidates(wc, 12, np.random.default_rng(1))))
    assert all(r["target"] >= 0 for r in rows if r["action"] == "expand")
    assert all(r["target"] <= 0 for r in rows if r["action"] == "collapse")
    table = label_table([("s0", window, wc, rows)])
    assert table.height == len(rows) and table["cost"].abs().unique().to_list() == [31]
    bad = table.with_columns(pl.lit(2.0).alias("target"))
    from megacontext.data.schemas import LABEL_SCHEMA, validate

    with pytest.raises(SchemaViolation, match="jt2_labels"):
        validate(bad, LABEL_SCHEMA, where="bad labels")
    rows[0]["utility"] = float("inf")
    with pytest.raises(SchemaViolation, match="finite_numbers"):
        label_table([("s0", window, wc, rows)])


def _row(action: str, delta_nll: float, entry: int = 0) -> dict:
    return {"action": action, "delta_nll": delta_nll, "cost": 31 if action == "expand" else -31, "entry_index": entry}


def test_to_targets_known_answers() -> None:
    # expands gain 0.001, 0.002, 0.003 nats per position: the exchange rate (median) is 0.002
    rows = to_targets([_row("expand", -0.031), _row("expand", -0.062), _row("expand", -0.093),
                       _row("collapse", 0.031),    # costs 0.001 per freed position < 0.002: collapse, tanh(0.5)
                       _row("collapse", 0.093),    # costs 0.003 > 0.002: keep
                       _row("collapse", -0.031),   # lowers NLL by 0.001 per position: tanh(1.5)
                       _row("collapse", -0.062)])  # lowers NLL by 0.002 per position: tanh(2)
    assert [r["utility"] for r in rows] == pytest.approx([0.001, 0.002, 0.003, -0.001, -0.003, 0.001, 0.002])
    expected = [0.0, 0.0, np.tanh(0.5), -np.tanh(0.5), 0.0, -np.tanh(1.5), -np.tanh(2.0)]
    assert [r["target"] for r in rows] == pytest.approx(expected, abs=1e-12)


def test_entry_targets_collapse_first_then_positive_expands_override() -> None:
    # rows listed expand-first on purpose: the result must not depend on the table's order
    rows = pl.DataFrame([_row("expand", 0.0, 3) | {"target": 0.7}, _row("expand", 0.0, 5) | {"target": 0.0},
                         _row("expand", 0.0, 35) | {"target": 0.0}, _row("collapse", 0.0, 0) | {"target": -0.5}])
    target, labelled = entry_targets(rows, 40)
    want = torch.zeros(40)
    want[:32] = -0.5
    want[3] = 0.7  # a positive expand overrides the collapse group it sits in
    assert torch.equal(target, want)  # entry 5's zero expand leaves the collapse target; entry 35 is 0
    assert labelled.tolist() == [True] * 32 + [False] * 3 + [True] + [False] * 4


def test_on_a_sliding_window_base_labels_and_the_kv_cache_never_reuse_a_windowed_cache() -> None:
    """Gemma 3's local layers keep only their window: slicing or cropping that cache is not the prefix's K/V."""
    from transformers import MistralConfig, MistralForCausalLM

    from megacontext.config import GistNetConfig
    from megacontext.model.base_model import BaseLM, has_sliding_window_layers
    from megacontext.runtime.kv_cache import WCKVCache
    from tests.test_working_context import ArraySource

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=48,
                                             max_position_embeddings=4_096)).eval()
    install_gaussian_rope(model)
    base = BaseLM(model, None, "mistral-sliding")
    assert has_sliding_window_layers(model)
    gistnet = build_gistnet(GistNetConfig(width=32, layers=1, heads=2), model.get_input_embeddings(), seed=0)
    tokens = np.random.default_rng(0).integers(0, 256, 1_024 + 32).astype(np.uint32)
    window = Window("0123456789abcdef", 0, tokens, 1_024)
    wc = cold_start(1_024, w_max=192, protected_tail=64)
    cands = candidates(wc, limit=6, rng=np.random.default_rng(1))
    reused = label_snapshot(base, gistnet, window, wc, cands)
    naive = label_snapshot(base, gistnet, window, wc, cands, naive=True)
    assert np.allclose([r["delta_nll"] for r in reused], [r["delta_nll"] for r in naive], atol=2e-5)
    source = ArraySource(tokens, d=32)
    cache = WCKVCache(base)
    cache.next_logits(wc.entries, source)
    edited = list(wc.entries)
    gist = next(i for i, n in enumerate(edited) if n.level > 0)
    edited[gist : gist + 1] = edited[gist].children()  # an edit early in a WC longer than the window
    fresh = WCKVCache(base, recompute=True).next_logits(edited, source)
    assert torch.allclose(cache.next_logits(edited, source), fresh, atol=1e-5)
