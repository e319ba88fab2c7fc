"""Tiny random-weight checkpoints that keep each family's structure, saved with save_pretrained.

Every family uses small widths but its real building blocks (the transformers config class and
model class), so kiln captures the same code paths as on full-size checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

WINDOW = 8  # sliding window for families that have one: test prompts are longer

COMMON = dict(vocab_size=320, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_LIKE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def _llama() -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    return LlamaConfig(**COMMON, **LLAMA_LIKE, rope_parameters=rope, tie_word_embeddings=True), LlamaForCausalLM


def _mistral() -> tuple[Any, Any]:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralConfig(**COMMON, **LLAMA_LIKE, sliding_window=WINDOW), MistralForCausalLM


def _qwen2() -> tuple[Any, Any]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2Config(**COMMON, **LLAMA_LIKE), Qwen2ForCausalLM


def _qwen3() -> tuple[Any, Any]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3Config(**COMMON, **LLAMA_LIKE, head_dim=32), Qwen3ForCausalLM


def _gemma2() -> tuple[Any, Any]:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        **COMMON,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=WINDOW,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        query_pre_attn_scalar=24,
    )
    return cfg, Gemma2ForCausalLM


def _gemma3() -> tuple[Any, Any]:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        **COMMON,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    return cfg, Gemma3ForCausalLM


def _phi3() -> tuple[Any, Any]:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3Config(**COMMON, **LLAMA_LIKE), Phi3ForCausalLM


def _gpt2() -> tuple[Any, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=320, n_positions=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    return cfg, GPT2LMHeadModel


def _opt() -> tuple[Any, Any]:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=320,
        max_position_embeddings=256,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return cfg, OPTForCausalLM


def _gpt_neox() -> tuple[Any, Any]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(**COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    return cfg, GPTNeoXForCausalLM


def _mixtral() -> tuple[Any, Any]:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralConfig(**COMMON, **LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2), MixtralForCausalLM


def _qwen2_moe() -> tuple[Any, Any]:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        **COMMON,
        **LLAMA_LIKE,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return cfg, Qwen2MoeForCausalLM


def _starcoder2() -> tuple[Any, Any]:
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    return Starcoder2Config(**COMMON, **LLAMA_LIKE, sliding_window=WINDOW), Starcoder2ForCausalLM


def _cohere() -> tuple[Any, Any]:
    from transformers import CohereConfig, CohereForCausalLM

    return CohereConfig(**COMMON, **LLAMA_LIKE), CohereForCausalLM


def _bloom() -> tuple[Any, Any]:
    from transformers import BloomConfig, BloomForCausalLM

    return BloomConfig(
        vocab_size=320, hidden_size=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
    ), BloomForCausalLM


# Families outside the tested list that kiln captures with no recipe of its own (generic path).
EXTRA_FAMILIES: dict[str, Callable[[], tuple[Any, Any]]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "starcoder2": _starcoder2,
    "cohere": _cohere,
}

# A family whose transformers code computes attention itself (ALiBi): kiln must refuse it clearly.
UNCAPTURABLE = {"bloom": _bloom}

FAMILIES: dict[str, Callable[[], tuple[Any, Any]]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "opt": _opt,
    "gpt_neox": _gpt_neox,
}


def make_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained here on a few sentences (ids 0-2 are pad/bos/eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The kiln fires clay into stone. Paged attention stores keys in blocks.", "héllo wörld ✓"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text * 20, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    wrapped.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return wrapped


def make_checkpoint(family: str, directory: Path, seed: int = 0) -> Path:
    config, model_cls = {**FAMILIES, **EXTRA_FAMILIES, **UNCAPTURABLE}[family]()
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    make_tokenizer().save_pretrained(directory)
    return directory


TINY_LIMITS: dict[str, Any] = {"max_batch_size": 4, "max_input_len": 32, "max_seq_len": 64, "max_num_tokens": 64}


def build_tiny_engine(checkpoint: Path, output: Path, **overrides: Any) -> Path:
    """A kiln engine of a tiny checkpoint with small limits, built quietly without Inductor by default."""
    from kiln import build

    options: dict[str, Any] = {**TINY_LIMITS, "compile": False, "progress": False, **overrides}
    return build(checkpoint, output, **options)
