"""`kiln::linear` and its Triton small-M kernel against the PyTorch reference, on fresh random inputs.

On CUDA the kernel runs natively (bf16, fp16, fp32, projection-sized shapes); without a GPU it runs
under triton's CPU interpreter (TRITON_INTERPRET=1, set by this folder's conftest) with small
shapes, in fp32 and fp16 (the interpreter has no bf16 matrix product). Tolerance: max |got - ref|
<= tol * (1 + max |ref|), ref computed in fp32 from the same rounded inputs.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kiln.compiler.passes import PassContext  # noqa: E402
from kiln.compiler.passes.context import nodes_calling  # noqa: E402
from kiln.compiler.passes.small_batch_linear import rewrite_linears, small_batch_linear  # noqa: E402
from kiln.kernels import reference  # noqa: E402
from kiln.kernels.linear import MAX_ROWS, MIN_MULTI_ROW_BYTES, use_kernel  # noqa: E402
from kiln.kernels.selection import selected  # noqa: E402
from kiln.kernels.triton.gemv import linear_triton  # noqa: E402
from kiln.kernels.triton.gemv_config import GemvConfig, default_config  # noqa: E402
from kiln.kernels.triton.tile import interpreting  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}

if not ON_GPU and not interpreting():
    pytest.skip(
        "no GPU, and kiln.kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True
    )

# (M, N, K): one row, a few rows, 16 rows, ragged N and K (masks), rows past one 16-row block
SHAPES = (
    [(1, 3072, 2048), (16, 520, 2048), (7, 1000, 1000), (33, 200, 512)]
    if ON_GPU
    else [(1, 40, 96), (3, 64, 64), (16, 48, 80), (5, 24, 33), (17, 24, 48)]
)
# one row on CUDA cores, two and four rows on CUDA cores, tl.dot, tl.dot with the weight on the left, split K
CONFIGS = [
    GemvConfig(1, 8, 32, 1, 4, 1),
    GemvConfig(2, 4, 16, 2, 4, 1),
    GemvConfig(4, 8, 32, 1, 4, 2),
    GemvConfig(16, 16, 32, 1, 4, 2),
    GemvConfig(16, 64, 16, 3, 4, 3, swap=True),
    GemvConfig(16, 32, 64, 4, 4, 2, swap=True),
    GemvConfig(1, 8, 32, 1, 4, 1, tiles=3),  # column tiles in turn, the last program's partly past N
    GemvConfig(16, 16, 32, 2, 4, 2, tiles=2),
]
KERNEL_DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float16]


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    got, ref = got.float().cpu(), ref.float().cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got - ref).abs().max().item()
    limit = TOLERANCE[dtype] * (1 + ref.abs().max().item())
    assert err <= limit, f"{what}: max error {err:.3g} > {limit:.3g}"


def inputs(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_default_config_matches_reference(shape, bias):
    dtypes = [*KERNEL_DTYPES, torch.float32] if shape == SHAPES[0] or not ON_GPU else KERNEL_DTYPES[:1]
    for dtype in dtypes:
        x, w, b = inputs(*shape, dtype, bias)
        assert_close(linear_triton(x, w, b), reference.linear(x, w, b), dtype, f"{dtype} default")


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}s{c.split_k}{c.swap}t{c.tiles}"
)
def test_every_kernel_variant_matches_reference(config):
    dtypes = [KERNEL_DTYPES[0]] if config.dot or ON_GPU else [torch.float32]
    for i, shape in enumerate(SHAPES):  # with and without bias, by turns
        for dtype in dtypes:
            x, w, b = inputs(*shape, dtype, i % 2 == 1, seed=i)
            assert_close(linear_triton(x, w, b, config), reference.linear(x, w, b), dtype, f"{shape} {dtype}")


def test_strided_input_and_empty_shapes():
    dtype = KERNEL_DTYPES[0]
    x, w, b = inputs(3, 48, 64, dtype, True)
    wide = torch.zeros(3, 128, dtype=dtype, device=DEVICE)
    wide[:, ::2] = x  # x with a column stride of 2
    assert_close(linear_triton(wide[:, ::2], w, b), reference.linear(x, w, b), dtype, "strided x")
    assert linear_triton(x[:0], w, b).shape == (0, 48)
    assert torch.equal(linear_triton(x[:, :0], w[:, :0], b), b.expand(3, 48))


def test_default_config_follows_shapes():
    one = default_config(1, 2048, 8192)
    assert one.block_m == 1 and not one.dot
    few = default_config(16, 2048, 8192)
    assert few.dot and few.split_k > 1  # 32 weight tiles alone would leave most SMs idle
    assert default_config(16, 16384, 2048).split_k == 1
    assert default_config(16, 3072, 2048).split_k == 1  # K = 2048: splitting lost to cuBLAS


def test_one_row_launch_follows_the_projection():
    """prologue_config: two column tiles per program behind a norm and for long rows, o_proj-like
    rows on 4 warps, and nothing of that beyond one row."""
    from kiln.kernels.triton.gemv_config import PROLOGUE_NONE, PROLOGUE_RMS_NORM, prologue_config

    qkv = prologue_config(PROLOGUE_RMS_NORM, 1, 3072, 2048)
    assert (qkv.tiles, qkv.block_k) == (2, 2048)  # the whole normalised row in one tile, used twice
    o_proj = prologue_config(PROLOGUE_NONE, 1, 4096, 4096)
    assert (o_proj.tiles, o_proj.num_warps) == (1, 4)
    assert prologue_config(PROLOGUE_NONE, 1, 2048, 8192).tiles == 2
    assert prologue_config(PROLOGUE_RMS_NORM, 4, 3072, 2048).tiles == 1


def test_op_takes_the_kernel_only_for_few_cuda_rows():
    w = torch.randn(8, 4)
    assert not use_kernel(torch.randn(1, 4), w, None)  # CPU
    if ON_GPU:
        wc = w.to("cuda", torch.bfloat16)
        big = torch.empty(MIN_MULTI_ROW_BYTES // 2 // 4, 4, device="cuda", dtype=torch.bfloat16)
        assert use_kernel(torch.randn(1, 1, 4, device="cuda", dtype=torch.bfloat16), wc, None)
        assert not use_kernel(torch.randn(1, 3, 4, device="cuda", dtype=torch.bfloat16), wc, None)  # small weight
        assert use_kernel(torch.randn(1, 3, 4, device="cuda", dtype=torch.bfloat16), big, None)
        assert not use_kernel(torch.randn(1, MAX_ROWS + 1, 4, device="cuda", dtype=torch.bfloat16), big, None)
        assert not use_kernel(torch.randn(2, 4, device="cuda"), wc.float(), None)  # fp32: cuBLAS
        with selected(linear="reference"):
            assert not use_kernel(torch.randn(1, 4, device="cuda", dtype=torch.bfloat16), wc, None)


@pytest.mark.parametrize("rows", [1, 5, MAX_ROWS, 40])
def test_op_matches_reference_with_leading_dims(rows):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x, w, b = inputs(rows, 96, 64, dtype, True)
    x3 = x.view(1, rows, 64)
    got = torch.ops.kiln.linear(x3, w, b)
    assert got.shape == (1, rows, 96) and got.is_contiguous()
    assert_close(got, reference.linear(x3, w, b), dtype, "op")
    if not use_kernel(x3, w, b):
        assert torch.equal(got, torch.nn.functional.linear(x3, w, b))
    assert torch.equal(torch.ops.kiln.linear(x3, w), torch.ops.kiln.linear(x3, w, None))


def test_fake_output_has_the_real_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, b = inputs(3, 24, 16, torch.float32, True)
    x3 = x.view(1, 3, 16)
    real = torch.ops.kiln.linear(x3, w, b)
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(t) for t in (x3, w, b)]
    with mode:
        fake = torch.ops.kiln.linear(*fakes)
    assert fake.shape == real.shape and fake.stride() == real.stride()


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("rows, n, k", [(1, 1024, 2048), (4, 4096, 4096)])
def test_op_replays_in_a_cuda_graph(rows, n, k):
    x, w, b = inputs(rows, n, k, torch.bfloat16, True)
    assert use_kernel(x, w, b)
    static = x.clone()
    torch.ops.kiln.linear(static, w, b)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.kiln.linear(static, w, b)
    for seed in (1, 2):
        fresh, _, _ = inputs(rows, n, k, torch.bfloat16, False, seed=seed)
        static.copy_(fresh)
        graph.replay()
        assert_close(out, reference.linear(fresh, w, b), torch.bfloat16, f"replay {seed}")


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(64, 96)
        self.down = torch.nn.Linear(96, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.up(x)))


def test_pass_rewrites_only_cuda_half_linears():
    context = PassContext(architecture="Block", num_layers=0)
    x = torch.randn(1, 3, 64)
    program = torch.export.export(_Block().eval(), (x,))
    assert small_batch_linear(program, context).program is program  # CPU fp32 weights: nothing to gain
    result = rewrite_linears(program, lambda node: True)
    forced = result.program
    assert result.sites == 2
    assert len(nodes_calling(forced.graph, torch.ops.kiln.linear.default)) == 2
    assert not nodes_calling(forced.graph, torch.ops.aten.linear.default)
    # Both weights are parameters: the kernel may read them before the previous kernel ends.
    assert [n.args[3] for n in nodes_calling(forced.graph, torch.ops.kiln.linear.default)] == [True, True]
    with torch.no_grad():
        assert torch.equal(forced.module()(x), program.module()(x))
    if ON_GPU:
        block = _Block().eval().to("cuda", torch.bfloat16)
        xc = x.to("cuda", torch.bfloat16)
        cuda_program = torch.export.export(block, (xc,))
        rewritten = small_batch_linear(cuda_program, context).program
        assert len(nodes_calling(rewritten.graph, torch.ops.kiln.linear.default)) == 2
        with torch.no_grad():
            assert_close(rewritten.module()(xc), block(xc), torch.bfloat16, "rewritten block")


class _ComputedWeight(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight * 2.0)


def test_a_computed_weight_is_not_marked_constant():
    x = torch.randn(1, 16)
    program = torch.export.export(_ComputedWeight().eval(), (x,))
    forced = rewrite_linears(program, lambda node: True).program
    (call,) = nodes_calling(forced.graph, torch.ops.kiln.linear.default)
    assert call.args[3] is False
    with torch.no_grad():
        assert torch.equal(forced.module()(x), program.module()(x))


def _prologue_reference(x, weight, prologue, norm_weight, eps, residual):
    if prologue == "silu_mul":
        x = reference.silu_mul(x)
    elif prologue == "rms_norm":
        x = reference.rms_norm(x, norm_weight, eps)
    out = reference.linear(x, weight)
    return out if residual is None else residual + out


@pytest.mark.parametrize("prologue", ["none", "silu_mul", "rms_norm"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize(
    "config", [None, *CONFIGS[:1], *CONFIGS[4:6], CONFIGS[6]], ids=lambda c: "default" if c is None else str(c)
)
def test_prologues_and_residual_match_reference(prologue, with_residual, config):
    dtype = KERNEL_DTYPES[0]
    g = torch.Generator().manual_seed(11)
    for m, n, k in SHAPES[:3]:
        width = 2 * k if prologue == "silu_mul" else k
        x = (torch.randn(m, width, generator=g) * 2).to(DEVICE, dtype)
        w = (torch.randn(n, k, generator=g) * k**-0.5).to(DEVICE, dtype)
        norm_weight = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype) if prologue == "rms_norm" else None
        residual = torch.randn(m, n, generator=g).to(DEVICE, dtype) if with_residual else None
        got = linear_triton(x, w, None, config, prologue=prologue, norm_weight=norm_weight, eps=1e-5, residual=residual)
        want = _prologue_reference(x, w, prologue, norm_weight, 1e-5, residual)
        assert_close(got, want, dtype, f"{prologue} residual={with_residual} {m}x{n}x{k}")


def test_fused_ops_fall_back_to_the_reference_on_cpu():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 16, generator=g)
    w, res = torch.randn(8, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    got = torch.ops.kiln.silu_mul_linear(x, w, None, True, res)
    assert torch.allclose(got, res + torch.nn.functional.linear(reference.silu_mul(x), w))
    norm_w = torch.randn(16, generator=g)
    w16 = torch.randn(8, 16, generator=g)
    got = torch.ops.kiln.rms_norm_linear(x, norm_w, 1e-6, w16, None, True)
    assert torch.allclose(got, torch.nn.functional.linear(reference.rms_norm(x, norm_w, 1e-6), w16))
    got = torch.ops.kiln.linear(x, w16, None, False, res)
    assert torch.allclose(got, res + torch.nn.functional.linear(x, w16))


def test_every_op_takes_the_kernel_path_where_its_rows_allow(monkeypatch):
    """The five ops' Triton path (forced on the CPU under the interpreter; natively on CUDA) against
    their PyTorch path on one row: the same inputs reach the kernel, the outputs keep their shapes."""
    import kiln.kernels.linear as ops

    dtype = KERNEL_DTYPES[0]
    g = torch.Generator().manual_seed(8)
    k, n, head_dim = (64, 48, 16) if not ON_GPU else (2048, 3072, 64)
    x = torch.randn(1, 1, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(DEVICE, dtype)
    w_down = (torch.randn(n, k // 2, generator=g) * k**-0.5).to(DEVICE, dtype)
    norm = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    res = torch.randn(1, 1, n, generator=g).to(DEVICE, dtype)
    cos, sin = (
        torch.rand(1, 1, head_dim, generator=g).to(DEVICE, dtype),
        torch.rand(1, 1, head_dim, generator=g).to(DEVICE, dtype),
    )
    calls = {
        "linear": lambda: torch.ops.kiln.linear(x, w, None, True, res),
        "silu_mul_linear": lambda: torch.ops.kiln.silu_mul_linear(x, w_down, None, True, res),
        "rms_norm_linear": lambda: torch.ops.kiln.rms_norm_linear(x, norm, 1e-5, w, None, True),
        "linear_rope": lambda: torch.ops.kiln.linear_rope(x, w, None, True, norm, 1e-5, cos, sin, 2 * head_dim),
        "linear_silu_mul": lambda: torch.ops.kiln.linear_silu_mul(x, w, None, True, norm, 1e-5),
    }
    for name, call in calls.items():
        monkeypatch.setattr(ops, "use_kernel", lambda *a, **kw: False)
        want = call()
        monkeypatch.setattr(ops, "use_kernel", lambda *a, **kw: True)
        got = call()
        assert_close(got, want, dtype, name)
