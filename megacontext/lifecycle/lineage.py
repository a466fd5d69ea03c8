"""Lineage manifests and crash-safe publication of artifact folders (docs/lifecycle.md §5).

Every artifact folder holds `manifest.json`: sha256 of each file, the resolved
config hash, the code version, the digests of its input artifacts' manifests
(by relative path) and of any raw source files. An artifact is built in a
staging folder and renamed into place only when complete, so a crash never
leaves a half-written folder that reads as valid, and a failed build never
touches what was there before. Walking and auditing whole chains is `audit`'s job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from megacontext import __version__
from megacontext.errors import ArtifactError
from megacontext.lifecycle.tracking import current_run

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# Fields that describe the run rather than the content; left out of the digest.
VOLATILE_FIELDS = ("created_at", "git", "wandb_run_id", "wandb_run_url")
PACKAGE_DIR = Path(__file__).resolve().parent


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def source_digest() -> str:
    """sha256 over the library's Python sources (path + content), in path order."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def git_state() -> dict[str, Any] | None:
    """The commit and dirtiness of the checkout the library runs from, if it is one."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """The content identity of an artifact: its manifest without run-specific fields."""
    return sha256_json({k: v for k, v in manifest.items() if k not in VOLATILE_FIELDS})


def artifact_files(folder: Path) -> list[Path]:
    """The files an artifact's manifest covers: everything below it except nested artifacts.

    A subfolder holding its own manifest.json (a cycle's phase outputs and
    trees) is a separate artifact, linked as an input and verified
    on its own, so it can be published after its parent without breaking it.
    """
    folder = Path(folder)
    files = []
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not (here / d / MANIFEST).is_file() and not _in_flight(d))
        files.extend(here / n for n in names if not (here == folder and n == MANIFEST) and not _is_lock(n))
    return sorted(files)


def _is_lock(name: str) -> bool:
    """A writer's lock beside a nested artifact (`.trees.lock`, `.trees.lock.json`; see locks.py): not content."""
    return name.startswith(".") and name.endswith((".lock", ".lock.json"))


def _in_flight(name: str) -> bool:
    """A nested artifact being published right now (staging or old copy), not part of the parent."""
    return name.startswith(".") and (_STAGING_MARK in name or ".old-" in name)


