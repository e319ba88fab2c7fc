"""A valid manifest of a tiny CPU engine for tests, with any field changed."""

from __future__ import annotations

import dataclasses

import torch

from kiln.config import BuildConfig
from kiln.engine.manifest import FORMAT_VERSION, Manifest, ModelFacts
from kiln.version import __version__


def manifest(**changes) -> Manifest:
    facts = ModelFacts(
        architecture="LlamaForCausalLM",
        model_type="llama",
        num_layers=2,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=320,
        max_position_embeddings=256,
        eos_token_ids=(2,),
        bos_token_id=1,
        pad_token_id=0,
        has_chat_template=False,
    )
    base = Manifest(
        kiln_version=__version__,
        torch_version=torch.__version__,
        transformers_version="5.17.0",
        format_version=FORMAT_VERSION,
        device={"type": "cpu", "name": "x", "capability": None},
        build=BuildConfig(),
        model=facts,
        compiled=False,
    )
    return dataclasses.replace(base, **changes)
