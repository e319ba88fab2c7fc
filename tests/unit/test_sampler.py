"""kiln.runtime.sampler: greedy, seeded sampling, filters, penalties and log-probs (CPU)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from kiln.runtime.sampler import TokenLogprobs, make_generator, sample
from kiln.sampling_params import SamplingParams


def run(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]] | None = None,
    generated: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, list[TokenLogprobs | None] | None]:
    """Call sample() with empty histories and a generator made from each row's seed."""
    rows = logits.shape[0]
    histories = histories if histories is not None else [[] for _ in range(rows)]
    generated = generated if generated is not None else [[] for _ in range(rows)]
    generators = [make_generator(p.seed, logits.device) for p in params]
    return sample(logits, params, histories, generated, generators)


def repeat(params: SamplingParams, rows: int) -> list[SamplingParams]:
    return [params] * rows


def full_logprobs(entry: TokenLogprobs | None, vocab: int) -> torch.Tensor:
    """Rebuild the [V] log-prob vector from a TokenLogprobs holding all V alternatives."""
    assert entry is not None and len(entry.top) == vocab
    out = torch.full((vocab,), float("nan"))
    for token, value in entry.top:
        out[token] = value
    assert not torch.isnan(out).any()
    return out


# -- greedy -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(64, 3000) * 4).to(dtype)
    tokens, logprobs = run(logits, repeat(SamplingParams(temperature=0), 64))
    assert tokens.dtype == torch.int64 and tokens.shape == (64,)
    assert torch.equal(tokens, torch.argmax(logits, dim=-1))
    assert logprobs is None


def test_greedy_ties_take_the_first_index() -> None:
    logits = torch.zeros(3, 10)
    logits[1, [2, 5, 7]] = 1.0
    logits[2] = -1.0
    logits[2, [9, 4]] = -0.5
    tokens, _ = run(logits, repeat(SamplingParams(temperature=0), 3))
    assert tokens.tolist() == [0, 2, 4] == torch.argmax(logits, dim=-1).tolist()


def test_mixed_batch_keeps_greedy_rows_exact() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 500)
    params = [SamplingParams(temperature=0) if row % 2 == 0 else SamplingParams(seed=row) for row in range(8)]
    tokens, _ = run(logits, params)
    expected = torch.argmax(logits, dim=-1)
    assert torch.equal(tokens[0::2], expected[0::2])
    assert ((tokens >= 0) & (tokens < 500)).all()


def test_logits_are_not_modified() -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 100)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0, repetition_penalty=2.0),
        SamplingParams(temperature=0.5, top_k=3, presence_penalty=1.0, seed=1),
        SamplingParams(top_p=0.5, frequency_penalty=1.5, logprobs=2),
        SamplingParams(min_p=0.2),
    ]
    run(logits, params, histories=[[1, 2, 3]] * 4, generated=[[2, 2]] * 4)
    assert torch.equal(logits, before)


# -- seeds ----------------------------------------------------------------------


def draws(seed: int, logits: torch.Tensor, steps: int, **kwargs: object) -> list[int]:
    """Tokens of `steps` consecutive steps of one request with the given seed."""
    params = SamplingParams(seed=seed, **kwargs)  # type: ignore[arg-type]
    generator = make_generator(seed, "cpu")
    out = []
    for _ in range(steps):
        tokens, _ = sample(logits, [params], [[]], [[]], [generator])
        out.append(int(tokens[0]))
    return out


def test_same_seed_same_tokens() -> None:
    torch.manual_seed(3)
    logits = torch.randn(1, 1000)
    first = draws(1234, logits, 20)
    torch.manual_seed(999)  # the global RNG must not matter for a seeded request
    assert draws(1234, logits, 20) == first
    assert draws(1234, logits, 20, top_k=50, top_p=0.9) == draws(1234, logits, 20, top_k=50, top_p=0.9)


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, 1000)  # uniform: any two seeds agreeing on 10 draws is ~1e-30
    sequences = {tuple(draws(seed, logits, 10)) for seed in range(5)}
    assert len(sequences) == 5
    # and within one request the draws vary from step to step
    assert len(set(draws(7, logits, 10))) > 1


