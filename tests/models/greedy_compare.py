"""kiln's greedy tokens and logits against transformers' `generate` (its scores), with the families' bar:
identical in float32 on CPU; with KILN_TEST_DEVICE=cuda KILN_TEST_DTYPE=bfloat16, identical but where the two
part at a near-tie of transformers' own logits (`test_families.compare`)."""

from __future__ import annotations

from typing import Any

import torch
from test_families import DEVICE, DTYPE, compare

__all__ = ["DEVICE", "DTYPE", "LogitsSeen", "check_against_generate"]


class LogitsSeen:
    """Records each request's logits rows, step by step (install as `engine.logits_hook`)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[torch.Tensor]] = {}

    def __call__(self, seqs: list[Any], logits: torch.Tensor) -> None:
        for i, seq in enumerate(seqs):
            self.rows.setdefault(seq.request_id, []).append(logits[i].float().cpu())


def check_against_generate(
    family: str, model: Any, inputs: dict[str, Any], skip: int, out: Any, seen: LogitsSeen, new_tokens: int
) -> dict:
    """Greedy `generate` on `inputs` (its first `skip` tokens are not generated ones) against kiln's `out`."""
    device_inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        ref = model.generate(
            **device_inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = ref.sequences[0, skip:].tolist()
    scores = [s[0].float().cpu() for s in ref.scores]
    return compare(family, out.prompt_token_ids, out.token_ids, seen.rows[out.request_id], tokens, scores)
