"""Pre-quantized vision-language checkpoints: a tiny LLaVA (BLIP-2-OPT, Qwen2.5-VL) whose language model's linears
are AWQ, GPTQ or compressed-tensors (the vision tower and projector dense, as published checkpoints have them)
loads dense, equal to the reference, with `quantized` keyed by the model's parameter names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from vlm_checkpoints import make_vlm_checkpoint

from kiln.models.loader import LoadedCheckpoint, load_checkpoint
from kiln.models.quantized_formats import CheckpointTensors, UnsupportedQuantizationError
from kiln.models.vlm_loader import load_vision_language
from tests.quantized_checkpoints import Tiny, write_awq, write_compressed_tensors, write_gptq
from tests.tiny_checkpoints import make_checkpoint

CPU = torch.device("cpu")
SEED = 5
# The language model's decoder linears, as transformers (4.x, and 5.x when saving) lays a LLaVA checkpoint out.
LLAVA = Tiny(
    lambda d, seed: make_vlm_checkpoint("llava", d, seed=seed),
    re.compile(r"language_model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight"),
    "LlavaForConditionalGeneration",
    ("lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"),
)
# LLaVA's legacy checkpoint names -> its parameter names in transformers 5 (what transformers >= 4.52 saves too)
NEW_LAYOUT = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
# BLIP-2's OPT decoder keeps its checkpoint names in transformers 5 (`language_model.model.decoder.layers...`).
BLIP2 = Tiny(
    lambda d, seed: make_vlm_checkpoint("blip2", d, seed=seed),
    re.compile(r"language_model\.model\.decoder\.layers\.\d+\.(self_attn\.\w+_proj|fc1|fc2)\.weight"),
    "Blip2ForConditionalGeneration",
    ("language_model.lm_head", "re:.*vision_model.*", "re:.*qformer.*", "language_projection"),
)
# Qwen2.5-VL checkpoints (Qwen's own AWQ ones too) name the language model `model.layers...`, the vision side
# `visual...`; transformers 5 loads them as `model.language_model.layers...` and `model.visual...`.
QWEN2_5_VL = Tiny(
    lambda d, seed: make_vlm_checkpoint("qwen2_5_vl", d, seed=seed),
    re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight"),
    "Qwen2_5_VLForConditionalGeneration",
    ("lm_head", "re:.*visual.*"),
)
TINY = {"llava": LLAVA, "blip2": BLIP2, "qwen2_5_vl": QWEN2_5_VL}
# family -> (the parameter names of its language model's decoder layers, how many linears those have)
LANGUAGE_LAYERS = {
    "llava": ("model.language_model.layers.", 2 * 7),
    "blip2": ("language_model.model.decoder.layers.", 2 * 6),
    "qwen2_5_vl": ("model.language_model.layers.", 2 * 7),
}


def model_name(checkpoint_name: str) -> str:
    """A LLaVA checkpoint name -> its parameter name in transformers 5 (the same in 5.17 and 5.25)."""
    for old, new in NEW_LAYOUT:
        if checkpoint_name.startswith(old):
            return new + checkpoint_name.removeprefix(old)
    return checkpoint_name


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """family -> the dense tiny checkpoint the quantized ones start from, as transformers loads it."""
    import transformers

    made: dict[str, dict[str, torch.Tensor]] = {}

    def get(family: str) -> dict[str, torch.Tensor]:
        if family not in made:
            path = make_vlm_checkpoint(family, tmp_path_factory.mktemp(f"{family}-dense"), seed=SEED)
            model_class = getattr(transformers, TINY[family].model_class)
            made[family] = {k: v.clone() for k, v in model_class.from_pretrained(path).state_dict().items()}
        return made[family]

    return get


@pytest.fixture
def reference(references: Any) -> dict[str, torch.Tensor]:
    return references("llava")


def _load(path: Path, architecture: str = "LlavaForConditionalGeneration") -> LoadedCheckpoint:
    loaded, family, _ = load_vision_language(path, torch.float32, CPU)
    assert family.architecture == architecture
    assert getattr(loaded.config, "quantization_config", None) is None
    return loaded


def _assert_dense(
    loaded: LoadedCheckpoint,
    reference: dict[str, torch.Tensor],
    dense: dict[str, torch.Tensor],
    family: str = "llava",
) -> None:
    """The model is the reference with each quantized linear (by parameter name) replaced by its dense weight;
    every other weight (vision tower, projector, embeddings, norms, lm_head) is the reference's."""
    assert loaded.quantized is not None
    assert set(loaded.quantized.weights) == set(dense)
    layers, count = LANGUAGE_LAYERS[family]
    assert len(dense) == count and all(name.startswith(layers) for name in dense)
    state = loaded.model.state_dict()
    assert set(state) == set(reference) and set(dense) <= set(state)
    for name, tensor in state.items():
        expected = dense.get(name, reference[name])
        assert torch.equal(tensor, expected), name
    for name, weight in loaded.quantized.weights.items():
        assert torch.equal(weight.dequantize(torch.float32), dense[name]), name


