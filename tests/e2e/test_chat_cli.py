"""`kiln chat`: a conversation on piped stdin, each reply the one LLM.chat gives for the history so far."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from e2e_helpers import REPO, SHARED_GPU, SHARED_GPU_ARGS, kiln

from kiln import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=256, temperature=0.0)


def _chat(engine, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kiln", "chat", str(engine), *SHARED_GPU_ARGS, *flags],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


def test_two_turns_then_end_of_input_give_the_transcript_of_the_conversation(demo_engine):
    proc = _chat(demo_engine, "What is a kiln?\nWhat is clay?\n", "--system", "Be brief.")
    assert proc.returncode == 0, proc.stderr
    llm = LLM(demo_engine, **SHARED_GPU)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a kiln?"}]
    first = llm.chat(history, GREEDY)[0].text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is clay?"}]
    second = llm.chat(history, GREEDY)[0].text
    assert first and second
    assert proc.stdout == f"{first}\n{second}\n"


def test_reset_forgets_the_history_and_exit_quits(demo_engine):
    turns = "What is a kiln?\n/reset\nWhat is clay?\n/exit\nWhat is a glaze?\n"
    proc = _chat(demo_engine, turns, "--max-new-tokens", "20")
    assert proc.returncode == 0, proc.stderr
    llm = LLM(demo_engine, **SHARED_GPU)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    replies = [llm.chat([{"role": "user", "content": q}], params)[0].text for q in ("What is a kiln?", "What is clay?")]
    assert proc.stdout == "".join(f"{r}\n" for r in replies)  # nothing after /exit
    assert "cleared" in proc.stderr


def test_a_bad_flag_value_names_the_flag(demo_engine):
    proc = _chat(demo_engine, "", "--top-p", "0")
    assert proc.returncode != 0 and "--top-p" in proc.stderr and "Traceback" not in proc.stderr


def test_an_engine_without_a_chat_template_is_refused_before_loading(demo_engine, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(demo_engine, engine)
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["model"]["has_chat_template"] = False  # as a base model's engine records it
    (engine / "manifest.json").write_text(json.dumps(manifest))
    proc = _chat(engine, "Hi\n")
    assert proc.returncode != 0 and "no chat template" in proc.stderr and "kiln run" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert "chat" in kiln("--help").stdout
