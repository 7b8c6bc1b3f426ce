"""What is particular to the Triton kernels (the grid of conftest cases runs in test_backends.py).

Without a GPU the kernels run under TRITON_INTERPRET=1 (conftest sets it), in float32 and float16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (
    CUDA,
    DTYPE_IDS,
    FORWARD_ATOL,
    GRAD_RTOL,
    LSE_ATOL,
    SEED,
    Case,
    assert_gradients_match_dense_float64,
    assert_max_error,
    case_params,
    grads_of,
    in_layout,
)
from globalattn import backends, explain_backend, global_attention, options

triton_backend = pytest.importorskip("globalattn.backends.triton")
# Without a GPU the kernels run on CPU tensors under the interpreter (conftest sets it); on a GPU the
# tests that pass CPU tensors would only meet the backend's refusal, and the gpu tests run them compiled.
ON_CPU = pytest.mark.skipif(not triton_backend.INTERPRETED, reason="runs the kernels on CPU tensors, interpreted")

# Several tiles of queries, keys and global tokens at the interpreter's 16 x 16 tiles, global
# tokens' gradients summed over slices of rows, and blocks both shorter and longer than a tile.
LONG = [
    Case(B=1, Hq=4, Hkv=2, L=70, S=70, D=16, b=7),
    Case(B=1, Hq=4, Hkv=2, L=70, S=70, D=16, b=23, causal=True, mask="random"),
    Case(B=2, Hq=2, Hkv=1, L=50, S=90, D=16, b=20, scope="own", mask="block"),
]
# Windows (docs/semantics.md, "A sliding window of raw keys") whose key ranges start and end inside
# tiles and span several: each kernel's range (forward and dQ per query tile, dK and dV per key
# tile: the queries within w) must hold every pair the window allows.  "block" pads the start.
WINDOWS = [
    Case(B=1, Hq=4, Hkv=2, L=70, S=70, D=16, b=7, causal=True, mask="block", window=1),  # empty rows
    Case(B=1, Hq=4, Hkv=2, L=70, S=70, D=16, b=23, causal=True, mask="random", window=5),  # w < b
    Case(B=1, Hq=4, Hkv=2, L=70, S=70, D=16, b=7, window=20),  # w > b, three key tiles per query tile
    Case(B=2, Hq=2, Hkv=1, L=50, S=90, D=16, b=20, scope="own", mask="block", window=20),  # w = b, L < S
    Case(B=1, Hq=2, Hkv=1, L=45, S=70, D=16, b=16, causal=True, window=17),  # one past a tile, L < S
    Case(B=1, Hq=2, Hkv=1, L=70, S=70, D=16, b=9, remainder="separate", mask="random", window=16),  # w = tile
    Case(B=1, Hq=2, Hkv=2, L=70, S=70, D=16, b=10, mask="random", window=70),  # w = S: every key
    Case(B=1, Hq=2, Hkv=2, L=60, S=70, D=16, b=10, causal=True, window=100),  # w > S: every earlier key
]
# In the forward, tiles that every row of a query tile sees skip the per-pair test: global tokens
# beyond two of the interpreter's 16-wide tiles (bidirectionally all but the last tile, causally
# those before the tile's first block), raw keys of blocks longer than a tile and the middle of a
# wide window; the rest take it (the merged tail block, the causal diagonal, any key mask).  The
# backward tests every tile, so its gradients check the forward's lse too.
INTERIOR_TILES = [
    Case(B=1, Hq=4, Hkv=2, L=150, S=150, D=16, b=4),  # 37 global tokens: two tiles without the test
    Case(B=1, Hq=2, Hkv=1, L=150, S=150, D=16, b=4, causal=True),  # rows of blocks 16 on skip it
    Case(B=1, Hq=2, Hkv=1, L=300, S=300, D=16, b=17, causal=True),  # a tile starting in block 15
    Case(B=2, Hq=2, Hkv=2, L=100, S=150, D=16, b=4, causal=True, window=6),  # L < S
    Case(B=1, Hq=2, Hkv=1, L=150, S=150, D=16, b=4, mask="block"),  # padding: every tile takes the test
    Case(B=1, Hq=4, Hkv=2, L=100, S=100, D=16, b=32),  # key tiles inside a block; a merged tail
    Case(B=1, Hq=2, Hkv=1, L=100, S=100, D=16, b=32, causal=True),  # key tiles before the rows
    Case(B=1, Hq=2, Hkv=1, L=90, S=100, D=16, b=32, window=40),  # inside the window, L < S
    Case(B=1, Hq=2, Hkv=1, L=100, S=100, D=16, b=8, causal=True, window=40),
    # the last query tile (rows 96, 97) starts its keys at 97 - w: just outside row 97's window
    Case(B=1, Hq=2, Hkv=1, L=98, S=98, D=16, b=8, window=20),
    Case(B=1, Hq=2, Hkv=1, L=98, S=98, D=16, b=8, causal=True, window=20),
]


def test_the_kernels_run_here():
    """CI has no GPU: if the interpreter were off, every triton test would skip and nothing would say so."""
    q = torch.randn(1, 1, 4, 16, device="cuda" if torch.cuda.is_available() else "cpu")
    assert backends.get("triton").unsupported(q, q, q, options.resolve(q, q, q, 4)) is None


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Triton's GPU compiler accepts every kernel in every tile configuration a run may pick, at the
    shapes users run (bf16 D = 128 and 256, fp32, fp16 at lengths not divisible by 16; windows,
    masks, GQA), as the launcher specialises them, and each fits an H100's shared memory without
    spilling registers: what the interpreter cannot check, checked without a GPU."""
    compiled_as_run = ("TRITON_INTERPRET", "GLOBALATTN_TRITON_AUTOTUNE")  # for the GPU, every configuration
    env = {name: value for name, value in os.environ.items() if name not in compiled_as_run}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    script = Path(__file__).with_name("compile_for_gpu.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    for shape in ("bf16-d128-bidirectional", "bf16-d256-causal", "f32-d128-bidirectional", "f16-d64-own-window-odd"):
        compiled = {r["kernel"] for r in records if r["shape"] == shape}
        assert compiled == {"forward", "row_terms", "query_grad", "global_grad", "key_grad"}, (shape, compiled)
    tuned = [r for r in records if r["kernel"] == "forward" and r["shape"] == "bf16-d128-bidirectional"]
    assert len(tuned) == len(triton_backend.FORWARD_TILES[(128, 2)])  # every configuration, not the first alone
    too_big = [r for r in records if not 0 < r["shared"] <= 227 * 1024 or r["spill_bytes"] > 0]
    assert not too_big, too_big


@ON_CPU
@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(top_blocks=1), "top_blocks is not supported"),
        (dict(dropout_p=0.1), "dropout is not supported"),
        (dict(dtype=torch.float64), "dtype torch.float64 is not supported"),
        (dict(head_dim=300), "head dims above 256"),
        (dict(extra_tokens=True), "extra_global_tokens are not supported"),
    ],
)
def test_refusals_name_the_reason_and_the_fallback(change, reason):
    dtype, head_dim = change.pop("dtype", torch.float32), change.pop("head_dim", 16)
    q = torch.randn(1, 2, 8, head_dim, dtype=dtype)
    if change.pop("extra_tokens", False):
        change["extra_global_tokens"] = (q[:, :, :2], q[:, :, :2], torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"backend='triton' cannot compute this call: {reason}.*backend='torch' can"):
        global_attention(q, q, q, 4, backend="triton", **change)


