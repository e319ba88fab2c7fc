import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_checkpoints import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """family name -> path of its tiny checkpoint (made once per test session)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_checkpoint(family, tmp_path_factory.mktemp(f"ckpt-{family}"))
        return made[family]

    return get


@pytest.fixture(scope="session")
def build_once(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Callable[[Path], object]], Path]:
    """name, make -> a directory that `make(directory)` fills once per test run, shared by pytest-xdist's workers.

    A worker that finds it being made waits for it. When `make` raises, nothing is kept: the next worker to ask
    makes it again (and fails the same way, with its own traceback).
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's directory, above each worker's own (popen-gw0, popen-gw1, ...)
    root = base / "shared"
    root.mkdir(exist_ok=True)

    def once(name: str, make: Callable[[Path], object]) -> Path:
        target, done = root / name, root / f"{name}.done"
        with FileLock(str(root / f"{name}.lock")):
            if not done.exists():
                shutil.rmtree(target, ignore_errors=True)
                make(target)
                done.touch()
        return target

    return once


@pytest.fixture(autouse=True)
def _give_back_gpu_memory():
    """On a GPU, hand an engine's memory back as soon as its test ends: an engine's KV pool takes all free
    memory, and one kept alive by a reference cycle or a failed test's traceback would starve the engines
    (in this process or in a `kiln` child process) of every later test."""
    yield
    import torch

    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()
