"""MegaAttention inside the frozen base model (docs/architecture.md §2.8), without forking its modeling code.

`install_mega_attention` registers one attention function with transformers'
`AttentionInterface` and marks the attention modules chosen by name
(`model.layers.{i}.self_attn`, all by default). Outside a `mega_context` every
module runs plain SDPA, exactly as before; inside one, the marked modules run
MegaAttention over the `[leaves | wLOD1 | wLOD2]` layout with the chosen kernel.

`mega_forward` builds that sequence for a working context: the WC entries are
the leaves; GistNet summarises each aligned run of 32 leaves (wLOD1) and each
run of 32 wLOD1 summaries (wLOD2, two-stage); each summary's Gaussian-RoPE
position is the moment-matched mixture of its children (μ = mean μ,
σ² = mean σ² + var μ). The logits of the leaves are returned.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from megacontext.model.base_model import BaseLM
from megacontext.model.gaussian_rope import gaussian_positions, install_gaussian_rope
from megacontext.mega.attention import MegaLayout, build_mask, layout, mega_attention
from megacontext.context.nodes import BLOCK
from megacontext.context.working_context import WCInputs

IMPLEMENTATION = "megacontext_mega"
ATTENTION_NAME = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn$")


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    state = getattr(module, "_mega_state", None)
    if state is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    lay, window, kernel, mask = state
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if scaling is not None and abs(scaling - query.shape[-1] ** -0.5) > 1e-12:
        query = query * (scaling * query.shape[-1] ** 0.5)  # every kernel scales by 1/sqrt(d)
    out = mega_attention(query, key, value, lay, window, kernel=kernel, mask=mask)  # the mask holds near_causal
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # the plain path's causal mask, as for SDPA


def attention_modules(model: nn.Module, layers: Sequence[int] | None = None) -> dict[str, nn.Module]:
    """The base model's attention modules by name, optionally only those of `layers`."""
    found = {}
    for name, module in model.named_modules():
        match = ATTENTION_NAME.match(name)
        if match and (layers is None or int(match.group(1)) in layers):
            found[name] = module
    if not found:
        raise ValueError(f"no attention module named like 'layers.<i>.self_attn' for layers {layers}")
    return found


def install_mega_attention(model: nn.Module, layers: Sequence[int] | None = None) -> list[str]:
    """Route the model's attention through the MegaAttention function; mark `layers` (default all). Idempotent."""
    modules = attention_modules(model, layers)
    for module in attention_modules(model).values():
        module._mega_selected = False
    for module in modules.values():
        module._mega_selected = True
    model.set_attn_implementation(IMPLEMENTATION)
    return sorted(modules)


@contextmanager
def mega_context(model: nn.Module, lay: MegaLayout, window: int, kernel: str = "sdpa", *,
                 near_causal: bool = False) -> Iterator[None]:
    """Inside: the marked attention modules run MegaAttention over `lay` (one mask built for all layers).
    `near_causal` lets leaves see their own run's summary (≤ 31 later leaves): never for NLL or training
    on next tokens, which it would leak."""
    if model.config._attn_implementation != IMPLEMENTATION:
        raise RuntimeError("MegaAttention is not installed on this model; call install_mega_attention(model) first")
    mask = build_mask(lay, window, kernel, near_causal)
    marked = [m for m in attention_modules(model).values() if getattr(m, "_mega_selected", False)]
    for module in marked:
        module._mega_state = (lay, window, kernel, mask)
    try:
        yield
    finally:
        for module in marked:
            module._mega_state = None


def summaries(gistnet: nn.Module, leaves: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor):
    """wLOD1 and wLOD2 summaries of leaves [n, d] with their (μ, σ): ([n1 + n2, d], [n1 + n2], [n1 + n2])."""
    vectors, mus, sigmas = [], [], []
    x, m, s = leaves, mu, sigma
    for level in (1, 2):
        k = x.shape[0] // BLOCK
        if not k:
            break
        x = gistnet(x[: k * BLOCK].reshape(k, BLOCK, -1).float(), level).to(leaves.dtype)  # [k, d]
        cm, cs = m[: k * BLOCK].reshape(k, BLOCK), s[: k * BLOCK].reshape(k, BLOCK)
        m = cm.mean(1)
        s = (cs.square().mean(1) + cm.var(1, unbiased=False)).sqrt()
        vectors.append(x)
        mus.append(m)
        sigmas.append(s)
    d = leaves.shape[-1]
    if not vectors:
        return leaves.new_zeros(0, d), mu.new_zeros(0), sigma.new_zeros(0)
    return torch.cat(vectors), torch.cat(mus), torch.cat(sigmas)


@contextmanager
def mega_inputs(base: BaseLM, gistnet: nn.Module, inputs: WCInputs, window: int,
                kernel: str = "sdpa") -> Iterator[tuple[MegaLayout, torch.Tensor]]:
    """Inside: `(layout, seq [1, L, d])` — the WC's leaves then their summaries — with the summaries'
    Gaussian-RoPE positions and the MegaAttention mask active for a forward of `seq`."""
    install_gaussian_rope(base.model)
    leaves, mu, sigma = inputs.inputs_embeds[0], inputs.mu[0], inputs.sigma[0]
    s_vec, s_mu, s_sigma = summaries(gistnet, leaves, mu, sigma)
    lay = layout(leaves.shape[0], device=leaves.device)
    positions = torch.cat([mu, s_mu])[None], torch.cat([sigma, s_sigma])[None]
    with gaussian_positions(base.model, *positions), mega_context(base.model, lay, window, kernel):
        yield lay, torch.cat([leaves, s_vec])[None]


def mega_forward(base: BaseLM, gistnet: nn.Module, inputs: WCInputs, window: int, *, kernel: str = "sdpa") -> torch.Tensor:
    """Logits [1, n, V] of the WC's leaves with MegaAttention (`install_mega_attention` first)."""
    with mega_inputs(base, gistnet, inputs, window, kernel) as (lay, seq):
        logits = base.model(inputs_embeds=seq, use_cache=False).logits
    return logits[:, : lay.n]
