"""A pre-quantized checkpoint (AWQ, GPTQ with and without act order, compressed-tensors) builds without
--quantization: its method is recorded, its packed weights are put back in place of the dense ones, and
the engine generates what transformers does on the dense model they stand for. A conflicting
--quantization is refused. (The checkpoint writers come with the quantized-format readers.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
pytest.importorskip("kiln.models.quantized_formats")
quantized_checkpoints = pytest.importorskip("quantized_checkpoints")

from hf_reference import greedy  # noqa: E402
from tiny_checkpoints import build_tiny_engine  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.engine.manifest import read_manifest  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.models.loader import load_checkpoint  # noqa: E402

PROMPTS = [[5, 6, 7], list(range(10, 31))]
NEW_TOKENS = 10
# GPTQModel's per-module `dynamic` rules: layer 1's down_proj left dense, every other MLP linear 8 bits in groups
# of 16, attention at the config's 4 bits in groups of 32 (the `overrides` say the same by hand).
DYNAMIC = {r"-:model\.layers\.1\.mlp\.down_proj": {}, r"+:.*\.mlp\.": {"bits": 8, "group_size": 16}}


def _dynamic_overrides(module: str) -> dict[str, int] | None:
    if module == "model.layers.1.mlp.down_proj":
        return None
    return {"bits": 8, "group_size": 16} if ".mlp." in module else {}


FORMATS = {  # name: (writer, its options, method, bits, quantized linears, whether q/k/v and gate/up are fused)
    "awq": ("write_awq", {}, "awq", 4, 14, True),
    "gptq-act-order": ("write_gptq", {"desc_act": True}, "gptq", 4, 14, False),
    "gptq-dynamic": ("write_gptq", {"dynamic": DYNAMIC, "overrides": _dynamic_overrides}, "gptq", 4, 13, True),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_pre_quantized_checkpoint_builds_as_it_is(tmp_path, name):
    writer, options, method, bits, layers, fused = FORMATS[name]
    checkpoint = tmp_path / "ckpt"
    getattr(quantized_checkpoints, writer)(checkpoint, **options)
    dense = load_checkpoint(checkpoint, torch.float32, torch.device("cpu")).model.eval()
    want = [greedy(dense, p, NEW_TOKENS)[0] for p in PROMPTS]
    engine = build_tiny_engine(checkpoint, tmp_path / "engine")
    manifest = read_manifest(engine)
    block = manifest.quantization
    assert block is not None and (block.method, block.bits, len(block.layers)) == (method, bits, layers)
    assert ("fuse_projections" in manifest.passes) == fused
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in LLM(engine).generate(PROMPTS, params)] == want
    with pytest.raises(KilnError, match="already quantized"):
        build_tiny_engine(checkpoint, tmp_path / "other", quantization="int8_wo")
    assert not (tmp_path / "other").exists()
