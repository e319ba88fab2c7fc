"""lm-evaluation-harness, as a third-party client, against `kiln serve` on the demo checkpoint, offline.

The tasks (tests/lm_eval_tasks: loglikelihood multiple choice, loglikelihood_rolling, generate_until)
read local files. lm-eval finds the tokenizer through /tokenizer_info and /tokenize, scores with
`echo` + `logprobs`, and its loglikelihoods must equal what the Python API computes for the same ids.
Runs `lm_eval` from the test extra, or the executable named by KILN_LM_EVAL.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_helpers import DEMO, REPO, ServerProcess

from kiln.api import LLM, build
from kiln.sampling_params import SamplingParams

MODEL = "tiny"
TASKS = REPO / "tests" / "lm_eval_tasks"


def lm_eval_command() -> list[str]:
    if os.environ.get("KILN_LM_EVAL"):
        return [os.environ["KILN_LM_EVAL"]]
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed (pip install 'lm-eval[api]', or set KILN_LM_EVAL)")
    return [sys.executable, "-m", "lm_eval"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return build(DEMO, tmp_path_factory.mktemp("lm_eval") / "engine", progress=False, compile=False)


@pytest.fixture(scope="module")
def samples(engine, tmp_path_factory) -> dict[str, list[dict]]:
    command = lm_eval_command()
    out = tmp_path_factory.mktemp("lm_eval_out")
    server = ServerProcess(engine, "--served-model-name", MODEL)
    try:
        args = f"model={MODEL},base_url={server.url}/v1/completions,num_concurrent=1,max_retries=1,max_length=512"
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run(
            [*command, "--model", "local-completions", "--model_args", args, "--tasks", "kiln_mc,kiln_rolling,kiln_gen"]
            + ["--include_path", str(TASKS), "--output_path", str(out), "--log_samples"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "Using remote tokenizer" in proc.stderr or "remote tokenizer" in proc.stderr.lower()
    finally:
        assert server.stop() == 0
    found = {}
    for task in ("kiln_mc", "kiln_rolling", "kiln_gen"):
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        found[task] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return found


@pytest.fixture(scope="module")
def llm(engine) -> LLM:
    return LLM(engine, overlap_decode=False)


def ids_of(llm: LLM, text: str) -> list[int]:
    return list(llm.tokenizer(text, add_special_tokens=False).input_ids)  # lm-eval's remote tokenizer adds none


def loglikelihood(llm: LLM, context: list[int], continuation: list[int]) -> float:
    """The Python API's log-probability of `continuation` after `context` (sum over its tokens)."""
    out = llm.generate(context + continuation, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    return sum(entry.logprob for entry in out.prompt_logprobs[len(context) :])


def test_multiple_choice_loglikelihoods_equal_the_python_api(samples, llm):
    assert len(samples["kiln_mc"]) == 4
    for sample in samples["kiln_mc"]:
        for args, resp in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]
            spaces = len(context) - len(context.rstrip())  # lm-eval moves them to the continuation
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = ids_of(llm, context)
            whole = ids_of(llm, context + continuation)
            assert float(resp[0][0]) == pytest.approx(loglikelihood(llm, ctx, whole[len(ctx) :]), abs=1e-4)


def test_rolling_loglikelihoods_equal_the_python_api(samples, llm):
    tok = llm.tokenizer
    # lm-eval's remote tokenizer: the BOS id if it is not 0, else the EOS id, starts the only window
    bos, eos = (ids_of(llm, t)[0] for t in (tok.bos_token, tok.eos_token))
    prefix = bos or eos
    assert len(samples["kiln_rolling"]) == 2
    for sample in samples["kiln_rolling"]:
        text = sample["arguments"]["gen_args_0"]["arg_0"]
        assert float(sample["resps"][0][0]) == pytest.approx(loglikelihood(llm, [prefix], ids_of(llm, text)), abs=1e-4)


def test_generations_equal_the_python_api(samples, llm):
    assert len(samples["kiln_gen"]) == 2
    for sample in samples["kiln_gen"]:
        context = sample["arguments"]["gen_args_0"]["arg_0"]
        params = SamplingParams(max_tokens=8, temperature=0, stop=["\n"])
        expected = llm.generate(ids_of(llm, context), params)[0].text
        assert sample["resps"][0][0] == expected
