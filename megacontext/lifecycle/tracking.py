"""W&B tracking (docs/lifecycle.md §5): one run per lifecycle step, grouped by cycle, job type = phase.

A thin wrapper around `wandb.init` (dagster-wandb is broken with current wandb
and offline mode). The mode comes from WANDB_MODE and defaults to `offline`, so
nothing needs an account or the network; `online` only when the user sets it;
tests use `disabled`. Tracking never fails a step: if W&B cannot start, a
warning is logged and a no-op run stands in. The active run's id and URL are
what lineage manifests record (`current_run`).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)
_ACTIVE: ContextVar["Run | None"] = ContextVar("megacontext_wandb_run", default=None)
MODES = ("offline", "online", "disabled")


class Run:
    """What a lifecycle step logs to: per-step rows, a summary, and the run's identity."""

    def __init__(self, run: Any | None = None):
        self._run = run

    @property
    def id(self) -> str | None:
        return getattr(self._run, "id", None)

    @property
    def url(self) -> str | None:
        try:
            return getattr(self._run, "url", None)
        except Exception:  # offline runs have no URL; some versions raise instead of returning None
            return None

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, values: Mapping[str, float], step: int | None = None) -> None:
        if self._run is not None:
            self._run.log(dict(values), step=step)

    def log_telemetry(self, rows: Sequence[Mapping[str, float]], prefix: str = "") -> None:
        """Training-loop telemetry rows (one per optimiser step, with a `step` key)."""
        for row in rows:
            self.log({f"{prefix}{k}": v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def summary(self, values: Mapping[str, Any]) -> None:
        if self._run is not None:
            for key, value in values.items():
                self._run.summary[key] = value


def mode() -> str:
    value = os.environ.get("WANDB_MODE", "offline")
    return value if value in MODES else "offline"


def current_run() -> Run | None:
    """The run of the step in progress (its id goes into the manifests it writes)."""
    return _ACTIVE.get()


@contextmanager
def start_run(config: Mapping[str, Any], *, name: str, group: str, job_type: str, directory: Path) -> Iterator[Run]:
    """A W&B run for one step; finished on exit (also on error), never raising because of W&B itself."""
    run = Run()
    if mode() != "disabled":
        try:
            import wandb

            Path(directory).mkdir(parents=True, exist_ok=True)
            run = Run(wandb.init(project=os.environ.get("WANDB_PROJECT", "megacontext"), name=name, group=group,
                                 job_type=job_type, config=dict(config), dir=str(directory), mode=mode(),
                                 reinit="finish_previous", settings=wandb.Settings(silent=True, console="off")))
        except Exception as exc:  # tracking must never stop training
            log.warning("W&B run %s could not start (%s); continuing without tracking", name, exc)
    token = _ACTIVE.set(run)
    try:
        yield run
    finally:
        _ACTIVE.reset(token)
        if run.active:
            try:
                run._run.finish()
            except Exception as exc:
                log.warning("W&B run %s did not finish cleanly (%s)", name, exc)
