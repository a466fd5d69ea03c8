from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megacontext.model.base_model import load_base_model
from megacontext.config import Config, PhaseConfig
from megacontext.data.corpus import build_corpus
from megacontext.model.gistnet import build_gistnet, load_gistnet
from megacontext.training.jt1_gistnet import JT1GistNet
from megacontext.data.shards import build_shards, read_split, shards_dir
from megacontext.training.loop import fit
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Config:
    cfg = tiny_config(tmp_path_factory.mktemp("jt1"), "data.max_documents=4", "data.val_fraction=0", "data.test_fraction=0")
    build_corpus(cfg)
    build_shards(cfg)
    return cfg


def _phase(cfg: Config) -> JT1GistNet:
    base = load_base_model(cfg)
    gistnet = build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=cfg.seed)
    return JT1GistNet(cfg, base, gistnet, read_split(shards_dir(cfg), "train"))


def _weights(phase: JT1GistNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in phase.trainable().items()}


def test_jt1_trains_exactly_gistnet(tiny: Config, tmp_path: Path) -> None:
    phase = _phase(tiny)
    trainable = phase.trainable()
    assert set(trainable) == {f"gistnet.{n}" for n, _ in phase.gistnet.named_parameters()}
    assert all(p.requires_grad for p in trainable.values())
    assert not any(p.requires_grad for p in phase.base.model.parameters())
    base_before = {k: v.clone() for k, v in phase.base.model.state_dict().items()}
    before = _weights(phase)
    result = fit(phase, PhaseConfig(steps=2, batch=2, lr=1e-2), tmp_path, checkpoint_every=1)
    assert all(not torch.equal(before[k], v) for k, v in _weights(phase).items() if "out_proj" in k)
    assert all(torch.equal(base_before[k], v) for k, v in phase.base.model.state_dict().items())
    assert all(p.grad is None for p in phase.base.model.parameters())
    row = result.telemetry[-1]
    assert row["kl"] > 0 and row["windows"] == 2 and row["tokens_per_s"] > 0 and "delta_nll" in row
    loaded = load_gistnet(tmp_path / "final")
    assert all(torch.equal(p, loaded.state_dict()[k.removeprefix("gistnet.")]) for k, p in phase.trainable().items())


