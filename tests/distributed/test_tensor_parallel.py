"""Tensor- and pipeline-parallel engines on the CPU: two gloo ranks under torchrun give the greedy tokens
of the one-rank engine and of transformers (float32), with KV heads split or replicated, through a
preemption; int8/int4, AWQ, FP8, SmoothQuant, narrow-KV and pre-quantized (AWQ, GPTQ, compressed-tensors)
engines shard and pipeline as the one-rank engine runs (int8 and FP8 at TP2 x PP2 too); a build under
torchrun writes the one-process engine; a missing launch, a wrong world size and a killed rank are clear
errors; `kiln serve` under torchrun answers from rank 0 and SIGTERM to the launcher stops every rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from hf_reference import greedy, load_reference  # noqa: E402
from tiny_checkpoints import FAMILIES, TINY_LIMITS, build_tiny_engine, make_tokenizer  # noqa: E402
from torchrun_build import assert_same_engine, build_under_torchrun  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.errors import KilnError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RANK_SCRIPT = Path(__file__).parent / "tp_rank.py"
PROMPTS = [[5, 17, 40], [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130], [3, 4, 250, 9, 77, 12, 301]]
NEW_TOKENS = 20  # the third prompt is preempted on 4 KV blocks
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def checkpoint(directory: Path, family: str, **options: object) -> Path:
    config, model_cls = FAMILIES[family](**options)
    torch.manual_seed(0)
    model_cls(config).eval().save_pretrained(directory, safe_serialization=True)
    make_tokenizer().save_pretrained(directory)
    return directory


def torchrun(engines: list[Path], tmp: Path, ranks: int = 2) -> dict:
    """One torchrun launch of `ranks` ranks over the engines, each on 4 KV blocks (which hold one sequence
    of 64 tokens, not the three prompts: the scheduler preempts)."""
    prompts, out = tmp / "prompts.json", tmp / "out.json"
    prompts.write_text(json.dumps(PROMPTS))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(ranks),
        str(RANK_SCRIPT),
    ]
    command += [str(out), str(prompts), *map(str, engines), "--new-tokens", str(NEW_TOKENS), "--num-kv-blocks", "4"]
    proc = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def references(ckpt: Path, engine: Path) -> tuple[list[list[int]], list[list[int]]]:
    """transformers' greedy tokens, and the one-rank engine's."""
    model = load_reference(ckpt)
    hf = [greedy(model, p, NEW_TOKENS)[0] for p in PROMPTS]
    llm = LLM(engine)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    return hf, [o.token_ids for o in outs]


CASES = {
    # family, its options, whether the TP2 engine is compiled by Inductor (one-rank engines run op by op)
    "llama-untied": ("llama", {"tie_word_embeddings": False, "head_dim": 32}, True),
    "llama-one-kv-head": ("llama", {"tie_word_embeddings": False, "num_key_value_heads": 1}, False),
    "qwen2": ("qwen2", {}, False),
    "gemma2": ("gemma2", {}, False),
}


PIPELINED = ("llama-untied", "qwen2", "gemma2")  # gemma2: 4 layers, sliding and full attention in each stage
TP_X_PP = ("llama-untied", "qwen2", "gemma2")
CALIBRATION = "the quick brown fox jumps over the lazy dog. " * 40
QUANTIZED = {  # of the llama-untied checkpoint; int4 in groups of 32 (64 columns a rank)
    "int8_wo": {"quantization": "int8_wo"},
    "int4_wo": {"quantization": "int4_wo", "group_size": 32},
    "int4_awq": {"quantization": "int4_awq", "group_size": 32, "calib_size": 2},  # searched whole, then cut
    "fp8": {"quantization": "fp8"},  # per-channel weights, per-token inputs: o/down get the absmax columns
    "int8_sq": {"quantization": "int8_sq", "weight_scales": "tensor", "act_scales": "tensor", "calib_size": 1},
}
PIPELINED_QUANTIZED = ("int8_wo", "int4_wo", "int4_awq", "fp8", "int8_sq")  # the last three: quantized whole, cut
PREQUANTIZED = ("awq", "gptq", "compressed-tensors")  # tiny Llama checkpoints, int4 in groups of 32 (32 columns a rank)
NARROW_KV = {  # of the llama-untied checkpoint: the whole model's per-layer scales on every rank, cut per stage
    "int8-kv": {"kv_cache_dtype": "int8", "calib_size": 2},
    "fp8-kv": {"kv_cache_dtype": "fp8"},  # scale 1.0, no calibration
}
QUANTIZED_TP_X_PP = ("int8_wo", "fp8")  # each stage's quantized linears renamed; fp8's absmax in its stage's group


def prequantized(directory: Path, fmt: str, group_size: int = 32, **options: object) -> Path:
    from tests.quantized_checkpoints import write_awq, write_compressed_tensors, write_gptq

    if fmt == "awq":
        write_awq(directory, group_size=group_size)
    elif fmt == "gptq":
        write_gptq(directory, group_size=group_size, **options)  # type: ignore[arg-type]
    else:
        write_compressed_tensors(directory, "W4A16", group_size)
    return directory


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path, dict]]:
    """{case: (checkpoint, one-rank engine, TP2 engine, what the TP2 engine generated under torchrun)}."""
    made = {}
    for case, (family, options, compile_) in CASES.items():
        tmp = tmp_path_factory.mktemp(case)
        ckpt = checkpoint(tmp / "ckpt", family, **options)
        one = build_tiny_engine(ckpt, tmp / "tp1")
        made[case] = ckpt, one, build_tiny_engine(ckpt, tmp / "tp2", compile=compile_, tp_size=2)
    for case in PIPELINED:  # two stages of the same checkpoints
        ckpt, one, _ = made[case]
        made[f"pp2-{case}"] = ckpt, one, build_tiny_engine(ckpt, tmp_path_factory.mktemp(case) / "pp2", pp_size=2)
    ckpt = made["llama-untied"][0]
    for method, options in {**QUANTIZED, **NARROW_KV}.items():
        tmp = tmp_path_factory.mktemp(method)
        if "calib_size" in options:
            (tmp / "calib.txt").write_text(CALIBRATION)
            options = {**options, "calib_data": str(tmp / "calib.txt")}
        one = build_tiny_engine(ckpt, tmp / "tp1", **options)
        made[method] = ckpt, one, build_tiny_engine(ckpt, tmp / "tp2", tp_size=2, **options)
        if method in PIPELINED_QUANTIZED or method in NARROW_KV:
            made[f"pp2-{method}"] = ckpt, one, build_tiny_engine(ckpt, tmp / "pp2", pp_size=2, **options)
    for fmt in PREQUANTIZED:
        tmp = tmp_path_factory.mktemp(fmt)
        quantized = prequantized(tmp / "ckpt", fmt)
        one = build_tiny_engine(quantized, tmp / "tp1")
        made[fmt] = quantized, one, build_tiny_engine(quantized, tmp / "tp2", tp_size=2)
        made[f"pp2-{fmt}"] = quantized, one, build_tiny_engine(quantized, tmp / "pp2", pp_size=2)
    results = torchrun([two for _, _, two in made.values()], tmp_path_factory.mktemp("torchrun"))
    return {case: (*paths, results[str(paths[2])]) for case, paths in made.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_tokens_match_one_rank_and_transformers(case: str, engines) -> None:
    ckpt, one, two, result = engines[case]
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world"]["tp_size"] == 2 and (two / "rank0").is_dir() and (two / "rank1").is_dir()
    hf, single = references(ckpt, one)
    assert result["tokens"] == hf == single
    assert len(set(sum(hf, []))) > 3  # the tokens are not one repeated id
    assert result["preemptions"] > 0


@pytest.mark.parametrize("case", PIPELINED)
def test_pp2_tokens_match_one_rank_and_transformers(case: str, engines) -> None:
    ckpt, one, two, result = engines[f"pp2-{case}"]
    world = json.loads((two / "manifest.json").read_text())["world"]
    assert (world["pp_size"], world["tp_size"]) == (2, 1)
    hf, single = references(ckpt, one)
    assert result["tokens"] == hf == single
    assert result["preemptions"] > 0


@pytest.fixture(scope="module")
def four_ranks(engines, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """{case: (its TP2 x PP2 engine, what it generated)}: one launch of 4 ranks over the engines."""
    tmp = tmp_path_factory.mktemp("tp2pp2")
    made = {case: build_tiny_engine(engines[case][0], tmp / case, tp_size=2, pp_size=2) for case in TP_X_PP}
    for method in QUANTIZED_TP_X_PP:  # of the llama-untied checkpoint, as the TP2 quantized engines
        made[method] = build_tiny_engine(engines[method][0], tmp / method, tp_size=2, pp_size=2, **QUANTIZED[method])
    results = torchrun(list(made.values()), tmp, ranks=4)
    return {case: (four, results[str(four)]) for case, four in made.items()}


@pytest.mark.parametrize("case", TP_X_PP)
def test_tp2_x_pp2_tokens_match_one_rank_and_transformers(case: str, engines, four_ranks) -> None:
    ckpt, one, _, _ = engines[case]  # llama and qwen2: 2 layers, one a stage; gemma2: 2 a stage; each over 2 ranks
    four, result = four_ranks[case]
    world = json.loads((four / "manifest.json").read_text())["world"]
    assert (world["tp_size"], world["pp_size"]) == (2, 2) and (four / "rank3").is_dir()
    hf, single = references(ckpt, one)
    assert result["tokens"] == hf == single
    assert result["preemptions"] > 0


QUANTIZED_CASES = [
    *QUANTIZED,
    *(f"pp2-{m}" for m in PIPELINED_QUANTIZED),
    *PREQUANTIZED,
    *(f"pp2-{f}" for f in PREQUANTIZED),
]


@pytest.mark.parametrize("case", QUANTIZED_CASES)
def test_quantized_tp2_and_pp2_tokens_match_one_rank(case: str, engines) -> None:
    _, one, two, result = engines[case]
    blocks = [json.loads((e / "manifest.json").read_text())["quantization"] for e in (one, two)]
    method, sharded = ({k: v for k, v in b.items() if k != "layers"} for b in blocks)
    assert sharded == method  # the same method, scales and activations
    assert blocks[1]["layers"] and blocks[1]["layers"] == blocks[0]["layers"]  # named by the checkpoint's layers
    outs = LLM(one).generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    assert result["tokens"] == [o.token_ids for o in outs]
    assert len(set(sum(result["tokens"], []))) > 3


@pytest.mark.parametrize("case", [*NARROW_KV, *(f"pp2-{c}" for c in NARROW_KV)])
def test_narrow_kv_cache_tp2_and_pp2_tokens_match_one_rank(case: str, engines) -> None:
    _, one, two, result = engines[case]
    caches = [json.loads((e / "manifest.json").read_text()).get("kv_cache") for e in (one, two)]
    assert caches[0] is not None and caches[1] == caches[0]  # the same dtype and per-layer scales
    dtype = NARROW_KV[case.removeprefix("pp2-")]["kv_cache_dtype"]
    assert caches[1]["dtype"] == dtype and caches[1]["calibrated"] == (dtype == "int8")
    outs = LLM(one).generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    assert result["tokens"] == [o.token_ids for o in outs]
    assert len(set(sum(result["tokens"], []))) > 3


@pytest.mark.parametrize("method", QUANTIZED_TP_X_PP)
def test_quantized_tp2_x_pp2_tokens_match_one_rank(method: str, engines, four_ranks) -> None:
    one, (four, result) = engines[method][1], four_ranks[method]
    assert json.loads((four / "manifest.json").read_text())["quantization"]["method"] == method
    outs = LLM(one).generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    assert result["tokens"] == [o.token_ids for o in outs]


@pytest.mark.parametrize(
    "fmt, options, tp, message",
    [
        ("gptq", {"desc_act": True}, 2, "act-order"),
        ("awq", {}, 4, "groups of 32 columns would straddle two ranks"),  # o_proj: 16 columns a rank
    ],
)
def test_prequantized_splits_that_cannot_be_made_are_refused(fmt, options, tp: int, message: str, tmp_path) -> None:
    ckpt = prequantized(tmp_path / "ckpt", fmt, **options)
    with pytest.raises(KilnError, match=message):
        build_tiny_engine(ckpt, tmp_path / "tp", tp_size=tp)
    assert not (tmp_path / "tp").exists()


def test_launch_errors(engines) -> None:
    two = engines["llama-one-kv-head"][2]
    run = [sys.executable, "-m", "kiln", "run", str(two), "--prompt", "hi", "--max-new-tokens", "2"]
    alone = subprocess.run(run, capture_output=True, text=True, env=ENV)
    assert alone.returncode != 0 and "torchrun --nproc-per-node 2" in alone.stderr
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    wrong = subprocess.run(run, capture_output=True, text=True, env=env)
    assert wrong.returncode != 0 and "built for 2 ranks" in wrong.stderr and "3 were launched" in wrong.stderr


def test_killed_rank_stops_the_other_with_its_name(engines, tmp_path: Path) -> None:
    two = engines["llama-one-kv-head"][2]
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        command = [
            sys.executable,
            str(RANK_SCRIPT),
            str(tmp_path / "out.json"),
            str(tmp_path / "prompts.json"),
            str(two),
        ]
        procs.append(subprocess.Popen([*command, "--hold", str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while not (tmp_path / "ready").exists():
        assert procs[0].poll() is None and time.monotonic() < deadline, procs[0].communicate()[1][-3000:]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    (tmp_path / "go").touch()
    _, err = procs[0].communicate(timeout=60)  # bounded: well within the collective timeout and then some
    assert procs[0].returncode != 0
    assert "rank 1 died" in err, err[-3000:]


@pytest.mark.parametrize("case, option", [("qwen2", "--tp-size"), ("pp2-qwen2", "--pp-size")])
def test_build_under_torchrun_writes_the_one_process_engine(case: str, option: str, engines, tmp_path: Path) -> None:
    ckpt, _, engine, _ = engines[case]
    build_under_torchrun(ckpt, tmp_path / "built", TINY_LIMITS, option, "2")
    assert_same_engine(tmp_path / "built", engine)


def test_build_refuses_heads_that_do_not_divide(engines, tmp_path: Path) -> None:
    from kiln import build

    with pytest.raises(KilnError, match="4 attention heads do not divide over 3 ranks"):
        build(engines["qwen2"][0], tmp_path / "tp3", tp_size=3, progress=False)
    assert not (tmp_path / "tp3").exists()


def test_a_refused_pipeline_build_names_why_and_leaves_nothing(engines, tmp_path: Path) -> None:
    from kiln import build

    ckpt = engines["qwen2"][0]
    with pytest.raises(KilnError, match="an int8 KV cache needs per-layer scales: give --calib-data FILE"):
        build(ckpt, tmp_path / "kv", pp_size=2, kv_cache_dtype="int8", progress=False)
    assert not (tmp_path / "kv").exists()


def test_serve_under_torchrun_answers_from_rank_0_and_sigterm_stops_every_rank(engines) -> None:
    import httpx

    _, one, two, _ = engines["llama-one-kv-head"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "kiln", "serve", str(two), "--port", str(port), "--collective-timeout-s", "30"]
    launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        ranks = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "The kiln fires", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        assert answer and answer == LLM(one).generate(["The kiln fires"], params)[0].text
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    # torchrun hands SIGTERM to every rank and then exits with its own SignalException (status 1)
    assert "got signal: 15" in err, err[-3000:]
    assert err.count("Uvicorn running on") == 1  # only rank 0 binds HTTP
    assert "Application shutdown complete" in err  # rank 0's server shut down gracefully
    for pid in ranks:
        assert not os.path.exists(f"/proc/{pid}"), f"rank process {pid} outlived the launcher"
