"""What attention costs, counted once: attended pairs, FLOPs, and the block size that needs fewest.

A query scores one key per attended (query, key) pair, and the pair costs ``4 * head_dim``
multiply-add FLOPs per head forward (a score and a weighted value; docs/semantics.md, "Cost");
backward costs 2.5 times the forward, as flash-attention counts it.  Dense attention scores S * S
pairs (causal: S * (S + 1) / 2); global attention about S * (b + S / b), smallest at b ~ sqrt(S).
The demo, the training harness and the benchmarks all count with these functions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from globalattn import checks, spec

PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # each pass's FLOPs in units of the forward's


def dense_pairs(seq_len: int, *, causal: bool = False) -> int:
    """(query, key) pairs dense attention scores over ``seq_len`` tokens."""
    return seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len


def local_and_global_pairs(
    seq_len: int, block_size: int, *, causal: bool = False, remainder: str | None = None
) -> tuple[int, int]:
    """(local, global) pairs global attention scores over a full sequence (L = S, no padding,
    scope "all"): own-block keys (causal: up to the query), and global tokens (causal: complete
    earlier blocks)."""
    checks.positive_int("seq_len", seq_len)
    checks.positive_int("block_size", block_size)
    checks.mode(causal, remainder=remainder)
    blocks = spec.num_blocks(seq_len, block_size, spec.resolve_remainder(causal, remainder))
    last = seq_len - (blocks - 1) * block_size  # every block but the last holds block_size tokens
    if causal:
        local = (blocks - 1) * block_size * (block_size + 1) // 2 + last * (last + 1) // 2
        # block j's tokens see the j blocks before it: block_size * (0 + 1 + ... + (G - 2)) before the last
        return local, block_size * (blocks - 1) * (blocks - 2) // 2 + last * (blocks - 1)
    return (blocks - 1) * block_size**2 + last**2, seq_len * blocks


def window_pairs(seq_len: int, window: int, *, causal: bool = False) -> int:
    """(query, key) pairs of a sliding window over ``seq_len`` tokens: ``p - w < s <= p`` causal,
    ``|s - p| < w`` bidirectional, cut off at the sequence's ends."""
    checks.positive_int("seq_len", seq_len)
    checks.positive_int("window", window)
    w = min(window, seq_len)
    one_side = w * (w - 1) // 2 + (seq_len - w) * (w - 1)  # earlier keys within the window, summed over p
    return seq_len + one_side * (1 if causal else 2)


def attended_pairs(
    seq_len: int,
    block_size: int | None,
    *,
    causal: bool = False,
    scope: str = "all",
    remainder: str | None = None,
    window: int | None = None,
) -> int:
    """Pairs one head scores over ``seq_len`` tokens: global attention, or dense when ``block_size`` is None.

    ``scope="own"`` (bidirectional only) sees one global token per query instead of all of them;
    ``window=w``: the local keys are each query's window instead of its block.
    """
    checks.mode(causal, scope, remainder)
    if block_size is None:
        return dense_pairs(seq_len, causal=causal)
    local, every_global = local_and_global_pairs(seq_len, block_size, causal=causal, remainder=remainder)
    if window is not None:
        local = window_pairs(seq_len, window, causal=causal)
    return local + (seq_len if scope == "own" else every_global)


def attention_flops(pairs: int, head_dim: int, *, heads: int = 1, passes: str = "fwd") -> float:
    """Useful FLOPs of ``pairs`` attended pairs per head, for the pass ``"fwd"``, ``"bwd"`` or ``"fwd+bwd"``."""
    return 4.0 * head_dim * heads * pairs * PASS_FLOPS[passes]


def best_block_size(
    seq_len: int, *, causal: bool = False, candidates: Iterable[int] | None = None, larger_at_tie: bool = False
) -> int:
    """The block size among ``candidates`` with the fewest attended pairs (scope "all").

    Default candidates: every b from sqrt(S)/2 to 2 sqrt(S), where b + S/b is smallest.  Pass e.g.
    ``powers_of_two(seq_len)`` or ``multiples_of(64, seq_len)`` to choose among tile-friendly sizes;
    those longer than ``seq_len`` are left out (none left: ``seq_len``, one block).  At a tie the
    smaller block wins, or with ``larger_at_tie`` the larger: as many pairs, fewer global tokens to
    pool, hold and send (S = 2^17 among powers of two: 256 and 512 both score S * 768 pairs).
    """
    if candidates is None:
        root = math.isqrt(seq_len)
        candidates = range(max(1, root // 2), 2 * root + 2)
    candidates = [b for b in candidates if 1 <= b <= seq_len] or [seq_len]
    tie = -1 if larger_at_tie else 1
    return min(candidates, key=lambda b: (attended_pairs(seq_len, b, causal=causal), tie * b))


def powers_of_two(up_to: int) -> list[int]:
    """1, 2, 4, ... up to ``up_to``."""
    return [1 << i for i in range(max(1, up_to).bit_length())]


def multiples_of(step: int, up_to: int) -> list[int]:
    """step, 2 step, ... up to ``up_to`` (at least ``step`` itself)."""
    return list(range(step, max(step, up_to) + 1, step))
