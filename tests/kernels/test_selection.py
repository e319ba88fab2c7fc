"""The kernel selection: chosen through the API (never the environment), read by the ops."""

import pytest
import torch

from kiln.config import BuildConfig, RuntimeConfig
from kiln.errors import KilnError
from kiln.kernels import selection
from kiln.kernels.selection import KernelSelection, current, from_configs, select, selected
from kiln.kernels.triton_support import triton_importable


def test_the_default_selection_is_auto_with_pdl():
    assert current() == KernelSelection(attention="auto", linear="auto", argmax="auto", pdl=True)


def test_selected_changes_the_ops_choice_for_a_block_only():
    before = current()
    with selected(attention="reference", pdl=False) as chosen:
        assert current() is chosen
        assert (chosen.attention, chosen.linear, chosen.argmax, chosen.pdl) == ("reference", "auto", "auto", False)
        with selected(KernelSelection(linear="reference")):
            assert current() == KernelSelection(linear="reference")
        assert current() is chosen
    assert current() is before


def test_select_returns_the_selection_it_replaces():
    previous = select(KernelSelection(argmax="reference"))
    try:
        assert current().argmax == "reference"
    finally:
        assert select(previous) == KernelSelection(argmax="reference")
    assert current() is previous


def test_bad_selections_are_refused():
    with pytest.raises(KilnError, match="KernelSelection.attention must be one of"):
        KernelSelection(attention="triton")
    with pytest.raises(KilnError, match="KernelSelection.pdl must be true or false"):
        KernelSelection(pdl=0)  # type: ignore[arg-type]
    with pytest.raises(KilnError, match="takes a KernelSelection"):
        select({"attention": "reference"})  # type: ignore[arg-type]
    with pytest.raises(KilnError, match="must be one of"), selected(linear="fast"):
        pass


def test_an_engine_selects_from_its_runtime_config_and_its_build():
    runtime = RuntimeConfig(attention_kernel="reference", argmax_kernel="reference")
    assert from_configs(runtime, BuildConfig(pdl=False)) == KernelSelection(
        attention="reference", linear="auto", argmax="reference", pdl=False
    )
    assert from_configs(RuntimeConfig(), BuildConfig()) == KernelSelection()


def test_no_kernel_reads_the_environment():
    from pathlib import Path

    sources = sorted(Path(selection.__file__).parent.rglob("*.py"))
    assert sources and [p.name for p in sources if "os.environ" in p.read_text()] == []


@pytest.mark.skipif(not triton_importable(), reason="triton is not installed")
def test_ops_follow_the_selection(monkeypatch):
    from kiln.kernels import linear
    from kiln.kernels.triton import pdl

    monkeypatch.setattr(pdl, "supported", lambda device: True)
    for name in ("KILN_LINEAR", "KILN_ATTENTION"):  # the variables kiln once read change nothing now
        monkeypatch.setenv(name, "reference")
    monkeypatch.setenv("KILN_PDL", "0")
    assert linear._triton_elementwise_ok() and pdl.enabled(torch.device("cuda", 0))
    with selected(linear="reference", pdl=False):
        assert not linear._triton_elementwise_ok() and not pdl.enabled(torch.device("cuda", 0))
    assert linear._triton_elementwise_ok() and pdl.enabled(torch.device("cuda", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton paths are taken for CUDA tensors only")
def test_ops_on_cuda_take_the_reference_when_selected():
    from kiln.kernels.argmax import argmax_rows
    from kiln.kernels.paged_attention import use_triton

    q = torch.randn(1, 1, 16, device="cuda")
    assert use_triton(q)
    with selected(attention="reference"):
        assert not use_triton(q)
    logits = torch.randn(2, 100, device="cuda")
    with selected(argmax="reference"):
        assert torch.equal(argmax_rows(logits), torch.argmax(logits, dim=-1))


def test_a_selection_holds_for_the_thread_that_made_it():
    import threading

    seen: dict[str, KernelSelection] = {}
    ready, chosen = threading.Event(), threading.Event()

    def other() -> None:
        seen["start"] = current()
        with selected(linear="reference"):
            seen["inside"] = current()
            chosen.set()
            ready.wait(timeout=30)

    with selected(attention="reference"):
        thread = threading.Thread(target=other)
        thread.start()
        assert chosen.wait(timeout=30)
        assert current() == KernelSelection(attention="reference")  # the other thread's choice is not seen here
        ready.set()
        thread.join(timeout=30)
    assert seen == {"start": KernelSelection(), "inside": KernelSelection(linear="reference")}
