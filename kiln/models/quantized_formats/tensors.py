"""Raw tensors of a checkpoint directory, read by name from its safetensors files (no model built)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointTensors:
    """Every tensor name of the directory's *.safetensors files, and each tensor on demand."""

    def __init__(self, path: Path) -> None:
        self._file: dict[str, Path] = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    self._file[name] = file

    def names(self) -> list[str]:
        return list(self._file)

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self._file[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def prefixes(self, suffix: str) -> list[str]:
        """The module names that own a tensor called `<module>.<suffix>`, in file order."""
        tail = "." + suffix
        return [name[: -len(tail)] for name in self._file if name.endswith(tail)]
