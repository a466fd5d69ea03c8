from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.context.nodes import Node, span
from megacontext.context.working_context import (
    ABSOLUTE,
    BudgetExceeded,
    PositionScheme,
    InvariantViolation,
    assemble,
    check_invariants,
    cold_start,
    single_level_start,
    sink_cost,
)


class ArraySource:
    """An in-memory NodeSource: gist of a node = a vector that encodes (level, index)."""

    def __init__(self, tokens: np.ndarray, d: int = 8):
        self._tokens, self.d = tokens, d

    def tokens(self, start: int, end: int) -> np.ndarray:
        return self._tokens[start:end]

    def gists(self, level: int, start_index: int, end_index: int) -> np.ndarray:
        out = np.zeros((end_index - start_index, self.d), np.float32)
        out[:, 0] = level
        out[:, 1] = np.arange(start_index, end_index)
        return out


def test_cold_start_keeps_the_most_recent_detail_and_summarises_the_rest() -> None:
    wc = cold_start(8_128, w_max=2_048, protected_tail=256)
    # [0, 6,144) = 6 LOD2 + a 1,984-token raw tail = 1,990; a raw tail from 6,112 would cost
    # 5 LOD2 + 31 LOD1 + 2,016 = 2,052 > 2,048. The 58 left refine the newest LOD2 into 32 LOD1 (+31).
    assert wc.levels_used == {2: 5, 1: 32, 0: 1_984} and len(wc) == 2_021
    assert wc.entries[4] == Node(4_096, 2) and wc.entries[5] == Node(5_120, 1) and wc.entries[37] == Node(6_144, 0)


def test_history_within_budget_is_all_tokens() -> None:
    wc = cold_start(2_000, w_max=2_048, protected_tail=256)
    assert wc.entries == [Node(t, 0) for t in range(2_000)]


def test_at_long_histories_the_cold_start_keeps_the_longest_raw_tail_the_budget_allows() -> None:
    far = cold_start(100_000, w_max=2_048, protected_tail=256)
    # 95 LOD2 + 25 LOD1 tile [0, 98,080); a tail from 98,048 would cost 95 + 24 + 1,952 = 2,071 > 2,048
    assert far.levels_used == {2: 95, 1: 25, 0: 1_920} and far.entries[120] == Node(98_080, 0)
    assert cold_start(200_000, w_max=2_048, protected_tail=256).levels_used[0] == 1_824  # not the 256 minimum
    with pytest.raises(BudgetExceeded, match="cannot fit W_max 300"):
        cold_start(2_000_000, w_max=300, protected_tail=256)


def test_the_attention_sink_stays_raw_and_the_tail_pays_for_it() -> None:
    plain = cold_start(4_096, w_max=1_024, protected_tail=256)
    # no sink: 3 LOD2 + 1 LOD1 tile [0, 3,104), a 992-token tail: 996 (from 3,072: 3 + 1,024 > 1,024)
    assert plain.levels_used == {2: 3, 1: 1, 0: 992}
    wc = cold_start(4_096, w_max=1_024, protected_tail=256, sink=32)
    # the sink [0, 32) raw, 31 LOD1 to 1,024, 2 LOD2, 3 LOD1 to 3,168, a 928-token tail: 996 (from 3,136: 1,027)
    assert wc.entries[:32] == [Node(t, 0) for t in range(32)]
    assert wc.entries[32:63] == [Node(s, 1) for s in range(32, 1_024, 32)]
    assert wc.entries[63:65] == [Node(1_024, 2), Node(2_048, 2)]
    assert wc.entries[65:68] == [Node(3_072, 1), Node(3_104, 1), Node(3_136, 1)]
    assert wc.entries[68:] == [Node(t, 0) for t in range(3_168, 4_096)] and wc.sink == 32
    default = cold_start(8_128, w_max=2_048, protected_tail=256, sink=32)  # the default profile's evaluation WC
    assert default.levels_used == {0: 32 + 1_952, 1: 31 + 1, 2: 5} and default.entries[69] == Node(6_176, 0)
    with pytest.raises(ValueError, match="whole number of 32-token blocks"):
        cold_start(4_096, w_max=1_024, protected_tail=256, sink=40)
    with pytest.raises(ValueError, match="attention sink"):
        wc.collapse(0)  # the sink's 32 tokens never collapse
    with pytest.raises(InvariantViolation, match="attention sink"):
        check_invariants(plain.entries, 4_096, 1_024, 256, 2, sink=32)
    assert wc.may_collapse_into(Node(3_072, 2)) is False  # it would end at 4,096, inside the tail (from 3,840)
    assert wc.may_collapse_into(Node(0, 1)) is False and wc.may_collapse_into(Node(0, 2)) is False  # the sink's
    assert wc.may_collapse_into(Node(1_024, 2)) and wc.may_collapse_into(Node(3_168, 1))


