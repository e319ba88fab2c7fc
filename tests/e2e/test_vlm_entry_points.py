"""Every vision-language family through each entry point, one engine per family shared by the three tests:
`kiln run --image [--video] --check-accuracy` (once: a corrupt video is a clear error), `LLM.generate` (a batch mixing
image, video where the family takes it, and text-only prompts, checked against transformers as --check-accuracy
checks) and `kiln serve` (image_url / video_url chat parts against the offline result; text-only chat; the OpenAPI
document offers video parts only where the engine takes video; a corrupt video or an http(s) one not allowed is a
400).

LLaVA's entry points are tests/e2e/test_vlm_cli_and_errors.py and test_serve_vlm.py; Nougat/Donut's `kiln run`
is tests/e2e/test_encdec_entry_points.py. Greedy tokens over two configurations per family: tests/models/.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from e2e_helpers import SHARED_GPU, ServerProcess, kiln
from encdec_checkpoints import make_blip2_t5_checkpoint
from phi4mm_checkpoints import IMAGE_TOKEN, make_phi4mm_checkpoint
from video_clips import VIDEO, VIDEO_CONFIG, make_next_video_checkpoint, make_onevision_checkpoint, tiny_video
from vlm_checkpoints import make_vlm_checkpoint, random_image

from kiln import LLM, SamplingParams, build
from kiln.accuracy import check_accuracy
from kiln.runtime.prompts import chat_text, untemplated_text

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
LIMITS = dict(max_batch_size=4, max_input_len=160, max_seq_len=192, max_num_tokens=192, max_multimodal_len=64)
NEW_TOKENS = 4


def _qwen(directory: Path) -> Path:
    checkpoint = make_vlm_checkpoint("qwen2_5_vl", directory)
    (checkpoint / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_CONFIG))  # 4 small frames
    return checkpoint


@dataclass(frozen=True)
class Family:
    make: Callable[[Path], Path]
    image: str  # what the prompt writes for one image ("": the processor places it)
    video: str | None = None  # what it writes for one video (None: no video input)
    limits: dict | None = None  # build limits in place of LIMITS' (Phi-4-multimodal: 545 rows for a one-crop image)


FAMILIES = {
    "llava_next": Family(lambda d: make_vlm_checkpoint("llava_next", d), "<image>"),
    "blip2": Family(lambda d: make_vlm_checkpoint("blip2", d), ""),
    "blip2_flan_t5": Family(make_blip2_t5_checkpoint, ""),
    "gemma3": Family(lambda d: make_vlm_checkpoint("gemma3", d), "<start_of_image>"),
    "qwen2_5_vl": Family(_qwen, "<|vision_start|><|image_pad|><|vision_end|>", VIDEO),
    "llava_onevision": Family(make_onevision_checkpoint, "<image>", "<video>"),
    "llava_next_video": Family(make_next_video_checkpoint, "<image>", "<video>"),
    "fuyu": Family(lambda d: make_vlm_checkpoint("fuyu", d), ""),
    "kosmos2": Family(lambda d: make_vlm_checkpoint("kosmos2", d), ""),
    "phi4mm": Family(
        make_phi4mm_checkpoint,  # with its vision LoRA (merged at build and by --check-accuracy's reference)
        IMAGE_TOKEN,
        limits=dict(max_input_len=1200, max_seq_len=1232, max_num_tokens=1280, max_multimodal_len=1200),
    ),
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """family -> (directory with a.png and clip.mp4, engine): each built once, on first use."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            from transformers import AutoTokenizer

            root = tmp_path_factory.mktemp(f"entry-{name}")
            checkpoint = FAMILIES[name].make(root / "ckpt")
            tok = AutoTokenizer.from_pretrained(checkpoint)
            if not getattr(tok, "chat_template", None):
                tok.chat_template = TEMPLATE
                tok.save_pretrained(checkpoint)
            random_image(0, 40, 60).save(root / "a.png")
            (root / "clip.mp4").write_bytes(tiny_video(0))
            limits = {**LIMITS, **(FAMILIES[name].limits or {})}
            made[name] = root, build(checkpoint, root / "engine", compile=False, progress=False, **limits)
        return made[name]

    return get


