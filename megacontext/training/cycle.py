"""One training cycle: JT1 (GistNet) -> JT2 (labels, LensNet) -> JT3 (LoRA), warm-started (docs/lifecycle.md §3).

Each phase is its own function that reads what it needs from disk (the cycle
folder and the previous accepted cycle), so the CLI runs them in a row and
Dagster runs them as separate assets. Cycle 1 starts from nothing
(mean-initialised GistNet; an untrained LensNet scores 0, so the allocator
keeps the cold start); cycle n from cycle n−1's checkpoints. A finished phase
is not redone and an interrupted one resumes from its checkpoints.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from megacontext.config import Config, config_hash
from megacontext.context.focus_policy import lens_policy
from megacontext.context.tree_build import build_trees
from megacontext.errors import ConfigError
from megacontext.data.shards import TokenizedDocument, read_split, shards_dir
from megacontext.data.windows import SeedOffset, eligible
from megacontext.lifecycle.lineage import MANIFEST, stale_inputs, verify_files, write_manifest
from megacontext.lifecycle.locks import artifact_lock
from megacontext.lifecycle.tracking import Run, start_run
from megacontext.model.base_model import BaseLM, load_base_model
from megacontext.model.gaussian_rope import install_gaussian_rope
from megacontext.model.gistnet import GistNet, build_gistnet, load_gistnet
from megacontext.model.lensnet import LensNet, build_lensnet, load_lensnet
from megacontext.model.lora import attach_lora, load_lora
from megacontext.plots import plot_telemetry
from megacontext.training.jt1_gistnet import JT1GistNet, gist_guard
from megacontext.training.jt2_lensnet import JT2LensNet, generate_labels, snapshot_window
from megacontext.training.jt3_lora import JT3LoRA, plain_reading_guard
from megacontext.training.loop import BEST_JSON, FitResult, fit, world
from megacontext.training.teacher import teacher_masses

KIND = "cycle"
FORMAT_VERSION = 1
PHASES = ("jt1", "jt2", "jt3")
F = TypeVar("F", bound=Callable[..., Any])
PHASE_KINDS = {"jt1": "gistnet", "jt2": "lensnet", "jt3": "lora_adapter", "labels": "lens_labels"}


def cycle_name(cycle: int) -> str:
    """The one spelling of a cycle: `cycle-0001` (also its folder and Dagster partition name).

    Raises ConfigError for anything but an integer ≥ 1 (`cycle-0000` or `cycle--001` would alias).
    """
    if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 1:
        raise ConfigError(f"cycle numbers start at 1; got {cycle!r}")
    return f"cycle-{cycle:04d}"


def parse_cycle_name(name: str) -> int:
    """`cycle-0007` -> 7. Raises ValueError for any other spelling (`cycle-7`, `cycle-0000`), naming the form."""
    prefix, _, number = name.partition("-")
    if prefix != "cycle" or not number.isdigit() or int(number) < 1 or name != f"cycle-{int(number):04d}":
        hint = f"cycle-{int(number):04d}" if number.isdigit() and int(number) >= 1 else "cycle-0001"
        raise ValueError(f"{name!r} is not a cycle name; cycles are spelled like {hint}")
    return int(number)


def cycle_dir(cfg: Config, cycle: int) -> Path:
    return Path(cfg.paths.artifact_root) / "cycles" / cycle_name(cycle)


def phase_done(folder: Path) -> bool:
    """A phase is done when its `final/` output carries its lineage manifest (written last)."""
    return (folder / "final" / MANIFEST).is_file()


def _artifacts(*folders: Path | None) -> list[Path]:
    return [f for f in folders if f is not None and (f / MANIFEST).is_file()]


def _seal(cfg: Config, folder: Path, kind: str, cycle: int, previous: Path | None, *inputs: Path | None) -> None:
    """Lineage for one phase output: the shards, what this phase read, and the warm start (rank 0 writes)."""
    if not _rank0():
        return
    if (folder / "telemetry.json").is_file():
        plot_telemetry(json.loads((folder / "telemetry.json").read_text()), folder / "telemetry.png",
                       title=f"cycle {cycle} {kind}")
    write_manifest(folder, kind=kind, format_version=FORMAT_VERSION, config_hash=config_hash(cfg),
                   inputs=_artifacts(shards_dir(cfg), *inputs),
                   extra={"cycle": cycle, "previous": str(previous) if previous else None})


def _warm(previous: Path | None, phase: str) -> Path | None:
    return previous / phase / "final" if previous else None


def _cycle_locked(fn: F) -> F:
    """Run a cycle step under the cycle folder's write lock (rank 0 holds it for its torchrun group).

    A second writer of the same cycle (another `train-cycle`, a Dagster materialization of the
    same partition) refuses at once, naming the holder, instead of mixing two runs in one folder.
    """
    @functools.wraps(fn)
    def run(cfg: Config, cycle: int, *args: Any, **kwargs: Any) -> Any:
        with artifact_lock(cycle_dir(cfg, cycle)) if _rank0() else nullcontext():
            return fn(cfg, cycle, *args, **kwargs)
    return run  # type: ignore[return-value]


def _rank0() -> bool:
    """Under torchrun every rank trains; only rank 0 writes shared files."""
    return world()[0] == 0


def _barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


@contextmanager
def _tracked(cfg: Config, cycle: int, phase: str) -> Iterator[Run]:
    """One W&B run per phase (rank 0 only), grouped by cycle; manifests written inside record its id."""
    if not _rank0():
        yield Run()
        return
    with start_run(cfg.model_dump(mode="json"), name=f"{cycle_name(cycle)}-{phase}", group=cycle_name(cycle),
                   job_type=phase, directory=Path(cfg.paths.artifact_root)) as run:
        yield run


def _log_fit(run: Run, result: FitResult, out: Path) -> None:
    """Telemetry and a run summary: `final_*` = the last step's row; with held-out validation also the
    exported step (`exported_step`, `exported_val_loss`, `start_val_loss`: `<out>/final/best.json`)."""
    run.log_telemetry(result.telemetry)
    summary = {f"final_{k}": v for k, v in result.telemetry[-1].items()} | {"seconds": result.seconds}
    best = out / "final" / BEST_JSON
    if best.is_file():
        record = json.loads(best.read_text())
        summary |= {"exported_step": record["step"], "exported_val_loss": record["val_loss"],
                    "start_val_loss": record["start_val_loss"]}
    run.summary(summary)


def _setup(cfg: Config, cycle: int) -> tuple[Path, BaseLM, list[TokenizedDocument]]:
    out = cycle_dir(cfg, cycle)
    if _rank0():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    base = load_base_model(cfg)
    install_gaussian_rope(base.model)
    return out, base, read_split(shards_dir(cfg), "train", tokenizer_name=base.tokenizer.name)


def _gistnet(cfg: Config, base: BaseLM, out: Path, previous: Path | None) -> GistNet:
    """This cycle's GistNet if JT1 finished, else the warm start (previous cycle's, or fresh)."""
    if phase_done(out / "jt1"):
        return load_gistnet(out / "jt1" / "final", base.model)
    if previous:
        net = load_gistnet(previous / "jt1" / "final", base.model)
        saved, asked = (net.cfg.inputs, net.cfg.input_layers), (cfg.gistnet.inputs, cfg.gistnet.input_layers)
        if saved[0] != asked[0] or (asked[0] != "embeddings" and saved != asked):
            raise ConfigError(f"{previous}: its GistNet reads gistnet.inputs={saved[0]} (input_layers {saved[1]}), this "
                              f"config asks for {asked[0]} (input_layers {asked[1]}); start a new lineage (a cycle "
                              "without --previous) or keep the setting")
        return net
    return build_gistnet(cfg.gistnet, base.model.get_input_embeddings(), seed=cfg.seed, levels=cfg.wc.levels,
                         model=base.model)


def _lensnet(cfg: Config, base: BaseLM, out: Path, previous: Path | None) -> LensNet:
    """This cycle's LensNet if JT2 finished, else the warm start (previous cycle's, or fresh). A warm
    start must read the same inputs as the config asks for (ConfigError: no silent inherited setting)."""
    if phase_done(out / "jt2"):
        return load_lensnet(out / "jt2" / "final")
    if previous:
        net = load_lensnet(previous / "jt2" / "final")
        if net.cfg.wc_attention_queries != cfg.lensnet.wc_attention_queries:
            raise ConfigError(f"{previous}: its LensNet reads lensnet.wc_attention_queries="
                              f"{net.cfg.wc_attention_queries}, this config asks for {cfg.lensnet.wc_attention_queries}; "
                              "start a new lineage (a cycle without --previous) or keep the setting")
        return net
    return build_lensnet(cfg.lensnet, base.d_model, seed=cfg.seed)


@_cycle_locked
def run_jt1(cfg: Config, cycle: int, previous: Path | None = None) -> Path:
    """JT1: train GistNet under the current (previous cycle's) focus policy."""
    out, base, docs = _setup(cfg, cycle)
    if not phase_done(out / "jt1"):
        gistnet, lensnet = _gistnet(cfg, base, out, previous), _lensnet(cfg, base, out, previous)
        policy = lens_policy(cfg, base.model.get_input_embeddings(), gistnet, lensnet, model=base.model)
        warm = copy.deepcopy(gistnet).requires_grad_(False)  # before fit resumes anything
        with _tracked(cfg, cycle, "jt1") as run:
            phase = JT1GistNet(cfg, base, gistnet, docs, policy)
            _log_fit(run, fit(phase, cfg.train.jt1, out / "jt1", checkpoint_every=cfg.train.checkpoint_every), out / "jt1")
            if _rank0() and cfg.train.gist_guard_windows:
                guard = _guard_gists(cfg, phase, warm, out / "jt1" / "final")
                run.summary({"guard_accepted": guard["accepted"],
                             **{f"guard_{k}": guard[k]["value"] for k in GIST_GUARD_DELTAS}})
            _seal(cfg, out / "jt1" / "final", PHASE_KINDS["jt1"], cycle, previous, _warm(previous, "jt1"),
                  _warm(previous, "jt2"))
    _barrier()  # every rank sees the sealed output before going on
    return out / "jt1" / "final"


@_cycle_locked
def run_jt2_labels(cfg: Config, cycle: int, previous: Path | None = None) -> Path:
    """JT2 labels: counterfactual ΔNLL on on-policy snapshots, with this cycle's GistNet."""
    out, base, docs = _setup(cfg, cycle)
    labels = out / "jt2" / "labels"
    if not (labels / MANIFEST).is_file() and _rank0():  # labels are generated once, on rank 0
        gistnet, lensnet = _gistnet(cfg, base, out, previous), _lensnet(cfg, base, out, previous)
        gistnet.requires_grad_(False)
        policy = lens_policy(cfg, base.model.get_input_embeddings(), gistnet, lensnet, model=base.model)
        with _tracked(cfg, cycle, "jt2_labels") as run:
            stats = generate_labels(cfg, base, gistnet, docs, policy, labels)
            run.summary(stats)
            (labels / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
            _seal(cfg, labels, PHASE_KINDS["labels"], cycle, previous, out / "jt1" / "final", _warm(previous, "jt2"))
    _barrier()
    return labels


@_cycle_locked
def run_jt2(cfg: Config, cycle: int, previous: Path | None = None) -> Path:
    """JT2: train LensNet on this cycle's labels."""
    labels = run_jt2_labels(cfg, cycle, previous)
    out, base, docs = _setup(cfg, cycle)
    if not phase_done(out / "jt2"):
        gistnet, lensnet = _gistnet(cfg, base, out, previous), _lensnet(cfg, base, out, previous)
        gistnet.requires_grad_(False)
        policy = lens_policy(cfg, base.model.get_input_embeddings(), gistnet, lensnet, model=base.model)
        masses, teacher = _teacher(cfg, base, docs, cfg.train.teacher_windows)
        jt2 = cfg.train.jt2
        heldout, heldout_dir = _teacher(cfg, base, docs, jt2.eval_windows if jt2.eval_every else 0,
                                        SeedOffset.JT2_HELDOUT)
        with _tracked(cfg, cycle, "jt2") as run:
            phase = JT2LensNet(cfg, base, gistnet, lensnet, docs, policy, labels, masses, heldout)
            _log_fit(run, fit(phase, jt2, out / "jt2", checkpoint_every=cfg.train.checkpoint_every), out / "jt2")
            _seal(cfg, out / "jt2" / "final", PHASE_KINDS["jt2"], cycle, previous, labels, out / "jt1" / "final",
                  _warm(previous, "jt2"), teacher, heldout_dir)
    _barrier()  # every rank sees the sealed output before going on
    return out / "jt2" / "final"


def _teacher(cfg: Config, base: BaseLM, docs: list[TokenizedDocument], count: int,
             stream: SeedOffset = SeedOffset.JT2_SNAPSHOTS) -> tuple[list[np.ndarray], Path | None]:
    """Teacher block masses of the first `count` windows of a JT2 stream (cached across cycles)."""
    if not count:
        return [], None
    usable = eligible(docs, cfg.train.history, cfg.train.horizon)
    windows = [snapshot_window(cfg, usable, i, stream) for i in range(count)]
    built = teacher_masses(cfg, base, windows) if _rank0() else None  # rank 0 builds; the others read its cache
    _barrier()
    return built or teacher_masses(cfg, base, windows)


@_cycle_locked
def run_jt3(cfg: Config, cycle: int, previous: Path | None = None) -> Path:
    """JT3: train LoRA adapters with this cycle's GistNet and LensNet frozen."""
    out, base, docs = _setup(cfg, cycle)
    if not phase_done(out / "jt3"):
        gistnet, lensnet = _gistnet(cfg, base, out, previous), _lensnet(cfg, base, out, previous)
        gistnet.requires_grad_(False)
        lensnet.requires_grad_(False)
        embedding = base.model.get_input_embeddings()  # the plain one, before the adapters wrap it
        peft = load_lora(base, previous / "jt3" / "final", trainable=True) if previous \
            else attach_lora(base, cfg.train.lora, seed=cfg.seed)
        policy = lens_policy(cfg, embedding, gistnet, lensnet, model=base.model, plain=peft.disable_adapter)
        phase = JT3LoRA(cfg, base, gistnet, docs, policy, peft_model=peft)
        warm = {name: p.detach().clone() for name, p in phase.trainable().items()}  # before fit resumes anything
        with _tracked(cfg, cycle, "jt3") as run:
            _log_fit(run, fit(phase, cfg.train.jt3, out / "jt3", checkpoint_every=cfg.train.checkpoint_every), out / "jt3")
            if _rank0() and cfg.train.lora.guard_windows:
                guard = _guard_adapters(cfg, phase, warm, out / "jt3" / "final")
                run.summary({f"guard_{k}": v for k, v in guard.items() if not isinstance(v, dict)}
                            | {"guard_wc_delta": guard["wc_delta"]["value"],
                               "guard_recency_delta": guard["recency_delta"]["value"]})
            _seal(cfg, out / "jt3" / "final", PHASE_KINDS["jt3"], cycle, previous, out / "jt1" / "final",
                  out / "jt2" / "final", _warm(previous, "jt3"))
    _barrier()  # every rank sees the sealed output before going on
    return out / "jt3" / "final"


GIST_GUARD_DELTAS = ("trained_minus_warm", "trained_minus_left_out", "warm_minus_left_out")


def _guard_gists(cfg: Config, phase: JT1GistNet, warm: GistNet, final: Path) -> dict[str, Any]:
    """The gist guard on JT1's trained GistNet: keep it, or export the warm start instead.

    Writes `final/guard.json` (the measurement and the decision). A rejected cycle's GistNet is the
    warm start's: the previous cycle's, or at cycle 1 the mean-initialised one.
    """
    guard = gist_guard(phase, warm, windows=cfg.train.gist_guard_windows)
    return _settle_guard(guard, phase, lambda: phase.gistnet.load_state_dict(warm.state_dict()), final,
                         f"jt1 gist guard on {guard['windows']} windows: trained gists {{verdict}}; NLL@H trained - "
                         f"warm {guard['trained_minus_warm']['value']:+.4f}, trained - left out "
                         f"{guard['trained_minus_left_out']['value']:+.4f} nats/token", "GistNet is")


def _guard_adapters(cfg: Config, phase: JT3LoRA, warm: dict[str, torch.Tensor], final: Path) -> dict[str, Any]:
    """The plain-reading guard on JT3's trained adapters: keep them, or export the warm start instead.

    Writes `final/guard.json` (the measurement and the decision). A rejected cycle's adapters are the
    warm start's: the previous cycle's, or at cycle 1 LoRA's initialisation (B = 0: the plain base).
    """
    lora = cfg.train.lora
    guard = plain_reading_guard(phase, windows=lora.guard_windows, tolerance=lora.guard_tolerance)

    def restore() -> None:
        for name, p in phase.trainable().items():
            p.copy_(warm[name])

    return _settle_guard(guard, phase, restore, final,
                         f"jt3 plain-reading guard on {guard['windows']} windows: adapters {{verdict}}; "
                         f"WC NLL@H {guard['wc_delta']['value']:+.4f}, recency NLL@H "
                         f"{guard['recency_delta']['value']:+.4f} nats/token (adapted - plain)", "adapters are")


def _settle_guard(guard: dict[str, Any], phase: Any, restore: Callable[[], Any], final: Path, message: str,
                  what: str) -> dict[str, Any]:
    """What every phase guard does with its verdict: on rejection restore the warm start (`restore`, under
    no_grad) and re-export it into `final`; print `message` (its `{verdict}` filled in); write
    `final/guard.json`. Returns `guard`."""
    if not guard["accepted"]:
        with torch.no_grad():
            restore()
        phase.export(final)
    verdict = ("kept" if guard["accepted"]
               else f"unchanged (early stopping kept the warm start; the warm start's {what} exported)"
               if guard.get("unchanged") else f"REJECTED (the warm start's {what} exported)")
    print(message.format(verdict=verdict), flush=True)
    (final / "guard.json").write_text(json.dumps(guard, indent=1) + "\n")
    return guard


@_cycle_locked
def finish_cycle(cfg: Config, cycle: int, previous: Path | None = None) -> Path:
    """Trees of the evaluation split with the new GistNet, the cycle summary and its lineage manifest."""
    out = cycle_dir(cfg, cycle)
    missing = [p for p in PHASES if not phase_done(out / p)]
    if missing:
        raise RuntimeError(f"{out}: phases {missing} have not finished; run them first")
    if (out / MANIFEST).is_file() and not verify_files(out) and not stale_inputs(out, within=out):
        return out  # finished before: rewriting it would break the lineage of its evaluations
    # (a phase output rebuilt since, e.g. after a repair, makes a new cycle manifest: its old evaluations go stale)
    with _tracked(cfg, cycle, "finish") as run:
        out = _finish(cfg, cycle, previous)
        run.summary(json.loads((out / "cycle.json").read_text())["seconds"])
    return out


def _finish(cfg: Config, cycle: int, previous: Path | None) -> Path:
    out = cycle_dir(cfg, cycle)
    base = load_base_model(cfg)  # plain (no adapters): trees hold what GistNet makes of the base embedding
    tick = time.perf_counter()
    with torch.no_grad():
        build_trees(cfg, base=base, gistnet=load_gistnet(out / "jt1" / "final", base.model), out=out / "trees",
                    splits=(cfg.eval.split,), gistnet_source=out / "jt1" / "final")
    telemetry = {p: json.loads((out / p / "final" / "telemetry.json").read_text()) for p in PHASES}
    labels = json.loads((out / "jt2" / "labels" / "stats.json").read_text())
    seconds = {p: sum(r["seconds"] for r in rows) for p, rows in telemetry.items()}
    seconds.update({"jt2_labels": labels["seconds"], "trees": time.perf_counter() - tick})
    seconds["total"] = sum(seconds.values())
    guards = {name: out / phase / "final" / "guard.json" for name, phase in (("gist_guard", "jt1"), ("lora_guard", "jt3"))}
    early = {p: out / p / "final" / BEST_JSON for p in PHASES}  # phases run with held-out validation
    summary = {"cycle": cycle, "previous": str(previous) if previous else None, "seconds": seconds,
               "labels": labels, "telemetry": telemetry,
               "best_steps": {p: {k: v for k, v in json.loads(f.read_text()).items() if k != "files"}
                              for p, f in early.items() if f.is_file()},
               **{name: json.loads(g.read_text()) if g.is_file() else None for name, g in guards.items()}}
    (out / "cycle.json").write_text(json.dumps(summary, indent=1) + "\n")
    inputs = _artifacts(shards_dir(cfg), *(out / p / "final" for p in PHASES), out / "jt2" / "labels", out / "trees",
                        previous)
    write_manifest(out, kind=KIND, format_version=FORMAT_VERSION, config_hash=config_hash(cfg), inputs=inputs,
                   extra={"cycle": cycle, "base_model_id": base.model_id, "previous": summary["previous"]})
    return out


@_cycle_locked
def run_cycle(cfg: Config, cycle: int, *, previous: Path | None = None) -> Path:
    """Run (or resume) the whole cycle; return its folder."""
    run_jt1(cfg, cycle, previous)
    run_jt2(cfg, cycle, previous)
    run_jt3(cfg, cycle, previous)
    return finish_cycle(cfg, cycle, previous)
