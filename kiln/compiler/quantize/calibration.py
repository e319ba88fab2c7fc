"""Calibration sequences for a quantizer that searches on text (AWQ): token ids cut from a text."""

from __future__ import annotations

from typing import Any

import torch

from kiln.errors import KilnError


def calibration_ids(tokenizer: Any, text: str, *, seq_len: int = 512, max_sequences: int = 128) -> list[torch.Tensor]:
    """The text tokenized once (with the tokenizer's special tokens, as a prompt is) and cut into
    consecutive sequences of `seq_len` tokens, at most `max_sequences` of them (a last piece shorter
    than 2 tokens is dropped)."""
    if seq_len < 2 or max_sequences < 1:
        raise KilnError(f"calibration needs seq_len >= 2 and max_sequences >= 1, got {seq_len} and {max_sequences}")
    ids = tokenizer(text, verbose=False)["input_ids"] if text.strip() else []
    pieces = [ids[i : i + seq_len] for i in range(0, min(len(ids), seq_len * max_sequences), seq_len)]
    sequences = [torch.tensor(p, dtype=torch.int64) for p in pieces if len(p) >= 2]
    if not sequences:
        raise KilnError("the calibration text is empty: AWQ needs some text to measure activations on")
    return sequences