def _coarsest_count(start: int, levels: int, sink: int) -> int:
    """Entries that tile [0, start) most coarsely with [0, sink) raw: counted span by span."""
    sink = min(sink, start)
    count, lo = sink, sink
    while lo < start:
        level = max(k for k in range(1, levels + 1) if lo % span(k) == 0 and lo + span(k) <= start)
        count, lo = count + 1, lo + span(level)
    return count


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 300_000), w_max=st.integers(300, 9_000), tail=st.integers(0, 256), levels=st.integers(2, 3),
       sink=st.sampled_from([0, 0, 32, 96]))
def test_no_longer_raw_tail_would_fit_and_the_newest_gists_are_the_finest(n, w_max, tail, levels, sink) -> None:
    try:
        wc = cold_start(n, w_max=w_max, protected_tail=tail, levels=levels, sink=sink)
    except BudgetExceeded:
        return
    wc.check()  # with the sink: its tokens are raw
    raw = sum(e.level == 0 and e.start >= sink for e in wc.entries)  # the raw tail
    if n > w_max and n - raw - 32 >= sink:  # one more raw block, everything older as coarse as it gets, is over budget
        start = n - raw - 32
        assert _coarsest_count(start, levels, sink) + raw + 32 > w_max
        gist_levels = [e.level for e in wc.entries if e.level > 0 and e.start >= span(levels) * (sink > 0)]
        assert gist_levels == sorted(gist_levels, reverse=True)  # coarser older, finer newer (past the sink's span)
        assert w_max - len(wc) < 31 or all(e.level < 2 for e in wc.entries)  # what is left was spent refining


def test_single_level_starts_for_per_level_evaluation() -> None:
    assert single_level_start(8_128, 2_048, 256, level=2).levels_used == {2: 6, 0: 1_984}
    assert single_level_start(8_128, 2_048, 256, level=1).levels_used == {1: 197, 0: 1_824}
    # with a 32-token sink: LOD1 from token 32 on, (8,128 - a) raw <= 2,016 - (a - 32)/32 first holds at a = 6,336
    lod1 = single_level_start(8_128, 2_048, 256, level=1, sink=32)
    assert lod1.entries[:33] == [Node(t, 0) for t in range(32)] + [Node(32, 1)] and lod1.sink == 32
    assert lod1.levels_used == {0: 32 + 1_792, 1: 197} and lod1.entries[229] == Node(6_336, 0)
    # LOD2 from 1,024 on (the sink's span is 32 raw + 31 LOD1): five LOD2 and a 1,984-token tail need 4 positions
    # too many, so the tail starts a span later
    lod2 = single_level_start(8_128, 2_048, 256, level=2, sink=32)
    assert lod2.entries[:64] == [Node(t, 0) for t in range(32)] + [Node(s, 1) for s in range(32, 1_024, 32)] + [
        Node(1_024, 2)]
    assert lod2.levels_used == {0: 32 + 960, 1: 31, 2: 6} and lod2.entries[69] == Node(7_168, 0)
    for start in (lod1, lod2):
        start.check()
        assert not start.may_collapse_into(Node(0, 1))  # the sink stays raw
    assert single_level_start(2_000, 2_048, 256, level=2, sink=32).levels_used == {0: 2_000}  # it all fits raw
    for n, w_max, tail in ((1_024, 192, 64), (700, 256, 64), (2_100, 2_048, 128)):  # the sink's LOD1 alone fits
        with pytest.raises(BudgetExceeded):  # no LOD2 row, as without a sink where it cannot fit (or has LOD2)
            single_level_start(n, w_max, tail, level=2, sink=32)
    with pytest.raises(ValueError, match="whole number"):
        single_level_start(8_128, 2_048, 256, level=1, sink=16)


