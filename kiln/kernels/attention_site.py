"""`kiln::attention_site`: where a captured model computes attention, before any cache exists.

Capture emits one call per attention layer with the layer's facts as constant arguments
(layer index, scale, sliding window, soft-cap). Its real implementation is causal attention
of one sequence over itself, so a captured graph runs on its own; the paged-attention pass
replaces every site with `kiln::paged_attention`.
"""

from __future__ import annotations

import torch

from kiln.kernels import reference


@torch.library.custom_op("kiln::attention_site", mutates_args=())
def attention_site(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
) -> torch.Tensor:
    return reference.causal_attention(q, k, v, scale, sliding_window, softcap)


@attention_site.register_fake
def _attention_site_fake(q, k, v, layer, scale, sliding_window, softcap):  # type: ignore[no-untyped-def]
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])
