"""Send the linears of a CUDA fp16/bf16 program through `kiln::linear` (a Triton GEMV for decode-sized batches)."""

from __future__ import annotations

from collections.abc import Callable

import torch

import kiln.kernels  # noqa: F401  (registers torch.ops.kiln.linear)
from kiln.compiler.passes.context import (
    PassContext,
    PassResult,
    copy_graph,
    nodes_calling,
    replace_with_call,
    with_graph,
)
from kiln.kernels.linear import KERNEL_DTYPES

LINEAR = torch.ops.aten.linear.default


def pays_off(node: torch.fx.Node) -> bool:
    """A linear whose x and 2-D weight are CUDA fp16/bf16 tensors of one dtype, the weight rows contiguous.

    On an H100 the op's one-row kernel beat cuBLAS for every Llama-3.2-1B / 3.1-8B projection
    and lm_head (1.01-1.5x, benchmarks/linear_kernels.py); at 2..16 rows the op keeps cuBLAS for
    weights under 32 MiB and above 16 rows it is cuBLAS. On CPU or fp32 the op would only add a
    dispatch to F.linear, so those graphs are left alone.
    """
    x, weight = node.args[0], node.args[1]
    if not isinstance(x, torch.fx.Node) or not isinstance(weight, torch.fx.Node):
        return False
    xv, wv = x.meta.get("val"), weight.meta.get("val")
    if not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor):
        return False
    return wv.is_cuda and wv.dim() == 2 and wv.dtype in KERNEL_DTYPES and xv.dtype == wv.dtype and wv.stride(-1) == 1


def constant_inputs(program: torch.export.ExportedProgram) -> set[str]:
    """Names of the placeholders that hold parameters, unmutated buffers or constants (never written by a kernel)."""
    signature = program.graph_signature
    mutated = set(signature.buffers_to_mutate.values())
    buffers = {name for name, target in signature.inputs_to_buffers.items() if target not in mutated}
    return {*signature.inputs_to_parameters, *buffers, *signature.inputs_to_lifted_tensor_constants}


def rewrite_linears(program: torch.export.ExportedProgram, select: Callable[[torch.fx.Node], bool]) -> PassResult:
    """aten.linear(x, w, b) -> kiln.linear(x, w, b, constant_weight) for each linear node that
    `select` accepts; constant_weight says whether w is a parameter, buffer or constant."""
    if not any(select(n) for n in nodes_calling(program.graph_module.graph, LINEAR)):
        return PassResult(program)
    constants = constant_inputs(program)
    module = copy_graph(program)
    graph = module.graph
    sites = [node for node in nodes_calling(graph, LINEAR) if select(node)]
    for node in sites:
        x, weight, *rest = node.args
        bias = rest[0] if rest else node.kwargs.get("bias")
        constant = isinstance(weight, torch.fx.Node) and weight.op == "placeholder" and weight.name in constants
        replace_with_call(graph, node, torch.ops.kiln.linear.default, (x, weight, bias, constant))
    return PassResult(with_graph(program, module), len(sites))


def small_batch_linear(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """aten.linear -> kiln::linear on CUDA fp16/bf16 weights (Triton at <= 16 rows, cuBLAS above)."""
    return rewrite_linears(program, pays_off)


__all__ = ["constant_inputs", "pays_off", "rewrite_linears", "small_batch_linear"]
