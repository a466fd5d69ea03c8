from __future__ import annotations

import numpy as np
import pytest
import torch

from megacontext.config import LensNetConfig
from megacontext.context.focus_policy import cold_start_policy
from megacontext.context.nodes import Node
from megacontext.data.corpus import build_corpus
from megacontext.data.shards import build_shards, read_split, shards_dir
from megacontext.data.windows import eligible
from megacontext.lifecycle.lineage import write_manifest
from megacontext.model.base_model import load_base_model
from megacontext.model.gistnet import build_gistnet
from megacontext.model.lensnet import build_lensnet, lensnet_loss
from megacontext.training import teacher
from megacontext.training.jt2_lensnet import JT2LensNet, generate_labels, snapshot_window
from tests.conftest import tiny_config

LOG4 = np.log(4.0)


def _raw(block: int) -> list[Node]:
    return [Node(t, 0) for t in range(32 * block, 32 * block + 32)]


def test_relevance_targets_known_answers() -> None:
    # 10 blocks, the last 2 protected; 8 free blocks, so K = (134 - 64 - 8) // 31 = 2 raw blocks fit. Block 0 is
    # the attention sink (mass 80): it takes no part, so θ = 4, the 2nd largest of blocks 1-7 (1, 1, 2, 16, 1, 0.5, 4)
    mass = np.array([80, 1, 1, 2, 16, 1, 0.5, 4, 9, 9], dtype=np.float64)
    entries = [Node(0, 1), Node(32, 1), *_raw(2), *_raw(3), Node(128, 1), Node(160, 1), Node(192, 1), *_raw(7),
               *_raw(8), *_raw(9)]
    target, labelled = teacher.relevance_targets(entries, 320, 64, 134, mass)
    want = {1: -1.0, 2: -1.0, 34: np.log(2 / 4) / LOG4, 66: 1.0, 67: -1.0, 68: -1.0, 69: 0.0}
    for i, value in want.items():
        assert target[i].item() == pytest.approx(value, abs=1e-6), i
    assert torch.equal(target[2:34], target[2].expand(32)) and torch.equal(target[69:101], target[69].expand(32))
    assert not labelled[0] and target[0] == 0  # the sink's own gist: no label
    assert labelled[1:101].all() and not labelled[101:].any()  # the protected tail has no legal action
    # a gist takes the largest block mass it covers, the sink's aside; a token never asks to expand (target <= 0)
    lod2 = [Node(0, 2), *[Node(t, 0) for t in range(1_024, 1_280)]]
    mass = np.ones(40)
    mass[5] = 10.0
    target, labelled = teacher.relevance_targets(lod2, 1_280, 64, 300, mass)
    assert target[0].item() == 1.0 and target[1].item() == pytest.approx(0.0, abs=1e-6)
    mass[0] = 1_000.0  # a heavier sink changes nothing
    assert torch.equal(teacher.relevance_targets(lod2, 1_280, 64, 300, mass)[0], target)
    mass[5] = 1.0  # without a relevant block the LOD2 gist no longer asks to expand, however heavy its sink
    assert teacher.relevance_targets(lod2, 1_280, 64, 300, mass)[0][0].item() == pytest.approx(0.0, abs=1e-6)
    assert (target <= 1).all() and (target[1:] <= 0).all() and labelled[:1 + 256 - 64].all()
    with pytest.raises(ValueError, match="block masses"):
        teacher.relevance_targets(lod2, 1_280, 64, 300, mass[:30])
    # a 64-token attention sink kept raw: block 1's tokens (mass 16, below no θ) cannot collapse: no label
    sunk = [*_raw(0), *_raw(1), Node(64, 1), Node(96, 1), *[Node(t, 0) for t in range(128, 320)]]
    mass = np.array([80, 0.5, 1, 2, 16, 1, 0.5, 4, 9, 9], dtype=np.float64)
    plain, plain_labelled = teacher.relevance_targets(sunk, 320, 64, 200, mass)
    target, labelled = teacher.relevance_targets(sunk, 320, 64, 200, mass, sink=64)
    assert plain_labelled[32:64].all() and plain[32].item() < 0  # without the sink rule: told to collapse
    assert not labelled[:64].any() and torch.equal(labelled[64:], plain_labelled[64:])
    assert torch.equal(target[64:], plain[64:])


