"""Vision-language engines as a user meets them: `kiln run --image`, --profile, --check-accuracy, clear errors."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_helpers import SHARED_GPU
from vlm_checkpoints import make_vlm_checkpoint, random_image

from kiln import LLM, RequestError, SamplingParams, build

REPO = Path(__file__).resolve().parents[2]
LIMITS = dict(max_batch_size=4, max_input_len=40, max_seq_len=64, max_num_tokens=64)


def kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-e2e")
    checkpoint = make_vlm_checkpoint("llava", root / "ckpt")
    random_image(0, 40, 60).save(root / "a.png")
    random_image(1, 64, 30).save(root / "b.jpg")
    png = (root / "a.png").read_bytes()
    (root / "corrupt.png").write_bytes(png[: len(png) // 2])  # a real PNG, cut in the middle
    (root / "notes.txt").write_text("not an image")
    return root, checkpoint


@pytest.fixture(scope="module")
def eager_llm(llava, tmp_path_factory):
    _, checkpoint = llava
    engine = build(checkpoint, tmp_path_factory.mktemp("e") / "engine", compile=False, progress=False, **LIMITS)
    return LLM(engine, **SHARED_GPU)


def test_compiled_engine_from_the_command_line(llava, tmp_path):
    root, checkpoint = llava
    engine = tmp_path / "engine"
    proc = kiln("build", str(checkpoint), "-o", str(engine), "--max-batch-size", "2", "--max-seq-len", "64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("export vision", "compile vision", "verify vision", "compile", "verify"):
        assert f"✓ {stage}" in proc.stderr
    assert (engine / "vision" / "compiled.bin").is_file() and (engine / "processor").is_dir()
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["multimodal"]["vision_compiled"] and manifest["multimodal"]["max_multimodal_len"] == 32

    args = ["run", str(engine), "--max-new-tokens", "6", "--check-accuracy", "--profile"]
    two = kiln(*args, "--image", str(root / "a.png"), "--image", str(root / "b.jpg"), "--prompt", "<image> and <image>")
    assert two.returncode == 0, two.stderr[-2000:]
    assert "check-accuracy prompt 0: 6 greedy tokens vs transformers: match" in two.stderr
    for stage in ("preprocessing", "vision encoder", "time to first token", "tokenizer decode", "end to end"):
        assert stage in two.stderr

    batch = kiln(
        *args,
        "--json",
        "--image",
        str(root / "a.png"),
        "--image",
        str(root / "b.jpg"),
        "--batch-size",
        "2",
        "--prompt",
        "<image> Describe.",
    )
    result = json.loads(batch.stdout)
    assert [a["match"] for a in result["accuracy"]] == [True, True]
    assert result["profile"]["num_images"] == 2 and len(result["outputs"]) == 2


def test_images_from_paths_pil_bytes_and_data_urls_agree(llava, eager_llm):
    root, _ = llava
    png = (root / "a.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    pil = random_image(0, 40, 60)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = eager_llm.generate(
        [{"prompt": "<image> x", "images": [src]} for src in (root / "a.png", png, url, pil)], params
    )
    assert len({tuple(o.token_ids) for o in outs}) == 1
    seq_data = [eager_llm.engine.multimodal.prepare([("<image> x", [src])])[0].mm for src in (png, pil)]
    assert seq_data[0].mm_hashes == seq_data[1].mm_hashes


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"prompt": "<image> x", "images": ["corrupt.png"]}, "corrupt or truncated"),
        ({"prompt": "<image> x", "images": ["notes.txt"]}, "not an image format"),
        ({"prompt": "<image> x", "images": ["missing.png"]}, "does not exist"),
        ({"prompt": "<image> x", "images": ["data:image/png;base64,@@@"]}, "valid base64"),
        ({"prompt": "<image> x", "images": ["https://example.com/cat.png"]}, "does not download"),
        ({"prompt": "<image> <image> x", "images": ["a.png"]}, "2 <image> token(s) for 1 image(s)"),
        ({"prompt": "x", "images": ["a.png"]}, "0 <image> token(s) for 1 image(s)"),
        ({"prompt": "<image> <image> <image> x", "images": ["a.png"] * 3}, "more than this engine's max_input_len"),
        (
            {"prompt": "<image> x", "images": ["a.png"], "detail": "high"},
            "keys 'prompt', 'images', 'videos', 'num_frames'",
        ),
    ],
)
def test_clear_errors(llava, eager_llm, request_, message):
    root, _ = llava
    request_ = dict(request_)
    request_["images"] = [im if "/" in im or im.startswith("data:") else str(root / im) for im in request_["images"]]
    with pytest.raises(RequestError) as err:
        eager_llm.generate(["fine text prompt", request_], SamplingParams(max_tokens=2))
    assert message in str(err.value) and "prompt 1" in str(err.value)
    assert not eager_llm.engine.has_unfinished()


def test_images_given_to_a_text_only_engine(checkpoints, tmp_path, llava):
    from tiny_checkpoints import build_tiny_engine

    llm = LLM(build_tiny_engine(checkpoints("llama"), tmp_path / "text"), **SHARED_GPU)
    with pytest.raises(RequestError, match="text-only checkpoint and takes no images"):
        llm.generate({"prompt": "<image> x", "images": [str(llava[0] / "a.png")]})


def test_image_bytes_round_trip_through_a_buffer():
    buf = io.BytesIO()
    random_image(3, 10, 10).save(buf, format="PNG")
    from kiln.runtime.images import load_image

    assert load_image(buf.getvalue()).size == (10, 10)
