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
    echo: Echo | None = None  # a completion with `echo`: the prompt, and its log-probs once they come
    # False for echo with max_tokens 0: the one step run for the prompt's log-probs generates nothing shown
    keep_generated: bool = True
    streamed_chars: int = 0  # length of the generated tokens' texts streamed so far (their text_offset)

    def add(self, delta: Delta) -> None:
        if self.echo is not None and delta.prompt_logprobs:
            self.echo.logprobs = list(delta.prompt_logprobs)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason if self.keep_generated else "length"
        if not self.keep_generated:
            return
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)


@dataclass
class Echo:
    """The prompt a completion with `echo` returns before its text: its text, ids, and log-probs (first None)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    streamed: bool = False  # a stream sends the prompt in the choice's first chunk


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


def echo_texts(tokenizer: Any, prompt: Any, encoded: list[list[int]]) -> list[str]:
    """The text `echo` returns for each prompt: the prompt as sent, or the decoded ids of a token prompt."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [str(tokenizer.decode(encoded[0]))]
    return [p if isinstance(p, str) else str(tokenizer.decode(ids)) for p, ids in zip(prompt, encoded)]


# JSON has no -inf: a token the request could not produce (masked by its grammar or logit_bias) is
# reported at this floor, the value OpenAI's API gives such tokens.
LOGPROB_FLOOR = -9999.0


def _json_logprob(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR


def _completion_logprobs(items: list[TokenLogprobs], tokenizer: Any, offset: int) -> dict[str, Any]:
    tokens, values, tops, offsets = [], [], [], []
    for item in items:
        text = _token_text(tokenizer, item.token_id)
        tokens.append(text)
        values.append(_json_logprob(item.logprob))
        tops.append({_token_text(tokenizer, t): _json_logprob(lp) for t, lp in item.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _echo_logprobs(echo: Echo, tokenizer: Any) -> dict[str, Any]:
    """The prompt's entries, as vLLM gives them: the first token's logprob and top_logprobs null, each
    other token's top_logprobs holding the token itself besides the top alternatives."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = 0
    for token_id, item in zip(echo.token_ids, echo.logprobs):
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if item is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(_json_logprob(item.logprob))
        top = {_token_text(tokenizer, t): _json_logprob(lp) for t, lp in item.top}
        top[text] = _json_logprob(item.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _choice_logprobs(state: ChoiceState, tokenizer: Any) -> dict[str, Any]:
    if state.echo is None:
        return _completion_logprobs(state.logprobs, tokenizer, 0)
    prompt = _echo_logprobs(state.echo, tokenizer)
    generated = _completion_logprobs(state.logprobs, tokenizer, len(state.echo.text))
    return {key: prompt[key] + generated[key] for key in prompt}


def completion_chunk(
    request_id: str, created: int, model: str, state: ChoiceState, delta: Delta, tokenizer: Any, logprobs: bool
) -> dict[str, Any]:
    """The chunk of a delta `state` has taken; with `echo`, the choice's first chunk starts with the prompt."""
    text, items = (delta.text, list(delta.logprobs)) if state.keep_generated else ("", [])
    echo = state.echo
    prompt_length = len(echo.text) if echo is not None else 0
    entries = _completion_logprobs(items, tokenizer, prompt_length + state.streamed_chars)
    state.streamed_chars += sum(len(token) for token in entries["tokens"])
    if echo is not None and not echo.streamed:
        echo.streamed = True
        text = echo.text + text
        prompt = _echo_logprobs(echo, tokenizer)
        entries = {key: prompt[key] + entries[key] for key in prompt}
    choice = {
        "index": state.index,
        "text": text,
        "logprobs": entries if logprobs else None,
        "finish_reason": state.finish_reason if delta.finished else None,
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
            "text": s.text if s.echo is None else s.echo.text + s.text,
            "logprobs": _choice_logprobs(s, tokenizer) if logprobs else None,
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
        return {"token": text, "logprob": _json_logprob(logprob), "bytes": list(text.encode("utf-8"))}

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