def test_seeded_row_does_not_depend_on_batch_neighbours() -> None:
    torch.manual_seed(4)
    logits = torch.randn(1, 800)
    alone = draws(42, logits, 8)

    params = [SamplingParams(), SamplingParams(seed=42), SamplingParams(seed=5, top_k=3), SamplingParams(temperature=0)]
    generators = [make_generator(p.seed, "cpu") for p in params]
    batch_logits = torch.cat([torch.randn(1, 800), logits, torch.randn(2, 800)])
    together = []
    for _ in range(8):
        tokens, _ = sample(batch_logits, params, [[]] * 4, [[]] * 4, generators)
        together.append(int(tokens[1]))
    assert together == alone


def test_make_generator() -> None:
    assert make_generator(None, "cpu") is None
    generator = make_generator(77, torch.device("cpu"))
    assert isinstance(generator, torch.Generator)
    assert generator.initial_seed() == 77
    assert generator.device.type == "cpu"


# -- filters --------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_equals_greedy(temperature: float) -> None:
    torch.manual_seed(5)
    logits = torch.randn(200, 300)
    logits[:3] = 0.0  # all-tie rows: greedy and top-1 must both pick id 0
    tokens, _ = run(logits, repeat(SamplingParams(temperature=temperature, top_k=1), 200))
    assert torch.equal(tokens, torch.argmax(logits, dim=-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_tiny_top_p_equals_greedy(temperature: float) -> None:
    torch.manual_seed(6)
    logits = torch.randn(200, 300)
    logits[:3] = 0.0
    tokens, _ = run(logits, repeat(SamplingParams(temperature=temperature, top_p=1e-6), 200))
    assert torch.equal(tokens, torch.argmax(logits, dim=-1))
    # A top_p that rounds to 0 in float32 is still greedy (it once removed every token: nan probs).
    tokens, _ = run(logits, repeat(SamplingParams(temperature=temperature, top_p=5e-324), 200))
    assert torch.equal(tokens, torch.argmax(logits, dim=-1))


def test_tiny_min_p_keeps_everything_and_min_p_one_is_greedy() -> None:
    torch.manual_seed(7)
    logits = torch.randn(200, 300)
    tokens, _ = run(logits, repeat(SamplingParams(min_p=1.0), 200))
    assert torch.equal(tokens, torch.argmax(logits, dim=-1))


def test_sampled_tokens_stay_in_the_top_k_set() -> None:
    torch.manual_seed(8)
    rows, vocab, k = 4000, 200, 7
    logits = torch.randn(1, vocab).expand(rows, vocab).contiguous()
    tokens, _ = run(logits, repeat(SamplingParams(top_k=k, temperature=2.0), rows))
    allowed = set(torch.topk(logits[0], k).indices.tolist())
    seen = set(tokens.tolist())
    assert seen <= allowed
    assert seen == allowed  # 4000 draws over 7 tokens at temperature 2 reach every one


def test_top_k_per_row() -> None:
    torch.manual_seed(9)
    base = torch.randn(1, 100)
    logits = base.expand(3000, 100).contiguous()
    params = [SamplingParams(top_k=[1, 2, 5][row % 3]) for row in range(3000)]
    tokens, _ = run(logits, params)
    order = torch.argsort(base[0], descending=True).tolist()
    for kind, k in enumerate([1, 2, 5]):
        assert set(tokens[kind::3].tolist()) == set(order[:k])


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # ranked: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log().unsqueeze(0).expand(3000, 4).contiguous()
    torch.manual_seed(10)
    for top_p, expected in [(0.45, {1}), (0.75, {1, 3}), (0.85, {1, 3, 2}), (0.97, {1, 3, 2, 0}), (1.0, {0, 1, 2, 3})]:
        tokens, _ = run(logits, repeat(SamplingParams(top_p=top_p), 3000))
        assert set(tokens.tolist()) == expected, top_p


def test_min_p_drops_unlikely_tokens() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0).expand(3000, 4).contiguous()
    torch.manual_seed(11)
    for min_p, expected in [(0.05, {0, 1, 2, 3}), (0.2, {0, 1, 2}), (0.5, {0, 1}), (0.7, {0})]:
        tokens, _ = run(logits, repeat(SamplingParams(min_p=min_p), 3000))
        assert set(tokens.tolist()) == expected, min_p


def test_filters_combine() -> None:
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    logits = probs.log().unsqueeze(0).expand(3000, 5).contiguous()
    torch.manual_seed(12)
    # top_k=4 keeps {0,1,2,3}; top_p=0.8 of that renormalised (0.42, 0.26, 0.21, 0.11) keeps {0,1,2}
    tokens, _ = run(logits, repeat(SamplingParams(top_k=4, top_p=0.8), 3000))
    assert set(tokens.tolist()) == {0, 1, 2}
    # min_p=0.55 relative to the top token keeps {0, 1}
    tokens, _ = run(logits, repeat(SamplingParams(top_k=4, top_p=0.8, min_p=0.55), 3000))
    assert set(tokens.tolist()) == {0, 1}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_follow_the_tempered_softmax(temperature: float) -> None:
    torch.manual_seed(13)
    rows = 40000
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5, 2.0]]).expand(rows, 5).contiguous()
    tokens, _ = run(logits, repeat(SamplingParams(temperature=temperature), rows))
    counts = torch.bincount(tokens, minlength=5).float() / rows
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    assert torch.allclose(counts, expected, atol=0.015), (counts, expected)


