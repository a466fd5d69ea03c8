"""The one training loop every phase plugs into (docs/style.md §7): resumable, data-parallel, logged.

A phase says what trains (`trainable`), how the batch of a step is built
(`make_batch`, a pure function of the step and item indices, so a resumed or
data-parallel run sees exactly the same data) and how the loss is computed.
The loop owns the optimiser, gradient all-reduce under `torchrun` (DDP, gloo
on CPU), clipping, telemetry, and checkpoints (safetensors + JSON, published
by atomic rename; resuming picks the latest complete one). It does not know
what a gist or a working context is.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from megacontext.config import PhaseConfig
from megacontext.errors import ArtifactError, ConfigError
from megacontext.lifecycle.lineage import file_entry, recorded_problems, staged_folder, sweep_leftovers
from megacontext.progress import progress_bar

CHECKPOINTS = "checkpoints"
STATE = "state.json"  # written last inside a checkpoint; its presence marks it complete
KEEP_CHECKPOINTS = 2
WEIGHTS = ("trainable.safetensors", "optimizer.safetensors")  # digests recorded in STATE, checked on resume


class Phase(Protocol):
    name: str

    def trainable(self) -> dict[str, nn.Parameter]: ...  # exactly the parameters this phase updates

    def make_batch(self, step: int, items: list[int]) -> Any: ...  # items: this rank's indices of the global batch

    def loss(self, batch: Any, global_batch: int) -> tuple[torch.Tensor, dict[str, float]]: ...  # sum over items / global

    def export(self, folder: Path) -> None: ...  # publish the trained weights

    # Optional, needed when the phase config sets `eval_every`: the held-out loss (lower is better)
    # of the current weights on `windows` unseen windows, the same windows at every call.
    # def validate(self, windows: int) -> float: ...


@dataclass(frozen=True)
class FitResult:
    steps: int
    resumed_from: int
    telemetry: list[dict[str, float]]
    seconds: float


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless running under an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def param_groups(params: dict[str, nn.Parameter], pcfg: PhaseConfig) -> list[dict]:
    """The optimiser's parameter groups: one per learning-rate multiplier of `pcfg.lr_scales` (a parameter
    takes the first key its name contains; 1.0 otherwise), each with its `lr_scale`; empty groups dropped.
    Raises ConfigError for a key no parameter name contains (a typo would silently train at lr)."""
    unmatched = [key for key in pcfg.lr_scales if not any(key in name for name in params)]
    if unmatched:
        raise ConfigError(f"lr_scales: no trainable parameter name contains {unmatched}; the names start with "
                          f"{sorted({name.split('.')[0] for name in params})}")
    scales = [*pcfg.lr_scales.values(), 1.0]
    members: list[list[nn.Parameter]] = [[] for _ in scales]
    for name, p in params.items():
        members[next((i for i, key in enumerate(pcfg.lr_scales) if key in name), len(scales) - 1)].append(p)
    return [{"params": ps, "lr_scale": scale} for ps, scale in zip(members, scales) if ps]


def learning_rate(pcfg: PhaseConfig, step: int) -> float:
    """The learning rate of optimiser step `step` (0-based): linear warm-up over `pcfg.warmup` steps, then `pcfg.lr`."""
    return pcfg.lr * min(1.0, (step + 1) / pcfg.warmup) if pcfg.warmup else pcfg.lr


def fit(phase: Phase, pcfg: PhaseConfig, out: Path, *, checkpoint_every: int) -> FitResult:
    """Train `phase` for `pcfg.steps` optimiser steps, resuming from `out/checkpoints` if present.

    With `pcfg.eval_every` > 0 the phase's held-out loss (`phase.validate`) is measured before the
    first step and every `eval_every` steps (and after the last); the best weights so far are kept in
    `out/best/` and are what `out/final/` exports, so a phase that only got worse exports its warm start.
    With `pcfg.patience` > 0 training stops after that many validations without improvement
    (early stopping; the telemetry row of the last step says `early_stop`). Raises ValueError when
    `eval_every` is set and the phase has no `validate`.
    """
    rank, size = world()
    params = phase.trainable()
    validating = pcfg.eval_every > 0
    if validating and not callable(getattr(phase, "validate", None)):
        raise ValueError(f"{phase.name}: eval_every={pcfg.eval_every} needs a phase with validate(windows)")
    optimizer = torch.optim.AdamW(param_groups(params, pcfg), lr=pcfg.lr, weight_decay=pcfg.weight_decay)
    start, telemetry = load_latest_checkpoint(out, params, optimizer)
    began = time.perf_counter()
    items = [i for i in range(pcfg.batch) if i % size == rank]
    best = _read_best(out) if validating else None
    if validating and size > 1:
        dist.barrier()  # every rank has read best/ before rank 0 may rewrite it: one view, one path
    if validating and best is None:
        # a fresh run: step 0, the warm start, is the first candidate. A run resumed from a checkpoint
        # without a best record (validation newly switched on) starts its record at that step; its warm
        # start's loss is unknown, never the checkpoint's relabelled as step 0
        loss = _validate(phase, pcfg.eval_windows)
        best = _save_best(out, start, params, loss, rank, start_val_loss=loss if start == 0 else None)
    stopped = bool(telemetry and telemetry[-1].get("early_stop"))
    with progress_bar(phase.name, total=pcfg.steps, unit="steps") as advance:
        advance(start)
        for step in range(start, pcfg.steps if not stopped else start):
            tick = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(pcfg, step) * group["lr_scale"]
            loss, metrics = phase.loss(phase.make_batch(step, items), pcfg.batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stats = torch.tensor([loss.item()] + [metrics.get(k, 0.0) for k in sorted(metrics)], dtype=torch.float64)
            if size > 1:
                _all_reduce_grads(params)
                dist.all_reduce(stats)  # losses and metric sums across ranks
            grad_norm = nn.utils.clip_grad_norm_(list(params.values()), pcfg.grad_clip).item()
            optimizer.step()
            seconds = time.perf_counter() - tick
            row = {"step": step + 1, "loss": stats[0].item(), "grad_norm": grad_norm, "seconds": seconds}
            row.update({k: v.item() for k, v in zip(sorted(metrics), stats[1:])})
            for key in set(metrics) - {"tokens", "windows", "blocks"}:  # phases report sums; log means per window
                row[key] /= max(row.get("windows", 1.0), 1.0)
            if "tokens" in row:
                row["tokens_per_s"] = row["tokens"] / seconds
            if row.get("blocks"):  # 32-token blocks of history + horizon this step processed
                row["ms_per_block"] = 1000 * seconds / row["blocks"]
            row["lr"] = learning_rate(pcfg, step)  # what this step used (before any lr_scales)
            if validating and ((step + 1) % pcfg.eval_every == 0 or step + 1 == pcfg.steps):
                row["val_loss"] = _validate(phase, pcfg.eval_windows)
                if row["val_loss"] < best["val_loss"]:
                    best = _save_best(out, step + 1, params, row["val_loss"], rank, best["start_val_loss"])
                elif pcfg.patience and _validations_since(telemetry + [row], best["step"]) >= pcfg.patience:
                    row["early_stop"] = 1.0
            telemetry.append(row)
            stopped = bool(row.get("early_stop"))
            if rank == 0 and ((step + 1) % checkpoint_every == 0 or step + 1 == pcfg.steps or stopped):
                save_checkpoint(out, step + 1, params, optimizer, telemetry)
            advance(1)
            if stopped:
                break
    if validating:  # export the best step's weights, not the last step's
        _load_best(out, params)
    if rank == 0:
        sweep_leftovers(out)  # this phase's folder: a killed run's half-published best/, final/, ...
        with staged_folder(out / "final") as staging:
            phase.export(staging)
            if validating:
                (staging / BEST_JSON).write_text(json.dumps(best, indent=1) + "\n")
            (staging / "telemetry.json").write_text(json.dumps(telemetry, indent=1) + "\n")
    if size > 1:
        dist.barrier()
    return FitResult(pcfg.steps, start, telemetry, time.perf_counter() - began)


BEST = "best"  # <phase out>/best/: the weights of the best held-out step so far
BEST_JSON = "best.json"  # {"step", "val_loss", "start_val_loss", "files"}; written last, so its presence marks `best/` complete


def _validations_since(telemetry: list[dict[str, float]], step: int) -> int:
    """How many held-out validations the rows after optimiser step `step` hold."""
    return sum(1 for row in telemetry if row["step"] > step and "val_loss" in row)


def _validate(phase: Phase, windows: int) -> float:
    """The phase's held-out loss; under DDP every rank takes rank 0's value, so all ranks make the same
    best-step and early-stop decisions (a last-bit difference must not split them)."""
    loss = torch.tensor(float(phase.validate(windows)), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(loss, src=0)
    return loss.item()


def _save_best(out: Path, step: int, params: dict[str, nn.Parameter], val_loss: float, rank: int,
               start_val_loss: float | None) -> dict[str, Any]:
    """Publish `params` as the best weights (step, held-out loss; the warm start's loss alongside, None when
    unknown) by rename: the old version is moved aside first, so a kill at any point leaves either
    version for `_read_best` (`sweep_leftovers` puts a moved-aside one back). Every rank returns the record."""
    record = {"step": step, "val_loss": val_loss, "start_val_loss": start_val_loss}
    if rank != 0:
        return record
    with staged_folder(out / BEST, complete=BEST_JSON) as staging:
        save_file({k: v.detach().contiguous() for k, v in params.items()}, staging / WEIGHTS[0])
        record["files"] = {WEIGHTS[0]: file_entry(staging / WEIGHTS[0])}
        (staging / BEST_JSON).write_text(json.dumps(record) + "\n")
    return record


def _read_best(out: Path) -> dict[str, Any] | None:
    """The best-step record of an interrupted run (None if there is none yet); its weights must match their digest."""
    folder = out / BEST
    sweep_leftovers(out, BEST)  # a kill mid-publish: the moved-aside version comes back
    if not (folder / BEST_JSON).is_file():
        return None
    record = json.loads((folder / BEST_JSON).read_text())
    problems = recorded_problems(folder, record.get("files", {}), against=BEST_JSON)
    if problems:
        raise ArtifactError(f"{problems[0]} in the best held-out weights; delete {folder} and {out / CHECKPOINTS} "
                            "and rerun the same command (the phase restarts)")
    return record


def _load_best(out: Path, params: dict[str, nn.Parameter]) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 has published best/
    _copy_weights(load_file(out / BEST / WEIGHTS[0]), params)


def _copy_weights(weights: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
    """Load `weights` (by parameter name) into `params` in place."""
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


def _all_reduce_grads(params: dict[str, nn.Parameter]) -> None:
    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)  # each rank's loss is already divided by the global batch: a sum is the mean


def save_checkpoint(out: Path, step: int, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                    telemetry: list[dict[str, float]]) -> Path:
    """Weights + optimiser state as safetensors, step + telemetry as JSON; published by rename."""
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    sweep_leftovers(root)  # a killed run's half-written checkpoint
    with staged_folder(final, complete=STATE) as staging:
        save_file({k: v.detach().contiguous() for k, v in params.items()}, staging / "trainable.safetensors")
        state: dict[str, torch.Tensor] = {}
        for name, p in params.items():
            for key, value in optimizer.state.get(p, {}).items():
                state[f"{name}::{key}"] = torch.as_tensor(value).detach().clone().contiguous()
        save_file(state, staging / "optimizer.safetensors")
        files = {name: file_entry(staging / name) for name in WEIGHTS}
        (staging / STATE).write_text(json.dumps({"step": step, "telemetry": telemetry, "files": files}) + "\n")
    for old in sorted(p for p in root.glob("step-*") if (p / STATE).is_file())[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest_checkpoint(out: Path, params: dict[str, nn.Parameter],
                           optimizer: torch.optim.Optimizer) -> tuple[int, list[dict[str, float]]]:
    """Restore the latest complete checkpoint (if any); return (step, telemetry so far)."""
    complete = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if (p / STATE).is_file())
    if not complete:
        return 0, []
    latest = complete[-1]
    meta = _verified_state(latest, complete[-2] if len(complete) > 1 else None)
    weights = load_file(latest / "trainable.safetensors")
    if set(weights) != set(params):
        raise ValueError(f"{latest}: checkpoint holds {sorted(set(weights) ^ set(params))[:3]}... not this phase's parameters")
    _copy_weights(weights, params)
    state = load_file(latest / "optimizer.safetensors")
    for name, p in params.items():
        keys = {k.split("::", 1)[1]: v for k, v in state.items() if k.split("::", 1)[0] == name}
        if keys:
            optimizer.state[p] = keys
    return meta["step"], meta["telemetry"]


def _verified_state(checkpoint: Path, earlier: Path | None) -> dict[str, Any]:
    """`state.json` of a checkpoint whose weight files match the digests it records.

    Raises ArtifactError naming the file when one differs (or the state is unreadable or has no
    digests); the advice is to delete that checkpoint so training resumes from `earlier` (or the start).
    """
    fallback = f"from {earlier.name}" if earlier is not None else "from the start"
    advice = f"delete {checkpoint} and rerun the same command (it resumes {fallback})"
    try:
        meta = json.loads((checkpoint / STATE).read_text())
        files = meta.get("files")
    except (OSError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{checkpoint / STATE}: unreadable ({exc!r}); {advice}") from exc
    if files is None:  # written before checkpoints recorded digests: resumable, but nothing to check against
        warnings.warn(f"{checkpoint}: an older checkpoint without file digests; resuming from it unverified", stacklevel=3)
        return meta
    problems = recorded_problems(checkpoint, {name: files.get(name, {}) for name in WEIGHTS}, against=STATE)
    if problems:
        raise ArtifactError(f"{problems[0]} in a training checkpoint; {advice}")
    return meta
