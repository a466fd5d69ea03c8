"""The code dependencies of each DVC stage, computed from the import closure of the command it runs.

A DVC stage re-runs when one of its declared dependencies changes; a hand-kept list of code files
misses modules the command imports (an edit to `context/tree.py` once left the `cycle` stage "up to
date"). Here each stage's code is derived, not listed: the CLI handler of the stage's subcommand
(`cmd_<subcommand>` in `megacontext/cli.py`), every `megacontext` module it or the CLI helpers it calls
import (function-level imports included, since the CLI imports lazily), and then every module those
import, transitively, with the package `__init__.py` files Python runs on the way. It is a static
over-approximation: a module imported on any code path counts, so nothing the command can run is missed.
Not followed: `_parser` (it names every handler; keep imports out of it) and module-level statements
of `cli.py` other than imports.

`python -m megacontext.lifecycle.dvc_pipeline` rewrites the `megacontext/...` entries of every stage's
`deps` in `dvc.yaml` (other deps, comments and layout untouched); `--check` only reports (exit 1 when a
stage's list differs). `tests/test_dvc.py` fails whenever the committed `dvc.yaml` is not what this
module computes.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path

PACKAGE = "megacontext"
ROOT = Path(__file__).resolve().parents[2]
CLI = f"{PACKAGE}/cli.py"


def _module_file(root: Path, dotted: str) -> Path | None:
    """`megacontext.a.b` -> megacontext/a/b.py or megacontext/a/b/__init__.py under `root`, if it exists."""
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _dotted(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(root: Path, path: Path, nodes: list[ast.AST]) -> set[str]:
    """The `megacontext` modules the import statements among `nodes` name (relative imports resolved)."""
    package = _dotted(root, path) if path.name == "__init__.py" else _dotted(root, path).rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]  # `from pkg import module`
        else:
            continue
        found.update(n for n in names if n == PACKAGE or n.startswith(PACKAGE + "."))
    return found


def _with_packages(root: Path, dotted: str) -> set[Path]:
    """The module's file and every package `__init__.py` Python executes to import it."""
    parts = dotted.split(".")
    return {f for i in range(1, len(parts) + 1) if (f := _module_file(root, ".".join(parts[:i]))) is not None}


