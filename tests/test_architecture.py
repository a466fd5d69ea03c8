"""Project rules that keep the code base healthy (docs/style.md §1, §5)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_neither_orchestration_nor_dagster_nor_dvc() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & {"dagster", "dvc", "orchestration", "dagster_pipes"})
        for p in (ROOT / "megacontext").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert "dagster" in _imports(ROOT / "orchestration" / "definitions.py")  # the scan does see imports


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, anywhere in it (function-level imports included), dotted."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


# Lower layers never reach up: the models, MegaAttention, the tree/working context and the data layer run
# without any training, evaluation or runtime code (a trained artifact is loaded, not trained, there).
LAYERS = {
    "model": ("training", "evaluation", "runtime"),
    "mega": ("training", "evaluation", "runtime"),
    "context": ("training", "evaluation", "runtime"),
    "data": ("training", "evaluation", "runtime"),
}


def layering_violations(root: Path) -> dict[str, list[str]]:
    """Library file -> the modules it imports across the layering rules, or the CLI (only `__main__` may:
    the CLI sits on top of the library; process entry points outside it, like the Pipes launcher, may run it)."""
    found = {}
    for path in sorted((root / "megacontext").rglob("*.py")):
        parts = path.relative_to(root / "megacontext").parts
        forbidden = [f"megacontext.{up}" for up in LAYERS.get(parts[0], ())] if len(parts) > 1 else []
        if path.name != "__main__.py":
            forbidden.append("megacontext.cli")
        bad = sorted(m for m in _imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden))
        if bad:
            found[str(path.relative_to(root))] = bad
    return found


def test_the_package_layout_mirrors_the_architecture() -> None:
    packages = {p.name for p in (ROOT / "megacontext").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == {"model", "mega", "context", "data", "training", "evaluation", "runtime", "lifecycle"}
    for name in packages:  # each layer explains itself, and lists every module it holds
        readme = (ROOT / "megacontext" / name / "README.md").read_text()
        modules = {p.name for p in (ROOT / "megacontext" / name).glob("*.py")} - {"__init__.py"}
        assert modules and all(f"`{m}`" in readme for m in modules), (name, modules)


def test_lower_layers_never_import_training_evaluation_or_runtime_and_nothing_imports_the_cli() -> None:
    assert layering_violations(ROOT) == {}


def test_the_layering_check_catches_a_model_module_that_imports_training(tmp_path: Path) -> None:
    fake = tmp_path / "megacontext" / "model"
    fake.mkdir(parents=True)
    (fake / "gistnet.py").write_text('"""x"""\nfrom megacontext.training.loop import fit\n')
    (tmp_path / "megacontext" / "context").mkdir()
    (tmp_path / "megacontext" / "context" / "tree.py").write_text('"""x"""\ndef f():\n    from megacontext import cli\n')
    assert layering_violations(tmp_path) == {
        "megacontext/model/gistnet.py": ["megacontext.training.loop", "megacontext.training.loop.fit"],
        "megacontext/context/tree.py": ["megacontext.cli"]}


def test_modules_stay_small() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.glob("[mo]*/**/*.py")}
    assert sizes and {k: n for k, n in sizes.items() if n > 800} == {}


def test_every_module_opens_with_a_docstring() -> None:
    missing = [str(p.relative_to(ROOT)) for p in (ROOT / "megacontext").rglob("*.py")
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


# --- references stay inside the repository (docs/style.md §11) ------------------------------

# Pointers at design documents that live outside this repository. Spelled with character classes so
# that this file does not match itself.
OUTSIDE = re.compile(r"DESIGN[ ]§|DESIGN[.]md|STYLE[.]md|STYLE [0-9]|seed 0{2}|[.][.]/shared|/work[/]shared")
SECTION = r"§\s?(\d+(?:\.\d+)*)(?:\s?[–-]\s?§?(\d+(?:\.\d+)*))?"  # §2.3, §3–4, §2.8-2.9, §1–§2
CITATION = re.compile(rf"(?:(docs)/)?([A-Za-z0-9_-]+)\.md\s+({SECTION}(?:\s*(?:,|and|or)\s*{SECTION})*)")
HEADING = re.compile(r"^#{1,6}\s*§\s?(\d+(?:\.\d+)*)", re.MULTILINE)
DOCS = ROOT / "docs"
NUMBERED_PAGES = ("architecture.md", "lifecycle.md", "style.md")  # pages whose bare § references are their own


def _repo_files() -> list[Path]:
    """The repository's source and documentation files: tracked, plus new ones git does not ignore."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree instead
        skip = {".git", ".venv", ".venv-dvc", "artifacts", "data", ".dagster", ".pytest_cache"}
        listed = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)]
    paths = [ROOT / p for p in listed if p]
    return sorted(p for p in paths if p.is_file() and (p.suffix in {".py", ".md", ".yaml", ".yml", ".toml"}
                                                       or p.name == "Makefile"))


