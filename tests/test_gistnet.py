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


# Contextual (hidden-state) level-1 inputs: gistnet.inputs=hidden


def _hidden(base, layers: int = 2):
    return _gistnet(base, inputs="hidden", input_layers=layers).attach(base.model)


def test_hidden_inputs_are_the_residual_stream_after_the_first_layers_of_each_block_read_alone(tmp_path) -> None:
    """Known answer: HF's hidden_states[k] of a forward over each 32-token block on its own (the tiny base has
    2 layers; hidden_states[2] would be after the final norm, so k = 1). Its own base: HF records hidden
    states with hooks it leaves installed."""
    from megacontext.model.base_model import load_base_model
    from megacontext.model.gistnet import level1_reader
    from tests.conftest import tiny_config

    base = load_base_model(tiny_config(tmp_path))

    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(0))  # 2 rows of 3 blocks
    got = level1_reader(_hidden(base, 1), base.model.get_input_embeddings())(ids)
    assert got.shape == (2, 96, 64)
    with torch.no_grad():
        for row in range(2):
            for b in range(3):
                block = ids[row, 32 * b : 32 * (b + 1)][None]
                want = base.model(input_ids=block, output_hidden_states=True).hidden_states[1][0]
                assert torch.allclose(got[row, 32 * b : 32 * (b + 1)], want, atol=1e-5)
    changed = ids.clone()
    changed[0, :32] = (changed[0, :32] + 1) % 256  # another first block: the others' inputs are unchanged
    again = level1_reader(_hidden(base, 1), base.model.get_input_embeddings())(changed)
    assert torch.equal(again[0, 32:], got[0, 32:]) and not torch.allclose(again[0, :32], got[0, :32])
    assert not torch.allclose(got[0, :32], base.model.get_input_embeddings()(ids[0, :32]))  # not the embeddings


def test_untrained_hidden_input_gist_is_the_mean_of_rms_normalised_states_at_token_norm(base) -> None:
    from megacontext.model.gistnet import level1_reader

    net = _hidden(base)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    h = level1_reader(net, None)(ids)  # [4, 32, d]
    g = net(h, 1)
    normalised = h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    cos = torch.nn.functional.cosine_similarity(g, normalised.mean(1), dim=-1)
    assert torch.allclose(cos, torch.ones(4), atol=1e-5)
    assert torch.allclose(g.norm(dim=-1), net.target_norm.expand(4), rtol=1e-4)
    assert {n for n, _ in net.named_parameters()} >= {"input_norm.weight", "input_proj.weight", "input_proj.bias"}
    assert not any(n.startswith("reader") for n, _ in net.named_parameters())  # the base is not GistNet's


def test_hidden_inputs_are_read_with_the_adapters_off_and_outside_gaussian_positions(tmp_path) -> None:
    from megacontext.model.base_model import load_base_model
    from megacontext.model.gaussian_rope import gaussian_positions, install_gaussian_rope
    from megacontext.model.gistnet import level1_reader
    from tests.conftest import tiny_config
    from tests.helpers.lora import live_lora

    cfg = tiny_config(tmp_path)
    base = load_base_model(cfg)
    install_gaussian_rope(base.model)
    net = _gistnet(base, inputs="hidden", input_layers=1).attach(base.model)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(2))
    plain = level1_reader(net, None)(ids)
    peft = live_lora(base, cfg.train.lora, seed=0, b_seed=3)
    peft.requires_grad_(False)  # frozen adapters, as evaluation and the runtime load them: peft's toggle would unfreeze
    grads = {name: p.requires_grad for name, p in peft.named_parameters()}
    assert torch.allclose(level1_reader(net, None)(ids), plain, atol=1e-6)
    with torch.no_grad():  # the adapters are live again afterwards, their requires_grad untouched
        adapted = base.model(input_ids=ids[:1], output_hidden_states=True).hidden_states[1][0]
    assert not torch.allclose(adapted, plain[0], atol=1e-3)
    assert grads == {name: p.requires_grad for name, p in peft.named_parameters()}
    mu, sigma = torch.full((1, 32), 5000.0), torch.full((1, 32), 7.0)
    with peft.disable_adapter(), gaussian_positions(base.model, mu, sigma) as rotary:
        assert torch.allclose(level1_reader(net, None)(ids), plain, atol=1e-6)
        assert rotary._active is not None and torch.equal(rotary._active[0], mu)  # the caller's positions are back


def test_hidden_input_gists_agree_between_tree_live_assembly_and_a_reload(base, tmp_path) -> None:
    import copy

    from megacontext.context.nodes import Node
    from megacontext.context.working_context import assemble_live
    from megacontext.errors import ConfigError
    from megacontext.model.gistnet import load_gistnet, save_gistnet

    net = _hidden(base)
    with torch.no_grad():
        net.input_proj.weight.add_(0.05 * torch.randn(64, 64, generator=torch.Generator().manual_seed(4)))
    embedding = base.model.get_input_embeddings()
    tokens = torch.randint(0, 256, (1024 + 64,), generator=torch.Generator().manual_seed(5))
    entries = [Node(0, 2), Node(1024, 1), Node(1056, 0)]
    with torch.no_grad():
        live = assemble_live(entries, tokens, embedding, net).inputs_embeds[0]  # [3, d]
    enc = TreeGistEncoder(net, embedding, batch=5)
    lod1 = enc.encode_tokens(tokens[:1056].numpy().reshape(33, 32).astype(np.uint32))
    lod2 = enc.encode_gists(lod1[None, :32], level=2)
    assert np.allclose(live[0].numpy(), lod2[0], atol=1e-5) and np.allclose(live[1].numpy(), lod1[32], atol=1e-5)
    assert torch.allclose(enc.encode_block(tokens[1024:1056]), live[1], atol=1e-5)
    save_gistnet(tmp_path, net)
    with pytest.raises(ConfigError, match="attach it to the base model"):
        TreeGistEncoder(load_gistnet(tmp_path), embedding)
    reloaded = TreeGistEncoder(load_gistnet(tmp_path, base.model), embedding)
    assert np.allclose(reloaded.encode_tokens(tokens[:64].numpy().reshape(2, 32).astype(np.uint32)), lod1[:2], atol=1e-6)
    assert copy.deepcopy(net).reader is net.reader  # a warm-start copy reads the same base, never a copy of it


