"""`kiln serve` with a vision-language engine: chat messages with image_url parts."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from e2e_helpers import SHARED_GPU, ServerProcess
from vlm_checkpoints import make_vlm_checkpoint, random_image

from kiln import LLM, SamplingParams, build
from kiln.runtime.prompts import chat_text

MODEL = "llava"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def data_url(seed: int, height: int, width: int) -> str:
    buffer = io.BytesIO()
    random_image(seed, height, width).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("serve-vlm")
    checkpoint = make_vlm_checkpoint("llava", root / "ckpt")
    tok = AutoTokenizer.from_pretrained(checkpoint)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(checkpoint)
    limits = dict(max_batch_size=4, max_input_len=96, max_seq_len=128, max_num_tokens=128)
    return build(checkpoint, root / "engine", compile=False, progress=False, **limits)


@pytest.fixture(scope="module")
def server(engine):
    proc = ServerProcess(engine, "--served-model-name", MODEL)
    yield proc
    assert proc.stop() == 0


def chat(server: ServerProcess, content: object, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0}
    return httpx.post(server.url + "/v1/chat/completions", json={**body, **extra}, timeout=60)


def test_image_chat_matches_offline_generate(server, engine):
    images = [data_url(0, 40, 60), data_url(1, 64, 30)]
    content = [
        {"type": "image_url", "image_url": {"url": images[0]}},
        {"type": "text", "text": " and "},
        {"type": "image_url", "image_url": {"url": images[1]}},
        {"type": "text", "text": " compared"},
    ]
    r = chat(server, content)
    assert r.status_code == 200, r.text
    llm = LLM(engine, **SHARED_GPU)
    prompt = chat_text(llm.tokenizer, [{"role": "user", "content": "<image> and <image> compared"}])
    want = llm.generate([{"prompt": prompt, "images": images}], SamplingParams(max_tokens=6, temperature=0.0))[0]
    body = r.json()
    assert body["choices"][0]["message"]["content"] == want.text
    assert body["usage"]["prompt_tokens"] == len(want.prompt_token_ids)  # image tokens expanded
    text_only = chat(server, "just text")
    assert text_only.status_code == 200, text_only.text
    content = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]["ChatMessage"]["properties"]
    assert "ImagePart" in str(content["content"]) and "VideoPart" not in str(content["content"])  # LLaVA: no video


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://example.com/cat.png", "--allow-image-urls"),
        ("/etc/passwd", "must be a data:image"),
        ("data:image/png;base64,@@@", "valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not an image format"),
    ],
)
def test_bad_images_get_a_400_and_the_server_keeps_serving(server, url, words):
    r = chat(server, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}])
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert chat(server, "still there?").status_code == 200
