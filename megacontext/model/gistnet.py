"""GistNet (docs/architecture.md §2.3): 32 vectors -> 1 gist in the base model's input-embedding space.

A small non-causal transformer at an internal width below d, with slot and level
embeddings and attention pooling by a learned query. The output is a residual on
the mean of the inputs (the residual projection starts at zero, so an untrained
GistNet returns exactly the mean's direction) rescaled to the RMS norm of the
base model's token embeddings, so gists sit at the scale the base expects.
LOD2 is two-stage: GistNet over 32 LOD1 gists. Training lives in the JT1 phase.
Precedents: gist tokens (Mu et al. 2023); pooling by a learned query as in Set Transformer (Lee et al. 2019).

Level 1 reads the base's static token embeddings (`gistnet.inputs=embeddings`, the default), or
its contextual hidden states: the residual stream after the base's first `gistnet.input_layers`
decoder layers, each 32-token block read on its own (`BlockReader`), so a block's gist is a
function of its 32 tokens wherever it is computed (tree, training window, runtime). A trainable
RMSNorm + linear projector carries them into the embedding space: with `hidden` they replace the
embeddings (the projector starts as the identity); with `embeddings+hidden` they are added to
the embeddings as a residual (the projector starts at zero, so an untrained GistNet gives exactly
the static gist). In-context encoders that pool a frozen LM's hidden states are the precedent
(ICAE, Ge et al. 2024; AutoCompressors, Chevalier et al. 2023).

Notation: N blocks, S = 32 slots, d = base width, w = internal width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from megacontext.config import GistNetConfig
from megacontext.errors import ConfigError
from megacontext.model.checkpoints import load_module, module_identity, save_module
from megacontext.context.nodes import BLOCK


class GistBody(nn.Module):
    """One encoder stack: project in, add slot + level embeddings, attend, pool, project out."""

    def __init__(self, cfg: GistNetConfig, d_model: int, levels: int):
        super().__init__()
        w = cfg.width
        self.in_proj = nn.Linear(d_model, w)
        self.slot = nn.Parameter(torch.randn(BLOCK, w) * 0.02)
        self.level = nn.Embedding(levels + 1, w)
        nn.init.normal_(self.level.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(w, cfg.heads, dim_feedforward=4 * w, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.query = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.pool = nn.MultiheadAttention(w, cfg.heads, dropout=0.0, batch_first=True)
        self.out_proj = nn.Linear(w, d_model)
        nn.init.zeros_(self.out_proj.weight)  # residual starts at zero: untrained gist = mean direction
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        h = self.in_proj(x) + self.slot + self.level.weight[level]  # [N, S, w]
        h = self.encoder(h)  # [N, S, w], non-causal
        pooled, _ = self.pool(self.query.expand(x.shape[0], -1, -1), h, h, need_weights=False)  # [N, 1, w]
        return self.out_proj(pooled[:, 0])  # [N, d]


class GistNet(nn.Module):
    def __init__(self, cfg: GistNetConfig, d_model: int, embed_rms: float, levels: int = 2):
        super().__init__()
        self.cfg, self.d_model, self.levels = cfg, d_model, levels
        n_bodies = 1 if cfg.level_weights == "shared" else levels
        self.bodies = nn.ModuleList(GistBody(cfg, d_model, levels) for _ in range(n_bodies))
        self.register_buffer("target_norm", torch.tensor(float(embed_rms) * d_model**0.5))  # typical token-embedding norm
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.reader: BlockReader | None = None  # hidden inputs: the base's first layers (`attach`), not weights of ours
        if cfg.inputs != "embeddings":  # level-1 projector of the hidden states: RMSNorm at token-embedding RMS + linear
            self.input_norm = nn.RMSNorm(d_model, eps=1e-6)
            nn.init.constant_(self.input_norm.weight, float(embed_rms))
            self.input_proj = nn.Linear(d_model, d_model)
            # hidden: the projected states replace the embeddings (identity at initialisation);
            # embeddings+hidden: they are a residual on the embeddings (zero at initialisation: untrained = static)
            (nn.init.eye_ if cfg.inputs == "hidden" else nn.init.zeros_)(self.input_proj.weight)
            nn.init.zeros_(self.input_proj.bias)

    def attach(self, model: nn.Module) -> "GistNet":
        """Give a hidden-input GistNet the base model whose first layers it reads (no-op for embeddings)."""
        if self.cfg.inputs != "embeddings":
            self.reader = BlockReader(model, self.cfg.input_layers, embeddings=self.cfg.inputs == "embeddings+hidden")
        return self

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """x: [N, 32, d] (level 2: level-1 gists) or what `level1_reader` returns for level 1: [N, 32, d]
        token embeddings or hidden states, [N, 32, 2d] embeddings ‖ hidden states -> [N, d]."""
        if not 1 <= level <= self.levels:
            raise ValueError(f"level must be in [1, {self.levels}], got {level}")
        width = 2 * self.d_model if level == 1 and self.cfg.inputs == "embeddings+hidden" else self.d_model
        if x.shape[1:] != (BLOCK, width):
            raise ValueError(f"GistNet expects [N, {BLOCK}, {width}] inputs at level {level}, got {list(x.shape)}")
        if level == 1 and self.cfg.inputs == "hidden":
            x = self.input_proj(self.input_norm(x))  # [N, 32, d]
        elif level == 1 and self.cfg.inputs == "embeddings+hidden":
            x = x[..., : self.d_model] + self.input_proj(self.input_norm(x[..., self.d_model :]))  # [N, 32, d]
        body = self.bodies[0 if len(self.bodies) == 1 else level - 1]
        g = x.mean(dim=1) + body(x, level)  # [N, d]: residual on the mean
        return g * (self.target_norm * self.log_scale.exp() / g.norm(dim=-1, keepdim=True).clamp_min(1e-6))


@torch.no_grad()
def embedding_output_rms(embedding: nn.Module, chunk: int = 16384) -> float:
    """Per-coordinate RMS of what `embedding` returns over its whole vocabulary (a float).

    Measured on the module's output, not its weight: some bases scale inside the
    embedding (Gemma 3 multiplies by sqrt(d)), and gists are fed where its outputs go.
    """
    vocab = embedding.weight.shape[0]
    total, count = 0.0, 0
    for start in range(0, vocab, chunk):
        ids = torch.arange(start, min(start + chunk, vocab), device=embedding.weight.device)
        out = embedding(ids).float()  # [n, d]
        total += out.pow(2).sum().item()
        count += out.numel()
    return (total / count) ** 0.5


def build_gistnet(cfg: GistNetConfig, embedding: nn.Embedding, *, seed: int, levels: int = 2,
                  model: nn.Module | None = None) -> GistNet:
    """A fresh GistNet for this base embedding; same seed -> same weights. `model`: the base model a
    hidden-input GistNet reads (`GistNet.attach`); ignored for embedding inputs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rms = embedding_output_rms(embedding)  # per-coordinate RMS of the token embeddings the base reads
        net = GistNet(cfg, embedding.weight.shape[1], embed_rms=rms, levels=levels)
    return net.attach(model) if model is not None else net


