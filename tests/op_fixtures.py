"""Operators outside torch's and kiln's namespaces, registered on import as third-party code does."""

from __future__ import annotations

import torch


@torch.library.custom_op("kilntest::scaled", mutates_args=())
def scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * factor


@scaled.register_fake
def _(x: torch.Tensor, factor: float) -> torch.Tensor:
    return torch.empty_like(x)


library = torch.library.Library("kilntest_lib", "DEF")  # the older Library API: define + impl
library.define("shifted(Tensor x) -> Tensor")
library.impl("shifted", lambda x: x + 1, "CompositeExplicitAutograd")
