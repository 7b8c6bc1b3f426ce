"""The reference backend: one dense score matrix over [the S keys ; the T + G global tokens].

Slow and O(L * (S + T + G)) in memory, but explicit: it is the oracle that the fast backends are
tested against and the source of the attention weights that ``attention_weights`` returns.
Computes in float32 (float64 for float64 inputs) and supports double backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from globalattn import spec


def unsupported(query, key, value, options) -> None:
    return None  # the whole contract


def weights(query, key, options):
    """Attention weights (B, Hq, L, S + G), key columns first; rows that see nothing are zero."""
    weights, _ = _weights_and_lse(query, key, options)
    return weights.to(query.dtype)


def attention(query, key, value, options):
    weights, lse = _weights_and_lse(query, key, options)
    if options.dropout_p > 0:
        weights = F.dropout(weights, p=options.dropout_p)
    _, value_global, _ = options.global_tokens(None, value)
    values = _with_globals(value, value_global, query.shape[1]).to(weights.dtype)  # (B, Hq, S + T + G, Dv)
    return (weights @ values).to(query.dtype), lse


def _weights_and_lse(query, key, options):
    """Weights (B, Hq, L, S + T + G) over [keys ; extra global tokens ; the call's global tokens]."""
    batch, q_heads, q_len, _ = query.shape
    seq_len = key.shape[2]
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    block_size, remainder, key_mask = options.block_size, options.remainder, options.key_mask
    documents = options.documents
    key_global, _, present = options.global_tokens(key, None)  # (B, Hkv, T + G, D), (B, T + G)
    device = query.device
    # Tokens from outside the call are blocks -T .. -1: before every block of the call, which every
    # rule lets every row see (causal: j < c; scope "all").
    global_block = torch.arange(key_global.shape[2], device=device) - options.num_extra
    keys = _with_globals(key, key_global, q_heads).to(compute_dtype)  # (B, Hq, S + T + G, D)
    scores = options.scale * (query.to(compute_dtype) @ keys.transpose(-1, -2))  # (B, Hq, L, S + T + G)

    key_block = spec.block_index(seq_len, block_size, remainder, device) if documents is None else documents.block_of
    key_pos = torch.arange(seq_len, device=device)
    query_pos = key_pos[seq_len - q_len :]  # bottom-right aligned queries
    query_block = key_block[query_pos]
    causal = options.causal
    local = spec.local_visible(
        query_pos[:, None], key_pos[None], query_block[:, None], key_block[None], causal, options.window
    )
    glob = spec.global_visible(query_block[:, None], global_block[None], causal, options.scope)  # (L, T + G)
    if documents is not None:  # each document on its own: its keys (a window may reach past it) and blocks
        document = documents.first_block  # (G,): equal for the blocks of one document
        local = local & (document[query_block][:, None] == document[key_block][None])
        glob = glob & (document[query_block][:, None] == document[None])
    real = torch.ones(batch, seq_len, dtype=torch.bool, device=device) if key_mask is None else key_mask
    allowed = torch.cat([local, glob], -1)[None] & torch.cat([real, present], -1)[:, None]  # (B, L, S + T + G)
    allowed = allowed[:, None]  # (B, 1, L, S + T + G), shared by all heads
    if options.top_blocks:  # (never with extra global tokens)
        # Routing: each query (and head) also sees the real keys of its top-scoring other blocks
        # (with a window, the union: a key in both is one cell, seen once).
        candidate = allowed[..., seq_len:] & (global_block != query_block[:, None])  # (B, 1, L, G)
        blocks, chosen = spec.select_top_blocks(scores[..., seq_len:], candidate, options.top_blocks)  # (B, Hq, L, k)
        routed = torch.zeros_like(scores[..., seq_len:], dtype=torch.bool).scatter_(-1, blocks, chosen)
        routed_keys = routed[..., key_block] & real[:, None, None, :]  # (B, Hq, L, S)
        allowed = allowed | torch.cat([routed_keys, torch.zeros_like(routed)], dim=-1)  # (B, Hq, L, S + G)

    return spec.masked_softmax(scores, allowed)


def _with_globals(x, x_global, q_heads):
    """[x ; x_global] along the sequence, with key/value heads repeated for grouped queries."""
    both = torch.cat([x, x_global], dim=2)
    return both.repeat_interleave(q_heads // x.shape[1], dim=1)
