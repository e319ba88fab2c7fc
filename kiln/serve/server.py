"""Start the server: load the engine, run uvicorn, shut down gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from kiln.config import RuntimeConfig
from kiln.progress import Progress
from kiln.runtime.engine import Engine
from kiln.serve.app import ServeSettings, create_app
from kiln.serve.async_engine import AsyncEngine
from kiln.serve.port_check import check_port_free
from kiln.serve.request_log import RequestLog
from kiln.serve.throughput_log import ThroughputLog

log = logging.getLogger("kiln.serve")


def serve(
    engine_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings,
    runtime: RuntimeConfig | None = None,
    shutdown_timeout_s: int = 10,
    log_level: str = "info",
    log_interval_s: float = 10.0,
    progress: bool = True,
) -> int:
    """Serve until SIGTERM or SIGINT; returns 0 after a graceful shutdown.

    On the signal the server stops accepting connections, lets in-flight requests finish for up to
    `shutdown_timeout_s` seconds, then cancels the rest (freeing their cache blocks) and exits.
    Each API request is logged in one line; while there is work, a throughput line every
    `log_interval_s` seconds (0: never). The address is checked before the engine loads.
    """
    import uvicorn

    _configure_logging(log_level)
    check_port_free(host, port)
    engine = Engine(engine_dir, runtime, progress=Progress(enabled=progress))
    async_engine = AsyncEngine(engine)
    app = RequestLog(create_app(async_engine, settings))
    throughput = ThroughputLog(async_engine.metrics, log_interval_s)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout_s,
        access_log=log_level == "debug",
    )
    server = uvicorn.Server(config)
    log.info("serving %s as %r on http://%s:%d", engine_dir, settings.model_name, host, port)
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in place that
    # re-raise is a no-op, so a requested shutdown ends the process with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    throughput.start()
    try:
        server.run()
    finally:
        throughput.stop()
        async_engine.shutdown()
    return 0


def _configure_logging(level: str) -> None:
    """kiln.serve's lines go to stderr with a timestamp, like uvicorn's own."""
    if log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s kiln: %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False
