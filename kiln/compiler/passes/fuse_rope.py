"""Apply the rotary embedding inside the fused q/k/v projection that produces the heads.

    qkv = kiln.[rms_norm_]linear(x, ..., W_qkv)
    q = qkv[..., a:b].view(1, T, -1, D).transpose(1, 2)
    q = q * cos[:, None] + cat(-q[..., D/2:], q[..., :D/2]) * sin[:, None]        (and k alike)
      -> qkv = kiln.linear_rope(x, W_qkv, ..., cos, sin, rope_width)
         q = qkv[..., a:b].view(1, T, -1, D).transpose(1, 2)                    (already rotated)

That is transformers' `apply_rotary_pos_emb` with `rotate_half` (Llama, Mistral, Qwen2, Gemma and
their kin), matched op by op on the exported graph. Inductor ran it as two kernels per layer (the
rotated half through a transposed temporary); at one row the projection's kernel now rotates each
(d, d + D/2) pair in its epilogue, and at more rows one Triton pass follows the projection.

A projection is rewritten only when every column range it feeds is either rotated by this
pattern, with one cos/sin pair for all of them, or passed on untouched, and the rotated ranges
are its first columns (q, then k, then v). Partial rotary (Phi, GPT-NeoX), interleaved rotary,
heads normalised before rotation (Qwen3, Gemma 3) and multimodal rotary have other graphs and are
left alone. Needs `small_batch_linear` (and `fuse_rms_norm` before it, to keep the norm fused).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

import kiln.kernels  # noqa: F401  (registers the kiln ops)
from kiln.compiler.passes.context import (
    PassContext,
    PassResult,
    projection_args,
    real_users,
    replace_with_call,
    rewrite_matches,
)

aten = torch.ops.aten
BIG = 2**62  # a slice's open end is a huge int in exported graphs


@dataclass(frozen=True)
class _Rotation:
    begin: int  # the projection's columns [begin, end) hold these heads
    end: int
    heads: torch.fx.Node  # view(...).transpose(1, 2) of the slice: [1, H, T, D]
    output: torch.fx.Node  # the rotated heads (the add)
    cos: torch.fx.Node  # [1, T, D] tables that the pattern unsqueezes
    sin: torch.fx.Node


@dataclass(frozen=True)
class _Found:
    rotations: tuple[_Rotation, ...]
    rope_width: int


def _val(node: object) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _same(a: object, b: object) -> bool:
    """Two sizes are equal for every value of their symbols."""
    return bool(statically_known_true(a == b))  # type: ignore[arg-type]


def _single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = real_users(node)
    return users[0] if len(users) == 1 else None


def _last_dim_slice(node: torch.fx.Node, source: torch.fx.Node) -> tuple[int, int] | None:
    """(begin, end) when node = source[..., begin:end] (step 1), else None."""
    if node.target != aten.slice.Tensor or node.kwargs or node.args[0] is not source:
        return None
    value = _val(source)
    args = list(node.args) + [0, None, None, 1][len(node.args) - 1 :]
    dim, begin, end, step = args[1:5]
    begin = 0 if begin is None else begin
    if value is None or dim not in (-1, value.dim() - 1) or step != 1 or not isinstance(begin, int):
        return None
    width = value.shape[-1]
    end = width if end is None or (isinstance(end, int) and end >= BIG) else end
    if not isinstance(end, int) or not 0 <= begin < end <= width:
        return None
    return begin, end


def _unsqueezed_table(node: object, like: torch.Tensor) -> torch.fx.Node | None:
    """T where node = T.unsqueeze(1) and T is [1, tokens, D] in the heads' dtype."""
    if not isinstance(node, torch.fx.Node) or node.target != aten.unsqueeze.default or node.args[1:] != (1,):
        return None
    table = node.args[0]
    value = _val(table)
    if not isinstance(table, torch.fx.Node) or value is None or value.dtype != like.dtype:
        return None
    if value.dim() != 3 or not all(_same(a, b) for a, b in zip(value.shape, (1, like.shape[2], like.shape[3]))):
        return None
    return table


def _product(node: object, operand: torch.fx.Node, like: torch.Tensor) -> torch.fx.Node | None:
    """The table T when node = operand * T.unsqueeze(1) (either order), with node's only user the sum."""
    if not isinstance(node, torch.fx.Node) or node.target != aten.mul.Tensor or node.kwargs:
        return None
    for a, b in (node.args, tuple(reversed(node.args))):
        if a is operand:
            return _unsqueezed_table(b, like)
    return None


