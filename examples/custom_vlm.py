"""A vision-language engine for a model kiln has no recipe for, with the low-level API.

The language model is the repository's demo checkpoint (a small Llama); the "vision tower" is a
randomly initialised CLIP vision encoder wrapped with a linear projector into the language model's
hidden size. kiln builds two programs into one engine directory:

    build_llm_engine(language_model, out, tokenizer=..., image_token_id=..., max_prompt_embedding_table_size=...)
    build_multimodal_engine(vision_wrapper, out, input_specs=[InputSpec(shape=(-1, 3, 56, 56))])

then generates for a prompt with an image beside a text-only prompt, and checks the result against
transformers' own greedy generation with the image features spliced into the input embeddings.

    python examples/custom_vlm.py [--no-compile] [--out engines/custom-vlm]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

from kiln import LLM, InputSpec, SamplingParams, build_llm_engine, build_multimodal_engine

DEMO = Path(__file__).resolve().parents[1] / "demo" / "tiny-kiln"
IMAGE = 56


class WrappedVision(nn.Module):
    """pixel_values [N, 3, 56, 56] -> [N, 16, hidden]: CLIP patch features (CLS dropped), projected."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        config = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE,
            patch_size=14,
            attn_implementation="sdpa",
        )
        self.tower = CLIPVisionModel(config)
        self.projector = nn.Linear(32, hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower(pixel_values=pixel_values).last_hidden_state[:, 1:])


@torch.no_grad()
def reference(lm: nn.Module, vision: nn.Module, ids: list[int], image: torch.Tensor | None, image_id: int, n: int):
    """transformers' greedy tokens with the image features put where the image tokens stand."""
    embeds = lm.get_input_embeddings()(torch.tensor([ids]))
    if image is not None:
        features = vision(image[None])[0]
        embeds[0, torch.tensor(ids) == image_id] = features
    out = lm.generate(inputs_embeds=embeds, max_new_tokens=n, do_sample=False)
    return out[0].tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="engines/custom-vlm")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    lm = AutoModelForCausalLM.from_pretrained(DEMO).eval()
    vision = WrappedVision(lm.config.hidden_size).eval()
    image_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # placeholder id for image rows
    features_per_image = (IMAGE // 14) ** 2

    out = build_llm_engine(
        lm,
        args.out,
        tokenizer=tokenizer,
        image_token_id=image_id,
        max_prompt_embedding_table_size=4 * features_per_image,
        max_batch_size=4,
        max_seq_len=128,
        compile=not args.no_compile,
        progress=True,
    )
    build_multimodal_engine(
        vision, out, input_specs=[InputSpec(shape=(-1, 3, IMAGE, IMAGE))], compile=not args.no_compile, progress=True
    )

    llm = LLM(out)
    text = tokenizer("A kiln is").input_ids
    image = torch.randn(3, IMAGE, IMAGE)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    outs = llm.generate([{"prompt": [image_id, *text], "images": [image]}, text], params)
    # The engine expands the one image token to the image's 16 feature rows, as the reference must.
    expanded = [image_id] * features_per_image + text
    want = [reference(lm, vision, expanded, image, image_id, 16), reference(lm, vision, text, None, image_id, 16)]
    for o, ref in zip(outs, want):
        print(f"{len(o.prompt_token_ids)} prompt tokens -> {o.text!r}  (matches transformers: {o.token_ids == ref})")
        assert o.token_ids == ref, (o.token_ids, ref)


if __name__ == "__main__":
    main()
