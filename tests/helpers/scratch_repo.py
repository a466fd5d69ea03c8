"""A scratch repository running this checkout's DVC pipeline on another profile (its test and benchmark).

The code and profiles are copied, the environments linked (DVC has its own,
`.venv-dvc`), `dvc.yaml` switched to the profile, and git + DVC initialised
with DVC's analytics off, so that nothing tries the network.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

CHECKOUT = Path(__file__).resolve().parents[2]
DVC = CHECKOUT / ".venv-dvc" / "bin" / "dvc"


def scratch_dvc_repo(dest: Path, run: Callable[[list[str], Path], object], *, profile: str = "tiny") -> Path:
    """Build the repository in `dest` (created); `run(argv, cwd)` runs each set-up command."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("megacontext", "configs"):
        shutil.copytree(CHECKOUT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".venv", ".venv-dvc"):
        (dest / name).symlink_to(CHECKOUT / name)
    (dest / "data").mkdir()
    shutil.copy(CHECKOUT / ".dvcignore", dest / ".dvcignore")
    pipeline = (CHECKOUT / "dvc.yaml").read_text()
    if "  - profile: default" not in pipeline:
        raise ValueError("dvc.yaml no longer sets `- profile: default` under vars; update scratch_dvc_repo")
    (dest / "dvc.yaml").write_text(pipeline.replace("  - profile: default", f"  - profile: {profile}"))
    for argv in (["git", "init", "-q"], [str(DVC), "init", "-q"], [str(DVC), "config", "core.analytics", "false"]):
        run(argv, dest)
    return dest
