"""The streaming runtime (docs/architecture.md §2.10-2.11): ingest -> tree -> LensNet every 32 tokens -> allocator -> decode.

A `Runtime` owns one document: its MegaContext tree (on disk, crash-safe), the
working context over it, the Focus Allocator's hysteresis state and the K/V
cache. `feed` takes any number of tokens (a long prompt, a multi-token append,
one decoded token): they join the WC as LOD0 entries, and at every refocus
boundary the completed blocks go into the tree, LensNet scores the WC, the
allocator edits it, and `make_room` collapses (the groups LensNet asks to
collapse, then the undecided ones coarser first, then older; `allocator.room_slack` more at once) so that the next
`refocus_every` tokens fit: the budget holds after every token and
the WC never silently turns into a sliding window. `next_logits` runs the base
model on the WC through the cache (only what changed since the last call).
No base-model forward happens while a prompt is ingested: LensNet reads the
tree, so a long prompt costs one WC forward at the end.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from megacontext.model.base_model import BaseLM, load_base_model
from megacontext.config import Config
from megacontext.errors import ArtifactError, ConfigError, InputDataError
from megacontext.context.focus_allocator import Edit, FocusAllocator
from megacontext.context.focus_policy import check_attention_queries, wc_attention, wc_lens_inputs
from megacontext.model.gaussian_rope import install_gaussian_rope
from megacontext.model.gistnet import GistNet, TreeGistEncoder, build_gistnet, load_gistnet
from megacontext.model.lora import load_lora
from megacontext.runtime.kv_cache import WCKVCache
from megacontext.model.lensnet import LensNet, load_lensnet
from megacontext.lifecycle.lineage import read_manifest
from megacontext.mega.model import install_mega_attention
from megacontext.mega.prediction import next_block_prediction, tied_weight
from megacontext.context.nodes import BLOCK, Node
from megacontext.context.tree import MegaContextTree
from megacontext.context.working_context import BudgetExceeded, PositionScheme, WorkingContext, assemble, sink_cost


INGEST_CHUNK = 8_192  # tokens per tree append when a long feed is ingested ahead of the refocus loop


class _Source:
    """Tokens from the runtime's buffer (the tree only holds completed appends), gists from the tree."""

    def __init__(self, runtime: "Runtime"):
        self.rt = runtime

    def tokens(self, start: int, end: int) -> np.ndarray:
        return self.rt._buffer[start:end]  # past the cursor: a speculative draft's scratch space

    def gists(self, level: int, start_index: int, end_index: int) -> np.ndarray:
        return self.rt.tree.gists(level, start_index, end_index)


@dataclass(frozen=True)
class Snapshot:
    """The WC at one refocus: LensNet's scores of the entries it saw, the edits, the entries after."""

    cursor: int
    scored: list[Node]
    scores: np.ndarray  # [len(scored)] in [-1, 1]; empty without LensNet
    edits: list[Edit]
    entries: list[Node]


@dataclass
class Telemetry:
    tokens_fed: int = 0
    tokens_decoded: int = 0
    refocuses: int = 0
    edits: int = 0
    forced_collapses: int = 0  # make_room collapses (the budget as a hard limit)
    slack_collapses: int = 0  # collapses for allocator.room_slack beyond what the budget needed
    max_entries: int = 0  # the largest WC seen after any token
    focus_seconds: float = 0.0  # LensNet + allocator
    tree_seconds: float = 0.0
    decode_seconds: float = 0.0  # base-model forwards for decoding (through the cache)
    decode_forwards: int = 0
    budget_samples: list[float] = field(default_factory=list)
    drafts: int = 0  # speculative drafts scored
    accepted: int = 0  # drafts committed
    wlod1_readouts: int = 0  # drafts scored at MegaPrediction's wLOD1 readout (the rest at the latest leaf)

    def summary(self, w_max: int, allocator: FocusAllocator, cache: WCKVCache) -> dict[str, float]:
        focus = allocator.telemetry()
        return {
            "tokens_fed": self.tokens_fed, "tokens_decoded": self.tokens_decoded, "refocuses": self.refocuses,
            "edits": self.edits, "forced_collapses": self.forced_collapses, "slack_collapses": self.slack_collapses,
            "swap_rate": focus["swap_rate"], "residency_mean": focus["residency_mean"],
            "budget_utilisation_mean": float(np.mean(self.budget_samples)) if self.budget_samples else 0.0,
            "max_entries": self.max_entries, "w_max": w_max,
            "focus_ms_per_refocus": 1000 * self.focus_seconds / max(self.refocuses, 1),
            "decode_ms_per_token": 1000 * self.decode_seconds / max(self.decode_forwards, 1),
            "tree_seconds": self.tree_seconds, "speculative_drafts": self.drafts,
            "speculative_acceptance": self.accepted / self.drafts if self.drafts else 0.0,
            "speculative_wlod1_readouts": self.wlod1_readouts,
            **{f"cache_{k}": v for k, v in cache.stats.as_dict().items()},
        }


