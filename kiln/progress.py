"""Stage-by-stage progress with timings, shown with rich (or silent)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress as RichProgress
from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn


class Progress:
    """`with progress.stage("export"):` shows a spinner with the elapsed time, then the stage's time when it ends."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        label = f"{name}" + (f" ({detail})" if detail else "")
        start = time.perf_counter()
        if self.enabled and self.console.is_terminal:
            columns = (SpinnerColumn(), TextColumn("[bold]{task.description}[/bold]"), TimeElapsedColumn())
            with RichProgress(*columns, console=self.console, transient=True) as bar:
                bar.add_task(label, total=None)
                yield
        else:
            yield
        elapsed = time.perf_counter() - start
        self.timings[name] = round(self.timings.get(name, 0.0) + elapsed, 3)
        if self.enabled:
            self.console.print(f"[green]✓[/green] {label}  [dim]{elapsed:.1f} s[/dim]")

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(f"  [dim]{text}[/dim]")
