"""The process groups of a tensor x pipeline-parallel world, made in the same order by the build (under
the fake backend) and by every rank at run time, so that the group names the programs' collectives
carry name the same groups: the default group ("0") with one pipeline stage, else one tensor-parallel
group per stage, made first ("1", "2", ...)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

WORLD_GROUP = "0"


def tensor_group(rank: int, tp_size: int, pp_size: int) -> str:
    """The name of the group `rank`'s all-reduces and all-gathers run over (make_groups must have run)."""
    return WORLD_GROUP if pp_size == 1 else str(1 + rank // tp_size)


_MADE: dict[Any, Any] = {}  # the groups made for (tp, pp) under the default group in "world"


def make_groups(tp_size: int, pp_size: int, backend: str | None = None) -> list[Any]:
    """One tensor-parallel group per stage when there are several stages and ranks per stage; call it first
    after init_process_group, on every rank. Made once per default group: an engine of the same layout
    loaded later in the process reuses them (its programs name the same groups)."""
    if pp_size == 1 or tp_size == 1:
        return []
    if _MADE.get("world") is not dist.group.WORLD:
        _MADE.clear()
        _MADE["world"] = dist.group.WORLD
    if (tp_size, pp_size) not in _MADE:
        ranks = [list(range(s * tp_size, (s + 1) * tp_size)) for s in range(pp_size)]
        _MADE[tp_size, pp_size] = [dist.new_group(r, backend=backend) for r in ranks]
    return list(_MADE[tp_size, pp_size])


def pipeline_peers(rank: int, tp_size: int, pp_size: int) -> tuple[int | None, int | None]:
    """(the rank this one receives hidden states from, the rank it sends its output to): the same tensor-
    parallel rank of the previous and next stage; the last stage's first rank sends its logits to rank 0."""
    if pp_size == 1:
        return None, None
    stage, t = divmod(rank, tp_size)
    source = None if stage == 0 else (stage - 1) * tp_size + t
    if stage < pp_size - 1:
        return source, (stage + 1) * tp_size + t
    return source, 0 if t == 0 else None
