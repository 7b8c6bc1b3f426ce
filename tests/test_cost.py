"""globalattn.cost: pair counts against a brute force over the visibility rules, the best block size
against every candidate, the FLOP rule, and the candidate lists.  Expected values come from the
rules written out here (or by hand), never from cost.py itself."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from globalattn import attention_weights, cost

MODES = [(False, "merge"), (False, "separate"), (True, "separate")]  # causal "merge" is refused


def block_of_each_position(seq_len: int, block_size: int, remainder: str) -> torch.Tensor:
    """Blocks of ``block_size`` from position 0; "merge" folds a short tail into the block before it."""
    block = torch.arange(seq_len) // block_size
    if remainder == "merge" and seq_len >= block_size:
        block = block.clamp(max=seq_len // block_size - 1)
    return block


def brute_force_pairs(seq_len: int, block_size: int | None, causal: bool, scope: str, remainder: str) -> tuple:
    """(local, global) True cells of the (S, S + G) visibility matrix; dense: (S, S) in local, 0 global."""
    position = torch.arange(seq_len)
    before = position[None, :] <= position[:, None]  # (query, key): key not after the query
    if block_size is None:
        return int(before.sum()) if causal else seq_len * seq_len, 0
    block = block_of_each_position(seq_len, block_size, remainder)
    local = block[:, None] == block[None, :]  # own block's keys
    if causal:
        local &= before
    token = torch.arange(int(block.max()) + 1)
    if causal:
        seen = token[None, :] < block[:, None]  # complete earlier blocks only
    elif scope == "own":
        seen = token[None, :] == block[:, None]
    else:
        seen = torch.ones(seq_len, len(token), dtype=torch.bool)
    return int(local.sum()), int(seen.sum())


@settings(max_examples=300, deadline=None)
@given(
    seq_len=st.integers(1, 160),
    block_size=st.integers(1, 170),
    mode=st.sampled_from(MODES),
    own=st.booleans(),
)
def test_pairs_are_the_visible_cells(seq_len, block_size, mode, own):
    causal, remainder = mode
    scope = "own" if own and not causal else "all"
    local, seen = brute_force_pairs(seq_len, block_size, causal, scope, remainder)
    options = dict(causal=causal, remainder=remainder)
    assert cost.attended_pairs(seq_len, block_size, scope=scope, **options) == local + seen
    if scope == "all":
        assert cost.local_and_global_pairs(seq_len, block_size, **options) == (local, seen)


@pytest.mark.parametrize("causal, remainder", MODES)
@pytest.mark.parametrize(
    "seq_len, block_size",
    [(1, 1), (1, 7), (7, 7), (7, 8), (8, 7), (13, 1), (129, 128), (255, 128), (1000, 128), (1024, 32), (1031, 33)],
)
def test_awkward_sizes(seq_len, block_size, causal, remainder):
    local, seen = brute_force_pairs(seq_len, block_size, causal, "all", remainder)
    assert cost.local_and_global_pairs(seq_len, block_size, causal=causal, remainder=remainder) == (local, seen)


def test_counted_by_hand():
    # 16 tokens, b = 5, merged: blocks of 5, 5, 6; every query sees the 3 global tokens
    assert cost.local_and_global_pairs(16, 5) == (5 * 5 + 5 * 5 + 6 * 6, 16 * 3)
    assert cost.attended_pairs(16, 5, scope="own") == 86 + 16
    # causal, separate: blocks of 5, 5, 5, 1; block j's tokens see the j blocks before it
    assert cost.local_and_global_pairs(16, 5, causal=True) == (3 * 15 + 1, 5 * 1 + 5 * 2 + 1 * 3)
    assert cost.dense_pairs(16) == 256 and cost.dense_pairs(16, causal=True) == 136


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", [1, 2, 5, 40])
def test_dense_is_every_visible_key(seq_len, causal):
    expected = brute_force_pairs(seq_len, None, causal, "all", "merge")[0]
    assert cost.attended_pairs(seq_len, None, causal=causal) == cost.dense_pairs(seq_len, causal=causal) == expected


@settings(max_examples=60, deadline=None)
@given(
    seq_len=st.integers(1, 40),
    block_size=st.integers(1, 12),
    causal=st.booleans(),
    own=st.booleans(),
    window=st.none() | st.integers(1, 45),
)
def test_counts_what_the_library_attends(seq_len, block_size, causal, own, window):
    scope = "own" if own and not causal else "all"
    zeros = torch.zeros(1, 1, seq_len, 1)  # all-zero queries: every allowed cell gets a positive weight
    weights = attention_weights(zeros, zeros, block_size, causal=causal, scope=scope, window=window)
    attended = int((weights > 0).sum())
    assert cost.attended_pairs(seq_len, block_size, causal=causal, scope=scope, window=window) == attended


@settings(max_examples=60, deadline=None)
@given(seq_len=st.integers(1, 40), window=st.integers(1, 45), causal=st.booleans())
def test_window_pairs_are_the_cells_within_the_window(seq_len, window, causal):
    pos = torch.arange(seq_len)
    offset = pos[:, None] - pos[None, :]  # p - s
    seen = (offset >= 0) & (offset < window) if causal else offset.abs() < window
    assert cost.window_pairs(seq_len, window, causal=causal) == int(seen.sum())
    with_globals = cost.attended_pairs(seq_len, 4, causal=causal, window=window)
    assert with_globals == int(seen.sum()) + cost.local_and_global_pairs(seq_len, 4, causal=causal)[1]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(causal=True, scope="own"), "bidirectional only"),
        (dict(causal=True, remainder="merge"), "cannot be causal"),
        (dict(scope="some"), "scope"),
        (dict(block_size=0), "block_size must be a positive int"),
    ],
)
def test_contradicting_modes_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        cost.attended_pairs(16, **{"block_size": 4, **options})


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", [1, 2, 3, 7, 16, 100, 257, 1024])
def test_best_block_size_is_the_cheapest_of_all(seq_len, causal):
    """The default candidates (around sqrt(S)) hold the cheapest block size of all, 1..S."""
    remainder = "separate" if causal else "merge"
    pairs = {b: sum(brute_force_pairs(seq_len, b, causal, "all", remainder)) for b in range(1, seq_len + 1)}
    best = cost.best_block_size(seq_len, causal=causal)
    assert pairs[best] == min(pairs.values())
    assert best == min(b for b in pairs if pairs[b] == pairs[best])  # the smaller one at a tie


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len, step", [(300, 8), (500, 16), (600, 64), (40, 64)])
def test_best_block_size_among_candidates(seq_len, step, causal):
    remainder = "separate" if causal else "merge"
    candidates = list(range(step, seq_len + 1, step)) or [seq_len]  # none fits: one block
    pairs = {b: sum(brute_force_pairs(seq_len, b, causal, "all", remainder)) for b in candidates}
    best = cost.best_block_size(seq_len, causal=causal, candidates=cost.multiples_of(step, seq_len))
    assert pairs[best] == min(pairs.values())


def test_tie_between_powers_of_two():
    # S = 2^17: b = 256 and 512 both divide S, and both score S * (b + S / b) = S * 768 pairs
    seq_len = 1 << 17
    assert cost.attended_pairs(seq_len, 256) == cost.attended_pairs(seq_len, 512) == seq_len * 768
    assert cost.best_block_size(seq_len, candidates=cost.powers_of_two(seq_len)) == 256
    assert cost.best_block_size(seq_len, candidates=cost.powers_of_two(seq_len), larger_at_tie=True) == 512
    assert cost.best_block_size(seq_len, candidates=cost.powers_of_two(128), larger_at_tie=True) == 128  # capped


def test_attention_flops():
    assert cost.attention_flops(10, 64) == 4 * 64 * 10  # a score and a weighted value: 2 multiply-adds per dim
    assert cost.attention_flops(10, 64, heads=8, passes="bwd") == 2.5 * 4 * 64 * 10 * 8
    assert cost.attention_flops(10, 64, heads=8, passes="fwd+bwd") == 3.5 * 4 * 64 * 10 * 8


def test_candidate_lists():
    assert cost.powers_of_two(1) == [1]
    assert cost.powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64]
    assert cost.powers_of_two(100) == [1, 2, 4, 8, 16, 32, 64]
    assert cost.multiples_of(64, 200) == [64, 128, 192]
    assert cost.multiples_of(64, 128) == [64, 128]
    assert cost.multiples_of(64, 10) == [64]
