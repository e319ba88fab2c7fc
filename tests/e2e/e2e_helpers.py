"""What the end-to-end tests share: the repository paths and a `kiln` command runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo" / "tiny-kiln"

# On a GPU an engine's KV pool takes all the memory it finds free; tests hold a server and an engine in
# this process (or two engines) at once, so each takes a quarter of what is free. CPU engines ignore it.
SHARED_GPU = {"kv_cache_memory_fraction": 0.25}
SHARED_GPU_ARGS = ("--kv-cache-memory-fraction", "0.25")


def kiln(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`kiln serve` in a child process, as a user starts it; waits until /health answers."""

    def __init__(self, engine: Path, *args: str, startup_timeout_s: float = 240.0) -> None:
        import os
        import tempfile
        import time

        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln", "serve", str(engine), "--port", str(self.port), *SHARED_GPU_ARGS, *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"kiln serve exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"kiln serve did not come up in {startup_timeout_s} s:\n{self.output()[-3000:]}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def metrics(self) -> dict[str, float]:
        """The Prometheus samples without labels, plus labelled ones as name{labels}."""
        import httpx

        values: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def stop(self, timeout_s: float = 60.0) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
