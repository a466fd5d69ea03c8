from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.config import AllocatorConfig
from megacontext.context.focus_allocator import FocusAllocator
from megacontext.context.nodes import Node
from megacontext.context.working_context import BudgetExceeded, cold_start, single_level_start


def _roomy():
    """46 LOD1 gists and a 528-token tail at 600, the budget then raised to 700: room for three expands."""
    wc = single_level_start(2_000, w_max=600, protected_tail=64, level=1)
    wc.w_max = 700
    return wc


def _scores(wc, value=0.0, **at):
    s = np.full(len(wc), value)
    for i, v in at.items():
        s[int(i.removeprefix("i"))] = v
    return s


def test_a_strong_gist_expands_and_weak_scores_do_nothing() -> None:
    wc = _roomy()
    alloc = FocusAllocator(AllocatorConfig())
    assert alloc.refocus(wc, _scores(wc, 0.1)) == []  # inside (-τ_c, τ_e): nothing
    edits = alloc.refocus(wc, _scores(wc, i3=0.9))
    assert [(e.action, e.node) for e in edits] == [("expand", Node(96, 1))]
    assert wc.entries[3:35] == Node(96, 1).children()


def test_a_weak_sibling_group_collapses_and_the_tail_never_does() -> None:
    wc = _roomy()
    first_token = wc.levels_used[1]
    alloc = FocusAllocator(AllocatorConfig())
    edits = alloc.refocus(wc, _scores(wc, -0.9))
    assert all(e.action == "collapse" for e in edits) and len(edits) == 4  # N_diff cap
    assert edits[0].node.level in (1, 2)
    assert all(e.node.end <= wc.cursor - wc.protected_tail for e in edits)
    wc.check()
    assert first_token > 0


def test_the_attention_sink_never_collapses_even_when_every_score_asks_for_it() -> None:
    wc = cold_start(4_096, w_max=1_024, protected_tail=256, sink=32)  # [0, 32) raw, 31 LOD1, 2 LOD2, 3 LOD1, tail
    alloc = FocusAllocator(AllocatorConfig(max_actions=100))
    assert all(parent.start >= 32 for _, parent in alloc.collapsible(wc))
    assert (0, Node(0, 1)) not in alloc.collapsible(wc)
    alloc.refocus(wc, _scores(wc, -0.99))
    # the smallest this WC gets: sink 32 + 31 LOD1 + 2 LOD2 + 24 LOD1 [3,072, 3,840) + the 256-token tail = 345
    alloc.make_room(wc, 1_024 - 345)
    assert len(wc) == 345 and wc.entries[:32] == [Node(t, 0) for t in range(32)]
    with pytest.raises(BudgetExceeded, match="nothing is left to collapse"):
        alloc.make_room(wc, 1_024 - 344)  # it raises rather than touch the sink
    assert wc.entries[:32] == [Node(t, 0) for t in range(32)]
    wc.check()


def test_expands_are_ordered_by_score_and_make_room_by_collapsing() -> None:
    wc = single_level_start(8_128, w_max=2_048, protected_tail=256, level=1)  # 197 LOD1 + 1,824: no room to expand
    scores = _scores(wc, -0.9)
    scores[:197] = 0.0
    scores[5], scores[9] = 0.5, 0.95
    edits = FocusAllocator(AllocatorConfig()).refocus(wc, scores)
    actions = [(e.action, e.node) for e in edits]
    assert actions[0][0] == "collapse" and ("expand", Node(9 * 32, 1)) in actions
    assert actions.index(("expand", Node(9 * 32, 1))) < actions.index(("expand", Node(5 * 32, 1)))
    assert len(wc) <= 2_048


