"""Custom operators that run without importing torch._dynamo, until something else imports it.

`torch.library.custom_op` wraps each implementation in `torch._disable_dynamo`, which imports
torch._dynamo (about a second on the CPU) at the operator's first call, to keep Dynamo from tracing
into the Python implementation. Until torch._dynamo is imported no frame can be under Dynamo, so the
wrapper's guard is a no-op; `defer_dynamo_import` gives the registered operators a guard that calls the
implementation directly until then and Dynamo's own guard from then on. An engine loaded without
torch._inductor (see `kiln.engine.cpu_module`) would otherwise pay the import at its first step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

_GUARD = "__dynamo_disable"  # the attribute torch._disable_dynamo caches its guard in


def _until_dynamo(fn: Callable[..., Any]) -> Callable[..., Any]:
    guarded: Callable[..., Any] | None = None

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal guarded
        if guarded is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            import torch._dynamo

            guarded = torch._dynamo.disable(fn, True, wrapping=False)  # what torch._disable_dynamo makes
        return guarded(*args, **kwargs)

    return call


def defer_dynamo_import() -> int:
    """Give the custom operators registered so far the guard above; returns how many implementations got it
    (none when torch._dynamo is imported already, or this torch keeps its operators otherwise)."""
    if "torch._dynamo" in sys.modules:
        return 0
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:
        return 0
    count = 0
    for opdef in list(OPDEFS.values()):
        for wrapper in getattr(opdef, "_backend_fns", {}).values():
            fn = getattr(wrapper, "__wrapped__", None)  # torch._disable_dynamo's functools.wraps
            if fn is not None and getattr(fn, _GUARD, None) is None:
                setattr(fn, _GUARD, _until_dynamo(fn))
                count += 1
    return count
