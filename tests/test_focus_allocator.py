from __future__ import annotations

import numpy as np
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
       seed=st.integers(0, 2**16), rounds=st.integers(1, 15))
def test_budget_invariants_and_cooldown_hold_for_any_scores(n, w_max, tail, seed, rounds) -> None:
    try:
        wc = cold_start(n, w_max=w_max, protected_tail=tail)
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
