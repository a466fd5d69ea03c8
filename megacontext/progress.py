"""Progress for long work: a rich bar on a terminal, a plain line every 10% in logs.

Library code reports progress through `progress_bar`, never by printing, so the
CLI, Dagster, DVC logs and tests all get sensible output from the same call.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(description: str, total: int, unit: str = "items") -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield _log_lines(description, total, unit)
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def _log_lines(description: str, total: int, unit: str) -> Callable[[int], None]:
    state = {"done": 0, "next": max(total // 10, 1), "start": time.perf_counter()}

    def advance(n: int = 1) -> None:
        state["done"] += n
        if n and state["done"] >= state["next"] or state["done"] == total and n:
            elapsed = time.perf_counter() - state["start"]
            print(f"{description}: {state['done']:,}/{total:,} {unit} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
            state["next"] = state["done"] + max(total // 10, 1)

    return advance
