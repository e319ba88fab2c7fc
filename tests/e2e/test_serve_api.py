"""`kiln serve`'s OpenAI surface: options, errors in OpenAI's shape, API key, metrics, shutdown."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from e2e_helpers import SHARED_GPU, ServerProcess

from kiln import LLM, SamplingParams

MODEL = "demo"


@pytest.fixture(scope="module")
def server(demo_engine):
    proc = ServerProcess(demo_engine, "--served-model-name", MODEL, "--max-body-bytes", "65536")
    yield proc
    assert proc.stop() == 0


def post(server: ServerProcess, path: str, body: object, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(server.url + path, content=data, headers=headers, timeout=kw.pop("timeout", 60), **kw)


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err["message"]


def test_models_and_health(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    assert [c["id"] for c in cards] == [MODEL] and cards[0]["max_model_len"] == 512


def test_completion_options_match_offline_generate(server, demo_engine):
    llm = LLM(demo_engine, **SHARED_GPU)
    offline = llm.generate(
        ["A kiln is", "The potter"],
        SamplingParams(max_tokens=10, temperature=0.0, stop=["clay"], logprobs=3),
    )
    r = post(
        server,
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": ["A kiln is", "The potter"],
            "max_tokens": 10,
            "temperature": 0,
            "stop": "clay",
            "logprobs": 3,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["text"] for c in body["choices"]] == [o.text for o in offline]
    assert [c["finish_reason"] for c in body["choices"]] == [o.finish_reason for o in offline]
    first = body["choices"][0]["logprobs"]
    assert len(first["tokens"]) == len(offline[0].token_ids)
    assert first["token_logprobs"][0] == pytest.approx(offline[0].logprobs[0].logprob, abs=1e-5)
    assert all(len(top) == 3 for top in first["top_logprobs"])
    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in offline)
    assert usage["completion_tokens"] == sum(len(o.token_ids) for o in offline)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_n_choices_with_a_seed_are_reproducible_and_differ(server, demo_engine):
    body = {
        "model": MODEL,
        "prompt": "Clay is",
        "max_tokens": 12,
        "temperature": 6.0,
        "top_k": 50,
        "top_p": 0.95,
        "seed": 7,
        "n": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.2,
        "repetition_penalty": 1.1,
    }
    a, b = post(server, "/v1/completions", body).json(), post(server, "/v1/completions", body).json()
    texts = [c["text"] for c in a["choices"]]
    assert texts == [c["text"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    # the same n completions as SamplingParams(n=3) gives in the Python API
    llm = LLM(demo_engine, **SHARED_GPU)
    fields = {k: v for k, v in body.items() if k not in ("model", "prompt")}
    offline = llm.generate("Clay is", SamplingParams(**fields))
    assert [o.text for o in offline] == texts and [o.index for o in offline] == [0, 1, 2]


def _events(server: ServerProcess, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_n_choices_stream_with_their_indices_as_they_come_whole(server, path):
    body = {"model": MODEL, "max_tokens": 10, "temperature": 50.0, "seed": 3, "n": 3}
    body |= {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Clay is"}
    whole = post(server, path, body).json()["choices"]
    chunks = _events(server, path, {**body, "stream": True})
    streamed = {i: "" for i in range(3)}
    finished = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content", "") if "chat" in path else choice["text"]
            streamed[choice["index"]] += piece
            if choice["finish_reason"]:
                finished.append(choice["index"])
    assert sorted(finished) == [0, 1, 2]
    text = (lambda c: c["message"]["content"]) if "chat" in path else (lambda c: c["text"])
    assert [streamed[i] for i in range(3)] == [text(c) for c in whole]


def test_chat_streams_openai_chunks_with_usage(server, demo_engine):
    llm = LLM(demo_engine, **SHARED_GPU)
    ids = llm.apply_chat_template([{"role": "user", "content": "What is a kiln?"}])
    want = llm.generate([ids], SamplingParams(max_tokens=12, temperature=0.0))[0]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is a kiln?"}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "top_logprobs": 2,
    }
    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == want.text
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == [want.finish_reason]
    tops = [c["choices"][0]["logprobs"]["content"] for c in chunks[1:] if c["choices"]]
    assert all(len(entry["top_logprobs"]) == 2 for group in tops for entry in group)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(want.token_ids)


def test_a_repeated_prompt_reports_cached_tokens(server):
    prompt = "The potter shapes soft clay on a wheel, then dries the pots before the first firing in the kiln."
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    post(server, "/v1/completions", body)
    second = post(server, "/v1/completions", body).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    assert server.metrics()["kiln_prefix_cache_hits_tokens_total"] >= 16


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "not valid JSON"),
        ({"model": "gpt-4", "prompt": "a"}, 404, "not served here"),
        ({"model": MODEL}, 400, "'prompt' is required"),
        ({"model": MODEL, "prompt": "a", "bogus": 1}, 400, "unknown field 'bogus'"),
        ({"model": MODEL, "prompt": "word " * 600}, 400, "max_input_len"),
        ({"model": MODEL, "prompt": "a", "max_tokens": 100000}, 400, "max_seq_len"),
        ({"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "prompt": "a", "top_p": 7}, 400, "top_p"),
        ({"model": MODEL, "prompt": "a", "n": 10000}, 400, "n"),
        ({"model": MODEL, "prompt": "a", "logprobs": 99}, 400, "logprobs"),
        ({"model": MODEL, "prompt": "a", "presence_penalty": 1e9}, 400, "presence_penalty"),
        ({"model": MODEL, "prompt": [1, 2, 10**9]}, 400, "outside the vocabulary"),
        ({"model": MODEL, "prompt": ""}, 400, "the prompt is empty"),
        ({"model": MODEL, "prompt": ["a", ""]}, 400, "the prompt is empty"),
        ({"model": MODEL, "prompt": []}, 400, "the prompt is empty"),
        ({"model": MODEL, "prompt": [[1], []]}, 400, "the prompt is empty"),
        ({"model": MODEL, "prompt": "a", "stop": [""]}, 400, "stop"),
    ],
)
def test_bad_completion_requests_get_openai_errors(server, body, status, words):
    assert words in error_of(post(server, "/v1/completions", body), status)


def test_bad_chat_requests_get_openai_errors(server):
    msg = error_of(post(server, "/v1/chat/completions", {"model": MODEL, "messages": []}), 400)
    assert "messages" in msg
    msg = error_of(
        post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400
    )
    assert "role" in msg
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    msg = error_of(
        post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [image]}]}), 400
    )
    assert "no images" in msg
    msg = error_of(
        post(
            server,
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        ),
        400,
    )
    assert "tools" in msg


def test_oversized_bodies_are_refused_and_the_server_keeps_serving(server):
    big = json.dumps({"model": MODEL, "prompt": "a" * 70_000})
    assert "larger than" in error_of(post(server, "/v1/completions", big), 413)

    def chunks():  # no content-length: the limit must hold for chunked bodies too
        yield big[:40_000].encode()
        yield big[40_000:].encode()

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    ok = post(server, "/v1/completions", {"model": MODEL, "prompt": "A kiln is", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_client_that_hangs_up_on_a_plain_request_frees_its_blocks(server):
    body = {"model": MODEL, "prompt": "A kiln is", "max_tokens": 500, "ignore_eos": True, "temperature": 0.9}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=0.3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["kiln_requests_running"] == 0 and m["kiln_kv_cache_free_blocks"] == m["kiln_kv_cache_blocks"]:
            break
        time.sleep(0.1)
    assert m["kiln_requests_running"] == 0 and m["kiln_kv_cache_free_blocks"] == m["kiln_kv_cache_blocks"]
    assert m['kiln_requests_total{outcome="abort"}'] >= 1


def test_metrics_name_every_required_series(server):
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "kiln_requests_total",
        "kiln_prompt_tokens_total",
        "kiln_generation_tokens_total",
        "kiln_requests_waiting",
        "kiln_requests_running",
        "kiln_kv_cache_usage_ratio",
        "kiln_prefix_cache_hits_tokens_total",
        "kiln_time_to_first_token_seconds_bucket",
        "kiln_inter_token_latency_seconds_bucket",
    ):
        assert name in text, name
    assert server.metrics()["kiln_time_to_first_token_seconds_count"] >= 1


def test_api_key_is_required_when_set(demo_engine):
    proc = ServerProcess(demo_engine, "--served-model-name", MODEL, "--api-key", "s3cret")
    try:
        body = {"model": MODEL, "prompt": "A kiln is", "max_tokens": 2}
        assert error_of(post(proc, "/v1/completions", body), 401).startswith("missing or wrong API key")
        wrong = post(proc, "/v1/completions", body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert httpx.get(proc.url + "/v1/models").status_code == 401
        ok = post(proc, "/v1/completions", body, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text + proc.output()[-3000:]
        assert httpx.get(proc.url + "/health").status_code == 200  # probes need no key
    finally:
        assert proc.stop() == 0


def test_sigterm_drains_or_cancels_in_flight_requests_and_exits_0(demo_engine):
    proc = ServerProcess(demo_engine, "--served-model-name", MODEL, "--shutdown-timeout", "2")
    outcomes: list[str] = []

    def stream_one() -> None:
        body = {
            "model": MODEL,
            "prompt": "A kiln is",
            "max_tokens": 480,
            "ignore_eos": True,
            "temperature": 0.9,
            "stream": True,
        }
        try:
            with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=60) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            outcomes.append("done" if lines and lines[-1] == "data: [DONE]" else "cut")
        except httpx.HTTPError:
            outcomes.append("cut")

    threads = [threading.Thread(target=stream_one) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    start = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    code = proc.proc.wait(timeout=60)
    took = time.monotonic() - start
    for t in threads:
        t.join(30)
    assert code == 0, proc.output()[-2000:]
    assert took < 2 + 10, f"shutdown took {took:.1f} s with a 2 s bound"
    assert len(outcomes) == 8, "every client must get an end to its stream (finished or cut), none may hang"
    with pytest.raises(httpx.ConnectError):
        httpx.get(proc.url + "/health", timeout=2)


def test_requests_and_throughput_are_logged(demo_engine):
    logged = ServerProcess(demo_engine, "--served-model-name", MODEL, "--log-interval", "0.2")
    try:
        r = post(logged, "/v1/completions", {"model": MODEL, "prompt": "A kiln is", "max_tokens": 40, "n": 2})
        assert r.status_code == 200, r.text
        used = r.json()["usage"]
        bad = post(logged, "/v1/completions", {"model": MODEL, "prompt": "", "max_tokens": 4})
        assert bad.status_code == 400
        httpx.get(logged.url + "/health")
        time.sleep(0.5)
    finally:
        assert logged.stop() == 0
    out = logged.output()
    lines = [line for line in out.splitlines() if "POST /v1/completions" in line]
    assert len(lines) == 2, out[-3000:]
    ok, refused = lines
    generated = used["completion_tokens"]
    assert f" 200 prompt_tokens={2 * used['prompt_tokens']} generated_tokens={generated} choices=2 " in ok, ok
    assert " 400 prompt_tokens=0 generated_tokens=0 " in refused and "latency=" in refused
    assert "GET /health" not in out  # polled endpoints stay quiet
    throughput = [line for line in out.splitlines() if "throughput:" in line]
    assert throughput and all("tokens/s generated" in t and "KV cache" in t for t in throughput), out[-3000:]


def test_port_in_use_is_refused_before_the_engine_loads(demo_engine):
    import socket
    import subprocess
    import sys

    from e2e_helpers import REPO

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "kiln", "serve", str(demo_engine), "--port", str(port)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
    assert proc.returncode == 2, proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr and "Traceback" not in proc.stderr
    assert "load engine" not in proc.stderr  # refused before the engine started loading
    assert time.monotonic() - start < 30
