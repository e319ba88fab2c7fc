"""Which kernels kiln's ops run: chosen once (at load, or for a build), read by every op call.

The ops read `current()` (a module global) instead of the environment. An Engine selects from
its RuntimeConfig and its manifest's `pdl` when it loads (`from_configs`); a build selects its
`pdl` while it compiles and verifies. The selection is process-wide: the engine loaded last
decides for every engine in the process. `selected(...)` changes it for a block (tests,
benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from kiln.config import KERNEL_CHOICES
from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.config import BuildConfig, RuntimeConfig


@dataclass(frozen=True, kw_only=True)
class KernelSelection:
    """attention / linear / argmax: "auto" (Triton where it applies) or "reference" (PyTorch);
    pdl: Triton kernels launch with programmatic dependent launch where the GPU supports it."""

    attention: str = "auto"
    linear: str = "auto"
    argmax: str = "auto"
    pdl: bool = True

    def __post_init__(self) -> None:
        for name in ("attention", "linear", "argmax"):
            if getattr(self, name) not in KERNEL_CHOICES:
                raise KilnError(f"KernelSelection.{name} must be one of {KERNEL_CHOICES}, got {getattr(self, name)!r}")
        if not isinstance(self.pdl, bool):
            raise KilnError(f"KernelSelection.pdl must be true or false, got {self.pdl!r}")


_current = KernelSelection()


def current() -> KernelSelection:
    """The selection the ops follow now."""
    return _current


def select(selection: KernelSelection) -> KernelSelection:
    """Make `selection` the one the ops follow; returns the one it replaces."""
    global _current
    if not isinstance(selection, KernelSelection):
        raise KilnError(f"select() takes a KernelSelection, got {type(selection).__name__}")
    previous, _current = _current, selection
    return previous


def from_configs(runtime: "RuntimeConfig", build: "BuildConfig") -> KernelSelection:
    """The selection of an engine loaded with `runtime` from a build made with `build`."""
    return KernelSelection(
        attention=runtime.attention_kernel, linear=runtime.linear_kernel, argmax=runtime.argmax_kernel, pdl=build.pdl
    )


@contextmanager
def selected(selection: KernelSelection | None = None, **changes: Any) -> Iterator[KernelSelection]:
    """Within the block, follow `selection` (default: the current one) with `changes` applied;
    the previous selection comes back afterwards."""
    chosen = replace(selection or _current, **changes)
    previous = select(chosen)
    try:
        yield chosen
    finally:
        select(previous)


__all__ = ["KernelSelection", "current", "from_configs", "select", "selected"]
