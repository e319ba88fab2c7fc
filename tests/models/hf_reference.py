"""Greedy generation with transformers itself: the reference kiln must match."""

from __future__ import annotations

from pathlib import Path

import torch


def load_reference(checkpoint: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Token ids and per-step logits of transformers' own cached greedy decoding (no EOS stop)."""
    device = next(model.parameters()).device
    step_input = torch.tensor([prompt], device=device)
    past = None
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    for _ in range(new_tokens):
        out = model(input_ids=step_input, past_key_values=past, use_cache=True)
        past = out.past_key_values
        last = out.logits[0, -1].float()
        logits.append(last.cpu())
        tokens.append(int(last.argmax()))
        step_input = torch.tensor([[tokens[-1]]], device=device)
    return tokens, logits
