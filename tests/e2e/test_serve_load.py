"""200 concurrent requests through the official `openai` client against a real `kiln serve` on loopback.

Every request that is not cancelled must come back with exactly the text the offline `LLM.generate`
gives for the same greedy request; cancelled ones must free their blocks; nothing may be lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest
from e2e_helpers import SHARED_GPU, ServerProcess

from kiln import LLM, SamplingParams

openai = pytest.importorskip("openai")

NUM_REQUESTS = 200
MODEL = "tiny-kiln"
TOPICS = [
    "A kiln is",
    "The potter",
    "Clay is",
    "Glaze melts",
    "The fire in the kiln",
    "Bisque firing",
    "A slow cooling",
    "Stoneware and porcelain",
]


def plan(i: int) -> dict:
    """Request i: which API, streamed or not, cancelled or not, and its prompt and length."""
    kind = ("completion", "completion_stream", "chat", "chat_stream")[i % 4]
    cancel = kind.endswith("stream") and i % 10 in (1, 3)  # 40 of the 100 streams are cut short
    topic = TOPICS[i % len(TOPICS)]
    prompt = topic if i % 3 else f"{topic} {TOPICS[(i + 1) % len(TOPICS)].lower()}"
    return {
        "kind": kind,
        "cancel": cancel,
        "prompt": prompt,
        # A cancelled stream asks for nearly the whole context (longest prompt 23 tokens + 480 < 512): the
        # engine runs ahead of the HTTP replies while the server is still taking in the other requests, and
        # with a shorter budget an early stream could finish before its client's hang-up reaches the engine.
        "max_tokens": 480 if cancel else 6 + (i * 7) % 40,
    }


async def send(client: openai.AsyncOpenAI, p: dict) -> dict:
    common = {"model": MODEL, "max_tokens": p["max_tokens"], "temperature": 0.0}
    if p["cancel"]:
        common["extra_body"] = {"ignore_eos": True}
    chat = p["kind"].startswith("chat")
    stream = p["kind"].endswith("stream")
    messages = [{"role": "user", "content": p["prompt"]}]
    if not stream:
        if chat:
            r = await client.chat.completions.create(messages=messages, **common)
            return {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason, "usage": r.usage}
        r = await client.completions.create(prompt=p["prompt"], **common)
        return {"text": r.choices[0].text, "finish": r.choices[0].finish_reason, "usage": r.usage}
    if chat:
        s = await client.chat.completions.create(messages=messages, stream=True, **common)
    else:
        s = await client.completions.create(prompt=p["prompt"], stream=True, **common)
    text, finish, chunks = "", None, 0
    async for chunk in s:
        chunks += 1
        choice = chunk.choices[0]
        text += (choice.delta.content or "") if chat else choice.text
        finish = choice.finish_reason or finish
        if p["cancel"] and chunks == 4:
            await s.close()  # the client goes away mid-stream
            return {"text": text, "finish": "cancelled", "usage": None}
    return {"text": text, "finish": finish, "usage": None}


@pytest.fixture(scope="module")
def offline(demo_engine) -> dict[tuple[str, str, int], tuple[str, str]]:
    """(api, prompt, max_tokens) -> (text, finish_reason) from the offline LLM.generate path."""
    llm = LLM(demo_engine, **SHARED_GPU)
    keys, prompts, params = [], [], []
    for i in range(NUM_REQUESTS):
        p = plan(i)
        if p["cancel"]:
            continue
        api = "chat" if p["kind"].startswith("chat") else "completion"
        key = (api, p["prompt"], p["max_tokens"])
        if key in keys:
            continue
        keys.append(key)
        prompts.append(
            llm.apply_chat_template([{"role": "user", "content": p["prompt"]}]) if api == "chat" else p["prompt"]
        )
        params.append(SamplingParams(max_tokens=p["max_tokens"], temperature=0.0))
    outs = llm.generate(prompts, params)
    return {k: (o.text, o.finish_reason) for k, o in zip(keys, outs)}


def test_200_concurrent_requests_match_offline_generate_and_free_every_block(demo_engine, offline):
    server = ServerProcess(demo_engine, "--served-model-name", MODEL)
    try:
        before = server.metrics()

        async def main() -> tuple[list[dict], float]:
            limits = httpx.Limits(max_connections=NUM_REQUESTS + 10, max_keepalive_connections=NUM_REQUESTS + 10)
            async with httpx.AsyncClient(limits=limits, timeout=300) as http:
                client = openai.AsyncOpenAI(
                    base_url=server.url + "/v1", api_key="unused", max_retries=0, http_client=http
                )
                start = time.perf_counter()
                results = await asyncio.gather(*(send(client, plan(i)) for i in range(NUM_REQUESTS)))
                return list(results), time.perf_counter() - start

        results, elapsed = asyncio.run(main())

        # Cancellations reach the engine asynchronously: wait until it is idle.
        deadline = time.monotonic() + 30
        while True:
            after = server.metrics()
            idle = after["kiln_requests_running"] == 0 and after["kiln_requests_waiting"] == 0
            if idle or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        code = server.stop()

    mismatches = []
    cancelled = 0
    for i, (p, r) in enumerate(zip(map(plan, range(NUM_REQUESTS)), results)):
        if p["cancel"]:
            assert r["finish"] == "cancelled", f"request {i} should have been cut short"
            cancelled += 1
            continue
        api = "chat" if p["kind"].startswith("chat") else "completion"
        want_text, want_finish = offline[(api, p["prompt"], p["max_tokens"])]
        if (r["text"], r["finish"]) != (want_text, want_finish):
            mismatches.append((i, p, r["text"], r["finish"], want_text, want_finish))
        if r["usage"] is not None:
            assert r["usage"].completion_tokens >= 1
    assert not mismatches, f"{len(mismatches)} responses differ from LLM.generate, e.g. {mismatches[:3]}"

    completed = after['kiln_requests_total{outcome="length"}'] + after.get('kiln_requests_total{outcome="stop"}', 0)
    aborted = after.get('kiln_requests_total{outcome="abort"}', 0)
    assert completed == NUM_REQUESTS - cancelled, "every uncancelled request must be counted as finished"
    assert aborted == cancelled, "every cancelled stream must abort its request in the engine"
    assert after["kiln_requests_running"] == 0 and after["kiln_requests_waiting"] == 0
    total = after["kiln_kv_cache_blocks"]
    assert before["kiln_kv_cache_free_blocks"] == total
    assert after["kiln_kv_cache_free_blocks"] == total, "KV blocks leaked"
    assert after["kiln_prefix_cache_hits_tokens_total"] > 0, "repeated prompts should hit the prefix cache"
    assert code == 0, server.output()[-2000:]
    report = {
        "requests": NUM_REQUESTS,
        "cancelled": cancelled,
        "seconds": round(elapsed, 2),
        "kv_blocks_total": total,
        "kv_free_blocks_before": before["kiln_kv_cache_free_blocks"],
        "kv_free_blocks_after": after["kiln_kv_cache_free_blocks"],
        "prefix_hit_tokens": after["kiln_prefix_cache_hits_tokens_total"],
        "generated_tokens": after["kiln_generation_tokens_total"],
    }
    print("\nserve load:", json.dumps(report))
    if os.environ.get("KILN_LOAD_REPORT"):
        with open(os.environ["KILN_LOAD_REPORT"], "w") as f:
            json.dump(report, f)
