"""A decode step launched on the device whose sampled tokens the host has not read yet."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.runtime.sequence import PENDING_TOKEN, Sequence

__all__ = ["PENDING_TOKEN", "InFlightStep", "TokenPatch", "apply_patch"]


@dataclass
class InFlightStep:
    seqs: list[Sequence]
    indices: list[int]  # where each sequence's placeholder sits in its output_ids
    tokens: torch.Tensor  # [len(seqs)] int64 on the device: the sampled ids
    host: torch.Tensor  # their copy on the host, filled asynchronously
    done: torch.cuda.Event | None

    @classmethod
    def start(cls, seqs: list[Sequence], indices: list[int], tokens: torch.Tensor) -> InFlightStep:
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return cls(seqs, indices, tokens, host, done)
        return cls(seqs, indices, tokens, tokens, None)

    def host_tokens(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return [int(t) for t in self.host.tolist()]


# (positions in the packed input ids, rows of the device tensor, the device tensor of token ids)
TokenPatch = tuple[list[int], list[int], torch.Tensor]


def apply_patch(
    input_ids: torch.Tensor, patch: TokenPatch, positions: list[int], indices: torch.Tensor | None = None
) -> None:
    """input_ids[positions[i]] = tokens[rows[i]], on the device, without reading the tokens on the host.

    indices: [2, len(rows)] int64 on input_ids' device holding (positions, rows) already, copied
    there by the caller with its other inputs (saves two small host-to-device copies per step)."""
    _, rows, tokens = patch
    if not rows:
        return
    if indices is None:
        dev = input_ids.device
        dst = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        src = torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True)
    else:
        assert indices.shape == (2, len(rows)), (tuple(indices.shape), len(rows))
        dst, src = indices[0], indices[1]
    input_ids.index_copy_(0, dst, tokens.index_select(0, src).to(input_ids.dtype))
