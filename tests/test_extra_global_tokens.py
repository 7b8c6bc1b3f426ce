"""``extra_global_tokens``: the global tokens of blocks outside a call, in the call's one softmax.

The defining property (docs/semantics.md, "Global tokens from outside the call"): cut a sequence
at block boundaries, attend over one piece with the global tokens of the blocks outside it (causal:
those before it) as extra tokens, and get the whole sequence's rows of that piece.  Checked against
the float64 oracle of the whole sequence, forward and gradients, on every backend that runs here;
the decoding cache and context parallelism are built on exactly this.
"""

from __future__ import annotations

import pytest
import torch

import globalattn.backends.flex as flex
import oracle
from conftest import Case, assert_max_error, case_params, dense_attention, grads_of
from globalattn import attention_weights, global_attention

BASE = Case(B=2, Hq=4, Hkv=2, L=30, S=30, D=8, b=5, remainder="separate", mask="random")
GRID = [
    BASE,
    BASE.replace(causal=True),
    BASE.replace(mask=None, Hkv=1, Dv=6),
    BASE.replace(causal=True, mask="block", S=33, L=33),  # a short last block, an absent first one
    BASE.replace(remainder="merge", S=33, L=33),  # the piece that ends the sequence holds the merged tail
    BASE.replace(b=1, S=9, L=9, scale=0.7),
]
# (first block, one past the last block) of the piece: the start, the middle, the end, a single block
PIECES = [(0, 2), (2, 4), (4, 6), (3, 4)]


def piece_and_extras(case: Case, q, k, v, key_mask, blocks: tuple[int, int], ref: oracle.Result):
    """The piece's q, k, v, mask, and as extra tokens the global tokens of the blocks outside it,
    pooled with the oracle's own pooling matrix (differentiable, independent of globalattn)."""
    bounds = oracle.blocks(case.S, case.b, case.resolved_remainder)
    first, last = blocks[0], min(blocks[1], len(bounds))
    lo, hi = bounds[first][0], bounds[last - 1][1]
    outside = list(range(first)) + ([] if case.causal else list(range(last, len(bounds))))
    pool = ref.pool[:, outside].to(q.dtype)[:, None]  # (B, 1, T, S)
    extras = (pool @ k, pool @ v, ref.present[:, outside])
    mask = None if key_mask is None else key_mask[:, lo:hi]
    return slice(lo, hi), (q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], mask), extras


@pytest.mark.parametrize("blocks", PIECES, ids=[f"blocks{a}-{b}" for a, b in PIECES])
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", case_params(GRID))
def test_a_piece_with_the_other_blocks_as_extra_tokens_is_the_whole_call(case, backend, blocks):
    q, k, v, key_mask = case.inputs(requires_grad=True)
    ref = case.oracle(q, k, v, key_mask)
    rows, (q_p, k_p, v_p, mask_p), extras = piece_and_extras(case, q, k, v, key_mask, blocks, ref)
    options = dict(causal=case.causal, remainder=case.remainder, scale=case.scale, key_mask=mask_p)
    out, lse = global_attention(q_p, k_p, v_p, case.b, extra_global_tokens=extras, return_lse=True, backend=backend,
                                **options)  # fmt: skip
    assert_max_error(out, ref.out[:, :, rows], 1e-10, "out")
    assert_max_error(lse, ref.lse[:, :, rows], 1e-10, "lse")

    # Gradients reach q, k and v through the piece and through the extra tokens' pooling.
    upstream = (torch.randn_like(out), torch.randn_like(lse))
    got = grads_of((out, lse), (q, k, v), upstream)
    exact_out, exact_lse = dense_attention(q, k, v, ref, case.scale_value())
    exact = grads_of((exact_out[:, :, rows], exact_lse[:, :, rows]), (q, k, v), upstream)
    for name, g, e in zip(("dq", "dk", "dv"), got, exact):
        assert_max_error(g, e, 1e-10, name)