def test_expand_and_collapse_edit_in_place_with_budget_accounting() -> None:
    wc = cold_start(8_128, w_max=2_048, protected_tail=256)  # 5 LOD2, 32 LOD1 (children of Node(5,120, 2)), tokens
    with pytest.raises(BudgetExceeded):
        wc.expand(0)  # 2,021 + 31 > 2,048
    wc.collapse(5)  # LOD1 gists 5..36 -> their LOD2 parent
    assert wc.entries[5] == Node(5_120, 2) and len(wc) == 2_021 - 31
    wc.expand(5)
    assert wc.entries[5:37] == Node(5_120, 2).children() and len(wc) == 2_021
    wc.check()
    with pytest.raises(ValueError, match="only gists expand"):
        wc.expand(len(wc) - 1)
    with pytest.raises(ValueError, match="not 32 aligned siblings"):
        wc.collapse(6)
    with pytest.raises(ValueError, match="protected tail"):
        wc.collapse(len(wc) - 32)


def test_invariant_checks_catch_each_violation() -> None:
    good = [Node(0, 1)] + [Node(t, 0) for t in range(32, 64)]
    check_invariants(good, 64, w_max=64, protected_tail=16, levels=2)
    with pytest.raises(InvariantViolation, match="budget"):
        check_invariants(good, 64, w_max=10, protected_tail=16, levels=2)
    with pytest.raises(InvariantViolation, match="coverage"):
        check_invariants(good[:1] + good[2:], 64, w_max=64, protected_tail=16, levels=2)
    with pytest.raises(InvariantViolation, match="coverage: entries end"):
        check_invariants(good, 65, w_max=64, protected_tail=16, levels=2)
    with pytest.raises(InvariantViolation, match="protected tail"):
        check_invariants([Node(t, 0) for t in range(32)] + [Node(32, 1)], 64, w_max=64,
                         protected_tail=16, levels=2)
    with pytest.raises(InvariantViolation, match="attention sink"):
        check_invariants(good, 64, w_max=64, protected_tail=16, levels=2, sink=32)


def _random_edit(wc, do_expand: bool, where: float) -> None:
    """Expand the gist, or collapse the legal sibling group, at fraction `where` of the candidates (if any)."""
    if do_expand:
        gists = [i for i, e in enumerate(wc.entries) if e.level > 0]
        if gists:
            try:
                wc.expand(gists[int(where * len(gists)) % len(gists)])
            except BudgetExceeded:
                pass
    else:
        starts = [i for i, e in enumerate(wc.entries) if e.level < 2 and e.start == e.parent().start
                  and wc.entries[i : i + 32] == e.siblings() and e.parent().end <= wc.cursor - wc.protected_tail
                  and e.parent().start >= wc.sink]
        if starts:
            wc.collapse(starts[int(where * len(starts)) % len(starts)])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40_000),
    w_max=st.integers(300, 3_000),
    tail=st.integers(0, 256),
    ops=st.lists(st.tuples(st.booleans(), st.floats(0, 1)), max_size=25),
    sink=st.sampled_from([0, 32]),
)
def test_every_reachable_working_context_satisfies_the_invariants(n, w_max, tail, ops, sink) -> None:
    try:
        wc = cold_start(n, w_max=w_max, protected_tail=tail, sink=sink)
    except BudgetExceeded:
        return
    wc.check()
    for do_expand, where in ops:
        _random_edit(wc, do_expand, where)
        wc.check()  # coverage, alignment, budget and protected tail after every edit


