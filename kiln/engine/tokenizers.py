"""The tokenizer and the image processor an engine directory carries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.engine.manifest import PROCESSOR_DIR, TOKENIZER_DIR

if TYPE_CHECKING:
    from kiln.models.vlm import VisionLanguageFamily

# Classes AutoTokenizer resolves to transformers' generic fast tokenizer when the directory names one of them.
_GENERIC = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _generic_class(directory: Path) -> Any:
    """transformers' generic fast tokenizer class when `directory` asks for it and nothing else could change
    AutoTokenizer's choice (no config.json, no remote code), else None.

    Importing it directly skips AutoTokenizer's registry of every model in transformers (about 0.5 s)."""
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("tokenizer_class") not in _GENERIC or "auto_map" in config or (directory / "config.json").exists():
        return None
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # a transformers without it: AutoTokenizer decides
        return None
    return TokenizersBackend


def load_tokenizer(engine_dir: Path) -> Any:
    """A new tokenizer from the engine's tokenizer/ (HF fast tokenizers must not be shared across threads):
    the class AutoTokenizer would load."""
    directory = Path(engine_dir) / TOKENIZER_DIR
    generic = _generic_class(directory)
    if generic is not None:
        return generic.from_pretrained(directory, local_files_only=True, _from_auto=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def load_processor(engine_dir: Path, family: VisionLanguageFamily) -> Any:
    """The engine's processor/, loaded the way its vision-language family loads it."""
    return family.load_processor(Path(engine_dir) / PROCESSOR_DIR)
