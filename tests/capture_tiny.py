"""Capture a tiny checkpoint for the pass tests: (program, cache shape, pass context)."""

from __future__ import annotations

import torch

from kiln.compiler.capture import text_spec
from kiln.compiler.export import export_program
from kiln.compiler.model_facts import cache_shape
from kiln.compiler.passes import PassContext
from kiln.compiler.program_spec import CacheShape
from kiln.models.attention_interface import register_attention


def capture_tiny(
    checkpoint: object, architecture: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.export.ExportedProgram, CacheShape, PassContext]:
    """torch.export of the checkpoint on CPU (blocks of 4 tokens, at most 64 tokens and 4 sequences)."""
    from transformers import AutoModelForCausalLM

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="kiln").eval().to(dtype)
    shape = cache_shape(model.config)
    spec = text_spec(
        model,
        shape,
        dtype=dtype,
        device=torch.device("cpu"),
        block_size=4,
        max_num_tokens=64,
        max_batch_size=4,
        architecture=architecture,
    )
    return export_program(spec), shape, PassContext(architecture=architecture, num_layers=shape.num_layers)
