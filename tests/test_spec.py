"""The block structure and the global tokens (``globalattn.spec``, ``block_bounds``) against the oracle
and against values written out by hand from docs/semantics.md."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle
from conftest import Case
from globalattn import attention_weights, block_bounds, spec

# -- block bounds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seq_len, block_size, remainder, expected",
    [
        pytest.param(16, 5, "merge", [(0, 5), (5, 10), (10, 16)], id="seed-merge"),
        pytest.param(16, 5, "separate", [(0, 5), (5, 10), (10, 15), (15, 16)], id="seed-separate"),
        pytest.param(7, 10, "merge", [(0, 7)], id="b_gt_S-merge"),
        pytest.param(7, 10, "separate", [(0, 7)], id="b_gt_S-separate"),
        pytest.param(4, 1, "merge", [(0, 1), (1, 2), (2, 3), (3, 4)], id="b1-merge"),
        pytest.param(4, 1, "separate", [(0, 1), (1, 2), (2, 3), (3, 4)], id="b1-separate"),
        pytest.param(12, 4, "merge", [(0, 4), (4, 8), (8, 12)], id="multiple-merge"),
        pytest.param(12, 4, "separate", [(0, 4), (4, 8), (8, 12)], id="multiple-separate"),
        pytest.param(9, 4, "merge", [(0, 4), (4, 9)], id="tail1-merge"),
        pytest.param(11, 4, "merge", [(0, 4), (4, 11)], id="tail3-merge"),
        pytest.param(11, 4, "separate", [(0, 4), (4, 8), (8, 11)], id="tail3-separate"),
        pytest.param(1, 1, "merge", [(0, 1)], id="S1"),
    ],
)
def test_block_bounds_by_hand(seq_len, block_size, remainder, expected):
    assert block_bounds(seq_len, block_size, remainder=remainder) == expected
    assert oracle.blocks(seq_len, block_size, remainder) == expected


def test_block_bounds_default_is_the_seed_rule():
    assert block_bounds(16, 5) == [(0, 5), (5, 10), (10, 16)]


@settings(max_examples=200, deadline=None)
@given(seq_len=st.integers(1, 70), block_size=st.integers(1, 80), remainder=st.sampled_from(spec.REMAINDER_RULES))
def test_blocks_cover_disjoint_contiguous(seq_len, block_size, remainder):
    bounds = block_bounds(seq_len, block_size, remainder=remainder)
    assert bounds[0][0] == 0 and bounds[-1][1] == seq_len  # cover 0 .. S-1
    assert all(end == start for (_, end), (start, _) in zip(bounds, bounds[1:]))  # contiguous, disjoint
    sizes = [end - start for start, end in bounds]
    assert all(size == block_size for size in sizes[:-1])
    if remainder == "separate":
        assert len(bounds) == -(-seq_len // block_size)
        assert 1 <= sizes[-1] <= block_size
    else:
        assert len(bounds) == max(1, seq_len // block_size)
        assert sizes[-1] == seq_len if seq_len < block_size else block_size <= sizes[-1] < 2 * block_size
    assert bounds == oracle.blocks(seq_len, block_size, remainder)


@settings(max_examples=100, deadline=None)
@given(seq_len=st.integers(1, 50), block_size=st.integers(1, 60), remainder=st.sampled_from(spec.REMAINDER_RULES))
def test_spec_block_helpers_agree_with_bounds(seq_len, block_size, remainder):
    bounds = oracle.blocks(seq_len, block_size, remainder)
    starts, ends = spec.block_starts_and_ends(seq_len, block_size, remainder)
    assert list(zip(starts.tolist(), ends.tolist())) == bounds
    assert spec.num_blocks(seq_len, block_size, remainder) == len(bounds)
    blk = spec.block_index(seq_len, block_size, remainder).tolist()
    assert blk == [j for j, (lo, hi) in enumerate(bounds) for _ in range(lo, hi)]


@pytest.mark.parametrize("causal, remainder", [(False, None), (True, None), (False, "separate")])
def test_resolve_remainder(causal, remainder):
    expected = remainder or ("separate" if causal else "merge")
    assert spec.resolve_remainder(causal, remainder) == expected


# -- global tokens ----------------------------------------------------------------------------------

POOL_CASES = [
    Case(B=2, Hkv=2, S=16, D=3, Dv=5, b=5, remainder="merge"),
    Case(B=2, Hkv=2, S=16, D=3, Dv=5, b=5, remainder="separate", mask="random"),
    Case(B=2, Hkv=1, S=13, D=4, b=4, remainder="merge", mask="block"),
    Case(B=2, Hkv=1, S=13, D=4, b=4, remainder="separate", mask="block"),
    Case(B=2, Hkv=2, S=9, D=2, b=3, remainder="separate", mask="empty"),
    Case(B=1, Hkv=3, S=5, D=2, b=8, remainder="merge", mask="random"),
    Case(B=1, Hkv=1, S=6, D=2, b=1, remainder="merge", mask="random"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "case", POOL_CASES, ids=lambda c: f"B{c.B}-Hkv{c.Hkv}-S{c.S}-b{c.b}-{c.resolved_remainder}-mask_{c.mask}"
)
def test_pool_blocks_are_means_of_real_tokens(case, dtype):
    _, k, v, key_mask = case.inputs(dtype)
    (key_global, value_global), present = spec.pool_blocks((k, v), case.b, case.resolved_remainder, key_mask)
    ref = case.oracle(k[:, :, :1], k, v, key_mask)  # any query will do: only the pooling is compared
    assert key_global.dtype == dtype and value_global.dtype == dtype
    assert key_global.shape == ref.key_global.shape and value_global.shape == ref.value_global.shape
    assert torch.equal(present, ref.present)
    tol = dict(rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    torch.testing.assert_close(key_global.double(), ref.key_global, **tol)
    torch.testing.assert_close(value_global.double(), ref.value_global, **tol)
    # A block without a real token has no global token: its mean is zero, and it is marked absent.
    absent = ~present[:, None, :, None]  # (B, 1, G, 1)
    assert absent.any() or case.mask not in ("block", "empty")
    assert (key_global.masked_select(absent) == 0).all() and (value_global.masked_select(absent) == 0).all()


def test_pool_blocks_ignore_padded_values():
    case = Case(B=2, Hkv=2, S=11, D=3, b=4, remainder="merge", mask="block")
    _, k, v, key_mask = case.inputs()
    pooled, _ = spec.pool_blocks((k, v), case.b, "merge", key_mask)
    noise = torch.randn_like(k) * 100
    k2 = torch.where(key_mask[:, None, :, None], k, noise)
    pooled2, _ = spec.pool_blocks((k2, v), case.b, "merge", key_mask)
    torch.testing.assert_close(pooled2[0], pooled[0], rtol=0, atol=1e-12)


# -- who sees what: docs/semantics.md's worked example and api.py's picture, written out by hand ------------


def _seen(weights_row) -> list[int]:
    return torch.nonzero(weights_row).flatten().tolist()


@pytest.mark.parametrize("scope, globals_seen", [("all", [16, 17, 18]), ("own", [16])])
def test_seed_example_fox_sees_its_block_and_globals(scope, globals_seen):
    # 16 tokens, b = 5: blocks [0,5) [5,10) [10,16); "fox" is position 3 in block 0.
    q, k = torch.randn(1, 1, 16, 4, dtype=torch.float64), torch.randn(1, 1, 16, 4, dtype=torch.float64)
    weights = attention_weights(q, k, 5, scope=scope)  # (1, 1, 16, 16 + 3)
    assert weights.shape == (1, 1, 16, 19)
    assert _seen(weights[0, 0, 3]) == [0, 1, 2, 3, 4, *globals_seen]
    assert _seen(weights[0, 0, 12]) == [10, 11, 12, 13, 14, 15, *([16, 17, 18] if scope == "all" else [18])]


def test_causal_picture_of_the_docstring():
    # S = 12, b = 4, causal: q5 sees keys 4, 5 and G0; q9 sees keys 8, 9 and G0, G1; q0 sees key 0.
    q, k = torch.randn(1, 1, 12, 4, dtype=torch.float64), torch.randn(1, 1, 12, 4, dtype=torch.float64)
    weights = attention_weights(q, k, 4, causal=True)  # (1, 1, 12, 12 + 3)
    assert _seen(weights[0, 0, 0]) == [0]
    assert _seen(weights[0, 0, 5]) == [4, 5, 12]
    assert _seen(weights[0, 0, 9]) == [8, 9, 12, 13]


def test_queries_are_bottom_right_aligned():
    # L = 3 < S = 10, b = 4, causal: the rows sit at positions 7, 8, 9 (blocks 1, 2, 2).
    q, k = torch.randn(1, 1, 3, 4, dtype=torch.float64), torch.randn(1, 1, 10, 4, dtype=torch.float64)
    weights = attention_weights(q, k, 4, causal=True)  # (1, 1, 3, 10 + 3)
    assert _seen(weights[0, 0, 0]) == [4, 5, 6, 7, 10]
    assert _seen(weights[0, 0, 1]) == [8, 10, 11]
    assert _seen(weights[0, 0, 2]) == [8, 9, 10, 11]


def test_masked_softmax_over_the_allowed_cells_and_empty_rows():
    """Each row's softmax over its allowed cells alone; a row that sees nothing gets zeros, lse
    -inf and zero gradients, never NaN."""
    scores = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)  # (H, L, keys)
    allowed = torch.rand(5, 12) > 0.4
    allowed[0, :6] = False
    allowed[1] = False  # row 1 sees nothing
    allowed[2, 3] = True
    weights, lse = spec.masked_softmax(scores, allowed)
    for row in (0, 2, 3, 4):
        cells = allowed[row].nonzero()[:, 0]
        expected = torch.zeros(3, 12, dtype=torch.float64)
        expected[:, cells] = torch.softmax(scores[:, row, cells], dim=-1)
        assert torch.allclose(weights[:, row], expected, atol=1e-12)
        assert torch.allclose(lse[:, row], torch.logsumexp(scores[:, row, cells], dim=-1), atol=1e-12)
    assert torch.equal(weights[:, 1], torch.zeros(3, 12, dtype=torch.float64)) and torch.isneginf(lse[:, 1]).all()
    (grad,) = torch.autograd.grad((weights * torch.randn_like(weights)).sum() + lse[:, [0, 2]].sum(), scores)
    assert torch.isfinite(grad).all() and (grad[:, 1] == 0).all()
