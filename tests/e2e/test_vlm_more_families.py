"""Fuyu and Kosmos-2 engines through each entry point: `kiln run --image --check-accuracy`, `LLM.generate`
(a batch mixing image and text-only prompts) and `kiln serve` (image_url chat parts). One engine per family;
the greedy-token comparison with transformers over two configurations is tests/models/test_vlm_families.py."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from e2e_helpers import SHARED_GPU, ServerProcess, kiln
from vlm_checkpoints import make_vlm_checkpoint, random_image

from kiln import LLM, SamplingParams, build
from kiln.runtime.prompts import chat_text

FAMILIES = ["fuyu", "kosmos2"]  # each processor puts the image first: prompts carry no image token
LIMITS = dict(max_batch_size=4, max_input_len=96, max_seq_len=128, max_num_tokens=128)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(f"e2e-{family}")
            checkpoint = make_vlm_checkpoint(family, root / "ckpt")
            random_image(0, 40, 60).save(root / "a.png")
            made[family] = root, build(checkpoint, root / "engine", compile=False, progress=False, **LIMITS)
        return made[family]

    return get


def data_url(seed: int, height: int, width: int) -> str:
    buffer = io.BytesIO()
    random_image(seed, height, width).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("family", FAMILIES)
def test_run_generate_and_serve(family, engines):
    root, engine = engines(family)
    run = kiln(
        "run",
        str(engine),
        "--image",
        str(root / "a.png"),
        "--prompt",
        "The kiln",
        "--max-new-tokens",
        "4",
        "--check-accuracy",
    )
    assert "check-accuracy prompt 0: 4 greedy tokens vs transformers: match" in run.stderr, run.stderr[-2000:]

    llm = LLM(engine, **SHARED_GPU)
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    image = data_url(1, 64, 30)
    prompt = chat_text(llm.tokenizer, [{"role": "user", "content": " compare"}])
    batch = [{"prompt": prompt, "images": [image]}, "The kiln fires clay", {"prompt": "Paged", "images": [image]}]
    want = llm.generate(batch, greedy)
    assert len(want[0].prompt_token_ids) > len(want[1].prompt_token_ids)  # the image's tokens are in the prompt
    assert want[0].token_ids and want[1].token_ids and want[2].token_ids

    server = ServerProcess(engine, "--served-model-name", family)
    try:
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": " compare"}]
        body = {"model": family, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want[0].text
        assert r.json()["usage"]["prompt_tokens"] == len(want[0].prompt_token_ids)
        text = {**body, "messages": [{"role": "user", "content": "just text"}]}
        assert httpx.post(server.url + "/v1/chat/completions", json=text, timeout=60).status_code == 200
    finally:
        assert server.stop() == 0
