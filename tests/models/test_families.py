"""Every tested family: kiln's batched greedy output against transformers' own greedy decoding.

By default on CPU in float32: token-identical, logits within 1e-3. With KILN_TEST_DEVICE=cuda and
KILN_TEST_DTYPE=bfloat16 (the GPU machine): tokens identical on the first 16, except where the
two disagree at a near-tie of transformers' own logits, which the test then proves and reports.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_reference import greedy, load_reference
from tiny_checkpoints import EXTRA_FAMILIES, FAMILIES, VARIANTS, WINDOW, build_tiny_engine, make_checkpoint

from kiln import LLM, SamplingParams

DEVICE = os.environ.get("KILN_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("KILN_TEST_DTYPE", "float32")
COMPILE = os.environ.get("KILN_TEST_COMPILE", "0") == "1"
STRICT = DTYPE == "float32"
PROMPT_LENGTHS = (3, 13, 21)  # one shorter and two longer than the sliding window
NEW_TOKENS = 12 if STRICT else 16
LOGIT_TOLERANCE = 1e-3 if STRICT else 0.1  # bf16 keeps 8 bits of mantissa: logits of size ~1-10


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def compare(
    family: str,
    prompt: list[int],
    ours: list[int],
    our_logits: list[torch.Tensor],
    ref: list[int],
    ref_logits: list[torch.Tensor],
) -> dict:
    """Compare up to the first divergence (after it the two continue from different prefixes)."""
    agree = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
    steps = range(min(agree + 1, len(ref)))
    worst = max(float((our_logits[i] - ref_logits[i]).abs().max()) for i in steps)
    result = {"family": family, "prompt_len": len(prompt), "identical_tokens": agree, "max_logit_diff": worst}
    if agree < len(ref):
        # Same prefix, different argmax: transformers' own margin between the two choices must be
        # within the numerical noise measured on that very step.
        step = ref_logits[agree]
        margin = float(step[ref[agree]] - step[ours[agree]])
        noise = float((our_logits[agree] - step).abs().max())
        result.update(divergence_step=agree, hf_margin=margin, step_logit_diff=noise)
        assert not STRICT, f"{family}: prompt of {len(prompt)} tokens diverged at step {agree}"
        assert margin <= 2 * noise, f"{family}: diverged at step {agree} with a margin {margin} > 2 x noise {noise}"
    return result


CASES = [(f, v) for f in [*FAMILIES, *EXTRA_FAMILIES] for v in ["base", *VARIANTS.get(f, {})]]


@pytest.fixture(scope="module")
def base_engines(checkpoints, tmp_path_factory):
    """(family, compile) -> the engine of the family's base checkpoint, built once for this module's tests."""
    built: dict[tuple[str, bool], Path] = {}

    def get(family: str, compile: bool = False) -> Path:
        if (family, compile) not in built:
            out = tmp_path_factory.mktemp(f"engine-{family}") / "engine"
            built[family, compile] = build_tiny_engine(
                checkpoints(family), out, compile=compile, device=DEVICE, dtype=DTYPE
            )
        return built[family, compile]

    return get


@pytest.mark.parametrize(("family", "variant"), CASES, ids=[f if v == "base" else f"{f}-{v}" for f, v in CASES])
def test_greedy_matches_transformers(family, variant, checkpoints, base_engines, tmp_path, record_property):
    # Each family's base checkpoint (shared with other tests) and its other configurations (VARIANTS).
    assert max(PROMPT_LENGTHS) > WINDOW
    if variant == "base":
        checkpoint, engine = checkpoints(family), base_engines(family, COMPILE)
    else:
        checkpoint = make_checkpoint(family, tmp_path / "ckpt", variant=variant)
        engine = build_tiny_engine(checkpoint, tmp_path / "engine", compile=COMPILE, device=DEVICE, dtype=DTYPE)
    llm = LLM(engine)
    seen: dict[str, list[torch.Tensor]] = {}
    llm.engine.logits_hook = lambda seqs, logits: [
        seen.setdefault(s.request_id, []).append(logits[i].float().cpu()) for i, s in enumerate(seqs)
    ]
    batch = prompts()
    outs = llm.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))

    reference = load_reference(checkpoint, getattr(torch, DTYPE), DEVICE)
    results = []
    for prompt, out in zip(batch, outs):
        ref_tokens, ref_logits = greedy(reference, prompt, NEW_TOKENS)
        assert len(seen[out.request_id]) == NEW_TOKENS
        results.append(compare(family, prompt, out.token_ids, seen[out.request_id], ref_tokens, ref_logits))
    worst = max(r["max_logit_diff"] for r in results)
    record_property("max_logit_diff", worst)
    report = os.environ.get("KILN_FAMILY_REPORT")
    if report:
        with open(report, "a") as fh:
            for r in results:
                fh.write(
                    json.dumps({**r, "variant": variant, "device": DEVICE, "dtype": DTYPE, "compiled": COMPILE}) + "\n"
                )
    assert worst < LOGIT_TOLERANCE * max(1.0, max(float(row.abs().max()) for row in seen[outs[0].request_id])), (
        f"{family}: max logit difference {worst}"
    )


def test_every_family_engine_loads_in_a_new_process(base_engines):
    """A new process has imported nothing the build imported (transformers' MoE code registers an operator
    the Mixtral program calls): one child process loads every family's engine and generates the same tokens."""
    families = [*FAMILIES, *EXTRA_FAMILIES]
    runtime = {"kv_cache_memory_fraction": 0.25}  # GPU: the child's engines share the device with this process
    batch, params = prompts(seed=1), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engines, want = [], {}
    for family in families:
        engine = base_engines(family)  # eager: the engines test_greedy_matches_transformers checked, unless compiled
        llm = LLM(engine, **runtime)
        want[str(engine)] = [out.token_ids for out in llm.generate(batch, params)]
        engines.append(str(engine))
        del llm
        gc.collect()
    job = {"engines": engines, "prompts": batch, "max_tokens": params.max_tokens, "runtime": runtime}
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("load_engines.py"))],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=repo,
        env=env,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    for family, engine in zip(families, engines):
        assert got[engine] == want[engine], f"{family}: a new process generated other tokens"
