"""kiln: compile Hugging Face LLMs into ahead-of-time inference engines and run them."""

from kiln.api import LLM, RequestOutput, build
from kiln.config import BuildConfig, RuntimeConfig
from kiln.errors import EngineMismatchError, KilnError, RequestError, UnsupportedModelError
from kiln.lowlevel import InputSpec, build_llm_engine, build_multimodal_engine
from kiln.sampling_params import SamplingParams
from kiln.version import __version__

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