def test_make_room_follows_lensnet_only_where_it_asks_to_collapse_else_summarises_the_oldest_coarsest() -> None:
    """Known answer (bug: an undecided LensNet's raw-tail scores sat below its LOD1 scores, so forced collapses
    ate the raw tail: a 105k-token document streamed into 268 raw tokens and 1,710 LOD1 gists)."""
    def start():
        return single_level_start(8_128, w_max=2_048, protected_tail=256, level=1)  # 197 LOD1 + 1,824 raw: 27 free

    wc = start()
    undecided = {n: (0.1 if n.level else -0.1) for n in wc.entries}  # inside the thresholds (0.2) everywhere
    edits = FocusAllocator(AllocatorConfig()).make_room(wc, 64, undecided)
    assert [(e.action, e.node) for e in edits] == [("collapse", Node(0, 2)), ("collapse", Node(1024, 2))]
    wc = start()
    raw = next(i for i, n in enumerate(wc.entries) if n.level == 0)  # the oldest raw block: LensNet asks to collapse
    block = Node(wc.entries[raw].start, 1)
    asked = dict(undecided) | {n: -0.9 for n in wc.entries[raw : raw + 32]}
    edits = FocusAllocator(AllocatorConfig()).make_room(wc, 64, asked)
    assert [(e.action, e.node) for e in edits] == [("collapse", block), ("collapse", Node(0, 2))]
    assert len(wc) <= 2_048 - 64
    wc = start()  # without scores: the same oldest, coarsest order
    assert [e.node for e in FocusAllocator(AllocatorConfig()).make_room(wc, 64)] == [Node(0, 2), Node(1024, 2)]
    wc = start()  # the oldest LOD1 group is detail LensNet wants (above tau_e): it goes after every undecided group
    kept = dict(undecided) | {n: 0.9 for n in wc.entries[:32]}
    edits = FocusAllocator(AllocatorConfig()).make_room(wc, 64, kept)
    assert [e.node for e in edits] == [Node(1024, 2), Node(2048, 2)]


def test_optional_room_stops_at_hysteresis_at_detail_lensnet_wants_and_when_nothing_is_left() -> None:
    def start():
        return single_level_start(8_128, w_max=2_048, protected_tail=256, level=1)  # 197 LOD1 + 1,824 raw: 27 free

    wc = start()  # wanted room frees what the budget would: 27 + 31 k >= 164, five LOD2 collapses
    edits = FocusAllocator(AllocatorConfig()).make_room(wc, 164, optional=True)
    assert [e.node for e in edits] == [Node(i * 1024, 2) for i in range(5)] and 2_048 - len(wc) == 182
    wc = start()  # LensNet wants the third LOD1 group kept: optional room stops there, needed room does not
    kept = {n: 0.9 for n in wc.entries[64:96]}
    assert [e.node for e in FocusAllocator(AllocatorConfig()).make_room(wc, 164, kept, optional=True)] == [
        Node(0, 2), Node(1024, 2), Node(3072, 2), Node(4096, 2), Node(5120, 2)]  # the undecided ones, all of them
    wc = start()
    everything_kept = {n: 0.9 for n in wc.entries}
    assert FocusAllocator(AllocatorConfig()).make_room(wc, 164, everything_kept, optional=True) == []
    assert len(FocusAllocator(AllocatorConfig()).make_room(wc, 164, everything_kept)) == 5  # needed: kept goes too
    wc = _roomy()
    alloc = FocusAllocator(AllocatorConfig())
    alloc.refocus(wc, _scores(wc, i0=0.9))  # Node(0, 1) expands: its 32 fresh tokens are held
    assert wc.entries[:32] == Node(0, 1).children()
    edits = alloc.make_room(wc, 10_000, optional=True)  # more than any legal collapse frees: no error
    assert edits and wc.entries[:32] == Node(0, 1).children()  # collapsed up to the held block, which stays
    assert all(e.node != Node(0, 1) for e in edits)
    wc.check()
    wc = _roomy()  # no hysteresis: everything collapses until nothing is left, and no error
    free = FocusAllocator(AllocatorConfig(cooldown=0, min_residency=0))
    edits = free.make_room(wc, 10_000, optional=True)
    assert edits and free.collapsible(wc) == [] and len(wc) < 700
    with pytest.raises(BudgetExceeded):
        free.make_room(wc, 10_000)


def test_no_ping_pong_within_cooldown_and_residency() -> None:
    wc2 = _roomy()
    a2 = FocusAllocator(AllocatorConfig(cooldown=2, min_residency=3))
    a2.refocus(wc2, _scores(wc2, i0=0.9))
    blocked = [a2.refocus(wc2, np.where(np.arange(len(wc2)) < 32, -0.9, 0.0)) for _ in range(2)]
    assert blocked == [[], []]  # the fresh tokens cannot collapse back yet
    a2.refocus(wc2, np.zeros(len(wc2)))
    back = a2.refocus(wc2, np.where(np.arange(len(wc2)) < 32, -0.9, 0.0))
    assert [(e.action, e.node) for e in back] == [("collapse", Node(0, 1))]
    assert a2.telemetry()["residency_mean"] == 4.0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 30_000), w_max=st.integers(300, 2_500), tail=st.integers(0, 256),
       seed=st.integers(0, 2**16), rounds=st.integers(1, 15), sink=st.sampled_from([0, 32]))
