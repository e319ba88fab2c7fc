"""The build pipeline: a spec goes export -> passes -> write, and the engine's loader gives back the same program."""

from __future__ import annotations

import io
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from rich.console import Console

from kiln.compiler.capture import text_spec
from kiln.compiler.model_facts import cache_shape
from kiln.compiler.pipeline import build_program, prepare_program, write_program
from kiln.compiler.program_spec import ProgramSpec
from kiln.config import BuildConfig
from kiln.engine.manifest import COMPILED, PROGRAM, PROGRAM_INDEX, WEIGHTS
from kiln.engine.programs import load_program
from kiln.engine.weight_bytes import decode_weight_bytes
from kiln.errors import EngineMismatchError, KilnError
from kiln.models.attention_interface import register_attention
from kiln.progress import Progress

CPU = torch.device("cpu")


class _Encoder(torch.nn.Module):
    """A stand-in vision encoder: [images, 6] -> [images, 2, 4]."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 8)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.proj(pixels)).view(-1, 2, 4)


def _vision_spec(module: torch.nn.Module) -> ProgramSpec:
    images = torch.export.Dim("images", min=1, max=8)
    return ProgramSpec(
        module=module,
        args=(torch.randn(2, 6),),
        dynamic_shapes=({0: images},),
        what="the vision encoder of a test",
        architecture="Test",
        directory="vision",
        passes=False,
    )


def test_a_text_spec_goes_through_the_passes_and_loads_back_as_the_same_program(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), attn_implementation="kiln").eval()
    shape = cache_shape(model.config)
    spec = text_spec(
        model,
        shape,
        dtype=torch.float32,
        device=CPU,
        block_size=4,
        max_num_tokens=64,
        max_batch_size=4,
        architecture="LlamaForCausalLM",
    )
    config = BuildConfig(compile=False, tokens_per_block=4)
    shown = io.StringIO()
    progress = Progress(console=Console(file=shown, width=200))
    prepared = prepare_program(spec, config, progress)
    program = prepared.program
    assert any(n.target == torch.ops.kiln.paged_attention.default for n in program.graph.nodes)
    # only the passes that changed the graph, with how many sites: the checks and the CUDA-only passes are absent
    layers = shape.num_layers
    assert prepared.passes["paged_attention"] == f"{layers} sites"
    assert prepared.passes["fuse_projections"] == f"{2 * layers} sites"  # q/k/v and gate/up of each layer
    assert not {"check_attention_captured", "check_attention_rewritten", "small_batch_linear"} & set(prepared.passes)
    lines = shown.getvalue().splitlines()
    assert [line.strip() for line in lines if line.strip().startswith(tuple(prepared.passes))] == [
        f"{name}: {change}" for name, change in prepared.passes.items()
    ]
    assert not [line for line in lines if "check_attention" in line or line.strip().startswith("pass ")]
    written = write_program(program, spec, tmp_path, config, progress)
    assert written.compiled is False and written.op_modules == {}  # torch's and kiln's operators only
    assert {"export", "passes", "write", "write weights"} <= set(progress.timings)
    assert (tmp_path / PROGRAM).is_file() and (tmp_path / WEIGHTS).is_file() and not (tmp_path / COMPILED).exists()
    assert not (tmp_path / PROGRAM_INDEX).exists()  # written for compiled programs only

    loaded = load_program(tmp_path, CPU, compiled=False)
    assert loaded.weight_bytes == decode_weight_bytes(program) > 0
    inputs = spec.verify_inputs
    want_cache, got_cache = inputs[-1].clone(), inputs[-1].clone()
    with torch.inference_mode():
        want = program.module()(*inputs[:-1], want_cache)
        got = loaded.program(*inputs[:-1], got_cache)
    assert got.shape == (2, model.config.vocab_size)
    assert torch.equal(got, want)
    assert torch.equal(got_cache, want_cache)


def test_a_vision_spec_is_written_to_its_directory_compiled_verified_and_loaded(tmp_path):
    encoder = _Encoder().eval()
    progress = Progress(enabled=False)
    assert build_program(_vision_spec(encoder), tmp_path, BuildConfig(compile=True), progress).compiled is True
    assert {"export vision", "write vision", "compile vision", "verify vision"} <= set(progress.timings)
    assert "passes vision" not in progress.timings
    assert not (tmp_path / PROGRAM).exists()
    x = torch.randn(5, 6)  # another batch size than the traced one: the dimension stayed dynamic
    with torch.no_grad():
        want = encoder(x)
    for compiled in (False, True):
        got = load_program(tmp_path / "vision", CPU, compiled=compiled).program(x)
        torch.testing.assert_close(got, want)


class _Watch(Progress):
    """Progress that notes, as each stage starts, whether the watched spec's module is still alive."""

    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.module: weakref.ref[torch.nn.Module] | None = None
        self.alive: dict[str, bool] = {}

    def watch(self, spec: ProgramSpec) -> ProgramSpec:
        assert spec.module is not None
        self.module = weakref.ref(spec.module)
        return spec

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        assert self.module is not None
        self.alive[name] = self.module() is not None
        with super().stage(name, detail):
            yield


def test_a_handed_over_spec_s_module_is_freed_before_the_program_is_written(tmp_path):
    progress = _Watch()
    build_program(progress.watch(_vision_spec(_Encoder())), tmp_path, BuildConfig(compile=True), progress)
    assert progress.alive == {
        "export vision": True,
        "write vision": False,
        "compile vision": False,
        "verify vision": False,
        "cpu module vision": False,
        "write weights vision": False,
    }


def test_an_export_failure_names_the_program():
    class Branchy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow

    spec = _vision_spec(Branchy())
    with pytest.raises(KilnError, match="torch.export could not capture the vision encoder of a test"):
        prepare_program(spec, BuildConfig(compile=False), Progress(enabled=False))


def test_a_spec_without_a_cache_cannot_ask_for_the_attention_passes():
    with pytest.raises(KilnError, match="has no KV cache"):
        ProgramSpec(module=_Encoder(), args=(), dynamic_shapes=(), what="x", architecture="X")


def _written(tmp_path: Path) -> Path:
    build_program(_vision_spec(_Encoder()), tmp_path, BuildConfig(compile=False), Progress(enabled=False))
    return tmp_path / "vision"


@pytest.mark.parametrize("damaged", [PROGRAM, WEIGHTS])
def test_the_loader_names_a_damaged_file_and_says_to_rebuild(tmp_path, damaged):
    directory = _written(tmp_path)
    (directory / damaged).write_bytes(b"not what kiln wrote")
    with pytest.raises(EngineMismatchError) as error:
        load_program(directory, CPU, compiled=False)
    message = str(error.value)
    assert message.startswith(f"{directory / damaged} cannot be loaded")
    assert message.endswith("the engine is damaged or incomplete: rebuild it with `kiln build`")


def test_the_loader_says_to_rebuild_when_the_compiled_program_is_gone(tmp_path):
    directory = _written(tmp_path)
    with pytest.raises(KilnError, match=f"{directory / COMPILED} is missing: .* rebuild the engine"):
        load_program(directory, CPU, compiled=True)
