"""Which modules of an architecture are split how, keyed by Hugging Face architecture name."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import UnsupportedModelError


@dataclass(frozen=True)
class ShardPlan:
    """Module names (the last part of their path) and the split each gets."""

    query: tuple[str, ...] = ("q_proj",)  # column-parallel by query head
    key_value: tuple[str, ...] = ("k_proj", "v_proj")  # column-parallel by KV head (replicated below tp)
    mlp_in: tuple[str, ...] = ("gate_proj", "up_proj")  # column-parallel by MLP row
    attention_out: tuple[str, ...] = ("o_proj",)  # row-parallel by query head, then all-reduced
    mlp_out: tuple[str, ...] = ("down_proj",)  # row-parallel by MLP column, then all-reduced
    attention: str = "self_attn"  # the attention module, whose head counts are set to the rank's
    embedding: str = "model.embed_tokens"  # vocab-parallel, all-reduced
    head: str = "lm_head"  # vocab-parallel, all-gathered


LLAMA_LIKE = ShardPlan()
LLAVA = ShardPlan(embedding="model.language_model.embed_tokens")  # a Llama-like language model under model.

PLANS: dict[str, ShardPlan] = {
    "LlamaForCausalLM": LLAMA_LIKE,
    "MistralForCausalLM": LLAMA_LIKE,
    "Qwen2ForCausalLM": LLAMA_LIKE,
    "Qwen3ForCausalLM": LLAMA_LIKE,
    "Gemma2ForCausalLM": LLAMA_LIKE,
    "LlavaForConditionalGeneration": LLAVA,  # the language model; the vision program runs unsharded
}


def plan_for(architecture: str) -> ShardPlan:
    plan = PLANS.get(architecture)
    if plan is None:
        raise UnsupportedModelError(
            f"{architecture} has no tensor-parallel plan in kiln (it shards {', '.join(sorted(PLANS))}); "
            "build it with --tp-size 1"
        )
    return plan