# -- penalties ------------------------------------------------------------------


def hf_repetition(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    """The Hugging Face rule written out: divide positive logits, multiply negative ones."""
    out = logits.clone()
    for token in set(history):
        value = out[token]
        out[token] = value / penalty if value > 0 else value * penalty
    return out


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.5])
def test_repetition_penalty_matches_hand_rule_and_transformers(penalty: float) -> None:
    torch.manual_seed(14)
    vocab = 20
    logits = torch.randn(3, vocab) * 3
    histories = [[0, 3, 3, 7, 19, 12], [], [5, 5, 5, 1, 2, 8, 9, 10]]
    params = repeat(SamplingParams(temperature=0, repetition_penalty=penalty, logprobs=vocab), 3)
    tokens, logprobs = run(logits, params, histories=histories)
    assert logprobs is not None
    processor = RepetitionPenaltyLogitsProcessor(penalty=penalty)
    for row in range(3):
        by_hand = hf_repetition(logits[row], histories[row], penalty)
        history = torch.tensor([histories[row]], dtype=torch.long).reshape(1, -1)
        by_hf = processor(history, logits[row : row + 1].clone())[0]
        assert torch.allclose(by_hand, by_hf)
        got = full_logprobs(logprobs[row], vocab)
        assert torch.allclose(got, torch.log_softmax(by_hand, dim=-1), atol=1e-5)
        assert int(tokens[row]) == int(torch.argmax(by_hf))


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.5, -1.0, 0.0]])
    tokens, _ = run(logits, [SamplingParams(temperature=0, repetition_penalty=1.5)], histories=[[0]])
    assert int(tokens[0]) == 1  # 3.0 / 1.5 = 2.0 < 2.5
    tokens, _ = run(logits, [SamplingParams(temperature=0, repetition_penalty=1.1)], histories=[[0]])
    assert int(tokens[0]) == 0  # 3.0 / 1.1 = 2.73 > 2.5


def test_repetition_penalty_large_vocab_against_transformers() -> None:
    torch.manual_seed(15)
    vocab = 5000
    logits = torch.randn(2, vocab) * 2
    history = torch.randint(0, vocab, (2, 300))
    params = repeat(SamplingParams(temperature=0, repetition_penalty=1.8, logprobs=20), 2)
    tokens, logprobs = run(logits, params, histories=history.tolist())
    expected = RepetitionPenaltyLogitsProcessor(penalty=1.8)(history, logits.clone())
    assert torch.equal(tokens, torch.argmax(expected, dim=-1))
    assert logprobs is not None
    for row in range(2):
        entry = logprobs[row]
        assert entry is not None
        top_values, top_ids = torch.topk(torch.log_softmax(expected[row], dim=-1), 20)
        assert [token for token, _ in entry.top] == top_ids.tolist()
        assert torch.allclose(torch.tensor([value for _, value in entry.top]), top_values, atol=1e-5)


def test_presence_and_frequency_penalties_by_hand() -> None:
    torch.manual_seed(16)
    vocab = 20
    logits = torch.randn(3, vocab)
    generated = [[4, 4, 4, 9, 0], [1, 2, 1], [17]]
    # The prompt part of the history must not count for these penalties.
    histories = [[5, 6, 7] + g for g in generated]
    params = [
        SamplingParams(temperature=0, presence_penalty=0.7, frequency_penalty=0.4, logprobs=vocab),
        SamplingParams(temperature=0, presence_penalty=-1.0, logprobs=vocab),
        SamplingParams(temperature=0, frequency_penalty=-2.0, logprobs=vocab),
    ]
    tokens, logprobs = run(logits, params, histories=histories, generated=generated)
    assert logprobs is not None
    for row, p in enumerate(params):
        expected = logits[row].clone()
        for token, count in Counter(generated[row]).items():
            expected[token] -= p.presence_penalty + p.frequency_penalty * count
        got = full_logprobs(logprobs[row], vocab)
        assert torch.allclose(got, torch.log_softmax(expected, dim=-1), atol=1e-5)
        assert int(tokens[row]) == int(torch.argmax(expected))


