"""The README quickstart and the CLI's error paths, run as a user would."""

from __future__ import annotations

import json

import pytest
from e2e_helpers import REPO, kiln


def test_demo_generates_readable_corpus_text(demo_engine):
    proc = kiln("run", str(demo_engine), "--prompt", "A kiln is", "--max-new-tokens", "24", "--json")
    result = json.loads(proc.stdout)
    out = result["outputs"][0]
    assert result["compiled"] is True
    assert len(out["token_ids"]) == 24 or out["finish_reason"] == "stop"
    corpus = " ".join((REPO / "demo" / "corpus.txt").read_text().split())
    # The demo model learned its corpus by heart: greedy decoding continues the prompt with the
    # corpus text itself, so the first 60 characters stand in the corpus word for word.
    continuation = " ".join(("A kiln is" + out["text"]).split())[:60]
    assert len(continuation) == 60 and continuation in corpus, out["text"]


def test_streaming_matches_json_and_reports_speed(demo_engine):
    streamed = kiln("run", str(demo_engine), "--prompt", "The potter", "--max-new-tokens", "16")
    as_json = json.loads(
        kiln("run", str(demo_engine), "--prompt", "The potter", "--max-new-tokens", "16", "--json").stdout
    )
    assert streamed.stdout.strip() == ("The potter" + as_json["outputs"][0]["text"]).strip()
    assert "tokens/s" in streamed.stderr


def test_chat_prompt_and_eager_path_agree(demo_engine):
    compiled = json.loads(kiln("run", str(demo_engine), "--chat", "--prompt", "What is a kiln?", "--json").stdout)
    eager = json.loads(
        kiln("run", str(demo_engine), "--chat", "--prompt", "What is a kiln?", "--json", "--eager").stdout
    )
    assert eager["compiled"] is False
    assert compiled["outputs"][0]["token_ids"] == eager["outputs"][0]["token_ids"]
    assert compiled["outputs"][0]["text"].strip()


def test_too_long_prompt_is_a_clear_error(demo_engine):
    proc = kiln("run", str(demo_engine), "--prompt-ids", ",".join(["5"] * 513), check=False)
    assert proc.returncode == 2
    assert "max_input_len (512)" in proc.stderr and "Traceback" not in proc.stderr


def test_prompt_plus_new_tokens_over_max_seq_len(demo_engine):
    proc = kiln("run", str(demo_engine), "--prompt", "A kiln", "--max-new-tokens", "600", check=False)
    assert proc.returncode == 2 and "max_seq_len (512)" in proc.stderr
    # checked before the engine loads, in the words of the command line, and nothing echoed
    assert "--max-new-tokens (600)" in proc.stderr and "max_tokens" not in proc.stderr, proc.stderr
    assert "load engine" not in proc.stderr and proc.stdout == ""


def test_bad_ids_and_sampling_values_are_refused_before_the_engine_loads(demo_engine):
    cases = {
        ("--prompt-ids", "1,2,999999"): "outside the vocabulary",
        ("--prompt-ids", "1,2", "--prompt-ids", ",".join(["5"] * 513)): "prompt 1: the prompt has 513 tokens",
        ("--prompt", "A kiln", "--top-p", "0"): "--top-p must be in (0, 1]",
    }
    for args, message in cases.items():
        proc = kiln("run", str(demo_engine), *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "load engine" not in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""


def test_several_prompts_are_separated_and_chat_json_keeps_the_conversation(demo_engine):
    args = ("run", str(demo_engine), "--chat", "--prompt", "Hi", "--prompt", "What is a kiln?", "--max-new-tokens", "8")
    text = kiln(*args).stdout
    outs = json.loads(kiln(*args, "--json").stdout)["outputs"]
    n_tokens = [len(o["prompt_token_ids"]) for o in outs]
    headers = [f"=== prompt {i + 1}/2 ({n} tokens) ===" for i, n in enumerate(n_tokens)]
    assert text == f"{headers[0]}\n{outs[0]['text']}\n{headers[1]}\n{outs[1]['text']}\n", text
    assert [o["messages"] for o in outs] == [[{"role": "user", "content": c}] for c in ("Hi", "What is a kiln?")]
    assert "Hi" in outs[0]["prompt"] and "What is a kiln?" in outs[1]["prompt"]


def test_invalid_sampling_value(demo_engine):
    proc = kiln("run", str(demo_engine), "--prompt", "A kiln", "--temperature", "-1", check=False)
    assert proc.returncode == 2 and "temperature" in proc.stderr and "Traceback" not in proc.stderr


def test_engine_from_other_torch_version_refuses_to_load(demo_engine, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(demo_engine, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["torch_version"] = "1.0.0"
    manifest["device"]["type"] = "cuda"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    proc = kiln("run", str(copy), "--prompt", "A kiln", check=False)
    assert proc.returncode == 2
    assert "torch 1.0.0" in proc.stderr and "Rebuild" in proc.stderr


def test_missing_engine_directory(tmp_path):
    proc = kiln("run", str(tmp_path / "nope"), "--prompt", "x", check=False)
    assert proc.returncode == 2 and "not a kiln engine directory" in proc.stderr


@pytest.mark.parametrize("damaged", ["program.pt2", "weights.safetensors", "compiled.bin"])
def test_damaged_engine_file_says_rebuild(demo_engine, tmp_path, damaged):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(demo_engine, copy)
    if damaged == "compiled.bin":  # read only where the CPU module is not usable (another CPU, a GPU)
        shutil.rmtree(copy / "cpu_module")
    data = (copy / damaged).read_bytes()
    (copy / damaged).write_bytes(data[: len(data) // 2])
    proc = kiln("run", str(copy), "--prompt", "A kiln", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert damaged in proc.stderr and "rebuild" in proc.stderr


def test_a_damaged_cpu_module_falls_back_to_the_compiled_artifact(demo_engine, tmp_path):
    """From the command line (tests/compiler/test_cpu_module.py covers damaged facts and foreign builds)."""
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(demo_engine, copy)
    data = (copy / "cpu_module" / "module.py").read_bytes()
    (copy / "cpu_module" / "module.py").write_bytes(data[: len(data) // 2])
    intact = kiln("run", str(demo_engine), "--prompt", "A kiln", "--max-new-tokens", "8")
    proc = kiln("run", str(copy), "--prompt", "A kiln", "--max-new-tokens", "8")
    assert proc.stdout == intact.stdout and "Traceback" not in proc.stderr
