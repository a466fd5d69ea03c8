"""The `megacontext` command (also `python -m megacontext`): one subcommand per lifecycle step.

Every subcommand takes `--profile NAME` and trailing `key.sub=value` overrides,
resolves the config, calls one library function and prints a short report.
Errors the user can fix print one line (`error: ...`) and exit with status 2.
DVC stages and Dagster assets call these same functions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import date
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from rich.console import Console
from rich.table import Table

from megacontext.config import Config, load_config
from megacontext.errors import MegaContextError

console = Console()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _check_cycle_folder(getattr(args, "checkpoint", None))
        cfg = load_config(args.profile, args.overrides)
        if cfg.model.device != "cpu":  # model.device=cuda: everything the command builds lives there
            from megacontext.model.device import use_device

            use_device(cfg)
        return args.handler(cfg, args) or 0
    except MegaContextError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; nothing partial was published")
        return 130


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer ≥ `low`, refused at parse time with a one-line message."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum, {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


MIN_TEMPERATURE = 1e-3  # below it, sampling is greedy in all but name and logits / T overflow float32


def _temperature(text: str) -> float:
    """An argparse type: 0 (greedy) or a finite temperature ≥ MIN_TEMPERATURE."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not (value == 0 or value >= MIN_TEMPERATURE):
        raise argparse.ArgumentTypeError(f"{text} must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}")
    return value


