"""Dynamic-NTK rotary embeddings captured as the plain rotary embedding they are within a kiln engine.

transformers' `dynamic_rope_update` rescales the frequencies once a forward pass reaches a position past
`max_position_embeddings` (a data-dependent branch on `max(position_ids)` that torch.export cannot
capture) and never before: up to that length "dynamic" computes the default frequencies.
`BuildConfig.resolved` refuses a `max_seq_len` beyond `max_position_embeddings`, so no kiln engine
reaches the rescaling, and the branch can go.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _frozen(rope_type: object) -> object:
    """The rope type with "dynamic" replaced by "default" (a name, or a dict of names per layer type)."""
    if isinstance(rope_type, str):
        return "default" if "dynamic" in rope_type else rope_type
    if isinstance(rope_type, dict):
        return {k: _frozen(t) for k, t in rope_type.items()}
    return rope_type


def freeze_dynamic_rope(model: nn.Module) -> int:
    """Mark each dynamic-NTK rotary module of `model` default, so its forward skips the update; returns the count.

    The frequencies they hold are already the unscaled ones (transformers computes them at the original length).
    """
    frozen = 0
    for module in model.modules():
        holder: Any = module
        rope_type = getattr(holder, "rope_type", None)
        new = _frozen(rope_type)
        if new != rope_type:
            holder.rope_type = new
            frozen += 1
    return frozen
