"""A tiny base that reads working contexts (Gaussian RoPE, an untrained GistNet) and the hand-computed
attention of its last query rows: the known answer for `wc_attention` and the gist probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def tiny_reader(root: Path, *overrides: str):
    """(cfg, model, embedding, gistnet): the tiny profile's base with Gaussian RoPE and a seed-0 GistNet."""
    from megacontext.model.base_model import load_base_model
    from megacontext.model.gaussian_rope import install_gaussian_rope
    from megacontext.model.gistnet import build_gistnet
    from tests.conftest import tiny_config

    cfg = tiny_config(root, *overrides)
    model = load_base_model(cfg).model
    install_gaussian_rope(model)
    embedding = model.get_input_embeddings()
    return cfg, model, embedding, build_gistnet(cfg.gistnet, embedding, seed=0, levels=cfg.wc.levels)


def eager_tail_attention(model, inputs, queries: int) -> np.ndarray:
    """[N] eager softmax weights of the last `queries` rows on every entry, mean over layers, heads and rows
    (switches `model` to eager attention)."""
    from megacontext.model.gaussian_rope import gaussian_positions

    model.set_attn_implementation("eager")
    with torch.no_grad(), gaussian_positions(model, inputs.mu, inputs.sigma):
        weights = torch.stack(model(inputs_embeds=inputs.inputs_embeds, output_attentions=True).attentions)[:, 0]
    return weights[:, :, -queries:, :].mean(dim=(0, 1, 2)).numpy()
