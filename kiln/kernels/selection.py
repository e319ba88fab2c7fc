"""Which kernels kiln's ops run: chosen once (at load, or for a build), read by every op call.

The ops read `current()` instead of the environment: a context variable, so each thread (and each
engine) sees only what it selected. An Engine resolves its selection from its RuntimeConfig and
its manifest's `pdl` once, when it loads (`from_configs`), and runs its loading, graph capture and
every step inside `selected(engine.kernels)`: two engines of one process with different choices
each run their own. A build selects its `pdl` while it compiles and verifies. `selected(...)`
changes the selection for a block (tests, benchmarks); `select(...)` for the calling thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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


_DEFAULT = KernelSelection()
_current: ContextVar[KernelSelection] = ContextVar("kiln_kernel_selection", default=_DEFAULT)


def current() -> KernelSelection:
    """The selection the ops of this thread follow now (the default one in a thread that selected none)."""
    return _current.get()


def select(selection: KernelSelection) -> KernelSelection:
    """Make `selection` the one the ops of the calling thread follow; returns the one it replaces."""
    if not isinstance(selection, KernelSelection):
        raise KilnError(f"select() takes a KernelSelection, got {type(selection).__name__}")
    previous = _current.get()
    _current.set(selection)
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
    chosen = selection or _current.get()
    if changes:
        chosen = replace(chosen, **changes)
    if not isinstance(chosen, KernelSelection):
        raise KilnError(f"selected() takes a KernelSelection, got {type(chosen).__name__}")
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)


__all__ = ["KernelSelection", "current", "from_configs", "select", "selected"]
