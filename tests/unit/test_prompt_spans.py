import torch

from kiln.runtime.prompt_logprobs import PromptSpan, prompt_spans, token_logprobs
from kiln.runtime.scheduler import ScheduledChunk
from kiln.runtime.sequence import Sequence
from kiln.sampling_params import SamplingParams


def scored(prompt_len: int) -> Sequence:
    seq = Sequence("r", list(range(prompt_len)), SamplingParams(prompt_logprobs=1))
    seq.prompt_logprobs = [None]
    return seq


def test_spans_cover_each_prompt_token_once_across_chunks():
    seq = scored(10)
    # positions 0..3 score prompt tokens 1..4
    assert prompt_spans([ScheduledChunk(seq, 0, 4)]) == [PromptSpan(0, 0, 4)]
    seq.prompt_logprobs += [object()] * 4
    # the completing chunk: positions 4..8 score tokens 5..9; position 9 predicts the first output token
    plain = Sequence("p", [1, 2, 3], SamplingParams())
    assert prompt_spans([ScheduledChunk(plain, 0, 3), ScheduledChunk(seq, 4, 6)]) == [PromptSpan(1, 4, 5)]
    seq.prompt_logprobs += [object()] * 5
    assert not seq.needs_prompt_logits
    assert prompt_spans([ScheduledChunk(seq, 0, 10)]) == []  # recomputed after preemption: nothing new


def test_a_recompute_scores_only_what_is_missing():
    seq = scored(10)
    seq.prompt_logprobs += [object()] * 3  # tokens 1..3 scored before a preemption
    assert prompt_spans([ScheduledChunk(seq, 0, 8)]) == [PromptSpan(0, 3, 5)]


def test_token_logprobs_equal_float32_log_softmax_over_many_blocks():
    torch.manual_seed(0)
    logits = torch.randn(300, 50, dtype=torch.bfloat16)
    targets = torch.randint(0, 50, (300,)).tolist()
    got = token_logprobs(logits, targets, 3)
    want = torch.log_softmax(logits.float(), dim=-1)
    assert [g.token_id for g in got] == targets
    assert torch.allclose(torch.tensor([g.logprob for g in got]), want[torch.arange(300), targets], atol=1e-6)
    values, ids = torch.topk(want, 3, dim=-1)
    assert [[t for t, _ in g.top] for g in got] == ids.tolist()
    assert torch.allclose(torch.tensor([[v for _, v in g.top] for g in got]), values, atol=1e-6)
    assert all(g.top == () for g in token_logprobs(logits[:2], targets[:2], 0))
