"""MegaAttention: mask semantics (exact coverage, strict causality, W >= n) and kernels vs the SDPA reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megacontext.mega.attention import GROUP, dense_mask, layout, mega_attention, packed_plan


def coverage(n: int, window: int, near_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, n] how many visible keys of each query cover each leaf position, and each query's anchor."""
    lay = layout(n)
    mask = dense_mask(lay, window, near_causal).float()
    pos = torch.arange(n)
    spans = ((lay.start[:, None] <= pos) & (pos < lay.end[:, None])).float()  # [L, n]
    return mask @ spans, lay.anchor


@pytest.mark.parametrize("n,window", [(2_100, 64), (2_100, 100), (3_000, 300), (1_100, 1), (4_200, 2_000)])
def test_every_past_position_is_covered_exactly_once_and_nothing_later(n, window):
    counts, anchor = coverage(n, window)
    past = torch.arange(n)[None, :] <= anchor[:, None]  # [L, n]
    assert torch.equal(counts, past.float())  # once for the past, never the future: strictly causal


def test_the_mask_is_sparse_and_summaries_are_used():
    lay = layout(8_192)
    mask = dense_mask(lay, 256)
    per_query = mask.sum(1).float()
    assert per_query.max() <= 256 + 32 + 32 + 8  # window (+ alignment) + wLOD1 of the 1,024 window + wLOD2
    leaves = torch.arange(lay.n)
    reads_summary = mask[: lay.n, lay.n :].any(dim=1)
    reads_lod2 = mask[: lay.n, lay.n + lay.n1 :].any(dim=1)
    assert reads_summary[leaves >= 256 + 32].all()  # everything older than the window is summarised
    assert reads_lod2[leaves >= 1_024 + 256 + 32].all()


def test_near_causal_adds_exactly_the_own_run_summary():
    n = 2_048
    lay = layout(n)
    strict, near = dense_mask(lay, 64), dense_mask(lay, 64, near_causal=True)
    extra = near & ~strict
    rows, cols = extra.nonzero(as_tuple=True)
    assert (rows < n).all() and (lay.level[cols] == 1).all()
    assert torch.equal(lay.start[cols] // 32, rows // 32)  # the leaf's own run (includes future leaves)
    counts, anchor = coverage(n, 64, near_causal=True)
    assert (counts[torch.arange(n), torch.arange(n) // 32 * 32 + 31] >= 1).all()  # sees (a summary of) its run's end


def test_with_window_at_least_n_leaves_get_full_causal_attention():
    torch.manual_seed(0)
    n = 2_100
    lay = layout(n)
    q, k, v = (torch.randn(1, 2, lay.length, 32) for _ in range(3))
    out = mega_attention(q, k, v, lay, window=n)
    ref = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], is_causal=True)
    assert torch.allclose(out[:, :, :n], ref, atol=1e-5)


def test_sdpa_with_the_dense_mask_matches_explicit_attention_forward_and_backward():
    torch.manual_seed(1)
    lay = layout(1_100)
    mask = dense_mask(lay, 96)
    q, k, v = (torch.randn(1, 2, lay.length, 16, requires_grad=True) for _ in range(3))
    out = mega_attention(q, k, v, lay, window=96)
    scores = (q @ k.transpose(-1, -2)) / 16 ** 0.5
    ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
    assert torch.allclose(out, ref, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4)


@pytest.mark.parametrize("window", [256, 4_096])
def test_flex_attention_equals_the_sdpa_reference(window):
    torch.manual_seed(2)
    lay = layout(2_048 + 64)
    q, k, v = (torch.randn(1, 2, lay.length, 32) for _ in range(3))
    flex = mega_attention(q, k, v, lay, window, kernel="flex")
    ref = mega_attention(q, k, v, lay, window, kernel="sdpa")
    assert torch.allclose(flex, ref, atol=1e-4)


@pytest.mark.parametrize("n, window, near_causal", [(100, 64, False), (1_100, 96, False), (2_112, 256, False),
                                                     (3_000, 100, True), (2_080, 4_096, False)])
def test_packed_attention_equals_the_sdpa_reference_forward_and_backward(n, window, near_causal):
    torch.manual_seed(3)
    lay = layout(n)
    q, k, v = (torch.randn(1, 2, lay.length, 16, requires_grad=True) for _ in range(3))
    packed = mega_attention(q, k, v, lay, window, kernel="packed", near_causal=near_causal)
    ref = mega_attention(q, k, v, lay, window, kernel="sdpa", near_causal=near_causal)
    assert torch.allclose(packed, ref, atol=1e-5)
    for g, r in zip(torch.autograd.grad(packed.square().sum(), (q, k, v)), torch.autograd.grad(ref.square().sum(), (q, k, v))):
        assert torch.allclose(g, r, atol=1e-4)
    if window >= n:  # the leaves get exactly full causal attention
        causal = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], is_causal=True)
        assert torch.allclose(packed[:, :, :n], causal, atol=1e-5)


@pytest.mark.parametrize("n, window, group", [(1_100, 96, GROUP), (5_000, 256, GROUP), (4_100, 64, 32),
                                              (3_000, 300, 1_024)])
