"""Passkey retrieval probe: a random 5-digit key hidden in a real held-out document.

A trial takes a span of a held-out document (the haystack), inserts a key sentence at a
chosen token position, and ends with a question whose answer is the key. It is scored by
teacher forcing the answer: the answer tokens' log-probability, and whether greedy decoding
would reproduce it exactly (every answer token is the argmax given the prompt and the
previous answer tokens, which is exactly when greedy decoding emits the answer's canonical
tokenization; the same digits split into other tokens count as a miss).

Placement is relative to the recency window (the last W_max prompt tokens): `inside` puts
the whole key sentence in it, `outside` puts it wholly before it, where truncation cannot
see it. Trials are deterministic per seed. The probe follows the passkey retrieval test of
Mohtashami & Jaggi ("Landmark Attention", 2023) with real documents as the haystack.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from megacontext.errors import InputDataError
from megacontext.data.shards import TokenizedDocument
from megacontext.model.tokenizer import TextTokenizer

PLACEMENTS = ("inside", "outside")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass(frozen=True)
class PasskeyTrial:
    trial_id: str
    doc_id: str
    length: int  # prompt tokens (the history the methods read)
    placement: str  # inside / outside the recency window
    key: str  # 5 digits
    depth: int  # first token of the key sentence in the prompt
    needle_tokens: int
    prompt: np.ndarray  # [length] uint32 token ids
    answer: np.ndarray  # [a] uint32 token ids

    @property
    def distance(self) -> int:
        """Tokens between the end of the key sentence and the end of the prompt."""
        return self.length - self.depth - self.needle_tokens

    @property
    def tokens(self) -> np.ndarray:
        """Prompt then answer: what a teacher-forced pass reads."""
        return np.concatenate([self.prompt, self.answer])


def make_trials(docs: list[TokenizedDocument], tokenizer: TextTokenizer, *, lengths: list[int], trials: int,
                recency: int, seed: int, align: int = 1) -> list[PasskeyTrial]:
    """`trials` trials per (length, placement), haystacks cycled over `docs` (those long enough).

    `recency` is the recency window (W_max): `inside` trials place the key sentence within the last
    `recency` prompt tokens, `outside` trials wholly before them. Haystack spans start on multiples
    of `align`. The same arguments always give the same trials.
    """
    rng = np.random.default_rng(seed)
    question = np.asarray(tokenizer.encode_batch([QUESTION])[0], dtype=np.uint32)
    out: list[PasskeyTrial] = []
    for length in lengths:
        eligible = [d for d in docs if len(d.tokens) >= length]
        if not eligible:
            raise InputDataError(f"passkey: no held-out document has {length} tokens; lower passkey.lengths")
        for placement in PLACEMENTS:
            for i in range(trials):
                doc = eligible[i % len(eligible)]
                key = f"{int(rng.integers(10_000, 100_000))}"
                needle = np.asarray(tokenizer.encode_batch([NEEDLE.format(key=key)])[0], dtype=np.uint32)
                answer = np.asarray(tokenizer.encode_batch([ANSWER.format(key=key)])[0], dtype=np.uint32)
                hay_len = length - len(needle) - len(question)
                if placement == "inside":  # the whole needle inside the last `recency` prompt tokens
                    lo, hi = length - recency, hay_len
                else:  # the whole needle before them
                    lo, hi = 0, length - recency - len(needle)
                if hay_len <= 0 or hi < lo or lo < 0:
                    raise InputDataError(f"passkey: a {length}-token prompt cannot place the key {placement} "
                                         f"a {recency}-token recency window; change passkey.lengths")
                depth = int(rng.integers(lo, hi + 1))
                room = (len(doc.tokens) - hay_len) // align
                offset = int(rng.integers(0, room + 1)) * align
                hay = doc.tokens[offset : offset + hay_len]
                prompt = np.concatenate([hay[:depth], needle, hay[depth:], question]).astype(np.uint32)
                out.append(PasskeyTrial(f"{length}-{placement}-{i:03d}", doc.doc_id, length, placement, key,
                                        depth, len(needle), prompt, answer))
    return out


def passkey_templates() -> str:
    """A digest of the trial texts: cached passkey numbers are only valid for these exact templates."""
    return hashlib.sha256("\0".join((NEEDLE, QUESTION, ANSWER)).encode()).hexdigest()[:16]


def answer_scores(logits: np.ndarray, answer: np.ndarray) -> tuple[float, bool]:
    """(log-probability of the answer, greedy exact match) from the logits [a, V] that predict it."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    idx = np.asarray(answer, dtype=np.int64)
    return float(logp[np.arange(len(idx)), idx].sum()), bool((logits.argmax(axis=-1) == idx).all())