def test_listwise_term_is_the_listnet_cross_entropy_over_labelled_entries() -> None:
    scores = torch.tensor([[0.5, -0.2, 0.9, 0.1]])
    targets = torch.tensor([[1.0, -1.0, 0.0, 0.3]])
    labelled = torch.tensor([[True, True, False, True]])  # entry 2 is unlabelled: it must not count
    legal = torch.ones(1, 4, dtype=torch.bool)
    base_cfg = LensNetConfig(width=32, heads=2, mlp_hidden=32)
    without, parts0 = lensnet_loss(scores, targets, labelled, legal, legal, base_cfg)
    total, parts = lensnet_loss(scores, targets, labelled, legal, legal, base_cfg.model_copy(update={"listwise_weight": 2.0}))
    s, t = np.array([0.5, -0.2, 0.1]), np.array([1.0, -1.0, 0.3])
    p = np.exp(4 * t) / np.exp(4 * t).sum()
    by_hand = -(p * (4 * s - np.log(np.exp(4 * s).sum()))).sum()
    assert parts["listwise"] == pytest.approx(by_hand, rel=1e-5) and "listwise" not in parts0
    assert total.item() == pytest.approx(without.item() + 2.0 * by_hand, rel=1e-5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("teacher"), "data.max_documents=5", "data.val_fraction=0.2",
                      "data.test_fraction=0", "lensnet.listwise_weight=1.0")
    build_corpus(cfg)
    build_shards(cfg)
    return cfg