def test_assemble_gathers_tokens_and_gists_with_gaussian_positions() -> None:
    tokens = np.arange(2_000, dtype=np.uint32) % 50
    embedding = torch.nn.Embedding(50, 8)
    wc = cold_start(2_000, w_max=400, protected_tail=64)  # 1 LOD2, 19 LOD1 [1,024, 1,632), 368 tokens
    out = assemble(wc.entries, ArraySource(tokens), embedding, horizon=np.array([7, 8], np.uint32))
    n = len(wc)
    assert out.inputs_embeds.shape == (1, n + 2, 8)
    first_token = wc.levels_used[1] + wc.levels_used[2]
    assert torch.equal(out.inputs_embeds[0, first_token], embedding.weight[tokens[wc.entries[first_token].start]])
    assert out.inputs_embeds[0, 0, 0] == 2 and out.inputs_embeds[0, 0, 1] == 0  # the LOD2 gist of [0, 1,024)
    assert out.inputs_embeds[0, 3, 0] == 1 and out.inputs_embeds[0, 3, 1] == 34  # LOD1 gist of [1,088, 1,120)
    assert out.mu[0, 0] == 511.5 and out.sigma[0, 0] == pytest.approx(1_024 / 12**0.5)
    assert out.mu[0, 1] == 1_039.5 and out.sigma[0, 1] == pytest.approx(32 / 12**0.5)
    assert out.mu[0, -2:].tolist() == [2_000.0, 2_001.0] and out.sigma[0, first_token:].abs().sum() == 0
    shifted = assemble(wc.entries, ArraySource(np.concatenate([np.zeros(1_024, np.uint32), tokens])), embedding,
                       offset=1_024)
    assert torch.equal(shifted.inputs_embeds[0, first_token:], out.inputs_embeds[0, first_token:n])
    assert shifted.inputs_embeds[0, 0, 1] == 1 and shifted.inputs_embeds[0, 1, 1] == 64  # indices shifted by 1,024


def test_live_assembly_equals_assembly_from_a_tree_built_by_the_same_gistnet(tmp_path, tiny_base) -> None:
    from megacontext.config import load_config
    from megacontext.model.gistnet import TreeGistEncoder, build_gistnet
    from megacontext.context.tree import MegaContextTree
    from megacontext.context.working_context import assemble_live

    cfg = load_config("tiny", env={})
    base = tiny_base
    emb = base.model.get_input_embeddings()
    net = build_gistnet(cfg.gistnet, emb, seed=0)
    with torch.no_grad():
        net.bodies[0].out_proj.weight.normal_(std=0.1)
    tokens = np.random.default_rng(1).integers(0, 256, 3_000).astype(np.uint32)
    tree = MegaContextTree.create(tmp_path / "t", base_model_id=base.model_id, encoder=TreeGistEncoder(net, emb),
                                  gist_dtype="float32")
    tree.append(tokens, TreeGistEncoder(net, emb))
    wc = cold_start(2_900, w_max=100, protected_tail=32)
    assert set(wc.levels_used) == {0, 1, 2}
    stored = assemble(wc.entries, tree, emb, horizon=tokens[2_900:2_932])
    live = assemble_live(wc.entries, torch.as_tensor(tokens.astype(np.int64)), emb, net, horizon=32)
    assert torch.allclose(live.inputs_embeds, stored.inputs_embeds, atol=1e-5)
    assert torch.equal(live.mu, stored.mu) and torch.equal(live.sigma, stored.sigma)
    live.inputs_embeds.sum().backward()
    assert net.bodies[0].out_proj.weight.grad is not None and net.bodies[0].out_proj.weight.grad.abs().sum() > 0


# --- compressed positions (slots) ---------------------------------------------------------------

COMPRESSED = PositionScheme("compressed", (1, 2, 4))