class Runtime:
    def __init__(self, cfg: Config, base: BaseLM, gistnet: GistNet, lensnet: LensNet | None, tree_dir: Path, *,
                 gist_embedding: nn.Module | None = None, plain: Callable[[], ContextManager] = nullcontext,
                 recompute: bool = False, keep_snapshots: bool = False):
        """`gist_embedding`: what GistNet and LensNet read (the plain base embedding when LoRA is on);
        `plain`: a context that turns the base's adapters off (LensNet's attention input is read there)."""
        self.every = cfg.allocator.refocus_every
        sink = sink_cost(cfg.wc.sink_tokens, cfg.wc.levels)
        need = cfg.wc.protected_tail + self.every + 2 * BLOCK + sink
        if cfg.wc.w_max < need:
            raise ConfigError(
                f"wc.w_max {cfg.wc.w_max} is too small to stream: it must hold the protected tail "
                f"({cfg.wc.protected_tail}), a refocus interval of headroom ({self.every}), {2 * BLOCK} positions "
                f"of gists and the attention sink ({cfg.wc.sink_tokens} tokens and the gists of the rest of its "
                f"span: {sink} positions), i.e. at least {need}; raise wc.w_max or lower wc.protected_tail")
        self.cfg, self.base, self.lensnet, self.plain = cfg, base, lensnet, plain
        check_attention_queries(lensnet.cfg.wc_attention_queries if lensnet is not None else 0, cfg.wc.protected_tail)
        install_gaussian_rope(base.model)
        self.embedding = base.model.get_input_embeddings()
        self.gist_embedding = gist_embedding or self.embedding
        self.encoder = TreeGistEncoder(gistnet.attach(base.model), self.gist_embedding)
        self.tree = MegaContextTree.create(tree_dir, base_model_id=base.model_id, encoder=self.encoder,
                                           levels=cfg.wc.levels, gist_dtype=cfg.gistnet.gist_dtype)
        self.wc = WorkingContext([], 0, cfg.wc.w_max, cfg.wc.protected_tail, cfg.wc.levels, cfg.wc.sink_tokens)
        self.allocator = FocusAllocator(cfg.allocator)
        self.positions = PositionScheme.of(cfg.wc)
        reach = self.positions.limit(cfg.wc.w_max, cfg.wc.protected_tail)
        if self.positions.kind == "compressed" and reach > base.max_positions:
            raise ConfigError(f"compressed positions of a {cfg.wc.w_max}-entry working context reach {reach:,.0f}, past "
                              f"the base model's {base.max_positions:,} positions; lower wc.slot_widths or wc.w_max")
        self.cache = WCKVCache(base, recompute=recompute, positions=self.positions)
        self.source = _Source(self)
        self._buffer = np.zeros(4096, dtype=np.uint32)
        self.telemetry = Telemetry()
        self.keep_snapshots = keep_snapshots
        self.snapshots: list[Snapshot] = []
        self._warned_positions = False
        self._scores: dict[Node, float] | None = None  # the last refocus's LensNet scores by node
        # drafts are scored at MegaPrediction's wLOD1 readout when the cycle trained it (else at the latest leaf)
        self.mega = cfg.mega if cfg.mega.prediction else None
        if self.mega is not None:  # outside a mega_context the attention modules run plain SDPA, unchanged
            install_mega_attention(base.model, self.mega.layers)

    @property
    def cursor(self) -> int:
        return self.wc.cursor

    @property
    def tokens(self) -> np.ndarray:
        return self._buffer[: self.wc.cursor]

    # --- ingest ------------------------------------------------------------------------

    def feed(self, tokens: Sequence[int] | np.ndarray, *, on_progress=None) -> None:
        """Append any number of tokens; refocus at every `refocus_every` boundary they cross."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1:
            raise InputDataError(f"feed takes a 1-D sequence of token ids, got shape {ids.shape}")
        vocab = self.embedding.weight.shape[0] if hasattr(self.embedding, "weight") else None
        if len(ids) and (ids.min() < 0 or (vocab is not None and ids.max() >= vocab)):
            raise InputDataError(f"token ids must lie in [0, {vocab}); got {ids.min()}..{ids.max()}")
        self._ingest_ahead(ids)
        done = 0
        while done < len(ids):
            n = min(len(ids) - done, self.every - self.wc.cursor % self.every)
            self._grow(self.wc.cursor + n)
            self._buffer[self.wc.cursor : self.wc.cursor + n] = ids[done : done + n]
            if len(self.wc) + n > self.wc.w_max:  # headroom used up by edits made outside refocus
                self._make_room(n)
            self.wc.append_tokens(n)
            done += n
            self.telemetry.tokens_fed += n
            self._track_budget()
            if self.wc.cursor % self.every == 0:
                self.refocus()
            if on_progress:
                on_progress(n)
        if self.positions.kind == "absolute" and self.wc.cursor > self.base.max_positions and not self._warned_positions:
            self._warned_positions = True
            warnings.warn(f"the history ({self.wc.cursor:,} tokens) is past the base model's "
                          f"{self.base.max_positions:,} trained positions; Gaussian-RoPE positions are absolute "
                          "(wc.positions=compressed keeps them in range)")

    def _ingest_ahead(self, ids: np.ndarray) -> None:
        """A long feed goes into the tree in a few big appends (one commit each), not one per block.

        Refocuses still happen every `refocus_every` tokens and read only nodes before the cursor.
        """
        end = (self.wc.cursor + len(ids)) // self.every * self.every  # the last boundary this feed reaches
        if self.tree.n_tokens != self.wc.cursor or end - self.wc.cursor <= self.every:
            return
        tick = time.perf_counter()
        for lo in range(0, end - self.wc.cursor, INGEST_CHUNK):
            self.tree.append(ids[lo : min(lo + INGEST_CHUNK, end - self.wc.cursor)], self.encoder)
        self.telemetry.tree_seconds += time.perf_counter() - tick

    def _grow(self, n: int) -> None:
        if n > len(self._buffer):
            bigger = np.zeros(max(n, 2 * len(self._buffer)), dtype=np.uint32)
            bigger[: len(self._buffer)] = self._buffer
            self._buffer = bigger

    def _track_budget(self) -> None:
        t = self.telemetry
        t.max_entries = max(t.max_entries, len(self.wc))
        if len(self.wc) > self.wc.w_max:  # cannot happen: append_tokens refuses; kept as a tripwire
            raise AssertionError(f"the WC holds {len(self.wc)} > W_max {self.wc.w_max} entries")

    def refocus(self) -> list[Edit]:
        """Tree update, LensNet scores, allocator edits, then room for the next block. Returns the edits."""
        tick = time.perf_counter()
        if self.tree.n_tokens < self.wc.cursor:
            self.tree.append(self.tokens[self.tree.n_tokens :], self.encoder)
        tock = time.perf_counter()
        scored, scores, edits = list(self.wc.entries), np.zeros(0), []
        if self.lensnet is not None and self.wc.entries:
            scores = self.score()
            edits = self.allocator.refocus(self.wc, scores)
        else:  # no LensNet: no edits, but the allocator's clock (hysteresis) still advances
            self.allocator.refocus(self.wc, np.zeros(len(self.wc)))
        self._scores = dict(zip(scored, scores.tolist())) if len(scores) else None
        forced = self._make_room(self.every)
        t = self.telemetry
        t.tree_seconds += tock - tick
        t.focus_seconds += time.perf_counter() - tock
        t.refocuses += 1
        t.edits += len(edits)
        t.budget_samples.append(len(self.wc) / self.wc.w_max)
        if self.keep_snapshots:
            self.snapshots.append(Snapshot(self.wc.cursor, scored, scores, edits + forced, list(self.wc.entries)))
        return edits + forced

    def _make_room(self, free: int, *, slack: bool = True) -> list[Edit]:
        """Collapse so that `free` positions are free; when that took any collapse, free
        `allocator.room_slack` more where LensNet and hysteresis allow (`slack`), so the next forced
        collapse, which invalidates the K/V after it, comes that many tokens later."""
        try:
            forced = self.allocator.make_room(self.wc, free, self._scores)
        except BudgetExceeded as exc:
            raise ConfigError(f"{exc} (wc.w_max)") from exc
        extra = []
        if forced and slack and self.cfg.allocator.room_slack:
            extra = self.allocator.make_room(self.wc, free + self.cfg.allocator.room_slack, self._scores, optional=True)
        self.telemetry.forced_collapses += len(forced)
        self.telemetry.slack_collapses += len(extra)
        return forced + extra

    @torch.no_grad()
    def score(self) -> np.ndarray:
        """LensNet's scores [N] for the current WC, read from the tree (gists) and the plain embedding."""
        def read(nodes: Sequence[Node]) -> torch.Tensor:
            return assemble(nodes, self.source, self.gist_embedding).inputs_embeds[0]

        def attention() -> np.ndarray:  # the plain base's attention from the WC's last tail tokens
            adapted = self.plain is not nullcontext
            if not (adapted or self.cache.sliding or self.cache.recompute or self.cfg.mega.attention):
                # from the K/V cache: a q-entry forward (adapters or MegaAttention: the cache is not the plain base's)
                return self.cache.tail_attention(self.wc.entries, self.source, queries)
            inputs = assemble(self.wc.entries, self.source, self.gist_embedding, positions=self.positions)
            with self.plain():
                return wc_attention(self.base.model, inputs, queries)

        queries = self.lensnet.cfg.wc_attention_queries
        inputs = wc_lens_inputs(self.wc, self.cfg.lensnet.tail_lod1, read, attention if queries else None)
        return self.lensnet(inputs)[0].cpu().numpy()

    # --- decode ------------------------------------------------------------------------

    def next_logits(self) -> torch.Tensor:
        """[V] logits of the token after the cursor, given the working context."""
        tick = time.perf_counter()
        logits = self.cache.next_logits(self.wc.entries, self.source)
        self.telemetry.decode_seconds += time.perf_counter() - tick
        self.telemetry.decode_forwards += 1
        return logits

    @property
    def eos_token_id(self) -> int:
        """The tokenizer's end-of-sequence id (SmolLM2-Instruct: `<|im_end|>`, the end of a chat turn)."""
        return int(self.base.tokenizer.eos_token_id)

    def generate(self, n: int, *, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                 stop_at_eos: bool = True, stop: set[int] | None = None) -> Iterator[int]:
        """Decode up to `n` tokens (greedy at temperature 0), feeding each back in.

        Stops after yielding the end-of-sequence token (`eos_token_id`) unless `stop_at_eos`
        is False, and after any id in `stop`. The stop token itself is fed and yielded.
        """
        stop = set(stop or ()) | ({self.eos_token_id} if stop_at_eos else set())
        rng = torch.Generator(device="cpu").manual_seed(seed)  # the same draws on any device
        for _ in range(n):
            logits = self.next_logits()
            if temperature > 0:
                if top_k:
                    kth = torch.topk(logits, min(top_k, len(logits))).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = int(torch.multinomial(torch.softmax(logits.float().cpu() / temperature, -1), 1, generator=rng))
            else:
                token = int(torch.argmax(logits))
            self.feed([token])
            self.telemetry.tokens_decoded += 1
            yield token
            if stop and token in stop:
                return

    # --- the speculative region (docs/architecture.md §2.9) --------------------------------------------

    @torch.no_grad()
    def speculate(self, *, threshold: float = 0.5, stop_at_eos: bool = True) -> tuple[list[int], float, bool]:
        """Draft one block (32 tokens) beyond the cursor, score it, then commit or roll back.

        Returns (draft, score, committed). With `stop_at_eos` (the default) drafting ends at
        the end-of-sequence token: a draft shorter than a block cannot be gisted, so it is
        returned unscored (score NaN) and not committed, and the tree is left as it was;
        the caller decides whether to feed it (the text ends there). The draft is decoded greedily into scratch
        space past the cursor; the tree and the allocator are untouched (the WC only
        makes room first if the block would not fit the budget). Its score is the LOD
        agreement cos(ĝ, g) between the gist predicted for the next block and GistNet's
        gist of the drafted block. ĝ = softmax(lm_head(h)) @ E is read out at the WC's
        latest wLOD1 node through MegaAttention when `mega.prediction` is on (the readout
        JT3 trains), else at the latest leaf (the next-token distribution). Commit feeds
        the draft (refocusing as usual) and appends it to the tree in one atomic commit;
        roll back leaves the tree byte-identical.
        """
        n = BLOCK
        if len(self.wc) + n > self.wc.w_max:
            self._make_room(n, slack=False)  # a rolled-back draft leaves no more collapses than it needed
        entries = list(self.wc.entries)
        logits = self.cache.next_logits(entries, self.source)
        predicted = None
        if self.mega is not None:
            predicted = next_block_prediction(self.base, self.encoder.gistnet,
                                              assemble(entries, self.source, self.embedding, positions=self.positions),
                                              self.mega.window,
                                              kernel=self.mega.kernel)
        self.telemetry.wlod1_readouts += predicted is not None
        if predicted is None:
            predicted = torch.softmax(logits.float(), -1) @ tied_weight(self.base).float()  # ĝ at the latest leaf
        draft: list[int] = []
        for i in range(n):
            token = int(torch.argmax(logits))
            draft.append(token)
            if stop_at_eos and token == self.eos_token_id and i + 1 < n:
                self.telemetry.drafts += 1
                return draft, float("nan"), False  # the text ends inside the block: nothing to gist
            self._grow(self.wc.cursor + i + 1)
            self._buffer[self.wc.cursor + i] = token  # scratch past the cursor
            entries.append(Node(self.wc.cursor + i, 0))
            if i + 1 < n:
                logits = self.cache.next_logits(entries, self.source)
        ids = torch.as_tensor(draft, dtype=torch.long)
        gist = self.encoder.encode_block(ids)
        score = float(torch.nn.functional.cosine_similarity(predicted, gist, dim=0))
        self.telemetry.drafts += 1
        committed = score >= threshold
        if committed:
            self.telemetry.accepted += 1
            self.feed(draft)
            if self.tree.n_tokens < self.wc.cursor:  # persist now: one atomic tree commit
                self.tree.append(self.tokens[self.tree.n_tokens :], self.encoder)
        return draft, score, committed

    def summary(self) -> dict[str, float]:
        return self.telemetry.summary(self.wc.w_max, self.allocator, self.cache)

    def close(self) -> None:
        self.tree.close()


