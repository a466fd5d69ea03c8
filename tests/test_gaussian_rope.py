"""Gaussian RoPE (docs/architecture.md §2.7): exact RoPE at σ = 0, the damping formula, a causal mask across μ jumps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from megacontext.model.base_model import load_base_model
from megacontext.config import load_config
from megacontext.errors import ConfigError
from megacontext.model.gaussian_rope import GaussianRotaryEmbedding, gaussian_positions, install_gaussian_rope

T = 24


def tiny_model() -> nn.Module:
    """The tiny random Llama with q/k scaled up so that positions visibly move the logits."""
    model = load_base_model(load_config("tiny", env={})).model
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def token_ids(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 258, (batch, T), generator=torch.Generator().manual_seed(seed))  # [B, T]


def logits(model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits  # [B, T, V]


def gist_sigma(width: int) -> float:
    return width / math.sqrt(12)


def test_sigma_zero_at_arange_reproduces_standard_rope_exactly() -> None:
    model, ids = tiny_model(), token_ids()
    plain = logits(model, input_ids=ids)
    rope = install_gaussian_rope(model)
    assert torch.equal(logits(model, input_ids=ids), plain)  # installed, inactive
    mu = torch.arange(T, dtype=torch.float64).expand(2, T)
    with gaussian_positions(model, mu, torch.zeros_like(mu)):
        assert rope.active
        assert torch.equal(logits(model, input_ids=ids), plain)
    assert not rope.active


def test_sigma_zero_at_an_integer_offset_matches_shifted_position_ids() -> None:
    model, ids = tiny_model(), token_ids()
    c = 40_000
    shifted = logits(model, input_ids=ids, position_ids=torch.arange(T).expand(2, T) + c,
                     attention_mask=torch.ones_like(ids))
    install_gaussian_rope(model)
    mu = torch.arange(T, dtype=torch.float64).expand(2, T) + c
    with gaussian_positions(model, mu, torch.zeros_like(mu)):
        ours = logits(model, input_ids=ids)
    assert torch.equal(ours, shifted)
    # RoPE is relative, so the offset shows only through fp32 rounding at 4e4; exact equality sees it.
    assert not torch.equal(shifted, logits(model, input_ids=ids))


def test_cos_sin_follow_the_damping_formula() -> None:
    rope = install_gaussian_rope(tiny_model())
    gen = torch.Generator().manual_seed(1)
    mu = torch.randint(0, 1_000_000, (3, T), generator=gen).double() + 0.5  # gist centres sit on .5
    sigma = torch.rand(3, T, generator=gen, dtype=torch.float64) * 20
    sigma[:, ::5] = 0.0  # some tokens
    mu[sigma == 0] = mu[sigma == 0].floor()  # tokens sit on integers
    x = torch.zeros(3, T, 64)
    with gaussian_positions(rope, mu, sigma):
        cos, sin = rope(x, position_ids=None)  # [B, T, D]
    omega = rope.original.inv_freq.double().numpy()  # [F]
    angle = mu.numpy()[..., None] * omega  # [B, T, F]
    damp = np.exp(-0.5 * omega**2 * sigma.numpy()[..., None] ** 2)
    want_cos = np.concatenate([np.cos(angle) * damp] * 2, axis=-1)  # [B, T, D]
    want_sin = np.concatenate([np.sin(angle) * damp] * 2, axis=-1)
    gist = (sigma > 0).numpy()
    np.testing.assert_allclose(cos.numpy()[gist], want_cos[gist], atol=1e-6, rtol=0)
    np.testing.assert_allclose(sin.numpy()[gist], want_sin[gist], atol=1e-6, rtol=0)
    std_cos, std_sin = rope.original(x, mu.long())  # tokens: the original module's own numbers
    assert torch.equal(cos[~torch.from_numpy(gist)], std_cos[~torch.from_numpy(gist)])
    assert torch.equal(sin[~torch.from_numpy(gist)], std_sin[~torch.from_numpy(gist)])
    assert cos.shape == (3, T, 16) and cos.dtype == x.dtype


def test_large_sigma_damps_high_frequencies_and_changes_logits() -> None:
    model, ids = tiny_model(), token_ids()
    rope = install_gaussian_rope(model)
    mu = torch.arange(T, dtype=torch.float64).expand(2, T).clone()
    sigma = torch.zeros_like(mu)
    sigma[:, :8] = gist_sigma(32)
    with gaussian_positions(model, mu, sigma):
        cos, _ = rope(torch.zeros(2, T, 64), None)
        damped = logits(model, input_ids=ids)
    assert cos[0, 0, 0].abs() < 1e-12 < 0.99 < cos[0, 0, 7]  # ω = 1 is gone, the slowest ω ≈ 3e-4 is kept
    assert not torch.allclose(damped, logits(model, input_ids=ids), atol=1e-4, rtol=0)

    # A huge σ makes an entry position-less: moving its μ changes nothing; at σ = 0 it does.
    moved = mu.clone()
    moved[:, :4] = torch.tensor([3.0, 0.0, 2.0, 1.0])
    for s, matters in ((1e9, False), (0.0, True)):
        sigma = torch.zeros_like(mu)
        sigma[:, :4] = s
        with gaussian_positions(model, mu, sigma):
            before = logits(model, input_ids=ids)
        with gaussian_positions(model, moved, sigma):
            after = logits(model, input_ids=ids)
        assert torch.equal(before, after) != matters


def test_context_manager_restores_on_exception_and_install_is_idempotent() -> None:
    model, ids = tiny_model(), token_ids()
    plain = logits(model, input_ids=ids)
    rope = install_gaussian_rope(model)
    assert install_gaussian_rope(model) is rope and not isinstance(rope.original, GaussianRotaryEmbedding)
    assert model.model.rotary_emb is rope
    mu = torch.arange(T, dtype=torch.float64).expand(2, T) * 3.5
    with pytest.raises(KeyError), gaussian_positions(model, mu, torch.ones_like(mu)):
        assert rope.active
        raise KeyError("boom")
    assert not rope.active
    assert torch.equal(logits(model, input_ids=ids), plain)


def test_clear_errors_for_bad_use() -> None:
    with pytest.raises(ConfigError, match="rotary"):
        install_gaussian_rope(nn.Linear(2, 2))
    model = tiny_model()
    mu = torch.zeros(1, T, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="install_gaussian_rope"), gaussian_positions(model, mu, mu):
        pass
    install_gaussian_rope(model)
    with pytest.raises(ValueError, match="≥ 0"), gaussian_positions(model, mu, mu - 1):
        pass
    with pytest.raises(ValueError, match="entries"), gaussian_positions(model, mu[:, :5], mu[:, :5]):
        logits(model, input_ids=token_ids())


def test_mu_jumps_keep_a_causal_mask_unlike_jumping_position_ids() -> None:
    model, ids = tiny_model(), token_ids(batch=1)
    mu = torch.cat([torch.arange(8) * 32 + 15.5, 256 + torch.arange(T - 8.0)]).double()[None]  # [1, T]: gists, then tokens
    sigma = torch.where(mu < 256, gist_sigma(32), 0.0)
    early, late = ids.clone(), ids.clone()
    early[0, 3] = (ids[0, 3] + 1) % 258  # before the μ jump at 8
    late[0, 15] = (ids[0, 15] + 1) % 258

    # The pitfall: HF reads jumping position_ids (no mask, no cache) as packed sequences.
    jumping = mu.floor().long()
    packed = logits(model, input_ids=ids, position_ids=jumping)
    assert torch.equal(packed[0, 8:], logits(model, input_ids=early, position_ids=jumping)[0, 8:])

    install_gaussian_rope(model)
    with gaussian_positions(model, mu, sigma):
        base = logits(model, input_ids=ids)
        after_early = logits(model, input_ids=early)
        after_late = logits(model, input_ids=late)
    assert torch.equal(base[0, :3], after_early[0, :3])  # causal: the future never leaks
    assert torch.equal(base[0, :15], after_late[0, :15])
    assert not torch.allclose(base[0, 8:], after_early[0, 8:], atol=1e-4, rtol=0)  # the past is seen across the jump
    assert not torch.allclose(base[0, 15:], after_late[0, 15:], atol=1e-4, rtol=0)


def test_inputs_embeds_match_input_ids() -> None:
    model, ids = tiny_model(), token_ids()
    plain = logits(model, input_ids=ids)
    install_gaussian_rope(model)
    embeds = model.get_input_embeddings()(ids)  # [B, T, d_model]
    zero = torch.arange(T, dtype=torch.float64).expand(2, T)
    with gaussian_positions(model, zero, torch.zeros_like(zero)):
        assert torch.equal(logits(model, inputs_embeds=embeds), plain)
    mu = torch.stack([torch.arange(T) * 32 + 15.5, torch.arange(T) + 7.0]).double()  # rows differ
    sigma = torch.stack([torch.full((T,), gist_sigma(32)), torch.zeros(T)]).double()
    with gaussian_positions(model, mu, sigma):
        from_ids, from_embeds = logits(model, input_ids=ids), logits(model, inputs_embeds=embeds)
    assert torch.equal(from_embeds, from_ids)
    assert not torch.allclose(from_embeds[0], plain[0], atol=1e-4, rtol=0)


def test_per_layer_type_tables_of_gemma3_are_wrapped_too() -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(0))
    plain = logits(model, input_ids=ids)
    rope = install_gaussian_rope(model)
    mu = torch.arange(T, dtype=torch.float64)[None]
    with gaussian_positions(model, mu, torch.zeros_like(mu)):
        assert torch.equal(logits(model, input_ids=ids), plain)
    with gaussian_positions(model, mu, torch.full_like(mu, 4.0)):
        local, _ = rope(torch.zeros(1, T, 32), None, "sliding_attention")  # [1, T, D]
        full, _ = rope(torch.zeros(1, T, 32), None, "full_attention")
        assert not torch.allclose(logits(model, input_ids=ids), plain, atol=1e-4, rtol=0)
    for table, layer_type in ((local, "sliding_attention"), (full, "full_attention")):
        omega = getattr(rope.original, f"{layer_type}_inv_freq").double()  # [F]: each type keeps its own θ
        want = torch.cos(mu[..., None] * omega) * torch.exp(-0.5 * (4.0 * omega) ** 2)  # [1, T, F]
        torch.testing.assert_close(table, torch.cat([want, want], dim=-1).float(), atol=1e-6, rtol=0)