def test_kill_and_resume_gives_the_same_weights(tiny: Config, tmp_path: Path) -> None:
    straight = _phase(tiny)
    fit(straight, PhaseConfig(steps=4, batch=2), tmp_path / "straight", checkpoint_every=2)
    interrupted = _phase(tiny)
    fit(interrupted, PhaseConfig(steps=2, batch=2), tmp_path / "resumed", checkpoint_every=2)  # "killed" after step 2
    resumed = _phase(tiny)  # a fresh process: weights from the seed, then the checkpoint
    result = fit(resumed, PhaseConfig(steps=4, batch=2), tmp_path / "resumed", checkpoint_every=2)
    assert result.resumed_from == 2 and len(result.telemetry) == 4
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def flip_byte(path: Path, offset: int = -9) -> None:
    """Invert one byte of `path` in place (size unchanged): the corruption a loader must catch."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file", ["trainable.safetensors", "optimizer.safetensors"])
def test_a_corrupt_training_checkpoint_is_refused_and_deleting_it_resumes_from_the_one_before(
        tiny: Config, tmp_path: Path, file: str) -> None:
    from megacontext.errors import ArtifactError

    straight = _phase(tiny)
    fit(straight, PhaseConfig(steps=4, batch=2), tmp_path / "straight", checkpoint_every=2)
    fit(_phase(tiny), PhaseConfig(steps=4, batch=2), tmp_path / "run", checkpoint_every=2)  # steps 2 and 4 kept
    latest = tmp_path / "run" / "checkpoints" / "step-000004"
    flip_byte(latest / file)
    with pytest.raises(ArtifactError) as error:
        fit(_phase(tiny), PhaseConfig(steps=4, batch=2), tmp_path / "run", checkpoint_every=2)
    message = str(error.value)
    assert str(latest / file) in message and f"delete {latest}" in message and "from step-000002" in message
    assert "\n" not in message
    import shutil

    shutil.rmtree(latest)  # the advice
    resumed = _phase(tiny)
    result = fit(resumed, PhaseConfig(steps=4, batch=2), tmp_path / "run", checkpoint_every=2)
    assert result.resumed_from == 2
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _ddp_worker(rank: int, world: int, cfg_json: str, out: str, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        phase = _phase(Config.model_validate_json(cfg_json))
        fit(phase, PhaseConfig(steps=2, batch=2, eval_every=1, eval_windows=1), Path(out), checkpoint_every=2)
    finally:
        dist.destroy_process_group()


def test_two_process_data_parallel_matches_one_process(tiny: Config, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    single = _phase(tiny)
    fit(single, PhaseConfig(steps=2, batch=2, eval_every=1, eval_windows=1), tmp_path / "single", checkpoint_every=2)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_ddp_worker, args=(2, tiny.model_dump_json(), str(tmp_path / "ddp"), init), nprocs=2, join=True)
    ddp = load_gistnet(tmp_path / "ddp" / "final").state_dict()  # validated on rank 0's loss, best step exported
    assert (json.loads((tmp_path / "ddp" / "final" / "best.json").read_text())["step"]
            == json.loads((tmp_path / "single" / "final" / "best.json").read_text())["step"])
    torch.set_num_threads(os.cpu_count() or 1)
    for name, p in single.trainable().items():
        assert torch.allclose(p, ddp[name.removeprefix("gistnet.")], atol=1e-6), name


def test_jt3_trains_exactly_the_configured_lora_adapters(tiny: Config, tmp_path: Path) -> None:
    from megacontext.model.lora import load_lora
    from megacontext.training.jt3_lora import JT3LoRA

    base = load_base_model(tiny)
    gistnet = build_gistnet(tiny.gistnet, base.model.get_input_embeddings(), seed=0)
    phase = JT3LoRA(tiny, base, gistnet, read_split(shards_dir(tiny), "train"))
    trainable = phase.trainable()
    adapted = {name.split(".lora_")[0].removeprefix("base_model.model.") for name in trainable}
    layers = tiny.model.tiny.n_layers
    expected = {"model.embed_tokens"} | {f"model.layers.{i}.self_attn.{p}" for i in range(layers)
                                         for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert adapted == expected  # first 2 + last 2 blocks of a 2-layer model = both blocks
    requires_grad = {n for n, p in phase.peft.named_parameters() if p.requires_grad}
    assert requires_grad == set(trainable)
    assert not any(p.requires_grad for p in gistnet.parameters())
    gist_before = {k: v.clone() for k, v in gistnet.state_dict().items()}
    result = fit(phase, PhaseConfig(steps=2, batch=2, lr=1e-2), tmp_path, checkpoint_every=2)
    assert all(torch.equal(gist_before[k], v) for k, v in gistnet.state_dict().items())
    assert result.telemetry[-1]["nll"] > 0 and (tmp_path / "final" / "adapter_model.safetensors").is_file()
    lora_b = [p for n, p in trainable.items() if "lora_B" in n or "lora_embedding_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero; training moved it
    from megacontext.lifecycle.lineage import write_manifest

    write_manifest(tmp_path / "final", kind="lora_adapter", format_version=1, config_hash="test")  # sealed, as a cycle does
    reloaded = load_lora(load_base_model(tiny), tmp_path / "final")
    ids = torch.arange(40)[None] % 250
    assert torch.allclose(reloaded(input_ids=ids).logits, phase.peft(input_ids=ids).logits, atol=1e-5)


def test_a_killed_runs_half_written_checkpoint_and_output_are_swept(tiny: Config, tmp_path: Path) -> None:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    leftovers = [tmp_path / "checkpoints" / f".step-000002.staging-{proc.pid}", tmp_path / f".final.staging-{proc.pid}"]
    for folder in leftovers:
        folder.mkdir(parents=True)
        (folder / "trainable.safetensors").write_bytes(b"half")
    fit(_phase(tiny), PhaseConfig(steps=2, batch=2), tmp_path, checkpoint_every=2)
    assert not any(f.exists() for f in leftovers)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]


def _jt3(cfg: Config):
    from megacontext.training.jt3_lora import JT3LoRA

    base = load_base_model(cfg)
    gistnet = build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=0)
    return JT3LoRA(cfg, base, gistnet, read_split(shards_dir(cfg), "train"))


def test_the_plain_reading_guard_measures_each_reading_and_refuses_adapters_that_change_nothing(tiny: Config) -> None:
    import numpy as np

    from megacontext.context.nodes import span
    from megacontext.data.windows import SeedOffset, sample_window
    from megacontext.model.base_model import horizon_token_nll
    from megacontext.training.jt3_lora import plain_reading_guard

    phase = _jt3(tiny)
    fresh = plain_reading_guard(phase, windows=2, tolerance=0.0)  # LoRA starts with B = 0: the plain base
    assert fresh["wc_delta"]["value"] == 0.0 and fresh["recency_delta"]["value"] == 0.0
    assert not fresh["accepted"]  # adapters that do not lower the working context's NLL are not kept
    with torch.no_grad():
        for name, p in phase.trainable().items():
            if "_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    guard = plain_reading_guard(phase, windows=2, tolerance=0.0)
    t = tiny.train
    assert guard["windows"] == 2 and guard["tokens"] == 2 * t.horizon
    # known answer: the recency rows equal the base's own NLL of the last train.budget history tokens + horizon
    adapted, plain = [], []
    for item in range(2):
        w = sample_window(phase.docs, history=t.history, horizon=t.horizon, align=span(tiny.wc.levels),
                          seed=tiny.seed + SeedOffset.JT3_GUARD, step=0, item=item)
        ids = torch.as_tensor(w.tokens[w.history - t.budget :].astype(np.int64))[None]
        adapted.append(horizon_token_nll(phase.peft, t.horizon, input_ids=ids).sum().item())
        with phase.peft.disable_adapter():
            plain.append(horizon_token_nll(phase.peft, t.horizon, input_ids=ids).sum().item())
    tokens = 2 * t.horizon
    assert guard["recency_nll"]["adapted"] == pytest.approx(sum(adapted) / tokens, rel=1e-5)
    assert guard["recency_nll"]["plain"] == pytest.approx(sum(plain) / tokens, rel=1e-5)
    assert guard["recency_delta"]["value"] == pytest.approx((sum(adapted) - sum(plain)) / tokens, rel=1e-4)
    assert guard["recency_nll"]["adapted"] != guard["recency_nll"]["plain"]  # the adapters do read differently
    lo, hi = guard["recency_delta"]["ci"]
    assert lo <= guard["recency_delta"]["value"] <= hi
    assert guard["accepted"] == (guard["wc_delta"]["value"] < 0 and guard["recency_delta"]["value"] <= 0.0)
    loose = plain_reading_guard(phase, windows=2, tolerance=1e9)  # the tolerance bounds only the recency harm
    assert loose["accepted"] == (loose["wc_delta"]["value"] < 0)
    with pytest.raises(ValueError, match="at least 1 window"):
        plain_reading_guard(phase, windows=0, tolerance=0.0)


def test_adapters_the_guard_rejects_are_replaced_by_the_warm_start(tiny: Config, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from megacontext.training.cycle import _guard_adapters

    phase = _jt3(tiny)
    warm = {k: v.detach().clone() for k, v in phase.trainable().items()}
    with torch.no_grad():  # adapters that wreck reading: large random B on every adapted projection
        for name, p in phase.trainable().items():
            if "_B" in name:
                p.normal_(0, 5.0, generator=torch.Generator().manual_seed(2))
    phase.export(tmp_path)
    guard = _guard_adapters(tiny, phase, warm, tmp_path)
    assert not guard["accepted"] and guard["recency_delta"]["value"] > 0
    assert json.loads((tmp_path / "guard.json").read_text())["accepted"] is False
    exported = load_file(tmp_path / "adapter_model.safetensors")
    plain = {k.replace(".default", ""): v for k, v in warm.items()}  # peft saves names without the adapter's
    assert exported and set(exported) == set(plain) and all(torch.equal(v, plain[k]) for k, v in exported.items())
    assert all(torch.equal(p, warm[k]) for k, p in phase.trainable().items())


def _garbled(gistnet, seed: int):
    """A GistNet whose weights are redrawn at a large scale and whose gists are 50x the token norm: noise that
    swamps the residual stream, so any base reads worse through it."""
    import copy
    import math

    bad = copy.deepcopy(gistnet)
    with torch.no_grad():
        for p in bad.parameters():
            p.normal_(0, 3.0, generator=torch.Generator().manual_seed(seed))
        bad.log_scale.fill_(math.log(50.0))
    return bad


def test_the_gist_guard_measures_each_reading_and_refuses_gists_that_change_nothing(tiny: Config) -> None:
    import copy

    import numpy as np

    from megacontext.context.nodes import span
    from megacontext.data.windows import SeedOffset, sample_window
    from megacontext.model.base_model import horizon_token_nll
    from megacontext.training.jt1_gistnet import gist_guard

    phase = _phase(tiny)
    same = gist_guard(phase, copy.deepcopy(phase.gistnet), windows=2)
    assert same["trained_minus_warm"]["value"] == 0.0 and not same["accepted"]  # no gain: keep the warm start
    assert same["unchanged"]  # and the verdict says so, not "rejected"
    t = tiny.train
    assert same["windows"] == 2 and same["tokens"] == 2 * t.horizon
    # known answer: with the cold start's spans left out, the base reads only the attention sink (the first
    # sink_tokens tokens, at positions 0..) and the raw tail at its own positions
    sink = tiny.wc.sink_tokens
    assert sink == 32  # the default: the known answer below covers the sink
    left_out = []
    for item in range(2):
        w = sample_window(phase.docs, history=t.history, horizon=t.horizon, align=span(tiny.wc.levels),
                          seed=tiny.seed + SeedOffset.JT1_GUARD, step=0, item=item)
        entries = phase.policy(w).entries
        assert [e.level for e in entries[:sink]] == [0] * sink and entries[sink].level > 0
        raw_from = entries[max(i for i, e in enumerate(entries) if e.level > 0) + 1].start
        keep = np.r_[0:sink, raw_from:len(w.tokens)]
        ids = torch.as_tensor(w.tokens[keep].astype(np.int64))[None]
        positions = torch.as_tensor(keep)[None]
        # the plain base (Gaussian RoPE inactive) at explicit positions; the explicit mask matters: without one,
        # transformers reads a position jump as the start of a packed sequence and hides the sink from the tail
        left_out.append(horizon_token_nll(phase.base.model, t.horizon, input_ids=ids, position_ids=positions,
                                          attention_mask=torch.ones_like(ids)).sum().item())
    phase.policy.drain()
    assert same["nll"]["left_out"] == pytest.approx(sum(left_out) / (2 * t.horizon), rel=1e-4)
    assert same["trained_minus_left_out"]["value"] == pytest.approx(same["nll"]["trained"] - same["nll"]["left_out"],
                                                                    rel=1e-4)
    noise = _garbled(phase.gistnet, 3)
    ab = gist_guard(phase, noise, windows=2)  # trained = mean-init, warm = noise
    mean_init = copy.deepcopy(phase.gistnet)
    phase.gistnet.load_state_dict(noise.state_dict())
    ba = gist_guard(phase, mean_init, windows=2)  # the roles swapped
    assert ab["trained_minus_warm"]["value"] == pytest.approx(-ba["trained_minus_warm"]["value"], rel=1e-4)
    assert ab["trained_minus_warm"]["value"] != 0 and ab["accepted"] != ba["accepted"]  # exactly the better one is kept
    assert ab["accepted"] == (ab["nll"]["trained"] < ab["nll"]["warm"]) and not ab["unchanged"]
    with pytest.raises(ValueError, match="at least 1 window"):
        gist_guard(phase, phase.gistnet, windows=0)


def test_gists_the_guard_rejects_are_replaced_by_the_warm_start(tiny: Config, tmp_path: Path) -> None:
    import copy

    from megacontext.training.cycle import _guard_gists

    from megacontext.training.jt1_gistnet import gist_guard

    phase = _phase(tiny)
    noise, mean_init = _garbled(phase.gistnet, 4), copy.deepcopy(phase.gistnet)
    # the tiny base is random, so which of the two reads worse is a fact of its seeds: measure, then train "into" it
    probe = gist_guard(phase, noise, windows=tiny.train.gist_guard_windows)
    worse, warm = (mean_init, noise) if probe["trained_minus_warm"]["value"] > 0 else (noise, mean_init)
    phase.gistnet.load_state_dict(worse.state_dict())
    phase.export(tmp_path)
    guard = _guard_gists(tiny, phase, warm, tmp_path)
    assert not guard["accepted"] and guard["trained_minus_warm"]["value"] > 0
    assert json.loads((tmp_path / "guard.json").read_text())["accepted"] is False
    exported = load_gistnet(tmp_path)
    assert all(torch.equal(v, warm.state_dict()[k]) for k, v in exported.state_dict().items())


class _Ramp:
    """A phase with one weight w = 0 that each AdamW step raises by lr (the gradient of -w is constant), and a
    held-out loss (w - target)^2: the best step is known in advance."""

    name = "ramp"

    def __init__(self, target: float) -> None:
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.target = target
        self.validations = 0

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {"w": self.w}

    def make_batch(self, step: int, items: list[int]) -> list[int]:
        return items

    def loss(self, batch: list[int], global_batch: int) -> tuple[torch.Tensor, dict[str, float]]:
        return -self.w * len(batch) / global_batch, {}

    def export(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "w.json").write_text(json.dumps(self.w.item()))

    def validate(self, windows: int) -> float:
        self.validations += 1
        return (self.w.item() - self.target) ** 2


class _Killed(Exception):
    pass


class _DiesAt(_Ramp):
    """A _Ramp whose process "dies" when it computes the loss of optimiser step `dies_at` (0-based)."""

    def __init__(self, target: float, dies_at: int) -> None:
        super().__init__(target)
        self.dies_at = dies_at

    def make_batch(self, step: int, items: list[int]) -> list[int]:
        if step == self.dies_at:
            raise _Killed
        return items


def test_warm_up_sets_the_optimiser_learning_rate_of_each_step(tmp_path: Path) -> None:
    phase = _Ramp(target=0.0)  # each AdamW step moves w by that step's learning rate
    result = fit(phase, PhaseConfig(steps=3, lr=0.1, batch=1, warmup=2), tmp_path, checkpoint_every=3)
    assert phase.w.item() == pytest.approx(0.05 + 0.1 + 0.1, abs=1e-5)
    assert [row["lr"] for row in result.telemetry] == pytest.approx([0.05, 0.1, 0.1])


class _ThreeRamps(_Ramp):
    """A _Ramp with two more weights, `proj.v` and `proj.norm.u`, that each AdamW step also raises by its own
    learning rate (the gradient of every weight is constant)."""

    def __init__(self) -> None:
        super().__init__(target=0.0)
        self.v = torch.nn.Parameter(torch.zeros(()))
        self.u = torch.nn.Parameter(torch.zeros(()))

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {"w": self.w, "proj.v": self.v, "proj.norm.u": self.u}

    def loss(self, batch: list[int], global_batch: int) -> tuple[torch.Tensor, dict[str, float]]:
        return -(self.w + self.v + self.u) * len(batch) / global_batch, {}


class _ThreeRampsDying(_ThreeRamps):
    dies_at = 1
    make_batch = _DiesAt.make_batch


def test_lr_scales_multiply_the_learning_rate_of_the_parameters_they_name_through_warm_up_and_resume(
        tmp_path: Path) -> None:
    from megacontext.errors import ConfigError

    pcfg = PhaseConfig(steps=4, lr=0.1, batch=1, warmup=3, lr_scales={"norm": 3.0, "proj": 10.0})  # first key wins
    phase = _ThreeRamps()
    result = fit(phase, pcfg, tmp_path / "straight", checkpoint_every=1)
    warm = 0.1 / 3 + 0.2 / 3 + 0.1 + 0.1  # unscaled: warm-up over 3 steps, then 0.1
    assert (phase.w.item(), phase.v.item(), phase.u.item()) == pytest.approx((warm, 10 * warm, 3 * warm), abs=1e-4)
    assert [row["lr"] for row in result.telemetry] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1])
    with pytest.raises(_Killed):  # checkpoint after step 1, inside the warm-up
        fit(_ThreeRampsDying(), pcfg, tmp_path / "run", checkpoint_every=1)
    resumed = _ThreeRamps()
    assert fit(resumed, pcfg, tmp_path / "run", checkpoint_every=1).resumed_from == 1
    assert (resumed.w.item(), resumed.v.item(), resumed.u.item()) == pytest.approx(
        (phase.w.item(), phase.v.item(), phase.u.item()), abs=1e-5)
    with pytest.raises(ConfigError, match="input_projector"):  # a key no parameter carries is a typo, not a no-op
        fit(_ThreeRamps(), PhaseConfig(steps=1, lr=0.1, batch=1, lr_scales={"input_projector": 10.0}), tmp_path / "typo",
            checkpoint_every=1)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            PhaseConfig(lr_scales={"proj": bad})


def test_a_run_killed_after_publishing_a_best_step_its_checkpoint_lacks_ends_like_an_uninterrupted_one(
        tmp_path: Path) -> None:
    pcfg = PhaseConfig(steps=8, lr=0.1, batch=1, eval_every=1)
    straight = _Ramp(target=0.42)  # best at step 4 (w 0.4)
    fit(straight, pcfg, tmp_path / "straight", checkpoint_every=3)
    with pytest.raises(_Killed):  # checkpoint at step 3, best/ at step 4, dead in step 6
        fit(_DiesAt(target=0.42, dies_at=5), pcfg, tmp_path / "run", checkpoint_every=3)
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["step"] == 4
    resumed = _Ramp(target=0.42)
    result = fit(resumed, pcfg, tmp_path / "run", checkpoint_every=3)
    assert result.resumed_from == 3 and resumed.w.item() == straight.w.item() == pytest.approx(0.4, abs=1e-4)
    best = [json.loads((tmp_path / r / "final" / "best.json").read_text()) for r in ("straight", "run")]
    assert best[0] == best[1] and best[0]["step"] == 4


def test_a_moved_aside_best_comes_back_and_a_missing_one_never_relabels_a_checkpoint_as_the_warm_start(
        tmp_path: Path) -> None:
    import shutil

    pcfg = PhaseConfig(steps=8, lr=0.1, batch=1, eval_every=1)
    with pytest.raises(_Killed):
        fit(_DiesAt(target=0.42, dies_at=5), pcfg, tmp_path / "run", checkpoint_every=3)
    run = tmp_path / "run"
    dead_pid = 2**22 + 7  # above Linux's pid_max: no process runs under it
    os.replace(run / "best", run / f".best.old-{dead_pid}")  # killed between moving aside and publishing
    resumed = _Ramp(target=0.42)
    fit(resumed, pcfg, run, checkpoint_every=3)
    record = json.loads((run / "final" / "best.json").read_text())
    assert record["step"] == 4 and record["start_val_loss"] == pytest.approx(0.42**2)  # the record from step 0 survived
    assert resumed.w.item() == pytest.approx(0.4, abs=1e-4)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "best")  # no record at all (e.g. validation switched on for a resumed run)
    shutil.rmtree(run / "checkpoints" / "step-000008")  # resume from the step-6 checkpoint (w 0.6)
    again = _Ramp(target=0.42)
    result = fit(again, pcfg, run, checkpoint_every=3)
    record = json.loads((run / "final" / "best.json").read_text())
    assert result.resumed_from == 6 and record["step"] == 6 and record["start_val_loss"] is None


def test_learning_rate_warms_up_linearly_then_holds() -> None:
    from megacontext.training.loop import learning_rate

    pcfg = PhaseConfig(lr=1.0, warmup=4)
    assert [learning_rate(pcfg, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate(PhaseConfig(lr=0.5), 0) == 0.5


def test_early_stopping_exports_the_best_held_out_step_and_stops_after_patience(tmp_path: Path) -> None:
    phase = _Ramp(target=0.3)  # w = 0.1 * step: held-out best at step 3
    pcfg = PhaseConfig(steps=20, lr=0.1, batch=1, eval_every=1, patience=2)
    result = fit(phase, pcfg, tmp_path, checkpoint_every=10)
    steps = [row["step"] for row in result.telemetry]
    assert steps == [1, 2, 3, 4, 5] and result.telemetry[-1]["early_stop"] == 1.0  # steps 4 and 5 did not improve
    assert phase.validations == 6  # step 0 (the warm start) and steps 1-5
    best = json.loads((tmp_path / "final" / "best.json").read_text())
    assert best["step"] == 3 and best["start_val_loss"] == pytest.approx(0.09)
    assert json.loads((tmp_path / "final" / "w.json").read_text()) == pytest.approx(0.3, abs=1e-4)
    again = _Ramp(target=0.3)  # rerun in a fresh process: the stop is recorded, nothing more trains
    rerun = fit(again, pcfg, tmp_path, checkpoint_every=10)
    assert len(rerun.telemetry) == 5 and again.w.item() == pytest.approx(0.3, abs=1e-4)


def test_a_phase_that_only_gets_worse_exports_its_warm_start(tmp_path: Path) -> None:
    phase = _Ramp(target=-0.1)
    fit(phase, PhaseConfig(steps=4, lr=0.1, batch=1, eval_every=2), tmp_path, checkpoint_every=2)
    assert phase.w.item() == 0.0 and json.loads((tmp_path / "final" / "w.json").read_text()) == 0.0
    assert json.loads((tmp_path / "final" / "best.json").read_text())["step"] == 0


def test_killed_and_resumed_early_stopping_run_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    straight = _Ramp(target=0.3)
    pcfg = PhaseConfig(steps=8, lr=0.1, batch=1, eval_every=1, patience=2)
    fit(straight, pcfg, tmp_path / "straight", checkpoint_every=2)
    fit(_Ramp(target=0.3), pcfg.model_copy(update={"steps": 4}), tmp_path / "run", checkpoint_every=2)  # "killed" at 4
    resumed = _Ramp(target=0.3)
    result = fit(resumed, pcfg, tmp_path / "run", checkpoint_every=2)
    assert result.resumed_from == 4 and [r["step"] for r in result.telemetry] == [1, 2, 3, 4, 5]
    assert resumed.w.item() == straight.w.item()
    assert (json.loads((tmp_path / "run" / "final" / "best.json").read_text())["step"]
            == json.loads((tmp_path / "straight" / "final" / "best.json").read_text())["step"] == 3)


def test_validation_needs_a_phase_that_can_validate(tiny: Config, tmp_path: Path) -> None:
    phase = _Ramp(target=0.0)
    phase.validate = None
    with pytest.raises(ValueError, match="eval_every=2 needs a phase with validate"):
        fit(phase, PhaseConfig(steps=2, eval_every=2), tmp_path, checkpoint_every=2)


def test_jt1_exports_the_gistnet_whose_held_out_loss_it_recorded(tiny: Config, tmp_path: Path) -> None:
    from megacontext.data.windows import SeedOffset

    phase = _phase(tiny)
    fit(phase, PhaseConfig(steps=4, batch=2, lr=3e-2, eval_every=2, eval_windows=2), tmp_path, checkpoint_every=2)
    best = json.loads((tmp_path / "final" / "best.json").read_text())
    reread = _phase(tiny)
    reread.gistnet.load_state_dict(load_gistnet(tmp_path / "final").state_dict())
    assert reread.validate(2) == pytest.approx(best["val_loss"], rel=1e-6)
    held_out = {(w.doc_id, w.start) for w in (phase.unseen_window(SeedOffset.JT1_HELDOUT, i) for i in range(2))}
    guard = {(w.doc_id, w.start) for w in (phase.unseen_window(SeedOffset.JT1_GUARD, i) for i in range(2))}
    assert held_out != guard


def test_a_phase_summary_names_the_exported_step_beside_the_last_one(tmp_path) -> None:
    from megacontext.training.cycle import _log_fit
    from megacontext.training.loop import BEST_JSON, FitResult

    class Recorder:
        def __init__(self):
            self.rows, self.summaries = [], {}

        def log_telemetry(self, rows):
            self.rows.extend(rows)

        def summary(self, values):
            self.summaries.update(values)

    rows = [{"step": 4.0, "loss": 2.0, "val_loss": 1.5}, {"step": 8.0, "loss": 1.0, "val_loss": 1.7}]
    (tmp_path / "final").mkdir()
    run = Recorder()
    _log_fit(run, FitResult(8, 0, rows, 3.0), tmp_path)  # no validation: no best.json
    assert run.summaries == {"final_step": 8.0, "final_loss": 1.0, "final_val_loss": 1.7, "seconds": 3.0}
    (tmp_path / "final" / BEST_JSON).write_text('{"step": 4, "val_loss": 1.5, "start_val_loss": 1.9, "files": {}}')
    run = Recorder()
    _log_fit(run, FitResult(8, 0, rows, 3.0), tmp_path)
    assert run.rows == rows and run.summaries["final_step"] == 8.0
    assert (run.summaries["exported_step"], run.summaries["exported_val_loss"], run.summaries["start_val_loss"]) == (4, 1.5, 1.9)
