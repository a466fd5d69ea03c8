"""MegaPrediction: gist readouts through the tied head, causal readout nodes, targets, loss and schedules."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from megacontext.model.base_model import load_base_model
from megacontext.model.gistnet import build_gistnet
from megacontext.mega.attention import layout
from megacontext.mega.model import install_mega_attention
from megacontext.mega.prediction import (Alphas, level_grad_norms, lod1_readouts, lod2_readout, mega_prediction_loss,
                                         predicted_gist)
from megacontext.context.working_context import WCInputs

H = 96


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("megapred"))
    base = load_base_model(cfg)
    install_mega_attention(base.model)
    gistnet = build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=0, levels=2)
    return base, gistnet


def inputs(base, ids: torch.Tensor) -> WCInputs:
    x = base.model.get_input_embeddings()(ids)[None].detach()
    n = len(ids)
    return WCInputs(x, torch.arange(n, dtype=torch.float64)[None], torch.zeros(1, n, dtype=torch.float64))


def test_a_predicted_gist_is_the_head_distribution_through_the_embedding(setup):
    base, _ = setup
    head, weight = base.model.get_output_embeddings(), base.model.get_input_embeddings().weight
    uniform = predicted_gist(torch.zeros(base.d_model), head, weight)  # no head bias: uniform over the vocabulary
    assert torch.allclose(uniform, weight.mean(0), atol=1e-6)
    sharp = predicted_gist(weight[7] * 1e4, head, weight)  # the head's argmax dominates
    top = int(torch.argmax(head(weight[7] * 1e4)))
    assert torch.allclose(sharp, weight[top], atol=1e-4)


def test_readout_nodes_precede_the_runs_they_predict():
    lay = layout(2_300)
    starts, nodes = lod1_readouts(lay, first=2_300 - H, horizon=H)
    assert starts.tolist() == [2_204, 2_236, 2_268]  # the horizon's whole 32-token blocks
    assert torch.equal(lay.anchor[nodes], starts // 32 * 32 - 1)  # the latest wLOD1 node wholly before each
    assert (lay.level[nodes] == 1).all()
    node = lod2_readout(lay, first=2_300 - H)
    assert lay.level[node] == 2 and lay.end[node] == 2_048


def test_gist_predictions_never_see_the_run_they_predict(setup):
    base, gistnet = setup
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1_150 + H,))
    with torch.no_grad():
        before = mega_prediction_loss(base, gistnet, inputs(base, ids), ids[-H:], window=64)
        changed = ids.clone()
        changed[-32:] = (changed[-32:] + 1) % 256  # the last 32-leaf run of the horizon
        after = mega_prediction_loss(base, gistnet, inputs(base, changed), changed[-H:], window=64)
    assert torch.allclose(before.predictions["lod1"], after.predictions["lod1"], atol=1e-6)
    assert not torch.allclose(before.targets["lod1"][-1], after.targets["lod1"][-1])
    assert before.metrics["nll"] != after.metrics["nll"]


def test_the_loss_is_tok_plus_weighted_gist_terms_on_schedule(setup):
    base, gistnet = setup
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2_100 + H,))
    future = torch.cat([ids[-H:], torch.randint(0, 256, (1_024 - H,))])  # the next 1,024 tokens from the horizon
    out = mega_prediction_loss(base, gistnet, inputs(base, ids), ids[-H:], window=64, progress=0.5, lod2_future=future)
    a1, a2 = Alphas().at(0.5)
    assert (a1, a2) == pytest.approx((0.035, 0.02))
    expected = out.terms["tok"] + a1 * out.terms["lod1"] + a2 * out.terms["lod2"]
    assert torch.allclose(out.loss, expected)
    assert -1 <= out.metrics["lod1_agreement"] <= 1 and -1 <= out.metrics["lod2_agreement"] <= 1
    assert Alphas().at(0) == pytest.approx((0.02, 0.01)) and Alphas().at(2.0) == pytest.approx((0.05, 0.03))
    with pytest.raises(ValueError, match="α1 > α2"):
        Alphas(lod1=(0.01, 0.05), lod2=(0.02, 0.03))
    with pytest.raises(ValueError, match="next 1024 tokens"):
        mega_prediction_loss(base, gistnet, inputs(base, ids), ids[-H:], window=64, lod2_future=future[:10])
    with pytest.raises(ValueError, match="must start at the horizon"):
        mega_prediction_loss(base, gistnet, inputs(base, ids), ids[-H:], window=64, lod2_future=future.roll(1))


def test_the_lod2_prediction_never_sees_the_tokens_it_predicts(setup):
    base, gistnet = setup
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (1_100 + H,))  # 1,100 leaves before the horizon: one wLOD2 node wholly before it
    future = torch.cat([ids[-H:], torch.randint(0, 256, (1_024 - H,))])
    with torch.no_grad():
        before = mega_prediction_loss(base, gistnet, inputs(base, ids), ids[-H:], window=64, lod2_future=future)
        changed, changed_future = ids.clone(), future.clone()
        changed[-H:] = (changed[-H:] + 1) % 256  # the whole horizon: leaves of the input and the target's first tokens
        changed_future[:H] = changed[-H:]
        after = mega_prediction_loss(base, gistnet, inputs(base, changed), changed[-H:], window=64,
                                     lod2_future=changed_future)
    assert torch.allclose(before.predictions["lod2"], after.predictions["lod2"], atol=1e-6)
    assert not torch.allclose(before.targets["lod2"], after.targets["lod2"])
    assert not torch.allclose(before.predictions["lod1"], after.predictions["lod1"])  # later horizon blocks' readouts see it


def test_targets_are_frozen_by_default_and_per_level_grad_norms_are_logged(setup):
    base, gistnet = setup
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (1_150 + H,))
    params = list(gistnet.parameters())
    frozen = mega_prediction_loss(base, gistnet, inputs(base, ids), ids[-H:], window=64)
    assert frozen.targets["lod1"].grad_fn is None
    norms = level_grad_norms(frozen.terms, params)
    assert set(norms) == {"grad_norm_tok", "grad_norm_lod1"} and all(v > 0 for v in norms.values())
    unfrozen = mega_prediction_loss(base, gistnet, inputs(base, ids), ids[-H:], window=64, unfreeze_targets=True)
    assert unfrozen.targets["lod1"].grad_fn is not None
    assert level_grad_norms(unfrozen.terms, params)["grad_norm_lod1"] != pytest.approx(norms["grad_norm_lod1"])


def test_jt3_with_megaprediction_trains_only_lora_and_logs_lod_agreement_per_level(tmp_path):
    from megacontext.config import PhaseConfig
    from megacontext.data.corpus import build_corpus
    from megacontext.training.jt3_lora import JT3LoRA
    from megacontext.data.shards import build_shards, read_split, shards_dir
    from megacontext.training.loop import fit

    cfg = tiny_config(tmp_path, "data.max_documents=4", "data.val_fraction=0", "data.test_fraction=0",
                      "mega.attention=true", "mega.prediction=true", "mega.window=64", "train.jt3.steps=3",
                      "train.history=2048", "train.budget=1088")  # a WC of > 1,024 entries: one wLOD2 node
    build_corpus(cfg)
    build_shards(cfg)
    base = load_base_model(cfg)
    gistnet = build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=0)
    phase = JT3LoRA(cfg, base, gistnet, read_split(shards_dir(cfg), "train"))
    requires_grad = {n for n, p in phase.peft.named_parameters() if p.requires_grad}
    assert requires_grad == set(phase.trainable()) and all("lora_" in n for n in requires_grad)
    window = phase.make_batch(0, [0])[0]  # each window carries the next 1,024 tokens from its horizon start
    doc = next(d for d in phase.docs if d.doc_id == window.doc_id)
    assert window.future.tolist() == doc.tokens[window.start + 2_048 : window.start + 3_072].tolist()
    result = fit(phase, PhaseConfig(steps=3, batch=2, lr=1e-2), tmp_path / "jt3", checkpoint_every=3)
    rows = result.telemetry
    assert all(-1 <= r["lod1_agreement"] <= 1 and r["grad_norm_lod1"] > 0 and r["grad_norm_tok"] > 0 for r in rows)
    assert all(-1 <= r["lod2_agreement"] <= 1 and r["grad_norm_lod2"] > 0 for r in rows)
    assert [round(r["alpha1"], 4) for r in rows] == [0.02, 0.035, 0.05]  # the schedule over the phase
    assert not any(p.requires_grad for p in gistnet.parameters())
