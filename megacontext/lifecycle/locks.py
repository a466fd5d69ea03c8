"""One writer per artifact: an advisory file lock beside each artifact folder (via `filelock`).

A command that writes an artifact (a cycle, the shards, the references, the model cache...)
holds `.<name>.lock` next to the folder while it works. A second writer either waits for it
(`wait` seconds: the model cache, where the second one then reuses the first one's result)
or refuses at once with who holds it: pid, host, command line and since when. The lock is an
OS file lock (`flock`), so a killed holder releases it; the `.lock.json` beside it only
describes the holder. Locks are re-entrant within a process (the whole cycle and each of
its phases take the same lock).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from filelock import FileLock, Timeout

from megacontext.errors import ArtifactError
from megacontext.lifecycle.lineage import running, sweep_leftovers

F = TypeVar("F", bound=Callable[..., Any])
_LOCKS: dict[Path, FileLock] = {}  # one FileLock object per path and process, so that nesting re-enters it


class ArtifactBusy(ArtifactError):
    """Another process is writing this artifact right now."""


def lock_path(folder: Path) -> Path:
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def holder(folder: Path, *, settle: float = 2.0) -> str:
    """Who holds the lock on `folder`, as recorded by the holder (best effort).

    The holder writes its record just after it takes the lock, so a caller that was refused in
    between finds no record yet, or a dead holder's stale one; it waits up to `settle` seconds
    for a live holder's record before it gives up.
    """
    record = lock_path(folder).with_suffix(".lock.json")
    deadline = time.monotonic() + settle
    while True:
        try:
            info = json.loads(record.read_text())
            if info["host"] != socket.gethostname() or running(int(info["pid"])):
                return f"pid {info['pid']} on {info['host']} (`{info['command']}`, since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if time.monotonic() >= deadline:
            return "another process (no holder record)"
        time.sleep(0.05)


@contextmanager
def artifact_lock(folder: Path, *, wait: float = 0.0) -> Iterator[None]:
    """Hold the write lock of the artifact at `folder` for the duration of the block.

    Args:
        folder: the artifact folder (need not exist yet; its parent is created).
        wait: seconds to wait for another holder; 0 refuses at once.

    Raises:
        ArtifactBusy: another process holds the lock (after `wait`): one line naming the folder
            and the holder.
    """
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _LOCKS.setdefault(path, FileLock(path, thread_local=False))
    outermost = not lock.is_locked
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = holder(folder)
        try:
            if wait > 0:
                print(f"{Path(folder)}: waiting (up to {wait:,.0f} s) for {who}", file=sys.stderr, flush=True)
                lock.acquire(timeout=wait, poll_interval=0.5)
            else:  # once more: a holder that finished while we looked for its record has freed the lock
                lock.acquire(timeout=0)
        except Timeout:
            raise ArtifactBusy(f"{Path(folder)}: being written by {holder(folder) if wait > 0 else who}; wait for "
                               "it to finish or stop that process, then rerun") from None
    try:
        if outermost:  # the record first (a refused writer is waiting to name us), written whole
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                      "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            staging = path.with_name(f"{path.stem}.{os.getpid()}.lock.json")  # a lock file to lineage, too
            staging.write_text(json.dumps(record) + "\n")
            os.replace(staging, path.with_suffix(".lock.json"))
            sweep_leftovers(Path(folder).parent, Path(folder).name)  # a killed writer's: safe under the lock
        yield
    finally:
        if outermost:  # a finished holder's record goes with it (a killed one's is left: see `holder`)
            path.with_suffix(".lock.json").unlink(missing_ok=True)
        lock.release()


def locked(folder_of: Callable[..., Path], *, wait: float = 0.0) -> Callable[[F], F]:
    """Decorate a builder so that it runs under `artifact_lock(folder_of(*args, **kwargs), wait=wait)`."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with artifact_lock(folder_of(*args, **kwargs), wait=wait):
                return fn(*args, **kwargs)
        return run  # type: ignore[return-value]
    return decorate
