"""OpenAI response bodies and stream chunks, built from the deltas each choice received."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.sampler import TokenLogprobs
from kiln.serve.async_engine import Delta


@dataclass
class ChoiceState:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


def usage(states: list[ChoiceState], prompt_tokens: int) -> dict[str, Any]:
    completion = sum(len(s.token_ids) for s in states)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": max((s.num_cached_tokens for s in states), default=0)},
    }


def _token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


# ---- /v1/completions ----------------------------------------------------------------------------------


def _completion_logprobs(items: list[TokenLogprobs], tokenizer: Any, offset: int) -> dict[str, Any]:
    tokens, values, tops, offsets = [], [], [], []
    for item in items:
        text = _token_text(tokenizer, item.token_id)
        tokens.append(text)
        values.append(item.logprob)
        tops.append({_token_text(tokenizer, t): lp for t, lp in item.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def completion_chunk(
    request_id: str, created: int, model: str, state: ChoiceState, delta: Delta, tokenizer: Any, logprobs: bool
) -> dict[str, Any]:
    offset = len(state.text) - len(delta.text)
    choice = {
        "index": state.index,
        "text": delta.text,
        "logprobs": _completion_logprobs(list(delta.logprobs), tokenizer, offset) if logprobs else None,
        "finish_reason": delta.finish_reason,
    }
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def completion_response(
    request_id: str,
    created: int,
    model: str,
    states: list[ChoiceState],
    prompt_tokens: int,
    tokenizer: Any,
    logprobs: bool,
) -> dict[str, Any]:
    choices = [
        {
            "index": s.index,
            "text": s.text,
            "logprobs": _completion_logprobs(s.logprobs, tokenizer, 0) if logprobs else None,
            "finish_reason": s.finish_reason,
        }
        for s in states
    ]
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(states, prompt_tokens),
    }


# ---- /v1/chat/completions -----------------------------------------------------------------------------


def _chat_logprobs(items: list[TokenLogprobs], tokenizer: Any) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(item.token_id, item.logprob), "top_logprobs": [entry(t, lp) for t, lp in item.top]}
            for item in items
        ]
    }


def chat_chunk(
    request_id: str, created: int, model: str, state: ChoiceState, delta: Delta, tokenizer: Any, logprobs: bool
) -> dict[str, Any]:
    choice = {
        "index": state.index,
        "delta": {"content": delta.text} if delta.text or not delta.finished else {},
        "logprobs": _chat_logprobs(list(delta.logprobs), tokenizer) if logprobs else None,
        "finish_reason": delta.finish_reason,
    }
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def chat_response(
    request_id: str,
    created: int,
    model: str,
    states: list[ChoiceState],
    prompt_tokens: int,
    tokenizer: Any,
    logprobs: bool,
) -> dict[str, Any]:
    choices = [
        {
            "index": s.index,
            "message": {"role": "assistant", "content": s.text},
            "logprobs": _chat_logprobs(s.logprobs, tokenizer) if logprobs else None,
            "finish_reason": s.finish_reason,
        }
        for s in states
    ]
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(states, prompt_tokens),
    }
