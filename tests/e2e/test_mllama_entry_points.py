"""A Mllama (Llama 3.2 Vision) engine through `kiln run --image a.png --image b.png --check-accuracy` and `kiln serve`
(a chat with two image_url parts, and a completion without), and the error for more images than the engine's
max_input_len holds; the greedy comparison with transformers is tests/models/test_mllama.py."""

from __future__ import annotations

import base64

import httpx
import pytest
from e2e_helpers import SHARED_GPU, ServerProcess, kiln
from mllama_checkpoints import make_mllama_checkpoint
from vlm_checkpoints import random_image

from kiln import LLM, SamplingParams, build
from kiln.errors import RequestError
from kiln.runtime.prompts import chat_text


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-mllama")
    checkpoint = make_mllama_checkpoint(root / "ckpt", "first-layer")
    random_image(0, 40, 20).save(root / "a.png")
    random_image(1, 12, 12).save(root / "b.png")
    limits = dict(max_batch_size=4, max_input_len=80, max_seq_len=96, max_num_tokens=128)
    return root, build(checkpoint, root / "engine", compile=False, progress=False, **limits)


def test_run_and_serve(engine):
    root, path = engine
    images = ("--image", str(root / "a.png"), "--image", str(root / "b.png"))
    args = (*images, "--prompt", "The kiln <|image|> fires <|image|>", "--max-new-tokens", "6")
    proc = kiln("run", str(path), *args, "--temperature", "0", "--check-accuracy")
    assert "vs transformers: match" in proc.stderr, proc.stderr[-2000:]

    urls = ["data:image/png;base64," + base64.b64encode((root / n).read_bytes()).decode() for n in ("a.png", "b.png")]
    llm = LLM(path, **SHARED_GPU)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    with pytest.raises(RequestError, match="more than this engine's max_input_len"):  # 4 x 20 image rows
        llm.generate([{"prompt": "<|image|>" * 4, "images": [urls[1]] * 4}], greedy)
    prompt = chat_text(llm.tokenizer, [{"role": "user", "content": "<|image|><|image|> compare"}])
    want = llm.generate([{"prompt": prompt, "images": urls}, "just text"], greedy)
    server = ServerProcess(path, "--served-model-name", "mllama")
    try:
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        content = [*parts, {"type": "text", "text": " compare"}]
        body = {"model": "mllama", "messages": [{"role": "user", "content": content}], "temperature": 0}
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 6}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want[0].text
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)  # room: max_seq_len less the text
        assert r.status_code == 200, r.text
        body = {"model": "mllama", "prompt": "just text", "max_tokens": 6, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[1].text, r.text
    finally:
        assert server.stop() == 0