def test_budget_invariants_and_cooldown_hold_for_any_scores(n, w_max, tail, seed, rounds, sink) -> None:
    try:
        wc = cold_start(n, w_max=w_max, protected_tail=tail, sink=sink)
    except BudgetExceeded:
        return
    cfg = AllocatorConfig()
    alloc = FocusAllocator(cfg)
    rng = np.random.default_rng(seed)
    created: dict[Node, tuple[int, str]] = {}
    for r in range(rounds):
        edits = alloc.refocus(wc, rng.uniform(-1, 1, len(wc)))
        wc.check()
        assert len(wc) <= w_max and len(edits) <= cfg.max_actions
        for e in edits:
            acted = e.node if e.action == "expand" else None
            for child in (e.node.children() if e.action == "collapse" else []):
                if child in created:
                    when, how = created[child]
                    assert r - when >= max(cfg.min_residency, cfg.cooldown if how == "expand" else 0)
            if acted is not None and acted in created:
                assert r - created[acted][0] >= cfg.min_residency
            if e.action == "expand":
                created.update({c: (r, "expand") for c in e.node.children()})
            else:
                created[e.node] = (r, "collapse")
    t = alloc.telemetry()
    assert 0 <= t["swap_rate"] <= 1 and t["budget_utilisation_max"] <= 1.0


def test_reach_makes_every_edit_the_scores_justify_with_collapses_paying() -> None:
    wc = single_level_start(8_128, w_max=2_048, protected_tail=256, level=1)  # 197 LOD1 + 1,824 raw: 27 free
    wanted = [150, 3, 77, 190, 12, 60, 101, 33, 140, 9]  # ten gists, best first
    scores = _scores(wc, -0.9)
    scores[:197] = 0.0
    for rank, i in enumerate(wanted):
        scores[i] = 0.99 - 0.01 * rank
    alloc = FocusAllocator(AllocatorConfig())
    edits = alloc.reach(wc, lambda _: scores, rounds=1)
    # each expand (+31) needs one collapse (-31) first: the oldest collapsible tail blocks, all at -0.9
    assert [(e.action, e.node) for e in edits] == [
        step for k, i in enumerate(wanted) for step in (("collapse", Node(6_304 + 32 * k, 1)), ("expand", Node(32 * i, 1)))]
    assert len(wc) == 2_021 and all(Node(32 * i + j, 0) in wc.entries for i in wanted for j in range(32))
    wc.check()
    capped = single_level_start(8_128, w_max=2_048, protected_tail=256, level=1)
    assert sum(e.action == "expand" for e in FocusAllocator(AllocatorConfig()).refocus(capped, scores)) == 2  # N_diff 4


def test_reach_refines_a_needle_from_lod2_to_raw_tokens_where_capped_refocuses_cannot() -> None:
    needle = 500  # inside the cold start's one LOD2 gist, [0, 1,024)
    def score(wc):  # expand whatever covers the needle; the unprotected raw tail may pay
        return np.array([0.9 if n.level and n.start <= needle < n.end else
                         -0.5 if n.level == 0 and n.start < wc.cursor - wc.protected_tail else 0.0 for n in wc.entries])

    wc = cold_start(8_128, w_max=2_048, protected_tail=256)
    assert any(n.level == 2 and n.start <= needle < n.end for n in wc.entries)
    alloc = FocusAllocator(AllocatorConfig())
    alloc.reach(wc, score, rounds=2)  # LOD2 -> 32 LOD1, then the needle's LOD1 -> 32 tokens
    assert Node(needle, 0) in wc.entries and len(wc) <= 2_048
    wc.check()
    assert alloc.refocuses == 1  # one reach is one refocus of the hysteresis clock
    capped, slow = cold_start(8_128, w_max=2_048, protected_tail=256), FocusAllocator(AllocatorConfig())
    for _ in range(3):
        slow.refocus(capped, score(capped))
    assert Node(needle, 0) not in capped.entries  # min_residency holds the fresh LOD1 children for 3 refocuses


