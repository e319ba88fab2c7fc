"""The OpenAI-compatible HTTP app: routes, errors in OpenAI's shape, API key and body-size guards."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.errors import RequestError
from kiln.runtime.engine import Engine
from kiln.runtime.prompts import chat_ids, chat_text, encode
from kiln.runtime.validation import Request as EngineRequest
from kiln.sampling_params import SamplingParams
from kiln.serve.async_engine import AsyncEngine, Delta, RequestFailed, ServerStopping
from kiln.serve.images import image_sources
from kiln.serve.openapi import ERROR_RESPONSES, describe_limits
from kiln.serve.protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields
from kiln.serve.request_log import record_tokens
from kiln.serve.responses import (
    ChoiceState,
    Echo,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    echo_texts,
    usage,
)
from kiln.serve.tokenization import tokenization_router


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    allow_image_urls: bool = False  # let clients have the server download http(s) images


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413 before the app reads them (chunked bodies too)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, f"the request body is larger than this server accepts ({self.max_bytes} bytes)", code="body_too_large"
        )
        await response(scope, receive, send)


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
    describe_limits(app, settings.model_name, core.limits, takes_images=core.multimodal is not None)
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
        message, param = _describe_validation(exc)
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

    def max_tokens_for(requested: int | None, prompt_ids: list[int]) -> int:
        room = limits.seq_len - len(prompt_ids)
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
            for i in range(body.n):
                params = body.sampling_params(max_tokens_for(max_tokens, ids), body.logprobs, i, prompt_logprobs)
                jobs.append((p * body.n + i, p, ids, params))
        # every prompt is checked (once) before any runs
        checked = [
            _validate(core, ids, params, None, f"prompt {p}: " if len(prompts) > 1 else "")
            for _, p, ids, params in jobs
        ]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        states = [ChoiceState(index) for index, *_ in jobs]
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
            return _sse(
                _merge(runs),
                states,
                chunk,
                request_id,
                created,
                settings.model_name,
                prompt_tokens,
                body.stream_options is not None and body.stream_options.include_usage,
                "text_completion",
            )
        await _collect(_merge(runs), states, request)
        if body.echo_only:
            for state in states:
                state.discard_generated()
        return JSONResponse(
            completion_response(
                request_id, created, settings.model_name, states, prompt_tokens, tokenizer, want_logprobs
            )
        )

    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)], responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_request(body)
        mm = None
        if body.has_images():
            pipeline = core.multimodal
            if pipeline is None:
                raise APIError(
                    400, "this engine takes no images: it was built from a text-only checkpoint", param="messages"
                )
            sources = await image_sources(
                body.image_urls(), allow_http=settings.allow_image_urls, max_bytes=settings.max_body_bytes
            )
            text = chat_text(tokenizer, body.template_messages(pipeline.image_token))
            # Images are decoded and encoded on one worker thread of their own (the processor's tokenizer
            # must not be shared across threads), off the event loop.
            loop = asyncio.get_running_loop()
            (prepared,) = await loop.run_in_executor(vision_worker, pipeline.prepare, [(text, sources)])
            ids, mm = prepared.prompt_ids, prepared.mm
        else:
            ids = chat_ids(tokenizer, body.template_messages())
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = body.requested_logprobs
        jobs = [(i, body.sampling_params(max_tokens_for(requested, ids), top, i)) for i in range(body.n)]
        checked = [_validate(core, ids, params, mm, "") for _, params in jobs]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        states = [ChoiceState(i) for i, _ in jobs]
        runs = [engine.generate(req, f"{request_id}-{i}") for (i, _), req in zip(jobs, checked)]

        def chunk(state: ChoiceState, delta: Delta) -> dict[str, Any]:
            return chat_chunk(request_id, created, settings.model_name, state, delta, tokenizer, top is not None)

        if body.stream:
            return _sse(
                _merge(runs),
                states,
                chunk,
                request_id,
                created,
                settings.model_name,
                len(ids),
                body.stream_options is not None and body.stream_options.include_usage,
                "chat.completion.chunk",
            )
        await _collect(_merge(runs), states, request)
        return JSONResponse(
            chat_response(request_id, created, settings.model_name, states, len(ids), tokenizer, top is not None)
        )

    return BodyLimit(app, settings.max_body_bytes)  # type: ignore[return-value]


# ---- helpers -----------------------------------------------------------------------------------------


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "the request is not valid", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return f"unknown field {param!r}: kiln does not accept it", param
    if first.get("type") == "missing":
        return f"the field {param!r} is required", param
    where = f"{param}: " if param else ""
    return f"{where}{first.get('msg', 'invalid value')} (got {first.get('input')!r})"[:500], param


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


async def _merge(runs: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several choices' deltas; leaving early cancels (and so aborts) the unfinished ones."""
    out: asyncio.Queue[tuple[int, Delta] | BaseException | None] = asyncio.Queue()

    async def pump(position: int, run: AsyncIterator[Delta]) -> None:
        try:
            async for delta in run:
                record_tokens(position, delta.num_prompt_tokens, len(delta.token_ids))
                out.put_nowait((position, delta))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            out.put_nowait(exc)
            return
        finally:
            await run.aclose()  # type: ignore[attr-defined]
        out.put_nowait(None)

    tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await out.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(merged: AsyncIterator[tuple[int, Delta]], states: list[ChoiceState], request: Request) -> None:
    """Gather every choice to the end; a client that hangs up cancels (aborts) them."""

    async def gather() -> None:
        try:
            async for position, delta in merged:
                states[position].add(delta)
        finally:
            await merged.aclose()  # type: ignore[attr-defined]

    work = asyncio.create_task(gather())
    watch = asyncio.create_task(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if work in done:
        exc = work.exception()
        if isinstance(exc, RequestFailed):
            raise APIError(500, str(exc), type_="server_error")
        if exc is not None:
            raise exc
    else:
        await asyncio.gather(work, return_exceptions=True)
        raise APIError(499, "the client closed the connection")


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(
    merged: AsyncIterator[tuple[int, Delta]],
    states: list[ChoiceState],
    chunk: Callable[[ChoiceState, Delta], dict[str, Any]],
    request_id: str,
    created: int,
    model: str,
    prompt_tokens: int,
    include_usage: bool,
    obj: str,
) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            if obj == "chat.completion.chunk":
                for state in states:
                    yield _event(
                        {
                            "id": request_id,
                            "object": obj,
                            "created": created,
                            "model": model,
                            "choices": [
                                {
                                    "index": state.index,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
            async for position, delta in merged:
                state = states[position]
                state.add(delta)
                if delta.token_ids or delta.text or delta.finished:
                    yield _event(chunk(state, delta))
        except RequestFailed as exc:
            yield _event({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        finally:
            await merged.aclose()  # type: ignore[attr-defined]
        if include_usage:
            yield _event(
                {
                    "id": request_id,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage(states, prompt_tokens),
                }
            )
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
