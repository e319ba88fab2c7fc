"""Schemathesis fuzzes `/v1` of a live `kiln serve` from the server's own OpenAPI document.

Bounded and deterministic (a fixed number of derandomized examples per operation and mode). Every
generated request must get a non-5xx answer, every refusal must be an OpenAI-shaped error, and
afterwards the server must be idle with every KV block free and still answer a greedy completion
with the text it gave before the fuzzing.
"""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from e2e_helpers import ServerProcess
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode

MODEL = "demo"
EXAMPLES = 30  # per operation and mode: ~120 requests, ~15 s on a 2-core CPU
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(demo_engine):
    proc = ServerProcess(demo_engine, "--served-model-name", MODEL, "--max-body-bytes", "65536")
    yield proc
    assert proc.stop() == 0


def greedy_text(server: ServerProcess) -> str:
    body = {"model": MODEL, "prompt": "A kiln is", "max_tokens": 12, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def wait_until_idle(server: ServerProcess, timeout_s: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = server.metrics()
        if m["kiln_requests_running"] == 0 and m["kiln_requests_waiting"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"the server is still busy {timeout_s} s after the fuzzing: {m}")
        time.sleep(0.1)


def fuzz_operation(server: ServerProcess, operation, mode: GenerationMode, seen: dict[int, int]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def one(case) -> None:
        response = case.call(base_url=server.url, timeout=60)
        status = response.status_code
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, f"{status} for {case.as_curl_command()}:\n{response.text[:2000]}"
        # A stream has sent its 200 before the engine runs: a failure comes as an error event.
        assert '"type":"server_error"' not in response.text, f"{case.as_curl_command()}:\n{response.text[:2000]}"
        if status >= 400:
            assert set(response.json()["error"]) == ERROR_KEYS, response.text

    one()


def test_fuzzing_v1_finds_no_server_error_and_leaks_nothing(server):
    before_text = greedy_text(server)
    before = wait_until_idle(server)
    assert before["kiln_kv_cache_free_blocks"] == before["kiln_kv_cache_blocks"]

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    fuzzed = [op for op in operations if op.path.startswith("/v1")]
    assert {(op.method.upper(), op.path) for op in fuzzed} == {
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
    }
    seen: dict[str, dict[int, int]] = {}
    for op in fuzzed:
        # An operation without parameters or a body has no invalid form to generate.
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if op.method.upper() == "POST" else []
        for mode in modes or [GenerationMode.POSITIVE]:
            fuzz_operation(server, op, mode, seen.setdefault(f"{op.method.upper()} {op.path} {mode.value}", {}))

    # The fuzzing reached the engine (valid bodies ran) and the validation (invalid ones were refused).
    for name in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert seen[f"{name} positive"].get(200, 0) > 0, seen
        assert sum(n for s, n in seen[f"{name} negative"].items() if 400 <= s < 500) > 0, seen

    after = wait_until_idle(server)
    assert after["kiln_kv_cache_free_blocks"] == before["kiln_kv_cache_free_blocks"]
    assert after["kiln_kv_cache_usage_ratio"] == 0.0
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert greedy_text(server) == before_text


def test_openapi_document_describes_what_this_server_accepts(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    bodies = doc["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        fields = bodies[name]["properties"]
        assert fields["model"]["enum"] == [MODEL]
        temperature = next(b for b in fields["temperature"]["anyOf"] if b["type"] == "number")
        assert (temperature["minimum"], temperature["maximum"]) == (0, 100)
    token_ids = next(
        b
        for b in bodies["CompletionRequest"]["properties"]["prompt"]["anyOf"]
        if b["type"] == "array" and b["items"]["type"] == "integer"
    )
    vocab = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [10**6]}).json()
    assert f"[0, {token_ids['items']['maximum'] + 1})" in vocab["error"]["message"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        fields = bodies[name]["properties"]
        formats = next(b for b in fields["response_format"]["anyOf"] if "oneOf" in b)["discriminator"]["mapping"]
        assert set(formats) == {"text", "json_object", "json_schema"}
        bias = next(b for b in fields["logit_bias"]["anyOf"] if b["type"] == "object")
        assert bias["additionalProperties"]["maximum"] == 100 and bias["maxProperties"] == 300
        for field in ("guided_json", "guided_regex", "store", "metadata", "parallel_tool_calls", "service_tier"):
            assert fields[field]["description"], field
    assert bodies["JsonSchemaSpec"]["required"] == ["name"]
    # The demo engine is text-only: its document offers no image parts.
    content = bodies["ChatMessage"]["properties"]["content"]["anyOf"]
    assert {"$ref": "#/components/schemas/TextPart"} in [b.get("items") for b in content]
    assert "ImagePart" not in str(content)
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert "422" not in responses  # kiln answers a bad body with 400
        for status in ("4XX", "5XX"):
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorResponse"
