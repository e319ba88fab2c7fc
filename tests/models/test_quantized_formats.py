"""Pre-quantized checkpoints: kiln's readers against each format's reference unpacking, bit for bit, the
dense model `load_checkpoint` builds from them, and the errors for formats kiln does not read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kiln.kernels.quantized_weight import QuantizedWeight
from kiln.models.loader import load_checkpoint
from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.models.quantized_formats import CheckpointTensors, UnsupportedQuantizationError, reader_for
from tests.quantized_checkpoints import AWQ_ORDER, Quantized, write_awq, write_compressed_tensors, write_gptq
from tests.tiny_checkpoints import make_checkpoint

CPU = torch.device("cpu")
SUPPORTED = "kiln reads these pre-quantized checkpoints"


def _read(path: Path, dtype: torch.dtype = torch.float32) -> QuantizedLinears:
    tensors = CheckpointTensors(path)
    reader = reader_for(path, tensors)
    assert reader is not None
    return reader.read(tensors, dtype)


def _raw(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def _words(packed: torch.Tensor) -> torch.Tensor:
    """int32 -> int64 of the same 32 bits (0 .. 2**32 - 1), so shifts never see a sign."""
    return packed.to(torch.int64) & 0xFFFFFFFF


def naive_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM [R, C / 8] -> [R, C]: field i of word c is column 8c + AWQ_ORDER[i]."""
    words = _words(packed)
    out = torch.zeros(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
    for c in range(words.shape[1]):
        for i, col in enumerate(AWQ_ORDER):
            out[:, 8 * c + col] = (words[:, c] >> (4 * i)) & 0xF
    return out


def naive_gptq_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ packing down the rows: [R, C] -> [R * 32 / bits, C]; field i of row r is row r * (32 / bits) + i."""
    words, per = _words(packed), 32 // bits
    out = torch.zeros(words.shape[0] * per, words.shape[1], dtype=torch.int64)
    for r in range(words.shape[0]):
        for i in range(per):
            out[r * per + i] = (words[r] >> (bits * i)) & (2**bits - 1)
    return out


def _expect(weight: QuantizedWeight, values: torch.Tensor, zeros: torch.Tensor | None, scales: torch.Tensor) -> None:
    """`weight` holds exactly these values [N, K], zero points [N, G] (None: absent) and float32 scales."""
    assert torch.equal(weight.values, values.to(torch.int8))
    assert torch.equal(weight.scales, scales.float())
    if zeros is None:
        assert weight.zeros is None
    else:
        assert weight.zeros is not None and torch.equal(weight.zeros, zeros.float())


def _assert_dense(path: Path, reference: dict[str, torch.Tensor], dtype: torch.dtype, method: str) -> None:
    """load_checkpoint gives the reference dense weights, the file's other tensors, and `quantized` filled."""
    loaded = load_checkpoint(path, dtype, CPU)
    assert loaded.quantized is not None and loaded.quantized.method == method
    assert set(loaded.quantized.weights) == set(reference)
    params = dict(loaded.model.named_parameters())
    for name, dense in reference.items():
        assert torch.equal(params[name], dense.to(dtype)), name
        assert torch.equal(loaded.quantized.weights[name].dequantize(dtype), dense.to(dtype)), name
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"):
        assert torch.equal(params[name], _raw(path, name).to(dtype)), name
    assert getattr(loaded.config, "quantization_config", None) is None


@pytest.fixture(scope="module")
def awq(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Quantized]]:
    path = tmp_path_factory.mktemp("awq")
    return path, write_awq(path, group_size=32)


