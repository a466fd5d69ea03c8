"""Training windows: a pure function of (seed, step, item) -> a slice of a training document.

Every phase draws its data here, so a resumed run and every data-parallel rank
see exactly the batch an uninterrupted single-process run would. A window is
`history` tokens (starting on a multiple of the top gist span, so whole-document
trees and live gists agree) followed by `horizon` teacher-forced tokens. With a
`lookahead`, the window also carries the document's next `lookahead` tokens from
the horizon start (MegaPrediction's LOD2 target: the next 1,024 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from megacontext.errors import InputDataError
from megacontext.data.shards import TokenizedDocument


class SeedOffset(IntEnum):
    """Added to `cfg.seed` so that each phase draws its windows from a stream of its own (named, never reused)."""

    JT1_WINDOWS = 0
    JT2_SNAPSHOTS = 2  # JT2's labelled snapshots come from other windows than JT1's
    JT3_WINDOWS = 3
    JT3_GUARD = 4  # the plain-reading guard's unseen windows
    JT1_GUARD = 5  # the gist guard's unseen windows
    JT1_HELDOUT = 6  # JT1's early-stopping windows (never the guard's: the guard judges what early stopping chose)
    JT2_HELDOUT = 7  # JT2's early-stopping windows (teacher-labelled, never trained on)


@dataclass(frozen=True)
class Window:
    doc_id: str
    start: int  # in the document
    tokens: np.ndarray  # [history + horizon] uint32
    history: int
    future: np.ndarray | None = None  # [lookahead] tokens from the horizon start, when asked for

    @property
    def horizon(self) -> np.ndarray:
        return self.tokens[self.history :]


def eligible(docs: list[TokenizedDocument], history: int, horizon: int, lookahead: int = 0) -> list[TokenizedDocument]:
    need = history + max(horizon, lookahead)
    usable = [d for d in docs if len(d.tokens) >= need]
    if not usable:
        raise InputDataError(f"no training document has {need} tokens; lower train.history or add longer documents")
    return usable


def sample_window(docs: list[TokenizedDocument], *, history: int, horizon: int, align: int,
                  seed: int, step: int, item: int, lookahead: int = 0) -> Window:
    """The window for (seed, step, item): a document and an aligned start, both drawn from that triple.
    `lookahead` > 0 also keeps that many tokens from the horizon start (the document must hold them)."""
    rng = np.random.default_rng([seed, step, item])
    doc = docs[int(rng.integers(len(docs)))]
    starts = (len(doc.tokens) - history - max(horizon, lookahead)) // align + 1
    if starts < 1:
        raise InputDataError(f"document {doc.doc_id} has {len(doc.tokens)} tokens, fewer than the window's "
                             f"{history + max(horizon, lookahead)}; filter the documents with eligible() first")
    start = int(rng.integers(starts)) * align
    future = doc.tokens[start + history : start + history + lookahead] if lookahead else None
    return Window(doc.doc_id, start, doc.tokens[start : start + history + horizon], history, future)
