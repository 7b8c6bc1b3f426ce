"""The FlexAttention backend (backends/flex.py): results against the float64 oracle, and its BlockMask.

On the CPU, flex_attention runs eagerly: it evaluates the mask_mod on every cell, ignores the
tiles, and (torch 2.13) has no backward pass.  So here:

- forward tests go through ``global_attention(..., backend="flex")``;
- gradient tests call FlexAttention's higher-order op directly (what flex_attention runs eagerly,
  autograd included) through the backend's ``_flex_function`` seam;
- the tiles are tested on their own: expanded with the mask_mod they give exactly the oracle's
  pattern; they stay few at S = 131072; and torch's compiled CPU kernel, which does skip the tiles
  a BlockMask leaves out, agrees with the oracle.

On CUDA (tests marked gpu) everything runs through ``torch.compile(flex_attention)``.
"""

from __future__ import annotations

import math
import shutil
import time
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention.flex_attention import AuxOutput, BlockMask, create_mask, flex_attention

import globalattn.backends.flex as flex
from conftest import (
    DTYPE_IDS,
    FORWARD_ATOL,
    GRID,
    LSE_ATOL,
    SEED,
    Case,
    assert_empty_rows_are_zero,
    assert_gradients_match_dense_float64,
    assert_max_error,
    case_params,
    in_layout,
    max_error,
)
from globalattn import global_attention, options, spec

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def flex_with_cpu_backward(query, key, value, *, block_mask, scale, enable_gqa, return_aux):
    """flex_attention's eager path without its CPU guard: the higher-order op, whose autograd
    (FlexAttention's own math backward) works on the CPU although the public function refuses."""
    from torch.nn.attention.flex_attention import _apply_kernel_options, _identity, flex_attention_hop

    kernel_options = _apply_kernel_options(query, key, value, False, None, return_aux)
    out, lse_log2, _ = flex_attention_hop(query, key, value, _identity, block_mask.as_tuple(), scale, kernel_options)
    return out, AuxOutput(lse=lse_log2 * math.log(2), max_scores=None)  # the op's lse is in log2 units


def attend_flex(case: Case, q, k, v, key_mask, monkeypatch=None):
    """(out, lse) of the flex backend for this case, skipped where the backend refuses the inputs
    (CUDA float64, say); on the CPU with gradients, through the seam above."""
    if q.device.type == "cpu" and q.requires_grad:
        monkeypatch.setattr(flex, "_flex_function", lambda device: flex_with_cpu_backward)
        return flex.attention(q, k, v, options.resolve(q, k, v, case.b, key_mask=key_mask, **case.options()))
    return case.attend("flex", q, k, v, key_mask, return_lse=True)  # skips where flex refuses


# -- results (the forward pass over the grid of conftest cases runs in test_backends.py) ---------------------------


@pytest.mark.parametrize("case", case_params([c for c in GRID if c.L < c.S or c.mask]))
def test_forward_with_small_tiles(case, monkeypatch):
    """Tiles of 3: several key and global tiles, padding columns inside the sequence's last tile,
    row tiles that start mid-block (L < S), per-batch real columns (key_mask)."""
    monkeypatch.setattr(flex, "TILE", 3)
    q, k, v, key_mask = case.inputs(torch.float32)
    out, lse = case.attend("flex", q, k, v, key_mask, return_lse=True)
    ref = case.oracle(q, k, v, key_mask)
    assert_empty_rows_are_zero(out, lse, ref)
    assert_max_error(out, ref.out, FORWARD_ATOL[torch.float32], "out")
    assert_max_error(lse, ref.lse, LSE_ATOL[torch.float32], "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", case_params(GRID))
def test_gradients_match_dense_float64(case, dtype, device, monkeypatch):
    """As in test_backends.py, where flex's CPU gradients skip (the public function refuses them)."""
    q, k, v, key_mask = case.inputs(dtype, device, requires_grad=True)
    out, lse = attend_flex(case, q, k, v, key_mask, monkeypatch)
    assert_gradients_match_dense_float64(case, (q, k, v), key_mask, out, lse)