def run(case, q, k, v, key_mask, upstream):
    out, lse = case.attend("triton", q, k, v, key_mask, return_lse=True)
    return (out, lse, *grads_of((out, lse), (q, k, v), upstream))


@ON_CPU
@pytest.mark.parametrize("case", case_params(LONG))
def test_many_tiles_match_the_torch_backend(case):
    q, k, v, key_mask = case.inputs(torch.float32, requires_grad=True)
    out = case.attend("torch", q, k, v, key_mask, return_lse=True)
    upstream = (torch.randn_like(out[0]), torch.randn_like(out[1]))
    expected = (*out, *grads_of(out, (q, k, v), upstream))
    for name, got, exact in zip(("out", "lse", "dq", "dk", "dv"), run(case, q, k, v, key_mask, upstream), expected):
        assert_max_error(got, exact, 2e-5 * max(1.0, exact.abs().max().item()), name)


@ON_CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", case_params(WINDOWS + INTERIOR_TILES))
def test_tile_edges_match_the_oracle(case, dtype):
    q, k, v, key_mask = case.inputs(dtype, requires_grad=True)
    out, lse = case.attend("triton", q, k, v, key_mask, return_lse=True)
    ref = case.oracle(q, k, v, key_mask)
    assert_max_error(out, ref.out, FORWARD_ATOL[dtype], "out")
    assert_max_error(lse, ref.lse, LSE_ATOL[dtype], "lse")
    assert_gradients_match_dense_float64(case, (q, k, v), key_mask, out, lse)


