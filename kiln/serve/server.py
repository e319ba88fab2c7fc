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


def serve(
    engine_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings,
    runtime: RuntimeConfig | None = None,
    shutdown_timeout_s: int = 10,
    log_level: str = "info",
    progress: bool = True,
) -> int:
    """Serve until SIGTERM or SIGINT; returns 0 after a graceful shutdown.

    On the signal the server stops accepting connections, lets in-flight requests finish for up to
    `shutdown_timeout_s` seconds, then cancels the rest (freeing their cache blocks) and exits.
    """
    import uvicorn

    engine = Engine(engine_dir, runtime, progress=Progress(enabled=progress))
    async_engine = AsyncEngine(engine)
    app = create_app(async_engine, settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout_s,
        access_log=log_level == "debug",
    )
    server = uvicorn.Server(config)
    logging.getLogger("kiln.serve").info(
        "serving %s as %r on http://%s:%d", engine_dir, settings.model_name, host, port
    )
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in place that
    # re-raise is a no-op, so a requested shutdown ends the process with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        async_engine.shutdown()
    return 0
