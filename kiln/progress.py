"""Stage-by-stage progress with timings, shown with rich (or silent)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


class Progress:
    """`with progress.stage("export"):` shows a spinner with the elapsed time, then the stage's time when it ends.

    rich is imported only when something is shown (a silent Progress, as an engine load uses, never needs it)."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self._console = console
        self.timings: dict[str, float] = {}

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        label = f"{name}" + (f" ({detail})" if detail else "")
        start = time.perf_counter()
        if self.enabled and self.console.is_terminal:
            from rich.progress import Progress as RichProgress
            from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

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