def load_runtime(cfg: Config, checkpoint: Path | None, tree_dir: Path, *, recompute: bool = False,
                 keep_snapshots: bool = False, base: BaseLM | None = None) -> Runtime:
    """A runtime over a trained cycle (GistNet, LensNet, LoRA), or the untrained system without `checkpoint`."""
    base = base or load_base_model(cfg)
    if checkpoint is None:
        gistnet = build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=cfg.seed, levels=cfg.wc.levels)
        return Runtime(cfg, base, gistnet, None, tree_dir, recompute=recompute, keep_snapshots=keep_snapshots)
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    if manifest.get("kind") != "cycle":
        raise ArtifactError(f"{checkpoint}: a {manifest.get('kind')!r} artifact, not a training cycle; "
                            "pass a folder like artifacts/cycles/cycle-0001")
    trained_for = manifest.get("base_model_id")
    if trained_for != base.model_id:
        raise ArtifactError(f"{checkpoint}: trained for base model {trained_for!r}, but profile {cfg.profile!r} loads "
                            f"{base.model_id!r}; use the profile the cycle was trained with")
    gistnet = load_gistnet(checkpoint / "jt1" / "final")
    lensnet = load_lensnet(checkpoint / "jt2" / "final")
    plain = base.model.get_input_embeddings()
    adapters_off: Callable[[], ContextManager] = nullcontext
    if (checkpoint / "jt3" / "final" / "adapter_config.json").is_file():
        # the base reads tokens through the adapted embedding
        adapters_off = load_lora(base, checkpoint / "jt3" / "final").disable_adapter
    return Runtime(cfg, base, gistnet, lensnet, tree_dir, gist_embedding=plain, plain=adapters_off,
                   recompute=recompute, keep_snapshots=keep_snapshots)