@ON_CPU
def test_deterministic():
    """No atomics: the same call twice gives the same bits, gradients included."""
    case = LONG[0]
    q, k, v, key_mask = case.inputs(torch.float32, requires_grad=True)
    upstream = (torch.randn(1, 4, 70, 16), torch.randn(1, 4, 70))
    for first, second in zip(run(case, q, k, v, key_mask, upstream), run(case, q, k, v, key_mask, upstream)):
        assert torch.equal(first, second)


@ON_CPU
def test_strided_inputs():
    """Queries in the (B, S, H, D) layout of a projection, viewed as (B, H, S, D)."""
    case = SEED.replace(D=16, mask="random")
    q, k, v, key_mask = case.inputs(torch.float32)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    assert not strided[0].is_contiguous()
    expected = case.attend("triton", q, k, v, key_mask)
    assert torch.equal(case.attend("triton", *strided, key_mask), expected)


# Two query tiles at the interpreter's 16 rows; one shape for all, as a fused QKV buffer needs.
LAYOUT_CASE = Case(B=2, Hq=2, Hkv=2, L=19, S=19, D=16, b=5)
LAYOUTS = ["transposed", "sliced", "expanded", "fused_qkv", "column_major_mask"]


def layout_inputs(layout: str, dtype):
    """Random (q, k, v, key_mask) of LAYOUT_CASE in a user's memory layout (see in_layout), each view
    a leaf that requires grad.  The strided layouts go without a mask: zeroing the padding would
    hand the kernels fresh dense tensors; the mask's own layout is tested with dense inputs."""
    case = LAYOUT_CASE.replace(mask="random") if layout == "column_major_mask" else LAYOUT_CASE
    q, k, v, key_mask = case.inputs(dtype)
    if layout == "column_major_mask":
        key_mask = key_mask.t().contiguous().t()
        assert not key_mask.is_contiguous()
    else:
        q, k, v = in_layout(q, k, v, layout)
    return case, *(x.requires_grad_() for x in (q, k, v)), key_mask


@ON_CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_user_layouts_match_the_oracle(layout, dtype):
    """Values and gradients on strided views: the gradient buffers once took the inputs' strides
    (an expanded key read uninitialised memory, a fused-QKV view was written past its end), and a
    column-major key_mask was read as if row-major."""
    case, q, k, v, key_mask = layout_inputs(layout, dtype)
    out, lse = case.attend("triton", q, k, v, key_mask, return_lse=True)
    ref = case.oracle(q, k, v, key_mask)
    assert_max_error(out, ref.out, FORWARD_ATOL[dtype], "out")
    assert_max_error(lse, ref.lse, LSE_ATOL[dtype], "lse")
    assert_gradients_match_dense_float64(case, (q, k, v), key_mask, out, lse)


@ON_CPU
def test_expanded_key_gradient_sums_over_heads():
    """A key broadcast over heads gets the sum of its heads' gradients (autograd's expand)."""
    case = LAYOUT_CASE
    q, k, v, _ = case.inputs(torch.float32, requires_grad=True)
    shared = k[:, :1].detach().requires_grad_()  # (B, 1, S, D)
    out = case.attend("triton", q, shared.expand_as(k), v, None)
    upstream = torch.randn_like(out)
    (got,) = grads_of(out, (shared,), upstream)
    exact = shared.detach().double().requires_grad_()
    ref_out = case.attend("reference", q.detach().double(), exact.expand_as(k), v.detach().double(), None)
    (expected,) = grads_of(ref_out, (exact,), upstream.double())
    assert_max_error(got, expected, GRAD_RTOL[torch.float32] * max(1.0, expected.abs().max().item()), "dk")


