"""Typed, validated configuration: code defaults < YAML profile < environment < overrides.

A profile (`configs/<name>.yaml`) lists only what differs from the defaults in
this file. Overrides use one syntax everywhere (CLI, DVC, Dagster):
`key.sub=value`, the value parsed as YAML. Unknown keys and bad values raise
`ConfigError` naming the key. Paths are where things go, not what they are, so
they are left out of `config_hash`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from megacontext.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Environment variables honoured everywhere (docs/lifecycle.md §6), mapped to config keys.
ENV_OVERRIDES = {
    "MEGACONTEXT_ARTIFACT_ROOT": "paths.artifact_root",
    "MEGACONTEXT_DATA_ROOT": "paths.data_root",
    "MEGACONTEXT_SEED": "seed",
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class PathsConfig(Section):
    artifact_root: str = "artifacts"  # every stage output and checkpoint lives below this
    data_root: str | None = None  # corpus + shards; None -> <artifact_root>/data
    corpus_dir: str = "data"  # the user's raw files (tracked by data.dvc); empty -> stdlib corpus
    model_cache: str | None = None  # fp32 safetensors cache; None -> ~/.cache/megacontext/models

    def data_dir(self) -> Path:
        return Path(self.data_root) if self.data_root else Path(self.artifact_root) / "data"


class TinyModelConfig(Section):
    """The random tiny Llama built in code for tests (byte-level vocabulary)."""

    d_model: int = Field(64, ge=8)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int = Field(2, ge=1)
    d_ff: int = Field(128, ge=8)
    max_positions: int = Field(65_536, ge=64)

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("need d_model % n_heads == 0 and n_heads % n_kv_heads == 0")
        return self


class ModelConfig(Section):
    kind: Literal["smollm2", "hf", "tiny", "gemma3-270m"] = "smollm2"
    path: str | None = None  # a local Hugging Face model directory, for kind=hf
    dtype: Literal["float32", "bfloat16"] = "float32"  # fp32 on CPU; bf16 is ~3x slower there
    # where the base and every module and tensor live: cpu, or cuda[:N] on a machine with an accelerator
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    tiny: TinyModelConfig = TinyModelConfig()

    @model_validator(mode="after")
    def _path_for_hf(self) -> "ModelConfig":
        if self.kind == "hf" and not self.path:
            raise ValueError("kind=hf needs model.path=<local Hugging Face model directory>")
        return self


class DataConfig(Section):
    source: Literal["auto", "stdlib", "folder"] = "auto"  # auto: the corpus folder if it has files
    text_field: str = "text"  # field of .jsonl records / column of .parquet files
    doc_target_chars: int = Field(120_000, ge=1_000)  # stdlib: pack files of a package up to this
    max_documents: int | None = Field(None, ge=1)
    max_doc_tokens: int | None = Field(None, ge=32)  # truncate longer documents
    min_doc_tokens: int = Field(32, ge=1)  # one block; shorter documents are an input error
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    shard_max_tokens: int = Field(4_000_000, ge=1_024)

    @model_validator(mode="after")
    def _splits_leave_train(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave room for a train split (< 1)")
        return self


class GistNetConfig(Section):
    """GistNet (docs/architecture.md §2.3): a small non-causal transformer, 32 vectors -> 1 gist."""

    width: int = Field(256, ge=16)  # internal width (< d); in/out projections
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    level_weights: Literal["shared", "separate"] = "shared"  # LOD1 and LOD2 share weights (+ level embedding)
    gist_dtype: Literal["float16", "float32"] = "float16"  # storage in the tree
    # What level 1 reads (docs/architecture.md §2.3): the base's static token embeddings, or its
    # hidden states after the first `input_layers` decoder layers, each 32-token block read on its own
    # (contextual within the block; adapters off), through a trainable RMSNorm + linear projector:
    # instead of the embeddings (hidden) or as a zero-initialised residual on them (embeddings+hidden)
    inputs: Literal["embeddings", "hidden", "embeddings+hidden"] = "embeddings"
    input_layers: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> "GistNetConfig":
        if self.width % self.heads:
            raise ValueError("width must be divisible by heads")
        return self


class WorkingContextConfig(Section):
    """The budgeted working context (docs/architecture.md §1, §2.4)."""

    w_max: int = Field(2_048, ge=64)  # budget in positions; every entry costs 1
    protected_tail: int = Field(256, ge=0)  # R: the last R tokens are always LOD0
    levels: int = Field(2, ge=1, le=4)  # highest gist level in the tree (POR: 2)
    # Gaussian-RoPE positions (docs/architecture.md §2.7): absolute token positions, or compressed slots
    # (a token advances the position by 1, a level-k gist by slot_widths[k]) that stay in the base's range
    positions: Literal["absolute", "compressed"] = "absolute"
    slot_widths: list[int] = Field([1, 2, 4], min_length=2)  # per level 0, 1, 2, ...; level 0 is always 1
    # the history's first sink_tokens tokens stay LOD0 in every working context: the base's attention sink
    # (StreamingLLM, Xiao et al. 2023); a gist in its place costs the cold start ~0.04 nats/token (bench_gist_harm).
    # 0 turns it off (the layout of every cycle trained before it became the default)
    sink_tokens: int = Field(32, ge=0)

    @model_validator(mode="after")
    def _tail_fits(self) -> "WorkingContextConfig":
        if self.protected_tail + 32 > self.w_max:
            raise ValueError("protected_tail must leave room for at least one block under w_max")
        if self.sink_tokens % 32 or self.sink_tokens + self.protected_tail + 2 * 32 > self.w_max:
            raise ValueError(f"sink_tokens ({self.sink_tokens}) must be a multiple of 32 that leaves the protected tail "
                             "and two blocks of room under w_max")
        widths = self.slot_widths
        if widths[0] != 1 or any(w < 1 for w in widths):
            raise ValueError("slot_widths must start with 1 (a token) and be >= 1")
        if self.positions == "compressed" and len(widths) < self.levels + 1:
            raise ValueError(f"compressed positions need slot_widths for every level 0..{self.levels}")
        return self


class LensNetConfig(Section):
    """LensNet (docs/architecture.md §2.5): a small non-causal scorer over the working context."""

    width: int = Field(256, ge=16)  # d_lens
    heads: int = Field(4, ge=1)
    tail_lod1: int = Field(5, ge=0)  # tail gists: the latest LOD2 gist + this many latest LOD1 gists
    mlp_hidden: int = Field(256, ge=8)
    ranking_weight: float = Field(0.5, ge=0)
    budget_weight: float = Field(0.1, ge=0)
    legality_weight: float = Field(0.3, ge=0)
    listwise_weight: float = Field(0.0, ge=0)  # ListNet term over each WC's labelled entries (dense targets)
    # Question-aware input (docs/architecture.md §2.5): the attention the base's last this-many WC tokens put on
    # each entry, from one forward of the working context; 0 = off (LensNet reads vectors and features only)
    wc_attention_queries: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "LensNetConfig":
        if self.width % self.heads:
            raise ValueError("width must be divisible by heads")
        return self


class AllocatorConfig(Section):
    """The greedy Focus Allocator (docs/architecture.md §2.6)."""

    expand_threshold: float = Field(0.2, ge=0, le=1)  # τ_e
    collapse_threshold: float = Field(0.2, ge=0, le=1)  # τ_c
    max_actions: int = Field(4, ge=1)  # N_diff per refocus
    cooldown: int = Field(2, ge=0)  # refocuses before the opposite action is allowed
    min_residency: int = Field(3, ge=0)  # refocuses an entry stays after a change
    refocus_every: int = Field(32, ge=1)  # tokens between refocuses
    # Runtime only (left out of config_hash): when the budget forces collapses, free this many positions
    # more than the append needs, where LensNet and hysteresis allow, so the K/V after a forced collapse
    # is recomputed once per ~this many tokens (LensNet's expands may spend the slack sooner)
    room_slack: int = Field(0, ge=0)
    # How a new window (training snapshot, evaluation cursor) is focused from its cold start:
    # "refocus" = a few N_diff-capped refocuses; "reach" = one uncapped best-first reach (§2.6). Measured with
    # the dense LensNet: reach carried its wrong ranking further (+0.145 vs +0.044 nats/token over recency)
    new_window: Literal["refocus", "reach"] = "refocus"


class PhaseConfig(Section):
    """One training phase (JT1/JT2/JT3): its steps and optimiser."""

    steps: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch: int = Field(2, ge=1)  # windows per optimiser step (global, split across DDP ranks)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    warmup: int = Field(0, ge=0)  # steps of linear learning-rate warm-up (0: the full lr from the first step)
    # Per-parameter learning-rate multipliers: a parameter whose name contains a key trains at lr x value
    # (the first matching key, in order), e.g. {input_proj: 10} for GistNet's zero-initialised projector
    lr_scales: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = {}
    # Early stopping (docs/lifecycle.md §3.2): every `eval_every` steps the phase's held-out loss on
    # `eval_windows` unseen windows; the best step (step 0, the warm start, included) is exported.
    eval_every: int = Field(0, ge=0)  # 0: no held-out validation, the last step is exported
    eval_windows: int = Field(8, ge=1)
    patience: int = Field(0, ge=0)  # stop after this many validations without improvement (0: run every step)

    @model_validator(mode="after")
    def _scale_keys(self) -> "PhaseConfig":
        if any(not key for key in self.lr_scales):
            raise ValueError("lr_scales keys are parts of parameter names, not empty")
        return self


class LoraSettings(Section):
    """LoRA adapters on the frozen base for JT3 (docs/lifecycle.md §3): targets by config."""

    rank: int = Field(8, ge=1, le=64)
    alpha: float = Field(16.0, gt=0)
    embedding: bool = True  # adapt the input embedding
    first_blocks: int = Field(2, ge=0)  # attention projections of the first N decoder blocks
    last_blocks: int = Field(2, ge=0)  # ... and of the last N
    projections: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    keepalive_weight: float = Field(0.1, ge=0)  # weak substitutability term: KL(P_full ‖ P_WC)
    # The plain-reading guard (docs/lifecycle.md §3): after JT3, adapters are kept only if, on this many
    # unseen training windows, they lower the working context's NLL@H and raise the recency window's by
    # at most guard_tolerance nats/token; otherwise the warm start's adapters are exported. 0 = off.
    guard_windows: int = Field(8, ge=0)
    guard_tolerance: float = Field(0.0, ge=0)


class TrainConfig(Section):
    """The alternating JT1 -> JT2 -> JT3 cycle (docs/lifecycle.md §3)."""

    history: int = Field(2_048, ge=64)  # L_train: tokens of history per training window
    budget: int = Field(512, ge=64)  # B_train: working-context budget while training
    horizon: int = Field(64, ge=1)  # H for NLL@H / KL@H
    checkpoint_every: int = Field(10, ge=1)  # optimiser steps between resumable checkpoints
    label_snapshots: int = Field(6, ge=1)  # JT2: on-policy snapshots labelled per cycle
    label_candidates: int = Field(24, ge=1)  # JT2: candidate actions scored per snapshot
    # JT2 dense supervision: windows whose teacher pass (horizon attention mass per block) labels every
    # entry of their on-policy WC; cached across cycles. 0 = counterfactual labels only
    teacher_windows: int = Field(0, ge=0)
    # Dense targets relative to the position prior (teacher.position_prior): a block's mass over the mean mass
    # at its position across the teacher windows, so LensNet cannot learn "oldest first" from the sink's
    # spill-over (default profile: without it a dense LensNet expanded the oldest blocks; with it, it collapsed
    # recent ones and read worse still: docs/lifecycle.md §3.4). Off
    teacher_debias: bool = False
    # The gist guard (docs/lifecycle.md §3.3): after JT1, the trained GistNet is kept only if, on this many
    # unseen training windows, its gists lower the working context's NLL@H against the warm start's. 0 = off.
    gist_guard_windows: int = Field(8, ge=0)
    # JT1 at lr 1e-4 with the best held-out step exported: measured against 1e-3 (held-out NLL@H only
    # rose, so early stopping kept the warm start) and 3e-4 + 4 warm-up steps (benchmarks/bench_jt1.py)
    jt1: PhaseConfig = PhaseConfig(steps=24, lr=1e-4, eval_every=4)
    jt2: PhaseConfig = PhaseConfig(steps=60, lr=1e-3, batch=8)
    jt3: PhaseConfig = PhaseConfig(steps=16, lr=5e-4)
    lora: LoraSettings = LoraSettings()

    @model_validator(mode="after")
    def _history_exceeds_budget(self) -> "TrainConfig":
        if self.history <= self.budget:
            raise ValueError("train.history must exceed train.budget: nothing would be compressed")
        return self


class PasskeyConfig(Section):
    """The passkey retrieval probe: a 5-digit key hidden inside or outside the recency window."""

    enabled: bool = True
    lengths: list[int] = Field([4_096, 8_128], min_length=1)  # prompt tokens (history lengths)
    trials: int = Field(24, ge=1)  # per (length, placement)


class EvalConfig(Section):
    """Evaluation and the validation gate (docs/lifecycle.md §4)."""

    history: int = Field(8_128, ge=64)  # L: tokens of history before each cursor (default 8,192 - H)
    horizon: int = Field(64, ge=1)  # H: teacher-forced scored tokens after the cursor
    split: Literal["val", "test"] = "val"
    max_docs: int | None = Field(None, ge=1)  # None: every document of the split long enough
    # One full-context pass per window serves several cursors: histories L, L - stride, L - 2·stride, ...
    windows_per_doc: int = Field(2, ge=1)  # full-context passes per document, spread over it
    cursors_per_window: int = Field(5, ge=1)
    cursor_stride: int = Field(512, ge=1)  # tokens between a window's cursors (>= H: horizons never overlap)
    key_token_margin: float = Field(0.5, gt=0)  # key token: full context beats recency by > this (nats)
    # LongPPL key tokens (Fang et al., ICLR 2025; defaults of its public implementation, alpha=2, beta=-2):
    # log p_full - log p_short > gain and log p_full > floor; the short context is the recency window.
    longppl_gain: float = Field(2.0, gt=0)
    longppl_floor: float = Field(-2.0, le=0)
    baselines: bool = True  # attention-oracle and training-free focus rows (one WC pass each per sample)
    focus_tail: int | None = Field(None, ge=1)  # raw tail of the oracle / training-free focus; None = w_max // 2
    tail_queries: int = Field(64, ge=1)  # training-free focus: attention from the last this-many history tokens
    passkey: PasskeyConfig = PasskeyConfig()
    delta_nll_max: float = Field(0.1, gt=0)  # gate: NLL_mc - NLL_full <= this
    noise_band: float = Field(0.02, ge=0)  # nightly: worse than the champion's recorded numbers by more fails
    bootstrap_samples: int = Field(1_000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)


class MegaConfig(Section):
    """MegaAttention and MegaPrediction in JT3 (docs/architecture.md §2.8-2.9); off by default."""

    attention: bool = False  # JT3 reads the WC through MegaAttention instead of full attention
    window: int = Field(256, ge=1)  # W: the leaves' causal local window
    # sdpa = dense boolean mask (the reference; CPU training of short WCs); flex = compiled FlexAttention
    # (forward on CPU, forward+backward on GPU); packed = SDPA per 128-leaf slice on its gathered keys
    # (O(N·(W + 160 + N/1,024)) memory, forward+backward anywhere)
    kernel: Literal["sdpa", "flex", "packed"] = "sdpa"
    layers: list[int] | None = None  # attention modules (model.layers.<i>.self_attn) to replace; None = all
    prediction: bool = False  # MegaPrediction gist losses (needs attention)
    alpha1: tuple[float, float] = (0.02, 0.05)  # L_lod1 weight, start -> end of the phase
    alpha2: tuple[float, float] = (0.01, 0.03)  # L_lod2 weight (α1 > α2)
    unfreeze_targets: bool = False  # GistNet targets with gradients

    @model_validator(mode="after")
    def _consistent(self) -> "MegaConfig":
        if self.prediction and not self.attention:
            raise ValueError("prediction needs attention: MegaPrediction reads out at MegaAttention summary nodes")
        if not all(a1 > a2 >= 0 for a1, a2 in zip(self.alpha1, self.alpha2)):
            raise ValueError("alpha1 must exceed alpha2 (both >= 0) at both ends of the schedule")
        return self


class Config(Section):
    profile: str = "default"
    seed: int = Field(0, ge=0)
    paths: PathsConfig = PathsConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    gistnet: GistNetConfig = GistNetConfig()
    wc: WorkingContextConfig = WorkingContextConfig()
    lensnet: LensNetConfig = LensNetConfig()
    allocator: AllocatorConfig = AllocatorConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    mega: MegaConfig = MegaConfig()

    @model_validator(mode="after")
    def _history_exceeds_budget(self) -> "Config":
        ev = self.eval
        if ev.history <= self.wc.w_max:
            raise ValueError(f"eval.history ({ev.history}) must exceed wc.w_max ({self.wc.w_max}): nothing to compress")
        shortest = ev.history - (ev.cursors_per_window - 1) * ev.cursor_stride
        if shortest <= self.wc.w_max:
            raise ValueError(f"a window's shortest history, eval.history - (cursors_per_window - 1) * cursor_stride "
                             f"= {shortest}, must exceed wc.w_max ({self.wc.w_max}); use fewer cursors or a smaller stride")
        if ev.cursors_per_window > 1 and ev.cursor_stride < ev.horizon:
            raise ValueError(f"eval.cursor_stride ({ev.cursor_stride}) must be >= eval.horizon ({ev.horizon}): "
                             "horizons of one window must not overlap")
        tail = ev.focus_tail or self.wc.w_max // 2
        if not self.wc.protected_tail <= tail <= self.wc.w_max - 64:
            raise ValueError(f"eval.focus_tail ({tail}) must be in [wc.protected_tail, wc.w_max - 64]: the oracle "
                             "needs room for at least one block beside its tail")
        if self.train.teacher_debias and self.train.teacher_windows < 2:
            raise ValueError(f"train.teacher_debias needs train.teacher_windows >= 2 (each window is debiased by "
                             f"the others' position prior); got {self.train.teacher_windows}")
        if self.wc.sink_tokens and self.wc.sink_tokens + self.wc.protected_tail + 2 * 32 > self.train.budget:
            raise ValueError(f"wc.sink_tokens ({self.wc.sink_tokens}) must leave the protected tail and two blocks of "
                             f"room under train.budget ({self.train.budget}) too: training windows keep the sink raw")
        if self.lensnet.wc_attention_queries > self.wc.protected_tail:
            raise ValueError(f"lensnet.wc_attention_queries ({self.lensnet.wc_attention_queries}) must be <= "
                             f"wc.protected_tail ({self.wc.protected_tail}): the queries are raw tail tokens")
        if self.gistnet.inputs != "embeddings" and (self.mega.attention or self.mega.prediction):
            raise ValueError(f"gistnet.inputs={self.gistnet.inputs} does not combine with MegaAttention/MegaPrediction "
                             "yet (their summaries run GistNet over layer states, not token blocks); "
                             "use gistnet.inputs=embeddings")
        if ev.tail_queries >= min([shortest, *(ev.passkey.lengths if ev.passkey.enabled else [])]):
            raise ValueError(f"eval.tail_queries ({ev.tail_queries}) must be shorter than every history")
        if ev.passkey.enabled and min(ev.passkey.lengths) <= self.wc.w_max:
            raise ValueError(f"eval.passkey.lengths must all exceed wc.w_max ({self.wc.w_max}): a key outside "
                             "the recency window needs a longer prompt")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def config_hash(cfg: Config, sections: Sequence[str] | None = None) -> str:
    """sha256 of the canonical JSON of the config (or of `sections`), without paths/profile/model.device
    (where the numbers are computed does not change what an artifact is: a cycle trained on a GPU is
    re-evaluated by the CPU nightly) and allocator.room_slack (only the streaming runtime reads it)."""
    data = cfg.to_dict()
    data.pop("paths")
    data.pop("profile")
    data["model"].pop("device", None)
    data["allocator"].pop("room_slack", None)  # the streaming runtime's K/V schedule: no artifact reads it
    if not data["wc"].get("sink_tokens"):
        data["wc"].pop("sink_tokens", None)  # no sink: the hash of every artifact made before the option existed
    if not data["train"].get("teacher_debias"):
        data["train"].pop("teacher_debias", None)  # off: artifacts made before the option keep their hash
    if sections is not None:
        data = {name: data[name] for name in sections}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def profile_path(profile: str) -> Path:
    """A profile name (`tiny`) in configs/, or a path to a YAML file."""
    candidate = Path(profile)
    if candidate.suffix in {".yaml", ".yml"}:
        path = candidate
    else:
        path = CONFIG_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"profile '{profile}' not found ({path}); known profiles: {', '.join(known)}")
    return path


def load_config(
    profile: str = "default",
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    """Resolve the config: defaults < profile YAML < MEGACONTEXT_* env vars < `key=value` overrides."""
    env = os.environ if env is None else env
    path = profile_path(profile)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix the file") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of config keys")
    # Start from the full defaults so a partial section (e.g. `train.jt3: {steps: 4}`)
    # keeps the defaults its parent declares for the keys it does not name.
    tree: dict[str, Any] = Config().to_dict()
    origins: dict[str, str] = {}  # key -> where its value came from, named in a validation error
    for key, value in _flatten(raw):
        _set_key(tree, key, value, origin=str(path))
        origins[key] = f"profile {path}"
    tree["profile"] = path.stem
    for var, key in ENV_OVERRIDES.items():
        if env.get(var):
            try:
                value = yaml.safe_load(env[var])
            except yaml.YAMLError:
                value = env[var]
            _set_key(tree, key, value, origin=f"environment variable {var}")
            origins[key] = f"environment variable {var}={env[var]!r}"
    for item in overrides:
        key, value = parse_override(item)
        _set_key(tree, key, value, origin=f"override '{item}'")
        origins[key] = f"override '{item}'"
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        related = [o for k, o in origins.items() if key == k or key.startswith(k + ".") or k.startswith(key + ".")]
        source = related[-1] if related else "the defaults"  # the last writer of the key or its section
        raise ConfigError(f"config key '{key}' from {source}: {err['msg']} (got {err.get('input')!r})") from None


def parse_override(item: str) -> tuple[str, Any]:
    """`data.val_fraction=0.2` -> ("data.val_fraction", 0.2); values are parsed as YAML scalars."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and _is_section(full):
            items.extend(_flatten(value, prefix=f"{full}."))
        else:
            items.append((full, value))
    return items


