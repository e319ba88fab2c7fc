"""Several choices of one request as they come: merged, collected to the end, or streamed as server-sent
events; a client that hangs up cancels (and so aborts) them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from kiln.serve.async_engine import Delta, RequestFailed
from kiln.serve.http_errors import APIError
from kiln.serve.request_log import record_tokens
from kiln.serve.responses import ChoiceState, usage


async def merge(runs: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
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


async def collect(merged: AsyncIterator[tuple[int, Delta]], states: list[ChoiceState], request: Request) -> None:
    """Gather every choice to the end; a client that hangs up cancels (aborts) them."""

    async def gather() -> None:
        try:
            async for position, delta in merged:
                states[position].add(delta)
        finally:
            await merged.aclose()  # type: ignore[attr-defined]

    work = asyncio.create_task(gather())
    watch = asyncio.create_task(wait_for_disconnect(request))
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


async def wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(
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
                    yield event(
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
                    yield event(chunk(state, delta))
        except RequestFailed as exc:
            yield event({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        finally:
            await merged.aclose()  # type: ignore[attr-defined]
        if include_usage:
            yield event(
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


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
