"""Programmatic dependent launch (PDL): let a kernel start while the one before it finishes.

On Hopper and newer GPUs a kernel launched with PDL may be scheduled as soon as every program of
the previous kernel has called `griddepcontrol.launch_dependents` (or exited); it then blocks in
`griddepcontrol.wait` until the previous kernel has completed and its writes are visible. A
decode step is a chain of ~200 short, memory-bound kernels, and without PDL each boundary costs a
drain, a launch and a ramp-up of the memory pipe. With it, the next kernel's launch and, in kiln's
linear, its first weight loads (weights are constant, so they may be read before the wait)
overlap the previous kernel's tail. Inside a CUDA graph the launches become programmatic edges.

The rule every kiln kernel follows, through `handoff`: nothing that a previous kernel may write,
and no store at all, happens before the wait, and the next kernel is released only after it. Both
halves matter. Inductor's kernels (compiled with `triton.enable_pdl`) wait only when they touch a
buffer that the kernel just before them wrote, trusting that everything earlier has completed;
that holds only if no kernel lets its successor start before its own wait has returned. (Signalling
first, as kiln once did, lets an Inductor kernel read a buffer that a kernel two places back may
still be writing.)

`enabled(device)` decides for a launch (CUDA, compute capability >= 9, not the interpreter, and
the kernel selection's `pdl`: `kiln.kernels.selection`); `launch_options(flag)` gives the launch keyword.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from kiln.kernels.selection import current


@functools.lru_cache(maxsize=8)
def _capability(device_index: int) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(device_index)
    return int(major), int(minor)


def supported(device: torch.device) -> bool:
    """Whether the device can launch kernels with PDL (CUDA, compute capability 9.0 or newer)."""
    if device.type != "cuda" or triton.knobs.runtime.interpret:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kiln's kernels on `device` launch with PDL (supported, and selected)."""
    return current().pdl and supported(device)


def launch_options(pdl: bool) -> dict[str, Any]:
    """Keyword arguments for `kernel[grid](...)`: `launch_pdl=True` only when used (the
    interpreter takes no such option)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def handoff(PDL: tl.constexpr):  # type: ignore[no-untyped-def]
    """Block until the previous kernel has completed and its writes are visible, then let the next
    kernel in the stream launch (it still waits for this one before touching what this one writes)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


__all__ = ["enabled", "handoff", "launch_options", "supported"]
