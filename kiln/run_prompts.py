"""`kiln run`'s prompts, read and checked against the engine's limits before the engine loads.

The manifest gives the limits and the engine's tokenizer loads in a moment, so a prompt that is too
long, an id outside the vocabulary or a `--max-new-tokens` beyond the engine's room is refused at once.
Errors name `kiln run`'s flags, not the Python API's fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, RequestError
from kiln.sampling_params import SamplingParams

# SamplingParams fields -> the `kiln run` flags that set them
_FLAGS = {
    "max_tokens": "--max-new-tokens",
    "stop_token_ids": "--stop-token-id",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty",
    "seed": "--seed",
    "stop": "--stop",
}
_FIELD = re.compile(r"(?<![\w-])(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")\b")


def as_flags(message: str) -> str:
    """An API-level message with each sampling field named by its `kiln run` flag."""
    return _FIELD.sub(lambda m: _FLAGS[m.group(1)], message)


@dataclass(frozen=True)
class RunPrompt:
    """One prompt of `kiln run`: what `LLM.generate` takes, and how to show it."""

    prompt: str | list[int]  # text, or token ids (given with --prompt-ids, or from the chat template)
    prompt_ids: list[int]
    shown: str  # echoed before the generated text ("" for --prompt-ids and --chat)
    messages: list[dict[str, str]] | None = None  # --chat: the conversation the template rendered
    chat_text: str | None = None  # --chat: the template's text, as the engine reads it


def sampling_params(**fields: Any) -> SamplingParams:
    try:
        return SamplingParams(**fields)
    except RequestError as exc:
        raise KilnError(as_flags(str(exc))) from exc


def prepare(
    engine_dir: str | Path,
    texts: list[str],
    ids: list[list[int]],
    *,
    chat: bool,
    params: SamplingParams,
    check_lengths: bool = True,
) -> list[RunPrompt]:
    """Every prompt encoded and validated (`check_lengths=False`: image prompts, whose length the images set)."""
    from kiln.engine.manifest import read_manifest
    from kiln.runtime.prompts import chat_ids, encode
    from kiln.runtime.validation import RequestLimits, validate

    manifest = read_manifest(Path(engine_dir))
    if manifest.encoder_decoder is not None:  # the prompt is the encoder's input: the engine checks its own limits
        check_lengths = False
    limits = RequestLimits(manifest.build.input_len, manifest.build.seq_len, manifest.model.vocab_size)
    prompts = [RunPrompt(list(p), list(p), "") for p in ids]
    if texts:
        from kiln.engine.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(Path(engine_dir))
        encoded = []
        for text in texts:
            try:
                if chat:
                    messages = [{"role": "user", "content": text}]
                    prompt_ids = chat_ids(tokenizer, messages)
                    chat_text = tokenizer.decode(prompt_ids)
                    encoded.append(RunPrompt(prompt_ids, prompt_ids, "", messages, chat_text))
                elif not text and not check_lengths:  # an image prompt without text: the processor makes its ids
                    encoded.append(RunPrompt(text, [], text))
                else:
                    encoded.append(RunPrompt(text, encode(tokenizer, text), text))
            except RequestError as exc:
                raise KilnError(as_flags(str(exc))) from exc
        prompts = encoded + prompts
    for i, p in enumerate(prompts):
        try:
            if check_lengths:
                validate(p.prompt_ids, params, limits)
            elif not p.prompt_ids and p.prompt != "":
                raise RequestError("the prompt is empty")
        except RequestError as exc:
            where = f"prompt {i}: " if len(prompts) > 1 else ""
            raise KilnError(where + as_flags(str(exc))) from exc
    return prompts
