"""``document_ids``: packed documents, each attended exactly as if it were alone.

The defining property (docs/semantics.md, "Packed sequences"): the packed call's rows of each
document equal the call on that document's slice alone.  Checked against the float64 loop oracle
(which computes each document on its own) over random document lengths — 1 token, shorter than
b, exactly b, many blocks — both modes, padding, routing and windows, with gradients, on every
backend that runs here; and the refusals.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle
from conftest import assert_max_error, grads_of
from globalattn import GlobalAttention, PooledKVCache, attention_weights, explain_backend, global_attention

BLOCK = 4


def packed_ids(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """(B, S) ids, each row its documents' ids in order (ids need not start at 0 nor be consecutive)."""
    rows = [torch.repeat_interleave(torch.arange(len(lens)) * 3 + 7, torch.tensor(lens)) for lens in lengths_per_row]
    return torch.stack(rows)


def inputs(batch, seq_len, *, masked, dtype=torch.float64, requires_grad=False):
    q = torch.randn(batch, 4, seq_len, 8, dtype=dtype)
    k, v = torch.randn(batch, 2, seq_len, 8, dtype=dtype), torch.randn(batch, 2, seq_len, 6, dtype=dtype)
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    return q, k, v, (torch.rand(batch, seq_len) > 0.3) if masked else None


# Documents of 1 token, shorter than b, exactly b, and several blocks, in two rows of 24 positions.
LENGTHS = [[1, 3, 4, 9, 7], [13, 1, 2, 4, 4]]
OPTIONS = {
    "bidir": dict(),
    "bidir-separate": dict(remainder="separate"),
    "own": dict(scope="own"),
    "causal": dict(causal=True),
    "window": dict(window=3),
    "causal-window": dict(causal=True, window=6),
    "routing": dict(top_blocks=1),
    "causal-routing-window": dict(causal=True, top_blocks=2, window=2),
}


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding"])
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_each_document_as_if_alone(backend, options, masked):
    ids = packed_ids(LENGTHS)
    q, k, v, key_mask = inputs(2, 24, masked=masked, requires_grad=True)
    out, lse = global_attention(q, k, v, BLOCK, key_mask=key_mask, document_ids=ids, return_lse=True, backend=backend,
                                **options)  # fmt: skip
    ref = oracle.attention(q, k, v, BLOCK, key_mask=key_mask, document_ids=ids, **options)
    assert_max_error(out, ref.out, 1e-10, "out")
    assert_max_error(lse, ref.lse, 1e-10, "lse")

    # Gradients: those of the documents computed one at a time (the reference, checked elsewhere).
    upstream = (torch.randn_like(out), torch.randn_like(lse))
    got = grads_of((out, lse), (q, k, v), upstream)
    alone_out, alone_lse = torch.zeros_like(out), torch.zeros_like(lse)
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            doc = slice(start, start + n)
            mask = None if key_mask is None else key_mask[row : row + 1, doc]
            piece = global_attention(q[row : row + 1, :, doc], k[row : row + 1, :, doc], v[row : row + 1, :, doc],
                                     BLOCK, key_mask=mask, return_lse=True, backend="reference", **options)  # fmt: skip
            alone_out[row : row + 1, :, doc], alone_lse[row : row + 1, :, doc] = piece
            start += n
    empty = torch.isneginf(alone_lse)  # rows that see nothing: compare their gradients through zeros
    exact = grads_of((alone_out, alone_lse.masked_fill(empty, 0)), (q, k, v), (upstream[0], upstream[1]))
    for name, g, e in zip(("dq", "dk", "dv"), got, exact):
        assert_max_error(g, e, 1e-10, name)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 11), min_size=1, max_size=6),
    block_size=st.integers(1, 6),
    causal=st.booleans(),
    window=st.none() | st.integers(1, 8),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_packing_matches_the_oracle(lengths, block_size, causal, window, masked, seed):
    torch.manual_seed(seed)
    ids = packed_ids([lengths])
    q, k, v, key_mask = inputs(1, sum(lengths), masked=masked)
    options = dict(causal=causal, window=window, key_mask=key_mask)
    ref = oracle.attention(q, k, v, block_size, document_ids=ids, **options).out
    assert_max_error(global_attention(q, k, v, block_size, document_ids=ids, **options), ref, 1e-10, "out")


