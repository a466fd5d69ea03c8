"""The streaming runtime, its K/V cache across edits, and `generate` / `inspect` (tiny model, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from megacontext.model.base_model import load_base_model
from megacontext.cli import main
from megacontext.errors import ArtifactError, ConfigError, InputDataError
from megacontext.model.gistnet import build_gistnet, save_gistnet
from megacontext.runtime.kv_cache import WCKVCache
from megacontext.model.lensnet import build_lensnet, save_lensnet
from megacontext.lifecycle.lineage import write_manifest
from megacontext.context.nodes import BLOCK, Node
from megacontext.runtime.streaming import Runtime, load_runtime
from megacontext.context.working_context import check_invariants

from conftest import tiny_config


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def base(cfg):
    return load_base_model(cfg)


def decisive_lensnet(cfg, base, seed: int = 0):
    """An untrained LensNet with a random head, so that it takes decisions."""
    return build_lensnet(cfg.lensnet, base.d_model, seed=seed, head_std=2.0)


def runtime(cfg, base, path: Path, *, lens: bool = True, **kwargs) -> Runtime:
    gistnet = build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=cfg.seed, levels=cfg.wc.levels)
    return Runtime(cfg, base, gistnet, decisive_lensnet(cfg, base) if lens else None, path, **kwargs)


def text_tokens(n: int, seed: int = 0) -> np.ndarray:
    """Real text (the stdlib's json package, bytes = the tiny model's tokens), repeated to length n."""
    import json as json_module

    raw = b"".join(p.read_bytes() for p in sorted(Path(json_module.__file__).parent.glob("*.py")))
    data = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    return np.resize(np.roll(data, seed), n)


def recomputed(base, rt: Runtime) -> torch.Tensor:
    return WCKVCache(base, recompute=True, positions=rt.positions).next_logits(rt.wc.entries, rt.source)


# --- the cache ------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],  # no slow shrinking
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(st.tuples(st.sampled_from(["expand", "collapse", "append", "refocus", "decode"]),
                                  st.integers(0, 10**6)), min_size=1, max_size=10),
       seed=st.integers(0, 3))
def test_cached_logits_equal_full_recompute_after_any_edits(cfg, base, tmp_path_factory, actions, seed):
    rt = runtime(cfg, base, tmp_path_factory.mktemp("tree") / "t")
    rt.feed(text_tokens(2_500, seed))
    assert torch.allclose(rt.next_logits(), recomputed(base, rt), atol=1e-4, rtol=1e-4)
    for action, k in actions:
        wc = rt.wc
        if action == "expand":
            gists = [i for i, n in enumerate(wc.entries) if n.level > 0]
            if gists and len(wc) + BLOCK - 1 <= wc.w_max:
                wc.expand(gists[k % len(gists)])
        elif action == "collapse":
            groups = rt.allocator.collapsible(wc)
            if groups:
                wc.collapse(groups[k % len(groups)][0])
        elif action == "append":
            rt.feed(text_tokens(1 + k % 70, seed + k))
        elif action == "refocus":
            rt.refocus()
        else:
            list(rt.generate(1 + k % 3))
        wc.check(tree_tokens=None)
        before = rt.cache.stats.computed
        cached = rt.next_logits()
        assert torch.allclose(cached, recomputed(base, rt), atol=1e-4, rtol=1e-4), action
        assert rt.cache.stats.computed - before <= len(rt.wc)
    rt.close()


def test_with_compressed_positions_the_cache_equals_recompute_after_edits_that_shift_positions(base, tmp_path):
    cfg = tiny_config(tmp_path, "wc.positions=compressed")
    rt = runtime(cfg, base, tmp_path / "t", lens=False)
    rt.feed(text_tokens(2_500))
    assert rt.positions.kind == "compressed"
    assert torch.allclose(rt.next_logits(), recomputed(base, rt), atol=1e-4, rtol=1e-4)
    last = rt.positions.place(rt.wc.entries)[0][-1].item()
    rt.wc.expand(next(i for i, n in enumerate(rt.wc.entries) if n.level > 0))  # the oldest gist: +31 entries ...
    shifted = rt.positions.place(rt.wc.entries)[0][-1].item()
    assert shifted > last  # ... so every later entry moves right (absolute positions would not move)
    assert torch.allclose(rt.next_logits(), recomputed(base, rt), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(rt.next_logits(), WCKVCache(base, recompute=True).next_logits(rt.wc.entries, rt.source),
                              atol=1e-4, rtol=1e-4)  # the scheme is in effect: absolute positions read differently
    rt.wc.collapse(rt.allocator.collapsible(rt.wc)[0][0])
    rt.feed(text_tokens(40, 1))
    list(rt.generate(2))
    assert torch.allclose(rt.next_logits(), recomputed(base, rt), atol=1e-4, rtol=1e-4)
    rt.close()


def test_a_history_past_the_base_positions_streams_in_range_only_with_compressed_positions(tmp_path):
    short = ("model.tiny.max_positions=2048",)
    absolute = tiny_config(tmp_path / "a", *short)
    base = load_base_model(absolute)
    rt = runtime(absolute, base, tmp_path / "a" / "t", lens=False)
    with pytest.warns(UserWarning, match="past the base model's 2,048 trained positions"):
        rt.feed(text_tokens(6_000))
    rt.close()
    compressed = tiny_config(tmp_path / "c", *short, "wc.positions=compressed")
    rt = runtime(compressed, base, tmp_path / "c" / "t", lens=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no out-of-range warning
        rt.feed(text_tokens(6_000))
        list(rt.generate(4))
    assert rt.positions.place(rt.wc.entries)[2] + compressed.train.horizon < 2_048 and rt.wc.cursor == 6_004
    assert len(rt.wc) <= compressed.wc.w_max
    rt.close()
    with pytest.raises(ConfigError, match="compressed positions of a 256-entry working context reach 1,216"):
        runtime(tiny_config(tmp_path / "x", "model.tiny.max_positions=1024", "wc.positions=compressed",
                            "wc.slot_widths=[1,2,6]"), load_base_model(tiny_config(tmp_path / "x",
                            "model.tiny.max_positions=1024")), tmp_path / "x" / "t")


def test_an_append_runs_only_the_new_entries_and_an_edit_only_its_suffix(cfg, base, tmp_path):
    rt = runtime(cfg, base, tmp_path / "t", lens=False)
    rt.feed(text_tokens(3_000))
    rt.next_logits()
    computed = rt.cache.stats.computed
    rt.feed(text_tokens(5, 1))  # stays inside one refocus interval: no edits
    rt.next_logits()
    assert rt.cache.stats.computed - computed == 5
    rt.wc.collapse(rt.allocator.collapsible(rt.wc)[0][0])  # room for an expand
    rt.next_logits()
    index = next(i for i, n in enumerate(rt.wc.entries) if n.level == 1)
    computed = rt.cache.stats.computed
    rt.wc.expand(index)
    rt.next_logits()
    assert rt.cache.stats.computed - computed == len(rt.wc) - index  # the edited node and everything after it


def test_generation_with_the_cache_equals_generation_with_full_recompute(cfg, base, tmp_path):
    prompt = text_tokens(4_100, 2)
    cached, full = runtime(cfg, base, tmp_path / "a"), runtime(cfg, base, tmp_path / "b", recompute=True)
    cached.feed(prompt)
    full.feed(prompt)
    assert list(cached.generate(70)) == list(full.generate(70))  # crosses two refocus boundaries
    assert cached.wc.entries == full.wc.entries and cached.telemetry.edits > 0
    assert torch.allclose(cached.next_logits(), full.next_logits(), atol=1e-4, rtol=1e-4)
    assert cached.cache.stats.reused > 10 * cached.cache.stats.computed  # and the cache did reuse
    assert full.cache.stats.reused == 0


# --- streaming ------------------------------------------------------------------------------


def test_a_20k_prompt_streams_within_budget_and_refocus_happens(cfg, base, tmp_path):
    rt = runtime(cfg, base, tmp_path / "t", keep_snapshots=True)
    tokens = text_tokens(20_000)
    rng = np.random.default_rng(0)
    done = 0
    while done < len(tokens):  # multi-token appends of every size
        n = int(rng.integers(1, 700))
        rt.feed(tokens[done : done + n])
        done += n
        rt.wc.check(tree_tokens=None)
        assert len(rt.wc) <= rt.wc.w_max
    assert rt.tree.n_tokens == 20_000 and rt.cursor == 20_000
    assert len(rt.snapshots) == 20_000 // cfg.allocator.refocus_every
    for snap in rt.snapshots:  # after every refocus: invariants, and a refocus interval of headroom
        check_invariants(snap.entries, snap.cursor, cfg.wc.w_max, cfg.wc.protected_tail, cfg.wc.levels)
        assert len(snap.entries) <= cfg.wc.w_max - cfg.allocator.refocus_every
    assert rt.telemetry.max_entries <= cfg.wc.w_max
    assert rt.telemetry.edits > 100  # LensNet + allocator did refocus
    expanded_old = [n for s in rt.snapshots for n in s.entries if n.level == 0 and n.end < s.cursor - cfg.wc.w_max]
    assert expanded_old, "only a sliding window of recent tokens was ever at LOD0"
    out = list(rt.generate(40))
    assert len(out) == 40 and len(rt.wc) <= rt.wc.w_max
    assert torch.isfinite(rt.next_logits()).all()
    rt.close()


def test_a_lensnet_that_reads_the_working_contexts_attention_streams_on_its_scores(cfg, base, tmp_path):
    from megacontext.context.focus_policy import wc_attention, wc_lens_inputs
    from megacontext.context.working_context import assemble

    aware = cfg.model_copy(update={"lensnet": cfg.lensnet.model_copy(update={"wc_attention_queries": 16})})
    gistnet = build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=cfg.seed, levels=cfg.wc.levels)
    lensnet = build_lensnet(aware.lensnet, base.d_model, seed=0, head_std=2.0)
    with torch.no_grad():  # make the attention input count (its own generator: the test does not depend on test order)
        lensnet.attention_proj.weight.copy_(torch.randn(lensnet.attention_proj.weight.shape,
                                                        generator=torch.Generator().manual_seed(0)) * 5.0)
    rt = Runtime(aware, base, gistnet, lensnet, tmp_path / "t", keep_snapshots=True)
    rt.feed(text_tokens(3_000))
    assert len(rt.wc) <= rt.wc.w_max and rt.telemetry.edits > 0
    inputs = assemble(rt.wc.entries, rt.source, rt.gist_embedding, positions=rt.positions)
    expected = wc_attention(base.model, inputs, 16)
    assert expected.sum() == pytest.approx(1.0, abs=1e-4)

    def read(nodes):
        return assemble(nodes, rt.source, rt.gist_embedding).inputs_embeds[0]

    with torch.no_grad():
        by_hand = lensnet(wc_lens_inputs(rt.wc, aware.lensnet.tail_lod1, read, lambda: expected))[0].numpy()
        blind = lensnet(wc_lens_inputs(rt.wc, aware.lensnet.tail_lod1, read))[0].numpy()
    assert np.allclose(rt.score(), by_hand, atol=1e-6) and not np.allclose(by_hand, blind)  # it measured this attention
    rt.close()


def test_tail_attention_from_the_cache_equals_a_full_forward_and_leaves_the_cache_as_it_was(cfg, base, tmp_path):
    from megacontext.context.focus_policy import wc_attention
    from megacontext.context.working_context import assemble

    rt = runtime(cfg, base, tmp_path / "t")
    rt.feed(text_tokens(3_000))
    embedding = base.model.get_input_embeddings()
    before = rt.next_logits().clone()
    with torch.no_grad():
        full = wc_attention(base.model, assemble(rt.wc.entries, rt.source, embedding, positions=rt.positions), 24)
    got = rt.cache.tail_attention(rt.wc.entries, rt.source, 24)
    assert len(rt.wc) > 100 and np.allclose(got, full, atol=1e-6) and got.sum() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(recomputed(base, rt), before, atol=1e-4)  # the tail's K/V came back the same
    rt.cache.logits = None  # the next token's logits from the cache as it now is
    assert torch.allclose(rt.next_logits(), before, atol=1e-4)
    with pytest.raises(ValueError, match="cannot crop"):
        WCKVCache(base, recompute=True).tail_attention(rt.wc.entries, rt.source, 24)
    rt.close()


@pytest.mark.parametrize("sink", [0, 32])
def test_without_lensnet_the_past_coarsens_oldest_first_and_recent_tokens_stay_lod0(cfg, base, tmp_path, sink):
    cfg = cfg.model_copy(update={"wc": cfg.wc.model_copy(update={"sink_tokens": sink})})
    rt = runtime(cfg, base, tmp_path / "t", lens=False)
    rt.feed(text_tokens(8_000))
    levels = [n.level for n in rt.wc.entries]
    head = (1024 - sink) // BLOCK if sink else 0  # LOD1 gists fill the rest of the sink's 1,024-span
    assert levels[:sink] == [0] * sink and levels[sink:sink + head] == [1] * head  # the attention sink stays raw
    assert levels[sink + head:] == sorted(levels[sink + head:], reverse=True)  # then LOD2 ... LOD1 ... LOD0
    # every complete old 1,024-span is one LOD2 gist, but the first one when the sink holds part of it
    assert rt.wc.levels_used[2] == 8_000 // 1024 - (sink > 0)
    assert len(rt.wc) > cfg.wc.w_max - cfg.allocator.refocus_every - BLOCK  # the budget is used, not wasted
    assert rt.telemetry.edits == 0 and rt.telemetry.forced_collapses > 0


def test_with_an_attention_sink_the_first_block_stays_raw_through_streaming(cfg, base, tmp_path):
    sunk = cfg.model_copy(update={"wc": cfg.wc.model_copy(update={"sink_tokens": 32})})
    rt = runtime(sunk, base, tmp_path / "t", lens=True)  # a decisive LensNet: it edits, and may ask to collapse
    rt.feed(text_tokens(8_000))
    assert rt.wc.entries[:32] == [Node(t, 0) for t in range(32)] and rt.wc.sink == 32
    assert rt.telemetry.forced_collapses > 0 and len(rt.wc) <= sunk.wc.w_max
    rt.wc.check()
    plain = runtime(cfg.model_copy(update={"wc": cfg.wc.model_copy(update={"sink_tokens": 0})}), base,
                    tmp_path / "p", lens=True)
    plain.feed(text_tokens(8_000))
    assert plain.wc.entries[0].level > 0  # without the sink the first block is summarised like any old one
    rt.close()
    plain.close()


@pytest.mark.parametrize("sink", [0, 32])
def test_room_slack_makes_forced_collapses_rarer_so_decoding_recomputes_less_within_budget(cfg, base, tmp_path,
                                                                                          sink):
    """`allocator.room_slack`: a forced collapse invalidates the K/V after it; freeing 128 more positions at
    once instead of one block's worth means one such recompute per ~160 decoded tokens, not per 32 (tiny profile: W_max 256)."""
    cfg = cfg.model_copy(update={"wc": cfg.wc.model_copy(update={"sink_tokens": sink})})
    slack = cfg.model_copy(update={"allocator": cfg.allocator.model_copy(update={"room_slack": 128})})
    recomputed_entries, events = {}, {}
    for name, c in (("none", cfg), ("slack", slack)):
        rt = runtime(c, base, tmp_path / name, lens=False, keep_snapshots=True)
        rt.feed(text_tokens(6_000))
        rt.next_logits()
        computed, seen = rt.cache.stats.computed, len(rt.snapshots)
        for _ in rt.generate(320, stop_at_eos=False):
            assert len(rt.wc) <= rt.wc.w_max
        recomputed_entries[name] = rt.cache.stats.computed - computed - 320  # beyond one entry per decoded token
        events[name] = sum(any(e.action == "collapse" for e in s.edits) for s in rt.snapshots[seen:])
        rt.wc.check(tree_tokens=None)
        assert (rt.telemetry.slack_collapses > 0) == (name == "slack")
    # a forced collapse at every refocus, or every ~5th; with the sink (and the 31 LOD1 gists of its 1,024-span)
    # holding 63 of the 256 positions there is less raw history to free at once: every ~3rd
    rarest, most = {0: (2, 3), 32: (3, 4)}[sink]
    assert events["none"] == 10 and rarest <= events["slack"] <= most
    assert recomputed_entries["slack"] < recomputed_entries["none"] / 3


