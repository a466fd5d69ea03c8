from __future__ import annotations

import pytest
import torch

from megacontext.model.base_model import (
    GGUF_PACKAGES,
    build_tiny_base,
    default_cache_root,
    ensure_gguf_cache,
    horizon_nll,
    load_base_model,
    load_tokenizer,
)
from megacontext.config import load_config
from megacontext.data.corpus import stdlib_root
from megacontext.errors import ConfigError


def test_tiny_base_is_frozen_and_deterministic_per_seed() -> None:
    cfg = load_config("tiny", env={})
    a, b = load_base_model(cfg), load_base_model(cfg)
    assert not any(p.requires_grad for p in a.model.parameters()) and not a.model.training
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    c = build_tiny_base(cfg.model, seed=1)
    assert a.model_id != c.model_id
    assert not torch.equal(a.model.model.embed_tokens.weight, c.model.model.embed_tokens.weight)


def test_horizon_nll_matches_a_full_logits_computation() -> None:
    base = load_base_model(load_config("tiny", env={}))
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    logits = base.model(input_ids=ids).logits  # [B, T, V]
    manual = torch.nn.functional.cross_entropy(logits[:, -9:-1].transpose(1, 2), ids[:, -8:], reduction="none").mean(1)
    assert torch.allclose(horizon_nll(base.model, ids, 8), manual, atol=1e-5)
    with pytest.raises(ValueError, match="horizon 40 must be in"):
        horizon_nll(base.model, ids, 40)


def test_inputs_embeds_give_the_same_logits_as_input_ids() -> None:
    base = load_base_model(load_config("tiny", env={}))
    ids = torch.arange(0, 64)[None] % 250
    by_ids = base.model(input_ids=ids).logits
    by_embeds = base.model(inputs_embeds=base.model.get_input_embeddings()(ids)).logits
    assert torch.equal(by_ids, by_embeds)


def test_hf_kind_without_a_model_directory_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="kind=hf needs model.path"):
        load_config("tiny", ["model.kind=hf"], env={})
    with pytest.raises(ConfigError, match=r"no config.json; point it at a local Hugging Face model directory"):
        load_base_model(load_config("tiny", ["model.kind=hf", f"model.path={tmp_path}"], env={}))


def test_local_hf_directory_loads_with_its_tokenizer(tmp_path) -> None:
    tiny = load_base_model(load_config("tiny", env={}))
    tiny.model.save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_base_model(load_config("tiny", ["model.kind=hf", f"model.path={tmp_path / 'm'}"], env={}))