def _check_cycle_folder(folder: Path | None) -> None:
    """`--checkpoint` must be a finished cycle folder (its manifest says kind "cycle"); checked before any work.

    Raises:
        ConfigError: one line naming the folder and the form to use.
    """
    from megacontext.errors import ConfigError

    if folder is None:
        return
    usage = "--checkpoint takes a cycle folder (artifacts/cycles/cycle-NNNN)"
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder; {usage}")
    try:
        kind = json.loads((folder / "manifest.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "cycle":
        raise ConfigError(f"{folder}: not a finished cycle (no cycle manifest.json); {usage}, "
                          "finished by `megacontext train-cycle --cycle N`")


CYCLE = _int_at_least(1)
COUNT = _int_at_least(0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megacontext", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--profile", default="default", help="configs/<NAME>.yaml or a YAML path (default: default)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.max_documents=10")
        p.set_defaults(handler=handler)
        return p

    command("config", cmd_config, "print the resolved config as YAML")
    for name, handler, help in (
        ("build-corpus", cmd_build_corpus, "collect the raw corpus (data/ or the stdlib) into artifacts"),
        ("build-shards", cmd_build_shards, "tokenize the corpus into schema-checked Parquet shards"),
        ("prepare-data", cmd_prepare_data, "build-corpus then build-shards"),
    ):
        p = command(name, handler, help)
        p.add_argument("--force", action="store_true", default=os.environ.get("MEGACONTEXT_FORCE_DATA_REBUILD") == "1",
                       help="rebuild even when an identical build exists (env MEGACONTEXT_FORCE_DATA_REBUILD=1)")
    p = command("build-trees", cmd_build_trees, "build a MegaContext tree (tokens + GistNet gists) per document")
    p.add_argument("--force", action="store_true", help="rebuild even when an identical build exists")
    p = command("eval-references", cmd_eval_references,
                "compute the cycle-independent references once: NLL_full, NLL_recency, attention mass, passkey")
    p.add_argument("--force", action="store_true", help="recompute even when a current, intact cache exists")
    p = command("evaluate", cmd_evaluate, "NLL_full / NLL_recency / NLL_mc, ΔNLL, gap recovery and the gate verdict")
    p.add_argument("--checkpoint", type=Path, help="a cycle folder (artifacts/cycles/cycle-NNNN); default: untrained")
    p.add_argument("--out", type=Path, help="report folder (default: artifacts/evaluation, or artifacts/reports/<cycle> with --checkpoint)")
    p.add_argument("--without", default="", metavar="PARTS",
                   help="ablate trained parts of the checkpoint, comma-separated: gistnet,lensnet,lora")
    p = command("train-cycle", cmd_train_cycle, "one JT1 -> JT2 -> JT3 cycle (resumes if killed), warm-started")
    p.add_argument("--cycle", type=CYCLE, default=1, help="cycle number (folder cycles/cycle-NNNN)")
    p.add_argument("--previous", type=Path, help="the previous accepted cycle folder to warm-start from")
    p.add_argument("--cycles", type=_int_at_least(1), default=1,
                   help="run this many cycles in a row from --cycle, each warm-started from the one before")
    p = command("train-phase", cmd_train_phase, "one phase of a cycle (runs under `torchrun` data-parallel)")
    p.add_argument("--phase", required=True, choices=["jt1", "jt2-labels", "jt2", "jt3", "finish"])
    p.add_argument("--cycle", type=CYCLE, default=1, help="cycle number (folder cycles/cycle-NNNN)")
    p.add_argument("--previous", type=Path, help="the previous accepted cycle folder to warm-start from")
    p = command("promote", cmd_promote, "make a cycle the champion (only if its validation report passed the gate)")
    p.add_argument("--cycle", type=CYCLE, required=True, help="cycle number (folder cycles/cycle-NNNN)")
    p = command("nightly", cmd_nightly, "re-evaluate the champion and compare with its recorded numbers")
    p.add_argument("--date", type=date.fromisoformat, help="the report's date (YYYY-MM-DD; default: today, UTC)")
    p = command("audit", cmd_audit, "walk an artifact's lineage back to the corpus and verify every hash")
    p.add_argument("path", type=Path, help="any artifact folder or file inside one (e.g. artifacts/cycles/cycle-0001)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    for name, handler, help in (
        ("generate", cmd_generate, "stream a long prompt file through the MegaContext runtime and continue it"),
        ("inspect", cmd_inspect, "picture which spans of a document are at which LOD over time, with LensNet scores"),
    ):
        p = command(name, handler, help)
        p.add_argument("--checkpoint", type=Path, help="a cycle folder (artifacts/cycles/cycle-NNNN); default: untrained")
        p.add_argument("--prompt-file", type=Path, required=True, help="UTF-8 text file: the document/prompt")
        p.add_argument("--max-new-tokens", type=COUNT, default=64 if name == "generate" else 0,
                       help="tokens to generate after the prompt")
        p.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy, else >= 0.001")
        p.add_argument("--top-k", type=COUNT, default=0, help="sample from the k most likely tokens (0 = all)")
        p.add_argument("--recompute", action="store_true", help="no K/V reuse: recompute the whole WC every token")
        p.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True,
                       help="stop at the tokenizer's end-of-sequence token (default); --no-stop-at-eos runs on")
        p.add_argument("--tree", type=Path, help="folder for the document's tree (default: artifacts/runtime/<prompt>)")
    p.add_argument("--points", type=_int_at_least(1), default=6, help="points in time to show")
    p.add_argument("--out", type=Path, help="output folder (default: artifacts/inspect/<prompt>)")
    command("cache-model", cmd_cache_model, "convert the base model once to an fp32 safetensors cache; time a load")
    p = command("score", cmd_score, "base-model NLL@H on held-out documents")
    p.add_argument("--context", type=_int_at_least(1), default=2048, help="tokens the base reads before the horizon")
    p.add_argument("--horizon", type=_int_at_least(1), default=64, help="scored tokens after the context (H)")
    p.add_argument("--max-docs", type=_int_at_least(1), default=8)
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    return parser


def cmd_config(cfg: Config, args: argparse.Namespace) -> int:
    print(cfg.to_yaml(), end="")
    return 0


def cmd_build_corpus(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.data.corpus import build_corpus
    from megacontext.lifecycle.lineage import read_manifest

    out = build_corpus(cfg, force=args.force)
    stats = read_manifest(out)["stats"]
    console.print(f"corpus: {stats['documents']:,} documents, {stats['chars']:,} characters ({stats['source']}) -> {out}")
    return 0


def cmd_build_shards(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.lifecycle.lineage import read_manifest
    from megacontext.data.shards import build_shards

    start = time.perf_counter()
    out = build_shards(cfg, force=args.force)
    _print_summary(read_manifest(out)["summary"], title="dataset shards")
    console.print(f"shards -> {out}")
    console.print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_prepare_data(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.data.shards import prepare_data
    from megacontext.lifecycle.lineage import read_manifest

    start = time.perf_counter()
    corpus, shards = prepare_data(cfg, force=args.force)  # all or nothing: a failed shard build keeps the old corpus
    stats = read_manifest(corpus)["stats"]
    console.print(f"corpus: {stats['documents']:,} documents, {stats['chars']:,} characters ({stats['source']}) -> {corpus}")
    _print_summary(read_manifest(shards)["summary"], title="dataset shards")
    console.print(f"shards -> {shards}")
    console.print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_build_trees(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.lifecycle.lineage import read_manifest
    from megacontext.context.tree_build import build_trees

    start = time.perf_counter()
    out = build_trees(cfg, force=args.force)
    manifest = read_manifest(out)
    docs = ", ".join(f"{split} {n}" for split, n in manifest["documents"].items())
    console.print(f"trees: {manifest['tokens']:,} tokens ({docs} documents), GistNet {manifest['gistnet']} -> {out} "
                  f"in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_eval_references(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.evaluation.references import build_references, passkey_dir

    start = time.perf_counter()
    out = build_references(cfg, force=args.force)
    manifest = json.loads((out / "manifest.json").read_text())
    console.print(f"references: {manifest['samples']} samples in {manifest['windows']} full-context windows "
                  f"(built in {manifest['seconds']} s) -> {out}")
    if cfg.eval.passkey.enabled:
        pk = json.loads((passkey_dir(cfg) / "manifest.json").read_text())
        console.print(f"passkey references: {pk['trials']} trials (built in {pk['seconds']} s) -> {passkey_dir(cfg)}")
    console.print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_evaluate(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.evaluation.evaluate import evaluate

    out = evaluate(cfg, checkpoint=args.checkpoint, out=args.out, without=tuple(p for p in args.without.split(",") if p))
    summary = json.loads((out / "summary.json").read_text())
    console.print((out / "report.md").read_text(), markup=False, highlight=False)
    passed = json.loads((out / "manifest.json").read_text())["gate_passed"]
    health = summary.get("focus_health", {})
    warning = "   WARNING: the learned focus never edits (swap rate 0)" if health.get("never_edits") else ""
    console.print(f"gate: {'PASS' if passed else 'FAIL'}   report: {out / 'report.md'}{warning}")
    print(json.dumps({"gate_passed": passed, "report": str(out / "report.md"), "summary_keys": sorted(summary)}))
    return 0


def cmd_train_cycle(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.training.cycle import cycle_dir, run_cycle, run_jt1, run_jt2, run_jt3

    previous = args.previous
    with _process_group() as rank:
        for cycle in range(args.cycle, args.cycle + args.cycles):
            if rank != 0:  # torchrun: the other ranks train, rank 0 also builds trees and the summary
                for run in (run_jt1, run_jt2, run_jt3):
                    run(cfg, cycle, previous)
                previous = cycle_dir(cfg, cycle)
                continue
            out = run_cycle(cfg, cycle, previous=previous)
            summary = json.loads((out / "cycle.json").read_text())
            for phase, rows in summary["telemetry"].items():
                last = rows[-1]
                console.print(f"{phase}: {len(rows)} steps, final loss {last['loss']:.4f}, "
                              f"{summary['seconds'][phase]:.0f} s")
            console.print(f"cycle {cycle} -> {out} in {summary['seconds']['total']:.0f} s"
                          + (f" (warm-started from {previous})" if previous else ""))
            previous = out
    return 0


@contextmanager
def _process_group() -> Iterator[int]:
    """Under `torchrun` (WORLD_SIZE > 1) join the gloo process group for data-parallel phases; yield the rank."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield dist.get_rank() if dist.is_initialized() else 0
        return
    dist.init_process_group("gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def cmd_train_phase(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.training import cycle

    run = {"jt1": cycle.run_jt1, "jt2-labels": cycle.run_jt2_labels, "jt2": cycle.run_jt2, "jt3": cycle.run_jt3,
           "finish": cycle.finish_cycle}[args.phase]
    with _process_group() as rank:
        if args.phase == "finish" and rank != 0:
            return 0
        out = run(cfg, args.cycle, args.previous)
    if rank == 0:
        console.print(f"cycle {args.cycle} {args.phase} -> {out}")
    return 0


def cmd_promote(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.lifecycle.champion import promote
    from megacontext.training.cycle import cycle_dir
    from megacontext.errors import GateError

    try:
        out = promote(cfg, cycle_dir(cfg, args.cycle))
    except GateError as exc:
        Console(stderr=True).print(f"[bold red]not promoted:[/] {exc}", highlight=False, soft_wrap=True)
        return 1
    console.print(f"cycle {args.cycle} is the champion: {out / 'champion.json'}")
    return 0


def cmd_nightly(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.lifecycle.nightly import run_nightly

    result = run_nightly(cfg, day=args.date)
    console.print((result.report / "report.md").read_text(), markup=False, highlight=False)
    console.print(f"nightly: {'PASS' if result.passed else 'REGRESSION'}   report: {result.report / 'report.md'}")
    return 0 if result.passed else 1


def cmd_audit(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.lifecycle.audit import audit, render

    result = audit(args.path)
    nodes = list(result.walk())
    bad = [n for n in nodes if n.problems]
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        console.print(render(result))
        verdict = "[green]verified[/]" if not bad else f"[red]{sum(len(n.problems) for n in bad)} problem(s)[/]"
        console.print(f"{len({n.path for n in nodes})} artifacts: {verdict}")
    return 0 if not bad else 1


def cmd_cache_model(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.model.base_model import load_base_model

    load_base_model(cfg)  # converts on first use
    start = time.perf_counter()
    base = load_base_model(cfg)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in base.model.parameters())
    console.print(f"{base.model_id}: {params / 1e6:.1f}M parameters, {base.max_positions:,} positions, "
                  f"loaded in {seconds:.2f} s")
    return 0


def cmd_score(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.model.base_model import load_base_model
    from megacontext.evaluation.scoring import score_documents
    from megacontext.data.shards import read_split, shards_dir

    base = load_base_model(cfg)
    docs = read_split(shards_dir(cfg), args.split, tokenizer_name=base.tokenizer.name)
    scores = score_documents(base, docs, context=args.context, horizon=args.horizon, max_docs=args.max_docs)
    table = Table(title=f"{base.model_id}: NLL@{args.horizon} after {args.context} tokens ({args.split})")
    for column in ("document", "NLL@H (nats/token)", "seconds"):
        table.add_column(column, justify="left" if column == "document" else "right")
    for s in scores:
        table.add_row(s.source, f"{s.nll:.3f}", f"{s.seconds:.2f}")
    mean = sum(s.nll for s in scores) / len(scores)
    table.add_row("[bold]mean", f"[bold]{mean:.3f}", "")
    console.print(table)
    print(json.dumps({"model_id": base.model_id, "split": args.split, "documents": len(scores), "mean_nll": mean}))
    return 0


def _print_summary(summary: dict, title: str) -> None:
    table = Table(title=title)
    for column in ("split", "documents", "tokens"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, values in summary["splits"].items():
        table.add_row(split, f"{values['documents']:,}", f"{values['tokens']:,}")
    table.add_row("[bold]all", f"[bold]{summary['documents']:,}", f"[bold]{summary['tokens']:,}")
    console.print(table)
    hist = "  ".join(f"{label}: {count}" for label, count in summary["length_histogram"].items())
    console.print(f"document lengths (tokens)  {hist}")


def _start_runtime(cfg: Config, args: argparse.Namespace, *, keep_snapshots: bool):
    """Read the prompt file, load the runtime (clear errors for bad input) and stream the prompt in."""
    import hashlib
    import shutil

    from megacontext.errors import InputDataError
    from megacontext.progress import progress_bar
    from megacontext.runtime.streaming import load_runtime

    path: Path = args.prompt_file
    if not path.is_file():
        raise InputDataError(f"{path}: no such file; --prompt-file takes a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputDataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from exc
    if not text.strip():
        raise InputDataError(f"{path}: the prompt is empty; give the runtime some text to read")
    if args.max_new_tokens < 0 or args.temperature < 0:
        raise InputDataError("--max-new-tokens and --temperature must be >= 0")
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    tree = args.tree or Path(cfg.paths.artifact_root) / "runtime" / f"{path.stem}-{digest}"
    if tree.exists():
        shutil.rmtree(tree)  # a scratch tree for this prompt: rebuilt from the text every run
    runtime = load_runtime(cfg, args.checkpoint, tree, recompute=args.recompute, keep_snapshots=keep_snapshots)
    ids = runtime.base.tokenizer.encode_batch([text])[0]
    start = time.perf_counter()
    with progress_bar("reading the prompt", total=len(ids), unit="tokens") as advance:
        runtime.feed(ids, on_progress=advance)
    console.print(f"prompt: {len(ids):,} tokens read in {time.perf_counter() - start:.1f} s; working context "
                  f"{len(runtime.wc):,}/{runtime.wc.w_max:,} entries {runtime.wc.levels_used}; tree -> {tree}",
                  highlight=False)
    return runtime, text


def _generate(runtime, args: argparse.Namespace, *, echo: bool) -> list[int]:
    tokenizer = runtime.base.tokenizer
    out: list[int] = []
    shown = ""
    for token in runtime.generate(args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                  seed=runtime.cfg.seed, stop_at_eos=args.stop_at_eos):
        out.append(token)
        if echo:  # decode the whole continuation so multi-token characters come out whole
            text = tokenizer.decode(out)
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
    if echo:
        print()
    return out


def _print_runtime_summary(runtime) -> None:
    summary = runtime.summary()
    table = Table(title="runtime telemetry")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:,.4g}" if isinstance(value, float) else f"{value:,}")
    console.print(table)


def cmd_generate(cfg: Config, args: argparse.Namespace) -> int:
    runtime, _ = _start_runtime(cfg, args, keep_snapshots=False)
    try:
        console.rule("continuation")
        _generate(runtime, args, echo=True)
        console.rule()
        _print_runtime_summary(runtime)
    finally:
        runtime.close()
    return 0


def cmd_inspect(cfg: Config, args: argparse.Namespace) -> int:
    from megacontext.runtime.inspect_view import choose, plot_focus_timeline, write_html, write_snapshots_json

    if args.points < 1:
        from megacontext.errors import InputDataError

        raise InputDataError("--points must be >= 1")
    runtime, _ = _start_runtime(cfg, args, keep_snapshots=True)
    try:
        _generate(runtime, args, echo=False)
        if not runtime.snapshots:
            runtime.refocus()  # a prompt shorter than one refocus interval: show its single state
        out = args.out or Path(cfg.paths.artifact_root) / "inspect" / args.prompt_file.stem
        out.mkdir(parents=True, exist_ok=True)
        picks = choose(runtime.snapshots, args.points)
        title = f"{args.prompt_file.name}: {args.checkpoint.name if args.checkpoint else 'untrained'}, W_max {runtime.wc.w_max:,}"
        png = plot_focus_timeline(picks, out / "focus.png", title=title, w_max=runtime.wc.w_max)
        page = write_html(picks, runtime.tokens, runtime.base.tokenizer, out / "focus.html", title=title,
                          picture=png.name, w_max=runtime.wc.w_max)
        write_snapshots_json(runtime.snapshots, out / "snapshots.json")
        _print_runtime_summary(runtime)
        console.print(f"inspect: {len(picks)} points in time -> {png} and {page}", highlight=False)
    finally:
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
