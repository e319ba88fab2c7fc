"""The OpenAI-compatible HTTP app: routes, errors in OpenAI's shape, API key and body-size guards."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.errors import RequestError
from kiln.runtime.engine import Engine
from kiln.runtime.prompts import chat_ids, chat_text, encode, untemplated_text
from kiln.runtime.validation import Request as EngineRequest
from kiln.sampling_params import SamplingParams
from kiln.serve.async_engine import AsyncEngine, Delta, ServerStopping
from kiln.serve.http_errors import APIError, BodyLimit, describe_validation, error_response
from kiln.serve.images import image_sources
from kiln.serve.openapi import ERROR_RESPONSES, describe_limits
from kiln.serve.protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields
from kiln.serve.responses import (
    ChoiceState,
    Echo,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    echo_texts,
)
from kiln.serve.streaming import collect, merge, sse
from kiln.serve.tokenization import tokenization_router
from kiln.serve.video import video_sources

log = logging.getLogger("kiln.serve")


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    allow_image_urls: bool = False  # let clients have the server download http(s) images


def create_app(engine: AsyncEngine, settings: ServeSettings) -> FastAPI:
    core = engine.engine
    limits = core.build
    # The engine thread detokenizes with the engine's tokenizer; requests are tokenized on the event
    # loop with this one (HF fast tokenizers fail when one instance is used from two threads).
    tokenizer = core.load_tokenizer()
    vision_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-vision")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()
        vision_worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kiln", lifespan=lifespan)
    takes_videos = core.multimodal is not None and core.multimodal.video_token is not None
    describe_limits(
        app, settings.model_name, core.limits, takes_images=core.multimodal is not None, takes_videos=takes_videos
    )
    started = int(time.time())
    metrics = engine.metrics

    # ---- errors in OpenAI's shape -------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.rejected.labels(status=str(exc.status)).inc()
        return error_response(exc.status, exc.message, type_=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        metrics.rejected.labels(status="400").inc()
        return error_response(400, str(exc))

    @app.exception_handler(ServerStopping)
    async def _stopping(request: Request, exc: ServerStopping) -> JSONResponse:
        return error_response(503, str(exc), type_="server_error", code="shutting_down")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.rejected.labels(status="400").inc()
        message, param = describe_validation(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    # ---- guards -----------------------------------------------------------------------------------------

    async def check_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), settings.api_key):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def check_request(body: _SamplingFields) -> None:
        if body.model != settings.model_name:
            raise APIError(
                404,
                f"model {body.model!r} is not served here; this server serves {settings.model_name!r}",
                param="model",
                code="model_not_found",
            )
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(400, f"kiln does not support {', '.join(unsupported)}", param=unsupported[0])
        ignored = body.no_effect_fields()
        if ignored:
            log.info("accepted and ignored (they change nothing kiln generates): %s", ", ".join(ignored))

    def max_tokens_for(requested: int | None, prompt_ids: list[int], mm: Any = None) -> int:
        # an encoder-decoder engine's prompt is its encoder input; its decoder's tokens start with the start tokens
        # (Mllama's decoder takes the prompt after its image rows' placeholders)
        encdec = core.encoder_decoder
        decoder_len = len(encdec.decoder_prefix) if encdec is not None else len(prompt_ids)
        if encdec is not None and encdec.decoder_prompt:
            decoder_len = len(prompt_ids) - (0 if mm is None else int((mm.rows >= 0).sum()))
        room = limits.seq_len - decoder_len
        if requested is None:
            if room < 1:
                raise RequestError(f"the prompt fills this engine's max_seq_len ({limits.seq_len}); shorten it")
            return room
        return requested

    # ---- routes -----------------------------------------------------------------------------------------

    app.include_router(tokenization_router(tokenizer, limits.seq_len, check_api_key))

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return error_response(503, "the engine thread has stopped", type_="server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(check_api_key)], responses=ERROR_RESPONSES)
    async def models() -> dict[str, Any]:
        card = {
            "id": settings.model_name,
            "object": "model",
            "created": started,
            "owned_by": "kiln",
            "max_model_len": limits.seq_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=[Depends(check_api_key)], responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_request(body)
        prompts = _encode_prompts(tokenizer, body.prompt)
        jobs = []  # (choice index, prompt index, prompt ids, params)
        # echo with logprobs scores the prompt; with max_tokens 0 one token is generated, then dropped
        prompt_logprobs = body.logprobs if body.echo else None
        max_tokens = 1 if body.echo_only else body.max_tokens
        for p, ids in enumerate(prompts):
            params = body.sampling_params(max_tokens_for(max_tokens, ids), body.logprobs, prompt_logprobs)
            for i, choice in enumerate(params.choices()):
                jobs.append((p * body.n + i, p, ids, choice))
        # every prompt is checked (once) before any runs
        checked = [
            _validate(core, ids, params, None, f"prompt {p}: " if len(prompts) > 1 else "")
            for _, p, ids, params in jobs
        ]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        states = [ChoiceState(index, keep_generated=not body.echo_only) for index, *_ in jobs]
        if body.echo:
            texts = echo_texts(tokenizer, body.prompt, prompts)
            for state, (_, p, ids, _) in zip(states, jobs):
                state.echo = Echo(texts[p], list(ids))
        runs = [engine.generate(req, f"{request_id}-{index}") for (index, *_), req in zip(jobs, checked)]
        prompt_tokens = sum(len(ids) for ids in prompts)
        want_logprobs = body.logprobs is not None

        def chunk(state: ChoiceState, delta: Delta) -> dict[str, Any]:
            return completion_chunk(request_id, created, settings.model_name, state, delta, tokenizer, want_logprobs)

        if body.stream:
            return sse(
                merge(runs),
                states,
                chunk,
                request_id,
                created,
                settings.model_name,
                prompt_tokens,
                body.stream_options is not None and body.stream_options.include_usage,
                "text_completion",
            )
        await collect(merge(runs), states, request)
        return JSONResponse(
            completion_response(
                request_id, created, settings.model_name, states, prompt_tokens, tokenizer, want_logprobs
            )
        )

    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)], responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_request(body)
        mm = None
        if body.has_media():
            pipeline = core.multimodal
            if pipeline is None:
                what = "images" if body.has_images() else "videos"
                raise APIError(
                    400, f"this engine takes no {what}: it was built from a text-only checkpoint", param="messages"
                )
            sources = await image_sources(
                body.image_urls(), allow_http=settings.allow_image_urls, max_bytes=settings.max_body_bytes
            )
            parts = body.video_parts()
            videos = await video_sources(
                [p.url for p in parts], allow_http=settings.allow_image_urls, max_bytes=settings.max_body_bytes
            )
            frames = {p.num_frames for p in parts if p.num_frames is not None}
            if len(frames) > 1:
                raise APIError(400, "the videos of one request must ask for the same num_frames", param="messages")
            messages = body.template_messages(pipeline.image_token, pipeline.video_token)
            encdec = core.encoder_decoder
            if encdec is not None and not encdec.decoder_prompt:  # not a chat model: the processor reads the text
                text = untemplated_text(messages)
            else:
                text = chat_text(tokenizer, messages)
            # Images and videos are decoded and encoded on one worker thread of their own (the processor's
            # tokenizer must not be shared across threads), off the event loop.
            loop = asyncio.get_running_loop()
            media = (text, sources, videos, next(iter(frames), None))
            (prepared,) = await loop.run_in_executor(vision_worker, pipeline.prepare, [media])
            ids, mm = prepared.prompt_ids, prepared.mm
        else:
            ids = chat_ids(tokenizer, body.template_messages())
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = body.requested_logprobs
        jobs = list(enumerate(body.sampling_params(max_tokens_for(requested, ids, mm), top).choices()))
        checked = [_validate(core, ids, params, mm, "") for _, params in jobs]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        states = [ChoiceState(i) for i, _ in jobs]
        runs = [engine.generate(req, f"{request_id}-{i}") for (i, _), req in zip(jobs, checked)]

        def chunk(state: ChoiceState, delta: Delta) -> dict[str, Any]:
            return chat_chunk(request_id, created, settings.model_name, state, delta, tokenizer, top is not None)

        if body.stream:
            return sse(
                merge(runs),
                states,
                chunk,
                request_id,
                created,
                settings.model_name,
                len(ids),
                body.stream_options is not None and body.stream_options.include_usage,
                "chat.completion.chunk",
            )
        await collect(merge(runs), states, request)
        return JSONResponse(
            chat_response(request_id, created, settings.model_name, states, len(ids), tokenizer, top is not None)
        )

    return BodyLimit(app, settings.max_body_bytes)  # type: ignore[return-value]


# ---- helpers -----------------------------------------------------------------------------------------


def _encode_prompts(tokenizer: Any, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [encode(tokenizer, prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise RequestError("the prompt is empty")
    return [encode(tokenizer, p) for p in prompt]


def _validate(core: Engine, ids: list[int], params: SamplingParams, mm: Any, prefix: str) -> EngineRequest:
    """The request as the engine takes it; a RequestError (a 400) names the prompt when there are several."""
    try:
        return core.validate(ids, params, mm)
    except RequestError as exc:
        raise RequestError(f"{prefix}{exc}") from exc
