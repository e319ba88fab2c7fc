"""kiln: compile Hugging Face LLMs into ahead-of-time inference engines and run them.

The names below are imported when first used, so that `import kiln` (and `kiln --help`,
`kiln --version`) does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kiln.version import __version__

_HOMES = {
    "LLM": "kiln.api",
    "RequestOutput": "kiln.api",
    "build": "kiln.api",
    "build_llm_engine": "kiln.lowlevel",
    "build_multimodal_engine": "kiln.lowlevel",
    "InputSpec": "kiln.lowlevel",
    "BuildConfig": "kiln.config",
    "RuntimeConfig": "kiln.config",
    "SamplingParams": "kiln.sampling_params",
    "KilnError": "kiln.errors",
    "RequestError": "kiln.errors",
    "EngineMismatchError": "kiln.errors",
    "UnsupportedModelError": "kiln.errors",
}

__all__ = [
    "LLM",
    "RequestOutput",
    "build",
    "build_llm_engine",
    "build_multimodal_engine",
    "InputSpec",
    "BuildConfig",
    "RuntimeConfig",
    "SamplingParams",
    "KilnError",
    "RequestError",
    "EngineMismatchError",
    "UnsupportedModelError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kiln' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


if TYPE_CHECKING:
    from kiln.api import LLM, RequestOutput, build
    from kiln.config import BuildConfig, RuntimeConfig
    from kiln.errors import EngineMismatchError, KilnError, RequestError, UnsupportedModelError
    from kiln.lowlevel import InputSpec, build_llm_engine, build_multimodal_engine
    from kiln.sampling_params import SamplingParams
