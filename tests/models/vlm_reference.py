"""Greedy generation of a vision-language checkpoint with transformers itself, one prompt at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_vlm_reference(
    checkpoint: Path, architecture: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoProcessor

    model = getattr(transformers, architecture).from_pretrained(checkpoint, attn_implementation="eager", dtype=dtype)
    model = model.to(device)
    if architecture == "Qwen2_5_VLForConditionalGeneration":  # its AutoProcessor needs torchvision (videos)
        from vlm_checkpoints import qwen_vl_reference_processor

        return model.eval(), qwen_vl_reference_processor(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint)
    if architecture == "FuyuForCausalLM":  # transformers' PIL image processor cannot patchify torch tensors
        from kiln.models.vlm.fuyu import patchify_any

        patchify_any(processor.image_processor)
    return model.eval(), processor


@torch.no_grad()
def vlm_greedy(
    model: Any, processor: Any, prompt: str, images: list[Any], new_tokens: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Generated token ids (stopping at EOS like kiln) and each step's logits."""
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
    param = next(model.parameters())
    inputs = {k: v.to(param.device, param.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    if not images and hasattr(model, "qformer"):  # BLIP-2's generate needs an image; text alone is its LM's
        model = model.language_model
    if not images and hasattr(model, "image_to_text_projection"):  # so does Kosmos-2's (transformers < 5.2x)
        model = model.text_model
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens, [step[0].float().cpu() for step in out.logits]
