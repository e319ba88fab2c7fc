"""OpenAI request bodies kiln accepts, and their translation into `SamplingParams`.

Unknown fields are refused (a silently ignored option is a wrong answer the user cannot see);
OpenAI fields kiln does not implement are refused by name. Fields that cannot change the output
(`NO_EFFECT_FIELDS`: bookkeeping such as `store` or `user`) are accepted, and the server logs them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from kiln.errors import RequestError
from kiln.runtime.validation import EMPTY_TEXT
from kiln.sampling_params import MAX_N, SamplingParams

# Accepted and logged, never used: they change nothing kiln generates.
NO_EFFECT_FIELDS = ("store", "metadata", "parallel_tool_calls", "user", "service_tier")
_NO_EFFECT = "Accepted for compatibility and logged; it changes nothing kiln generates"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextFormat(BaseModel):
    """Plain text: no constraint."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    """Any one JSON object."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    """OpenAI's json_schema: the output is JSON valid against `schema` (any JSON object without one).

    The schema is always enforced in full, so `strict` changes nothing."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


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
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (a string of digits) -> bias in [-100, 100] added to its logit"
    )
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object (any JSON object) or json_schema (JSON valid against its schema)"
    )
    guided_json: dict[str, Any] | str | None = Field(
        None, description="vLLM's field: a JSON schema (or its text) the output must be valid against"
    )
    guided_regex: str | None = Field(None, description="vLLM's field: a regular expression the whole output matches")
    # Accepted for compatibility and logged; kiln does not use them (NO_EFFECT_FIELDS).
    store: bool | None = Field(None, description=_NO_EFFECT)
    metadata: dict[str, str] | None = Field(None, description=_NO_EFFECT)
    parallel_tool_calls: bool | None = Field(None, description=_NO_EFFECT)
    user: str | None = Field(None, description=_NO_EFFECT)
    service_tier: str | None = Field(None, description=_NO_EFFECT)

    def unsupported(self) -> list[str]:
        return []

    def no_effect_fields(self) -> list[str]:
        """The fields in NO_EFFECT_FIELDS this request set (for the server's log line)."""
        return [name for name in NO_EFFECT_FIELDS if name in self.model_fields_set]

    def guided_fields(self) -> dict[str, Any]:
        """`SamplingParams`' guided_json / guided_regex from response_format or vLLM's fields."""
        fmt = self.response_format
        constrained = fmt is not None and not isinstance(fmt, TextFormat)
        if constrained and (self.guided_json is not None or self.guided_regex is not None):
            raise RequestError("give response_format or guided_json / guided_regex, not both")
        if isinstance(fmt, JsonObjectFormat):
            return {"guided_json": "object"}
        if isinstance(fmt, JsonSchemaFormat):
            schema = fmt.json_schema.schema_
            return {"guided_json": "object" if schema is None else schema}
        return {"guided_json": self.guided_json, "guided_regex": self.guided_regex}

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
        values["logit_bias"] = self.logit_bias
        values.update(self.guided_fields())
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


class VideoURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    num_frames: int | None = Field(default=None, ge=1)  # kiln's own: frames sampled evenly (default: the model's)


class VideoPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["video_url"]
    video_url: VideoURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart | VideoPart]
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        for name in ("tools", "tool_choice"):
            if getattr(self, name) not in (None, [], "none"):
                names.append(name)
        return names

    @property
    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self, image_token: str | None = None, video_token: str | None = None) -> list[dict[str, Any]]:
        """Messages as the chat template expects them: text parts joined, each image as `image_token`, each
        video as `video_token`."""
        out = []
        for m in self.messages:
            if isinstance(m.content, str):
                text = m.content
            else:
                text = "".join(
                    p.text
                    if isinstance(p, TextPart)
                    else (image_token if isinstance(p, ImagePart) else video_token) or ""
                    for p in m.content
                )
            out.append({"role": m.role, "content": text})
        return out

    def video_parts(self) -> list[VideoURL]:
        return [
            p.video_url
            for m in self.messages
            if not isinstance(m.content, str)
            for p in m.content
            if isinstance(p, VideoPart)
        ]

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

    def has_media(self) -> bool:
        """Images or videos."""
        return any(
            not isinstance(m.content, str) and any(not isinstance(p, TextPart) for p in m.content)
            for m in self.messages
        )