LAYOUTS = ["transposed", "sliced", "expanded", "fused_qkv", "column_major_mask"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_user_layouts_match_the_oracle(layout, monkeypatch):
    """Values and gradients (through the seam) on the strided views users pass, and a column-major
    key_mask.  Strided layouts without a mask: zeroing the padding would hand flex dense copies."""
    case = Case(B=2, Hq=2, Hkv=2, L=19, S=19, D=16, b=5, mask="random" if layout == "column_major_mask" else None)
    q, k, v, key_mask = case.inputs(torch.float32)
    if layout == "column_major_mask":
        key_mask = key_mask.t().contiguous().t()
    else:
        q, k, v = in_layout(q, k, v, layout)
    with torch.no_grad():  # the public path, forward only on the CPU
        out = case.attend("flex", q, k, v, key_mask)
    assert_max_error(out, case.oracle(q, k, v, key_mask).out, FORWARD_ATOL[torch.float32], "out")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = attend_flex(case, q, k, v, key_mask, monkeypatch)
    assert_gradients_match_dense_float64(case, (q, k, v), key_mask, out, lse)


def test_no_queries():
    q, k, v = torch.randn(2, 4, 0, 8, requires_grad=True), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 3)
    with torch.no_grad():
        out, lse = global_attention(q, k, v, 4, backend="flex", return_lse=True)
    assert out.shape == (2, 4, 0, 3) and lse.shape == (2, 4, 0) and lse.dtype == torch.float32


# -- what it refuses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, reason",
    [
        (dict(top_blocks=1), "top_blocks"),
        (dict(dropout_p=0.1), "dropout"),
        (dict(causal=True, top_blocks=2), "top_blocks"),
    ],
)
def test_refuses_what_it_cannot_compute(extra, reason):
    q, k, v, _ = SEED.inputs(torch.float32)
    with pytest.raises(ValueError, match=rf"backend='flex' cannot compute this call: {reason}.*; backend='torch' can"):
        global_attention(q, k, v, 5, backend="flex", **extra)
    global_attention(q, k, v, 5, backend="torch", **extra)  # the fallback named does compute it


def test_refuses_gradients_on_the_cpu():
    q, k, v, _ = SEED.inputs(torch.float32, requires_grad=True)
    with pytest.raises(ValueError, match="no backward pass on the CPU.*backend='torch' can"):
        global_attention(q, k, v, 5, backend="flex")
    with torch.no_grad():  # without gradients the same inputs are fine
        torch.testing.assert_close(global_attention(q, k, v, 5, backend="flex"), global_attention(q, k, v, 5))


def fake_tensor(device, dtype, *shape):
    """What ``unsupported`` reads of a tensor, for devices this machine may not have."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=shape, requires_grad=False)


def test_unsupported_reasons_on_cuda():
    def reason(dtype=torch.bfloat16, head_dim=64, value_dim=64, device="cuda"):
        q, k = fake_tensor(device, dtype, 1, 4, 8, head_dim), fake_tensor(device, dtype, 1, 2, 8, head_dim)
        plain = options.AttentionOptions(block_size=4, causal=False, scope="all", remainder="merge", key_mask=None,
                                         scale=1.0)  # fmt: skip
        return flex.unsupported(q, k, fake_tensor(device, dtype, 1, 2, 8, value_dim), plain)

    if reason() is not None:  # only where triton is missing
        assert "triton" in reason()
        return
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert reason(dtype) is None
    assert reason(head_dim=59, value_dim=61) is None  # not a power of two: FlexAttention pads it
    assert "float64" in reason(torch.float64)
    assert "at least 16" in reason(head_dim=8) and "Dv=8" in reason(value_dim=8)
    assert "meta" in reason(device="meta")


# -- the BlockMask ------------------------------------------------------------------------------------

STRUCTURE_CASES = [
    *GRID,
    Case(B=1, Hq=1, Hkv=1, L=40, S=40, D=2, b=9),  # merge: a last block of 13
    Case(B=1, Hq=1, Hkv=1, L=23, S=40, D=2, b=6, causal=True),  # query tiles start mid-block
    Case(B=1, Hq=1, Hkv=1, L=29, S=40, D=2, b=7, scope="own", remainder="separate"),
    Case(B=2, Hq=1, Hkv=1, L=40, S=40, D=2, b=8, mask="block"),
]


def plan_for(case: Case, key_mask, tile: int):
    """The backend's plan and BlockMask (with this key_mask's real columns) for ``case``."""
    remainder = case.resolved_remainder
    masked = key_mask is not None
    plan = flex._uniform_plan(
        case.S, case.L, case.b, remainder, masked, 0, case.causal, case.scope, case.window, tile, torch.device("cpu")
    )
    if key_mask is None:
        return plan, plan.block_mask
    _, present = spec.pool_blocks((torch.zeros(case.B, 1, case.S, 1),), case.b, remainder, key_mask)
    return plan, plan.with_real_columns(key_mask, present)


def listed_tiles(num_blocks, indices, tile: int) -> torch.Tensor:
    """(B or 1, 1, R, C) bool: the tiles of a (kv_num_blocks, kv_indices) pair."""
    return BlockMask.from_kv_blocks(num_blocks, indices, BLOCK_SIZE=tile, compute_q_blocks=False).to_dense().bool()


def as_cells(tiles: torch.Tensor, tile: int, shape) -> torch.Tensor:
    return tiles.repeat_interleave(tile, -2).repeat_interleave(tile, -1)[..., : shape[0], : shape[1]]


def visible_cells(block_mask: BlockMask, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a block-sparse kernel computes: cells of partial tiles where the mask_mod says so, and
    every cell of full tiles.  Returns visible (B, L, N), and listed (R, C): the tiles it reads."""
    q_len, n = block_mask.seq_lengths
    tile = block_mask.BLOCK_SIZE[0]
    partial = listed_tiles(block_mask.kv_num_blocks, block_mask.kv_indices, tile)
    full = torch.zeros_like(partial)
    if block_mask.full_kv_num_blocks is not None:
        full = listed_tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, tile)
    assert not (partial & full).any(), "a tile listed as both partial and full"
    mask = create_mask(block_mask.mask_mod, batch, 1, q_len, n, device="cpu")  # (B, 1, L, N)
    visible = (as_cells(partial, tile, (q_len, n)) & mask) | as_cells(full, tile, (q_len, n))
    return visible[:, 0], (partial | full)[0, 0]


