"""Block rankings: recall of one ranking's best blocks in another's, and the gist probe's training-free scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megacontext.context.block_selection import recall_at_k, select_blocks
from megacontext.context.nodes import Node


def test_recall_at_k_counts_the_reference_best_blocks_found() -> None:
    reference = np.array([0.9, 0.1, 0.8, 0.2, 0.7])  # best 3: blocks 0, 2, 4
    assert recall_at_k(reference, reference, 3) == 1.0
    assert recall_at_k(np.array([0.0, 1.0, 0.5, 0.9, 0.6]), reference, 3) == pytest.approx(1 / 3)  # 1, 3, 4
    assert recall_at_k(-reference, reference, 2) == 0.0  # the worst two are blocks 1, 3
    assert recall_at_k(np.array([5.0, 0.0, 0.0, 0.0, 0.0]), reference, 99) == 1.0  # k clipped to every block
    with pytest.raises(ValueError, match="one length"):
        recall_at_k(np.ones(3), np.ones(4), 2)


def test_recall_at_k_breaks_ties_as_select_blocks_selects() -> None:
    # mixed ties, where an unstable sort picks other members of a tied group: the earliest tied blocks win
    scores = np.tile([1.0, 0.0], 20)  # 40 blocks, the even ones tied at the top
    reference = np.zeros(40)
    reference[[0, 2, 4]] = 1.0  # the first three of the tied group
    assert recall_at_k(scores, reference, 3) == 1.0
    assert recall_at_k(scores, np.eye(40)[38], 1) == 0.0  # a later member of the tie is not picked first
    # select_blocks keeps exactly those blocks (room for three beside a 64-token tail)
    entries = select_blocks(42 * 32, 64 + 3 * 32, 64, scores, levels=1, gists=False)
    assert sorted({e.start // 32 for e in entries if e.start < 40 * 32}) == [0, 2, 4]


def test_gist_probe_scores_are_the_tail_attention_on_each_block_gist(tmp_path: Path) -> None:
    from megacontext.context.focus_policy import gist_probe_scores, probe_entries
    from megacontext.context.working_context import PositionScheme, assemble_live
    from tests.helpers.attention import eager_tail_attention, tiny_reader

    cfg, model, embedding, gistnet = tiny_reader(tmp_path, "wc.positions=compressed")
    n, tail, queries = 1000, 190, 16  # the tail widens back to the block boundary 800: 25 older blocks
    tokens = torch.randint(0, 256, (n + 8,), generator=torch.Generator().manual_seed(1))
    entries = probe_entries(n, tail)
    assert entries[:25] == [Node(32 * b, 1) for b in range(25)] and entries[25:] == [Node(t, 0) for t in range(800, n)]
    positions = PositionScheme.of(cfg.wc)
    got = gist_probe_scores(model, tokens, embedding, gistnet, n=n, tail=tail, queries=queries, positions=positions)
    assert got.shape == (25,) and np.all(got > 0) and got.sum() < 1
    with torch.no_grad():  # by hand: mean softmax weight of the last 16 rows on each gist
        inputs = assemble_live(entries, tokens, embedding, gistnet, cursor=n, positions=positions)
    assert np.allclose(got, eager_tail_attention(model, inputs, queries)[:25], atol=1e-5)
    with pytest.raises(ValueError, match="raw tail"):
        gist_probe_scores(model, tokens, embedding, gistnet, n=n, tail=tail, queries=n - 799, positions=positions)