def gistnet_identity(gistnet: GistNet) -> str:
    """Content hash of the weights and config: what trees record as their gist encoder."""
    return module_identity("gistnet", gistnet)


class _Stop(Exception):
    """Raised by `BlockReader`'s hook: the layers after the ones read are never run."""


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Turn every enabled PEFT adapter layer inside `model` off for the block; restore them (and their
    parameters' requires_grad, which peft's toggle rewrites) on exit, exceptions included."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    grads = [[(p, p.requires_grad) for p in m.parameters()] for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, saved in zip(layers, grads):
            m.enable_adapters(True)
            for p, flag in saved:
                p.requires_grad_(flag)


class BlockReader:
    """Contextual level-1 inputs: the base's residual stream after its first `layers` decoder layers.

    Each 32-token block is read on its own (positions 0..31, standard RoPE, causal), with every
    adapter off and without gradients: the base is frozen and the block's hidden states depend on
    its 32 tokens only, so trees, training windows and the runtime compute the same gists. Only
    `layers` layers run (a forward hook stops the decoder after them): the cost per token is
    `layers` / (the base's layer count) of a forward. With `embeddings` it returns the plain token
    embeddings (what the decoder's embedding module gave this forward) and the hidden states side by side.
    Raises ConfigError if the base has fewer layers.
    """

    def __init__(self, model: nn.Module, layers: int, *, embeddings: bool = False):
        from megacontext.model.gaussian_rope import _decoder

        self.model, self.decoder = model, _decoder(model)
        if not 1 <= layers <= len(self.decoder.layers):
            raise ConfigError(f"gistnet.input_layers {layers} must be in [1, {len(self.decoder.layers)}] "
                              f"(the base's decoder layers)")
        self.layers, self.embeddings = layers, embeddings

    def __deepcopy__(self, memo: dict) -> "BlockReader":  # a copied GistNet reads the same frozen base
        return self

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [..., 32·m] token ids -> [..., 32·m, d] hidden states (fp32), block by block; with
        `embeddings`, [..., 32·m, 2d]: embeddings ‖ hidden states."""
        if ids.shape[-1] % BLOCK:
            raise ValueError(f"BlockReader reads whole {BLOCK}-token blocks; got {ids.shape[-1]} tokens")
        flat = ids.reshape(-1, BLOCK)
        width = self.decoder.config.hidden_size * (2 if self.embeddings else 1)
        if len(flat) == 0:
            return torch.zeros(*ids.shape, width)
        captured: dict[str, torch.Tensor] = {}

        def embedded(module, args, output):
            captured["embeddings"] = output

        def stop(module, args, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output
            raise _Stop

        from megacontext.model.gaussian_rope import standard_positions

        handles = [self.decoder.layers[self.layers - 1].register_forward_hook(stop)]
        if self.embeddings:
            handles.append(self.decoder.embed_tokens.register_forward_hook(embedded))
        try:  # a Gaussian-positions block around us must not reach the blocks
            with standard_positions(self.decoder), adapters_off(self.model):
                self.decoder(input_ids=flat, use_cache=False)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        parts = [captured["embeddings"], captured["hidden"]] if self.embeddings else [captured["hidden"]]
        return torch.cat(parts, dim=-1).float().reshape(*ids.shape, width)


def level1_reader(gistnet: nn.Module, embedding: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What level 1 of `gistnet` (or a DDP wrapper of it) reads from token ids [..., n] -> [..., n, d or 2d]:
    `embedding` for `inputs=embeddings`, the attached `BlockReader` otherwise.
    Raises ConfigError for a hidden-input GistNet that was never `attach`ed to its base model."""
    net = getattr(gistnet, "module", gistnet)
    cfg = getattr(net, "cfg", None)  # benchmarks stand in plain callables for GistNet
    if cfg is None or cfg.inputs == "embeddings":
        return embedding
    if net.reader is None:
        raise ConfigError(f"this GistNet reads the base's hidden states (gistnet.inputs={cfg.inputs}): "
                          "attach it to the base model first (gistnet.attach(base.model))")
    return net.reader