@pytest.mark.parametrize("tile", [1, 3, 4, 16])
@pytest.mark.parametrize("case", case_params(STRUCTURE_CASES))
def test_tiles_with_the_mask_mod_give_the_oracle_pattern(case, tile):
    key_mask = case.key_mask()
    q, k, v = (torch.randn(case.B, 1, n, 1, dtype=torch.float64) for n in (case.L, case.S, case.S))
    allowed = case.oracle(q, k, v, key_mask).allowed  # (B, L, S + G)
    plan, block_mask = plan_for(case, key_mask, tile)
    visible, listed = visible_cells(block_mask, case.B)  # (B, L, N), (R, C)

    num_global = allowed.shape[-1] - case.S
    columns = torch.cat([torch.arange(case.S), plan.key_columns + torch.arange(num_global)])  # of S + G in N
    assert torch.equal(visible[..., columns], allowed)
    padding = torch.ones(visible.shape[-1], dtype=torch.bool)
    padding[columns] = False
    assert not visible[..., padding].any(), "a padding column is visible"
    if key_mask is None:  # tight: every tile read holds a cell that some query sees
        rows = torch.zeros(listed.shape[0] * tile, visible.shape[-1], dtype=torch.bool)
        rows[: case.L] = visible[0]
        seen = rows.unflatten(0, (-1, tile)).unflatten(-1, (-1, tile)).any(-1).any(1)  # (R, C)
        assert torch.equal(listed, seen)