def file_entry(path: Path) -> dict[str, Any]:
    """What a manifest records of one file: {"sha256", "bytes"}."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    return {path.relative_to(folder).as_posix(): file_entry(path) for path in artifact_files(folder)}


def recorded_problems(folder: Path, recorded: Mapping[str, Mapping[str, Any]], *, against: str = "the manifest") -> list[str]:
    """Files of `recorded` (relative path -> file_entry) that are missing from `folder` or differ (size, then sha256)."""
    problems = []
    for rel, entry in recorded.items():
        path = Path(folder) / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            problems.append(f"{path}: content differs from {against} (modified or corrupt)")
    return problems


def write_manifest(
    folder: Path,
    *,
    kind: str,
    format_version: int,
    config_hash: str,
    inputs: Sequence[Path] = (),
    raw_inputs: Mapping[str, Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Hash every file in `folder` and write its manifest. Inputs are artifact folders.

    `inputs` are recorded by their path relative to where `folder` will be
    published (its final location is the staging folder's target), so a whole
    artifact root can be moved without breaking the chain.
    """
    final = _final_location(folder)
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "kind": kind,
        "format_version": format_version,
        "config_hash": config_hash,
        "code": {"package_version": __version__, "source_sha256": source_digest()},
        "inputs": [
            {
                "path": os.path.relpath(Path(p).resolve(), final.resolve()),
                "kind": read_manifest(Path(p))["kind"],
                "digest": manifest_digest(read_manifest(Path(p))),
            }
            for p in inputs
        ],
        "raw_inputs": dict(sorted((raw_inputs or {}).items())),
        "files": file_entries(folder),
        **dict(extra or {}),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_state(),
    }
    run = current_run()
    if run is not None and run.id:  # the W&B run of the step that built this artifact
        manifest.update({"wandb_run_id": run.id, "wandb_run_url": run.url})
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(folder: Path, *, repair: str | None = None) -> dict[str, Any]:
    """The manifest of `folder`; ArtifactError (one line, ending in `repair` when given) if missing or corrupt."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; {repair or 'this is not a complete artifact, rebuild it'}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt manifest ({exc}); {repair or 'rebuild the artifact'}") from exc


def verify_files(folder: Path) -> list[str]:
    """Problems with the files of an artifact against its manifest (empty when intact)."""
    recorded = read_manifest(folder).get("files", {})
    problems = recorded_problems(folder, recorded)
    for path in artifact_files(folder):
        if path.relative_to(folder).as_posix() not in recorded:
            problems.append(f"{path}: not in the manifest")
    return problems


REBUILD = {  # artifacts outside a cycle: the command that rebuilds each kind
    "corpus": "megacontext build-corpus --force",
    "dataset_shards": "megacontext build-shards --force",
    "megacontext_trees": "megacontext build-trees --force",
    "eval_references": "megacontext eval-references --force",
}


def repair_advice(path: Path) -> str:
    """What to run to rebuild the artifact that holds `path` (a file or folder inside it).

    Inside a cycle (`cycles/cycle-NNNN/...`): delete that artifact and rerun the cycle, which
    resumes each phase from its last checkpoint (re-exporting bitwise the same weights) and
    rebuilds the cycle's trees and manifest; a label table is re-timed when recomputed, so
    the phases that read it go too. Elsewhere: the `--force` rebuild of its kind.
    """
    path = Path(path)
    artifact = next((p for p in (path, *path.parents) if (p / MANIFEST).is_file()), None)
    target = artifact or path
    cycle = next((p for p in (target, *target.parents) if p.name.startswith("cycle-")
                  and p.name.removeprefix("cycle-").isdigit()), None)
    if cycle is not None:
        rerun = _train_cycle_command(cycle)
        if target == cycle:  # its own files (cycle.json, config): finishing rewrites them
            return f"rerun {rerun}"
        doomed = [target]
        if target == cycle / "jt2" / "labels":
            doomed += [cycle / "jt2" / "final", cycle / "jt3" / "final"]
        return f"delete {', '.join(map(str, doomed))} and rerun {rerun}"
    kind = None
    if artifact is not None:
        try:
            kind = read_manifest(artifact).get("kind")
        except ArtifactError:
            pass
    if kind in REBUILD:
        return f"rebuild it with `{REBUILD[kind]}` (and the --profile that built it)"
    return f"rebuild {target} with the command that made it"


def _train_cycle_command(cycle: Path) -> str:
    """`megacontext train-cycle --cycle N [--profile P] [--previous DIR]`, as the cycle was run (config.yaml, manifests)."""
    import yaml

    command = f"megacontext train-cycle --cycle {int(cycle.name.removeprefix('cycle-'))}"
    try:
        profile = yaml.safe_load((cycle / "config.yaml").read_text()).get("profile")
    except (OSError, yaml.YAMLError, AttributeError):
        profile = None
    if profile:
        command += f" --profile {profile}"
    previous = None
    for manifest in (cycle / MANIFEST, cycle / "jt1" / "final" / MANIFEST):
        try:
            previous = json.loads(manifest.read_text()).get("previous")
            break
        except (OSError, ValueError):
            continue
    if previous:
        command += f" --previous {previous}"
    return f"`{command}`"


def verify_artifact(folder: Path, *, repair: str, kind: str | None = None) -> dict[str, Any]:
    """The manifest of `folder`, after checking every file it lists against it (size, then sha256).

    The check on open that every loader runs before it uses an artifact: no file missing,
    changed or added since the manifest was written. `repair` is what to run to rebuild
    it (e.g. "rebuild it with `megacontext build-shards --force`"); `kind`, when given,
    must be the manifest's kind.

    Raises:
        ArtifactError: one line naming the first bad file (or the missing/corrupt manifest)
            and `repair`.
    """
    folder = Path(folder)
    manifest = read_manifest(folder, repair=repair)
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{folder}: not a {kind} artifact (its manifest says {manifest.get('kind')!r}); {repair}")
    problems = verify_files(folder)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArtifactError(f"{problems[0]}{more}; {repair}")
    return manifest


def stale_inputs(folder: Path, *, within: Path | None = None) -> list[str]:
    """Inputs of `folder` that are gone or whose manifest changed since `folder` was built from them.

    `within`: only inputs inside this folder (e.g. a cycle's own phase outputs, not its shards).
    """
    folder = Path(folder)
    stale = []
    for entry in read_manifest(folder).get("inputs", []):
        parent = (folder / entry["path"]).resolve()
        if within is not None and not parent.is_relative_to(Path(within).resolve()):
            continue
        try:
            current = manifest_digest(read_manifest(parent))
        except ArtifactError:
            stale.append(f"{parent}: missing")
            continue
        if current != entry["digest"]:
            stale.append(f"{parent}: changed")
    return stale


def is_reusable(folder: Path, *, kind: str, format_version: int, config_hash: str) -> bool:
    """True when `folder` is a complete, intact artifact of this kind built from this config."""
    try:
        manifest = read_manifest(folder)
    except ArtifactError:
        return False
    same = (
        manifest.get("kind") == kind
        and manifest.get("format_version") == format_version
        and manifest.get("config_hash") == config_hash
    )
    return same and not verify_files(folder)


_STAGING_MARK = ".staging-"


def _final_location(folder: Path) -> Path:
    name = folder.name
    if name.startswith(".") and _STAGING_MARK in name:
        return folder.parent / name[1:].split(_STAGING_MARK)[0]
    return folder


_LEFTOVER = re.compile(r"^\.(.+)\.(staging|old|failed)-(\d+)$")  # (`.prepare-` backups: see data.shards)


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def sweep_leftovers(parent: Path, name: str | None = None) -> list[Path]:
    """Clean up the staging / old-copy folders in `parent` left by a killed process; return what went.

    Work in progress is named `.<name>.staging-<pid>` (also `.old-`, `.failed-`); one whose pid no
    longer runs can never be published, so it is deleted. A dead writer's `.<name>.old-<pid>` whose
    `<name>` is missing (killed between moving the old version aside and publishing the new one) is
    the last good version: it is put back, not deleted. Live writers' folders stay. `name`: only the
    leftovers of that artifact. Assumes the writers of one artifact root run on one host (pids are
    per host).
    """
    parent = Path(parent)
    gone = []
    if not parent.is_dir():
        return gone
    for path in sorted(parent.iterdir()):
        match = _LEFTOVER.match(path.name)
        if not match or not path.is_dir() or (name is not None and match.group(1) != name):
            continue
        if running(int(match.group(3))):
            continue
        target = parent / match.group(1)
        if match.group(2) == "old" and not target.exists():
            os.replace(path, target)  # the previous version comes back
        else:
            shutil.rmtree(path, ignore_errors=True)
        gone.append(path)
    return gone


@contextmanager
def staged_folder(final: Path, *, complete: str | None = None) -> Iterator[Path]:
    """Yield an empty staging folder `.<name>.staging-<pid>` beside `final`; on success it replaces `final` by rename.

    The one publishing procedure of every folder that must never be seen half-written
    (artifacts, phase exports, best held-out weights, training checkpoints). Leftovers of
    dead writers of `final` itself are swept first (`sweep_leftovers(parent, name)`; a caller
    that owns the whole parent sweeps it itself). On an exception the
    staging folder is removed and `final` is left exactly as it was. The previous version is
    moved aside (`.<name>.old-<pid>`) before the rename and deleted after it, so a kill at any
    point leaves one complete version (the sweep puts a moved-aside one back).
    `complete`: a file the build must have written (ArtifactError and nothing published otherwise).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(final.parent, final.name)
    staging = final.parent / f".{final.name}{_STAGING_MARK}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if complete is not None and not (staging / complete).is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise ArtifactError(f"{final}: build wrote no {complete}; nothing was published")
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)  # a writer with this pid before us (pids repeat in containers)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_artifact(final: Path) -> Iterator[Path]:
    """`staged_folder` for an artifact: the build must write its `manifest.json`; dead writers' leftovers
    of any artifact beside it are swept first."""
    sweep_leftovers(Path(final).parent)
    with staged_folder(final, complete=MANIFEST) as staging:
        yield staging
