"""`/tokenize`, `/detokenize` and `/tokenizer_info`, in vLLM's request and response shapes.

Clients such as lm-evaluation-harness use them to count and split text with the served model's own
tokenizer instead of loading it themselves. `/tokenizer_info` returns the tokenizer's configuration
(its `tokenizer_config.json` settings, special tokens as text, and the chat template).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict

from kiln.errors import RequestError
from kiln.serve.protocol import ChatMessage, TextPart


class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


def _chat_ids(tokenizer: Any, body: TokenizeChatRequest) -> list[int]:
    if body.add_generation_prompt and body.continue_final_message:
        raise RequestError("add_generation_prompt and continue_final_message cannot both be true")
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this checkpoint's tokenizer has no chat template; tokenize a plain prompt instead")
    messages = []
    for m in body.messages:
        if not isinstance(m.content, str) and not all(isinstance(p, TextPart) for p in m.content):
            raise RequestError("/tokenize takes text messages only")
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)  # type: ignore[union-attr]
        messages.append({"role": m.role, "content": text})
    try:
        text = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            tokenize=False,
        )
    except Exception as exc:  # jinja raises its own errors for conversations a template rejects
        raise RequestError(f"the chat template rejected these messages: {exc}") from exc
    return list(tokenizer(str(text), add_special_tokens=body.add_special_tokens).input_ids)


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's configuration as JSON: init settings, special tokens as text, chat template."""
    info: dict[str, Any] = {}
    for key, value in getattr(tokenizer, "init_kwargs", {}).items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            info[key] = value
        elif hasattr(value, "content"):  # an AddedToken
            info[key] = str(value.content)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        info[name] = getattr(tokenizer, name, None)
    info["chat_template"] = getattr(tokenizer, "chat_template", None)
    info["model_max_length"] = getattr(tokenizer, "model_max_length", None)
    info["tokenizer_class"] = type(tokenizer).__name__
    return info


def tokenization_router(tokenizer: Any, max_model_len: int, check_api_key: Callable[..., Any]) -> APIRouter:
    """The three routes, served with `tokenizer` (the event loop's own) and behind `check_api_key`."""
    router = APIRouter(dependencies=[Depends(check_api_key)])

    @router.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
        if isinstance(body, TokenizeChatRequest):
            ids = _chat_ids(tokenizer, body)
        else:
            ids = list(tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids)
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        vocab = len(tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token ids outside the vocabulary [0, {vocab}): {bad[:8]}")
        return {"prompt": str(tokenizer.decode(body.tokens))}

    @router.get("/tokenizer_info")
    async def info() -> dict[str, Any]:
        return tokenizer_info(tokenizer)

    return router
