"""/v1/completions with `echo`: the prompt comes back, with its tokens' log-probs when `logprobs` is set
(the first null), as vLLM and OpenAI's legacy API return them; the values equal the Python API's."""

from __future__ import annotations

import json

import httpx
import pytest
from e2e_helpers import DEMO, ServerProcess

from kiln.api import LLM, build
from kiln.sampling_params import SamplingParams

MODEL = "tiny"
PROMPT = "Once upon a time there was a small kiln that baked bread"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build(DEMO, tmp_path_factory.mktemp("echo") / "engine", progress=False, compile=False, max_num_tokens=16)


@pytest.fixture(scope="module")
def server(engine):
    proc = ServerProcess(engine, "--served-model-name", MODEL)
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def llm(engine) -> LLM:
    return LLM(engine, overlap_decode=False)


def complete(server: ServerProcess, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, **body}, timeout=120)


def test_echo_with_max_tokens_0_returns_the_prompt_log_probs(server, llm):
    r = complete(server, echo=True, logprobs=1, max_tokens=0, temperature=0)
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    expected = llm.generate(PROMPT, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
    ids = expected.prompt_token_ids
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert usage["completion_tokens"] == 0 and usage["prompt_tokens"] == len(ids)
    lp = choice["logprobs"]
    assert lp["tokens"] == [llm.tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for got, want in zip(lp["token_logprobs"][1:], expected.prompt_logprobs[1:]):
        assert got == pytest.approx(want.logprob, abs=1e-5)
    for top, token, want in zip(lp["top_logprobs"][1:], lp["tokens"][1:], expected.prompt_logprobs[1:]):
        assert top[token] == pytest.approx(want.logprob, abs=1e-5)  # the prompt token itself, as vLLM gives it
        assert max(top.values()) == pytest.approx(want.top[0][1], abs=1e-5)
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"][1:] == [a + len(t) for a, t in zip(lp["text_offset"], lp["tokens"])][:-1]


def test_echo_with_generation_appends_the_generated_tokens(server, llm):
    r = complete(server, echo=True, logprobs=2, max_tokens=3, temperature=0, ignore_eos=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    expected = llm.generate(
        PROMPT, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    )[0]
    assert choice["text"] == PROMPT + expected.text
    lp = choice["logprobs"]
    n = len(expected.prompt_token_ids)
    assert len(lp["tokens"]) == n + 3
    assert lp["token_logprobs"][n:] == pytest.approx([x.logprob for x in expected.logprobs], abs=1e-5)
    assert lp["text_offset"][n] == len(PROMPT)


def test_echo_without_logprobs_prepends_the_prompt(server, llm):
    r = complete(server, echo=True, max_tokens=2, temperature=0, ignore_eos=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    expected = llm.generate(PROMPT, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))[0]
    assert choice["text"] == PROMPT + expected.text and choice["logprobs"] is None


def test_echo_of_token_ids_and_of_several_prompts(server, llm):
    ids = llm.encode(PROMPT)
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": MODEL, "prompt": [ids, ids[:5]], "echo": True, "logprobs": 0, "max_tokens": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    first, second = r.json()["choices"]
    assert len(first["logprobs"]["tokens"]) == len(ids) and len(second["logprobs"]["tokens"]) == 5
    assert first["logprobs"]["token_logprobs"][1:5] == pytest.approx(
        second["logprobs"]["token_logprobs"][1:5], abs=1e-5
    )
    assert second["text"] == llm.tokenizer.decode(ids[:5])


def test_tokenize_detokenize_and_tokenizer_info_in_vllm_shapes(server, llm):
    tok = llm.tokenizer
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": PROMPT}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == llm.encode(PROMPT) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == llm.engine.build.seq_len and body["token_strs"] is None
    # lm-eval's remote tokenizer asks without special tokens
    r = httpx.post(
        server.url + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False, "return_token_strs": True}
    )
    plain = r.json()
    assert plain["tokens"] == tok(PROMPT, add_special_tokens=False).input_ids
    assert plain["token_strs"] == tok.convert_ids_to_tokens(plain["tokens"])
    messages = [{"role": "user", "content": "Hello!"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": messages}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == llm.apply_chat_template(messages)
    r = httpx.post(server.url + "/detokenize", json={"tokens": body["tokens"]}, timeout=30)
    assert r.json() == {"prompt": tok.decode(body["tokens"])}
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10**9]}).status_code == 400
    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["chat_template"] == tok.chat_template and info["tokenizer_class"] == type(tok).__name__


def _streamed(server: ServerProcess, **body) -> list[dict]:
    payload = {"model": MODEL, "prompt": PROMPT, "stream": True, **body}
    with httpx.stream("POST", server.url + "/v1/completions", json=payload, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line)["choices"][0] for line in lines[:-1]]


@pytest.mark.parametrize(
    "body",
    [
        {"logprobs": 2, "max_tokens": 3, "ignore_eos": True},  # the prompt's entries, then the generated ones
        {"logprobs": 1, "max_tokens": 0},  # lm-eval's loglikelihood, streamed: the prompt only
        {"max_tokens": 2, "ignore_eos": True},  # the prompt's text only
    ],
)
def test_echo_streams_the_prompt_in_the_first_chunk_then_what_the_whole_response_has(server, body):
    whole = complete(server, echo=True, temperature=0, **body).json()["choices"][0]
    chunks = _streamed(server, echo=True, temperature=0, **body)
    assert chunks[0]["text"].startswith(PROMPT) and all(PROMPT not in c["text"] for c in chunks[1:])
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == [whole["finish_reason"]]
    if whole["logprobs"] is None:
        assert all(c["logprobs"] is None for c in chunks)
        return
    prompt_tokens = len(httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"])
    assert len(chunks[0]["logprobs"]["tokens"]) >= prompt_tokens  # the prompt's entries come with its text
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks for x in c["logprobs"][key]] == whole["logprobs"][key], key
