"""Bytes a decode step must move, and the device's measured copy bandwidth: the speed limit."""

from __future__ import annotations

import time

import torch


def copy_bandwidth(device: torch.device, size_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy (read + write), the best of `repeats` runs."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            t = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t
        best = min(best, seconds)
    return 2 * size_bytes / best


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * itemsize


def decode_step_bytes(weight_bytes: int, kv_token_bytes: int, batch: int, mean_context: float) -> float:
    """One decode step reads every weight once and each sequence's cached keys and values."""
    return weight_bytes + kv_token_bytes * batch * mean_context