@pytest.mark.parametrize("tile", [2, 128], ids=["tiles2", "tiles128"])
@pytest.mark.parametrize("case", case_params([BASE, BASE.replace(causal=True)]))
def test_flex_forward_matches_the_whole_call(case, tile, monkeypatch):
    """flex on the CPU runs forward only (its backward needs CUDA); the same property, float32.
    Tiles of 2 spread the extra and the call's own global tokens over several tiles."""
    monkeypatch.setattr(flex, "TILE", tile)
    q, k, v, key_mask = case.inputs(dtype=torch.float32)
    ref = case.oracle(q, k, v, key_mask)
    rows, (q_p, k_p, v_p, mask_p), extras = piece_and_extras(case, q, k, v, key_mask, (2, 4), ref)
    with torch.no_grad():
        out = global_attention(q_p, k_p, v_p, case.b, causal=case.causal, remainder=case.remainder, key_mask=mask_p,
                               extra_global_tokens=extras, backend="flex")  # fmt: skip
    assert_max_error(out, ref.out[:, :, rows], 1e-5, "out")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_absent_extra_tokens_change_nothing_whatever_they_hold(backend):
    q, k, v, _ = BASE.inputs()
    extra_key, extra_value = torch.randn(2, 2, 3, 8, dtype=torch.float64), torch.randn(2, 2, 3, 8, dtype=torch.float64)
    present = torch.tensor([[True, False, True], [False, False, True]])
    clean = global_attention(q, k, v, 5, extra_global_tokens=(extra_key, extra_value, present), backend=backend)
    garbage = (extra_key.masked_fill(~present[:, None, :, None], float("nan")),
               extra_value.masked_fill(~present[:, None, :, None], float("inf")), present)  # fmt: skip
    dirty = global_attention(q, k, v, 5, extra_global_tokens=garbage, backend=backend)
    assert torch.isfinite(dirty).all() and torch.equal(dirty, clean)
    # Only the present ones count: batch row 1 as if given its third token alone.
    alone = (extra_key[1:, :, 2:], extra_value[1:, :, 2:], present[1:, 2:])
    torch.testing.assert_close(clean[1:], global_attention(q[1:], k[1:], v[1:], 5, extra_global_tokens=alone,
                               backend=backend), rtol=0, atol=1e-12)  # fmt: skip


def test_a_row_that_sees_only_extra_tokens_is_not_empty():
    """Causal, every key of the piece padded: the rows see the earlier blocks' tokens alone."""
    q, k, v, _ = BASE.replace(causal=True, mask=None).inputs()
    extras = (torch.randn(2, 2, 2, 8, dtype=torch.float64), torch.randn(2, 2, 2, 8, dtype=torch.float64),
              torch.ones(2, 2, dtype=torch.bool))  # fmt: skip
    nothing_real = torch.zeros(2, 30, dtype=torch.bool)
    out = global_attention(q, k, v, 5, causal=True, key_mask=nothing_real, extra_global_tokens=extras)
    # Every row's softmax over the same two tokens (no query-dependent mask): per row, a mix of the two values.
    weights = torch.softmax(q @ extras[0].repeat_interleave(2, 1).transpose(-1, -2) / 8**0.5, dim=-1)
    torch.testing.assert_close(out, weights @ extras[1].repeat_interleave(2, 1), rtol=0, atol=1e-12)


def test_refusals():
    q, k, v, _ = BASE.inputs()
    good = (torch.randn(2, 2, 3, 8, dtype=torch.float64), torch.randn(2, 2, 3, 8, dtype=torch.float64),
            torch.ones(2, 3, dtype=torch.bool))  # fmt: skip
    refused = {
        "must be a tuple": [good[0]],
        "key must be a floating-point tensor": (good[0][0], good[1], good[2]),
        "key has dtype torch.float32": (good[0].float(), good[1], good[2]),
        r"\(B, Hkv, D\) = \(2, 2, 8\)": (good[0][:, :1], good[1], good[2]),
        r"value must have shape \(B, Hkv, N, Dv\) = \(2, 2, 3\)": (good[0], good[1][:, :, :2], good[2]),
        "present must be a bool tensor of shape": (good[0], good[1], good[2].float()),
    }
    for message, extras in refused.items():
        with pytest.raises(ValueError, match=message):
            global_attention(q, k, v, 5, extra_global_tokens=extras)
    with pytest.raises(ValueError, match="value has Dv=8 but value has Dv=6"):
        global_attention(q, k, v[..., :6], 5, extra_global_tokens=good)
    with pytest.raises(ValueError, match='scope="own"'):
        global_attention(q, k, v, 5, scope="own", extra_global_tokens=good)
    with pytest.raises(ValueError, match="top_blocks"):
        global_attention(q, k, v, 5, top_blocks=1, extra_global_tokens=good)
    with pytest.raises(ValueError, match="attention_weights takes no extra_global_tokens"):
        attention_weights(q, k, 5, extra_global_tokens=good)
