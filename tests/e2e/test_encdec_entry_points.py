"""Encoder-decoder engines (tiny T5, BART, mBART) through `kiln run` and `kiln serve`: the prompt is the encoder
input. `LLM.generate` of each is tests/models/test_encdec_families.py."""

from __future__ import annotations

import base64

import httpx
import pytest
from e2e_helpers import SHARED_GPU, ServerProcess, kiln
from encdec_checkpoints import make_encdec_checkpoint
from tiny_checkpoints import build_tiny_engine

from kiln import LLM, SamplingParams

MODEL = "bart"
PROMPTS = ("The kiln fires clay into stone.", "héllo")


@pytest.fixture(
    scope="module",
    params=[("t5", "relu-tied"), ("bart", "forced-bos"), ("mbart", "forced-bos")],
    ids=["t5", "bart", "mbart"],
)
def engine(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"encdec-e2e-{request.param[0]}")
    checkpoint = make_encdec_checkpoint(*request.param, root / "ckpt")
    return build_tiny_engine(checkpoint, root / "engine", max_encoder_input_len=16)


def test_kiln_run_matches_transformers(engine):
    args = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    proc = kiln("run", str(engine), *args, "--max-new-tokens", "6", "--temperature", "0", "--check-accuracy")
    assert proc.stderr.count("vs transformers: match") == len(PROMPTS), proc.stdout + proc.stderr


def test_kiln_serve_completions(engine):
    llm = LLM(engine, **SHARED_GPU)
    offline = llm.generate(list(PROMPTS), SamplingParams(max_tokens=6, temperature=0.0))
    start = len(llm.engine.manifest.encoder_decoder.decoder_prefix)
    server = ServerProcess(engine, "--served-model-name", MODEL)
    try:
        for prompt, expected in zip(PROMPTS, offline):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0}
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected.text
        # no max_tokens: the decoder's room, max_seq_len (64) less its start tokens, whatever the input's length
        r = httpx.post(
            server.url + "/v1/completions", json={"model": MODEL, "prompt": [5], "temperature": 0}, timeout=60
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 64 - start
        body = {"model": MODEL, "prompt": "clay " * 40, "max_tokens": 2}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and "max_encoder_input_len (16)" in r.json()["error"]["message"]
    finally:
        assert server.stop() == 0


def test_kiln_run_and_serve_read_a_page_image_without_text(tmp_path):
    """Nougat/Donut-style `VisionEncoderDecoderModel`: `kiln run --image` alone, checked against transformers,
    and an image-only chat request through `kiln serve` answering what `LLM.generate` does."""
    from encdec_checkpoints import make_donut_checkpoint
    from vlm_checkpoints import random_image

    checkpoint = make_donut_checkpoint(tmp_path / "ckpt")
    engine = build_tiny_engine(checkpoint, tmp_path / "engine")
    random_image(0, 40, 30).save(tmp_path / "page.png")
    args = ("--image", str(tmp_path / "page.png"), "--max-new-tokens", "6", "--temperature", "0", "--check-accuracy")
    proc = kiln("run", str(engine), *args)
    assert "vs transformers: match" in proc.stderr, proc.stderr

    url = "data:image/png;base64," + base64.b64encode((tmp_path / "page.png").read_bytes()).decode()
    want = LLM(engine, **SHARED_GPU).generate(
        [{"prompt": "", "images": [url]}], SamplingParams(max_tokens=6, temperature=0.0)
    )[0]
    server = ServerProcess(engine, "--served-model-name", "donut")
    try:
        content = [{"type": "image_url", "image_url": {"url": url}}]
        body = {"model": "donut", "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want.text
    finally:
        assert server.stop() == 0


def test_pix2struct_run_and_serve(tmp_path):
    """Pix2Struct (captioning): `kiln run --image` checked against transformers, and an image-only chat request
    (its tokenizer has no chat template) answering what `LLM.generate` does."""
    from encdec_checkpoints import make_pix2struct_checkpoint
    from vlm_checkpoints import random_image

    checkpoint = make_pix2struct_checkpoint(tmp_path / "ckpt")
    engine = build_tiny_engine(checkpoint, tmp_path / "engine")
    random_image(0, 40, 30).save(tmp_path / "chart.png")
    args = ("--image", str(tmp_path / "chart.png"), "--max-new-tokens", "6", "--temperature", "0", "--check-accuracy")
    proc = kiln("run", str(engine), *args)
    assert "vs transformers: match" in proc.stderr, proc.stderr

    url = "data:image/png;base64," + base64.b64encode((tmp_path / "chart.png").read_bytes()).decode()
    want = LLM(engine, **SHARED_GPU).generate(
        [{"prompt": "", "images": [url]}], SamplingParams(max_tokens=6, temperature=0.0)
    )[0]
    server = ServerProcess(engine, "--served-model-name", "pix2struct")
    try:
        content = [{"type": "image_url", "image_url": {"url": url}}]
        body = {"model": "pix2struct", "messages": [{"role": "user", "content": content}], "max_tokens": 6}
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want.text
        content = [*content, {"type": "text", "text": "a caption"}]
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={**body, "messages": [{"role": "user", "content": content}]},
            timeout=60,
        )
        assert r.status_code == 400 and "no text prompt" in r.json()["error"]["message"], r.text
    finally:
        assert server.stop() == 0