def test_all_penalties_together_in_order() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    params = [
        SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=4)
    ]
    # history: prompt [0, 1] + generated [2, 2]
    _, logprobs = run(logits, params, histories=[[0, 1, 2, 2]], generated=[[2, 2]])
    # repetition on {0,1,2}: 2 -> 1, -1 -> -2, 0.5 -> 0.25; then token 2: 0.25 - 0.5 - 2 * 0.25 = -0.75
    expected = torch.tensor([1.0, -2.0, -0.75, 1.0])
    assert logprobs is not None
    assert torch.allclose(full_logprobs(logprobs[0], 4), torch.log_softmax(expected, -1), atol=1e-6)


# -- log-probs ------------------------------------------------------------------


def test_logprobs_match_log_softmax_before_temperature() -> None:
    torch.manual_seed(17)
    logits = torch.randn(5, 1000) * 3
    params = [
        SamplingParams(temperature=0, logprobs=5),
        SamplingParams(temperature=0.5, logprobs=20, seed=3),
        SamplingParams(top_k=3, top_p=0.5, logprobs=0, seed=4),
        SamplingParams(),  # no log-probs for this row
        SamplingParams(temperature=2.0, logprobs=1),
    ]
    tokens, logprobs = run(logits, params)
    assert logprobs is not None and len(logprobs) == 5
    assert logprobs[3] is None
    reference = torch.log_softmax(logits, dim=-1)
    for row in (0, 1, 2, 4):
        entry = logprobs[row]
        assert entry is not None
        assert entry.token_id == int(tokens[row])
        assert entry.logprob == pytest.approx(float(reference[row, entry.token_id]), abs=1e-5)
        count = params[row].logprobs
        assert len(entry.top) == count
        values, ids = torch.topk(reference[row], count) if count else (torch.empty(0), torch.empty(0))
        assert [token for token, _ in entry.top] == ids.tolist()
        assert [value for _, value in entry.top] == pytest.approx(values.tolist(), abs=1e-5)
        assert all(isinstance(token, int) and isinstance(value, float) for token, value in entry.top)


def test_no_logprobs_requested_returns_none() -> None:
    _, logprobs = run(torch.randn(2, 10), [SamplingParams(), SamplingParams(temperature=0)])
    assert logprobs is None


def test_logprobs_wider_than_vocab() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    _, logprobs = run(logits, [SamplingParams(temperature=0, logprobs=20)])
    assert logprobs is not None and logprobs[0] is not None
    assert [token for token, _ in logprobs[0].top] == [2, 1, 0]


# -- caller errors --------------------------------------------------------------


def test_rejects_bad_inputs() -> None:
    logits = torch.randn(2, 10)
    ok = [SamplingParams(), SamplingParams()]
    with pytest.raises(ValueError, match="shape"):
        sample(torch.randn(10), ok[:1], [[]], [[]], [None])
    with pytest.raises(ValueError, match="floating"):
        sample(torch.zeros(2, 10, dtype=torch.long), ok, [[], []], [[], []], [None, None])
    with pytest.raises(ValueError, match="params has 1 entries"):
        sample(logits, ok[:1], [[], []], [[], []], [None, None])
    with pytest.raises(ValueError, match="generators has 3 entries"):
        sample(logits, ok, [[], []], [[], []], [None, None, None])
    with pytest.raises(ValueError, match="params\\[1\\]"):
        sample(logits, [ok[0], {"temperature": 0}], [[], []], [[], []], [None, None])  # type: ignore[list-item]


def test_rejects_out_of_range_history_ids() -> None:
    logits = torch.randn(1, 10)
    with pytest.raises(ValueError, match="histories\\[0\\] holds token id 10"):
        sample(logits, [SamplingParams(repetition_penalty=1.2)], [[1, 10]], [[]], [None])
    with pytest.raises(ValueError, match="generated\\[0\\] holds token id -1"):
        sample(logits, [SamplingParams(presence_penalty=1.0)], [[]], [[-1, 3]], [None])


def test_empty_batch() -> None:
    tokens, logprobs = sample(torch.empty(0, 10), [], [], [], [])
    assert tokens.shape == (0,) and tokens.dtype == torch.int64 and logprobs is None
