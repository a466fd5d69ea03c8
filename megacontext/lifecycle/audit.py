"""`megacontext audit PATH`: walk the lineage from any artifact back to the raw corpus and verify every hash.

For each artifact (a folder with manifest.json): every file against its sha256
(`verify_files`), every input's *current* manifest digest against the digest
recorded when the artifact was built (a mismatch means the parent was replaced
or edited afterwards), and a missing input folder or manifest is a missing
parent. Nested artifacts (a cycle's phase outputs and trees) are walked as children
too; a cycle's validation report (`reports/<cycle>`) links to the cycle as an input. A path inside an artifact audits the nearest enclosing one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megacontext.errors import ArtifactError
from megacontext.lifecycle.lineage import MANIFEST, manifest_digest, read_manifest, verify_files


@dataclass
class Node:
    path: Path
    kind: str
    digest: str | None
    relation: str  # "root" | "input" | "nested"
    problems: list[str] = field(default_factory=list)
    children: list["Node"] = field(default_factory=list)
    seen_before: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.children)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "digest": self.digest, "relation": self.relation,
                "ok": self.ok, "problems": self.problems, "seen_before": self.seen_before,
                "children": [c.to_json() for c in self.children]}

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


def enclosing_artifact(path: Path) -> Path:
    """`path` itself if it holds a manifest, else the nearest ancestor that does."""
    path = Path(path).resolve()
    if not path.exists():
        raise ArtifactError(f"{path}: does not exist; give an artifact folder (e.g. artifacts/cycles/cycle-0001)")
    for candidate in [path, *path.parents] if path.is_dir() else list(path.parents):
        if (candidate / MANIFEST).is_file():
            return candidate
    raise ArtifactError(f"{path}: neither it nor a parent folder has a {MANIFEST}; it is not part of an artifact")


def _nested(folder: Path) -> list[Path]:
    found = []
    for root, dirs, _ in os.walk(folder):
        here = Path(root)
        keep = []
        for d in sorted(dirs):
            if (here / d / MANIFEST).is_file():
                found.append(here / d)  # audited as its own artifact; its inside is its business
            elif not d.startswith("."):
                keep.append(d)
        dirs[:] = keep
    return found


def audit(path: Path) -> Node:
    root = enclosing_artifact(path)
    return _audit(root, "root", set())


def _audit(folder: Path, relation: str, seen: set[Path]) -> Node:
    folder = folder.resolve()
    try:
        manifest = read_manifest(folder)
    except ArtifactError as exc:
        return Node(folder, "?", None, relation, [str(exc)])
    node = Node(folder, manifest.get("kind", "?"), manifest_digest(manifest), relation)
    if folder in seen:
        node.seen_before = True
        return node
    seen.add(folder)
    node.problems.extend(verify_files(folder))
    for entry in manifest.get("inputs", []):
        parent = (folder / entry["path"]).resolve()
        if not (parent / MANIFEST).is_file():
            node.children.append(Node(parent, entry.get("kind", "?"), entry.get("digest"), "input",
                                      [f"missing parent: {parent} ({entry.get('kind')}) is gone or has no {MANIFEST}"]))
            continue
        child = _audit(parent, "input", seen)
        if child.digest != entry["digest"]:
            child.problems.insert(0, f"{parent}: its manifest changed after {folder.name} was built from it "
                                     f"(recorded digest {entry['digest'][:12]}, now {str(child.digest)[:12]})")
        mixed = _mixed_run(manifest, parent)
        if mixed:
            node.problems.append(mixed)
        node.children.append(child)
    for nested in _nested(folder):
        node.children.append(_audit(nested, "nested", seen))
    return node


CYCLE_KINDS = {"cycle", "gistnet", "lens_labels", "lensnet", "lora_adapter"}  # written by one train-cycle run


def _mixed_run(manifest: dict, parent: Path) -> str | None:
    """A problem when `parent` is an output of the same cycle built with other settings (two runs mixed)."""
    try:
        other = read_manifest(parent)
    except ArtifactError:
        return None
    same_cycle = (manifest.get("kind") in CYCLE_KINDS and other.get("kind") in CYCLE_KINDS
                  and manifest.get("cycle") is not None and manifest.get("cycle") == other.get("cycle"))
    if same_cycle and manifest.get("config_hash") != other.get("config_hash"):
        return (f"{parent}: built with config {str(other.get('config_hash'))[:12]}, but this {manifest.get('kind')} "
                f"of the same cycle with {str(manifest.get('config_hash'))[:12]}: two runs with different settings "
                "wrote this cycle; retrain it in a fresh cycle folder")
    return None


def render(node: Node):
    """A rich Tree: ✓/✗ per artifact, problems underneath."""
    from rich.tree import Tree

    def label(n: Node) -> str:
        mark = "[green]✓[/]" if not n.problems else "[red]✗[/]"
        note = " (see above)" if n.seen_before else ""
        digest = (n.digest or "")[:12]
        return f"{mark} [bold]{n.kind}[/] {n.path} [dim]{digest} {n.relation}{note}[/]"

    def add(tree: Tree, n: Node) -> None:
        for problem in n.problems:
            tree.add(f"[red]{problem}[/]")
        for child in n.children:
            add(tree.add(label(child)), child)

    tree = Tree(label(node))
    add(tree, node)
    return tree
