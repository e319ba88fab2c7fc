"""Sampling options through LLM.generate on the demo engine (its text is known, so stops are checkable)."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_helpers import SHARED_GPU

from kiln import LLM, RequestError, SamplingParams, build

DEMO = Path(__file__).resolve().parents[2] / "demo" / "tiny-kiln"
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    engine = build(
        DEMO, tmp_path_factory.mktemp("demo") / "e", max_seq_len=256, max_input_len=128, compile=False, progress=False
    )
    return LLM(engine, overlap_decode=False, **SHARED_GPU)  # pipelined decode is the next engine's


def test_max_tokens_ends_with_length(llm):
    out = llm.generate("A kiln is", SamplingParams(max_tokens=7, **GREEDY))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_chat_answer_stops_at_end_token_unless_ignored(llm):
    prompt = llm.apply_chat_template([{"role": "user", "content": "What is a kiln?"}])
    out = llm.generate([prompt], SamplingParams(max_tokens=60, **GREEDY))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_ids
    assert "<|end|>" not in out.text and out.text.strip().endswith(".")
    longer = llm.generate([prompt], SamplingParams(max_tokens=60, ignore_eos=True, **GREEDY))[0]
    assert len(longer.token_ids) == 60 and longer.token_ids[: len(out.token_ids)] == out.token_ids


def test_stop_string_cuts_text_before_it(llm):
    full = llm.generate("A kiln is", SamplingParams(max_tokens=40, **GREEDY))[0].text
    assert "clay" in full
    out = llm.generate("A kiln is", SamplingParams(max_tokens=40, stop=["clay"], **GREEDY))[0]
    assert out.finish_reason == "stop" and out.stop_reason == "clay"
    assert out.text == full[: full.index("clay")]


def test_stop_token_id(llm):
    full = llm.generate("A kiln is", SamplingParams(max_tokens=20, **GREEDY))[0]
    stop_id = full.token_ids[5]
    out = llm.generate("A kiln is", SamplingParams(max_tokens=20, stop_token_ids=[stop_id], **GREEDY))[0]
    first = full.token_ids.index(stop_id)
    assert out.token_ids == full.token_ids[: first + 1] and out.stop_reason == stop_id


def test_seed_makes_sampling_reproducible(llm):
    # The demo model is nearly deterministic (it memorised its corpus): a high temperature makes
    # the draws close to uniform, so equal seeds must agree and different ones must not.
    params = [SamplingParams(max_tokens=24, temperature=50.0, seed=s) for s in (1, 1, 2)]
    a, b, c = llm.generate(["Clay is"] * 3, params)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_batch_with_a_bad_prompt_runs_nothing_and_reports_which(llm):
    with pytest.raises(RequestError, match="prompt 1"):
        llm.generate(["A kiln is", "x " * 200], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished()
    assert llm.generate("A kiln is", SamplingParams(max_tokens=3, **GREEDY))[0].token_ids


def test_an_empty_prompt_is_refused(llm):
    # "" would tokenize to the BOS alone, and [] to nothing: neither is a prompt.
    for prompts in ([""], ["A kiln is", ""], [[]], [{"prompt": ""}]):
        with pytest.raises(RequestError, match=r"prompt \d+: the prompt is empty"):
            llm.generate(prompts, SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()


def test_failed_step_releases_every_request(llm, monkeypatch):
    def broken(chunks):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(llm.engine.runner, "run", broken)
    with pytest.raises(RuntimeError, match="fell over"):
        llm.generate(["A kiln is", "Clay is"], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished()
    stats = llm.engine.stats()
    assert stats.kv_free_blocks == stats.kv_blocks and stats.requests == 0


def test_pipelined_decode_gives_the_same_results(llm):
    """Stops, lengths and seeds come out the same when decode steps are pipelined (the CUDA default)."""
    from kiln import LLM

    pipelined = LLM(llm.engine.path, overlap_decode=True, **SHARED_GPU)
    assert pipelined.engine.overlap_decode and not llm.engine.overlap_decode
    prompts = ["A kiln is", "The potter", "Clay is", "Glaze", "Fire in the kiln is hot and", "Bisque"]
    params = [
        SamplingParams(max_tokens=m, temperature=0.0, stop=stop)
        for m, stop in [(5, ()), (40, ()), (17, ("clay",)), (1, ()), (60, ()), (33, ())]
    ]
    for want, got in zip(llm.generate(prompts, params), pipelined.generate(prompts, params)):
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
    seeded = SamplingParams(max_tokens=30, temperature=0.9, seed=3)
    assert [o.token_ids for o in llm.generate(prompts, seeded)] == [
        o.token_ids for o in pipelined.generate(prompts, seeded)
    ]
    stats = pipelined.engine.stats()
    assert stats.kv_free_blocks == stats.kv_blocks and stats.requests == 0
    assert all(-1 not in o.token_ids for o in pipelined.generate(prompts, params))


def test_n_completions_per_prompt_come_in_order_each_as_its_own_seed_gives_it(llm):
    params = SamplingParams(max_tokens=12, temperature=50.0, seed=5, n=3)
    outs = llm.generate(["A kiln is", "Clay is"], params)
    assert [(o.prompt, o.index) for o in outs] == [(p, i) for p in ("A kiln is", "Clay is") for i in range(3)]
    alone = [SamplingParams(max_tokens=12, temperature=50.0, seed=5 + i) for i in range(3)]
    assert [o.token_ids for o in outs[3:]] == [o.token_ids for o in llm.generate(["Clay is"] * 3, alone)]
    assert len({tuple(o.token_ids) for o in outs[:3]}) > 1  # the choices differ
    greedy = llm.generate("A kiln is", SamplingParams(max_tokens=8, n=2, **GREEDY))
    assert [o.index for o in greedy] == [0, 1] and greedy[0].token_ids == greedy[1].token_ids


def test_chat_applies_the_chat_template_to_one_or_several_conversations(llm):
    hello = [{"role": "user", "content": "What is a kiln?"}]
    clay = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is clay?"}]
    params = SamplingParams(max_tokens=20, **GREEDY)
    (one,) = llm.chat(hello, params)
    want = llm.generate([llm.apply_chat_template(hello)], params)[0]
    assert one.token_ids == want.token_ids and one.text == want.text
    assert one.prompt == llm.tokenizer.decode(want.prompt_token_ids) and "What is a kiln?" in one.prompt
    both = llm.chat([hello, clay], params)
    assert [o.token_ids for o in both] == [want.token_ids, llm.chat(clay, params)[0].token_ids]
    with pytest.raises(RequestError, match="conversation"):
        llm.chat([])


def test_chat_without_a_chat_template_is_a_clear_error(llm):
    template = llm.tokenizer.chat_template
    llm.tokenizer.chat_template = None  # as a base model's tokenizer has it
    try:
        with pytest.raises(RequestError, match="no chat template"):
            llm.chat([{"role": "user", "content": "Hi"}])
    finally:
        llm.tokenizer.chat_template = template
