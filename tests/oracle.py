"""An independent float64 brute force of docs/semantics.md, one query row at a time.

Written from docs/semantics.md alone (the seed is its "Worked example"): it imports nothing from
globalattn, so that a mistake shared by the library's own helpers (``globalattn.spec``) cannot hide
here.  Plain Python loops over blocks, rows and keys; numpy only for the dot products.  Use small
sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def blocks(seq_len: int, block_size: int, remainder: str) -> list[tuple[int, int]]:
    """Half-open blocks of ``0 .. seq_len-1``: cut every ``block_size``; with ``"merge"`` a short
    tail joins the block before it (the seed's 16 tokens, b = 5: [0,5) [5,10) [10,16))."""
    cuts = [(start, min(start + block_size, seq_len)) for start in range(0, seq_len, block_size)]
    tail_start, tail_end = cuts[-1]
    if remainder == "merge" and len(cuts) > 1 and tail_end - tail_start < block_size:
        cuts[-2:] = [(cuts[-2][0], tail_end)]
    return cuts


@dataclass
class Result:
    out: torch.Tensor  # (B, Hq, L, Dv) float64
    lse: torch.Tensor  # (B, Hq, L) float64, -inf for a row that sees nothing
    weights: torch.Tensor  # (B, Hq, L, S + G) float64, local columns first
    allowed: torch.Tensor  # (B, L, S + G) bool: which cells a row may see (the same for every head), no routing
    pool: torch.Tensor  # (B, G, S) float64: global token j = sum_s pool[j, s] * x[s] (the mean of real tokens)
    present: torch.Tensor  # (B, G) bool: the block has a real token
    key_global: torch.Tensor  # (B, Hkv, G, D) float64
    value_global: torch.Tensor  # (B, Hkv, G, Dv) float64


def attention(
    query,
    key,
    value,
    block_size,
    *,
    causal=False,
    scope="all",
    remainder=None,
    key_mask=None,
    scale=None,
    top_blocks=0,
    window=None,
    document_ids=None,
):
    """docs/semantics.md's global-token attention, brute force in float64.  Same arguments as the library.

    With ``document_ids`` only ``out`` and ``lse`` are given: each document computed on its own,
    which is the definition ("Packed sequences").
    """
    if document_ids is not None:
        return _packed(query, key, value, block_size, document_ids, key_mask, causal=causal, scope=scope,
                       remainder=remainder, scale=scale, top_blocks=top_blocks, window=window)  # fmt: skip
    q, k, v = (x.detach().cpu().double().numpy() for x in (query, key, value))
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, seq_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    real = np.ones((batch, seq_len), bool) if key_mask is None else key_mask.cpu().numpy()
    if remainder is None:
        remainder = "separate" if causal else "merge"
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    bounds = blocks(seq_len, block_size, remainder)
    num_global = len(bounds)
    block_of = [next(j for j, (lo, hi) in enumerate(bounds) if lo <= s < hi) for s in range(seq_len)]

    # Global tokens: the mean over each block's real tokens; a block without one has none.
    pool = np.zeros((batch, num_global, seq_len))
    for b in range(batch):
        for j, (lo, hi) in enumerate(bounds):
            members = [s for s in range(lo, hi) if real[b, s]]
            for s in members:
                pool[b, j, s] = 1.0 / len(members)
    present = pool.sum(-1) > 0
    key_global = np.einsum("bgs,bhsd->bhgd", pool, k)
    value_global = np.einsum("bgs,bhsd->bhgd", pool, v)

    # Who sees what (docs/semantics.md, "Who attends to what"), per batch element and query row.
    allowed = np.zeros((batch, q_len, seq_len + num_global), bool)
    for b in range(batch):
        for i in range(q_len):
            p = seq_len - q_len + i
            c = block_of[p]
            for s in range(seq_len):
                if window is None:  # the own block's keys
                    local = block_of[s] == c and (not causal or s <= p)
                elif causal:  # the w most recent positions, p included
                    local = p - window < s <= p
                else:
                    local = abs(s - p) < window
                allowed[b, i, s] = local and real[b, s]
            for j in range(num_global):
                if causal:
                    sees = j < c
                elif scope == "own":
                    sees = j == c
                else:
                    sees = True
                allowed[b, i, seq_len + j] = sees and present[b, j]

    out = np.zeros((batch, q_heads, q_len, v.shape[-1]))
    lse = np.full((batch, q_heads, q_len), -np.inf)
    weights = np.zeros((batch, q_heads, q_len, seq_len + num_global))

    def routed_columns(b, query_row, global_keys, row_allowed, own_block):
        """top_blocks (docs/semantics.md, "Routing to the top blocks"): the real tokens of the k
        candidate blocks that score highest (ties: lower j)."""
        candidates = [j for j in range(num_global) if row_allowed[seq_len + j] and j != own_block]
        ranked = sorted(candidates, key=lambda j: (-scale * float(np.dot(query_row, global_keys[j])), j))
        return [s for j in ranked[:top_blocks] for s in range(*bounds[j]) if real[b, s]]

    for b in range(batch):
        for h in range(q_heads):
            hk = h // group
            keys = np.concatenate([k[b, hk], key_global[b, hk]])  # (S + G, D)
            values = np.concatenate([v[b, hk], value_global[b, hk]])  # (S + G, Dv)
            for i in range(q_len):
                cols = {col for col in range(seq_len + num_global) if allowed[b, i, col]}
                # The union: a routed token inside the row's window is one column, seen once.
                cols |= set(
                    routed_columns(b, q[b, h, i], key_global[b, hk], allowed[b, i], block_of[seq_len - q_len + i])
                )
                cols = sorted(cols)
                if not cols:
                    continue  # nothing to see: zeros, lse -inf
                scores = [scale * float(np.dot(q[b, h, i], keys[col])) for col in cols]
                top = max(scores)
                exps = [math.exp(x - top) for x in scores]
                total = sum(exps)
                lse[b, h, i] = top + math.log(total)
                for col, e in zip(cols, exps):
                    weights[b, h, i, col] = e / total
                    out[b, h, i] += (e / total) * values[col]

    def as_tensor(x):
        return torch.from_numpy(np.ascontiguousarray(x))

    return Result(*map(as_tensor, (out, lse, weights, allowed, pool, present, key_global, value_global)))


def _packed(query, key, value, block_size, document_ids, key_mask, **options):
    """Every document of every row on its own, its results put back where its positions are."""
    batch, q_heads, seq_len, _ = query.shape
    out = torch.zeros(batch, q_heads, seq_len, value.shape[-1], dtype=torch.float64)
    lse = torch.full((batch, q_heads, seq_len), -math.inf, dtype=torch.float64)
    for b in range(batch):
        ids = document_ids[b].tolist()
        start = 0
        while start < seq_len:
            end = start + 1
            while end < seq_len and ids[end] == ids[start]:
                end += 1
            rows = (slice(b, b + 1), slice(None), slice(start, end))
            mask = None if key_mask is None else key_mask[b : b + 1, start:end]
            alone = attention(query[rows], key[rows], value[rows], block_size, key_mask=mask, **options)
            out[rows], lse[rows] = alone.out, alone.lse
            start = end
    return Result(out, lse, None, None, None, None, None, None)
