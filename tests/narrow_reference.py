"""transformers models made to compute what kiln's 8-bit paths compute, for token-exact comparisons on CPU:
linears holding quantized weights with their inputs fake-quantized as the kiln ops do, and attention
reading keys and values rounded as a narrow (FP8 / int8) KV cache stores them."""

from __future__ import annotations

import torch

from kiln.kernels.activation_quant import fake_quantize
from kiln.kernels.kv_quant import KV_CACHE_DTYPES, load, store
from kiln.models.quantized_checkpoint import QuantizedLinears


def use_quantized_linears(model: torch.nn.Module, quantized: QuantizedLinears) -> None:
    """Each listed linear gets its dequantized weight and, for a W8A8 weight, an input fake-quantizing hook."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in quantized.weights.items():
            module = modules[name.removesuffix(".weight")]
            module.weight.copy_(weight.dequantize(torch.float32))
            if weight.activations == "none":
                continue
            mode, dtype, scale = weight.activations, weight.values.dtype, weight.input_scale
            module.register_forward_pre_hook(
                lambda _m, args, mode=mode, dtype=dtype, scale=scale: (fake_quantize(args[0], mode, dtype, scale),)
            )


def use_narrow_kv(model: torch.nn.Module, kv_dtype: str, scales: tuple[tuple[float, float], ...]) -> None:
    """The model's (Llama eager) attention reads keys/values stored and read back as the narrow cache does."""
    from transformers import AttentionInterface
    from transformers.models.llama.modeling_llama import eager_attention_forward

    dtype = KV_CACHE_DTYPES[kv_dtype]

    def narrow(module, query, key, value, *args, **kwargs):  # type: ignore[no-untyped-def]
        k_scale, v_scale = scales[module.layer_idx]
        key = load(store(key, dtype, k_scale), k_scale, key.dtype)
        value = load(store(value, dtype, v_scale), v_scale, value.dtype)
        return eager_attention_forward(module, query, key, value, *args, **kwargs)

    name = f"narrow_kv_{kv_dtype}_{id(scales)}"
    AttentionInterface.register(name, narrow)
    model.set_attn_implementation(name)
