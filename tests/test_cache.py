"""PooledKVCache and GlobalAttention(cache=...): feeding a sequence in steps (a prompt that may end
mid-block, single tokens, chunks that cross blocks) gives the rows of causal global attention over the
whole sequence, through the independent oracle; what the cache holds; the O(b + S/b) decode step;
batch reordering; refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle
from globalattn import GlobalAttention
from globalattn import cache as cache_module
from globalattn.cache import PooledKVCache


def sequence(batch=2, q_heads=4, kv_heads=2, length=23, head_dim=6, value_dim=5, dtype=torch.float64):
    """Random query (B, Hq, S, D), key (B, Hkv, S, D), value (B, Hkv, S, Dv) of a whole sequence."""
    return (
        torch.randn(batch, q_heads, length, head_dim, dtype=dtype),
        torch.randn(batch, kv_heads, length, head_dim, dtype=dtype),
        torch.randn(batch, kv_heads, length, value_dim, dtype=dtype),
    )


def padding(batch, length, block_size) -> torch.Tensor:
    """(B, S) bool, True = real: ~30% padding, batch 0's second block all padding (no global token)."""
    real = torch.rand(batch, length) > 0.3
    real[0, block_size : 2 * block_size] = False
    return real


def run_in_steps(cache, q, k, v, steps, block_size, key_mask=None, window=None) -> torch.Tensor:
    """Feed the sequence ``steps`` positions at a time; the outputs of all steps, (B, Hq, S, Dv)."""
    outs, start = [], 0
    for n in steps:
        rows = slice(start, start + n)
        cache.update(k[:, :, rows], v[:, :, rows])
        mask = None if key_mask is None else key_mask[:, rows]
        outs.append(cache.attend(q[:, :, rows], block_size=block_size, window=window, key_mask=mask))
        start += n
    return torch.cat(outs, dim=2)


STEPS = {
    "prompt": [23],
    "tokens": [1] * 23,
    "mid-block-prompt-then-tokens": [6] + [1] * 17,
    "chunks-across-blocks": [3, 9, 1, 1, 7, 2],
    "block-sized-chunks": [4, 4, 4, 4, 4, 3],
}


@pytest.mark.parametrize("steps", list(STEPS.values()), ids=list(STEPS))
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding"])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (4, 1)], ids=["gqa2", "mha", "mqa"])
def test_steps_give_the_whole_sequence(steps, masked, heads):
    block_size = 4
    q, k, v = sequence(q_heads=heads[0], kv_heads=heads[1])
    key_mask = padding(2, 23, block_size) if masked else None
    out = run_in_steps(PooledKVCache(), q, k, v, steps, block_size, key_mask)
    expected = oracle.attention(q, k, v, block_size, causal=True, key_mask=key_mask).out
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(1, 30),
    block_size=st.integers(1, 9),
    cuts=st.lists(st.integers(1, 29), max_size=8),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_split_gives_the_whole_sequence(length, block_size, cuts, masked, seed):
    torch.manual_seed(seed)
    q, k, v = sequence(batch=2, length=length)
    points = sorted({c for c in cuts if c < length} | {0, length})
    steps = [b - a for a, b in zip(points, points[1:])]
    key_mask = (torch.rand(2, length) > 0.3) if masked else None
    out = run_in_steps(PooledKVCache(), q, k, v, steps, block_size, key_mask)
    expected = oracle.attention(q, k, v, block_size, causal=True, key_mask=key_mask).out
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(1, 30),
    block_size=st.integers(1, 9),
    window=st.integers(1, 14),
    cuts=st.lists(st.integers(1, 29), max_size=8),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_split_with_a_window_gives_the_whole_sequence(length, block_size, window, cuts, masked, seed):
    """docs/semantics.md, "A sliding window of raw keys": the last w raw keys beside the pooled blocks."""
    torch.manual_seed(seed)
    q, k, v = sequence(batch=2, length=length)
    points = sorted({c for c in cuts if c < length} | {0, length})
    steps = [b - a for a, b in zip(points, points[1:])]
    key_mask = (torch.rand(2, length) > 0.3) if masked else None
    cache = PooledKVCache()
    out = run_in_steps(cache, q, k, v, steps, block_size, key_mask, window)
    expected = oracle.attention(q, k, v, block_size, causal=True, key_mask=key_mask, window=window).out
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # O(w + b + S/b): raw positions from the block holding the first key the next window reaches.
    assert cache.raw_key.shape[2] == length - max(0, length - window + 1) // block_size * block_size
    assert cache.raw_key.shape[2] < window + block_size and cache.pooled_key.shape[2] == length // block_size