def test_compressed_positions_known_answer() -> None:
    entries = [Node(0, 2), Node(1_024, 1), Node(1_056, 1)] + [Node(t, 0) for t in range(1_088, 1_092)]
    mu, sigma, after = COMPRESSED.place(entries)
    # LOD2 fills slots [0, 4), the LOD1s [4, 6) and [6, 8), the tokens 8..11
    assert mu.tolist() == [1.5, 4.5, 6.5, 8.0, 9.0, 10.0, 11.0] and after == 12.0
    assert sigma.tolist() == pytest.approx([4 / 12**0.5, 2 / 12**0.5, 2 / 12**0.5, 0, 0, 0, 0])
    mu_suffix, _, _ = COMPRESSED.place(entries[3:], first=COMPRESSED.place(entries[:3])[2])
    assert torch.equal(mu_suffix, mu[3:])  # a suffix continues its prefix's slots
    out = assemble(entries, ArraySource(np.arange(2_000, dtype=np.uint32) % 50), torch.nn.Embedding(50, 8),
                   horizon=np.array([7, 8], np.uint32), positions=COMPRESSED)
    assert out.mu[0, -2:].tolist() == [12.0, 13.0] and torch.equal(out.mu[0, :-2], mu)
    with pytest.raises(ValueError, match="slot width"):
        PositionScheme("compressed", (1, 2)).place([Node(0, 2)])


def test_with_no_gists_compressed_positions_are_the_absolute_ones() -> None:
    entries = cold_start(500, w_max=600, protected_tail=64).entries  # history within budget: all tokens
    tokens, embedding = np.arange(500, dtype=np.uint32) % 50, torch.nn.Embedding(50, 8)
    a = assemble(entries, ArraySource(tokens), embedding, horizon=np.array([1, 2], np.uint32))
    c = assemble(entries, ArraySource(tokens), embedding, horizon=np.array([1, 2], np.uint32), positions=COMPRESSED)
    assert torch.equal(a.mu, c.mu) and torch.equal(a.sigma, c.sigma) and torch.equal(a.inputs_embeds, c.inputs_embeds)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 250_000), ops=st.lists(st.tuples(st.booleans(), st.floats(0, 1)), max_size=40))
def test_compressed_positions_of_any_reachable_working_context_stay_in_the_base_range(n, ops) -> None:
    w_max, tail, horizon, trained = 2_048, 256, 64, 8_192  # the default profile on SmolLM2
    wc = cold_start(n, w_max=w_max, protected_tail=tail)
    for do_expand, where in [(True, 0.5), *ops]:
        _random_edit(wc, do_expand, where)
        mu, sigma, after = COMPRESSED.place(wc.entries)
        assert after <= COMPRESSED.limit(w_max, tail) < trained - horizon  # every position, the horizon's too
        levels = np.array([e.level for e in wc.entries])
        runs = (levels[1:] == 0) & (levels[:-1] == 0)
        assert np.all(np.diff(mu.numpy())[runs] == 1.0)  # raw runs keep contiguous positions
    assert ABSOLUTE.limit(w_max, tail) == float("inf")


def test_sink_cost_counts_the_sink_span_gists():
    # known answers: the sink's raw tokens, then the fewest aligned gists up to its top-level span's end
    assert sink_cost(0, 2) == 0
    assert sink_cost(32, 2) == 32 + 31  # 31 LOD1 gists for [32, 1024)
    assert sink_cost(32, 1) == 32  # one level: nothing coarser to fill
    assert sink_cost(1024, 2) == 1024  # the sink fills its span
    assert sink_cost(64, 3) == 64 + 30 + 31  # 30 LOD1 for [64, 1024), 31 LOD2 for [1024, 32768)
    # it is what a cold start past the sink's span spends on [0, 1024)
    wc = cold_start(8_128, 2_048, 256, 2, 32)
    assert sum(1 for n in wc.entries if n.end <= 1_024) == sink_cost(32, 2)
    with pytest.raises(ValueError, match="whole number"):
        sink_cost(16, 2)
