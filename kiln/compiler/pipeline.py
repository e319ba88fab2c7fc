"""The build pipeline: each `ProgramSpec` goes export -> checks -> passes -> write -> compile -> verify,
and `write_engine_manifest` records the engine the programs make up (with the modules that register
the operators its programs call, which a new process imports before loading them)."""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.compiler import inductor
from kiln.compiler.cpu_module import write_cpu_module
from kiln.compiler.export import export_program
from kiln.compiler.op_modules import op_modules
from kiln.compiler.passes import PassContext, run_passes
from kiln.compiler.passes.quantize_linears import quantized_layers
from kiln.compiler.program_spec import CacheShape, ProgramSpec
from kiln.compiler.verify import check_programs_agree
from kiln.config import BuildConfig, torch_dtype
from kiln.engine.manifest import (
    COMPILED,
    FORMAT_VERSION,
    EncoderDecoderFacts,
    KVCacheFacts,
    Manifest,
    ModelFacts,
    MultimodalFacts,
    QuantizationFacts,
    WorldFacts,
    describe_device,
    write_manifest,
)
from kiln.engine.program_files import ProgramWrite
from kiln.engine.program_index import write_index
from kiln.engine.programs import lifted_state
from kiln.errors import UnsupportedModelError
from kiln.kernels.selection import selected
from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.progress import Progress
from kiln.version import __version__


def check_cache_shape(program: torch.export.ExportedProgram, shape: CacheShape, what: str) -> None:
    """The keys each attention site produces must fit the cache layout derived from the config."""
    for node in program.graph_module.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.kiln.attention_site.default:
            _, heads, dim = node.args[1].meta["val"].shape
            value_dim = node.args[2].meta["val"].shape[2]
            if (heads, dim, value_dim) != (shape.num_kv_heads, shape.head_dim, shape.head_dim):
                raise UnsupportedModelError(
                    f"{what} layer {node.args[3]} has keys of {heads} heads x {dim} (values {value_dim}), "
                    f"but its config says {shape.num_kv_heads} x {shape.head_dim}; "
                    "kiln needs one cache layout for all layers"
                )


@dataclass(frozen=True)
class PreparedProgram:
    """The program as it is written, {pass: "16 sites"} of the passes that changed it, and the dense
    weights it reads quantized."""

    program: torch.export.ExportedProgram
    passes: dict[str, str] = field(default_factory=dict)
    quantized_layers: tuple[str, ...] = ()


def prepare_program(
    spec: ProgramSpec,
    config: BuildConfig,
    progress: Progress,
    quantized: QuantizedLinears | None = None,
    kv_scales: tuple[tuple[float, float], ...] | None = None,
) -> PreparedProgram:
    """Export, check and (for a program with a KV cache) rewrite; the build lists the passes that changed it.
    `quantized`: a checkpoint's (or AWQ's) quantized linears, which the quantization pass puts in place."""
    suffix = spec.stage_suffix
    with progress.stage(f"export{suffix}", f"torch.export, {spec.what}"):
        program = export_program(spec)
        if spec.cache is not None:
            check_cache_shape(program, spec.cache, spec.architecture)
    if not spec.passes or spec.cache is None:
        return PreparedProgram(program)
    context = PassContext(
        architecture=spec.architecture,
        num_layers=spec.cache.num_layers,
        input_names=spec.input_names,
        build=config,
        quantized=quantized,
        kv_scales=kv_scales,
    )
    with progress.stage(f"passes{suffix}"):
        run = run_passes(program, context)
    for name, change in run.summary().items():
        progress.note(f"{name}: {change}")
    return PreparedProgram(run.program, run.summary(), tuple(quantized_layers(run.program)))


@dataclass(frozen=True)
class WrittenProgram:
    """What the manifest records of a written program."""

    compiled: bool
    op_modules: dict[str, tuple[str, ...]]  # {operator: modules whose import registers it} (see op_modules)
    passes: dict[str, str] = field(default_factory=dict)  # {pass: "16 sites"}: the passes that changed it
    quantized_layers: tuple[str, ...] = ()  # the dense weights it reads quantized