@ON_CPU
@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("empty", ["B", "Hq"])
def test_empty_batch_or_heads(backend, empty):
    batch, q_heads = (0, 2) if empty == "B" else (2, 0)
    q, k, v = torch.randn(batch, q_heads, 7, 16), torch.randn(batch, 2, 7, 16), torch.randn(batch, 2, 7, 16)
    out, lse = global_attention(q, k, v, 3, return_lse=True, backend=backend)
    assert out.shape == (batch, q_heads, 7, 16) and lse.shape == (batch, q_heads, 7)


@ON_CPU
def test_compiles_as_one_graph():
    """The kernels are custom ops: torch.compile traces through forward and backward without a break."""
    case = SEED.replace(D=16, causal=True)
    q, k, v, _ = case.inputs(torch.float32, requires_grad=True)

    def loss(q, k, v):
        return global_attention(q, k, v, case.b, causal=True, backend="triton").square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_auto_is_torch_off_cuda():
    q = torch.randn(1, 2, 8, 16)
    name, passed_over = explain_backend(q, q, q, 4)
    assert name == "torch" and passed_over == ["inputs are on cpu, and the fused backends are for CUDA"]


@pytest.mark.gpu
@CUDA
def test_auto_prefers_triton_on_cuda():
    q = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    assert explain_backend(q, q, q, 64) == ("triton", [])
    name, passed_over = explain_backend(q, q, q, 64, top_blocks=2)
    assert name == "torch" and passed_over[0] == "triton: top_blocks is not supported"


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_realistic_size_on_gpu(causal, dtype):
    """A long sequence at a real head dim, against the torch backend in float32 (on the GPU)."""
    case = Case(B=2, Hq=8, Hkv=2, L=4000, S=4096, D=128, b=128, causal=causal, mask="random")
    q, k, v, key_mask = case.inputs(dtype, "cuda", requires_grad=True)
    out, lse = case.attend("triton", q, k, v, key_mask, return_lse=True)
    upstream = (torch.randn_like(out), torch.randn_like(lse))
    got = (out, lse, *grads_of((out, lse), (q, k, v), upstream))
    exact_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    exact_out = case.attend("torch", *exact_inputs, key_mask, return_lse=True)
    exact = (*exact_out, *grads_of(exact_out, exact_inputs, [u.float() for u in upstream]))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, exact):
        assert_max_error(a, b, 2e-2 * max(1.0, b.abs().max().item()), name)


@pytest.mark.gpu
@CUDA
def test_more_batch_heads_than_a_grid_dimension_holds():
    """B * H > 65535, CUDA's cap on a grid's second and third dimensions: the grids are one-dimensional."""
    case = Case(B=2, Hq=32769, Hkv=32769, L=20, S=20, D=16, b=8, causal=True)
    q, k, v, _ = case.inputs(torch.float16, "cuda", requires_grad=True)
    out = case.attend("triton", q, k, v, None)
    upstream = torch.randn_like(out)
    exact_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    exact = case.attend("torch", *exact_inputs, None)
    for name, got, expected in zip(
        ("out", "dq", "dk", "dv"), (out, *grads_of(out, (q, k, v), upstream)),
        (exact, *grads_of(exact, exact_inputs, upstream.float())),
    ):  # fmt: skip
        assert_max_error(got, expected, 2e-2 * max(1.0, expected.abs().max().item()), name)


@pytest.mark.parametrize("setting, tf32", [("highest", False), ("high", True), ("medium", True)])
def test_float32_products_follow_pytorchs_matmul_precision(setting, tf32):
    """float32 runs in TF32 exactly where PyTorch lets its own matmuls (and FlexAttention) use it."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        assert backends.float32_uses_tf32() == tf32
        q = torch.randn(1, 2, 8, 16)
        assert triton_backend._static_args(q, q, None, False, False)["DOT_PRECISION"] == ("tf32" if tf32 else "ieee")
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.gpu
@CUDA
def test_auto_sends_full_precision_float32_to_flex():
    q = torch.randn(1, 2, 256, 64, device="cuda")
    name, passed_over = explain_backend(q, q, q, 64)
    assert name == "flex" and passed_over[0].startswith("triton: float32 in full precision is not supported")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert explain_backend(q, q, q, 64) == ("triton", [])
    finally:
        torch.set_float32_matmul_precision(before)
