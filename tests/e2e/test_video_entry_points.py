"""Video input as a user meets it: `kiln run --video` (Qwen2.5-VL, LLaVA-OneVision), `video_url` parts in `kiln serve`.

`LLM.generate([{"prompt", "videos"}])` is checked against transformers in tests/models/test_vlm_video.py.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from e2e_helpers import SHARED_GPU, ServerProcess
from video_clips import VIDEO, VIDEO_CONFIG, make_onevision_checkpoint, tiny_video
from vlm_checkpoints import make_vlm_checkpoint

from kiln import LLM, SamplingParams, build
from kiln.runtime.prompts import chat_text

pytest.importorskip("av")

REPO = Path(__file__).resolve().parents[2]
MODEL = "qwen-video"
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
LIMITS = dict(max_batch_size=2, max_input_len=96, max_seq_len=128, max_num_tokens=128, max_multimodal_len=32)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("video-e2e")
    checkpoint = make_vlm_checkpoint("qwen2_5_vl", root / "ckpt")
    (checkpoint / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_CONFIG))
    tok = AutoTokenizer.from_pretrained(checkpoint)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(checkpoint)
    return root, build(checkpoint, root / "engine", compile=False, progress=False, **LIMITS)


@pytest.fixture(scope="module")
def onevision_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("onevision-e2e")
    checkpoint = make_onevision_checkpoint(root / "ckpt")
    return root, build(checkpoint, root / "engine", compile=False, progress=False, **LIMITS)


@pytest.mark.parametrize(("family", "video_token"), [("qwen2_5_vl", VIDEO), ("llava_onevision", "<video>")])
def test_kiln_run_video_matches_transformers(family, video_token, request, tmp_path):
    root, engine_dir = request.getfixturevalue("engine" if family == "qwen2_5_vl" else "onevision_engine")
    (tmp_path / "clip.mp4").write_bytes(tiny_video(0))
    args = ["run", str(engine_dir), "--max-new-tokens", "4", "--json", "--check-accuracy", "--profile"]
    video = ["--video", str(tmp_path / "clip.mp4"), "--num-frames", "4", "--prompt", f"{video_token} what?"]
    proc = subprocess.run([sys.executable, "-m", "kiln", *args, *video], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert [a["match"] for a in result["accuracy"]] == [True] and result["profile"]["num_images"] == 1


@pytest.fixture(scope="module")
def server(engine):
    proc = ServerProcess(engine[1], "--served-model-name", MODEL)
    yield proc
    assert proc.stop() == 0


def chat(server: ServerProcess, content: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def test_video_chat_matches_offline_generate_and_bad_videos_get_400(server, engine):
    url = "data:video/mp4;base64," + base64.b64encode(tiny_video(1)).decode()
    content = [{"type": "video_url", "video_url": {"url": url, "num_frames": 4}}, {"type": "text", "text": " what?"}]
    r = chat(server, content)
    assert r.status_code == 200, r.text
    llm = LLM(engine[1], **SHARED_GPU)
    # the server writes each video_url part as the video token itself
    prompt = chat_text(llm.tokenizer, [{"role": "user", "content": "<|video_pad|> what?"}])
    want = llm.generate(
        [{"prompt": prompt, "videos": [url], "num_frames": 4}], SamplingParams(max_tokens=4, temperature=0.0)
    )[0]
    assert r.json()["choices"][0]["message"]["content"] == want.text
    assert r.json()["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    cut = "data:video/mp4;base64," + base64.b64encode(tiny_video(1)[:3000]).decode()
    for bad, words in ((cut, "corrupt or unsupported video"), ("https://example.com/a.mp4", "--allow-image-urls")):
        r = chat(server, [{"type": "video_url", "video_url": {"url": bad}}, {"type": "text", "text": "?"}])
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert chat(server, "still there?").status_code == 200
    content = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]["ChatMessage"]["properties"]
    assert "VideoPart" in str(content["content"]) and "ImagePart" in str(content["content"])
