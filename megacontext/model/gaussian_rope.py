"""Gaussian RoPE (docs/architecture.md §2.7): rotary tables for entries at float centres μ with scales σ.
The rotation is RoFormer's RoPE (Su et al. 2021); the damping is its mean over a Gaussian spread of positions.

The base's rotary module (`<decoder>.rotary_emb`) is replaced by name with a wrapper; no modeling
code is forked. μ/σ reach it ONLY through `gaussian_positions(...)`: never pass gist centres as
`position_ids`, because HF (5.x `find_packed_sequence_indices`) reads jumps in `position_ids`
(with no attention mask and no cache) as packed sequences and silently builds a block-diagonal mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from megacontext.errors import ConfigError

# Shapes: B batch, T entries, D head_dim (= 2 * number of rotary frequencies F).


class GaussianRotaryEmbedding(nn.Module):
    """Wraps the base's rotary module; identical to it unless Gaussian positions are active.

    Active: cos' = cos(ωμ)·exp(−½ω²σ²), sin' = sin(ωμ)·exp(−½ω²σ²) per frequency ω, with the angles in
    float64. Entries with σ = 0 take the original module's own (fp32) cos/sin at position μ, so tokens
    get standard RoPE bit for bit. The frequencies (and any rope scaling) are the original's `inv_freq`.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self._active: tuple[torch.Tensor, torch.Tensor] | None = None  # (μ [B, T] float, σ [B, T] float)

    def __getattr__(self, name: str):  # HF code may read attributes of the rotary module (rope_type, config, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("original"), name)

    @property
    def active(self) -> bool:
        return self._active is not None

    def frequencies(self, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
        """The original's inverse frequencies ω [F] (fp32) and its attention scaling."""
        prefix = f"{layer_type}_" if layer_type is not None else ""
        return getattr(self.original, f"{prefix}inv_freq"), getattr(self.original, f"{prefix}attention_scaling")

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        extra = () if layer_type is None else (layer_type,)  # Gemma-3 keeps one table per layer type
        if self._active is None:
            return self.original(x, position_ids, *extra)
        mu, sigma = (t.to(x.device) for t in self._active)  # [B, T] each; position_ids are ignored
        if mu.shape[-1] != x.shape[1]:
            raise ValueError(f"Gaussian positions cover {mu.shape[-1]} entries but the forward has {x.shape[1]}")
        cos_std, sin_std = self.original(x, mu, *extra)  # [B, T, D]: the original's fp32 maths at μ
        inv_freq, scaling = self.frequencies(layer_type)  # read after the call: dynamic rope may update it
        omega = inv_freq.to(device=x.device, dtype=torch.float64)  # [F]
        angle = mu.double()[..., None] * omega  # [B, T, F]
        damp = torch.exp(-0.5 * (sigma.double()[..., None] * omega) ** 2)  # [B, T, F]
        cos = torch.cat([angle.cos() * damp] * 2, dim=-1) * scaling  # [B, T, D], HF layout cat(freqs, freqs)
        sin = torch.cat([angle.sin() * damp] * 2, dim=-1) * scaling
        token = (sigma == 0)[..., None]  # [B, T, 1]
        return torch.where(token, cos_std, cos.to(x.dtype)), torch.where(token, sin_std, sin.to(x.dtype))


def _decoder(model: nn.Module) -> nn.Module:
    """The module that owns `rotary_emb` (the inner decoder of a causal LM, or the model itself)."""
    candidates = [model]
    if hasattr(model, "get_decoder"):
        candidates.insert(0, model.get_decoder())
    candidates.append(getattr(model, "model", None))
    for candidate in candidates:
        if isinstance(candidate, nn.Module) and isinstance(getattr(candidate, "rotary_emb", None), nn.Module):
            return candidate
    raise ConfigError(
        f"base model {type(model).__name__} has no rotary module `rotary_emb` on its decoder; "
        "Gaussian RoPE needs a RoPE base (Llama/Qwen/Gemma-style Hugging Face model)"
    )


def install_gaussian_rope(model: nn.Module) -> GaussianRotaryEmbedding:
    """Replace the model's rotary module by a `GaussianRotaryEmbedding` in place (idempotent); return it."""
    decoder = _decoder(model)
    if not isinstance(decoder.rotary_emb, GaussianRotaryEmbedding):
        decoder.rotary_emb = GaussianRotaryEmbedding(decoder.rotary_emb)
    return decoder.rotary_emb


@contextmanager
def gaussian_positions(
    model_or_module: nn.Module, mu: torch.Tensor, sigma: torch.Tensor
) -> Iterator[GaussianRotaryEmbedding]:
    """Forwards inside the block use centres μ [B, T] and scales σ [B, T] (σ = 0: a token).

    The model must already have `install_gaussian_rope` applied. Call the model WITHOUT `position_ids`
    (see the module docstring); the previous state is restored on exit, exceptions included.
    """
    module = model_or_module
    if not isinstance(module, GaussianRotaryEmbedding):
        module = _decoder(model_or_module).rotary_emb
        if not isinstance(module, GaussianRotaryEmbedding):
            raise RuntimeError("Gaussian RoPE is not installed on this model; call install_gaussian_rope(model) first")
    if mu.dim() != 2 or mu.shape != sigma.shape:
        raise ValueError(f"μ and σ must both be [B, T]; got {tuple(mu.shape)} and {tuple(sigma.shape)}")
    if not (mu.is_floating_point() and sigma.is_floating_point()):
        raise TypeError("μ and σ must be floating-point tensors (float64 keeps .5 centres exact at 1e6)")
    if not bool(torch.isfinite(mu).all() and (sigma >= 0).all() and torch.isfinite(sigma).all()):
        raise ValueError("μ must be finite and σ finite and ≥ 0")
    previous = module._active
    module._active = (mu, sigma)
    try:
        yield module
    finally:
        module._active = previous


@contextmanager
def standard_positions(model_or_module: nn.Module) -> Iterator[None]:
    """Forwards inside the block get the base's own RoPE (`position_ids`), even inside an enclosing
    `gaussian_positions` block, whose positions are restored on exit, exceptions included. A no-op where
    Gaussian RoPE is not installed."""
    module = model_or_module
    if not isinstance(module, GaussianRotaryEmbedding):
        module = _decoder(model_or_module).rotary_emb
    if not isinstance(module, GaussianRotaryEmbedding):
        yield
        return
    previous = module._active
    module._active = None
    try:
        yield
    finally:
        module._active = previous
