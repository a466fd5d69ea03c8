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