def test_hidden_inputs_refuse_a_layer_count_the_base_lacks_and_megaattention(base, tmp_path) -> None:
    from megacontext.errors import ConfigError
    from tests.conftest import tiny_config

    layers = base.model.config.num_hidden_layers
    with pytest.raises(ConfigError, match=f"must be in \\[1, {layers}\\]"):
        _gistnet(base, inputs="hidden", input_layers=layers + 1).attach(base.model)
    with pytest.raises(ConfigError, match="does not combine with MegaAttention"):
        tiny_config(tmp_path, "gistnet.inputs=hidden", "mega.attention=true")


def test_gradients_reach_the_hidden_input_projector_never_the_base(tmp_path) -> None:
    from megacontext.context.nodes import Node
    from megacontext.context.working_context import assemble_live
    from megacontext.model.base_model import load_base_model
    from tests.conftest import tiny_config

    base = load_base_model(tiny_config(tmp_path))
    base.model.requires_grad_(True)  # even a base that would take gradients gets none through the reader
    net = _gistnet(base, inputs="hidden", input_layers=1).attach(base.model)
    tokens = torch.randint(0, 256, (1024 + 32,), generator=torch.Generator().manual_seed(6))
    vectors = assemble_live([Node(0, 2), Node(1024, 1)], tokens, base.model.get_input_embeddings(), net).inputs_embeds
    vectors.pow(2).sum().backward()
    assert net.input_proj.weight.grad is not None and net.input_proj.weight.grad.abs().sum() > 0
    assert net.input_norm.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.model.model.layers.parameters())


def test_embeddings_plus_hidden_reads_both_and_starts_as_exactly_the_static_gist(tmp_path) -> None:
    """inputs=embeddings+hidden: [embeddings ‖ hidden states] per token, the hidden part a zero-initialised
    residual, so the untrained GistNet is the static one (same seed) bit for bit; training moves it."""
    from megacontext.model.base_model import load_base_model
    from megacontext.model.gistnet import level1_reader
    from tests.conftest import tiny_config

    base = load_base_model(tiny_config(tmp_path))
    embedding = base.model.get_input_embeddings()
    both = _gistnet(base, inputs="embeddings+hidden", input_layers=1).attach(base.model)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(7))
    x = level1_reader(both, embedding)(ids)  # [3, 32, 2d]
    with torch.no_grad():
        want = base.model(input_ids=ids[:1], output_hidden_states=True).hidden_states[1][0]
    assert x.shape == (3, 32, 128) and torch.equal(x[..., :64], embedding(ids).detach())
    assert torch.allclose(x[0, :, 64:], want, atol=1e-5)
    static = _gistnet(base)
    assert torch.equal(both(x, 1), static(embedding(ids), 1))
    with pytest.raises(ValueError, match=r"expects \[N, 32, 128\] inputs at level 1"):
        both(embedding(ids), 1)
    opt = torch.optim.Adam(both.parameters(), lr=1e-2)
    target = torch.randn(3, 64, generator=torch.Generator().manual_seed(8))
    for _ in range(5):
        loss = 1 - torch.nn.functional.cosine_similarity(both(x, 1), target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert both.input_proj.weight.abs().sum() > 0 and not torch.allclose(both(x, 1), static(embedding(ids), 1))


def test_a_warm_start_gistnet_must_read_the_inputs_the_config_asks_for(tmp_path) -> None:
    from megacontext.errors import ConfigError
    from megacontext.model.base_model import load_base_model
    from megacontext.model.gistnet import save_gistnet
    from megacontext.training.cycle import _gistnet
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path)
    base = load_base_model(cfg)
    previous = tmp_path / "cycle-0001"
    save_gistnet(previous / "jt1" / "final", build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=0))
    assert _gistnet(cfg, base, tmp_path / "cycle-0002", previous).cfg.inputs == "embeddings"
    hidden = tiny_config(tmp_path, "gistnet.inputs=embeddings+hidden", "gistnet.input_layers=1")
    with pytest.raises(ConfigError, match="its GistNet reads gistnet.inputs=embeddings"):
        _gistnet(hidden, base, tmp_path / "cycle-0002", previous)
    save_gistnet(previous / "jt1" / "final", build_gistnet(hidden.gistnet, base.model.get_input_embeddings(), seed=0))
    assert _gistnet(hidden, base, tmp_path / "cycle-0002", previous).reader is not None
    with pytest.raises(ConfigError, match="input_layers 1"):
        _gistnet(tiny_config(tmp_path, "gistnet.inputs=embeddings+hidden", "gistnet.input_layers=2"), base,
                 tmp_path / "cycle-0002", previous)
