"""The tokenizer and the image processor an engine directory carries."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.engine.manifest import PROCESSOR_DIR, TOKENIZER_DIR

if TYPE_CHECKING:
    from kiln.models.vlm import VisionLanguageFamily


def load_tokenizer(engine_dir: Path) -> Any:
    """A new tokenizer from the engine's tokenizer/ (HF fast tokenizers must not be shared across threads)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(engine_dir) / TOKENIZER_DIR, local_files_only=True)


def load_processor(engine_dir: Path, family: VisionLanguageFamily) -> Any:
    """The engine's processor/, loaded the way its vision-language family loads it."""
    return family.load_processor(Path(engine_dir) / PROCESSOR_DIR)
