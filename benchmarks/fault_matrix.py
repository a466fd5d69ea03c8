"""The fault matrix: every kind of fault the lifecycle must survive, injected on the tiny profile, one table.

Four families, each row one fault and what the user must see:

- **kill + resume**: SIGKILL `train-cycle` inside each phase (JT1, JT2 labels, JT2, JT3) and `prepare-data`
  between its two publications; the next run must finish to exactly the artifacts of an uninterrupted run
  (bitwise-identical weights; corpus and shards that agree).
- **flipped byte**: one byte flipped in each artifact type (corpus, shards, trees, reference caches, GistNet,
  LensNet, labels, LoRA adapter, a training checkpoint, a validation report, the champion record, a manifest's
  recorded digest, a truncated safetensors) and then used by the command that reads it: it must stop with one
  `error:` line naming the file and the command that repairs it, never use it and never print a traceback.
- **concurrent writers**: two processes writing one artifact at once (two `train-cycle --cycle 2` with
  different seeds, two `promote`, two `evaluate --checkpoint`, two `eval-references`, two `prepare-data`): one waits or refuses naming the
  holder, and the audit of what is left passes.
- **bad input**: the arguments, environment and files of the issue list: refused with one line, before any work.

Usage: `python benchmarks/fault_matrix.py [--root DIR] [--keep]`; prints a Markdown table and exits 1 when a
row fails. `tests/test_fault_matrix.py` runs it in CI. The flipped-byte and bad-input rows call the CLI's
`main` in this process (one import of torch instead of one per row); kills and races use real processes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA_ARGS = ["data.max_documents=5", "data.val_fraction=0.45", "data.test_fraction=0"]
# long enough phases, a checkpoint every step: a kill lands inside the phase it aims at
TRAIN_ARGS = ["train.jt1.steps=24", "train.jt2.steps=24", "train.jt3.steps=24", "train.checkpoint_every=1",
              "train.label_snapshots=12"]
WEIGHTS = ("jt1/final/gistnet.safetensors", "jt2/final/lensnet.safetensors", "jt3/final/adapter_model.safetensors")


@dataclass
class Row:
    family: str
    case: str
    expected: str
    observed: str
    passed: bool


@dataclass
class Result:
    code: int
    out: str
    err: str


class Matrix:
    def __init__(self, base: Path):
        self.base = base
        self.rows: list[Row] = []

    # ---- running the CLI ---------------------------------------------------------------------------------

    def overrides(self, root: Path) -> list[str]:
        return [f"paths.artifact_root={root / 'artifacts'}", f"paths.corpus_dir={root / 'data'}", *DATA_ARGS,
                *TRAIN_ARGS]

    def cli(self, root: Path, *argv: str, env: dict[str, str] | None = None, extra: tuple[str, ...] = (),
            plain: bool = False) -> Result:
        """`megacontext argv... --profile tiny <root's overrides> extra...` in this process; a traceback is
        captured. `plain`: `argv` alone (commands without a profile, like `audit PATH`)."""
        from megacontext.cli import main

        out, err = io.StringIO(), io.StringIO()
        saved = dict(os.environ)
        os.environ.update(env or {})
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(list(argv) if plain else [*argv, "--profile", "tiny", *self.overrides(root), *extra])
                except SystemExit as exc:  # argparse refusals
                    code = exc.code if isinstance(exc.code, int) else 2
                except BaseException:  # noqa: BLE001 - a traceback is exactly what a row must report
                    err.write(traceback.format_exc())
                    code = -1
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return Result(code, out.getvalue(), err.getvalue())

    def spawn(self, root: Path, *argv: str, env: dict[str, str] | None = None,
              overrides: list[str] | None = None) -> Spawned:
        """`megacontext argv...` as its own process (one thread: runs compare bitwise)."""
        args = [*argv, "--profile", "tiny", *(self.overrides(root) if overrides is None else overrides)]
        return Spawned.start(args, self.base, {"OMP_NUM_THREADS": "1", **(env or {})})

    def add(self, family: str, case: str, expected: str, check: Callable[[], tuple[bool, str]]) -> None:
        try:
            passed, observed = check()
        except Exception as exc:  # noqa: BLE001 - the matrix reports, it does not stop
            passed, observed = False, f"the check itself failed: {type(exc).__name__}: {exc}"
        self.rows.append(Row(family, case, expected, observed.replace("|", "\\|").replace("\n", " "), passed))
        mark = "pass" if passed else "FAIL"
        print(f"  [{mark}] {family}: {case}", file=sys.stderr, flush=True)

    # ---- the judged outcome of a refusal -------------------------------------------------------------------

    @staticmethod
    def one_line_refusal(result: Result, *must_name: str) -> tuple[bool, str]:
        """Exit status ≠ 0, no traceback, exactly one `error:`/`not promoted:` line naming every `must_name`."""
        lines = [ln for ln in result.err.splitlines() if ln.startswith(("error:", "not promoted:", "megacontext ",
                                                                        "usage:"))]
        errors = [ln for ln in lines if not ln.startswith("usage:")]
        shown = errors[-1] if errors else (result.err.strip().splitlines() or ["(nothing on stderr)"])[-1]
        ok = (result.code not in (0, -1) and "Traceback" not in result.err and len(errors) == 1
              and all(name in errors[0] for name in must_name))
        return ok, f"exit {result.code}: {shown[:300]}"

    @staticmethod
    def repairable(result: Result, path: Path) -> tuple[bool, str]:
        ok, shown = Matrix.one_line_refusal(result, str(path))
        advice = any(word in shown for word in ("megacontext ", "delete ", "rebuild", "re-evaluate", "rerun"))
        return ok and advice, shown

    # ---- the families --------------------------------------------------------------------------------------

    def build(self, root: Path) -> Path:
        """Data, baseline trees, cycle 1, its report and the champion under `root` (real CLI, this process)."""
        for argv in (["prepare-data"], ["build-trees"], ["eval-references"], ["train-cycle", "--cycle", "1"],
                     ["evaluate"], ["evaluate", "--checkpoint", str(root / "artifacts/cycles/cycle-0001")],
                     ["promote", "--cycle", "1"]):
            result = self.cli(root, *argv)
            if result.code != 0:
                raise RuntimeError(f"setting up the matrix: {' '.join(argv)} failed:\n{result.err[-3000:]}")
        return root / "artifacts"

    def flipped_bytes(self, root: Path) -> None:
        art = root / "artifacts"
        cycle = art / "cycles" / "cycle-0001"
        refs = sorted(p for p in (art / "eval_references").iterdir() if p.is_dir() and "passkey" not in p.name)[0]
        passkey = sorted(p for p in (art / "eval_references").iterdir() if p.is_dir() and "passkey" in p.name)[0]
        checkpoint = sorted((cycle / "jt3" / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"
        tree = sorted((art / "trees").rglob("*.safetensors"))[0] if list((art / "trees").rglob("*.safetensors")) \
            else sorted(p for p in (art / "trees").rglob("*") if p.is_file() and p.name != "manifest.json")[0]
        ck = ["--checkpoint", str(cycle)]
        prompt = root / "prompt.txt"
        prompt.write_text("def main():\n    return 0\n" * 40)
        gen = ["generate", "--prompt-file", str(prompt), "--max-new-tokens", "2"]
        cases = [  # (artifact, file, the command that reads it, folders moved aside so it does)
            ("corpus", art / "data/corpus/documents.parquet", ["build-shards", "--force"], []),
            ("train shard", art / "data/shards/train-00000.parquet", ["build-trees", "--force"], []),
            ("train shard", art / "data/shards/train-00000.parquet", ["train-cycle", "--cycle", "2"], []),
            ("val shard", art / "data/shards/val-00000.parquet", ["evaluate"], []),
            ("baseline tree", tree, ["evaluate"], []),
            ("NLL reference cache", refs / "tokens.parquet", ["evaluate", *ck], []),
            ("passkey reference cache", passkey / "passkey.parquet", ["evaluate", *ck], []),
            ("cycle tree", sorted((cycle / "trees").rglob("*.safetensors"))[0], ["evaluate", *ck], []),
            ("GistNet (JT1 output)", cycle / "jt1/final/gistnet.safetensors", [*gen, *ck], []),
            ("LensNet (JT2 output)", cycle / "jt2/final/lensnet.safetensors", ["evaluate", *ck], []),
            ("LoRA adapter (JT3 output)", cycle / "jt3/final/adapter_model.safetensors", ["evaluate", *ck], []),
            ("LoRA adapter (JT3 output)", cycle / "jt3/final/adapter_model.safetensors", [*gen, *ck], []),
            ("LoRA adapter, next cycle's warm start", cycle / "jt3/final/adapter_model.safetensors",
             ["train-cycle", "--cycle", "2", "--previous", str(cycle)], []),
            ("JT2 labels", cycle / "jt2/labels/labels.parquet", ["train-phase", "--phase", "jt2", "--cycle", "1"],
             [cycle / "jt2/final"]),
            ("training checkpoint (JT3)", checkpoint, ["train-phase", "--phase", "jt3", "--cycle", "1"],
             [cycle / "jt3/final"]),
            ("validation report", art / "reports/cycle-0001/summary.json", ["promote", "--cycle", "1"], []),
            ("champion record", art / "champion/champion.json", ["nightly"], []),
        ]
        for artifact, path, argv, aside in cases:
            self.add("flipped byte", f"{artifact}: {path.relative_to(art)} -> `{_shown(argv, cycle)}`",
                     "one line naming the file and its repair; nothing used",
                     lambda path=path, argv=argv, aside=aside: self._flip_and_use(root, path, argv, aside))
        adapter = cycle / "jt3/final/adapter_model.safetensors"
        self.add("flipped byte", f"a manifest's recorded digest edited: jt3/final/manifest.json -> `evaluate "
                 "--checkpoint`", "one line naming the file whose digest disagrees",
                 lambda: self._edit_manifest(root, adapter, ["evaluate", *ck]))
        self.add("flipped byte", "truncated safetensors: jt1/final/gistnet.safetensors -> `generate --checkpoint`",
                 "one line naming the file", lambda: self._truncate(root, cycle / "jt1/final/gistnet.safetensors",
                                                                    [*gen, *ck]))
        val = art / "data/shards/val-00000.parquet"
        self.add("flipped byte", "val shard replaced by garbage -> `evaluate`", "one line naming the file",
                 lambda: self._replace(root, val, b"not a parquet file\n" * 10, ["evaluate"]))

    def _flip_and_use(self, root: Path, path: Path, argv: list[str], aside: list[Path]) -> tuple[bool, str]:
        pristine = path.read_bytes()
        data = bytearray(pristine)
        data[len(data) // 2] ^= 0x01
        moved = [(folder, folder.with_name(folder.name + ".matrix-aside")) for folder in aside]
        try:
            for folder, to in moved:
                folder.rename(to)
            path.write_bytes(bytes(data))
            result = self.cli(root, *argv)
        finally:
            path.write_bytes(pristine)
            for folder, to in moved:
                shutil.rmtree(folder, ignore_errors=True)  # anything a wrongly accepting run wrote
                to.rename(folder)
            shutil.rmtree(root / "artifacts" / "cycles" / "cycle-0002", ignore_errors=True)
        return self.repairable(result, path)

    def _edit_manifest(self, root: Path, path: Path, argv: list[str]) -> tuple[bool, str]:
        import json

        manifest = path.parent / "manifest.json"
        pristine = manifest.read_text()
        record = json.loads(pristine)
        record["files"][path.name]["sha256"] = "0" * 64
        try:
            manifest.write_text(json.dumps(record, indent=2))
            result = self.cli(root, *argv)
        finally:
            manifest.write_text(pristine)
        return self.repairable(result, path)

    def _truncate(self, root: Path, path: Path, argv: list[str]) -> tuple[bool, str]:
        return self._replace(root, path, path.read_bytes()[: path.stat().st_size // 3], argv)

    def _replace(self, root: Path, path: Path, content: bytes, argv: list[str]) -> tuple[bool, str]:
        pristine = path.read_bytes()
        try:
            path.write_bytes(content)
            result = self.cli(root, *argv)
        finally:
            path.write_bytes(pristine)
        return self.one_line_refusal(result, str(path))

    def kills(self, lifecycle: Path) -> None:
        """Kill `train-cycle` inside each phase, resume, compare with an uninterrupted run of the same process kind."""
        straight = self.base / "straight"
        shutil.copytree(lifecycle / "artifacts" / "data", straight / "artifacts" / "data")
        code, _, err = self.spawn(straight, "train-cycle", "--cycle", "1").finish()
        if code != 0:
            raise RuntimeError(f"the uninterrupted reference cycle failed:\n{err[-3000:]}")
        reference = _weights(straight / "artifacts/cycles/cycle-0001")
        phases = {  # phase -> what must exist (and what must not yet) when the kill lands
            "JT1": lambda c: len(list((c / "jt1/checkpoints").glob("step-*"))) >= 2,
            "JT2 labels": lambda c: (c / "jt1/final/manifest.json").is_file() and not (c / "jt2/labels").exists(),
            "JT2": lambda c: len(list((c / "jt2/checkpoints").glob("step-*"))) >= 2,
            "JT3": lambda c: len(list((c / "jt3/checkpoints").glob("step-*"))) >= 2,
        }
        finals = {"JT1": "jt1/final", "JT2 labels": "jt2/labels", "JT2": "jt2/final", "JT3": "jt3/final"}
        for phase, inside in phases.items():
            self.add("kill + resume", f"SIGKILL `train-cycle` inside {phase}, then rerun it",
                     "resumes to bitwise-identical weights; the cycle audits clean",
                     lambda phase=phase, inside=inside: self._kill_cycle(straight, reference, inside,
                                                                         finals[phase]))
        self.add("kill + resume", "SIGKILL `prepare-data` between publishing the corpus and the shards, then rerun",
                 "the corpus and shards on disk agree (audit clean), nothing left over",
                 lambda: self._kill_prepare(lifecycle))

    def _kill_cycle(self, straight: Path, reference: dict, inside: Callable[[Path], bool],
                    final: str) -> tuple[bool, str]:
        from megacontext.lifecycle.audit import audit

        for attempt in range(3):  # a kill that lands after the phase finished proves nothing: try again
            root = Path(tempfile.mkdtemp(dir=self.base, prefix="kill-"))
            shutil.copytree(straight / "artifacts" / "data", root / "artifacts" / "data")
            cycle = root / "artifacts/cycles/cycle-0001"
            proc = self.spawn(root, "train-cycle", "--cycle", "1")
            unfinished = lambda: not (cycle / final / "manifest.json").is_file()  # noqa: E731
            if proc.kill_when(lambda: inside(cycle) and unfinished()) and unfinished():  # still inside after the kill
                break
        else:
            return False, "the phase always finished before the kill landed"
        code, _, err = self.spawn(root, "train-cycle", "--cycle", "1").finish()
        if code != 0:
            return False, f"resume failed: {err.strip().splitlines()[-1:]}"
        now = _weights(cycle)
        same = now.keys() == reference.keys() and all(now[k] == reference[k] for k in now)
        result = audit(cycle)
        problems = [p for n in result.walk() for p in n.problems]
        leftovers = sorted(str(p.relative_to(cycle)) for p in cycle.rglob(".*") if LEFTOVER.match(p.name))
        return same and not problems and not leftovers, (
            f"killed (attempt {attempt + 1}); resumed weights {'identical' if same else 'DIFFER'}; audit "
            f"{'clean' if not problems else problems[0]}; leftovers {leftovers or 'none'}")

    def _kill_prepare(self, straight: Path) -> tuple[bool, str]:
        from megacontext.lifecycle.audit import audit

        for attempt in range(5):
            root = Path(tempfile.mkdtemp(dir=self.base, prefix="kill-prepare-"))
            shutil.copytree(straight / "artifacts" / "data", root / "artifacts" / "data")
            data = root / "artifacts" / "data"
            # a different corpus this time (more documents), so that the old and new ones differ
            proc = self.spawn(root, "prepare-data", overrides=[*_prepare_args(root), "data.max_documents=6"])
            if proc.kill_when(lambda: any(data.glob(".corpus.prepare-*")) and any(data.glob(".shards.staging-*"))):
                break
        else:
            return False, "prepare-data always finished before the kill landed"
        again = self.spawn(root, "prepare-data", overrides=[*_prepare_args(root), "data.max_documents=6"]).finish()
        again = Result(*again)
        result = audit(data / "shards")
        problems = [p for n in result.walk() for p in n.problems]
        leftovers = sorted(p.name for p in data.iterdir() if p.name.startswith(".") and ".lock" not in p.name)
        ok = again.code == 0 and not problems and not leftovers
        return ok, (f"killed (attempt {attempt + 1}); rerun exit {again.code}; shards audit "
                    f"{'clean' if not problems else problems[0]}; leftovers {leftovers or 'none'}")

    def races(self, root: Path) -> None:
        from megacontext.lifecycle.audit import audit

        def both(argv: list[str], seeds: tuple[str, str] = ("0", "0")) -> list[subprocess.CompletedProcess]:
            procs = [self.spawn(root, *argv, env={"MEGACONTEXT_SEED": s}) for s in seeds]
            return [subprocess.CompletedProcess(argv, *p.finish()) for p in procs]

        def judged(done: list[subprocess.CompletedProcess], folder: Path, *, one_refuses: bool) -> tuple[bool, str]:
            codes = [d.returncode for d in done]
            refused = [d for d in done if d.returncode == 2 and "being written by pid" in d.stderr]
            folders = [folder] if (folder / "manifest.json").is_file() else sorted(p for p in folder.iterdir()
                                                                                  if (p / "manifest.json").is_file())
            problems = [p for f in folders for n in audit(f).walk() for p in n.problems]
            fine = all(d.returncode == 0 or d in refused for d in done) and 0 in codes and not problems
            if one_refuses:
                fine = fine and len(refused) == 1
            waited = any("waiting (up to" in d.stderr for d in done)
            odd = [d for d in done if d.returncode != 0 and d not in refused]  # failed some other way: say how
            holder = next((d.stderr.strip().splitlines()[-1] for d in refused + odd if d.stderr.strip()),
                          "one waited for the other" if waited else "none refused or waited (they did not overlap)")
            return fine, f"exits {codes}; {holder[:200]}; audit {'clean' if not problems else problems[0]}"

        cycle2 = root / "artifacts/cycles/cycle-0002"
        self.add("concurrent writers", "two `train-cycle --cycle 2` at once, seeds 0 and 1",
                 "one trains, the other refuses naming the holder; one config in the cycle (audit clean)",
                 lambda: judged(both(["train-cycle", "--cycle", "2"], ("0", "1")), cycle2, one_refuses=True))
        self.add("concurrent writers", "two `promote --cycle 1` at once",
                 "one writes the champion, the other refuses or follows; audit clean (before the forced rebuilds below, which make the report stale)",
                 lambda: judged(both(["promote", "--cycle", "1"]), root / "artifacts/champion", one_refuses=False))
        self.add("concurrent writers", "two `evaluate --checkpoint` of cycle 1 at once",
                 "one writes the report, the other refuses naming it (or runs after it); audit clean",
                 lambda: judged(both(["evaluate", "--checkpoint", str(root / "artifacts/cycles/cycle-0001")]),
                                root / "artifacts/reports/cycle-0001", one_refuses=False))
        self.add("concurrent writers", "two `eval-references --force` at once",
                 "the second waits for the first, then rebuilds; one intact cache (audit clean)",
                 lambda: judged(both(["eval-references", "--force"]), root / "artifacts/eval_references",
                                one_refuses=False))
        self.add("concurrent writers", "two `prepare-data --force` at once",
                 "one publishes, the other refuses naming it (or runs after it); corpus and shards agree",
                 lambda: judged(both(["prepare-data", "--force"]), root / "artifacts/data/shards", one_refuses=False))

    def bad_inputs(self, root: Path) -> None:
        prompt = root / "prompt.txt"
        refusals = [
            ("`train-cycle --cycle 0` (would alias cycle-0000)", ["train-cycle", "--cycle", "0"], {}, "--cycle"),
            ("`train-cycle --cycle -1` (would alias cycle--001)", ["train-cycle", "--cycle", "-1"], {}, "--cycle"),
            ("`promote --cycle 0`", ["promote", "--cycle", "0"], {}, "--cycle"),
            ("`generate --temperature 1e-45`", ["generate", "--prompt-file", str(prompt), "--temperature", "1e-45"],
             {}, "--temperature"),
            ("`generate --top-k -5`", ["generate", "--prompt-file", str(prompt), "--top-k", "-5"], {}, "--top-k"),
            ("`generate --max-new-tokens -1`", ["generate", "--prompt-file", str(prompt), "--max-new-tokens", "-1"],
             {}, "--max-new-tokens"),
            ("`generate` with a missing prompt file", ["generate", "--prompt-file", str(root / "nope.txt")], {},
             "nope.txt"),
            ("an unknown config key `wc.nope=1`", ["config"], {"extra": ("wc.nope=1",)}, "wc.nope"),
            ("`MEGACONTEXT_SEED=abc`", ["config"], {"env": {"MEGACONTEXT_SEED": "abc"}}, "MEGACONTEXT_SEED"),
            ("`evaluate --checkpoint` of a folder that does not exist",
             ["evaluate", "--checkpoint", str(root / "no-such-cycle")], {}, "no-such-cycle"),
            ("`generate --checkpoint` of a folder that is not a finished cycle",
             ["generate", "--prompt-file", str(prompt), "--checkpoint", str(root / "artifacts" / "data")], {},
             "not a finished cycle"),
            ("`audit` of a folder with no manifest", ["audit", str(root)], {"plain": True}, str(root)),
        ]
        for case, argv, how, name in refusals:
            self.add("bad input", case, "refused with one line naming it, before any work",
                     lambda argv=argv, how=how, name=name: self.one_line_refusal(self.cli(root, *argv, **how), name))
        self.add("bad input", "Dagster partition `cycle-1` (would alias cycle-0001)",
                 "refused, naming the canonical spelling", _partition_alias)
        self.add("bad input", "a `.jsonl` document whose text holds U+2028 (a line separator inside a string)",
                 "read as one record", lambda: self._jsonl_separator(root))
        self.add("bad input", "a `.jsonl` line that is not JSON", "one line naming the file and line",
                 lambda: self._jsonl_bad(root))

    def _jsonl_separator(self, root: Path) -> tuple[bool, str]:
        folder = root / "user-data"
        folder.mkdir(exist_ok=True)
        (folder / "docs.jsonl").write_text('{"text": "' + ("line one\u2028line two " * 400) + '"}\n')
        result = self.cli(root, "build-corpus", "--force", extra=("data.source=folder", f"paths.corpus_dir={folder}",
                                                                  f"paths.data_root={root / 'user-artifacts'}"))
        return result.code == 0, f"exit {result.code}: {(result.out.strip().splitlines() or [''])[-1][:200]}"

    def _jsonl_bad(self, root: Path) -> tuple[bool, str]:
        folder = root / "user-data-bad"
        folder.mkdir(exist_ok=True)
        (folder / "docs.jsonl").write_text('{"text": "fine"}\n{not json\n')
        result = self.cli(root, "build-corpus", "--force", extra=("data.source=folder", f"paths.corpus_dir={folder}",
                                                                  f"paths.data_root={root / 'user-artifacts-bad'}"))
        return self.one_line_refusal(result, "docs.jsonl")


def _partition_alias() -> tuple[bool, str]:
    from megacontext.training.cycle import parse_cycle_name

    try:
        parse_cycle_name("cycle-1")
    except ValueError as exc:
        return "cycle-0001" in str(exc), str(exc)
    return False, "accepted"


def _shown(argv: list[str], cycle: Path) -> str:
    return " ".join(a if not a.startswith("/") else ("CYCLE" if a == str(cycle) else Path(a).name) for a in argv)


def _weights(cycle: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    out = {}
    for name in WEIGHTS:
        out.update({f"{name}:{k}": v.numpy().tobytes() for k, v in load_file(cycle / name).items()})
    return out


LEFTOVER = re.compile(r"^\..+\.(?:staging|old|failed)-\d+$")


def _prepare_args(root: Path) -> list[str]:
    return [f"paths.artifact_root={root / 'artifacts'}", f"paths.corpus_dir={root / 'data'}", "data.val_fraction=0.45",
            "data.test_fraction=0"]


@dataclass
class Spawned:
    """A `megacontext` process in its own session, its output in files (no pipe can fill up and block it)."""

    proc: subprocess.Popen
    out: Path
    err: Path

    @classmethod
    def start(cls, args: list[str], logs: Path, env: dict[str, str]) -> "Spawned":
        out = Path(tempfile.mkstemp(dir=logs, prefix="out-")[1])
        err = Path(tempfile.mkstemp(dir=logs, prefix="err-")[1])
        with out.open("w") as o, err.open("w") as e:
            proc = subprocess.Popen([sys.executable, "-m", "megacontext", *args], cwd=ROOT, stdout=o, stderr=e,
                                    env={**os.environ, **env}, start_new_session=True)
        return cls(proc, out, err)

    def finish(self, timeout: float = 600) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        return code, self.out.read_text(), self.err.read_text()

    def kill_when(self, condition: Callable[[], bool], timeout: float = 300) -> bool:
        """SIGKILL the whole process group as soon as `condition()` holds; False when it exited first."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if condition():
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return True
            time.sleep(0.002)
        self.proc.wait()
        return False


@contextlib.contextmanager
def _workspace(root: Path | None, keep: bool) -> Iterator[Path]:
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        yield root
        return
    folder = Path(tempfile.mkdtemp(prefix="fault-matrix-"))
    try:
        yield folder
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def render(rows: list[Row]) -> str:
    lines = ["| family | fault | expected | observed | result |", "|---|---|---|---|---|"]
    lines += [f"| {r.family} | {r.case} | {r.expected} | {r.observed} | {'pass' if r.passed else '**FAIL**'} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    start = time.perf_counter()
    with _workspace(args.root, args.keep) as base:
        matrix = Matrix(base)
        main_root = base / "lifecycle"
        print(f"fault matrix: building the tiny lifecycle under {main_root}", file=sys.stderr, flush=True)
        matrix.build(main_root)
        matrix.flipped_bytes(main_root)
        matrix.bad_inputs(main_root)
        matrix.kills(main_root)
        matrix.races(main_root)
    print(render(matrix.rows))
    failed = [r for r in matrix.rows if not r.passed]
    print(f"\n{len(matrix.rows) - len(failed)}/{len(matrix.rows)} rows pass "
          f"({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
