from __future__ import annotations

import numpy as np
import pytest
import torch

from megacontext.config import GistNetConfig
from megacontext.model.gistnet import TreeGistEncoder, build_gistnet, gistnet_identity


@pytest.fixture
def base(tiny_base):
    return tiny_base


def _gistnet(base, **cfg):
    return build_gistnet(GistNetConfig(width=32, heads=2, **cfg), base.model.get_input_embeddings(), seed=0)


def test_untrained_gist_is_the_mean_direction_at_embedding_scale(base) -> None:
    net = _gistnet(base)
    emb = base.model.get_input_embeddings()
    x = emb(torch.randint(0, 256, (5, 32)))  # [N, 32, d]
    g = net(x, level=1)
    mean = x.mean(1)
    cos = torch.nn.functional.cosine_similarity(g, mean, dim=-1)
    assert torch.allclose(cos, torch.ones(5), atol=1e-5)
    token_norm = emb.weight.norm(dim=-1).pow(2).mean().sqrt()
    assert torch.allclose(g.norm(dim=-1), torch.full((5,), token_norm.item()), rtol=1e-4)
    assert mean.norm(dim=-1).max() < 0.6 * token_norm  # the plain mean would be too small


def test_gist_scale_is_measured_on_what_a_scaling_embedding_returns() -> None:
    """Known answer: Gemma 3 multiplies its embedding rows by sqrt(d) inside the module (bug: the scale was
    read from the weight, so Gemma's gists were sqrt(640) ~ 25x smaller than its tokens)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    d = 16
    emb = Gemma3TextScaledWordEmbedding(40, d, padding_idx=0, embed_scale=d**0.5)
    with torch.no_grad():
        emb.weight.fill_(0.5)  # every row: norm 0.5 * 4 = 2 in the weight, 2 * 4 = 8 out of the module
    net = build_gistnet(GistNetConfig(width=32, heads=2), emb, seed=0)
    assert net.target_norm.item() == pytest.approx(8.0)
    g = net(emb(torch.randint(0, 40, (3, 32))), level=1)
    assert torch.allclose(g.norm(dim=-1), torch.full((3,), 8.0), rtol=1e-5)


def test_same_seed_same_weights_and_identity_tracks_weights(base) -> None:
    a, b = _gistnet(base), _gistnet(base)
    assert gistnet_identity(a) == gistnet_identity(b)
    with torch.no_grad():
        b.bodies[0].out_proj.weight[0, 0] += 1e-3
    assert gistnet_identity(a) != gistnet_identity(b)


def test_training_moves_the_output_away_from_the_mean(base) -> None:
    net = _gistnet(base)
    x = base.model.get_input_embeddings()(torch.randint(0, 256, (4, 32))).detach()
    target = torch.randn(4, x.shape[-1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = 1 - torch.nn.functional.cosine_similarity(net(x, 1), target).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.1


def test_levels_share_or_separate_weights_by_config(base) -> None:
    shared, separate = _gistnet(base), _gistnet(base, level_weights="separate")
    assert len(shared.bodies) == 1 and len(separate.bodies) == 2
    x = torch.randn(2, 32, shared.d_model)
    body = sum(p.numel() for p in shared.bodies[0].parameters())
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(separate) - count(shared) == body
    with pytest.raises(ValueError, match=r"expects \[N, 32, 64\]"):
        shared(torch.randn(2, 31, 64), 1)
    with pytest.raises(ValueError, match="level must be in"):
        shared(x, 3)


def test_tree_encoder_matches_gistnet_over_embeddings(base) -> None:
    net = _gistnet(base)
    enc = TreeGistEncoder(net, base.model.get_input_embeddings(), batch=3)
    blocks = np.random.default_rng(0).integers(0, 256, (7, 32)).astype(np.uint32)
    lod1 = enc.encode_tokens(blocks)
    with torch.no_grad():
        direct = net(base.model.get_input_embeddings()(torch.as_tensor(blocks.astype(np.int64))), 1).numpy()
    assert lod1.shape == (7, 64) and np.allclose(lod1, direct, atol=1e-6)
    lod2 = enc.encode_gists(np.stack([np.resize(lod1, (32, 64))] * 2), level=2)
    assert lod2.shape == (2, 64) and np.allclose(lod2[0], lod2[1])
    assert enc.encode_tokens(np.zeros((0, 32), np.uint32)).shape == (0, 64)
    assert enc.identity == gistnet_identity(net)


def test_checkpoint_round_trip_and_tamper_detection(base, tmp_path) -> None:
    from megacontext.errors import ArtifactError
    from megacontext.model.gistnet import load_gistnet, save_gistnet

    net = _gistnet(base, level_weights="separate")
    with torch.no_grad():
        net.bodies[1].out_proj.weight.normal_()
    save_gistnet(tmp_path, net)
    loaded = load_gistnet(tmp_path)
    x = torch.randn(3, 32, 64)
    assert torch.equal(loaded(x, 2), net(x, 2)) and gistnet_identity(loaded) == gistnet_identity(net)
    meta = (tmp_path / "gistnet.json").read_text().replace(gistnet_identity(net)[-4:], "beef")
    (tmp_path / "gistnet.json").write_text(meta)
    with pytest.raises(ArtifactError, match="do not match the recorded identity"):
        load_gistnet(tmp_path)