def image_url(seed: int, height: int, width: int) -> str:
    buffer = io.BytesIO()
    random_image(seed, height, width).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def video_url(seed: int) -> str:
    return "data:video/mp4;base64," + base64.b64encode(tiny_video(seed)).decode()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_kiln_run(name, engines):
    family = FAMILIES[name]
    root, engine = engines(name)
    args = ["run", str(engine), "--image", str(root / "a.png"), "--max-new-tokens", str(NEW_TOKENS)]
    prompt = f"{family.image} The kiln"
    if family.video is not None:
        args += ["--video", str(root / "clip.mp4"), "--num-frames", "4"]
        prompt = f"{family.image} and {family.video} The kiln"
    run = kiln(*args, "--prompt", prompt, "--check-accuracy")
    assert f"check-accuracy prompt 0: {NEW_TOKENS} greedy tokens vs transformers: match" in run.stderr, run.stderr
    if name == "llava_next_video":  # a truncated clip: a clear error, no traceback (the pipeline's, for every family)
        (root / "cut.mp4").write_bytes(tiny_video(0)[:3000])
        bad = kiln("run", str(engine), "--video", str(root / "cut.mp4"), "--prompt", f"{family.video} x", check=False)
        assert bad.returncode != 0 and "corrupt or unsupported video" in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("name", list(FAMILIES))
def test_python_api(name, engines):
    family = FAMILIES[name]
    _, engine = engines(name)
    llm = LLM(engine, **SHARED_GPU)
    batch: list = [
        {"prompt": f"{family.image} The kiln", "images": [image_url(1, 64, 30)]},
        "The kiln fires clay",
        {"prompt": f"Paged {family.image}", "images": [random_image(2, 30, 44)]},
    ]
    if family.video is not None:
        batch += [
            {"prompt": f"{family.video} what?", "videos": [tiny_video(1)], "num_frames": 4},
            {"prompt": f"{family.image} {family.video} both", "images": [image_url(3, 28, 28)],
             "videos": [video_url(2)], "num_frames": 4},
        ]  # fmt: skip
    outs = llm.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    assert len(outs[0].prompt_token_ids) > len(outs[1].prompt_token_ids)  # the image's tokens are in the prompt
    results = check_accuracy(
        llm.engine.manifest, batch, [o.prompt_token_ids for o in outs], [o.token_ids for o in outs]
    )
    assert [r.match for r in results] == [True] * len(batch), [(r.kiln_tokens, r.reference_tokens) for r in results]


def chat(server: ServerProcess, name: str, content: object) -> httpx.Response:
    body = {"model": name, "messages": [{"role": "user", "content": content}], "max_tokens": NEW_TOKENS}
    return httpx.post(server.url + "/v1/chat/completions", json={**body, "temperature": 0}, timeout=120)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_kiln_serve(name, engines):
    family = FAMILIES[name]
    _, engine = engines(name)
    image = image_url(4, 40, 60)
    content: list = [{"type": "image_url", "image_url": {"url": image}}]
    videos = [video_url(3)] if family.video is not None else []
    content += [{"type": "video_url", "video_url": {"url": v, "num_frames": 4}} for v in videos]
    content.append({"type": "text", "text": " what?"})
    server = ServerProcess(engine, "--served-model-name", name)
    try:
        r = chat(server, name, content)
        assert r.status_code == 200, r.text
        llm = LLM(engine, **SHARED_GPU)
        pipeline = llm.engine.multimodal
        # the server writes each part as the pipeline's image or video token itself (Qwen2.5-VL: the bare pad token)
        written = (pipeline.image_token or "") + (pipeline.video_token or "" if videos else "")
        messages = [{"role": "user", "content": f"{written} what?"}]
        encdec = llm.engine.manifest.encoder_decoder  # BLIP-2 + Flan-T5: the T5 encoder reads the text untemplated
        prompt = untemplated_text(messages) if encdec is not None else chat_text(llm.tokenizer, messages)
        request = {"prompt": prompt, "images": [image], "videos": videos, "num_frames": 4}
        want = llm.generate([request], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))[0]
        assert r.json()["choices"][0]["message"]["content"] == want.text
        start = len(encdec.decoder_prefix) if encdec is not None else 0
        assert r.json()["usage"]["prompt_tokens"] == len(want.prompt_token_ids) - start
        assert chat(server, name, "just text").status_code == 200
        schema = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]["ChatMessage"]["properties"]
        assert ("VideoPart" in str(schema["content"])) == (family.video is not None)
        if family.video is not None:
            cut = "data:video/mp4;base64," + base64.b64encode(tiny_video(1)[:3000]).decode()
            bad_videos = {cut: "corrupt or unsupported video", "https://example.com/a.mp4": "--allow-image-urls"}
            for bad, words in bad_videos.items():
                part = {"type": "video_url", "video_url": {"url": bad}}
                r = chat(server, name, [part, {"type": "text", "text": "?"}])
                assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
            assert chat(server, name, "still there?").status_code == 200
    finally:
        assert server.stop() == 0
