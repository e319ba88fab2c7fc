"""A vision-language engine with --tp-size 2, --pp-size 2 and both: its language model sharded and cut into
stages over gloo ranks, its vision program unsharded on rank 0 (the first stage's; the image rows go out
with each step's inputs to the first stage's other ranks); a batch of image and text prompts gives the
one-rank engine's greedy tokens and transformers' (float32), and int8_wo the one-rank int8 engine's."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from torchrun_build import assert_same_engine, build_under_torchrun  # noqa: E402
from vlm_checkpoints import make_vlm_checkpoint  # noqa: E402
from vlm_rank import NEW_TOKENS, vlm_batch  # noqa: E402
from vlm_reference import load_vlm_reference, vlm_greedy  # noqa: E402

from kiln import LLM, SamplingParams, build  # noqa: E402
from kiln.errors import KilnError  # noqa: E402

RANK_SCRIPT = Path(__file__).parent / "vlm_rank.py"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
LIMITS = dict(max_batch_size=4, max_input_len=200, max_seq_len=256, max_num_tokens=256, compile=False, progress=False)


def torchrun(engines: list[Path], out: Path, ranks: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    command += [str(RANK_SCRIPT), str(out), *map(str, engines)]
    proc = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


LAYOUTS = {"tp2": {"tp_size": 2}, "pp2": {"pp_size": 2}, "tp2pp2": {"tp_size": 2, "pp_size": 2}}
CASES = {  # case: (build options, its layouts)
    "dense": ({}, ("tp2", "pp2", "tp2pp2")),
    "int8_wo": ({"quantization": "int8_wo"}, ("tp2", "tp2pp2")),  # TP x PP: the stage's quantized rows renamed
}


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path, list]]:
    """{case-layout: (checkpoint, one-rank engine, the engine of that layout, its tokens)}: one torchrun
    launch of 2 ranks (TP2 and PP2 engines), one of 4 (TP2 x PP2)."""
    tmp = tmp_path_factory.mktemp("llava")
    ckpt = make_vlm_checkpoint("llava", tmp / "ckpt")
    made = {}
    for case, (options, layouts) in CASES.items():
        one = build(ckpt, tmp / f"{case}-tp1", **options, **LIMITS)
        for layout in layouts:
            made[f"{case}-{layout}"] = (
                one,
                build(ckpt, tmp / f"{case}-{layout}", **LAYOUTS[layout], **options, **LIMITS),
            )
    two = [engine for key, (_, engine) in made.items() if not key.endswith("tp2pp2")]
    tokens = torchrun(two, tmp / "two.json", 2)
    tokens.update(
        torchrun(
            [e for e in (engine for _, engine in made.values()) if e.name.endswith("tp2pp2")], tmp / "four.json", 4
        )
    )
    return {key: (ckpt, one, engine, tokens[str(engine)]) for key, (one, engine) in made.items()}


@functools.cache
def one_rank(engine: Path) -> list[list[int]]:
    """The one-rank engine's tokens (each engine run once for the tests that compare with it)."""
    return [
        o.token_ids for o in LLM(engine).generate(vlm_batch(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    ]


@pytest.fixture(scope="module")
def transformers_tokens(llava) -> list[list[int]]:
    model, processor = load_vlm_reference(llava["dense-tp2"][0], "LlavaForConditionalGeneration", torch.float32)
    return [vlm_greedy(model, processor, p["prompt"], p["images"], NEW_TOKENS)[0] if isinstance(p, dict)
            else vlm_greedy(model, processor, p, [], NEW_TOKENS)[0] for p in vlm_batch()]  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_llava_tokens_match_one_rank_and_transformers(layout: str, llava, transformers_tokens) -> None:
    """The vision program runs on rank 0, in the first stage, whose embeddings take the image rows."""
    _, one, engine, tokens = llava[f"dense-{layout}"]
    manifest = json.loads((engine / "manifest.json").read_text())
    world = manifest["world"]
    assert (world["tp_size"], world["pp_size"]) == (
        LAYOUTS[layout].get("tp_size", 1),
        LAYOUTS[layout].get("pp_size", 1),
    )
    assert manifest["multimodal"] is not None and (engine / "vision").is_dir()
    assert all((engine / f"rank{r}").is_dir() for r in range(world["tp_size"] * world["pp_size"]))
    assert tokens == one_rank(one) == transformers_tokens
    assert len(set(sum(tokens, []))) > 3


@pytest.mark.parametrize("layout", ["tp2", "tp2pp2"])
def test_int8_llava_tokens_match_the_one_rank_int8_engine(layout: str, llava) -> None:
    _, one, engine, tokens = llava[f"int8_wo-{layout}"]
    assert json.loads((engine / "manifest.json").read_text())["quantization"]["method"] == "int8_wo"
    assert tokens == one_rank(one)


def test_sharded_vlm_refusals(llava, tmp_path: Path) -> None:
    ckpt = llava["dense-tp2"][0]
    with pytest.raises(KilnError, match="2 layers do not divide into 4 pipeline stages"):
        build(ckpt, tmp_path / "pp4", pp_size=4, **LIMITS)
    with pytest.raises(KilnError, match="4 attention heads do not divide over 3 ranks"):
        build(ckpt, tmp_path / "tp3", tp_size=3, **LIMITS)
    with pytest.raises(KilnError, match="fp8 at build quantizes text models only"):
        build(ckpt, tmp_path / "fp8", pp_size=2, quantization="fp8", **LIMITS)
    other = make_vlm_checkpoint("llava_next", tmp_path / "next")
    with pytest.raises(KilnError, match="LlavaNextForConditionalGeneration: kiln splits the language model of Llava"):
        build(other, tmp_path / "next-pp2", pp_size=2, **LIMITS)


def test_llava_build_under_torchrun_writes_the_one_process_engine(llava, tmp_path: Path) -> None:
    """Rank 0 builds the vision program and its LLM program, rank 1 its LLM program."""
    ckpt, _, engine, _ = llava["dense-tp2"]
    limits = {k: v for k, v in LIMITS.items() if k not in ("compile", "progress")}
    build_under_torchrun(ckpt, tmp_path / "built", limits, "--tp-size", "2")
    assert_same_engine(tmp_path / "built", engine)
