"""Every tested family: kiln's batched greedy output is token-identical to transformers (CPU, float32)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_reference import greedy, load_reference
from tiny_checkpoints import FAMILIES, WINDOW
from kiln import LLM, SamplingParams, build

PROMPT_LENGTHS = (3, 13, 21)  # one shorter and two longer than the sliding window
NEW_TOKENS = 12


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers(family, checkpoints, tmp_path, record_property):
    assert max(PROMPT_LENGTHS) > WINDOW
    checkpoint = checkpoints(family)
    engine = build(checkpoint, tmp_path / "engine", max_batch_size=4, max_input_len=32, max_seq_len=64,
                   max_num_tokens=64, compile=False, progress=False)
    llm = LLM(engine)
    seen: dict[str, list[torch.Tensor]] = {}
    llm.engine.logits_hook = lambda seqs, logits: [
        seen.setdefault(s.request_id, []).append(logits[i].float().cpu()) for i, s in enumerate(seqs)
    ]
    batch = prompts()
    outs = llm.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))

    reference = load_reference(checkpoint)
    worst = 0.0
    for prompt, out in zip(batch, outs):
        ref_tokens, ref_logits = greedy(reference, prompt, NEW_TOKENS)
        assert out.token_ids == ref_tokens, f"{family}: prompt of {len(prompt)} tokens diverged"
        ours = seen[out.request_id]
        assert len(ours) == NEW_TOKENS
        worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(ours, ref_logits)))
    record_property("max_logit_diff", worst)
    report = os.environ.get("KILN_FAMILY_REPORT")
    if report:
        with open(report, "a") as fh:
            fh.write(json.dumps({"family": family, "max_logit_diff": worst}) + "\n")
    assert worst < 1e-3, f"{family}: max logit difference {worst}"
