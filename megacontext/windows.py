"""Training windows: a pure function of (seed, step, item) -> a slice of a training document.

Every phase draws its data here, so a resumed run and every data-parallel rank
see exactly the batch an uninterrupted single-process run would. A window is
`history` tokens (starting on a multiple of the top gist span, so whole-document
trees and live gists agree) followed by `horizon` teacher-forced tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megacontext.errors import InputDataError
from megacontext.shards import TokenizedDocument


@dataclass(frozen=True)
class Window:
    doc_id: str
    start: int  # in the document
    tokens: np.ndarray  # [history + horizon] uint32
    history: int

    @property
    def horizon(self) -> np.ndarray:
        return self.tokens[self.history :]


def eligible(docs: list[TokenizedDocument], history: int, horizon: int) -> list[TokenizedDocument]:
    usable = [d for d in docs if len(d.tokens) >= history + horizon]
    if not usable:
        raise InputDataError(f"no training document has {history + horizon} tokens; lower train.history or add longer documents")
    return usable


def sample_window(docs: list[TokenizedDocument], *, history: int, horizon: int, align: int,
                  seed: int, step: int, item: int) -> Window:
    """The window for (seed, step, item): a document and an aligned start, both drawn from that triple."""
    rng = np.random.default_rng([seed, step, item])
    doc = docs[int(rng.integers(len(docs)))]
    starts = (len(doc.tokens) - history - horizon) // align + 1
    start = int(rng.integers(starts)) * align
    return Window(doc.doc_id, start, doc.tokens[start : start + history + horizon], history)
