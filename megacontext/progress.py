"""Progress bars for long work (rich), quiet when stderr is not a terminal.

Library code reports progress through `progress_bar`, never by printing, so the
CLI, Dagster and tests all get sensible output from the same call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(description: str, total: int, unit: str = "items") -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; draws a bar on a terminal, nothing otherwise."""
    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
