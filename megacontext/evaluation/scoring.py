"""Base-model NLL@H on held-out documents: the plain-context reference every later number is read against.

For each held-out document long enough, the base reads `context` tokens and is
scored on the next `horizon` true tokens (teacher forced). This is the
`NLL_recency`/`NLL_full` building block of docs/lifecycle.md §4; the MegaContext working
context and the gate live in the evaluation module, not here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from megacontext.model.base_model import BaseLM, horizon_nll
from megacontext.errors import InputDataError
from megacontext.progress import progress_bar
from megacontext.data.shards import TokenizedDocument


@dataclass(frozen=True)
class DocumentScore:
    doc_id: str
    source: str
    context: int
    horizon: int
    nll: float  # nats/token over the horizon
    seconds: float

    def as_row(self) -> dict:
        return asdict(self)


def score_documents(
    base: BaseLM, docs: list[TokenizedDocument], *, context: int, horizon: int, max_docs: int | None = None
) -> list[DocumentScore]:
    """NLL@H after `context` tokens, for each document with at least context + horizon tokens."""
    if context + horizon > base.max_positions:
        raise InputDataError(
            f"context {context} + horizon {horizon} exceeds the base model's {base.max_positions} positions; lower --context"
        )
    usable = [d for d in docs if len(d.tokens) >= context + horizon][:max_docs]
    if not usable:
        raise InputDataError(
            f"no document in this split has {context + horizon} tokens; lower --context or add longer documents"
        )
    scores = []
    with progress_bar("scoring", total=len(usable), unit="docs") as advance:
        for doc in usable:
            ids = torch.as_tensor(doc.tokens[: context + horizon].astype("int64"))[None]  # [1, T]
            start = time.perf_counter()
            nll = horizon_nll(base.model, ids, horizon)[0].item()
            scores.append(DocumentScore(doc.doc_id, doc.source, context, horizon, nll, time.perf_counter() - start))
            advance(1)
    return scores