def test_float32_steps_stay_within_rounding():
    q, k, v = sequence(length=40, dtype=torch.float32)
    out = run_in_steps(PooledKVCache(), q, k, v, [13] + [1] * 27, 8)
    expected = oracle.attention(q, k, v, 8, causal=True).out
    torch.testing.assert_close(out, expected.float(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("length", [1, 7, 8, 9, 30])
def test_cache_holds_the_current_block_and_one_token_per_finished_block(length):
    block_size, batch, kv_heads, head_dim, value_dim = 8, 2, 2, 6, 5
    q, k, v = sequence(batch=batch, kv_heads=kv_heads, length=length, head_dim=head_dim, value_dim=value_dim)
    cache = PooledKVCache()
    run_in_steps(cache, q, k, v, [min(5, length)] + [1] * (length - min(5, length)), block_size)
    current, finished = length % block_size, length // block_size
    assert cache.length == length
    assert cache.raw_key.shape == (batch, kv_heads, current, head_dim)
    assert cache.raw_value.shape == (batch, kv_heads, current, value_dim)
    assert cache.pooled_key.shape == (batch, kv_heads, finished, head_dim)
    assert cache.pooled_value.shape == (batch, kv_heads, finished, value_dim)
    entries = (current + finished) * batch * kv_heads * (head_dim + value_dim) * 8  # float64
    assert cache.nbytes == entries + (current + finished) * batch  # + the bool masks


def test_pooled_tokens_are_the_block_means_of_real_tokens():
    q, k, v = sequence(length=12)
    key_mask = padding(2, 12, 4)
    cache = PooledKVCache()
    run_in_steps(cache, q, k, v, [5, 1, 6], 4, key_mask)
    ref = oracle.attention(q, k, v, 4, causal=True, key_mask=key_mask)
    torch.testing.assert_close(cache.pooled_key, ref.key_global, rtol=0, atol=1e-14)
    torch.testing.assert_close(cache.pooled_value, ref.value_global, rtol=0, atol=1e-14)
    assert torch.equal(cache.pooled_present, ref.present)


def test_decode_steps_never_revisit_the_prefix(monkeypatch):
    """A decode step attends once, over the current block's keys alone (the prefix enters as its
    pooled tokens), and pools nothing longer than one block."""
    pooled_lengths, attention_key_lengths = [], []
    pool_blocks, global_attention = cache_module.spec.pool_blocks, cache_module.global_attention

    def counting_pool(xs, *args, **kwargs):
        pooled_lengths.append(xs[0].shape[2])
        return pool_blocks(xs, *args, **kwargs)

    def counting_attention(query, key, *args, **kwargs):
        attention_key_lengths.append(key.shape[2])
        return global_attention(query, key, *args, **kwargs)

    q, k, v = sequence(length=70)
    cache = PooledKVCache()
    run_in_steps(cache, q[:, :, :50], k[:, :, :50], v[:, :, :50], [50], 8)
    monkeypatch.setattr(cache_module.spec, "pool_blocks", counting_pool)
    monkeypatch.setattr(cache_module, "global_attention", counting_attention)
    out = run_in_steps(cache, q[:, :, 50:], k[:, :, 50:], v[:, :, 50:], [1] * 20, 8)
    # 50 prompt positions leave 2 in the current block [48, 56); each step's window is that block so far.
    assert attention_key_lengths == [3, 4, 5, 6, 7, 8, *range(1, 9), *range(1, 7)]
    assert max(pooled_lengths) <= 8
    torch.testing.assert_close(out, oracle.attention(q, k, v, 8, causal=True).out[:, :, 50:], rtol=0, atol=1e-12)


def test_index_batch_reorders_rows_like_decoding_them_in_that_order():
    q, k, v = sequence(batch=3, length=20)
    order = torch.tensor([2, 0, 0])
    cache = PooledKVCache()
    run_in_steps(cache, q[:, :, :11], k[:, :, :11], v[:, :, :11], [11], 4)
    cache.index_batch(order)
    out = run_in_steps(cache, q[order, :, 11:], k[order, :, 11:], v[order, :, 11:], [1] * 9, 4)
    expected = oracle.attention(q[order], k[order], v[order], 4, causal=True).out[:, :, 11:]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_refusals():
    q, k, v = sequence(length=6)
    cache = PooledKVCache()
    with pytest.raises(RuntimeError, match="update"):
        cache.attend(q, block_size=4)
    cache.update(k[:, :, :3], v[:, :, :3])
    with pytest.raises(RuntimeError, match="attend"):
        cache.update(k[:, :, 3:], v[:, :, 3:])
    with pytest.raises(ValueError, match="query must be a torch.float64 tensor"):
        cache.attend(q, block_size=4)
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        cache.attend(q[:, :, :3], block_size=4, key_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="Hq a multiple of 2"):
        cache.attend(q[:, :3, :3], block_size=4)
    with pytest.raises(ValueError, match="scale must be a real number"):
        cache.attend(q[:, :, :3], block_size=4, scale=float("nan"))
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        cache.attend(q[:, :, :3], block_size=0)
    cache.attend(q[:, :, :3], block_size=4)
    with pytest.raises(ValueError, match="key must continue the cached sequence"):
        cache.update(k[:, :1, 3:], v[:, :1, 3:])
    with pytest.raises(ValueError, match="value must have key's"):
        cache.update(k[:, :, 3:], v[:, :, 4:])
    cache.update(k[:, :, 3:], v[:, :, 3:])
    with pytest.raises(ValueError, match="block_size and window must stay 4 and None"):
        cache.attend(q[:, :, 3:], block_size=5)


@pytest.mark.parametrize("steps", [(23,), (1,) * 23, (5, 1, 1, 9, 7)], ids=["prompt", "decode", "mixed"])
def test_garbage_in_padding_reaches_nothing(steps):
    """NaN and inf at padded positions: the same outputs as zeros there, in every kind of step."""
    q, k, v = sequence()
    key_mask = padding(2, 23, 4)
    pad = ~key_mask[:, None, :, None]
    clean = run_in_steps(PooledKVCache(), q, k, v, steps, 4, key_mask)
    garbage_key, garbage_value = k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf"))
    dirty = run_in_steps(PooledKVCache(), q, garbage_key, garbage_value, steps, 4, key_mask)
    assert torch.isfinite(dirty).all() and torch.equal(dirty, clean)


@pytest.mark.parametrize("length", [2, 9], ids=["within-a-block", "across-blocks"])
def test_value_dtype_other_than_the_keys_is_refused_at_any_length(length):
    q, k, v = sequence(length=length)
    cache = PooledKVCache()
    with pytest.raises(ValueError, match="value must have key's .* dtype torch.float64"):
        cache.update(k, v.float())


@pytest.mark.parametrize("empty", ["B", "Hq"])
def test_empty_batch_or_heads(empty):
    batch, q_heads = (0, 4) if empty == "B" else (2, 0)
    q, k, v = sequence(batch=batch, q_heads=q_heads, length=7)
    out = run_in_steps(PooledKVCache(), q, k, v, (5, 1, 1), 4)
    assert out.shape == (batch, q_heads, 7, 5)
    layer = causal_layer()
    x = torch.randn(0, 7, E, dtype=torch.float64)
    assert layer(x)[0].shape == x.shape and layer(x, cache=PooledKVCache())[0].shape == x.shape


E = 12


def causal_layer(**kwargs) -> GlobalAttention:
    return GlobalAttention(E, 4, 3, num_kv_heads=2, causal=True, dtype=torch.float64, **kwargs).eval()


@pytest.mark.parametrize("window", [None, 5], ids=["blocks", "window5"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_layer_with_cache_gives_the_whole_sequence(batch_first, window):
    layer = causal_layer(batch_first=batch_first, window=window)
    x = torch.randn(2, 17, E, dtype=torch.float64)  # (B, T, E)
    padded = torch.rand(2, 17) < 0.3  # True = padding
    seq_dim = 1 if batch_first else 0
    inputs = x if batch_first else x.transpose(0, 1)
    whole, _ = layer(inputs, key_padding_mask=padded)
    cache, outs, start = PooledKVCache(), [], 0
    for n in [7, 1, 1, 5, 1, 2]:
        part = inputs.narrow(seq_dim, start, n)
        outs.append(layer(part, key_padding_mask=padded[:, start : start + n], cache=cache)[0])
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=seq_dim), whole, rtol=0, atol=1e-12)
    assert cache.length == 17 and cache.pooled_key.shape[2] == 5


def test_layer_refuses_a_cache_it_cannot_use():
    x = torch.randn(1, 4, E, dtype=torch.float64)
    with pytest.raises(ValueError, match="causal=True"):
        GlobalAttention(E, 4, 3, dtype=torch.float64)(x, cache=PooledKVCache())
    with pytest.raises(ValueError, match="need_weights"):
        causal_layer()(x, need_weights=True, cache=PooledKVCache())
    with pytest.raises(ValueError, match="PooledKVCache"):
        causal_layer()(x, cache={})
    with pytest.raises(ValueError, match="eval"):
        causal_layer(dropout=0.1).train()(x, cache=PooledKVCache())
