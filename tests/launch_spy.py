"""Count an engine's decode launches and whether each was pipelined, for tests of the runtime paths."""

from __future__ import annotations

import weakref
from typing import Any


def record_launches(engine: Any) -> list[bool]:
    """Wrap `engine._launch`; the list returned gets, per launch, whether the step was pipelined
    (launched before the tokens of the step before it were read).

    The wrapper holds the engine weakly: a patched method referring to its own instance would form a
    reference cycle that keeps the engine, and its GPU memory, alive until the cycle collector runs."""
    launched: list[bool] = []
    owner = weakref.ref(engine)
    launch = type(engine)._launch

    def spy(chunks: Any, pending: Any) -> Any:
        launched.append(pending is not None)
        return launch(owner(), chunks, pending)

    engine._launch = spy
    return launched