class TreeGistEncoder:
    """Adapts GistNet + the base embedding to the tree's numpy `GistEncoder` protocol."""

    def __init__(self, gistnet: GistNet, embedding: nn.Embedding, batch: int = 256):
        self.gistnet, self.embedding, self.batch = gistnet, embedding, batch
        self.reader = level1_reader(gistnet, embedding)
        self.identity = gistnet_identity(gistnet)
        self.d = gistnet.d_model

    @torch.no_grad()
    def encode_tokens(self, blocks: np.ndarray) -> np.ndarray:
        """[N, 32] token ids -> [N, d] LOD1 gists."""
        ids = torch.as_tensor(blocks.astype(np.int64))
        return self._run(lambda i: self.reader(ids[i : i + self.batch]), len(ids), level=1)

    @torch.no_grad()
    def encode_block(self, ids: torch.Tensor) -> torch.Tensor:
        """[32] token ids -> [d] the LOD1 gist (a tensor, for callers that stay in torch)."""
        return self.gistnet(self.reader(ids[None]).float(), 1)[0]

    @torch.no_grad()
    def encode_gists(self, blocks: np.ndarray, level: int) -> np.ndarray:
        """[N, 32, d] level-(k-1) gists -> [N, d] level-k gists."""
        x = torch.as_tensor(np.asarray(blocks, dtype=np.float32))
        return self._run(lambda i: x[i : i + self.batch], len(x), level=level)

    def _run(self, chunk, n: int, level: int) -> np.ndarray:
        out = [self.gistnet(chunk(i).float(), level) for i in range(0, n, self.batch)]
        return torch.cat(out).cpu().numpy() if out else np.zeros((0, self.d), np.float32)



def save_gistnet(folder: Path, gistnet: GistNet) -> None:
    """Weights as safetensors (never pickles) + the config needed to rebuild the module."""
    save_module(folder, "gistnet", gistnet, {"d_model": gistnet.d_model, "levels": gistnet.levels})


def load_gistnet(folder: Path, model: nn.Module | None = None) -> GistNet:
    """Rebuild a saved GistNet; refuses weights whose hash is not the recorded identity. `model`: as in
    `build_gistnet`."""
    net = load_module(folder, "gistnet", lambda meta: GistNet(GistNetConfig(**meta["config"]), meta["d_model"],
                                                              embed_rms=0.0, levels=meta["levels"]), label="GistNet")
    return net.attach(model) if model is not None else net
