"""Encoder-decoder families: kiln's batched greedy output against transformers' `generate`, on CPU in float32.

One engine per configuration (two per family); the batch mixes encoder input lengths.
The in-flight test admits a request while another decodes, so one step runs the encoder beside a
decode row.
"""

from __future__ import annotations

import pytest
import torch
from encdec_checkpoints import CONFIGS, make_encdec_checkpoint
from tiny_checkpoints import build_tiny_engine

from kiln import LLM, RequestError, SamplingParams

NEW_TOKENS = 8
MAX_ENCODER_INPUT_LEN = 24


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in (3, 11, 24)]


def hf_greedy(model: torch.nn.Module, prompt: list[int], prefix_len: int) -> list[int]:
    """transformers' greedy generate, without the decoder's start tokens (kiln counts them as prompt)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)
    return out[0, 1:].tolist()[prefix_len - 1 :]


def hf_ignoring_eos(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy tokens, ending at no end-of-sequence token (as kiln's ignore_eos): the argmax of
    its forward pass over the decoder tokens so far, step by step."""
    decoder = [int(model.config.decoder_start_token_id)]
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([decoder])).logits
            decoder.append(int(logits[0, -1].argmax()))
    return decoder[1:]


def engine_and_model(family: str, variant: str, root) -> tuple[LLM, torch.nn.Module]:
    import transformers

    checkpoint = make_encdec_checkpoint(family, variant, root / "ckpt")
    engine = build_tiny_engine(checkpoint, root / "engine", max_encoder_input_len=MAX_ENCODER_INPUT_LEN)
    model = getattr(transformers, CONFIGS[(family, variant)][1]).from_pretrained(checkpoint).eval()
    return LLM(engine), model


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(family, variant) -> (LLM, transformers model), each built once in this module."""
    built: dict[tuple[str, str], tuple[LLM, torch.nn.Module]] = {}

    def get(family: str, variant: str) -> tuple[LLM, torch.nn.Module]:
        if (family, variant) not in built:
            built[(family, variant)] = engine_and_model(family, variant, tmp_path_factory.mktemp(family))
        return built[(family, variant)]

    yield get
    built.clear()


@pytest.mark.parametrize(("family", "variant"), list(CONFIGS), ids=[f"{f}-{v}" for f, v in CONFIGS])
def test_greedy_matches_transformers_generate(family, variant, engines):
    llm, model = engines(family, variant)
    facts = llm.engine.encoder_decoder
    assert facts is not None and facts.max_encoder_input_len == MAX_ENCODER_INPUT_LEN
    batch = prompts()
    outs = llm.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    for prompt, out in zip(batch, outs):
        assert out.token_ids == hf_greedy(model, prompt, len(facts.decoder_prefix)), (family, variant, len(prompt))
    assert len({tuple(o.token_ids) for o in outs}) > 1  # the encoder input matters


@pytest.fixture
def t5(engines) -> tuple[LLM, torch.nn.Module]:
    return engines("t5", "gated-gelu")


def test_a_request_admitted_while_another_decodes(t5):
    llm, model = t5
    engine = llm.engine
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    first, second = prompts(1)[1:]
    a = engine.add_request(engine.validate(first, params))
    engine.step()  # a's encoder and first decoder token
    engine.step()  # a decodes
    b = engine.add_request(engine.validate(second, params))
    engine.step()  # b's encoder run beside a's decode row
    assert a.num_computed_tokens > len(a.prompt_ids) and b.num_computed_tokens == len(b.prompt_ids)
    stats = engine.stats()  # the blocks of both requests' cross keys and decoder tokens, counted as held
    held = sum(-(-seq.num_computed_tokens // stats.kv_block_size) for seq in (a, b))
    assert stats.kv_blocks - stats.kv_free_blocks == held
    while engine.has_unfinished():
        engine.step()
    for seq, prompt in ((a, first), (b, second)):
        assert seq.output_ids == hf_ignoring_eos(model, prompt, NEW_TOKENS)
    stats = engine.stats()
    assert stats.kv_free_blocks == stats.kv_blocks  # freed with the requests


def test_an_encoder_input_over_the_limit_is_refused(t5):
    llm, _ = t5
    with pytest.raises(RequestError, match=r"max_encoder_input_len \(24\).*--max-encoder-input-len"):
        llm.generate([[5] * (MAX_ENCODER_INPUT_LEN + 1)], SamplingParams(max_tokens=2))


def test_preempted_requests_rerun_their_encoder(t5):
    """A pool too small for the batch: preempted requests recompute (encoder again, then their decoder
    tokens as one prefill) and still decode as transformers does."""
    llm, model = t5
    small = LLM(llm.engine.path, num_kv_blocks=7)  # blocks of 16 tokens
    batch = prompts(2)
    params = SamplingParams(max_tokens=3 * NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = small.generate(batch, params)
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    for prompt, out in zip(batch, outs):
        assert out.token_ids == hf_ignoring_eos(model, prompt, 3 * NEW_TOKENS)
