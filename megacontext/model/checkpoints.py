"""Checkpoints of the small learned modules (GistNet, LensNet): one way to save, identify and load them.

A checkpoint folder holds `<name>.safetensors` (weights; never pickles) and `<name>.json` (the config and
shape needed to rebuild the module, plus its identity). The identity is a content hash of the weights and
the module's config, `<name>:<16 hex>`: trees record their GistNet's, and a load refuses weights whose hash
is not the recorded one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, TypeVar

from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file
from torch import nn

from megacontext.errors import ArtifactError
from megacontext.lifecycle.lineage import MANIFEST, repair_advice, verify_artifact

M = TypeVar("M", bound=nn.Module)
IDENTITY_FIELDS = "_identity_fields"  # attribute of a loaded module: the config fields its checkpoint recorded


def module_identity(name: str, module: nn.Module) -> str:
    """`<name>:<sha256[:16]>` of the module's safetensors-serialised state and `module.cfg` (a pydantic model).

    A module loaded from a checkpoint hashes only the config fields its checkpoint recorded: a field
    added to the config class later (with a default) must not turn every older checkpoint "corrupt".
    """
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    digest = hashlib.sha256(save(state))
    digest.update(module.cfg.model_dump_json(include=getattr(module, IDENTITY_FIELDS, None)).encode())
    return f"{name}:{digest.hexdigest()[:16]}"


def save_module(folder: Path, name: str, module: nn.Module, meta: dict[str, Any]) -> None:
    """Write `<name>.safetensors` and `<name>.json` (`meta` + the config + the identity) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(module, IDENTITY_FIELDS):  # it records the whole config now, so its identity covers all of it
        delattr(module, IDENTITY_FIELDS)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, folder / f"{name}.safetensors")
    record = {"config": module.cfg.model_dump(), **meta, "identity": module_identity(name, module)}
    (folder / f"{name}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def load_module(folder: Path, name: str, build: Callable[[dict[str, Any]], M], *, label: str) -> M:
    """Rebuild a saved module with `build(meta)` and load its weights.

    A sealed folder (one with a lineage manifest) is first checked file by file against it.
    Raises ArtifactError, one line naming the file and how to rebuild it, when the folder has no
    `<name>.json` (not a `label` checkpoint), a file differs from the manifest, the files cannot be
    read (truncated safetensors, bad JSON), or the weights' hash is not the recorded identity.
    """
    folder = Path(folder)
    meta_path = folder / f"{name}.json"
    if not meta_path.is_file():
        raise ArtifactError(f"{folder}: no {meta_path.name}; not a {label} checkpoint")
    repair = repair_advice(folder)
    if (folder / MANIFEST).is_file():  # a sealed phase output: every file as the manifest recorded it
        verify_artifact(folder, repair=repair)
    weights = folder / f"{name}.safetensors"
    try:
        meta = json.loads(meta_path.read_text())
        module = build(meta)
        module.load_state_dict(load_file(weights))
        setattr(module, IDENTITY_FIELDS, set(meta["config"]))
    except (ValueError, KeyError, OSError, RuntimeError, SafetensorError) as exc:
        raise ArtifactError(f"{weights}: not a readable {label} checkpoint ({type(exc).__name__}); {repair}") from exc
    if module_identity(name, module) != meta["identity"]:
        raise ArtifactError(f"{weights}: weights do not match the recorded identity; the checkpoint is corrupt; {repair}")
    return module