def _rotation(slice_node: torch.fx.Node, begin: int, end: int) -> _Rotation | None:
    """The rotary embedding applied to the heads in slice_node, if that is all that reads them."""
    view = _single_user(slice_node)
    if view is None or view.target not in (aten.view.default, aten.reshape.default):
        return None
    heads = _single_user(view)
    value = _val(heads)
    if heads is None or heads.target != aten.transpose.int or tuple(heads.args[1:]) not in ((1, 2), (2, 1)):
        return None
    if value is None or value.dim() != 4 or value.shape[0] != 1:
        return None
    head_dim = value.shape[3]
    if head_dim % 2 or (end - begin) % head_dim:
        return None
    half = head_dim // 2
    users = real_users(heads)
    if len(users) != 3:
        return None
    halves: dict[tuple[int, int], torch.fx.Node] = {}
    direct = None
    for user in users:
        span = _last_dim_slice(user, heads)
        if span is not None:
            halves[span] = user
        elif user.target == aten.mul.Tensor:
            direct = user
    first, second = halves.get((0, half)), halves.get((half, head_dim))
    if direct is None or first is None or second is None:
        return None
    cos = _product(direct, heads, value)
    neg = _single_user(second)
    if cos is None or neg is None or neg.target != aten.neg.default:
        return None
    cat = _single_user(neg)
    if cat is None or cat.target != aten.cat.default or cat.kwargs:
        return None
    parts = cat.args[0]
    if not isinstance(parts, (list, tuple)) or list(parts) != [neg, first]:
        return None
    if len(cat.args) > 1 and cat.args[1] not in (-1, 3):
        return None
    if len(real_users(first)) != 1:
        return None
    rotated = _single_user(cat)
    sin = _product(rotated, cat, value) if rotated is not None else None
    total = _single_user(direct)
    if sin is None or rotated is None or total is None or total.target != aten.add.Tensor or total.kwargs:
        return None
    if set(total.args) != {direct, rotated} or _single_user(rotated) is not total:
        return None
    total_value = _val(total)
    if total_value is None or total_value.shape != value.shape or total_value.dtype != value.dtype:
        return None
    return _Rotation(begin=begin, end=end, heads=heads, output=total, cos=cos, sin=sin)


def _match(node: torch.fx.Node) -> _Found | None:
    """The rotations that read the projection's output, when they cover its first columns."""
    has_residual = node.target == torch.ops.kiln.linear.default and len(node.args) > 4 and node.args[4] is not None
    if node.kwargs or has_residual:
        return None
    value = _val(node)
    if value is None or value.dim() != 3 or value.shape[0] != 1:
        return None
    rotations: list[_Rotation] = []
    plain: list[tuple[int, int]] = []
    for user in real_users(node):
        span = _last_dim_slice(user, node)
        if span is None:
            return None
        rotation = _rotation(user, *span)
        if rotation is None:
            plain.append(span)
        else:
            rotations.append(rotation)
    if not rotations:
        return None
    rotations.sort(key=lambda r: r.begin)
    width = 0
    for rotation in rotations:
        if rotation.begin != width or rotation.cos is not rotations[0].cos or rotation.sin is not rotations[0].sin:
            return None
        width = rotation.end
    if any(begin < width for begin, _ in plain):
        return None
    return _Found(rotations=tuple(rotations), rope_width=width)


def fuse_rope(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """rope(kiln.[rms_norm_]linear(x, W)) -> kiln.linear_rope(x, W, ..., cos, sin) (no rotary kernels)."""

    def rewrite(graph: torch.fx.Graph, node: torch.fx.Node, found: _Found) -> None:
        rotation = found.rotations[0]
        args = (*projection_args(node), rotation.cos, rotation.sin, found.rope_width)
        replace_with_call(graph, node, torch.ops.kiln.linear_rope.default, args)
        for rotation in found.rotations:  # the heads now read rotated columns; the rotation dies
            rotation.output.replace_all_uses_with(rotation.heads)

    result = PassResult(program)
    for target in (torch.ops.kiln.rms_norm_linear.default, torch.ops.kiln.linear.default):
        result = result.then(rewrite_matches(result.program, target, _match, rewrite))
    return result


__all__ = ["fuse_rope"]
