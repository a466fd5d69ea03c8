"""Text tokenizers behind one small interface: a Hugging Face `tokenizer.json`, or bytes.

`HFTokenizer` wraps the Rust `tokenizers` library directly (batch encoding uses
every core, no Python per-token work). `ByteTokenizer` is the in-code tiny
vocabulary used with the tiny test model: no files, no downloads. Each has a
stable `name` that shards record, so tokens are never read with the wrong vocabulary.

Text is encoded as text: a document or prompt that contains the literal spelling of a control
token (SmolLM2's end-of-turn `<|im_end|>`, `<filename>`, ...) gets the ordinary tokens of those
characters, never the control token itself (`tokenizers`' `encode_special_tokens`). The product adds
no control tokens to user text; the EOS id is only used to stop generation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, Sequence

from tokenizers import Tokenizer


class TextTokenizer(Protocol):
    name: str
    vocab_size: int
    eos_token_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A `tokenizer.json` (the fast-tokenizer format every HF model directory has).

    `name` is `hf:<sha256 of the file, 16 hex>:text`; the `:text` suffix marks encoding that never
    parses control-token spellings (shards built before it read them as control tokens and are refused).
    """

    def __init__(self, path: Path, eos_token: str | None = None):
        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        self._tok.encode_special_tokens = True  # user text is text: "<|im_end|>" is 10 characters, not a turn end
        self.name = "hf:" + hashlib.sha256(self.path.read_bytes()).hexdigest()[:16] + ":text"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = self._tok.token_to_id(eos_token) if eos_token else None
        self.eos_token_id = eos if eos is not None else self.vocab_size - 1

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus BOS (256) and EOS (257)."""

    name = "bytes-v1"
    vocab_size = 258
    bos_token_id = 256
    eos_token_id = 257

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
