"""kiln.runtime.logits_processors and kiln.runtime.grammar: the mask and logit_bias against plain references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.runtime.grammar import Grammars, advance
from kiln.runtime.logits_processors import allowed_tokens, apply_bitmask, apply_logit_bias, bitmask_width
from kiln.runtime.sampler import sample
from kiln.sampling_params import SamplingParams

pytest.importorskip("llguidance")
DEMO = Path(__file__).resolve().parents[2] / "demo" / "tiny-kiln"


def reference_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Token by token: keep logits[r, t] where bit t % 32 of word t // 32 is set, else -inf."""
    out = logits.clone()
    rows, vocab = logits.shape
    words = bitmask.tolist()
    for r in range(rows):
        for t in range(vocab):
            if not (words[r][t // 32] >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab", [32, 613, 1000])
def test_bitmask_matches_reference_on_random_logits(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, bitmask_width(vocab)), generator=gen, dtype=torch.int32)
    bitmask[1] = -1  # a row without a grammar allows everything
    bitmask[2] = 0
    bitmask[2, 0] = 1 << 3  # a single allowed token
    before = logits.clone()
    masked = apply_bitmask(logits, bitmask)
    assert torch.equal(masked, reference_mask(logits, bitmask))
    assert torch.equal(logits, before)  # the caller's logits (a graph's output buffer) are left alone
    assert torch.equal(masked[1], logits[1])
    assert torch.isfinite(masked[2]).sum() == 1 and torch.argmax(masked[2]) == 3


def test_bitmask_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="bitmask must be int32"):
        apply_bitmask(torch.zeros(2, 40), torch.zeros(2, 1, dtype=torch.int32))


def test_logit_bias_matches_reference_on_random_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=gen)
    params = [
        SamplingParams(logit_bias={3: 5.5, 49: -100}),
        SamplingParams(),
        SamplingParams(logit_bias={"0": 100, "7": -2.25}),  # OpenAI's string keys
        SamplingParams(logit_bias={3: 1.0}),
    ]
    expected = scores.clone()
    for row, p in enumerate(params):
        for token, bias in (p.logit_bias or {}).items():
            expected[row, token] += bias
    apply_logit_bias(scores, params)
    assert torch.equal(scores, expected)


def test_logit_bias_outside_the_vocabulary_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apply_logit_bias(torch.zeros(1, 10), [SamplingParams(logit_bias={10: 1.0})])


def test_sample_with_logit_bias_forces_and_bans_tokens() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 64, generator=gen)
    top = torch.argmax(logits, dim=-1).tolist()
    params = [
        SamplingParams(temperature=0.0, logit_bias={17: 100}),
        SamplingParams(temperature=0.0, logit_bias={top[1]: -100}),
        SamplingParams(temperature=0.0),
    ]
    tokens, _ = sample(logits, params, [[]] * 3, [[]] * 3, [None] * 3)
    second = torch.topk(logits[1], 2).indices[1].item()
    assert tokens.tolist() == [17, second, top[2]]
    # sampled rows: a +100 bias makes the token all but certain, -100 all but impossible
    sampled = [SamplingParams(temperature=1.0, seed=s, logit_bias={5: 100, 6: -100}) for s in range(20)]
    many = logits[:1].expand(20, 64).contiguous()
    many[:, 6] = 50.0
    tokens, _ = sample(many, sampled, [[]] * 20, [[]] * 20, [torch.Generator().manual_seed(s) for s in range(20)])
    assert tokens.tolist() == [5] * 20


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    return Grammars(tokenizer, len(tokenizer), eos_ids=[1, 4], capacity=2)


def test_matcher_walks_a_schema_and_completes(grammars: Grammars) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    grammar = grammars.matcher(SamplingParams(guided_json=schema).guided)  # type: ignore[arg-type]
    text = json.dumps({"n": 42})
    ids = tokenizer.encode(text, add_special_tokens=False)
    for index, token in enumerate(ids):
        allowed = allowed_tokens(grammars.bitmask([grammar, None]), len(tokenizer))
        assert allowed[0, token], f"{tokenizer.decode([token])!r} refused after {text[:index]!r}"
        assert allowed[1].all()  # the unconstrained row
        assert not allowed[0, 1] and not allowed[0, 4]  # no end of sequence before the JSON is whole
        assert not grammar.complete
        advance([grammar, None], [token, 0])
    assert grammar.complete


def test_masked_sampling_only_yields_allowed_tokens(grammars: Grammars) -> None:
    grammar = grammars.matcher(SamplingParams(guided_regex=r"(yes|no)").guided)  # type: ignore[arg-type]
    vocab = grammars.vocab_size
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3))
    masked = grammars.mask_logits(logits, [grammar])
    allowed = allowed_tokens(grammars.bitmask([grammar]), vocab)[0]
    assert torch.equal(torch.isfinite(masked[0]), allowed) and 0 < int(allowed.sum()) < vocab


def test_compiled_grammars_are_cached_least_recently_used_first(grammars: Grammars) -> None:
    grammars._compiled.clear()
    a, b, c = (SamplingParams(guided_regex=r).guided for r in ("a+", "b+", "c+"))
    first = grammars.matcher(a)  # type: ignore[arg-type]
    second = grammars.matcher(a)  # type: ignore[arg-type]
    assert grammars.cached == 1 and first.matcher is not second.matcher  # one compile, a matcher per request
    grammars.matcher(b)  # type: ignore[arg-type]
    grammars.matcher(a)  # type: ignore[arg-type]  (a is now the most recent)
    grammars.matcher(c)  # type: ignore[arg-type]  (capacity 2: b goes)
    assert list(grammars._compiled) == [a.grammar, c.grammar]  # type: ignore[union-attr]
