"""When kiln launches kernels with programmatic dependent launch, and the Inductor options it compiles with."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from kiln.compiler.inductor import config_patches  # noqa: E402
from kiln.kernels.triton import pdl  # noqa: E402

CUDA = torch.device("cuda", 0)


def test_never_on_cpu_and_only_as_a_launch_option_when_used(monkeypatch):
    monkeypatch.delenv("KILN_PDL", raising=False)
    assert not pdl.supported(torch.device("cpu")) and not pdl.enabled(torch.device("cpu"))
    assert pdl.launch_options(False) == {}  # the interpreter takes no launch_pdl option
    assert pdl.launch_options(True) == {"launch_pdl": True}


def test_environment_turns_it_off_on_a_capable_device(monkeypatch):
    monkeypatch.setattr(pdl, "supported", lambda device: True)
    monkeypatch.delenv("KILN_PDL", raising=False)
    assert pdl.enabled(CUDA)
    monkeypatch.setenv("KILN_PDL", "0")
    assert not pdl.enabled(CUDA)


def test_inductor_options_follow_the_program_device(monkeypatch):
    assert config_patches({torch.device("cpu")}) == {}  # CPU programs compile with Inductor's defaults
    if not hasattr(torch._inductor.config.triton, "enable_pdl"):
        pytest.skip("this torch's Inductor has no PDL option")
    monkeypatch.setattr(pdl, "supported", lambda device: device.type == "cuda")
    monkeypatch.delenv("KILN_PDL", raising=False)
    monkeypatch.delenv("KILN_COMBO_KERNELS", raising=False)
    assert config_patches({CUDA, torch.device("cpu")}) == {"triton.enable_pdl": True}
    monkeypatch.setenv("KILN_PDL", "0")
    monkeypatch.setenv("KILN_COMBO_KERNELS", "1")
    assert config_patches({CUDA}) == {"triton.enable_pdl": False, "combo_kernels": True}
