"""One log line per API request: method, path, status, prompt and generated tokens, latency."""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("kiln.serve")

_QUIET_PATHS = ("/health", "/metrics")  # polled by orchestrators and scrapers: not logged


@dataclass
class RequestRecord:
    """Tokens a request's choices took and produced (filled while its deltas stream)."""

    prompt_tokens: dict[int, int] = field(default_factory=dict)  # choice position -> prompt tokens
    generated_tokens: int = 0

    def add(self, position: int, num_prompt_tokens: int, num_new_tokens: int) -> None:
        if num_prompt_tokens:
            self.prompt_tokens[position] = num_prompt_tokens
        self.generated_tokens += num_new_tokens


_current: ContextVar[RequestRecord | None] = ContextVar("kiln_request_record", default=None)


def record_tokens(position: int, num_prompt_tokens: int, num_new_tokens: int) -> None:
    """Count a delta toward the request being handled in this context (no-op outside one)."""
    record = _current.get()
    if record is not None:
        record.add(position, num_prompt_tokens, num_new_tokens)


class RequestLog:
    """ASGI middleware: logs each request when its response has been sent (a stream: when it ends)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _QUIET_PATHS:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        record = RequestRecord()
        token = _current.set(record)
        status = 500  # what the client sees if the app raises before responding

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            _current.reset(token)
            log.info(
                "%s %s %d prompt_tokens=%d generated_tokens=%d choices=%d latency=%.3fs",
                scope["method"],
                scope["path"],
                status,
                sum(record.prompt_tokens.values()),
                record.generated_tokens,
                len(record.prompt_tokens),
                time.perf_counter() - start,
            )
