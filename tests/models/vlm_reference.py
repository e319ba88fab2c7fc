"""Greedy generation of a vision-language checkpoint with transformers itself, one prompt at a time."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    if not images and hasattr(model, "qformer"):  # BLIP-2's generate needs an image; text alone is its LM's
        return greedy_generate(model.language_model, inputs, new_tokens)
    if not images and hasattr(model, "image_to_text_projection"):  # so does Kosmos-2's (transformers < 5.2x)
        return greedy_generate(model.text_model, inputs, new_tokens)
    return greedy_generate(model, inputs, new_tokens)


@torch.no_grad()
def greedy_generate(model: Any, inputs: Mapping[str, Any], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy generate on processor outputs (moved to the model's device and float dtype):
    the new token ids and each step's logits."""
    param = next(model.parameters())
    inputs = {k: v.to(param.device, param.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens, [step[0].float().cpu() for step in out.logits]


@torch.no_grad()
def clips_generate(
    model: Any, processor: Any, prompt: str, images: list, videos: list, num_frames: int | None, new_tokens: int
) -> tuple[list[int], list[torch.Tensor]]:
    """`greedy_generate` on a kiln processor's outputs for a prompt with images and videos, each video decoded
    to `num_frames` (else the processor's `num_frames`) evenly sampled frames."""
    from kiln.runtime.video import load_video

    clips = [load_video(v, num_frames or processor.num_frames) for v in videos]
    inputs = processor(text=[prompt], images=images or None, videos=clips or None)
    return greedy_generate(model, inputs, new_tokens)


def record_logits(llm: Any) -> dict[str, list[torch.Tensor]]:
    """Each request's logits at every step of the engine's next generate calls, by request id."""
    seen: dict[str, list[torch.Tensor]] = {}
    llm.engine.logits_hook = lambda seqs, logits: [
        seen.setdefault(s.request_id, []).append(logits[i].float().cpu()) for i, s in enumerate(seqs)
    ]
    return seen


def check_outputs(
    family: str,
    batch: list[Any],
    outs: list[Any],
    seen: Mapping[str, list[torch.Tensor]],
    reference: Callable[[dict[str, Any]], tuple[list[int], list[torch.Tensor]]],
) -> None:
    """Each output against `reference(prompt as a dict)`: the same tokens and logits within 1e-3 in float32,
    else (bf16) the near-tie rule of the text families."""
    from test_families import STRICT, compare

    for prompt, out in zip(batch, outs):
        p = prompt if isinstance(prompt, dict) else {"prompt": prompt}
        ref_tokens, ref_logits = reference(p)
        if not STRICT:
            compare(family, out.prompt_token_ids, out.token_ids, seen[out.request_id], ref_tokens, ref_logits)
            continue
        assert out.token_ids == ref_tokens, f"{family}: {p['prompt']!r}"
        worst = max(float((a - b).abs().max()) for a, b in zip(seen[out.request_id], ref_logits))
        assert worst < 1e-3, f"{family}: {p['prompt']!r}: logits differ by {worst}"