# --- bad input ------------------------------------------------------------------------------


def test_a_budget_too_small_to_stream_is_refused(tmp_path, base):
    # 64 tail + 32 sink + 2 blocks fit the config's check; a refocus interval of headroom (32) and the sink's
    # real cost (32 tokens + the 31 LOD1 gists of the rest of its 1,024-token span) do not: 64 + 32 + 64 + 63
    small = tiny_config(tmp_path, "wc.w_max=192", "wc.protected_tail=64")
    with pytest.raises(ConfigError, match=r"wc.w_max 192 is too small to stream: .*the attention sink \(32 tokens "
                                          r"and the gists of the rest of its span: 63 positions\), i.e. at least 223;"):
        runtime(small, base, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    no_sink = tiny_config(tmp_path, "wc.w_max=128", "wc.protected_tail=64", "wc.sink_tokens=0")
    with pytest.raises(ConfigError, match=r"wc.w_max 128 is too small to stream: .* i.e. at least 160;"):
        runtime(no_sink, base, tmp_path / "t")


def test_cli_refuses_an_empty_prompt_and_a_budget_below_the_protected_tail(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    root = f"paths.artifact_root={tmp_path / 'a'}"
    assert main(["generate", "--profile", "tiny", "--prompt-file", str(empty), root]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello " * 50)
    assert main(["generate", "--profile", "tiny", "--prompt-file", str(prompt), root, "wc.w_max=64",
                 "wc.protected_tail=128"]) == 2
    assert "protected_tail" in capsys.readouterr().err
    assert main(["generate", "--profile", "tiny", "--prompt-file", str(tmp_path / "missing.txt"), root]) == 2
    assert "no such file" in capsys.readouterr().err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 20)
    assert main(["generate", "--profile", "tiny", "--prompt-file", str(latin), root]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def fake_cycle(cfg, base, folder: Path, base_model_id: str) -> Path:
    """A cycle folder with a GistNet and a LensNet (no LoRA) and the manifest a cycle writes."""
    save_gistnet(folder / "jt1" / "final", build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=1,
                                                         levels=cfg.wc.levels))
    save_lensnet(folder / "jt2" / "final", decisive_lensnet(cfg, base, seed=1))
    write_manifest(folder, kind="cycle", format_version=1, config_hash="test", inputs=[],
                   extra={"cycle": 1, "base_model_id": base_model_id})
    return folder


def test_a_checkpoint_of_another_base_model_is_refused(cfg, base, tmp_path):
    foreign = fake_cycle(cfg, base, tmp_path / "cycle-0001", "someone/else-1B")
    with pytest.raises(ArtifactError, match="trained for base model 'someone/else-1B'"):
        load_runtime(cfg, foreign, tmp_path / "t", base=base)
    (tmp_path / "trees").mkdir()
    write_manifest(tmp_path / "trees", kind="megacontext_trees", format_version=1, config_hash="x", inputs=[])
    with pytest.raises(ArtifactError, match="not a training cycle"):
        load_runtime(cfg, tmp_path / "trees", tmp_path / "t", base=base)


def test_feed_rejects_token_ids_outside_the_vocabulary(cfg, base, tmp_path):
    rt = runtime(cfg, base, tmp_path / "t", lens=False)
    with pytest.raises(InputDataError, match="token ids"):
        rt.feed([1, 2, 10**6])


# --- the commands ---------------------------------------------------------------------------


def test_generate_and_inspect_from_a_checkpoint(cfg, base, tmp_path, capsys):
    cycle = fake_cycle(cfg, base, tmp_path / "cycle-0001", base.model_id)
    prompt = tmp_path / "doc.txt"
    prompt.write_bytes(text_tokens(6_000).astype(np.uint8).tobytes().decode("latin-1").encode("utf-8"))
    root = f"paths.artifact_root={tmp_path / 'a'}"
    assert main(["generate", "--profile", "tiny", "--checkpoint", str(cycle), "--prompt-file", str(prompt),
                 "--max-new-tokens", "12", root]) == 0
    out = capsys.readouterr().out
    assert "runtime telemetry" in out and "tokens_decoded" in out
    assert main(["inspect", "--profile", "tiny", "--checkpoint", str(cycle), "--prompt-file", str(prompt),
                 "--points", "4", "--out", str(tmp_path / "view"), root]) == 0
    page = (tmp_path / "view" / "focus.html").read_text()
    png = (tmp_path / "view" / "focus.png").read_bytes()
    snapshots = json.loads((tmp_path / "view" / "snapshots.json").read_text())
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("<tr><td>") == 4  # the chosen points in time
    last = snapshots[-1]
    n_gists = sum(1 for level, _ in last["entries"] if level > 0)
    assert page.count('data-level="') == n_gists  # every gist of the last WC is drawn, with its span
    assert "LensNet" in page and len(last["scores"]) == len(last["scored"]) > 0


@pytest.mark.slow
def test_real_smollm2_streams_a_long_document_and_the_cache_matches_recompute(tmp_path):
    from megacontext.model.base_model import load_tokenizer
    from megacontext.config import load_config
    from megacontext.data.corpus import stdlib_root

    cfg = load_config("default", [f"paths.artifact_root={tmp_path}", "wc.w_max=512", "wc.protected_tail=128"], env={})
    real = load_base_model(cfg)
    tokens = load_tokenizer(cfg).encode_batch([(stdlib_root() / "argparse.py").read_text()])[0][:6_000]
    cached, full = runtime(cfg, real, tmp_path / "a"), runtime(cfg, real, tmp_path / "b", recompute=True)
    cached.feed(tokens)
    full.feed(tokens)
    every = cfg.allocator.refocus_every
    assert cached.telemetry.edits > 0 and len(cached.wc) <= cfg.wc.w_max - every + len(tokens) % every
    assert torch.allclose(cached.next_logits(), full.next_logits(), atol=1e-3, rtol=1e-4)
    assert list(cached.generate(6)) == list(full.generate(6))
    assert torch.allclose(cached.next_logits(), full.next_logits(), atol=1e-3, rtol=1e-4)
    assert cached.cache.stats.reused > 0 and full.cache.stats.reused == 0


# --- the speculative region -----------------------------------------------------------------


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_rolled_back_draft_leaves_the_tree_byte_identical_and_a_commit_persists_it(cfg, base, tmp_path):
    rt = runtime(cfg, base, tmp_path / "t")
    rt.feed(text_tokens(1_024))
    before, entries, logits = tree_bytes(tmp_path / "t"), list(rt.wc.entries), rt.next_logits().clone()
    draft, score, committed = rt.speculate(threshold=2.0)  # cosine never reaches 2: roll back
    assert not committed and len(draft) == BLOCK and -1 <= score <= 1
    assert tree_bytes(tmp_path / "t") == before and rt.wc.entries == entries and rt.cursor == 1_024
    assert torch.allclose(rt.next_logits(), logits, atol=1e-5)
    draft2, score2, committed = rt.speculate(threshold=-2.0)  # always commit
    assert committed and draft2 == draft and score2 == pytest.approx(score)
    assert rt.cursor == rt.tree.n_tokens == 1_024 + BLOCK
    assert rt.tree.tokens(1_024, 1_024 + BLOCK).tolist() == draft
    assert rt.summary()["speculative_acceptance"] == 0.5 and rt.summary()["speculative_drafts"] == 2


def test_a_committed_draft_survives_a_kill(cfg, tmp_path):
    import subprocess
    import sys
    import textwrap

    from megacontext.context.tree import MegaContextTree

    script = textwrap.dedent(f"""
        import json, os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from conftest import tiny_config
        from megacontext.model.base_model import load_base_model
        from test_runtime import runtime, text_tokens
        cfg = tiny_config(Path({str(tmp_path)!r}))
        rt = runtime(cfg, load_base_model(cfg), Path({str(tmp_path / 'tree')!r}))
        rt.feed(text_tokens(1_000))
        draft, score, committed = rt.speculate(threshold=-2.0)
        print(json.dumps(draft), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush: only what commit persisted
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "WANDB_MODE": "disabled"})
    assert done.returncode == -9, done.stderr[-2000:]
    draft = json.loads(done.stdout.strip().splitlines()[-1])
    tree = MegaContextTree.open(tmp_path / "tree")  # verifies every CRC
    assert tree.n_tokens == 1_000 + BLOCK
    assert tree.tokens(1_000, 1_000 + BLOCK).tolist() == draft


def test_with_megaprediction_a_draft_is_scored_at_the_wlod1_readout_jt3_trains(tmp_path):
    from megacontext.mega.prediction import mega_prediction_loss
    from megacontext.context.working_context import assemble

    cfg = tiny_config(tmp_path, "mega.attention=true", "mega.prediction=true", "mega.window=64")
    base = load_base_model(cfg)  # its own model: MegaAttention gets installed on it
    plain = runtime(cfg.model_copy(update={"mega": cfg.mega.model_copy(update={"attention": False, "prediction": False})}),
                    load_base_model(cfg), tmp_path / "plain")
    rt = runtime(cfg, base, tmp_path / "t")
    tokens = text_tokens(1_000)
    rt.feed(tokens)
    plain.feed(tokens)
    assert torch.equal(rt.next_logits(), plain.next_logits())  # decoding outside MegaAttention is unchanged
    draft, score, committed = rt.speculate(threshold=2.0)
    assert not committed and rt.summary()["speculative_wlod1_readouts"] == 1
    inputs = assemble(rt.wc.entries, rt.source, base.model.get_input_embeddings(), horizon=np.array(draft))
    out = mega_prediction_loss(base, rt.encoder.gistnet, inputs, torch.tensor(draft), 64)
    expected = torch.nn.functional.cosine_similarity(out.predictions["lod1"][0], out.targets["lod1"][0], dim=0)
    assert score == pytest.approx(expected.item(), abs=1e-5)
    _, leaf_score, _ = plain.speculate(threshold=2.0)  # without MegaPrediction: the latest leaf's readout
    assert plain.summary()["speculative_wlod1_readouts"] == 0 and leaf_score != pytest.approx(score, abs=1e-4)


# --- end of sequence ------------------------------------------------------------------------


def with_eos(rt: Runtime, token: int) -> Runtime:
    """The runtime's tokenizer reports `token` as its end-of-sequence id (the tiny model never emits its own)."""
    import dataclasses

    rt.base = dataclasses.replace(rt.base, tokenizer=_EosTokenizer(rt.base.tokenizer, token))
    return rt


class _EosTokenizer:
    def __init__(self, inner, eos: int):
        self._inner, self.eos_token_id = inner, eos

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_generation_stops_after_the_end_of_sequence_token_unless_told_not_to(cfg, base, tmp_path):
    free = runtime(cfg, base, tmp_path / "free")
    free.feed(text_tokens(600))
    run_on = list(free.generate(24, stop_at_eos=False))
    eos = run_on[5]  # a token greedy decoding does produce: call it the end of sequence
    first = run_on.index(eos)
    stopped = with_eos(runtime(cfg, base, tmp_path / "stop"), eos)
    stopped.feed(text_tokens(600))
    assert list(stopped.generate(24)) == run_on[: first + 1]  # the EOS is yielded, nothing after it
    assert stopped.cursor == 600 + first + 1
    again = with_eos(runtime(cfg, base, tmp_path / "again"), eos)
    again.feed(text_tokens(600))
    assert list(again.generate(24, stop_at_eos=False)) == run_on  # opt-out: runs on past it


def test_a_draft_that_reaches_the_end_of_sequence_is_returned_unscored_and_the_tree_is_untouched(cfg, base, tmp_path):
    probe = runtime(cfg, base, tmp_path / "probe")
    probe.feed(text_tokens(1_024))
    full_draft, _, _ = probe.speculate(threshold=2.0, stop_at_eos=False)
    eos = full_draft[3]
    cut = full_draft.index(eos)
    assert cut + 1 < BLOCK
    rt = with_eos(runtime(cfg, base, tmp_path / "t"), eos)
    rt.feed(text_tokens(1_024))
    before, entries = tree_bytes(tmp_path / "t"), list(rt.wc.entries)
    draft, score, committed = rt.speculate(threshold=-2.0)  # would always commit a full block
    assert draft == full_draft[: cut + 1] and np.isnan(score) and not committed
    assert tree_bytes(tmp_path / "t") == before and rt.wc.entries == entries and rt.cursor == 1_024