def test_the_packed_slices_hold_exactly_the_visible_pairs_in_o_of_n_keys(n, window, group):
    lay = layout(n)
    plan = packed_plan(lay, window, group=group)
    assert sorted(plan.q_index.flatten()[plan.inverse].tolist()) == list(range(lay.length))  # each query once
    nq = plan.q_index.shape[1]
    slots = plan.inverse.tolist()  # the flat (block, query) slots that hold real queries; the rest is padding
    pairs = [(plan.q_index.flatten()[s].item(), k) for s in slots
             for k in plan.k_index[s // nq][plan.mask[s // nq, s % nq]].tolist()]
    rows, cols = dense_mask(lay, window).nonzero(as_tuple=True)
    assert len(pairs) == len(set(pairs)) and set(pairs) == set(zip(rows.tolist(), cols.tolist()))
    assert plan.k_index.shape[1] <= window + group + 2 * 32 + group // 32 + n // 1_024  # keys per slice: O(W + N/1,024)


def test_unknown_kernel_and_shape_mismatch_are_refused():
    lay = layout(64)
    x = torch.randn(1, 1, lay.length, 8)
    with pytest.raises(ValueError, match="unknown kernel"):
        mega_attention(x, x, x, lay, 32, kernel="triton")
    with pytest.raises(ValueError, match="positions"):
        mega_attention(x[:, :, :10], x, x, lay, 32)


# --- inside the frozen base model -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import tiny_config
    from megacontext.model.base_model import load_base_model
    from megacontext.model.gistnet import build_gistnet
    from megacontext.model.gaussian_rope import install_gaussian_rope

    cfg = tiny_config(tmp_path_factory.mktemp("mega"))
    base = load_base_model(cfg)
    install_gaussian_rope(base.model)
    gistnet = build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=0, levels=2)
    torch.manual_seed(0)
    n = 1_100
    x = base.model.get_input_embeddings()(torch.randint(0, 256, (n,)))[None].detach()
    mu = torch.arange(n, dtype=torch.float64)[None] + 0.5 * (torch.rand(1, n, dtype=torch.float64) > 0.9)
    sigma = torch.where(torch.rand(1, n) > 0.9, 9.2, 0.0).to(torch.float64)  # some leaves are gists
    return base, gistnet, x, mu, sigma


def plain_logits(base, x, mu, sigma):
    from megacontext.model.gaussian_rope import gaussian_positions

    with torch.no_grad(), gaussian_positions(base.model, mu, sigma):
        return base.model(inputs_embeds=x).logits


def test_in_the_base_model_a_window_of_at_least_n_gives_the_plain_logits(tiny):
    from megacontext.mega.model import install_mega_attention, mega_forward
    from megacontext.context.working_context import WCInputs

    base, gistnet, x, mu, sigma = tiny
    plain = plain_logits(base, x, mu, sigma)
    assert install_mega_attention(base.model) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert torch.equal(plain_logits(base, x, mu, sigma), plain)  # outside a mega context: untouched
    with torch.no_grad():
        full = mega_forward(base, gistnet, WCInputs(x, mu, sigma), window=x.shape[1])
        local = mega_forward(base, gistnet, WCInputs(x, mu, sigma), window=64)
    assert torch.allclose(full, plain, atol=1e-5)
    assert not torch.allclose(local, plain, atol=1e-2) and torch.isfinite(local).all()


def test_only_the_attention_modules_chosen_by_name_run_mega_attention(tiny):
    from megacontext.mega.model import install_mega_attention, mega_forward
    from megacontext.context.working_context import WCInputs

    base, gistnet, x, mu, sigma = tiny
    with torch.no_grad():
        assert install_mega_attention(base.model, layers=[1]) == ["model.layers.1.self_attn"]
        last_only = mega_forward(base, gistnet, WCInputs(x, mu, sigma), window=64)
        install_mega_attention(base.model)
        both = mega_forward(base, gistnet, WCInputs(x, mu, sigma), window=64)
    plain = plain_logits(base, x, mu, sigma)
    assert not torch.allclose(last_only, both, atol=1e-3) and not torch.allclose(last_only, plain, atol=1e-3)
    with pytest.raises(ValueError, match="no attention module"):
        install_mega_attention(base.model, layers=[7])


def test_in_the_base_model_flex_and_packed_equal_sdpa_and_sdpa_and_packed_train_gistnet(tiny):
    from megacontext.mega.model import install_mega_attention, mega_forward
    from megacontext.context.working_context import WCInputs

    base, gistnet, x, mu, sigma = tiny
    install_mega_attention(base.model)
    with torch.no_grad():
        flex = mega_forward(base, gistnet, WCInputs(x, mu, sigma), window=64, kernel="flex")
    sdpa = mega_forward(base, gistnet, WCInputs(x, mu, sigma), window=64)
    assert torch.allclose(flex, sdpa.detach(), atol=1e-4)
    sdpa[0, -1].logsumexp(-1).backward()  # CPU training path: gradients reach GistNet through the summaries
    grads = [p.grad.clone() for p in gistnet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    gistnet.zero_grad()
    packed = mega_forward(base, gistnet, WCInputs(x, mu, sigma), window=64, kernel="packed")
    assert torch.allclose(packed, sdpa.detach(), atol=1e-4)
    packed[0, -1].logsumexp(-1).backward()  # the packed kernel trains GistNet with the same gradients
    packed_grads = [p.grad for p in gistnet.parameters() if p.grad is not None]
    assert len(packed_grads) == len(grads) and all(torch.allclose(a, b, atol=1e-4) for a, b in zip(packed_grads, grads))
    gistnet.zero_grad()
