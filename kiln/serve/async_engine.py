"""Runs an `Engine` on its own thread and streams each request's progress to asyncio tasks.

The engine is not thread-safe, so one thread owns it: it takes commands (add, abort) from a queue,
steps while any request is unfinished, and hands each request's new tokens to its asyncio queue
through the event loop. A step that raises fails the requests it was running (their clients get an
error) and frees their blocks; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import KilnError, RequestError
from kiln.runtime.engine import Engine
from kiln.runtime.output_processor import StepUpdate
from kiln.runtime.sampler import TokenLogprobs
from kiln.runtime.validation import Request
from kiln.serve.metrics import ServerMetrics

log = logging.getLogger("kiln.serve")


@dataclass(frozen=True)
class Delta:
    """What one request gained in one step (a snapshot: safe to read on another thread)."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[TokenLogprobs, ...] = ()
    # The prompt's log-probs (SamplingParams.prompt_logprobs), in the request's first delta only.
    prompt_logprobs: tuple[TokenLogprobs | None, ...] = ()
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class ServerStopping(KilnError):
    """The server is shutting down and takes no new requests."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    last_token_time: float | None = None


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None, *, idle_poll_s: float = 0.5) -> None:
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}  # owned by the engine thread
        self._accepting = True
        self._stop = threading.Event()
        self._idle_poll_s = idle_poll_s
        self._prefix_seen = (0, 0)
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()
        self._in_flight = 0  # touched only on the event loop

    # ---- asyncio side ----------------------------------------------------------------------------

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    async def generate(self, request: Request, request_id: str) -> AsyncIterator[Delta]:
        """Yield the deltas of a request (from `Engine.validate`) until it finishes. Leaving early aborts it."""
        if not self._accepting:
            raise ServerStopping("the server is shutting down and takes no new requests")
        stream = _Stream(asyncio.get_running_loop())
        self._in_flight += 1
        self._send("add", (request_id, request, stream))
        finished = False
        try:
            while True:
                delta = await stream.queue.get()
                if delta.error is not None:
                    finished = True
                    raise RequestFailed(delta.error)
                yield delta
                if delta.finished:
                    finished = True
                    return
        finally:
            self._in_flight -= 1
            if not finished:
                self._send("abort", request_id)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Refuse new requests, end those in flight (reason "abort"), and stop the engine thread."""
        self._accepting = False
        self._send("abort_all", None)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def _send(self, command: str, payload: Any) -> None:
        self._commands.put((command, payload))
        self._wake.set()

    # ---- engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            self._drain_commands()
            if self._stop.is_set() and not self._streams:
                return
            if not engine.has_unfinished():
                self._update_gauges()
                self._wake.wait(self._idle_poll_s)
                self._wake.clear()
                continue
            try:
                updates = engine.step()
            except Exception as exc:  # noqa: BLE001 - a failed step must not take the server down
                log.exception("engine step failed; failing the requests it was running")
                self._fail_running(f"the engine failed while running this request: {type(exc).__name__}: {exc}")
                continue
            self._publish(updates)
            self._update_gauges()

    def _drain_commands(self) -> None:
        while True:
            try:
                command, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                self._add(*payload)
            elif command == "abort":
                self._abort(payload, "abort")
            elif command == "abort_all":
                for request_id in list(self._streams):
                    self._abort(request_id, "abort")

    def _add(self, request_id: str, request: Request, stream: _Stream) -> None:
        try:
            seq = self.engine.add_request(request, request_id)
        except RequestError as exc:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, Delta(error=str(exc)))
            return
        seq.arrival_time = stream.arrival
        self._streams[request_id] = stream
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))

    def _abort(self, request_id: str, reason: str) -> None:
        stream = self._streams.pop(request_id, None)
        seq = self.engine.abort(request_id)
        if stream is None:
            return
        self.metrics.finished(reason, stream.arrival)
        prompt = len(seq.prompt_ids) if seq is not None else 0
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, Delta(finish_reason=reason, num_prompt_tokens=prompt))

    def _fail_running(self, message: str) -> None:
        for request_id in self.engine.running_request_ids():
            stream = self._streams.pop(request_id, None)
            self.engine.abort(request_id)
            if stream is not None:
                self.metrics.finished("error", stream.arrival)
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, Delta(error=message))

    def _publish(self, updates: list[StepUpdate]) -> None:
        now = time.perf_counter()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Delta]]] = {}
        for update in updates:
            seq = update.seq
            stream = self._streams.get(seq.request_id)
            if stream is None:
                continue
            n = len(update.new_token_ids)
            first = stream.last_token_time is None  # the request's first delta carries its prompt's log-probs
            if stream.last_token_time is None:
                self.metrics.time_to_first_token.observe(now - stream.arrival)
            else:
                self.metrics.inter_token_latency.observe(now - stream.last_token_time)
            stream.last_token_time = now
            self.metrics.generation_tokens.inc(n)
            delta = Delta(
                token_ids=tuple(update.new_token_ids),
                text=update.delta_text,
                logprobs=tuple(seq.logprobs[-n:]) if seq.params.logprobs is not None else (),
                prompt_logprobs=tuple(seq.prompt_logprobs) if first and seq.prompt_logprobs is not None else (),
                finish_reason=seq.finish_reason if update.finished else None,
                stop_reason=seq.stop_reason if update.finished else None,
                num_prompt_tokens=len(seq.prompt_ids),
                num_cached_tokens=seq.num_cached_tokens,
            )
            if update.finished:
                del self._streams[seq.request_id]
                self.metrics.finished(seq.finish_reason or "stop", stream.arrival)
            by_loop.setdefault(stream.loop, []).append((stream, delta))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _update_gauges(self) -> None:
        stats = self.engine.stats()
        self.metrics.observe(stats, self._prefix_seen)
        self._prefix_seen = (stats.prefix_query_tokens, stats.prefix_hit_tokens)


class RequestFailed(KilnError):
    """The engine failed while running a request (not the request's fault)."""


def _deliver(items: list[tuple[_Stream, Delta]]) -> None:
    for stream, delta in items:
        stream.queue.put_nowait(delta)
