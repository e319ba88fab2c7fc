"""Log-probabilities of a request's prompt tokens (`SamplingParams.prompt_logprobs`).

The logits at position p score the token at p + 1, so a chunk covering prompt positions [a, b)
yields the log-probs of prompt tokens a + 1 .. b (those still unrecorded, and never past the
prompt). `prompt_spans` names those rows for a step; the runner asks the program for them after the
sampled rows, and `record` turns them into `TokenLogprobs` (log-softmax in float32), appended to
`seq.prompt_logprobs`, whose first entry is None: the first token has no context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kiln.runtime.sampler import TokenLogprobs
from kiln.runtime.scheduler import ScheduledChunk


@dataclass(frozen=True, slots=True)
class PromptSpan:
    """Positions [first, first + count) of chunk `chunk` whose logits score prompt tokens."""

    chunk: int
    first: int
    count: int


def prompt_spans(chunks: Sequence[ScheduledChunk]) -> list[PromptSpan]:
    """The prompt-scoring rows a step must return, chunk by chunk (empty for ordinary requests)."""
    spans = []
    for i, chunk in enumerate(chunks):
        seq = chunk.seq
        if not seq.needs_prompt_logits:
            continue
        assert seq.prompt_logprobs is not None
        first = max(chunk.start, len(seq.prompt_logprobs) - 1)
        end = min(chunk.start + chunk.num_tokens, len(seq.prompt_ids) - 1)
        if end > first:
            spans.append(PromptSpan(i, first, end - first))
    return spans


ROWS_PER_BLOCK = 128  # rows log-softmaxed at once: bounds the float32 copies of a long prompt's logits
SCORED_TOKENS_PER_STEP = 512  # prompt tokens one step scores at most (the scheduler's cap): bounds the logits rows


def max_scored_rows(max_num_tokens: int, largest_image: int = 0) -> int:
    """Logits rows a step can return for scored prompt tokens: the scheduler's cap, or one whole image block
    (never split) when that is larger, and never more than the step's tokens."""
    return min(max_num_tokens, max(SCORED_TOKENS_PER_STEP, largest_image))


def token_logprobs(logits: torch.Tensor, targets: Sequence[int], top: int) -> list[TokenLogprobs]:
    """Each row's log-prob of its target token and its `top` most likely tokens (float32 log-softmax)."""
    out: list[TokenLogprobs] = []
    for begin in range(0, len(targets), ROWS_PER_BLOCK):
        rows = logits[begin : begin + ROWS_PER_BLOCK]
        ids = list(targets[begin : begin + ROWS_PER_BLOCK])
        log_probs = torch.log_softmax(rows.to(torch.float32), dim=-1)
        index = torch.tensor(ids, dtype=torch.int64, device=logits.device)
        chosen = log_probs.gather(1, index.unsqueeze(1)).squeeze(1).tolist()
        if top > 0:
            values, top_ids = torch.topk(log_probs, min(top, log_probs.shape[-1]), dim=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
        else:
            tops = [() for _ in chosen]
        out.extend(TokenLogprobs(t, lp, tp) for t, lp, tp in zip(ids, chosen, tops))
    return out


def record(chunks: Sequence[ScheduledChunk], spans: Sequence[PromptSpan], logits: torch.Tensor) -> None:
    """Append the log-probs of `spans` (whose rows `logits` holds, in order) to their sequences."""
    row = 0
    for span in spans:
        seq = chunks[span.chunk].seq
        assert seq.prompt_logprobs is not None and len(seq.prompt_logprobs) == span.first + 1
        assert seq.params.prompt_logprobs is not None
        targets = seq.prompt_ids[span.first + 1 : span.first + 1 + span.count]
        seq.prompt_logprobs.extend(token_logprobs(logits[row : row + span.count], targets, seq.params.prompt_logprobs))
        row += span.count