def _set_quantization(path: Path, **fields: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(fields)
    (path / "config.json").write_text(json.dumps(config))


def _rename_tensors(path: Path, rename: Any) -> None:
    file = path / "model.safetensors"
    state = load_file(str(file))
    file.unlink()
    save_file({rename(name): tensor for name, tensor in state.items()}, str(file), metadata={"format": "pt"})


def test_awq_llava(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    """Laid out as AutoAWQ writes llava-hf/llava-1.5-7b-hf (transformers 4.x names, `vision_tower.vision_model.`)."""
    written = write_awq(tmp_path, group_size=32, seed=SEED, tiny=LLAVA)
    assert len(written) == 14  # 2 layers x 7 linears, nothing of the vision side (checked again on loading)
    _rename_tensors(tmp_path, lambda n: re.sub(r"^vision_tower\.", "vision_tower.vision_model.", n))
    # AutoAWQ names what it left dense; kiln reads what is packed, so the list changes nothing
    _set_quantization(tmp_path, modules_to_not_convert=["vision_tower", "multi_modal_projector"])
    loaded = _load(tmp_path)
    assert loaded.quantized is not None and loaded.quantized.method == "awq"
    _assert_dense(loaded, reference, {model_name(name): lin.dense() for name, lin in written.items()})


@pytest.mark.parametrize(
    "case",
    [
        dict(bits=4, group_size=32, sym=False, desc_act=True, checkpoint_format="gptq"),
        dict(bits=8, group_size=-1, sym=True, desc_act=False, checkpoint_format="gptq_v2"),
    ],
    ids=["4bit-act-order", "8bit-channel"],
)
def test_gptq_llava(tmp_path: Path, reference: dict[str, torch.Tensor], case: dict[str, Any]) -> None:
    written = write_gptq(tmp_path, seed=SEED, tiny=LLAVA, **case)
    loaded = _load(tmp_path)
    assert loaded.quantized is not None
    assert (loaded.quantized.method, loaded.quantized.bits) == ("gptq", case["bits"])
    _assert_dense(loaded, reference, {model_name(name): lin.dense() for name, lin in written.items()})


def test_gptq_blip2(tmp_path: Path, references: Any) -> None:
    """BLIP-2-OPT: the OPT decoder's linears (with biases, kept dense) quantized, vision model and Q-Former dense."""
    written = write_gptq(tmp_path, bits=4, group_size=32, desc_act=True, seed=SEED, tiny=BLIP2)
    loaded = _load(tmp_path, "Blip2ForConditionalGeneration")
    dense = {name: lin.dense() for name, lin in written.items()}  # OPT's checkpoint names are its parameter names
    _assert_dense(loaded, references("blip2"), dense, "blip2")


def test_awq_qwen2_5_vl(tmp_path: Path, references: Any) -> None:
    written = write_awq(tmp_path, group_size=32, seed=SEED, tiny=QWEN2_5_VL)
    _set_quantization(tmp_path, modules_to_not_convert=["visual"])  # as Qwen's published AWQ checkpoints say
    loaded = _load(tmp_path, "Qwen2_5_VLForConditionalGeneration")
    dense = {"model.language_model." + name.removeprefix("model."): lin.dense() for name, lin in written.items()}
    _assert_dense(loaded, references("qwen2_5_vl"), dense, "qwen2_5_vl")


def test_awq_llava_in_the_new_layout(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    """A checkpoint saved with transformers' newer names (`model.language_model.layers...`) loads the same."""
    written = write_awq(tmp_path, group_size=32, seed=SEED, tiny=LLAVA)
    _rename_tensors(tmp_path, model_name)
    assert "model.language_model.layers.0.self_attn.q_proj.qweight" in CheckpointTensors(tmp_path).names()
    loaded = _load(tmp_path)
    _assert_dense(loaded, reference, {model_name(name): lin.dense() for name, lin in written.items()})


def test_compressed_tensors_llava_with_an_ignore_list(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    write_compressed_tensors(tmp_path, "W4A16_ASYM", 32, seed=SEED, tiny=LLAVA)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    # the library writes its ignore list out as the modules it left dense: the vision side and lm_head
    assert "multi_modal_projector.linear_1" in qc["ignore"] and "language_model.lm_head" in qc["ignore"]
    assert "vision_tower.encoder.layers.1.mlp.fc2" in qc["ignore"]
    args = QuantizationArgs(**qc["config_groups"]["group_0"]["weights"])
    tensors = CheckpointTensors(tmp_path)
    dense = {}
    for module in tensors.prefixes("weight_packed"):
        assert LLAVA.linears.fullmatch(f"{module}.weight"), module  # the library packed the language model only
        shape = torch.Size(tensors.get(f"{module}.weight_shape").tolist())
        scale = tensors.get(f"{module}.weight_scale")
        signed = unpack_from_int32(tensors.get(f"{module}.weight_packed"), 4, shape)
        zp_shape = torch.Size([shape[0], scale.shape[1]])
        zp = unpack_from_int32(tensors.get(f"{module}.weight_zero_point"), 4, zp_shape, packed_dim=0)
        dense[model_name(f"{module}.weight")] = dequantize(signed, scale, zp, args)
    loaded = _load(tmp_path)
    assert loaded.quantized is not None and loaded.quantized.method == "compressed-tensors"
    _assert_dense(loaded, reference, dense)


def test_quantized_weights_transformers_converts_are_refused(tmp_path: Path) -> None:
    """Mixtral's per-expert weights are fused by transformers 5 while loading: their AWQ form has no parameter."""
    mixtral = Tiny(
        lambda d, seed: make_checkpoint("mixtral", d, seed=seed),
        re.compile(r"model\.layers\.\d+\.(self_attn\.\w+_proj|block_sparse_moe\.experts\.\d+\.w\d)\.weight"),
        "AutoModelForCausalLM",
        (),
    )
    write_awq(tmp_path, group_size=16, tiny=mixtral)
    with pytest.raises(UnsupportedQuantizationError, match=r"experts\.0\.w1\.weight: transformers merges or splits"):
        load_checkpoint(tmp_path, torch.float32, CPU)


def test_build_names_a_gguf_directory(tmp_path: Path) -> None:
    """`kiln build` looks at the checkpoint's kind first: a GGUF directory is refused as GGUF there already."""
    from kiln import build

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(UnsupportedQuantizationError, match="GGUF"):
        build(tmp_path / "ckpt", tmp_path / "engine", compile=False, progress=False)
    assert not (tmp_path / "engine").exists()


def test_two_quantized_weights_for_one_parameter_are_refused(tmp_path: Path) -> None:
    """A linear packed under both its legacy and its new name is ambiguous: refused, naming both."""
    write_awq(tmp_path, group_size=32, seed=SEED, tiny=LLAVA)
    file = tmp_path / "model.safetensors"
    state = load_file(str(file))
    module = "language_model.model.layers.1.mlp.up_proj"
    state.update({model_name(f"{module}.{k}"): state[f"{module}.{k}"].clone() for k in ("qweight", "qzeros", "scales")})
    file.unlink()
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(UnsupportedQuantizationError, match=r"up_proj.weight'\] load into the same parameter"):
        load_vision_language(tmp_path, torch.float32, CPU)


def test_quantization_config_of_the_text_model(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    """A VLM whose `quantization_config` sits in its text_config (the language model alone quantized) loads
    the same; packed tensors with no quantization_config anywhere are refused rather than left random."""
    written = write_awq(tmp_path, group_size=32, seed=SEED, tiny=LLAVA)
    config = json.loads((tmp_path / "config.json").read_text())
    qc = config.pop("quantization_config")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantizationError, match=r"packed quantized tensors \(.*qweight\) but"):
        load_vision_language(tmp_path, torch.float32, CPU)
    config["text_config"]["quantization_config"] = qc
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = _load(tmp_path)
    assert getattr(loaded.config.text_config, "quantization_config", None) is None
    _assert_dense(loaded, reference, {model_name(name): lin.dense() for name, lin in written.items()})
