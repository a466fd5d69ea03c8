from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from megacontext.config import LensNetConfig
from megacontext.errors import ArtifactError
from megacontext.model.lensnet import (
    build_lensnet,
    collate,
    entry_features,
    legality_mask,
    lens_inputs,
    lensnet_identity,
    lensnet_loss,
    load_lensnet,
    masked_scores,
    pad_batch,
    save_lensnet,
    tail_nodes,
)
from megacontext.context.nodes import Node
from megacontext.context.working_context import WorkingContext, cold_start

D = 64
TINY = LensNetConfig(width=32, heads=2, mlp_hidden=32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add overhead (LayerNorm backward is ~100x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(seed: int = 0, cfg: LensNetConfig = TINY, live_head: bool = True):
    net = build_lensnet(cfg, D, seed=seed)
    if live_head:  # the output layer starts at zero (untrained LensNet proposes nothing); wake it up
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 100)
            torch.nn.init.normal_(net.head[-1].weight, std=0.5)
    return net


def _inputs(n_tokens: int = 3000, seed: int = 0, n_tail: int = 5):
    wc = cold_start(n_tokens, w_max=256, protected_tail=64)
    g = torch.Generator().manual_seed(seed)
    tail = tail_nodes(wc.cursor, n_tail)
    x = lens_inputs(wc.entries, wc.cursor, torch.randn(len(wc), D, generator=g), tail, torch.randn(len(tail), D, generator=g))
    return wc, x


def test_scores_have_one_value_per_entry_in_range_and_untrained_scores_are_zero() -> None:
    (wc_a, a), (wc_b, b) = _inputs(3000, 0), _inputs(900, 1, n_tail=0)
    batch = collate([a, b])
    scores = _net()(batch)
    assert scores.shape == (2, max(len(wc_a), len(wc_b)))
    assert len(wc_a) < len(wc_b) and scores.abs().max() <= 1 and scores[1].abs().min() > 0
    assert torch.all(scores[0, len(wc_a) :] == 0)  # padded entries score exactly 0
    assert torch.all(_net(live_head=False)(batch) == 0)


def test_parameter_counts_stay_small() -> None:
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    default = build_lensnet(LensNetConfig(), 576, seed=0)
    assert 500_000 < count(default) < 5_000_000
    assert count(_net()) < 50_000


def test_same_seed_same_weights() -> None:
    a, b, c = (build_lensnet(TINY, D, seed=s) for s in (0, 0, 1))
    assert lensnet_identity(a) == lensnet_identity(b) != lensnet_identity(c)
    _, x = _inputs()
    assert torch.equal(_net(3)(x), _net(3)(x))
    live = [build_lensnet(TINY, D, seed=s, head_std=0.5) for s in (0, 0, 1)]  # an untrained head that decides
    assert torch.equal(live[0](x), live[1](x)) and live[0](x).abs().min() > 0 and not torch.equal(live[0](x), live[2](x))


def test_scores_depend_on_tail_gists_and_entry_features() -> None:
    net = _net()
    _, x = _inputs()
    base = net(x)
    tail = x.tail.clone()
    tail[0, 1] = torch.randn(D, generator=torch.Generator().manual_seed(9))  # one tail LOD1 gist changes
    assert (net(replace(x, tail=tail)) - base).abs().max() > 1e-3
    feats = x.features.clone()
    feats[0, 3, 1] += 0.5  # entry 3's distance to the cursor changes
    moved = net(replace(x, features=feats))
    assert abs(moved[0, 3] - base[0, 3]) > 1e-5
    assert not torch.allclose(moved[0, 10:], base[0, 10:], atol=1e-6)  # non-causal: others see it via the tail
    no_tail = replace(x, tail=x.tail[:, :0], tail_features=x.tail_features[:, :0],
                      tail_levels=x.tail_levels[:, :0], tail_mask=x.tail_mask[:, :0])  # T = 0: the learned default tail only
    assert torch.isfinite(net(no_tail)).all() and not torch.allclose(net(no_tail), base)


def test_padding_does_not_leak_into_scores() -> None:
    net = _net()
    (wc_a, a), (wc_b, b) = _inputs(3000, 0), _inputs(6000, 1, n_tail=2)
    assert len(wc_a) != len(wc_b) and a.tail.shape[1] != b.tail.shape[1]  # both entries and tail get padded
    batched = net(collate([a, b]))
    for row, (wc, x) in enumerate([(wc_a, a), (wc_b, b)]):
        assert torch.allclose(batched[row, : len(wc)], net(x)[0], atol=1e-5)


def test_entry_features_and_tail_nodes() -> None:
    entries = [Node(0, 2), Node(1024, 1), Node(1056, 0)]
    f = entry_features(entries, cursor=1057)
    assert f.shape == (3, 3)
    assert f[0, 0] > f[1, 0] > f[2, 0] == 0  # log span width
    assert f[0, 1] > f[1, 1] > f[2, 1] == 0  # log distance to the cursor (last entry touches it)
    assert torch.allclose(f[:, 2], torch.tensor([0, 1024 / 1057, 1056 / 1057]))
    assert tail_nodes(2100, 3) == [Node(1024, 2), Node(2048, 1), Node(2016, 1), Node(1984, 1)]
    assert tail_nodes(70, 5) == [Node(32, 1), Node(0, 1)]  # short history: fewer tail gists
    assert tail_nodes(20, 5) == []


def test_legality_on_a_cold_start_working_context() -> None:
    entries = ([Node(s, 2) for s in range(0, 35_840, 1_024)] + [Node(s, 1) for s in range(35_840, 39_936, 32)]
               + [Node(t, 0) for t in range(39_936, 40_000)])
    wc = WorkingContext(entries, 40_000, 256, 64, 2)  # LOD2, then four complete LOD1 runs, then the tail
    wc.check()
    assert wc.levels_used == {2: 35, 1: 128, 0: 64}
    can_expand, can_collapse = legality_mask(wc.entries, 2, wc.cursor, 64)
    levels = torch.tensor([n.level for n in wc.entries])
    assert torch.equal(can_expand, levels > 0)  # tokens cannot expand
    assert not can_collapse[levels == 2].any()  # top-level gists cannot collapse
    assert can_collapse[levels == 1].all()  # four complete aligned LOD1 runs
    assert not can_collapse[levels == 0].any()  # the 64 tokens are the protected tail
    wc.w_max = 512  # room to expand
    wc.expand(36)  # the 2nd LOD1 gist of the run at 35,840 -> 32 tokens: its 31 siblings are no longer complete
    can_expand, can_collapse = legality_mask(wc.entries, 2, wc.cursor, 64)
    assert not can_collapse[35] and not can_collapse[68:98].any()  # lone gists whose sibling is expanded
    assert can_collapse[36:68].all() and can_collapse[98:194].all()  # the new tokens; the untouched runs
    wc.collapse(36)  # what the mask allows, WorkingContext accepts
    with pytest.raises(ValueError):
        wc.collapse(len(wc) - 32)  # ... and what it forbids (protected tail), it refuses


def test_legality_keeps_the_attention_sink_raw() -> None:
    wc = cold_start(4_096, w_max=1_024, protected_tail=256, sink=32)  # [0, 32) raw, 31 LOD1, 2 LOD2, 3 LOD1, tail
    _, free = legality_mask(wc.entries, 2, wc.cursor, 256)
    _, can_collapse = legality_mask(wc.entries, 2, wc.cursor, 256, sink=wc.sink)
    assert free[:32].all() and not can_collapse[:32].any()  # without the sink rule its tokens could collapse
    assert torch.equal(can_collapse[32:], free[32:])  # nothing else changes
    with pytest.raises(ValueError, match="attention sink"):
        wc.collapse(0)  # what the mask forbids, WorkingContext refuses


def test_masked_scores_zero_only_the_illegal_direction() -> None:
    scores = torch.tensor([0.5, -0.5, 0.5, -0.5])
    can_expand = torch.tensor([True, True, False, False])
    can_collapse = torch.tensor([False, True, True, False])
    assert torch.equal(masked_scores(scores, can_expand, can_collapse), torch.tensor([0.5, -0.5, 0.0, 0.0]))


def _loss(scores, targets=None, labelled=None, can_expand=None, can_collapse=None, cfg=TINY, **kw):
    scores = torch.as_tensor(scores, dtype=torch.float32)[None]
    ones = torch.ones_like(scores, dtype=torch.bool)
    targets = torch.zeros_like(scores) if targets is None else torch.as_tensor(targets, dtype=torch.float32)[None]
    labelled = ones if labelled is None else torch.as_tensor(labelled)[None]
    can_expand = ones if can_expand is None else torch.as_tensor(can_expand)[None]
    can_collapse = ones if can_collapse is None else torch.as_tensor(can_collapse)[None]
    return lensnet_loss(scores, targets, labelled, can_expand, can_collapse, cfg, **kw)[1]


def test_each_loss_term_responds_to_what_it_names() -> None:
    targets = [0.8, 0.1, -0.6]
    exact = _loss(targets, targets)
    assert exact["regression"] == pytest.approx(0) and exact["legality"] == 0
    right, wrong = _loss([0.3, 0.0, -0.3], targets), _loss([-0.3, 0.0, 0.3], targets)
    assert right["ranking"] < wrong["ranking"]
    assert _loss([0.5, 0.5, -0.5], targets, labelled=[True, False, False])["ranking"] == 0  # no labelled pairs
    assert _loss([0.4, -0.1, -0.3])["budget"] == pytest.approx(0)  # P == N
    assert _loss([0.4, 0.1, -0.3])["budget"] > 0.01
    assert _loss([0.4, -0.4], can_expand=[True, True], can_collapse=[True, True])["legality"] == 0
    bad = _loss([0.4, -0.4], can_expand=[False, True], can_collapse=[True, False])
    assert bad["legality"] == pytest.approx(0.4)  # (0.4 + 0.4) / 2 entries
    assert _loss([-0.4, 0.4], can_expand=[False, True], can_collapse=[True, False])["legality"] == 0
    parts = _loss([0.4, 0.1, -0.3], targets)
    cfg = TINY
    expected = parts["regression"] + cfg.ranking_weight * parts["ranking"] + cfg.budget_weight * parts["budget"]
    assert parts["total"] == pytest.approx(expected + cfg.legality_weight * parts["legality"])


def test_padded_entries_do_not_affect_the_loss() -> None:
    scores, targets = [0.4, 0.1, -0.3], [0.8, 0.1, -0.6]
    alone = _loss(scores, targets, can_expand=[False, True, True])
    padded = _loss(
        scores + [0.9, -0.9], targets + [-1.0, 1.0], can_expand=[False, True, True, False, False],
        can_collapse=[True] * 3 + [False] * 2, mask=torch.tensor([[True] * 3 + [False] * 2]),
    )  # fmt: skip
    assert padded == pytest.approx(alone)


def test_a_few_adam_steps_learn_the_targets() -> None:
    torch.manual_seed(0)
    u = torch.randn(D)
    items, targets, labelled = [], [], []
    for seed in range(8):
        wc, x = _inputs(3000 + 97 * seed, seed)
        items.append(x)
        targets.append(torch.tanh(x.vectors[0] @ u / 4))  # [N]: a per-entry utility
        labelled.append(x.levels[0] > 0)  # labels exist for the gists (expand candidates)
    batch = collate(items)
    targets, labelled = pad_batch(targets), pad_batch(labelled, False)
    can = pad_batch([torch.ones(len(t), dtype=torch.bool) for t in targets], False)
    net = build_lensnet(TINY, D, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    history = []
    for _ in range(60):
        loss, parts = lensnet_loss(net(batch), targets, labelled, can, can, TINY, mask=batch.mask)
        history.append(parts["regression"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[-1] < 0.5 * history[0]


def test_checkpoint_round_trip_and_tamper_detection(tmp_path: Path) -> None:
    net = _net()
    _, x = _inputs()
    save_lensnet(tmp_path / "ck", net)
    loaded = load_lensnet(tmp_path / "ck")
    assert lensnet_identity(loaded) == lensnet_identity(net) and torch.equal(loaded(x), net(x))
    meta = json.loads((tmp_path / "ck" / "lensnet.json").read_text())
    assert meta["d_model"] == D and meta["config"]["width"] == 32
    bad = _net(seed=1)
    save_lensnet(tmp_path / "bad", bad)
    (tmp_path / "ck" / "lensnet.safetensors").write_bytes((tmp_path / "bad" / "lensnet.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="do not match the recorded identity"):
        load_lensnet(tmp_path / "ck")
    with pytest.raises(ArtifactError, match="not a LensNet checkpoint"):
        load_lensnet(tmp_path / "nothing")


def test_a_checkpoint_from_before_a_config_field_existed_still_loads_and_keeps_its_identity(tmp_path: Path) -> None:
    """Known answer for a real regression: adding `listwise_weight` to LensNetConfig made every earlier
    LensNet checkpoint fail its identity check ("corrupt"), though its weights and recorded config were intact."""
    import hashlib

    from safetensors.torch import save

    net = _net()
    save_lensnet(tmp_path / "old", net)
    meta_path = tmp_path / "old" / "lensnet.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["listwise_weight"]  # what a checkpoint written before the field existed records...
    digest = hashlib.sha256(save({k: v.detach().contiguous() for k, v in net.state_dict().items()}))
    digest.update(net.cfg.model_dump_json(exclude={"listwise_weight"}).encode())  # ...and how it was identified
    meta["identity"] = f"lensnet:{digest.hexdigest()[:16]}"
    meta_path.write_text(json.dumps(meta))
    loaded = load_lensnet(tmp_path / "old")
    assert lensnet_identity(loaded) == meta["identity"] and loaded.cfg.listwise_weight == 0.0
    save_lensnet(tmp_path / "again", loaded)  # re-saved, it records the whole config and is identified by it
    assert lensnet_identity(load_lensnet(tmp_path / "again")) == lensnet_identity(net)
    (tmp_path / "old" / "lensnet.safetensors").write_bytes((tmp_path / "again" / "lensnet.safetensors").read_bytes()[:-8]
                                                           + b"\0" * 8)
    with pytest.raises(ArtifactError):  # tampering is still caught
        load_lensnet(tmp_path / "old")


# --- the question-aware input: the working context's own attention ---------------------------


def test_attention_feature_is_a_log_scale_from_0_to_1() -> None:
    from megacontext.model.lensnet import attention_feature

    p = torch.tensor([0.0, 1 / 2048, 0.5, 1.0, 2.0, -1.0])
    got = attention_feature(p)
    assert got[0] == 0 and got[3] == pytest.approx(1.0) and got[4] == pytest.approx(1.0) and got[5] == 0
    assert 0.15 < got[1] < 0.25 and 0.9 < got[2] < 0.95  # a uniform share of 2,048 entries; an attention sink
    assert torch.all(got[:4].diff() > 0)


def test_lens_inputs_give_tail_gists_the_attention_of_the_entries_inside_their_span() -> None:
    wc = cold_start(3000, w_max=256, protected_tail=64)
    tail = tail_nodes(wc.cursor, 3)
    attention = torch.arange(len(wc), dtype=torch.float32) / 1000
    x = lens_inputs(wc.entries, wc.cursor, torch.zeros(len(wc), D), tail, torch.zeros(len(tail), D), attention)
    assert torch.equal(x.attention[0], attention)
    for k, node in enumerate(tail):  # by hand: the entries whose start lies in [node.start, node.end)
        inside = [i for i, e in enumerate(wc.entries) if node.start <= e.start < node.end]
        assert inside and x.tail_attention[0, k] == pytest.approx(float(attention[inside].sum()))
    plain = lens_inputs(wc.entries, wc.cursor, torch.zeros(len(wc), D), tail, torch.zeros(len(tail), D))
    assert torch.all(plain.attention == 0) and torch.all(plain.tail_attention == 0)
    with pytest.raises(ValueError, match="one value per entry"):
        lens_inputs(wc.entries, wc.cursor, torch.zeros(len(wc), D), tail, torch.zeros(len(tail), D), attention[1:])


def test_a_lensnet_without_the_attention_input_ignores_it_and_one_with_it_reads_it() -> None:
    wc, x = _inputs()
    with_attention = TINY.model_copy(update={"wc_attention_queries": 16})
    plain, aware = _net(), _net(cfg=with_attention)
    # the same seed gives the same other weights: the attention projection is made last
    shared = {k: v for k, v in aware.state_dict().items() if not k.startswith("attention_proj")}
    assert set(shared) == set(plain.state_dict()) and all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items())
    assert plain.attention_proj is None
    peaked = torch.zeros(len(wc))
    peaked[3] = 1.0
    moved = replace(x, attention=peaked[None])
    assert torch.equal(plain(x), plain(moved))
    assert not torch.allclose(aware(x), aware(moved))


def test_wc_attention_is_the_mean_softmax_of_the_last_tail_tokens_over_the_working_context(tmp_path: Path) -> None:
    from megacontext.context.focus_policy import wc_attention
    from megacontext.context.working_context import PositionScheme, assemble_live
    from tests.helpers.attention import eager_tail_attention, tiny_reader

    cfg, model, embedding, gistnet = tiny_reader(tmp_path, "wc.positions=compressed")
    tokens = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0))
    wc = cold_start(3000, w_max=256, protected_tail=64)
    with torch.no_grad():
        inputs = assemble_live(wc.entries, tokens, embedding, gistnet, positions=PositionScheme.of(cfg.wc))
    got = wc_attention(model, inputs, 16)
    assert got.shape == (len(wc),) and got.sum() == pytest.approx(1.0, abs=1e-4)
    assert np.all(got[-15:] > 0) and got[0] > 0  # the queries themselves (causal) and the first gist
    assert np.allclose(got, eager_tail_attention(model, inputs, 16), atol=1e-5)  # [N]: layers, heads, rows


def test_a_policy_with_an_attention_reading_lensnet_needs_the_base_model() -> None:
    from megacontext.config import Config
    from megacontext.context.focus_policy import lens_inputs_for, lens_policy

    net = _net(cfg=TINY.model_copy(update={"wc_attention_queries": 16}))
    with pytest.raises(ValueError, match="needs the base model"):
        lens_policy(Config(), torch.nn.Embedding(8, D), torch.nn.Identity(), net)
    wc = cold_start(3000, w_max=256, protected_tail=64)
    with pytest.raises(ValueError, match="needs the base model"):
        lens_inputs_for(wc, torch.zeros(3000, dtype=torch.long), torch.nn.Embedding(8, D), torch.nn.Identity(), 5, queries=16)


def test_the_attention_input_is_read_with_the_adapters_off(tmp_path: Path) -> None:
    from megacontext.context.focus_policy import lens_inputs_for, wc_attention
    from megacontext.context.working_context import assemble_live
    from megacontext.model.base_model import load_base_model
    from megacontext.model.gistnet import build_gistnet
    from tests.conftest import tiny_config
    from tests.helpers.lora import live_lora

    cfg = tiny_config(tmp_path)
    base = load_base_model(cfg)
    embedding = base.model.get_input_embeddings()
    gistnet = build_gistnet(cfg.gistnet, embedding, seed=0, levels=cfg.wc.levels)
    tokens = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1))
    wc = cold_start(3000, w_max=256, protected_tail=64)
    with torch.no_grad():
        plain_attention = wc_attention(base.model, assemble_live(wc.entries, tokens, embedding, gistnet), 16)
    peft = live_lora(base, cfg.train.lora, seed=0, b_seed=2)
    args = (wc, tokens, embedding, gistnet, 5)
    off = lens_inputs_for(*args, model=base.model, queries=16, plain=peft.disable_adapter).attention[0].numpy()
    on = lens_inputs_for(*args, model=base.model, queries=16).attention[0].numpy()
    assert np.allclose(off, plain_attention, atol=1e-6) and not np.allclose(on, plain_attention, atol=1e-3)


def test_a_warm_start_lensnet_must_read_the_inputs_the_config_asks_for(tmp_path: Path) -> None:
    from megacontext.errors import ConfigError
    from megacontext.model.base_model import load_base_model
    from megacontext.training.cycle import _lensnet
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path)
    base = load_base_model(cfg)
    previous = tmp_path / "cycle-0001"
    save_lensnet(previous / "jt2" / "final", build_lensnet(cfg.lensnet, base.d_model, seed=0))
    assert _lensnet(cfg, base, tmp_path / "cycle-0002", previous).attention_proj is None
    aware = tiny_config(tmp_path, "lensnet.wc_attention_queries=16")
    with pytest.raises(ConfigError, match="wc_attention_queries=0"):
        _lensnet(aware, base, tmp_path / "cycle-0002", previous)
