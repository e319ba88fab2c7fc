"""Prompts to token ids: plain text, token ids as given, or a conversation through the chat template."""

from __future__ import annotations

from typing import Any

from kiln.errors import RequestError

Prompt = str | list[int]


def is_token_ids(prompt: object) -> bool:
    return isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def encode(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a text prompt (with the tokenizer's special tokens), or the ids given."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt).input_ids)
    if is_token_ids(prompt):
        return list(prompt)
    raise RequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def _render(tokenizer: Any, messages: list[dict[str, Any]], tokenize: bool) -> Any:
    """The checkpoint's chat template applied for the assistant's turn; template errors become RequestError."""
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this checkpoint's tokenizer has no chat template; give a plain prompt instead")
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=tokenize, **({"return_dict": False} if tokenize else {})
        )
    except Exception as exc:  # jinja raises its own errors for conversations a template rejects
        raise RequestError(f"the chat template rejected these messages: {exc}") from exc


def chat_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation through the checkpoint's chat template, ready for the assistant's turn."""
    ids = _render(tokenizer, messages, tokenize=True)
    return [int(t) for t in (ids["input_ids"] if hasattr(ids, "keys") else ids)]


def chat_text(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """A conversation through the chat template as text, for a processor that tokenizes it with images.

    The processor adds the tokenizer's BOS itself, so a BOS the template wrote is dropped here.
    """
    text = str(_render(tokenizer, messages, tokenize=False))
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def untemplated_text(messages: list[dict[str, Any]]) -> str:
    """The prompt of a one-message conversation with an image encoder-decoder model (Donut, Pix2Struct, BLIP-2
    with Flan-T5), whose processor reads the text as it is: no chat template applies."""
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise RequestError("an encoder-decoder model takes no conversation: send one user message")
    return str(messages[0]["content"])