def write_program(
    program: torch.export.ExportedProgram,
    spec: ProgramSpec,
    engine_dir: Path,
    config: BuildConfig,
    progress: Progress,
) -> WrittenProgram:
    """Write the program into its directory of `engine_dir`, its weights in the background while Inductor
    compiles it (when `config.compile`) and the compiled program is verified."""
    suffix = spec.stage_suffix
    directory = engine_dir / spec.directory
    imports = op_modules(program)
    for op, modules in imports.items():
        progress.note(f"operator {op}: a new process imports {', '.join(modules)}")
    with progress.stage(f"write{suffix}", "program; its weights go on in the background"):
        writing = ProgramWrite(program, directory)
    with writing, selected(pdl=config.pdl):  # compile and verify launch kernels as the engine will
        if config.compile:
            with progress.stage(f"compile{suffix}", f"Inductor on {_device_type(spec)}"):
                inductor.compile_program(program, directory / COMPILED, combo_kernels=config.combo_kernels)
                write_index(program, directory)  # what the compiled load needs, without torch.export.load
            with progress.stage(f"verify{suffix}", "compiled vs captured program"):
                agreement = check_programs_agree(
                    program, directory / COMPILED, spec.verify_inputs, torch_dtype(config.dtype)
                )
                progress.note(str(agreement))
            if _device_type(spec) == "cpu":
                with progress.stage(f"cpu module{suffix}", "the output code, loadable without torch._inductor"):
                    progress.note(write_cpu_module(directory / COMPILED, lifted_state(program), spec.verify_inputs))
            progress.note(f"compiled program: {(directory / COMPILED).stat().st_size / 1e6:.1f} MB")
        with progress.stage(f"write weights{suffix}", "waiting for the background write"):
            writing.wait()
    return WrittenProgram(compiled=config.compile, op_modules=imports)


def build_program(
    spec: ProgramSpec,
    engine_dir: Path,
    config: BuildConfig,
    progress: Progress,
    quantized: QuantizedLinears | None = None,
    kv_scales: tuple[tuple[float, float], ...] | None = None,
) -> WrittenProgram:
    """The whole pipeline for one program. The caller hands its spec over (`build_program(make_spec(...), ...)`,
    keeping no reference to it or its module): the source weights the passes replaced (fused projections)
    are then freed before the program is written and compiled."""
    prepared = prepare_program(spec, config, progress, quantized, kv_scales)
    spec = spec.exported()  # drops the last reference to the source module
    gc.collect()  # torch.export's tracer keeps it in a reference cycle
    written = write_program(prepared.program, spec, engine_dir, config, progress)
    return dataclasses.replace(written, passes=prepared.passes, quantized_layers=prepared.quantized_layers)


def _device_type(spec: ProgramSpec) -> str:
    return spec.args[0].device.type if spec.args else "cpu"


@dataclass(frozen=True, kw_only=True)
class EngineFacts:
    """What the manifest records besides versions and the device: the resolved config, the model, the programs."""

    config: BuildConfig
    model: ModelFacts
    compiled: bool
    multimodal: MultimodalFacts | None = None
    source_checkpoint: str | None = None
    op_modules: dict[str, tuple[str, ...]] = field(default_factory=dict)  # of all the engine's programs
    passes: dict[str, str] = field(default_factory=dict)  # {pass: "16 sites"} of the LLM program
    quantization: QuantizationFacts | None = None
    world: WorldFacts | None = None  # tensor-parallel engines only
    encoder_decoder: EncoderDecoderFacts | None = None
    kv_cache: KVCacheFacts | None = None


def write_engine_manifest(engine_dir: Path, facts: EngineFacts, device: torch.device, progress: Progress) -> Manifest:
    """The engine's manifest.json, with this kiln's, torch's and transformers' versions and the stage timings."""
    manifest = Manifest(
        kiln_version=__version__,
        torch_version=torch.__version__,
        transformers_version=__import__("transformers").__version__,
        format_version=FORMAT_VERSION,
        device=describe_device(device),
        build=facts.config,
        model=facts.model,
        compiled=facts.compiled,
        timings_s=dict(progress.timings),
        multimodal=facts.multimodal,
        source_checkpoint=facts.source_checkpoint,
        op_modules=facts.op_modules,
        passes=facts.passes,
        quantization=facts.quantization,
        world=facts.world,
        encoder_decoder=facts.encoder_decoder,
        kv_cache=facts.kv_cache,
    )
    write_manifest(engine_dir, manifest)
    return manifest
