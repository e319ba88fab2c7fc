"""OpenAI request bodies kiln accepts, and their translation into `SamplingParams`.

Unknown fields are refused (a silently ignored option is a wrong answer the user cannot see);
OpenAI fields kiln does not implement are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from kiln.errors import RequestError
from kiln.runtime.validation import EMPTY_TEXT
from kiln.sampling_params import MAX_N, SamplingParams


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility; kiln does not use it
    # Refused when set: OpenAI options kiln does not implement.
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> list[str]:
        return ["logit_bias"] if self.logit_bias else []

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """The request's settings; its `choices()` are the n requests the engine runs."""
        values: dict[str, Any] = {"max_tokens": max_tokens, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs}
        values["n"] = self.n
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        if self.repetition_penalty is not None:
            values["repetition_penalty"] = self.repetition_penalty
        if self.seed is not None:
            values["seed"] = self.seed
        if self.stop is not None:
            values["stop"] = self.stop
        if self.stop_token_ids:
            values["stop_token_ids"] = tuple(self.stop_token_ids)
        values["ignore_eos"] = self.ignore_eos
        values["skip_special_tokens"] = self.skip_special_tokens
        return SamplingParams(**values)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _refuse_empty_text(cls, prompt: Any) -> Any:
        texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
        if any(not text for text in texts):
            raise PydanticCustomError("empty_prompt", EMPTY_TEXT)
        return prompt

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        if self.suffix:
            names.append("suffix")
        if self.best_of is not None and self.best_of != self.n:
            names.append("best_of")
        return names

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0 (lm-eval's loglikelihood): the prompt comes back, nothing is generated."""
        return self.echo and self.max_tokens == 0


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart]
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        for name in ("tools", "tool_choice", "response_format"):
            if getattr(self, name) not in (None, [], "none"):
                names.append(name)
        return names

    @property
    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self, image_token: str | None = None) -> list[dict[str, Any]]:
        """Messages as the chat template expects them: text parts joined, each image as `image_token`."""
        out = []
        for m in self.messages:
            if isinstance(m.content, str):
                text = m.content
            else:
                text = "".join(p.text if isinstance(p, TextPart) else (image_token or "") for p in m.content)
            out.append({"role": m.role, "content": text})
        return out

    def image_urls(self) -> list[str]:
        return [
            p.image_url.url
            for m in self.messages
            if not isinstance(m.content, str)
            for p in m.content
            if isinstance(p, ImagePart)
        ]

    def has_images(self) -> bool:
        return any(
            not isinstance(m.content, str) and any(isinstance(p, ImagePart) for p in m.content) for m in self.messages
        )
