"""Pinned numbers: each learned module and loss, on the tiny profile with fixed seeds, gives the numbers it
gave when they were recorded. A silent numeric change (a refactor that reorders a reduction, a changed
initialisation, another seed stream) fails here; an intended one updates the pin in the same commit.

The pins were recorded on CPU, float32, torch 2.13; tolerances are relative 1e-5, except for the JT1
KL: it is a sum of p·(log p − log q) over log-probs of magnitude ~5, so its float32 resolution is absolute
(~1e-7), not relative to its small value (6.0e-4). CPUs with other vector units (AVX2 vs AVX-512/AMX) move
it by 4e-8 (7e-5 relative); it is pinned to 1e-6 absolute (0.2 % of its value, 25x that spread).

Re-pinned when the attention sink (`wc.sink_tokens` 32) became the default: the cold start under the LensNet,
JT1 and JT3 numbers changed; with `wc.sink_tokens=0` every earlier pin is reproduced exactly (`PINS_NO_SINK`,
tested: the sink is the only thing that moved them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megacontext.model.base_model import horizon_nll, load_base_model
from megacontext.config import Config
from megacontext.context.focus_policy import lens_inputs_for
from megacontext.model.gistnet import build_gistnet
from megacontext.model.lensnet import build_lensnet
from megacontext.data.shards import read_split, shards_dir
from megacontext.context.working_context import cold_start
from tests.conftest import eval_corpus

PINS = {
    "base_horizon_nll": 11.174969673156738,
    "gistnet_lod1_sum": 0.15907391905784607,
    "gistnet_lod1_abs_sum": 4.131091594696045,
    "gistnet_lod2_abs_sum": 1.019788146018982,
    "lensnet_scores_sum": -42.9144172668457,
    "lensnet_scores_abs_sum": 111.87271118164062,
    "jt1_loss": 0.0005988053744658828,
    "jt3_loss": 5.377036094665527,
}
# The pins of the modules the sink touches, as recorded before it existed (wc.sink_tokens 0)
PINS_NO_SINK = PINS | {
    "lensnet_scores_sum": -45.984622955322266,
    "lensnet_scores_abs_sum": 111.47698211669922,
    "jt1_loss": 0.0005516099045053124,
    "jt3_loss": 5.374936103820801,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Config:
    return eval_corpus(tmp_path_factory.mktemp("pinned"))


def measure(cfg: Config) -> dict[str, float]:
    torch.manual_seed(0)
    base = load_base_model(cfg)
    embedding = base.model.get_input_embeddings()
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (2, 96)).astype(np.int64))
    out = {"base_horizon_nll": horizon_nll(base.model, ids, 32).sum().item()}
    gistnet = build_gistnet(cfg.gistnet, embedding, seed=0)
    with torch.no_grad():
        lod1 = gistnet(embedding(ids[:, :64].reshape(4, 32)), 1)  # [4, d]
        lod2 = gistnet(lod1[None].expand(8, 4, -1).reshape(1, 32, -1), 2)
    out |= {"gistnet_lod1_sum": lod1.sum().item(), "gistnet_lod1_abs_sum": lod1.abs().sum().item(),
            "gistnet_lod2_abs_sum": lod2.abs().sum().item()}
    doc = read_split(shards_dir(cfg), "val")[0]
    tokens = torch.as_tensor(doc.tokens[:1024].astype(np.int64))
    wc = cold_start(1024, cfg.wc.w_max, cfg.wc.protected_tail, cfg.wc.levels, cfg.wc.sink_tokens)
    lensnet = build_lensnet(cfg.lensnet, base.d_model, seed=0, head_std=0.5)
    with torch.no_grad():
        scores = lensnet(lens_inputs_for(wc, tokens, embedding, gistnet, cfg.lensnet.tail_lod1))
    out |= {"lensnet_scores_sum": scores.sum().item(), "lensnet_scores_abs_sum": scores.abs().sum().item()}
    from megacontext.training.jt1_gistnet import JT1GistNet
    from megacontext.training.jt3_lora import JT3LoRA

    docs = read_split(shards_dir(cfg), "val")
    jt1 = JT1GistNet(cfg, base, build_gistnet(cfg.gistnet, embedding, seed=0), docs)
    out["jt1_loss"] = jt1.loss(jt1.make_batch(0, [0, 1]), 2)[0].item()
    jt3 = JT3LoRA(cfg, base, build_gistnet(cfg.gistnet, embedding, seed=0), docs)
    out["jt3_loss"] = jt3.loss(jt3.make_batch(0, [0, 1]), 2)[0].item()
    return out


@pytest.mark.parametrize("sink", [32, 0])
def test_every_learned_module_and_loss_gives_its_pinned_numbers(tiny: Config, sink: int) -> None:
    assert tiny.wc.sink_tokens == 32  # the profile's default: the PINS
    cfg = tiny if sink == 32 else tiny.model_copy(update={"wc": tiny.wc.model_copy(update={"sink_tokens": sink})})
    pins = PINS if sink == 32 else PINS_NO_SINK
    got = measure(cfg)
    assert set(got) == set(pins)
    for name, want in pins.items():
        tolerance = {"abs": 1e-6, "rel": 0.0} if name == "jt1_loss" else {"rel": 1e-5}
        assert got[name] == pytest.approx(want, **tolerance), f"{name}: {got[name]!r} != pinned {want!r}"