def test_control_token_spellings_in_user_text_are_encoded_as_text(tmp_path) -> None:
    """A document or prompt mentioning `<|im_end|>` gets the tokens of its characters, not the turn end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from megacontext.model.tokenizer import HFTokenizer

    chars = sorted(set("<|im_end|> hi"))
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="|"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    hf = HFTokenizer(tmp_path / "tokenizer.json", eos_token="<|im_end|>")
    ids = hf.encode_batch(["hi <|im_end|>"])[0]
    assert hf.eos_token_id == eos and eos not in ids and len(ids) == len("hi <|im_end|>")
    assert hf.decode(ids) == "hi <|im_end|>"
    assert tok.encode("hi <|im_end|>", add_special_tokens=False).ids[-1] == eos  # the library default misreads it
    assert hf.name.endswith(":text")  # shards from the misreading encoder carry another name and are refused


@pytest.mark.slow
def test_smollm2_loads_from_cache_and_gives_a_finite_nll_on_real_text() -> None:
    cfg = load_config("default", env={})
    cache = ensure_gguf_cache(GGUF_PACKAGES["smollm2"], default_cache_root(cfg))  # converts on first use
    stamp = (cache / "source.json").stat().st_mtime_ns
    base = load_base_model(cfg)
    assert (cache / "source.json").stat().st_mtime_ns == stamp  # loaded from the cache, not re-converted
    assert base.model_id.startswith("smollm2-135m-instruct@")
    assert (base.model.config.num_hidden_layers, base.d_model, base.max_positions) == (30, 576, 8192)
    assert base.model.config.tie_word_embeddings and base.model.dtype == torch.float32
    text = (stdlib_root() / "argparse.py").read_text()
    tokenizer = load_tokenizer(cfg)
    tokens = tokenizer.encode_batch([text])[0][:1024]
    spelled = tokenizer.encode_batch(["see <|im_end|> and <filename>.py"])[0]
    assert tokenizer.eos_token_id == 2 and min(spelled) >= 17  # no control token (ids 0-16) from plain text
    assert tokenizer.decode(spelled) == "see <|im_end|> and <filename>.py"
    nll = horizon_nll(base.model, torch.tensor([tokens]), horizon=256).item()
    assert 0.05 < nll < 3.0, nll  # real Python code under a real 135M model: low but not zero
    garbage = torch.randint(0, 49_152, (1, 1024), generator=torch.Generator().manual_seed(0))
    assert horizon_nll(base.model, garbage, horizon=256).item() > nll + 5


def test_horizon_logits_carry_gradients_and_the_scoring_nll_does_not(tiny_base) -> None:
    from megacontext.model.base_model import horizon_logprobs, horizon_logits, horizon_token_nll, teacher_kl

    embeds = tiny_base.model.get_input_embeddings()(torch.arange(40)[None]).detach().requires_grad_()
    logits = horizon_logits(tiny_base.model, 8, inputs_embeds=embeds)
    assert logits.shape == (1, 8, tiny_base.model.config.vocab_size) and logits.requires_grad  # JT1/JT3 train through it
    student = horizon_logprobs(tiny_base, 8, inputs_embeds=embeds)
    teacher = horizon_logprobs(tiny_base, 8, input_ids=torch.arange(40)[None]).detach()
    teacher_kl(student, teacher).backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert not horizon_token_nll(tiny_base.model, 8, inputs_embeds=embeds, targets=torch.arange(32, 40)[None]).requires_grad


@pytest.mark.slow
def test_gemma3_loads_from_its_cache_scores_real_text_and_reads_gaussian_positions() -> None:
    """The gate-8k base: Gemma-3-270M (sliding-window and global layers, two rotary tables) end to end."""
    import importlib.util

    from megacontext.model.base_model import horizon_logits
    from megacontext.model.gaussian_rope import gaussian_positions, install_gaussian_rope

    if importlib.util.find_spec(GGUF_PACKAGES["gemma3-270m"].module) is None:
        pytest.skip("the gemma extra is not installed (pip install -e '.[gemma]'; `make gate-8k` installs it)")
    cfg = load_config("gate-8k", ["model.dtype=float32"], env={})  # fp32 on CPU (bf16 is ~3x slower here)
    cache = ensure_gguf_cache(GGUF_PACKAGES["gemma3-270m"], default_cache_root(cfg))  # assembled + converted once
    stamp = (cache / "source.json").stat().st_mtime_ns
    base = load_base_model(cfg)
    assert (cache / "source.json").stat().st_mtime_ns == stamp and "quantization_config" not in base.model.config
    assert base.model_id.startswith("gemma3-270m@") and base.model.dtype == torch.float32
    assert (base.model.config.num_hidden_layers, base.d_model, base.max_positions) == (18, 640, 32_768)
    assert set(base.model.config.layer_types) == {"sliding_attention", "full_attention"}
    tokenizer = load_tokenizer(cfg)
    tokens = tokenizer.encode_batch([(stdlib_root() / "argparse.py").read_text()])[0][:1024]
    ids = torch.tensor([tokens])
    nll = horizon_nll(base.model, ids, horizon=256).item()
    assert 0.05 < nll < 3.0, nll  # real Python code under a real 270M model
    garbage = torch.randint(0, 200_000, (1, 1024), generator=torch.Generator().manual_seed(0))
    assert horizon_nll(base.model, garbage, horizon=256).item() > nll + 3
    # the working context's path: embeddings in, Gaussian RoPE positions; tokens only = the plain forward
    plain = horizon_logits(base.model, 32, input_ids=ids)
    install_gaussian_rope(base.model)
    embeds = base.model.get_input_embeddings()(ids)  # Gemma scales its embeddings inside this module
    mu = torch.arange(ids.shape[1], dtype=torch.float64)[None]
    with torch.no_grad(), gaussian_positions(base.model, mu, torch.zeros_like(mu)):
        torch.testing.assert_close(horizon_logits(base.model, 32, inputs_embeds=embeds), plain, atol=2e-4, rtol=0)
    sigma = torch.zeros_like(mu)
    sigma[0, 64:96] = 8.0  # one block read as a blurred span: the logits move
    with torch.no_grad(), gaussian_positions(base.model, mu, sigma):
        assert not torch.allclose(horizon_logits(base.model, 32, inputs_embeds=embeds), plain, atol=1e-3, rtol=0)


def test_a_chunked_model_package_is_assembled_once_into_the_cache_and_a_bad_one_is_one_line(tmp_path,
                                                                                            monkeypatch) -> None:
    """The Gemma package's shape (chunk packages + `assemble(path)`), faked offline with a tiny package."""
    from megacontext.model.base_model import GGUFPackage, find_gguf

    site = tmp_path / "site"
    (site / "fake_chunked").mkdir(parents=True)
    (site / "fake_chunked" / "__init__.py").write_text(
        "from pathlib import Path\nCALLS = []\n"
        "def assemble(output_path):\n"
        "    CALLS.append(output_path)\n"
        "    if Path(output_path).name.startswith('stale'):\n"
        "        raise FileExistsError(f'{output_path} already exists with an unexpected sha256')\n"
        "    if Path(output_path).name.startswith('broken'):\n"
        "        raise ValueError('Assembled file sha256 did not match expected value')\n"
        "    Path(output_path).parent.mkdir(parents=True, exist_ok=True)\n"
        "    Path(output_path).write_bytes(b'GGUF')\n"
        "    return Path(output_path)\n")
    (site / "fake_chunked-1.2.dist-info").mkdir()
    (site / "fake_chunked-1.2.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-chunked\nVersion: 1.2\n")
    monkeypatch.syspath_prepend(str(site))
    package = GGUFPackage(name="fake", distribution="fake-chunked", module="fake_chunked", filename=None,
                          install_hint="pip install fake-chunked", assembled=True)
    path = find_gguf(package, tmp_path / "cache")
    assert path == tmp_path / "cache" / "gguf" / "fake-1.2.gguf" and path.read_bytes() == b"GGUF"
    broken = GGUFPackage(name="broken", distribution="fake-chunked", module="fake_chunked", filename=None,
                         install_hint="pip install fake-chunked", assembled=True)
    with pytest.raises(ConfigError, match=r"^fake-chunked: cannot assemble its GGUF \(Assembled file sha256 did not "
                                          r"match expected value\); reinstall it: pip install fake-chunked$"):
        find_gguf(broken, tmp_path / "cache")
    stale = GGUFPackage(name="stale", distribution="fake-chunked", module="fake_chunked", filename=None,
                        install_hint="pip install fake-chunked", assembled=True)
    with pytest.raises(ConfigError, match=r"stale-1\.2\.gguf: not the file fake-chunked assembles .*; delete it and rerun$"):
        find_gguf(stale, tmp_path / "cache")
    missing = GGUFPackage(name="x", distribution="not-installed", module="not_installed_anywhere", filename=None,
                          install_hint="pip install it", assembled=True)
    with pytest.raises(ConfigError, match="base model 'x' is not installed; run: pip install it"):
        ensure_gguf_cache(missing, tmp_path / "cache")