@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(causal=True, window=5)], ids=str)
def test_flex_forward_matches_the_oracle(options, monkeypatch):
    """flex on the CPU runs forward only; tiles of 4 spread documents over several tiles."""
    import globalattn.backends.flex as flex

    monkeypatch.setattr(flex, "TILE", 4)
    ids = packed_ids(LENGTHS)
    q, k, v, key_mask = inputs(2, 24, masked=True, dtype=torch.float32)
    with torch.no_grad():
        out = global_attention(q, k, v, BLOCK, key_mask=key_mask, document_ids=ids, backend="flex", **options)
    ref = oracle.attention(q, k, v, BLOCK, key_mask=key_mask, document_ids=ids, **options)
    assert_max_error(out, ref.out, 1e-5, "out")


def test_one_document_is_the_plain_call():
    q, k, v, key_mask = inputs(2, 19, masked=True)
    ids = torch.full((2, 19), 5)
    for causal in (False, True):
        plain = global_attention(q, k, v, BLOCK, causal=causal, key_mask=key_mask)
        packed = global_attention(q, k, v, BLOCK, causal=causal, key_mask=key_mask, document_ids=ids)
        torch.testing.assert_close(packed, plain, rtol=0, atol=1e-12)


def test_attention_weights_and_the_layer_see_documents():
    ids = packed_ids(LENGTHS)
    q, k, _, _ = inputs(2, 24, masked=False)
    weights = attention_weights(q, k, BLOCK, causal=True, document_ids=ids)
    # Row 1's first document (13 tokens, 4 blocks) and then four short ones: 8 blocks; row 0: 1+1+1+3+2 = 8 too
    assert weights.shape == (2, 4, 24, 24 + 8)
    allowed = weights[..., :24] > 0
    doc = ids[:, :, None] == ids[:, None, :]  # (B, S, S): the same document
    assert not (allowed & ~doc[:, None]).any(), "a key of another document is seen"
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 24, dtype=weights.dtype))

    layer = GlobalAttention(16, 2, block_size=BLOCK, causal=True, dtype=torch.float64)
    x = torch.randn(2, 24, 16, dtype=torch.float64)
    packed, _ = layer(x, document_ids=ids)
    first, _ = layer(x[:1, :1])  # row 0's first document is one token
    torch.testing.assert_close(packed[:1, :1], first, rtol=0, atol=1e-12)
    start = sum(LENGTHS[1][:2])  # row 1's third document
    third, _ = layer(x[1:, start : start + LENGTHS[1][2]])
    torch.testing.assert_close(packed[1:, start : start + LENGTHS[1][2]], third, rtol=0, atol=1e-12)


def test_refusals():
    q, k, v, _ = inputs(2, 10, masked=False)
    good = packed_ids([[4, 6], [10]])
    refused = {
        "must be an integer tensor": good.float(),
        r"must have shape \(B, S\) = \(2, 10\)": good[:, :9],
        "non-decreasing along S.*row 0 goes from 10 to 7 at position 5": torch.cat([good[:, :5], good[:, :5]], 1),
    }
    for message, ids in refused.items():
        with pytest.raises(ValueError, match=message):
            global_attention(q, k, v, BLOCK, document_ids=ids)
    with pytest.raises(ValueError, match="L == S"):
        global_attention(q[:, :, 3:], k, v, BLOCK, document_ids=good)
    extra = (k[:, :, :2], v[:, :, :2], torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="extra_global_tokens"):
        global_attention(q, k, v, BLOCK, document_ids=good, extra_global_tokens=extra)
    with pytest.raises(ValueError, match="document_ids are not supported"):
        global_attention(q.float(), k.float(), v.float(), BLOCK, document_ids=good, backend="triton")
    assert explain_backend(q, k, v, BLOCK, document_ids=good)[0] == "torch"
    layer = GlobalAttention(16, 2, block_size=BLOCK, causal=True)
    with pytest.raises(ValueError, match="document_ids go with neither cache"):
        layer(torch.randn(1, 3, 16), document_ids=good[:1, :3], cache=PooledKVCache())


def test_an_empty_batch_with_documents():
    q, k, v, _ = inputs(0, 6, masked=False)
    ids = torch.zeros(0, 6, dtype=torch.long)
    assert global_attention(q, k, v, BLOCK, document_ids=ids).shape == (0, 4, 6, 6)
    assert attention_weights(q, k, BLOCK, document_ids=ids).shape[:3] == (0, 4, 6)
