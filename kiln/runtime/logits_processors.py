"""Changes to a step's logits before sampling: a grammar's allowed tokens, and `logit_bias`.

* `apply_bitmask(logits, bitmask)`: -inf wherever a row's bitmask bit is 0. The bitmask is
  ``[B, ceil(V / 32)]`` int32 (llguidance's layout: bit ``t % 32`` of word ``t // 32`` allows token
  ``t``); a row of -1 allows every token.
* `apply_logit_bias(scores, params)`: adds each row's `SamplingParams.logit_bias` in place.

Both run on the logits' device; the caller skips them when no row needs them, so an unconstrained
step launches no extra kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kiln.sampling_params import SamplingParams

BITS = 32


def bitmask_width(vocab: int) -> int:
    """int32 words per row of a bitmask over `vocab` tokens."""
    return (vocab + BITS - 1) // BITS


def host_bitmask(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """A ``[rows, width]`` int32 host bitmask allowing every token (pinned when it is bound for a GPU)."""
    return torch.full((rows, bitmask_width(vocab)), -1, dtype=torch.int32, pin_memory=device.type == "cuda")


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` without making the host wait (pinned memory on CUDA)."""
    if device.type == "cuda":
        if not host.is_pinned():
            host = host.pin_memory()
        return host.to(device, non_blocking=True)
    return host.to(device)


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, vocab]`` bool: the tokens each row of `bitmask` allows."""
    shifts = torch.arange(BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :vocab].bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` with -inf at the tokens `bitmask` forbids (a new tensor; `logits` is left as it was)."""
    batch, vocab = logits.shape
    if bitmask.shape != (batch, bitmask_width(vocab)) or bitmask.dtype != torch.int32:
        raise ValueError(
            f"bitmask must be int32 of shape {(batch, bitmask_width(vocab))},"
            f" got {bitmask.dtype} {tuple(bitmask.shape)}"
        )
    return logits.masked_fill(~allowed_tokens(bitmask, vocab), float("-inf"))


def apply_logit_bias(scores: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Add each row's logit_bias to ``scores`` (``[B, V]`` float) in place, in one indexed add."""
    vocab = scores.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    amounts: list[float] = []
    for row, p in enumerate(params):
        if not p.logit_bias:
            continue
        for token, amount in p.logit_bias.items():
            if token >= vocab:
                raise ValueError(f"params[{row}].logit_bias names token {token}, outside the vocabulary [0, {vocab})")
            rows.append(row)
            cols.append(token)
            amounts.append(amount)
    if not rows:
        return
    device = scores.device
    row_index = to_device(torch.tensor(rows, dtype=torch.int64), device)
    col_index = to_device(torch.tensor(cols, dtype=torch.int64), device)
    values = to_device(torch.tensor(amounts, dtype=scores.dtype), device)
    scores.index_put_((row_index, col_index), values, accumulate=True)
