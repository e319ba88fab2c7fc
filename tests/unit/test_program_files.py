"""Programs on disk: the graph in program.pt2, the weights in weights.safetensors, and back."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.engine.manifest import PROGRAM, WEIGHTS
from kiln.engine.program_files import (
    ALIASES_KEY,
    ProgramWrite,
    load_exported,
    load_lifted,
    save_program,
    stored_tensors,
    without_weights,
)


class _Tied(torch.nn.Module):
    """A tied embedding / output matrix, a buffer and a tensor constant: every kind of weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.head = torch.nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.rand(8) + 0.5)
        self.shift = torch.randn(8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids) * self.scale + self.shift)


def _program() -> torch.export.ExportedProgram:
    return torch.export.export(_Tied(), (torch.randint(0, 11, (5,)),))


def test_round_trip_gives_the_same_outputs_and_stores_tied_weights_once(tmp_path):
    program = _program()
    ids = torch.randint(0, 11, (5,))
    want = program.module()(ids)
    save_program(program, tmp_path)
    stored, aliases = stored_tensors(program)
    assert len(stored) == 3 and len(aliases) == 1  # embed/head share one tensor; buffer; constant
    back = load_exported(tmp_path, torch.device("cpu"))
    assert torch.equal(back.module()(ids), want)
    assert all(
        isinstance(v, torch.nn.Parameter) for k, v in back.state_dict.items() if k in program.graph_signature.parameters
    )
    assert (tmp_path / WEIGHTS).stat().st_mode & 0o777 == (tmp_path / PROGRAM).stat().st_mode & 0o777


def test_the_archive_holds_the_graph_only(tmp_path):
    program = _program()
    light = without_weights(program)
    assert all(v.device.type == "meta" for v in light.state_dict.values())
    assert all(v.device.type == "cpu" for v in program.state_dict.values())  # the original keeps its weights
    save_program(program, tmp_path)
    assert (tmp_path / PROGRAM).stat().st_size < 20_000


def test_a_weights_file_that_does_not_fit_the_program_is_refused(tmp_path):
    from safetensors.torch import save_file

    program = _program()
    save_program(program, tmp_path)
    stored, aliases = stored_tensors(program)
    metadata = {ALIASES_KEY: json.dumps(aliases)}
    missing = {k: v for k, v in stored.items() if k != "scale"}
    save_file(missing, str(tmp_path / WEIGHTS), metadata=metadata)
    with pytest.raises(ValueError, match="has no tensor scale"):
        load_exported(tmp_path, torch.device("cpu"))
    misshapen = {**stored, "embed.weight": torch.randn(12, 8)}
    save_file(misshapen, str(tmp_path / WEIGHTS), metadata=metadata)
    with pytest.raises(ValueError, match=r"embed.weight is torch.float32 \(12, 8\), the program wants"):
        load_exported(tmp_path, torch.device("cpu"))


def test_a_failed_background_write_is_raised_when_the_build_waits(tmp_path, monkeypatch):
    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        with ProgramWrite(_program(), tmp_path) as writing:
            writing.wait()


def test_the_index_names_the_lifted_weights_and_they_load_in_its_order(tmp_path):
    from kiln.engine.program_index import read_index, write_index

    program = _program()
    save_program(program, tmp_path)
    assert read_index(tmp_path) is None  # the build writes it for compiled programs only
    write_index(program, tmp_path)
    index = read_index(tmp_path)
    assert index is not None and index.output == 0
    specs = [s for s in program.graph_signature.input_specs if s.kind.name != "USER_INPUT"]
    assert [x.name for x in index.lifted] == [s.target for s in specs]
    values = load_lifted(tmp_path, torch.device("cpu"), index.lifted)
    table = {**program.state_dict, **program.constants}
    assert all(torch.equal(v, table[s.target]) for v, s in zip(values, specs, strict=True))