def _sections(page: Path) -> set[str]:
    return set(HEADING.findall(page.read_text())) if page.is_file() else set()


def _cited(match: re.Match) -> list[str]:
    """Every section number a citation names (both ends of a range)."""
    return [n for n in re.findall(SECTION, match.group(3)) for n in n if n]


def citation_problems(text: str, *, where: Path) -> list[str]:
    """Citations of docs pages in `text` that name a missing page or a section the page does not define.

    In code, a citation is `docs/<page>.md §n` (also `§n–m`, `§n, §m`). Inside docs/, `<page>.md §n` is
    relative to docs/, and in a numbered page a bare `§n` refers to that page itself.
    """
    in_docs = where.parent == DOCS
    problems, spans = [], []
    for match in CITATION.finditer(text):
        if not (match.group(1) or in_docs):
            continue  # e.g. README.md §... is not a docs citation
        spans.append(match.span())
        page = DOCS / f"{match.group(2)}.md"
        if not page.is_file():
            problems.append(f"{where.name}: {match.group(0)!r} names a page docs/{page.name} that does not exist")
            continue
        missing = [n for n in _cited(match) if n not in _sections(page)]
        if missing:
            problems.append(f"{where.name}: {match.group(0)!r} cites §{', §'.join(missing)}, not defined in docs/{page.name}")
    for match in re.finditer(r"\bdocs/([A-Za-z0-9_-]+)\.md\b", text):
        if not any(a <= match.start() < b for a, b in spans) and not (DOCS / f"{match.group(1)}.md").is_file():
            problems.append(f"{where.name}: {match.group(0)} does not exist")
    if in_docs and where.name in NUMBERED_PAGES:
        own = _sections(where)
        for match in re.finditer(SECTION, text):
            if any(a <= match.start() < b for a, b in spans) or text[match.start() - 1 : match.start()] == "#" \
                    or HEADING.match(text, text.rfind("\n", 0, match.start()) + 1):
                continue  # part of a page citation, or a heading
            missing = [n for n in match.groups() if n and n not in own]
            if missing:
                problems.append(f"{where.name}: bare {match.group(0)!r} is not a section of this page")
    return problems


def test_nothing_points_at_documents_outside_the_repository() -> None:
    files = _repo_files()
    assert ROOT / "README.md" in files and ROOT / "docs" / "architecture.md" in files  # the scan sees docs and code
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert hits == []
    # the patterns do catch what they are for (built here so that this file does not match itself)
    for pointer in ("(DESIGN" + " §2.3)", "see STYLE" + " 7", "(seed" + " 004)", "`../" + "shared/DESIGN" + ".md`"):
        assert OUTSIDE.search(pointer), pointer


def test_every_docs_citation_names_a_page_and_a_section_that_exist() -> None:
    files = _repo_files()
    problems = [p for path in files for p in citation_problems(path.read_text(errors="replace"), where=path)]
    assert problems == []
    cited = sum(1 for path in files if path.suffix == ".py" for _ in CITATION.finditer(path.read_text()))
    assert cited >= 30  # the code does cite the docs (a broken pattern would find nothing)
    code = ROOT / "megacontext" / "example.py"
    assert citation_problems("(docs/architecture.md §2.3; docs/lifecycle.md §3–4, §4.7)", where=code) == []
    bad = "(docs/architecture" ".md §2.99) (docs/nowhere" ".md §1) docs/lifecycle" ".md §2 docs/nowhere" ".md"
    assert len(citation_problems(bad, where=code)) == 4  # split literals: this file must not fail its own test
