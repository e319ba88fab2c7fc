"""A vision-language engine with --tp-size 2: its language model sharded over two gloo ranks, its vision
program unsharded on rank 0 (the image rows go out with each step's inputs); a batch of image and text
prompts gives the one-rank engine's greedy tokens and transformers' (float32), and int8_wo the one-rank
int8 engine's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from vlm_checkpoints import make_vlm_checkpoint  # noqa: E402
from vlm_rank import NEW_TOKENS, vlm_batch  # noqa: E402
from vlm_reference import load_vlm_reference, vlm_greedy  # noqa: E402

from kiln import LLM, SamplingParams, build  # noqa: E402
from kiln.errors import KilnError  # noqa: E402

RANK_SCRIPT = Path(__file__).parent / "vlm_rank.py"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
LIMITS = dict(max_batch_size=4, max_input_len=200, max_seq_len=256, max_num_tokens=256, compile=False, progress=False)


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path, list]]:
    """{case: (checkpoint, one-rank engine, TP2 engine, the TP2 engine's tokens)}: one torchrun launch."""
    tmp = tmp_path_factory.mktemp("llava")
    ckpt = make_vlm_checkpoint("llava", tmp / "ckpt")
    made = {}
    for case, options in {"dense": {}, "int8_wo": {"quantization": "int8_wo"}}.items():
        one = build(ckpt, tmp / f"{case}-tp1", **options, **LIMITS)
        made[case] = one, build(ckpt, tmp / f"{case}-tp2", tp_size=2, **options, **LIMITS)
    out = tmp / "out.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(RANK_SCRIPT), str(out), *(str(two) for _, two in made.values())]
    proc = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = json.loads(out.read_text())
    return {case: (ckpt, one, two, tokens[str(two)]) for case, (one, two) in made.items()}


def one_rank(engine: Path) -> list[list[int]]:
    return [
        o.token_ids for o in LLM(engine).generate(vlm_batch(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    ]


def test_llava_tp2_tokens_match_one_rank_and_transformers(llava) -> None:
    ckpt, one, two, tokens = llava["dense"]
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world"]["tp_size"] == 2 and manifest["multimodal"] is not None
    assert (two / "rank0").is_dir() and (two / "rank1").is_dir() and (two / "vision").is_dir()
    model, processor = load_vlm_reference(ckpt, "LlavaForConditionalGeneration", torch.float32)
    hf = [vlm_greedy(model, processor, p["prompt"], p["images"], NEW_TOKENS)[0] if isinstance(p, dict)
          else vlm_greedy(model, processor, p, [], NEW_TOKENS)[0] for p in vlm_batch()]  # fmt: skip
    assert tokens == one_rank(one) == hf
    assert len(set(sum(hf, []))) > 3


def test_int8_llava_tp2_tokens_match_the_one_rank_int8_engine(llava) -> None:
    _, one, two, tokens = llava["int8_wo"]
    assert json.loads((two / "manifest.json").read_text())["quantization"]["method"] == "int8_wo"
    assert tokens == one_rank(one)


def test_sharded_vlm_refusals(llava, tmp_path: Path) -> None:
    ckpt = llava["dense"][0]
    with pytest.raises(KilnError, match="--pp-size 1 only"):
        build(ckpt, tmp_path / "pp2", pp_size=2, **LIMITS)
    with pytest.raises(KilnError, match="4 attention heads do not divide over 3 ranks"):
        build(ckpt, tmp_path / "tp3", tp_size=3, **LIMITS)
