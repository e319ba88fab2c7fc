"""`kiln chat ENGINE`: a multi-turn conversation on stdin/stdout through the engine's chat template.

Each line read is a user turn; the reply streams to stdout as it is generated and joins the history.
`/reset` clears the history (the --system message stays), `/exit` or the end of input quits. Notes
and errors go to stderr, so stdout is the transcript of the replies.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TextIO

from kiln.errors import KilnError, RequestError
from kiln.sampling_params import SamplingParams

EXIT, RESET = "/exit", "/reset"


def chat(
    engine_dir: str | Path,
    params: SamplingParams,
    *,
    system: str | None = None,
    runtime: dict[str, Any] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Run the conversation until /exit or the end of stdin; 0 when it ended that way."""
    from kiln.engine.manifest import read_manifest

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if not read_manifest(Path(engine_dir)).model.has_chat_template:
        raise KilnError(
            f"{engine_dir}: this engine's tokenizer has no chat template, so `kiln chat` cannot format a "
            "conversation; use `kiln run --prompt ...` for plain text"
        )
    from kiln.api import LLM

    llm = LLM(engine_dir, **(runtime or {}))
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    interactive = stdin.isatty()
    if interactive:
        _note(f"chatting with {engine_dir}: {RESET} clears the conversation, {EXIT} or Ctrl-D quits")
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line or line.strip() == EXIT:
            return 0
        text = line.rstrip("\n")
        if text.strip() == RESET:
            history = list(opening)
            _note("(conversation cleared)")
            continue
        if not text.strip():
            continue
        reply = _turn(llm, history + [{"role": "user", "content": text}], params, stdout)
        if reply is not None:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def _turn(llm: Any, messages: list[dict[str, str]], params: SamplingParams, stdout: TextIO) -> str | None:
    """The streamed reply to `messages`, or None (with the reason on stderr) when it cannot be generated."""
    from kiln.run_prompts import as_flags

    try:
        ids = llm.apply_chat_template(messages)
        seq_len = llm.engine.limits.seq_len
        room = seq_len - len(ids)
        if room < 1:
            raise RequestError(f"the conversation fills this engine's max_seq_len ({seq_len}); {RESET} to start again")
        turn = dataclasses.replace(params, max_tokens=min(params.max_tokens, room))

        def show(update: Any) -> None:
            print(update.delta_text, end="", file=stdout, flush=True)

        (out,) = llm.generate([ids], turn, on_update=show)
    except RequestError as exc:
        _note(f"error: {as_flags(str(exc))}")
        return None
    print(file=stdout, flush=True)
    return str(out.text)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


__all__ = ["chat"]
