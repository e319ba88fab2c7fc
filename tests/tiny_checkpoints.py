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


def _llama(**o: Any) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    return LlamaConfig(
        **{**COMMON, **LLAMA_LIKE, "rope_parameters": rope, "tie_word_embeddings": True, **o}
    ), LlamaForCausalLM


def _mistral(**o: Any) -> tuple[Any, Any]:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralConfig(**{**COMMON, **LLAMA_LIKE, "sliding_window": WINDOW, **o}), MistralForCausalLM


def _qwen2(**o: Any) -> tuple[Any, Any]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2Config(**{**COMMON, **LLAMA_LIKE, **o}), Qwen2ForCausalLM


def _qwen3(**o: Any) -> tuple[Any, Any]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3Config(**{**COMMON, **LLAMA_LIKE, "head_dim": 32, **o}), Qwen3ForCausalLM


def _gemma2(**o: Any) -> tuple[Any, Any]:
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
    cfg = Gemma2Config(**{**cfg.to_dict(), **o})
    return cfg, Gemma2ForCausalLM


def _gemma3(**o: Any) -> tuple[Any, Any]:
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
    cfg = Gemma3TextConfig(**{**cfg.to_dict(), **o})
    return cfg, Gemma3ForCausalLM


def _phi3(**o: Any) -> tuple[Any, Any]:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3Config(**{**COMMON, **LLAMA_LIKE, **o}), Phi3ForCausalLM


def _gpt2(**o: Any) -> tuple[Any, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    base = dict(vocab_size=320, n_positions=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    cfg = GPT2Config(**{**base, **o})
    return cfg, GPT2LMHeadModel


def _opt(**o: Any) -> tuple[Any, Any]:
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
    return OPTConfig(**{**cfg.to_dict(), **o}), OPTForCausalLM


def _gpt_neox(**o: Any) -> tuple[Any, Any]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg = GPTNeoXConfig(**{**COMMON, **base, **o})
    return cfg, GPTNeoXForCausalLM


def _mixtral(**o: Any) -> tuple[Any, Any]:
    from transformers import MixtralConfig, MixtralForCausalLM

    moe = dict(num_local_experts=4, num_experts_per_tok=2)
    return MixtralConfig(**{**COMMON, **LLAMA_LIKE, **moe, **o}), MixtralForCausalLM


def _qwen2_moe(**o: Any) -> tuple[Any, Any]:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        **COMMON,
        **LLAMA_LIKE,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return Qwen2MoeConfig(**{**cfg.to_dict(), **o}), Qwen2MoeForCausalLM


def _starcoder2(**o: Any) -> tuple[Any, Any]:
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    return Starcoder2Config(**{**COMMON, **LLAMA_LIKE, "sliding_window": WINDOW, **o}), Starcoder2ForCausalLM


def _cohere(**o: Any) -> tuple[Any, Any]:
    from transformers import CohereConfig, CohereForCausalLM

    return CohereConfig(**{**COMMON, **LLAMA_LIKE, **o}), CohereForCausalLM


def _bloom() -> tuple[Any, Any]:
    from transformers import BloomConfig, BloomForCausalLM

    return BloomConfig(
        vocab_size=320, hidden_size=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
    ), BloomForCausalLM


# Families outside the tested list that kiln captures with no recipe of its own (generic path).
EXTRA_FAMILIES: dict[str, Callable[..., tuple[Any, Any]]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "starcoder2": _starcoder2,
    "cohere": _cohere,
}

# A family whose transformers code computes attention itself (ALiBi): kiln must refuse it clearly.
UNCAPTURABLE: dict[str, Callable[..., tuple[Any, Any]]] = {"bloom": _bloom}

FAMILIES: dict[str, Callable[..., tuple[Any, Any]]] = {
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


# A second (or third) configuration of each tested family: options given against the family's base config.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "llama": {
        "linear-untied-hd32": {
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
            "tie_word_embeddings": False,
            "head_dim": 32,
        },
        # dynamic NTK: transformers rescales only past max_position_embeddings, which a kiln engine never reaches
        "dynamic": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
        "yarn": {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    },
    "mistral": {"full-hd32-tied": {"sliding_window": None, "head_dim": 32, "tie_word_embeddings": True}},
    "qwen2": {
        "sliding-layers-tied": {
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,
            "tie_word_embeddings": True,
        },
        "linear": {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}},
    },
    "qwen3": {
        "hd8-tied-linear": {
            "head_dim": 8,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        }
    },
    "gemma2": {
        "no-softcap-window-4": {
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "sliding_window": 4,
            "query_pre_attn_scalar": 16,
            "head_dim": 32,
        }
    },
    "gemma3": {
        "scaled-full-rope": {
            "sliding_window": 4,
            "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        }
    },
    "phi3": {"partial-rotary-tied": {"partial_rotary_factor": 0.5, "tie_word_embeddings": True}},
    "gpt2": {
        "untied-layer-scaled": {
            "tie_word_embeddings": False,
            "scale_attn_by_inverse_layer_idx": True,
            "activation_function": "gelu",
        }
    },
    "opt": {"post-norm-projected": {"do_layer_norm_before": False, "word_embed_proj_dim": 32}},
    "gpt_neox": {"quarter-rotary-serial": {"rotary_pct": 0.25, "use_parallel_residual": False}},
    "mixtral": {"top1-window": {"num_experts_per_tok": 1, "sliding_window": WINDOW}},
    "qwen2_moe": {"dense-first-tied": {"decoder_sparse_step": 2, "norm_topk_prob": True, "tie_word_embeddings": True}},
    "starcoder2": {"full-nobias": {"sliding_window": None, "use_bias": False}},
    "cohere": {"qk-norm": {"use_qk_norm": True, "logit_scale": 0.5}},
}


def make_checkpoint(family: str, directory: Path, seed: int = 0, variant: str = "base") -> Path:
    options = VARIANTS[family][variant] if variant != "base" else {}
    config, model_cls = {**FAMILIES, **EXTRA_FAMILIES, **UNCAPTURABLE}[family](**options)
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