def test_reach_never_reverses_itself_and_hysteresis_holds_after_it() -> None:
    wc = _roomy()
    target = Node(96, 1)
    rounds = iter([_scores(wc, i3=0.9)])
    def score(wc):  # round 1: expand entry 3; later rounds: collapse its fresh children
        first = next(rounds, None)
        return first if first is not None else np.where([n.parent() == target for n in wc.entries], -0.9, 0.0)

    alloc = FocusAllocator(AllocatorConfig(cooldown=2, min_residency=3))
    edits = alloc.reach(wc, score, rounds=4)
    assert [(e.action, e.node) for e in edits] == [("expand", target)]
    assert alloc.refocus(wc, score(wc)) == []  # the next refocus is still held by min_residency


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 30_000), w_max=st.integers(300, 2_500), tail=st.integers(0, 256),
       seed=st.integers(0, 2**16), plan=st.lists(st.booleans(), min_size=1, max_size=8),
       sink=st.sampled_from([0, 32]))
def test_reach_and_refocus_keep_budget_coverage_and_hysteresis_for_any_scores(n, w_max, tail, seed, plan, sink) -> None:
    try:
        wc = cold_start(n, w_max=w_max, protected_tail=tail, sink=sink)
    except BudgetExceeded:
        return
    cfg = AllocatorConfig()
    alloc = FocusAllocator(cfg)
    rng = np.random.default_rng(seed)

    def score(wc):
        s = rng.uniform(-1, 1, len(wc))
        assert len(wc) <= w_max  # the budget holds between rounds too
        return s

    created: dict[Node, tuple[int, str]] = {}
    for r, reach in enumerate(plan):
        edits = alloc.reach(wc, score, rounds=3) if reach else alloc.refocus(wc, score(wc))
        wc.check()
        assert len(wc) <= w_max
        for e in edits:
            touched = e.node.children() if e.action == "collapse" else [e.node]
            for node in (t for t in touched if t in created):
                when, how = created[node]
                if when == r:
                    assert how == e.action  # inside one reach: refine, never reverse
                else:
                    assert r - when >= max(cfg.min_residency, cfg.cooldown if how != e.action else 0)
            if e.action == "expand":
                created.update({c: (r, "expand") for c in e.node.children()})
            else:
                created[e.node] = (r, "collapse")
    assert alloc.refocuses == len(plan) and alloc.telemetry()["budget_utilisation_max"] <= 1.0


def test_lens_policy_focuses_a_new_window_by_reach_when_configured() -> None:
    import torch

    from megacontext.config import Config, GistNetConfig, TrainConfig
    from megacontext.context.focus_policy import lens_policy
    from megacontext.data.windows import Window
    from megacontext.model.gistnet import build_gistnet

    class ExpandEveryGist(torch.nn.Module):  # a scorer with a known answer: gists +0.9, raw tokens -0.5
        def forward(self, x):
            return torch.where(x.levels > 0, 0.9, -0.5)

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(256, 64)
    gistnet = build_gistnet(GistNetConfig(width=32, heads=2), embedding, seed=0)
    window = Window("doc", 0, np.random.default_rng(0).integers(0, 256, 4_096 + 8).astype(np.uint32), 4_096)
    old_raw = {}
    for mode in ("refocus", "reach"):
        cfg = Config(gistnet=GistNetConfig(width=32, heads=2), train=TrainConfig(history=4_096, budget=1_024, horizon=8),
                     allocator=AllocatorConfig(new_window=mode))
        wc = lens_policy(cfg, embedding, gistnet, ExpandEveryGist())(window)
        wc.check()
        assert len(wc) <= 1_024
        cold = cold_start(4_096, 1_024, cfg.wc.protected_tail, cfg.wc.levels)
        tail_from = next(n.start for n in cold.entries if n.level == 0)
        old_raw[mode] = sum(n.level == 0 and n.start < tail_from for n in wc.entries)
    # every expand is paid by collapsing a raw tail block, so each one trades 32 recent tokens for 32 older ones;
    # capped: 4 refocuses x N_diff 4 alternating actions, the fresh LOD1 children held by min_residency
    assert old_raw["refocus"] <= 4 * 2 * 32 < old_raw["reach"]
