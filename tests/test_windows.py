"""Training windows: a pure function of (seed, step, item); a lookahead carries the tokens past the horizon."""

from __future__ import annotations

import numpy as np
import pytest

from megacontext.errors import InputDataError
from megacontext.data.shards import TokenizedDocument
from megacontext.data.windows import eligible, sample_window


def docs() -> list[TokenizedDocument]:
    rng = np.random.default_rng(0)
    return [TokenizedDocument(f"doc-{i}", "test", "train", rng.integers(0, 1_000, n).astype(np.uint32))
            for i, n in enumerate([1_500, 4_000, 9_000])]


def test_a_window_is_its_triple_and_carries_the_lookahead_from_the_horizon_start():
    pool = eligible(docs(), 1_024, 64, lookahead=1_024)
    assert [d.doc_id for d in pool] == ["doc-1", "doc-2"]  # 1,500 tokens cannot hold 1,024 + 1,024
    for step in range(20):
        w = sample_window(pool, history=1_024, horizon=64, align=1_024, seed=5, step=step, item=1, lookahead=1_024)
        again = sample_window(pool, history=1_024, horizon=64, align=1_024, seed=5, step=step, item=1, lookahead=1_024)
        doc = next(d for d in pool if d.doc_id == w.doc_id)
        assert w.start % 1_024 == 0 and w.start + 2_048 <= len(doc.tokens)
        assert np.array_equal(w.tokens, doc.tokens[w.start : w.start + 1_088])
        assert np.array_equal(w.future, doc.tokens[w.start + 1_024 : w.start + 2_048])
        assert np.array_equal(w.future[:64], w.horizon)
        assert np.array_equal(again.tokens, w.tokens) and np.array_equal(again.future, w.future)
    plain = sample_window(pool, history=1_024, horizon=64, align=1_024, seed=5, step=0, item=1)
    assert plain.future is None and len(plain.tokens) == 1_088


def test_too_short_documents_are_refused_with_the_length_they_need():
    with pytest.raises(InputDataError, match="no training document has 10000 tokens"):
        eligible(docs(), 8_976, 64, lookahead=1_024)
    with pytest.raises(InputDataError, match="doc-0 has 1500 tokens, fewer than the window's 2048"):
        sample_window(docs()[:1], history=1_024, horizon=64, align=32, seed=0, step=0, item=0, lookahead=1_024)
