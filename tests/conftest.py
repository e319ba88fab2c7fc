import os
import sys
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
