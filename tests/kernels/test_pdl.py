"""When kiln launches kernels with programmatic dependent launch, and the Inductor options it compiles with."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from kiln.compiler.inductor import config_patches  # noqa: E402
from kiln.kernels.selection import selected  # noqa: E402
from kiln.kernels.triton import pdl  # noqa: E402

CUDA = torch.device("cuda", 0)


def test_never_on_cpu_and_only_as_a_launch_option_when_used():
    assert not pdl.supported(torch.device("cpu")) and not pdl.enabled(torch.device("cpu"))
    assert pdl.launch_options(False) == {}  # the interpreter takes no launch_pdl option
    assert pdl.launch_options(True) == {"launch_pdl": True}


def test_the_kernel_selection_turns_it_off_on_a_capable_device(monkeypatch):
    monkeypatch.setattr(pdl, "supported", lambda device: True)
    assert pdl.enabled(CUDA)
    with selected(pdl=False):
        assert not pdl.enabled(CUDA)
    assert pdl.enabled(CUDA)


def test_inductor_options_follow_the_program_device(monkeypatch):
    cpu = config_patches({torch.device("cpu")})
    assert "triton.enable_pdl" not in cpu and "combo_kernels" not in cpu
    if not hasattr(torch._inductor.config.triton, "enable_pdl"):
        pytest.skip("this torch's Inductor has no PDL option")
    monkeypatch.setattr(pdl, "supported", lambda device: device.type == "cuda")
    assert config_patches({CUDA, torch.device("cpu")}) == {**cpu, "triton.enable_pdl": True, "combo_kernels": True}
    with selected(pdl=False):
        patches = config_patches({CUDA}, combo_kernels=False)
    assert patches == {**cpu, "triton.enable_pdl": False, "combo_kernels": False}


def test_kernels_release_their_successor_only_after_waiting():
    """Inductor's kernels wait only on the kernel just before them, so no kiln kernel may let the next
    one start before its own wait: the PDL intrinsics appear only in `pdl.handoff`, wait first."""
    import inspect
    from pathlib import Path

    sources = Path(pdl.__file__).parent.glob("*.py")
    users = [p.name for p in sources if p.name != "pdl.py" and "gdc_" in p.read_text()]
    assert users == []
    body = inspect.getsource(pdl.handoff.fn)
    assert 0 < body.index("gdc_wait()") < body.index("gdc_launch_dependents()")
    assert not hasattr(pdl, "allow_dependents")


def test_compiled_programs_round_like_the_captured_ones():
    if not hasattr(torch._inductor.config, "emulate_precision_casts"):
        pytest.skip("this torch's Inductor has no emulate_precision_casts option")
    for devices in ({torch.device("cpu")}, {CUDA}):
        assert config_patches(devices)["emulate_precision_casts"] is True
