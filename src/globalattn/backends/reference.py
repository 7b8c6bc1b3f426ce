"""The reference backend: one dense score matrix over [the S keys ; the G global tokens].

Slow and O(L * (S + G)) in memory, but explicit: it is the oracle that the fast backends are tested
against and the source of the attention weights that ``attention_weights`` returns.  Computes in
float32 (float64 for float64 inputs) and supports double backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from globalattn import spec


def reference_weights(query, key, *, block_size, causal, scope, remainder, key_mask, scale, top_blocks):
    """Attention weights (B, Hq, L, S + G), key columns first; rows that see nothing are zero."""
    weights, _ = _weights_and_lse(query, key, block_size, causal, scope, remainder, key_mask, scale, top_blocks)
    return weights.to(query.dtype)


def reference_attention(
    query, key, value, *, block_size, causal, scope, remainder, key_mask, scale, top_blocks, dropout_p
):
    weights, lse = _weights_and_lse(query, key, block_size, causal, scope, remainder, key_mask, scale, top_blocks)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    (value_global,), _ = spec.pool_blocks((value,), block_size, remainder, key_mask)
    values = _with_globals(value, value_global, query.shape[1]).to(weights.dtype)  # (B, Hq, S + G, Dv)
    return (weights @ values).to(query.dtype), lse


def _weights_and_lse(query, key, block_size, causal, scope, remainder, key_mask, scale, top_blocks):
    batch, q_heads, q_len, _ = query.shape
    seq_len = key.shape[2]
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    (key_global,), present = spec.pool_blocks((key,), block_size, remainder, key_mask)  # (B, Hkv, G, D), (B, G)
    keys = _with_globals(key, key_global, q_heads).to(compute_dtype)  # (B, Hq, S + G, D)
    scores = scale * (query.to(compute_dtype) @ keys.transpose(-1, -2))  # (B, Hq, L, S + G)

    device = query.device
    key_block = spec.block_index(seq_len, block_size, remainder, device)  # (S,)
    key_pos = torch.arange(seq_len, device=device)
    query_pos = key_pos[seq_len - q_len :]  # bottom-right aligned queries
    query_block = key_block[query_pos]
    global_block = torch.arange(key_global.shape[2], device=device)
    local = spec.local_visible(query_pos[:, None], key_pos[None], query_block[:, None], key_block[None], causal)
    glob = spec.global_visible(query_block[:, None], global_block[None], causal, scope)  # (L, G)
    real = torch.ones(batch, seq_len, dtype=torch.bool, device=device) if key_mask is None else key_mask
    allowed = torch.cat([local, glob], -1)[None] & torch.cat([real, present], -1)[:, None]  # (B, L, S + G)
    allowed = allowed[:, None]  # (B, 1, L, S + G), shared by all heads
    if top_blocks:
        # Routing: each query (and head) also sees the real keys of its top-scoring other blocks.
        candidate = allowed[..., seq_len:] & (global_block != query_block[:, None])  # (B, 1, L, G)
        blocks, chosen = spec.select_top_blocks(scores[..., seq_len:], candidate, top_blocks)  # (B, Hq, L, k)
        routed = torch.zeros_like(scores[..., seq_len:], dtype=torch.bool).scatter_(-1, blocks, chosen)
        routed_keys = routed[..., key_block] & real[:, None, None, :]  # (B, Hq, L, S)
        allowed = allowed | torch.cat([routed_keys, torch.zeros_like(routed)], dim=-1)  # (B, Hq, L, S + G)

    return spec.masked_softmax(scores, allowed)


def _with_globals(x, x_global, q_heads):
    """[x ; x_global] along the sequence, with key/value heads repeated for grouped queries."""
    both = torch.cat([x, x_global], dim=2)
    return both.repeat_interleave(q_heads // x.shape[1], dim=1)
