"""outer_products: matrix products over one term become elementwise products, values unchanged."""

from __future__ import annotations

import torch

from kiln.compiler.passes import PassContext, PassResult
from kiln.compiler.passes.context import nodes_calling
from kiln.compiler.passes.outer_products import outer_products

aten = torch.ops.aten
CONTEXT = PassContext(architecture="Test", num_layers=1)


class _Products(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # rotary-style angles (bmm), 2-D outer products (matmul, mm), and a real product over 2 terms
        return torch.bmm(a, b).cos(), torch.matmul(a[0], b[0]), torch.mm(a[0], b[0]), torch.mm(c, c.T)


def test_outer_products_become_multiplications_with_identical_values():
    g = torch.Generator().manual_seed(0)
    a, b, c = (
        torch.randn(1, 32, 1, generator=g),
        1000 * torch.randn(1, 1, 9, generator=g),
        torch.randn(3, 2, generator=g),
    )
    program = torch.export.export(_Products(), (a, b, c))
    result = outer_products(program, CONTEXT)
    rewritten = result.program
    assert result.sites == 3  # two bmm / matmul calls and one mm
    assert not nodes_calling(rewritten.graph, aten.bmm.default)
    assert not nodes_calling(rewritten.graph, aten.matmul.default)
    assert len(nodes_calling(rewritten.graph, aten.mm.default)) == 1  # c @ c.T sums two terms: kept
    assert len(nodes_calling(rewritten.graph, aten.mul.Tensor)) == 3
    for want, got in zip(program.module()(a, b, c), rewritten.module()(a, b, c)):
        assert torch.equal(got, want)


def test_programs_without_outer_products_are_returned_as_they_are():
    program = torch.export.export(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    assert outer_products(program, CONTEXT) == PassResult(program, 0)