def test_teacher_cache_reuse_gives_the_same_losses_as_recomputation(corpus, tmp_path, monkeypatch) -> None:
    cfg = corpus
    base = load_base_model(cfg)
    docs = read_split(shards_dir(cfg), "train")
    windows = [snapshot_window(cfg, eligible(docs, cfg.train.history, cfg.train.horizon), i) for i in range(3)]
    built, folder = teacher.teacher_masses(cfg, base, windows)
    assert (folder / "manifest.json").is_file() and len(built) == 3 and built[0].shape == (cfg.train.history // 32,)
    recomputed = [teacher.horizon_block_mass(base, w) for w in windows]
    assert all(np.array_equal(a, b) for a, b in zip(built, recomputed))

    passes = []
    real = teacher.horizon_block_mass
    monkeypatch.setattr(teacher, "horizon_block_mass", lambda b, w: passes.append(w) or real(b, w))
    cached, again = teacher.teacher_masses(cfg, base, windows)
    assert passes == [] and again == folder  # read back, not recomputed
    assert teacher.teacher_masses(cfg, base, windows[:2])[1] != folder and len(passes) == 2  # other windows: own cache

    embedding = base.model.get_input_embeddings()
    gistnet = build_gistnet(cfg.gistnet, embedding, seed=0)
    labels = tmp_path / "labels"
    generate_labels(cfg, base, gistnet, docs, cold_start_policy(cfg), labels)
    write_manifest(labels, kind="lens_labels", format_version=1, config_hash="test")
    losses = []
    for masses in (cached, recomputed):
        lensnet = build_lensnet(cfg.lensnet, base.d_model, seed=0, head_std=0.5)
        phase = JT2LensNet(cfg, base, gistnet, lensnet, docs, cold_start_policy(cfg), labels, masses)
        assert phase.snapshot_ids[-3:] == ["t00000", "t00001", "t00002"]
        loss, metrics = phase.loss(["t00000", "t00001", "t00002", "s00000"], 4)
        losses.append((loss.item(), metrics["listwise"]))
    assert losses[0] == losses[1] and losses[0][1] > 0

    damaged = bytearray((folder / teacher.MASS_FILE).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (folder / teacher.MASS_FILE).write_bytes(bytes(damaged))
    passes.clear()
    rebuilt, _ = teacher.teacher_masses(cfg, base, windows)
    assert len(passes) == 3 and all(np.array_equal(a, b) for a, b in zip(rebuilt, recomputed))


def test_jt2_snapshots_of_an_attention_reading_lensnet_carry_the_working_contexts_attention(corpus, tmp_path) -> None:
    from megacontext.context.focus_policy import wc_attention
    from megacontext.context.working_context import PositionScheme, assemble_live

    cfg = corpus.model_copy(update={"lensnet": corpus.lensnet.model_copy(update={"wc_attention_queries": 16}),
                                    "wc": corpus.wc.model_copy(update={"positions": "compressed"})})
    base = load_base_model(cfg)
    docs = read_split(shards_dir(cfg), "train")
    embedding = base.model.get_input_embeddings()
    gistnet = build_gistnet(cfg.gistnet, embedding, seed=0)
    labels = tmp_path / "labels"
    policy = cold_start_policy(cfg)
    generate_labels(cfg, base, gistnet, docs, policy, labels)
    write_manifest(labels, kind="lens_labels", format_version=1, config_hash="test")
    lensnet = build_lensnet(cfg.lensnet, base.d_model, seed=0, head_std=0.5)
    phase = JT2LensNet(cfg, base, gistnet, lensnet, docs, policy, labels)
    inputs = phase._snapshot("s00000")[0]
    window = snapshot_window(cfg, eligible(docs, cfg.train.history, cfg.train.horizon), 0)
    wc = policy(window)
    tokens = torch.as_tensor(window.tokens.astype(np.int64))
    expected = wc_attention(base.model, assemble_live(wc.entries, tokens, embedding, gistnet, cursor=wc.cursor,
                                                      positions=PositionScheme.of(cfg.wc)), 16)
    assert np.allclose(inputs.attention[0].numpy(), expected) and expected.sum() == pytest.approx(1.0, abs=1e-4)
    loss, _ = phase.loss(["s00000"], 1)
    loss.backward()
    assert lensnet.attention_proj.weight.grad is not None and lensnet.attention_proj.weight.grad.abs().sum() > 0


def test_jt2_snapshots_are_focused_once_by_the_warm_start_never_by_the_lensnet_being_trained(corpus, tmp_path) -> None:
    from megacontext.context.focus_policy import Policy

    cfg = corpus
    base = load_base_model(cfg)
    docs = read_split(shards_dir(cfg), "train")
    gistnet = build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=0)
    labels = tmp_path / "labels"
    generate_labels(cfg, base, gistnet, docs, cold_start_policy(cfg), labels)
    write_manifest(labels, kind="lens_labels", format_version=1, config_hash="test")
    focused = []
    cold = cold_start_policy(cfg)
    policy = Policy(lambda window: (focused.append(window.start) or cold(window), {}))
    lensnet = build_lensnet(cfg.lensnet, base.d_model, seed=0, head_std=0.5)
    phase = JT2LensNet(cfg, base, gistnet, lensnet, docs, policy, labels)
    assert len(focused) == len(phase.snapshot_ids) == 3  # every snapshot, when the phase starts
    optimiser = torch.optim.SGD(lensnet.parameters(), lr=0.1)
    for step in range(3):  # training changes the LensNet the policy of run_jt2 would focus with ...
        loss, _ = phase.loss(phase.make_batch(step, [0, 1]), 2)
        loss.backward()
        optimiser.step()
    assert len(focused) == 3  # ... but no snapshot is focused again: labels keep indexing the WC they were made on


def test_jt2_validation_is_the_loss_on_held_out_teacher_windows(corpus, tmp_path) -> None:
    from megacontext.data.windows import SeedOffset

    cfg = corpus
    base = load_base_model(cfg)
    docs = read_split(shards_dir(cfg), "train")
    usable = eligible(docs, cfg.train.history, cfg.train.horizon)
    heldout = [snapshot_window(cfg, usable, i, SeedOffset.JT2_HELDOUT) for i in range(2)]
    assert {(w.doc_id, w.start) for w in heldout}.isdisjoint({(snapshot_window(cfg, usable, i).doc_id,
                                                              snapshot_window(cfg, usable, i).start) for i in range(6)})
    masses, _ = teacher.teacher_masses(cfg, base, heldout)
    embedding = base.model.get_input_embeddings()
    gistnet = build_gistnet(cfg.gistnet, embedding, seed=0)
    labels = tmp_path / "labels"
    generate_labels(cfg, base, gistnet, docs, cold_start_policy(cfg), labels)
    write_manifest(labels, kind="lens_labels", format_version=1, config_hash="test")
    lensnet = build_lensnet(cfg.lensnet, base.d_model, seed=0, head_std=0.5)
    phase = JT2LensNet(cfg, base, gistnet, lensnet, docs, cold_start_policy(cfg), labels, heldout=masses)
    by_hand = []
    for window, m in zip(heldout, masses):  # the loss of each held-out WC against its teacher targets
        wc = cold_start_policy(cfg)(window)
        inputs = phase._build(window, m)
        target, labelled = teacher.relevance_targets(wc.entries, wc.cursor, wc.protected_tail, wc.w_max, m)
        assert torch.equal(inputs[1], target) and torch.equal(inputs[2], labelled)
        with torch.no_grad():
            by_hand.append(lensnet_loss(lensnet(inputs[0]), target[None], labelled[None], inputs[3][None],
                                        inputs[4][None], cfg.lensnet)[0].item())
    assert phase.validate(2) == pytest.approx(sum(by_hand) / 2)
    assert phase.validate(1) == pytest.approx(by_hand[0])
    with pytest.raises(ValueError, match="held-out teacher windows"):
        phase.validate(3)


def test_the_position_prior_is_the_mean_non_sink_share_per_block_and_debiasing_divides_by_it() -> None:
    a = np.array([6.0, 1.0, 3.0, 0.0])  # non-sink shares 1/4, 3/4, 0
    b = np.array([2.0, 2.0, 1.0, 1.0])  # non-sink shares 1/2, 1/4, 1/4
    prior = teacher.position_prior([a, b])
    floor = 1e-9 * (3 / 8 + 1 / 2 + 1 / 8)
    assert np.allclose(prior, [(6 / 4 + 2 / 4) / 2, 3 / 8, 1 / 2, 1 / 8]) and prior.min() > floor
    assert np.allclose(teacher.debiased(a, prior), [6.0, 1.0 / (3 / 8), 3.0 / (1 / 2), 0.0])  # sink block untouched
    # a window shaped exactly like the prior has the same lift on every block: flat targets (all at theta)
    flat = teacher.debiased(prior * 5.0, prior)
    assert np.allclose(flat[teacher.SINK_BLOCKS:], 5.0)
    assert np.allclose(teacher.position_prior([a, b], leave_out=0), [2 / 4, 2 / 4, 1 / 4, 1 / 4])  # b's shares
    with pytest.raises(ValueError, match="at least one window"):
        teacher.position_prior([a], leave_out=0)
    with pytest.raises(ValueError, match="different lengths"):
        teacher.position_prior([a, b[:3]])
    with pytest.raises(ValueError, match="at least one window"):
        teacher.position_prior([])
    with pytest.raises(ValueError, match="4-block position prior"):
        teacher.debiased(a[:3], prior)


def test_jt2_with_teacher_debias_trains_on_the_debiased_masses(corpus, tmp_path) -> None:
    cfg = corpus
    base = load_base_model(cfg)
    docs = read_split(shards_dir(cfg), "train")
    usable = eligible(docs, cfg.train.history, cfg.train.horizon)
    windows = [snapshot_window(cfg, usable, i) for i in range(3)]
    masses, _ = teacher.teacher_masses(cfg, base, windows)
    gistnet = build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=0)
    labels = tmp_path / "labels"
    generate_labels(cfg, base, gistnet, docs, cold_start_policy(cfg), labels)
    write_manifest(labels, kind="lens_labels", format_version=1, config_hash="test")
    debias = cfg.model_copy(update={"train": cfg.train.model_copy(update={"teacher_debias": True,
                                                                          "teacher_windows": 3})})
    targets = {}
    for name, c in (("plain", cfg), ("debias", debias)):
        lensnet = build_lensnet(c.lensnet, base.d_model, seed=0, head_std=0.5)
        phase = JT2LensNet(c, base, gistnet, lensnet, docs, cold_start_policy(c), labels, masses, heldout=masses[:1])
        targets[name] = phase._snapshot("t00001")[1], phase._heldout[0][1]
    prior = teacher.position_prior(masses)
    wc = cold_start_policy(cfg)(windows[1])
    by_hand, _ = teacher.relevance_targets(wc.entries, wc.cursor, wc.protected_tail, wc.w_max,  # the others' prior
                                           teacher.debiased(masses[1], teacher.position_prior(masses, 1)), wc.sink)
    assert torch.equal(targets["debias"][0], by_hand) and not torch.equal(targets["plain"][0], by_hand)
    from megacontext.data.windows import SeedOffset

    held_wc = cold_start_policy(cfg)(snapshot_window(cfg, usable, 0, SeedOffset.JT2_HELDOUT))
    held, _ = teacher.relevance_targets(held_wc.entries, held_wc.cursor, held_wc.protected_tail, held_wc.w_max,
                                        teacher.debiased(masses[0], prior), held_wc.sink)
    assert torch.equal(targets["debias"][1], held)  # held-out windows use the training windows' prior
