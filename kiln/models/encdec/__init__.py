"""Encoder-decoder families kiln builds, keyed by Hugging Face architecture name.

Each family wraps the checkpoint's own modules into two packed-token programs: an encoder that also
stores every decoder layer's cross-attention keys/values in the paged cache, and a decoder step.
"""

from __future__ import annotations

from kiln.models.encdec.bart import BartFamily, MBartFamily
from kiln.models.encdec.base import (
    DECODER_INPUT_NAMES,
    ENCODER_INPUT_NAMES,
    EncoderDecoderFamily,
    decoder_prefix,
)
from kiln.models.encdec.mllama import MllamaFamily
from kiln.models.encdec.pix2struct import Pix2StructFamily
from kiln.models.encdec.t5 import T5Family
from kiln.models.encdec.vision_encoder_decoder import VisionEncoderDecoderFamily

FAMILIES: dict[str, EncoderDecoderFamily] = {
    family.architecture: family for family in (T5Family(), BartFamily(), MBartFamily())
}
# The language models a vision-language checkpoint may hold, by their class: these families, and a
# VisionEncoderDecoderModel's and Pix2Struct's own decoders (their image encoders are the engine's vision program)
# and Mllama's text model (its cross-attention layers read the vision program's rows).
LANGUAGE_MODELS: dict[str, EncoderDecoderFamily] = {
    **FAMILIES,
    "VisionEncoderDecoderModel": VisionEncoderDecoderFamily(),
    "Pix2StructForConditionalGeneration": Pix2StructFamily(),
    "MllamaForConditionalGeneration": MllamaFamily(),
}

__all__ = [
    "DECODER_INPUT_NAMES",
    "ENCODER_INPUT_NAMES",
    "FAMILIES",
    "LANGUAGE_MODELS",
    "EncoderDecoderFamily",
    "decoder_prefix",
]
