"""Vision-language checkpoints kiln refuses by name, each with the reason (checked before anything loads).

A refusal here says why kiln cannot build the model today, so the user does not get a later, obscure
failure (or, for a multimodal model that transformers also lists as a causal LM, a text-only engine
that silently drops its images).
"""

from __future__ import annotations

from kiln.errors import UnsupportedModelError

REFUSED: dict[str, str] = {
    "CogVLMForCausalLM": (
        "CogVLM's modelling code ships only inside its checkpoint (remote code: transformers has no CogVLM), and "
        "kiln cannot capture it even with --trust-remote-code: every decoder layer routes image tokens through its own "
        "'visual expert' attention and MLP weights, while kiln's LLM program only splices image features into the "
        "input embeddings of one shared language model"
    ),
    # remote-code Phi vision checkpoints: built as text models (--trust-remote-code) they would drop their images
    "Phi3VForCausalLM": (
        "Phi-3-vision's modelling code ships only inside its checkpoint (remote code), and kiln builds its vision path "
        "only from transformers' own Phi-4-multimodal (Phi4MultimodalForCausalLM), the HD-crop design Phi-3-vision "
        "shares; a build as a text model would silently drop its images"
    ),
    "Phi4MMForCausalLM": (
        "this is Phi-4-multimodal's remote-code checkpoint (unmerged LoRA weights in its safetensors); kiln builds the "
        "transformers-native one (Phi4MultimodalForCausalLM, with its vision LoRA in vision-lora/), which "
        "transformers' convert_phi4_multimodal_weights_to_hf writes"
    ),
}


def refuse_known(architectures: list[str] | None) -> None:
    """Raise UnsupportedModelError with the reason when a declared architecture is one kiln refuses."""
    for name in architectures or []:
        if name in REFUSED:
            raise UnsupportedModelError(f"{name} is not supported: {REFUSED[name]}.")