def _section_model(key: str) -> type[BaseModel] | None:
    """The pydantic model behind a dotted key, if the key names a section."""
    model: type[BaseModel] = Config
    for part in key.split("."):
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _is_section(key: str) -> bool:
    return _section_model(key) is not None


def _set_key(tree: dict[str, Any], key: str, value: Any, origin: str) -> None:
    """Set a dotted key in a nested dict, refusing keys the Config does not have."""
    parts = key.split(".")
    model: type[BaseModel] = Config
    node = tree
    for depth, part in enumerate(parts):
        if part not in model.model_fields:
            where = ".".join(parts[:depth]) or "the top level"
            valid = sorted(model.model_fields)
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f"did you mean '{'.'.join(parts[:depth] + close)}'? " if close else ""
            raise ConfigError(
                f"unknown config key '{key}' (from {origin}); {hint}valid keys under {where}: {', '.join(valid)}"
            )
        if depth == len(parts) - 1:
            if isinstance(value, dict) and _is_section(key):
                for sub, sub_value in _flatten(value, prefix=f"{key}."):
                    _set_key(tree, sub, sub_value, origin)
            else:
                node[part] = value
            return
        sub_model = _section_model(".".join(parts[: depth + 1]))
        if sub_model is None:
            raise ConfigError(f"config key '{'.'.join(parts[: depth + 1])}' is a value, not a section (from {origin})")
        model = sub_model
        node = node.setdefault(part, {})
