"""Checkpoints kiln cannot build get a refusal that names what is missing, not a traceback; the
"not supported" message lists real families and suggests --trust-remote-code only for checkpoints with code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from e2e_helpers import kiln
from tiny_checkpoints import make_tokenizer

from kiln import UnsupportedModelError, build
from kiln.models.registry import RECIPES, proven_families
from kiln.models.vlm import CUSTOM_ARCHITECTURE


@pytest.fixture(scope="module")
def mamba(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny state-space model: no attention heads, so no KV cache to build."""
    from transformers import MambaConfig, MambaForCausalLM

    directory = tmp_path_factory.mktemp("mamba")
    config = MambaConfig(
        vocab_size=320, hidden_size=32, state_size=4, num_hidden_layers=2, bos_token_id=1, eos_token_id=2
    )
    torch.manual_seed(0)
    MambaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    make_tokenizer().save_pretrained(directory)
    return directory


def test_a_model_without_attention_is_refused_by_name(mamba, tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"MambaForCausalLM has no attention layers .*num_attention_heads"):
        build(mamba, tmp_path / "engine", progress=False, compile=False)
    assert not (tmp_path / "engine").exists()


def test_the_cli_refuses_it_without_a_traceback(mamba, tmp_path):
    proc = kiln("build", str(mamba), "-o", str(tmp_path / "engine"), "--no-compile", check=False)
    assert proc.returncode != 0
    assert "MambaForCausalLM has no attention layers" in proc.stderr
    assert "Traceback" not in proc.stderr


def _renamed(checkpoints, tmp_path: Path, architecture: str, **config_changes) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints("llama"), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(architectures=[architecture], **config_changes)
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def _refusal(ckpt: Path, tmp_path: Path) -> str:
    with pytest.raises(UnsupportedModelError, match="is not supported") as info:
        build(ckpt, tmp_path / "engine", progress=False, compile=False)
    return str(info.value)


def test_the_refusal_lists_real_families_and_no_remote_code_hint_without_code(checkpoints, tmp_path):
    message = _refusal(_renamed(checkpoints, tmp_path, "BertForMaskedLM"), tmp_path)
    assert CUSTOM_ARCHITECTURE not in proven_families() and CUSTOM_ARCHITECTURE in RECIPES
    listed = message.split("(tested: ", 1)[1].split(")", 1)[0].split(", ")
    assert listed == proven_families()
    assert {"LlamaForCausalLM", "LlavaForConditionalGeneration"} <= set(listed)
    # encoder-decoder checkpoints are built now (tests/models/test_encdec_families.py)
    encoder_decoder = {"T5ForConditionalGeneration", "BartForConditionalGeneration", "MBartForConditionalGeneration"}
    assert encoder_decoder <= set(listed)
    # and the cross-attention vision-language families on that path (tests/models/test_encdec_vlm.py, test_mllama.py)
    assert {"Pix2StructForConditionalGeneration", "MllamaForConditionalGeneration"} <= set(listed)
    assert "trust-remote-code" not in message


def test_kilns_own_architecture_is_no_checkpoint_family(checkpoints, tmp_path):
    message = _refusal(_renamed(checkpoints, tmp_path, CUSTOM_ARCHITECTURE), tmp_path)
    assert f"(tested: {', '.join(proven_families())})" in message


@pytest.mark.parametrize("code", ["auto_map", "python_file"])
def test_the_refusal_suggests_remote_code_when_the_checkpoint_has_code(checkpoints, tmp_path, code):
    changes = {"auto_map": {"AutoModelForCausalLM": "modeling_foo.FooForMaskedLM"}} if code == "auto_map" else {}
    ckpt = _renamed(checkpoints, tmp_path, "FooForMaskedLM", **changes)
    if code == "python_file":
        (ckpt / "modeling_foo.py").write_text("raise SystemExit('checkpoint code ran')\n")
    assert "pass --trust-remote-code" in _refusal(ckpt, tmp_path)


@pytest.mark.parametrize(
    ("architecture", "trust", "why"),
    [
        ("CogVLMForCausalLM", True, "'visual expert' attention and MLP weights"),  # even with its code allowed
        ("Phi3VForCausalLM", True, "silently drop its images"),
        ("Phi4MMForCausalLM", True, "Phi4MultimodalForCausalLM"),
    ],
)
def test_vision_language_models_kiln_cannot_build_are_refused_with_the_reason(
    checkpoints, tmp_path, architecture, trust, why
):
    ckpt = _renamed(checkpoints, tmp_path, architecture, auto_map={"AutoModelForCausalLM": "modeling_x.X"})
    (ckpt / "modeling_x.py").write_text("raise SystemExit('checkpoint code ran')\n")
    with pytest.raises(UnsupportedModelError, match=f"{architecture} is not supported: ") as info:
        build(ckpt, tmp_path / "engine", progress=False, compile=False, trust_remote_code=trust)
    assert why in str(info.value)
    assert not (tmp_path / "engine").exists()
