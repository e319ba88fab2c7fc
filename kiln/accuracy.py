"""`kiln run --check-accuracy`: transformers' own greedy generation on the same inputs, token by token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.engine.manifest import Manifest
from kiln.errors import KilnError


@dataclass(frozen=True)
class AccuracyResult:
    index: int
    kiln_tokens: list[int]
    reference_tokens: list[int]

    @property
    def match(self) -> bool:
        return self.kiln_tokens == self.reference_tokens

    @property
    def first_difference(self) -> int | None:
        pairs = zip(self.kiln_tokens, self.reference_tokens)
        at = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if at is None and len(self.kiln_tokens) != len(self.reference_tokens):
            at = min(len(self.kiln_tokens), len(self.reference_tokens))
        return at


def _reference(manifest: Manifest, checkpoint: Path) -> tuple[Any, Any, Any]:
    """(model, processor or tokenizer, vision-language family or None) in the engine's dtype and device."""
    import transformers

    from kiln.config import torch_dtype

    dtype = torch_dtype(manifest.build.dtype)
    device = manifest.device["type"]
    arch = manifest.model.architecture
    if manifest.multimodal is not None:
        from kiln.models.vlm import family_for

        family = family_for(arch)
        attention = getattr(family, "reference_attention", "eager")
        model = getattr(transformers, arch).from_pretrained(checkpoint, dtype=dtype, attn_implementation=attention)
        family.prepare_model(model, checkpoint)
        return model.to(device).eval(), family.load_processor(checkpoint), family
    if manifest.encoder_decoder is not None:
        model = getattr(transformers, arch).from_pretrained(checkpoint, dtype=dtype, attn_implementation="eager")
        return model.to(device).eval(), None, None
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval(), None, None


@torch.no_grad()
def check_accuracy(
    manifest: Manifest,
    requests: Sequence[Any],
    prompt_ids: Sequence[list[int]],
    kiln_tokens: Sequence[list[int]],
    checkpoint: str | Path | None = None,
) -> list[AccuracyResult]:
    """Greedy tokens of transformers for each request (text prompts by their token ids), against kiln's."""
    from kiln.runtime.images import load_image

    source = Path(checkpoint or manifest.source_checkpoint or "")
    if not (source / "config.json").is_file():
        raise KilnError(
            f"--check-accuracy needs the checkpoint the engine was built from; {source} has no config.json "
            "(give it with --checkpoint)"
        )
    model, processor, family = _reference(manifest, source)
    device = next(model.parameters()).device
    results = []
    for i, (request, ids, ours) in enumerate(zip(requests, prompt_ids, kiln_tokens)):
        images = request.get("images") if isinstance(request, dict) else None
        videos = request.get("videos") if isinstance(request, dict) else None
        generator = model
        if images and not request["prompt"]:  # an image alone (Nougat, Donut, Pix2Struct): the image encoder's input
            image_inputs = processor(images=[load_image(im) for im in images], return_tensors="pt")
            image_inputs = {k: v.to(device, model.dtype) for k, v in image_inputs.items()}
            out = model.generate(**image_inputs, max_new_tokens=max(len(ours), 1), do_sample=False)
            start = len(manifest.encoder_decoder.decoder_prefix) if manifest.encoder_decoder else 0
            results.append(AccuracyResult(i, list(ours), out[0, start:].tolist()))
            continue
        if images or videos:
            extra = {"videos": _clips(family, processor, videos, request.get("num_frames"))} if videos else {}
            loaded = [load_image(im) for im in images or []] or None
            inputs = processor(text=[request["prompt"]], images=loaded, return_tensors="pt", **extra)
            inputs = {k: v.to(device) for k, v in inputs.items()}
        elif manifest.encoder_decoder is not None and not manifest.encoder_decoder.decoder_prompt:
            # ids: the encoder input, then the decoder's start tokens
            prefix = len(manifest.encoder_decoder.decoder_prefix)
            inputs = {"input_ids": torch.tensor([ids[:-prefix]], device=device)}
            text_model = family.text_model(model) if family is not None else model  # BLIP-2 + T5 without an image
            out = text_model.generate(**inputs, max_new_tokens=max(len(ours), 1), do_sample=False)
            results.append(AccuracyResult(i, list(ours), out[0, prefix:].tolist()))
            continue
        else:
            inputs = {"input_ids": torch.tensor([ids], device=device)}
            if family is not None:
                generator = family.text_model(model)  # BLIP-2 generates text through its language model
        out = generator.generate(**inputs, max_new_tokens=max(len(ours), 1), do_sample=False)
        # an encoder-decoder model (BLIP-2 with Flan-T5) returns its decoder's tokens, from the start tokens
        facts = manifest.encoder_decoder
        # (Mllama, whose decoder reads the prompt, returns the prompt too)
        start = len(facts.decoder_prefix) if facts and not facts.decoder_prompt else inputs["input_ids"].shape[1]
        results.append(AccuracyResult(i, list(ours), out[0, start:].tolist()))
    return results


def _clips(family: Any, processor: Any, videos: list[Any], num_frames: int | None) -> list[Any]:
    """The videos' frames, sampled as the engine samples them."""
    from kiln.runtime.video import load_video

    default, multiple = family.video_sampling(processor)
    return [load_video(v, num_frames or default, multiple) for v in videos]