def import_closure(entries: set[str], root: Path = ROOT) -> set[Path]:
    """Every source file of the package reachable from the dotted modules `entries` through imports.

    Args:
        entries: dotted module names (`megacontext.training.cycle`); names that are not modules of the
            package (e.g. a function imported with `from pkg.mod import fn`) are ignored.
        root: the folder holding the `megacontext` package.

    Returns: absolute paths of `.py` files (modules and the package `__init__.py` files on their paths).
    """
    seen: set[Path] = set()
    todo = [f for name in entries for f in _with_packages(root, name)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(root, path, list(ast.walk(ast.parse(path.read_text())))):
            todo.extend(_with_packages(root, name) - seen)
    return seen


@lru_cache(maxsize=None)
def _cli_functions(root: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse((root / CLI).read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def handler_name(subcommand: str) -> str:
    """The CLI function that runs a subcommand: `train-cycle` -> `cmd_train_cycle`."""
    return "cmd_" + subcommand.replace("-", "_")


def command_code(subcommand: str, root: Path = ROOT) -> list[str]:
    """The package files (relative to `root`, sorted) that `megacontext <subcommand>` can execute.

    Raises:
        KeyError: the CLI has no handler for `subcommand`.
    """
    functions = _cli_functions(root)
    cli = root / CLI
    top = [node for node in ast.parse(cli.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))]
    entries = _imports(root, cli, top) - {PACKAGE + ".cli"}  # the CLI file itself counts, not its other handlers
    handler = handler_name(subcommand)
    if handler not in functions:
        raise KeyError(f"{CLI} has no {handler} for the subcommand {subcommand!r}")
    # `main` runs before every handler; `_parser` only names the handlers (as values), it runs none of them
    called, todo = {"_parser"}, ["main", handler]
    while todo:  # the handler, `main` and every CLI helper they name, for their lazy imports
        name = todo.pop()
        if name in called or name not in functions:
            continue
        called.add(name)
        body = list(ast.walk(functions[name]))
        entries |= _imports(root, cli, body)
        todo.extend(node.id for node in body if isinstance(node, ast.Name))
    return sorted(str(p.relative_to(root)) for p in import_closure(entries, root) | {cli})


def stage_subcommand(cmd: str) -> str:
    """The `megacontext` subcommand a stage's `cmd` runs (`.venv/bin/megacontext train-cycle ...`)."""
    argv = shlex.split(cmd)
    if not argv or not argv[0].endswith("megacontext") or len(argv) < 2:
        raise ValueError(f"not a `megacontext <subcommand>` command: {cmd!r}")
    return argv[1]


STAGE = re.compile(r"^  (?P<name>[A-Za-z0-9_-]+):\s*$")
FIELD = re.compile(r"^    (?P<key>[a-z_]+):")
ITEM = re.compile(r"^      - (?P<value>\S.*)$")


def synced(text: str, root: Path = ROOT) -> str:
    """`dvc.yaml` text with each stage's `megacontext/...` deps replaced by `command_code` of its command.

    Other deps (artifacts, `data`) keep their place and order; the code files follow them, sorted.

    Raises:
        ValueError: a stage with deps but no `megacontext <subcommand>` cmd, a deps list in another layout
            (inline, or not indented as `      - path`), or a `foreach`/`matrix` stage.
    """
    out: list[str] = []
    stage = cmd = None
    in_stages = in_deps = False

    def close_deps() -> None:
        nonlocal in_deps
        if in_deps:
            if cmd is None:
                raise ValueError(f"dvc.yaml: stage {stage} lists deps before its cmd")
            at = len(out)
            while at and not out[at - 1].strip():  # before trailing blank lines
                at -= 1
            out[at:at] = [f"      - {path}" for path in command_code(stage_subcommand(cmd), root)]
        in_deps = False

    for line in text.splitlines():
        if line.lstrip().startswith("#"):  # comments stay where they are and change nothing
            pass
        elif line and not line.startswith(" "):  # a top-level key
            close_deps()
            in_stages, stage = line.startswith("stages:"), None
        elif in_stages and (match := STAGE.match(line)):
            close_deps()
            stage, cmd = match["name"], None
        elif stage and (field := FIELD.match(line)):
            close_deps()
            key, value = field["key"], line.split(":", 1)[1].strip()
            if key in ("foreach", "matrix", "do"):
                raise ValueError(f"dvc.yaml: stage {stage} uses `{key}`; only plain stages are supported")
            if key == "deps" and value:
                raise ValueError(f"dvc.yaml: stage {stage} lists its deps inline ({value}); write one per line")
            in_deps = key == "deps"
            if key == "cmd":
                cmd = value
        elif in_deps and line.strip():
            item = ITEM.match(line)
            if item is None:
                raise ValueError(f"dvc.yaml: unexpected line in the deps of stage {stage}: {line!r}")
            if item["value"].startswith(PACKAGE + "/"):
                continue
        out.append(line)
    close_deps()
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megacontext.lifecycle.dvc_pipeline",
                                     description="Derive each DVC stage's code dependencies from its import closure.")
    parser.add_argument("--check", action="store_true", help="report only; exit 1 when dvc.yaml is out of date")
    parser.add_argument("--file", type=Path, default=ROOT / "dvc.yaml")
    args = parser.parse_args(argv)
    text = args.file.read_text()
    new = synced(text)
    if new == text:
        print(f"{args.file}: every stage's code dependencies match its import closure")
        return 0
    if args.check:
        print(f"{args.file}: code dependencies out of date; run `python -m megacontext.lifecycle.dvc_pipeline`",
              file=sys.stderr)
        return 1
    args.file.write_text(new)
    print(f"{args.file}: code dependencies rewritten from each stage's import closure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
