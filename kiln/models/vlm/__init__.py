"""Vision-language families, keyed by Hugging Face architecture name."""

from __future__ import annotations

from kiln.errors import UnsupportedModelError
from kiln.models.vlm.base import ImageItem, VisionExample, VisionLanguageFamily
from kiln.models.vlm.blip2 import Blip2
from kiln.models.vlm.custom import CUSTOM_ARCHITECTURE, CustomVision
from kiln.models.vlm.fuyu import Fuyu
from kiln.models.vlm.gemma3 import Gemma3
from kiln.models.vlm.kosmos2 import Kosmos2
from kiln.models.vlm.llava import Llava
from kiln.models.vlm.llava_next import LlavaNext
from kiln.models.vlm.llava_next_video import LlavaNextVideo
from kiln.models.vlm.llava_onevision import LlavaOnevision
from kiln.models.vlm.mllama import Mllama
from kiln.models.vlm.phi4mm import Phi4Multimodal
from kiln.models.vlm.pix2struct import Pix2Struct
from kiln.models.vlm.qwen2_5_vl import Qwen2_5VL
from kiln.models.vlm.vision_encoder_decoder import VisionEncoderDecoder

_ALL = (
    Llava(),
    LlavaNext(),
    Blip2(),
    Gemma3(),
    Qwen2_5VL(),
    LlavaOnevision(),
    LlavaNextVideo(),
    Fuyu(),
    Kosmos2(),
    VisionEncoderDecoder(),
    Pix2Struct(),
    Mllama(),
    Phi4Multimodal(),
    CustomVision(),
)
FAMILIES: dict[str, VisionLanguageFamily] = {f.architecture: f for f in _ALL}


def family_for(architecture: str) -> VisionLanguageFamily:
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"{architecture} is not a vision-language architecture kiln knows (known: {', '.join(sorted(FAMILIES))}); "
            "for another model use kiln.build_llm_engine / kiln.build_multimodal_engine"
        ) from None


__all__ = ["CUSTOM_ARCHITECTURE", "FAMILIES", "ImageItem", "VisionExample", "VisionLanguageFamily", "family_for"]