def test_full_tiles_where_provable():
    """Tiles that need no mask_mod are listed as full; with a key_mask none can be."""
    tile, blocks = 16, 16  # S = 256, b = 16: one block per tile, and the 16 global tokens fill one tile
    bidir, _ = plan_for(Case(B=1, L=256, S=256, b=16), None, tile)
    assert (bidir.block_mask.kv_num_blocks == 0).all() and (bidir.block_mask.full_kv_num_blocks == 2).all()
    causal = plan_for(Case(B=1, L=256, S=256, b=16, causal=True), None, tile)[1]
    # the own block's tile is a triangle, and the global tile holds the own block's token and later ones
    assert causal.kv_num_blocks.flatten().tolist() == [1] + [2] * (blocks - 1) and causal.full_kv_num_blocks is None
    causal_long = plan_for(Case(B=1, L=2048, S=2048, b=16, causal=True), None, tile)[1]  # 128 global tokens
    full = causal_long.full_kv_num_blocks.flatten()  # complete global tiles before the row tile's block
    assert full.tolist() == [c // tile for c in range(2048 // tile)]
    masked = plan_for(Case(B=1, L=256, S=256, b=16), torch.ones(1, 256, dtype=torch.bool), tile)[1]
    assert masked.full_kv_num_blocks is None and (masked.kv_num_blocks == 2).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_block_mask_is_small_at_128k_tokens(causal):
    """S = 131072, b = 128: a few tiles per row tile, built from block indices in well under a
    second, with nothing near S x S in size."""
    seq_len, tile = 131072, flex.TILE
    flex._uniform_plan.cache_clear()
    start = time.perf_counter()
    plan, block_mask = plan_for(Case(B=1, L=seq_len, S=seq_len, b=128, causal=causal), None, tile)
    seconds = time.perf_counter() - start
    assert seconds < 1.0, f"building the BlockMask took {seconds:.2f} s"
    assert plan.key_columns == seq_len and plan.global_columns == 1024  # G = 1024 global tokens, 8 tiles
    per_row = block_mask.kv_num_blocks + (0 if block_mask.full_kv_num_blocks is None else block_mask.full_kv_num_blocks)
    assert per_row.max() <= 10  # its own key tile (two, causal) and the 8 global tiles
    assert block_mask.sparsity() > 99.0
    tensors = [getattr(block_mask, name) for name in BlockMask._TENSOR_ATTRS]
    tensors += list(plan.tables.values())
    entries = sum(t.numel() for t in tensors if t is not None)
    assert entries < 1e7  # 4 index tensors of (S/T) x (S/T + G/T), and O(S) tables: 4.9e6; S^2 is 1.7e10


def test_plan_is_cached_and_shared_with_key_masks():
    flex._uniform_plan.cache_clear()
    case = SEED.replace(mask="random")
    q, k, v, key_mask = case.inputs(torch.float32)
    with torch.no_grad():
        for _ in range(3):
            case.attend("flex", q, k, v, None)
        first = case.attend("flex", q, k, v, key_mask)
        assert flex._uniform_plan.cache_info().misses == 2  # one plan without and one with a key_mask
        other_mask = ~key_mask
        other_mask[:, 0] = True
        second = case.attend("flex", q, k, v, other_mask)  # same plan, other real columns
    info = flex._uniform_plan.cache_info()
    assert (info.misses, info.hits) == (2, 3)
    assert not torch.allclose(first, second)
    assert_max_error(second, case.oracle(q, k, v, other_mask).out, FORWARD_ATOL[torch.float32], "out")


# One case for the compiled kernel (compiling takes several seconds): row tiles that start
# mid-block (L < S), full and partial key tiles, global tiles, grouped queries.
COMPILED_CPU_CASE = Case(B=2, Hq=2, Hkv=1, L=150, S=160, D=16, b=32, causal=True)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_cpu_kernel_follows_the_tiles():
    """torch's compiled CPU kernel (inference only: no lse, no backward) reads only the tiles the
    BlockMask lists, and full ones without the mask_mod, as the CUDA kernels do: with our tiles it
    computes the oracle's result, and without one of them it does not."""
    # 16: with 8-wide tiles the compiled kernel is wrong on a CPU without AVX-512 whatever the mask
    # (torch 2.13 on an AMD EPYC: off by 1.8 on a plain causal mask; 16 and up are exact there).
    case, tile = COMPILED_CPU_CASE, 16
    q, k, v, key_mask = case.inputs(torch.float32)
    plan, block_mask = plan_for(case, key_mask, tile)
    assert block_mask.full_kv_num_blocks.sum() > 0 and block_mask.kv_num_blocks.sum() > 0
    (key_global, value_global), _ = spec.pool_blocks((k, v), case.b, case.resolved_remainder, key_mask)
    keys, values = flex._columns(k, key_global, plan), flex._columns(v, value_global, plan)
    compiled = torch.compile(flex_attention, dynamic=False)

    def attend(block_mask):
        return compiled(q, keys, values, block_mask=block_mask, scale=case.scale_value(), enable_gqa=True)

    exact = case.oracle(q, k, v, key_mask).out
    assert_max_error(attend(block_mask), exact, FORWARD_ATOL[torch.float32], "out")
    fewer = block_mask.kv_num_blocks.clone()
    fewer[..., -1] -= 1  # the last row tile loses a partial tile
    dropped = BlockMask.from_kv_blocks(
        fewer,
        block_mask.kv_indices,
        block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices,
        BLOCK_SIZE=tile,
        mask_mod=block_mask.mask_mod,
        seq_lengths=block_mask.seq_lengths,
    )
    assert max_error(attend(dropped), exact) > 1e-3  # the premise: the kernel skips unlisted tiles
