from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from megacontext.model.base_model import horizon_token_nll, load_base_model
from megacontext.cli import main
from megacontext.errors import ArtifactError
from megacontext.evaluation.evaluate import evaluate, wc_token_nll, Sample
from megacontext.evaluation.gate import gate
from megacontext.model.gaussian_rope import gaussian_positions, install_gaussian_rope
from megacontext.model.gistnet import TreeGistEncoder, build_gistnet, gistnet_identity
from megacontext.data.shards import read_split, shards_dir
from megacontext.context.tree import MegaContextTree
from megacontext.context.tree_build import load_tree_gistnet
from megacontext.context.working_context import assemble, cold_start
from tests.conftest import EVAL_ARGS, eval_corpus, tiny_config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return eval_corpus(tmp_path_factory.mktemp("eval"))


def test_a_working_context_without_gists_reproduces_the_base_logits_exactly(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    base = load_base_model(cfg)
    embedding = base.model.get_input_embeddings()
    tokens = np.random.default_rng(0).integers(0, 256, 200).astype(np.uint32)
    tree = MegaContextTree.create(tmp_path / "t", base_model_id=base.model_id,
                                  encoder=TreeGistEncoder(build_gistnet(cfg.gistnet, embedding, seed=0), embedding),
                                  gist_dtype="float32")
    tree.append(tokens, TreeGistEncoder(build_gistnet(cfg.gistnet, embedding, seed=0), embedding))
    wc = cold_start(200, w_max=256, protected_tail=64)
    assert wc.levels_used == {0: 200}
    inputs = assemble(wc.entries, tree, embedding)
    plain = base.model(input_ids=torch.as_tensor(tokens.astype(np.int64))[None]).logits
    install_gaussian_rope(base.model)
    with gaussian_positions(base.model, inputs.mu, inputs.sigma):
        through_wc = base.model(inputs_embeds=inputs.inputs_embeds).logits
    assert torch.equal(through_wc, plain)


def test_windows_are_aligned_and_their_cursors_share_one_full_pass(tmp_path: Path) -> None:
    from megacontext.evaluation.references import plan_windows
    from megacontext.data.shards import TokenizedDocument

    cfg = tiny_config(tmp_path, "eval.windows_per_doc=3", "eval.cursors_per_window=3", "eval.cursor_stride=64")
    doc = TokenizedDocument("0" * 16, "x", "val", np.zeros(10_000, np.uint32))
    short = TokenizedDocument("1" * 16, "x", "val", np.zeros(2_000, np.uint32))  # < L + H: no window
    windows = plan_windows([doc, short], cfg)
    assert [w.start for w in windows] == [0, 4_096, 7_168]  # spread over the document, aligned to 1,024
    L, h = cfg.eval.history, cfg.eval.horizon
    for w in windows:
        assert [c - w.start for c in w.cursors] == [L - 128, L - 64, L]  # histories L - j·stride
        assert w.cursors[-1] + h <= 10_000 and w.doc is doc


def test_evaluation_scores_every_sample_and_the_gate_follows_the_numbers(built) -> None:
    cfg = built
    out = evaluate(cfg)
    table = pl.read_parquet(out / "results.parquet")
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    samples = table.select("doc_id", "cursor").unique().height
    assert table.height == samples * cfg.eval.horizon and samples >= 2
    assert manifest["gate_passed"] == gate(summary, delta_nll_max=cfg.eval.delta_nll_max).passed
    all_ = summary["all"]
    assert manifest["gate_passed"] == (all_["delta_nll"]["value"] <= 0.1 and all_["nll_mc"]["value"] < all_["nll_recency"]["value"])
    assert "Gate: **" in (out / "report.md").read_text() and (out / "report.png").stat().st_size > 1_000
    # NLL_full and NLL_recency are exactly the base model's scores on the raw windows
    assert samples == 4 * cfg.eval.cursors_per_window and summary["n_samples"] == samples
    for column in ("nll_oracle", "nll_training_free", "nll_oracle_raw", "nll_training_free_raw"):  # every sample
        assert table[column].null_count() == 0
    assert table["nll_recency_adapted"].null_count() == table.height  # no LoRA without a checkpoint
    assert {"oracle", "training_free", "oracle_raw", "training_free_raw", "mc"} <= set(summary["all"]["methods"])
    assert "training-free focus without gists" in (out / "report.md").read_text()
    assert summary["passkey"]["settings"] and (out / "passkey.png").stat().st_size > 1_000
    passkey = pl.read_parquet(out / "passkey.parquet")
    assert passkey["exact_recency_adapted"].null_count() == passkey.height  # no LoRA: no adapted row
    assert passkey["exact_lod1"].null_count() == 0  # the LOD1-only cold start, every trial
    assert passkey["exact_training_free_raw"].null_count() == 0
    # the untrained system's focus is the cold start: same working context, so the same score
    assert passkey["logp_lod1"].to_list() == passkey["logp_mc"].to_list()
    base = load_base_model(cfg)
    # the shortest history of a window: its first cursor (L - stride)
    first = table.sort("cursor").row(0, named=True)
    doc_id, cursor = first["doc_id"], first["cursor"]
    doc = next(d for d in read_split(shards_dir(cfg), "val") if d.doc_id == doc_id)
    ids = torch.as_tensor(doc.tokens.astype(np.int64))
    h, L, w = cfg.eval.horizon, cfg.eval.history - cfg.eval.cursor_stride, cfg.wc.w_max
    rows = table.filter((pl.col("doc_id") == doc_id) & (pl.col("cursor") == cursor)).sort("t")
    full = horizon_token_nll(base.model, h, input_ids=ids[cursor - L : cursor + h][None])[0].numpy()
    recency = horizon_token_nll(base.model, h, input_ids=ids[cursor - w : cursor + h][None])[0].numpy()
    assert np.allclose(rows["nll_full"].to_numpy(), full, atol=1e-5)
    assert np.allclose(rows["nll_recency"].to_numpy(), recency, atol=1e-5)
    # every cursor of the shared full pass (not only the first) is its own window's score
    from megacontext.context.block_selection import select_blocks
    from megacontext.evaluation.references import focus_tail, load_references, _Tokens
    refs = load_references(cfg, base, build_missing=False)
    for (doc_id, cursor), sample in table.group_by("doc_id", "cursor"):
        start = refs.samples().filter((pl.col("doc_id") == doc_id) & (pl.col("cursor") == cursor))["window_start"][0]
        doc = next(d for d in read_split(shards_dir(cfg), "val") if d.doc_id == doc_id)
        ids = torch.as_tensor(doc.tokens.astype(np.int64))
        want = horizon_token_nll(base.model, h, input_ids=ids[start : cursor + h][None])[0].numpy()
        assert np.allclose(sample.sort("t")["nll_full"].to_numpy(), want, atol=1e-4)
    # the oracle without gists is the base reading exactly the raw tail + the top-mass blocks
    install_gaussian_rope(base.model)
    mass = refs.block_scores(doc_id, cursor, "mass_horizon")
    entries = select_blocks(cursor - start, w, focus_tail(cfg), mass, gists=False)
    assert {e.start // 32 for e in entries if e.start < (cursor - start) - focus_tail(cfg)} >= {int(np.argmax(mass))}
    raw = wc_token_nll(base, entries, _Tokens(doc.tokens), start, doc.tokens[cursor : cursor + h])
    assert np.allclose(sample.sort("t")["nll_oracle_raw"].to_numpy(), raw, atol=1e-4)
    # the training-free row without gists: the raw tail + the blocks the last history tokens attend to most
    tail_mass = refs.block_scores(doc_id, cursor, "mass_tail")
    entries = select_blocks(cursor - start, w, focus_tail(cfg), tail_mass, gists=False)
    assert all(e.level == 0 for e in entries) and len(entries) <= w
    free = wc_token_nll(base, entries, _Tokens(doc.tokens), start, doc.tokens[cursor : cursor + h])
    assert np.allclose(sample.sort("t")["nll_training_free_raw"].to_numpy(), free, atol=1e-4)
    assert rows["nll_mc_lod2"].null_count() == h  # LOD2 alone cannot fit W_max 256 over L 1,984: recorded as null


def test_mc_nll_changes_when_the_gists_change(built, tmp_path: Path) -> None:
    cfg = built
    base = load_base_model(cfg)
    install_gaussian_rope(base.model)
    embedding = base.model.get_input_embeddings()
    doc = read_split(shards_dir(cfg), "val")[0]
    sample = Sample(doc, cfg.eval.history, 0)
    horizon = doc.tokens[sample.cursor : sample.cursor + cfg.eval.horizon]
    wc = cold_start(cfg.eval.history, cfg.wc.w_max, cfg.wc.protected_tail)
    scores = []
    for seed in (0, 1):
        net = build_gistnet(cfg.gistnet, embedding, seed=seed)
        with torch.no_grad():
            net.bodies[0].out_proj.weight.normal_(std=0.5)  # a trained-looking GistNet, different per seed
        tree = MegaContextTree.create(tmp_path / f"s{seed}", base_model_id=base.model_id,
                                      encoder=TreeGistEncoder(net, embedding), gist_dtype="float32")
        tree.append(doc.tokens[: sample.cursor], TreeGistEncoder(net, embedding))
        scores.append(wc_token_nll(base, wc.entries, tree, sample.window_start, horizon))
    assert not np.allclose(scores[0], scores[1])


def test_trees_of_another_base_model_are_refused(built) -> None:
    from megacontext.context.tree_build import trees_dir

    with pytest.raises(ArtifactError, match=r"built with base model tiny-llama-.*, not smollm2-x; rebuild"):
        load_tree_gistnet(trees_dir(built), "smollm2-x")


def test_gate_refuses_a_history_longer_than_the_base_context(built, capsys) -> None:
    args = ["--profile", "tiny", f"paths.artifact_root={built.paths.artifact_root}",
            f"paths.corpus_dir={built.paths.corpus_dir}", *EVAL_ARGS, "model.tiny.max_positions=1024"]
    assert main(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "1024 positions" in err and "\n" not in err.strip()


def test_megaattention_in_the_evaluation_equals_full_attention_when_its_window_covers_everything(built, tmp_path):
    from megacontext.config import MegaConfig
    from megacontext.mega.model import install_mega_attention
    from megacontext.context.tree_build import open_tree, trees_dir

    cfg = built
    base = load_base_model(cfg)
    install_gaussian_rope(base.model)
    gistnet = load_tree_gistnet(trees_dir(cfg), base.model_id)
    doc = read_split(shards_dir(cfg), "val")[0]
    sample = Sample(doc, cfg.eval.history, 0)
    horizon = doc.tokens[sample.cursor : sample.cursor + cfg.eval.horizon]
    tree = open_tree(trees_dir(cfg), "val", doc.doc_id, base_model_id=base.model_id,
                     encoder_identity=gistnet_identity(gistnet))
    wc = cold_start(cfg.eval.history, cfg.wc.w_max, cfg.wc.protected_tail)
    plain = wc_token_nll(base, wc.entries, tree, sample.window_start, horizon)
    install_mega_attention(base.model)
    wide = wc_token_nll(base, wc.entries, tree, sample.window_start, horizon, mega=(gistnet, MegaConfig(attention=True, window=100_000)))
    local = wc_token_nll(base, wc.entries, tree, sample.window_start, horizon, mega=(gistnet, MegaConfig(attention=True, window=64)))
    assert np.allclose(wide, plain, atol=1e-4)
    assert not np.allclose(local, plain, atol=1e-3) and np.isfinite(local).all()
    mega_cfg = tiny_config(Path(cfg.paths.artifact_root).parent, *EVAL_ARGS, "mega.attention=true", "mega.window=64")
    report = evaluate(mega_cfg, out=tmp_path / "mega-eval")
    context = json.loads((report / "manifest.json").read_text())["context"]
    assert context["attention"] == "MegaAttention W=64 (sdpa)"
