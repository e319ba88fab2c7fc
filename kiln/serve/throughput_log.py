"""A periodic log line while the server has work: tokens/s generated, running/waiting, KV-cache usage."""

from __future__ import annotations

import logging
import threading
import time

from kiln.serve.metrics import ServerMetrics

log = logging.getLogger("kiln.serve")


class ThroughputLog:
    """Every `interval_s` seconds, one line from the server's metrics (the engine thread sets them from
    `Engine.stats()`); quiet while nothing runs, waits or was generated since the last line."""

    def __init__(self, metrics: ServerMetrics, interval_s: float) -> None:
        self._metrics, self._interval_s = metrics, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-throughput-log", daemon=True)

    def start(self) -> None:
        if self._interval_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._interval_s + 1.0)

    def _sample(self, name: str) -> float:
        return self._metrics.registry.get_sample_value(name) or 0.0

    def _run(self) -> None:
        last_tokens, last_time = self._sample("kiln_generation_tokens_total"), time.perf_counter()
        while not self._stop.wait(self._interval_s):
            tokens, now = self._sample("kiln_generation_tokens_total"), time.perf_counter()
            running = int(self._sample("kiln_requests_running"))
            waiting = int(self._sample("kiln_requests_waiting"))
            generated = tokens - last_tokens
            if generated or running or waiting:
                log.info(
                    "throughput: %.1f tokens/s generated, %d running, %d waiting, KV cache %.1f%% used",
                    generated / (now - last_time),
                    running,
                    waiting,
                    100.0 * self._sample("kiln_kv_cache_usage_ratio"),
                )
            last_tokens, last_time = tokens, now