def test_awq_unpacks_as_the_reference(awq: tuple[Path, dict[str, Quantized]]) -> None:
    path, written = awq
    read = _read(path)
    assert (read.method, read.bits, read.group_size) == ("awq", 4, 32)
    assert set(read.weights) == set(written)
    for name, lin in written.items():
        module = name.removesuffix(".weight")
        values = naive_awq(_raw(path, f"{module}.qweight"))
        zeros = naive_awq(_raw(path, f"{module}.qzeros"))
        assert torch.equal(values, lin.q) and torch.equal(zeros, lin.zeros)  # the helper packed what it meant
        weight = read.weights[name]
        assert weight.perm is None and weight.group_size == 32 and weight.bits == 4
        _expect(weight, values.T, zeros.T, _raw(path, f"{module}.scales").T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_awq_loads_dense(awq: tuple[Path, dict[str, Quantized]], dtype: torch.dtype) -> None:
    path, written = awq
    _assert_dense(path, {name: lin.dense() for name, lin in written.items()}, dtype, "awq")


GPTQ_CASES = [
    dict(bits=4, group_size=32, sym=False, desc_act=False, checkpoint_format="gptq"),
    dict(bits=4, group_size=32, sym=True, desc_act=True, checkpoint_format="gptq_v2"),
    dict(bits=4, group_size=-1, sym=False, desc_act=True, checkpoint_format="gptq"),
    dict(bits=8, group_size=32, sym=False, desc_act=True, checkpoint_format="gptq"),
    dict(bits=8, group_size=-1, sym=True, desc_act=False, checkpoint_format="gptq_v2"),
]


@pytest.mark.parametrize("case", GPTQ_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_gptq_unpacks_as_the_reference_and_loads_dense(tmp_path: Path, case: dict[str, Any]) -> None:
    written = write_gptq(tmp_path, **case)
    bits, offset = case["bits"], 1 if case["checkpoint_format"] == "gptq" else 0
    read = _read(tmp_path)
    assert (read.method, read.bits, read.group_size) == ("gptq", bits, case["group_size"])
    for name, lin in written.items():
        module = name.removesuffix(".weight")
        values = naive_gptq_rows(_raw(tmp_path, f"{module}.qweight"), bits)
        zeros = naive_gptq_rows(_raw(tmp_path, f"{module}.qzeros").T, bits).T + offset
        g_idx = _raw(tmp_path, f"{module}.g_idx").to(torch.int64)
        assert torch.equal(values, lin.q) and torch.equal(zeros, lin.zeros) and torch.equal(g_idx, lin.g_idx)
        weight = read.weights[name]
        k = values.shape[0]
        assert weight.group_size == (k if case["group_size"] == -1 else case["group_size"])
        perm = torch.sort(g_idx, stable=True).indices
        if torch.equal(perm, torch.arange(k)):
            assert weight.perm is None
        else:
            assert case["desc_act"] and weight.perm is not None and torch.equal(weight.perm, perm)
        shift = 128 if bits == 8 else 0  # kiln's int8 values are signed
        expected_zeros = None if bits == 8 and bool((zeros == 128).all()) else zeros.T - shift
        _expect(weight, values.T[:, perm] - shift, expected_zeros, _raw(tmp_path, f"{module}.scales").T)
    _assert_dense(tmp_path, {name: lin.dense() for name, lin in written.items()}, torch.float32, "gptq")


def test_gptq_dynamic_rules_set_bits_and_groups_per_module(tmp_path: Path) -> None:
    """GPTQModel's `dynamic`: the first matching rule decides; "-:" leaves a module dense."""
    dynamic = {r"-:model\.layers\.1\.mlp\.down_proj": {}, r"+:.*\.mlp\.": {"bits": 8, "group_size": 16}}
    skipped = "model.layers.1.mlp.down_proj"

    def overrides(module: str) -> dict[str, int] | None:
        return None if module == skipped else ({"bits": 8, "group_size": 16} if ".mlp." in module else {})

    written = write_gptq(tmp_path, bits=4, group_size=32, dynamic=dynamic, overrides=overrides)
    read = _read(tmp_path)
    assert f"{skipped}.weight" not in read.weights and set(read.weights) == set(written)
    assert len(written) == 13
    for name, lin in written.items():
        mlp = ".mlp." in name
        assert (read.weights[name].bits, read.weights[name].group_size) == ((8, 16) if mlp else (4, 32)), name
        assert torch.equal(read.weights[name].dequantize(torch.float32), lin.dense()), name
    _assert_dense(tmp_path, {name: lin.dense() for name, lin in written.items()}, torch.float32, "gptq")
    params = dict(load_checkpoint(tmp_path, torch.float32, CPU).model.named_parameters())
    assert torch.equal(params[f"{skipped}.weight"], _raw(tmp_path, f"{skipped}.weight"))


@pytest.mark.parametrize(
    "dynamic,message",
    [
        ({r"-:.*q_proj": {}}, r"GPTQ model\.layers\.0\.self_attn\.q_proj: the checkpoint's `dynamic` config leaves"),
        ({r"+:.*q_proj": {"bits": 3}}, r"GPTQ model\.layers\.0\.self_attn\.q_proj with 3 bits is not supported"),
        ({r"+:(": {}}, r"GPTQ `dynamic` rule '\+:\(' is not a regex"),
    ],
)
def test_gptq_dynamic_rules_that_do_not_fit_the_tensors(tmp_path: Path, dynamic: dict, message: str) -> None:
    write_gptq(tmp_path, dynamic=dynamic)  # every linear written at 4 bits, whatever the rules say
    with pytest.raises(UnsupportedQuantizationError, match=message):
        load_checkpoint(tmp_path, torch.float32, CPU)


CT_CASES = [("W4A16", 32), ("W4A16_ASYM", 32), ("W8A16", -1), ("W8A16", 32)]


@pytest.mark.parametrize("scheme,group_size", CT_CASES)
def test_compressed_tensors_unpacks_as_the_library_and_loads_dense(
    tmp_path: Path, scheme: str, group_size: int
) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    write_compressed_tensors(tmp_path, scheme, group_size)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**qc["config_groups"]["group_0"]["weights"])
    bits = args.num_bits
    read = _read(tmp_path)
    assert (read.method, read.bits, read.group_size) == ("compressed-tensors", bits, group_size)
    tensors = CheckpointTensors(tmp_path)
    reference = {}
    for module in tensors.prefixes("weight_packed"):
        shape = torch.Size(tensors.get(f"{module}.weight_shape").tolist())
        scale = tensors.get(f"{module}.weight_scale")
        signed = unpack_from_int32(tensors.get(f"{module}.weight_packed"), bits, shape)
        zp = None
        if f"{module}.weight_zero_point" in tensors:
            zp_shape = torch.Size([shape[0], scale.shape[1]])
            zp = unpack_from_int32(tensors.get(f"{module}.weight_zero_point"), bits, zp_shape, packed_dim=0)
        # kiln's int4 is unsigned (the library's signed value + 8, its zero 0 when symmetric); int8 stays signed
        if bits == 4:
            values, zeros = signed.to(torch.int16) + 8, (torch.zeros_like(scale) if zp is None else zp.float()) + 8
        else:
            values, zeros = signed, None if zp is None or not bool(zp.any()) else zp.float()
        weight = read.weights[f"{module}.weight"]
        assert weight.perm is None and weight.bits == bits
        _expect(weight, values, zeros, scale)
        reference[f"{module}.weight"] = dequantize(signed, scale, zp, args)
    assert len(reference) == 14
    _assert_dense(tmp_path, reference, torch.float32, "compressed-tensors")


def test_loading_imports_no_quantization_package(tmp_path: Path) -> None:
    write_compressed_tensors(tmp_path / "ct")
    write_gptq(tmp_path / "gptq")
    write_awq(tmp_path / "awq")
    code = (
        "import sys, torch\nfrom kiln.models.loader import load_checkpoint\n"
        f"for name in ('ct', 'gptq', 'awq'):\n    load_checkpoint({str(tmp_path)!r} + '/' + name, torch.float32, "
        "torch.device('cpu'))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('compressed_tensors', 'gptqmodel', 'awq', "
        "'auto_gptq', 'optimum')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---- formats and settings kiln refuses, before building anything ----


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama", tmp_path_factory.mktemp("dense"))


def _with_config(src: Path, dst: Path, qc: dict[str, Any]) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _ct(weights: dict[str, Any], fmt: str = "pack-quantized", **group: Any) -> dict[str, Any]:
    scheme = {"targets": ["Linear"], "weights": weights, "input_activations": None, "format": fmt, **group}
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": scheme}}


INT4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
REFUSED = {
    "bitsandbytes-4bit": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    "bitsandbytes-flag": ({"load_in_8bit": True}, "bitsandbytes"),
    "exl2": ({"quant_method": "exl2", "bits": 4.0}, "EXL2"),
    "fp8-per-tensor": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "without a weight_block_size"),
    "fp8-static": (
        {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [32, 32]},
        "activation_scheme 'static'",
    ),
    "hqq": ({"quant_method": "hqq"}, "'hqq'"),
    "awq-gemv": ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "AWQ version 'gemv'"),
    "awq-marlin": ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "marlin"}, "'marlin'"),
    "gptq-3bit": ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "GPTQ with 3 bits"),
    "gptq-marlin": ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "GPTQ checkpoint format"),
    "ct-fp8-group": (
        _ct({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group"}, "float-quantized"),
        "strategy 'group'",
    ),
    "ct-int-quantized": (_ct(INT4, "int-quantized"), "format 'int-quantized'"),
    "ct-naive": (_ct(INT4, "naive-quantized"), "format 'naive-quantized'"),
    "ct-w8a8": (
        _ct({**INT4, "num_bits": 8}, input_activations={"num_bits": 8, "type": "int", "dynamic": True}),
        "activation quantization",
    ),
    "ct-sparse": ({**_ct(INT4), "sparsity_config": {"format": "sparse-24-bitmask"}}, "sparsity"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_quantization_configs(dense: Path, tmp_path: Path, case: str) -> None:
    qc, names = REFUSED[case]
    path = _with_config(dense, tmp_path / case, qc)
    with pytest.raises(UnsupportedQuantizationError) as info:
        load_checkpoint(path, torch.float32, CPU)
    assert names in str(info.value) and SUPPORTED in str(info.value)


def test_gguf_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(UnsupportedQuantizationError, match="GGUF") as info:
        load_checkpoint(tmp_path, torch.float32, CPU)
    assert SUPPORTED in str(info.value)


def test_exl2_tensors_are_refused(dense: Path, tmp_path: Path) -> None:
    path = tmp_path / "exl2"
    shutil.copytree(dense, path)
    save_file(
        {"model.layers.0.self_attn.q_proj.q_invperm": torch.arange(64, dtype=torch.int16)}, str(path / "x.safetensors")
    )
    with pytest.raises(UnsupportedQuantizationError, match="EXL2"):
        load_checkpoint(path, torch.float32, CPU)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_group_size_that_does_not_divide_k(tmp_path: Path, method: str) -> None:
    (write_gptq if method == "gptq" else write_awq)(tmp_path, group_size=32)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["group_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    label = method.upper()
    with pytest.raises(
        UnsupportedQuantizationError,
        match=rf"{label} model\.layers\.0\.\w+\.\w+_proj: group size 48 does not divide its in_features (64|128)",
    ):
        load_checkpoint(tmp_path, torch.float32, CPU)


def test_act_order_groups_of_unequal_size_are_refused(tmp_path: Path) -> None:
    write_gptq(tmp_path, group_size=32, desc_act=True, checkpoint_format="gptq_v2")
    tensors = CheckpointTensors(tmp_path)
    state = {name: tensors.get(name) for name in tensors.names()}
    g_idx = state["model.layers.0.self_attn.q_proj.g_idx"]
    g_idx[g_idx == 0] = 1  # group 1 now has 64 columns, group 0 none
    (tmp_path / "model.safetensors").unlink()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        UnsupportedQuantizationError,
        match="GPTQ model.layers.0.self_attn.q_proj: its g_idx does not give every group exactly 32",
    ):
        load_checkpoint(tmp_path, torch.float32, CPU)


def test_compressed_tensors_group_act_order(tmp_path: Path) -> None:
    """Older llm-compressor checkpoints (actorder "group") add weight_g_idx: each column's group."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    write_compressed_tensors(tmp_path, "W4A16_ASYM", 32)
    tensors = CheckpointTensors(tmp_path)
    state = {name: tensors.get(name) for name in tensors.names()}
    module = "model.layers.1.mlp.down_proj"
    k = int(state[f"{module}.weight_shape"][1])
    torch.manual_seed(3)
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[torch.randperm(k)] = torch.arange(k) // 32
    state[f"{module}.weight_g_idx"] = g_idx.to(torch.int32)
    (tmp_path / "model.safetensors").unlink()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    scale = state[f"{module}.weight_scale"]
    signed = unpack_from_int32(state[f"{module}.weight_packed"], 4, torch.Size([scale.shape[0], k]))
    zp = unpack_from_int32(state[f"{module}.weight_zero_point"], 4, scale.shape, packed_dim=0)
    expected = (signed.float() - zp[:, g_idx].float()) * scale[:, g_idx]
    weight = _read(tmp_path).weights[f"{module}.weight"]
    perm = torch.sort(g_idx, stable=True).indices
    assert weight.perm is not None and torch.equal(weight.perm, perm)
    assert torch.equal(weight.values, (signed[:, perm] + 8).to(torch.int8))
    loaded = load_checkpoint(tmp_path, torch.float32, CPU)
    assert torch.equal(dict(loaded.model.named_parameters())[f"{module}.weight"], expected)
