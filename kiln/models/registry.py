"""Architectures kiln knows, keyed by the Hugging Face `architectures` name.

A decoder-only text model needs no recipe of its own: kiln captures transformers' own module.
The registry records which families are proven by tests, and lets later families (vision-language
models) name a different loader; any other `*ForCausalLM` that transformers implements is tried
with the generic recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import UnsupportedModelError


@dataclass(frozen=True, kw_only=True)
class ModelRecipe:
    """How to load and capture one architecture."""

    architecture: str
    kind: str = "causal_lm"
    tested: bool = False
    notes: str = ""
    internal: bool = False  # kiln's own (the low-level API's custom VLM): not a family a checkpoint declares


_TESTED_CAUSAL_LMS = {
    "LlamaForCausalLM": "RoPE (incl. Llama-3 scaling), grouped-query attention, optional tied embeddings",
    "MistralForCausalLM": "sliding-window attention",
    "Qwen2ForCausalLM": "q/k/v projection bias",
    "Qwen3ForCausalLM": "q/k RMS norm",
    "Gemma2ForCausalLM": "attention and final logit soft-capping, alternating sliding/global layers",
    "Gemma3ForCausalLM": "q/k norm, alternating sliding/global layers with two RoPE bases",
    "Phi3ForCausalLM": "fused qkv and gate/up projections",
    "GPT2LMHeadModel": "learned absolute positions, Conv1D projections",
    "OPTForCausalLM": "learned positions with offset, ReLU MLP",
    "GPTNeoXForCausalLM": "partial rotary embedding, parallel residual",
}

RECIPES: dict[str, ModelRecipe] = {
    name: ModelRecipe(architecture=name, tested=True, notes=notes) for name, notes in _TESTED_CAUSAL_LMS.items()
}


def _vision_language_recipes() -> dict[str, ModelRecipe]:
    from kiln.models.vlm import CUSTOM_ARCHITECTURE, FAMILIES

    return {
        name: ModelRecipe(
            architecture=name,
            kind="vision_language",
            tested=True,
            notes=family.notes,
            internal=name == CUSTOM_ARCHITECTURE,
        )
        for name, family in FAMILIES.items()
    }


RECIPES.update(_vision_language_recipes())


def _encoder_decoder_recipes() -> dict[str, ModelRecipe]:
    from kiln.models.encdec import FAMILIES

    return {
        name: ModelRecipe(architecture=name, kind="encoder_decoder", tested=True, notes=family.notes)
        for name, family in FAMILIES.items()
    }


RECIPES.update(_encoder_decoder_recipes())


def _transformers_causal_lms() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def proven_families() -> list[str]:
    """The architectures tests prove, as the user's checkpoints name them."""
    return sorted(name for name, recipe in RECIPES.items() if recipe.tested and not recipe.internal)


def recipe_for(
    architectures: list[str] | None, *, trust_remote_code: bool = False, has_code: bool = False
) -> ModelRecipe:
    """The recipe for a checkpoint's declared architectures, or a clear error (which suggests
    --trust-remote-code when the checkpoint `has_code` of its own)."""
    if not architectures:
        raise UnsupportedModelError(
            "config.json declares no `architectures`; kiln needs it to know which model class to capture"
        )
    for name in architectures:
        if name in RECIPES and not RECIPES[name].internal:
            return RECIPES[name]
    causal_lms = _transformers_causal_lms()
    for name in architectures:
        if name in causal_lms or trust_remote_code:
            return ModelRecipe(architecture=name, tested=False, notes="generic decoder-only capture")
    hint = (
        " The checkpoint ships its own modelling code: pass --trust-remote-code to run it."
        if has_code and not trust_remote_code
        else ""
    )
    raise UnsupportedModelError(
        f"architecture {architectures} is not supported: kiln builds decoder-only causal language models that "
        f"transformers implements, and the encoder-decoder families below "
        f"(tested: {', '.join(proven_families())}).{hint}"
    )
