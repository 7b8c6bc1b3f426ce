"""The attention variants the harness compares, chosen by name (``config.ATTENTIONS``); all take
and return (B, H, T, D).

    dense          softmax over every key (causal: every earlier key): F.scaled_dot_product_attention
    global         this project: own block + every block's global token (causal: own block up to
                   the query + complete earlier blocks' global tokens)
    global-own     the seed's literal variant: own block + its own global token (bidirectional only)
    global-window  global with a sliding window of raw keys instead of the own block (``window=w``,
                   docs/semantics.md): causal the w keys up to the query, bidirectional those less
                   than w away; the same global tokens as global.  w defaults to b, the smallest
                   window that holds every raw key global's own block gives the query
    global-top{k}  global, and each query also reads the raw tokens of the k blocks whose global
                   tokens score highest for it (``top_blocks=k``, docs/semantics.md)
    local          the same blocks as global with no global tokens: the ablation
    sliding        a window of w keys around each query (causal: the w keys up to and including
                   it); w is matched to global's attended pairs, so both cost the same FLOPs

``local`` and ``sliding`` are exact and cheap: the sequence is cut into tiles (blocks, or chunks of
queries with the keys their windows reach) that run as one batched SDPA call with a small mask, so
memory is O(T * b) or O(T * w), never O(T^2).

Every variant also takes ``document_ids`` (B, T), non-decreasing along T, or None: packed documents
(docs/semantics.md, "Packed sequences"), each attended exactly as if it were alone.  The global
variants hand them to ``global_attention``; dense masks the other documents (an O(T^2) mask, fine at
the harness's contexts); sliding masks them inside its tiles; local runs as sliding over its blocks
cut per document (``spec.document_blocks``), each block a document of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from globalattn import cost, spec
from globalattn.api import attention_weights, global_attention
from globalattn.harness.config import ModelConfig, check_attention, top_blocks_of

# (q, k, v) -> out, and the keyword document_ids=None (packed documents)
Attention = Callable[..., torch.Tensor]


def resolved_block_size(config: ModelConfig) -> int:
    """``config.block_size``, or the power of two with the fewest attended pairs (b ~ sqrt(T); the
    smaller one at a tie, T = 512: 16, not 32)."""
    context = config.context
    return config.block_size or cost.best_block_size(
        context, causal=config.causal, candidates=cost.powers_of_two(context)
    )


def resolved_window(config: ModelConfig) -> int | None:
    """The window of ``sliding`` and ``global-window`` (None for the variants without one):
    ``config.window``, or by default

    - sliding: the window matched to global's attended pairs at its block size (the same FLOPs);
    - global-window: the block size b.  Causal, a query at offset r in its block then sees the
      r + 1 <= b raw keys global shows it and the b - r - 1 just before its block that global hides;
      a smaller window would leave the start of its own block unseen (that block's global token is
      not visible to it), a larger one reaches further back at more cost.  Bidirectional, w = b reaches every key of
      the query's block as well (a merged last block, longer than b, but partly).
    """
    if config.attention == "sliding":
        return config.window or matched_window(config.context, resolved_block_size(config), causal=config.causal)
    if config.attention == "global-window":
        return config.window or resolved_block_size(config)
    return None


def matched_window(context: int, block_size: int, *, causal: bool) -> int:
    """The sliding window w whose attended pairs over a full sequence come closest to global's."""
    target = cost.attended_pairs(context, block_size, causal=causal)
    windows = torch.arange(1, context + 1)
    left, right = _window_sides("sliding", windows, causal)
    pairs = windows * context - left * (left + 1) // 2 - right * (right + 1) // 2  # minus the keys cut off at the ends
    return int(windows[(pairs - target).abs().argmin()])


def make_attention(name: str, *, causal: bool, block_size: int, window: int | None) -> Attention:
    """The attention function ``(q, k, v, document_ids=None) -> out`` of the variant ``name`` (q, k, v:
    (B, H, T, D)); ``window`` is read by sliding and global-window only."""
    check_attention(name, causal=causal)
    if name == "dense":
        return partial(dense_attention, causal=causal)
    if name == "local":
        return partial(local_attention, block_size=block_size, causal=causal)
    if name == "sliding":
        return partial(sliding_window_attention, window=window, causal=causal)
    scope = "own" if name == "global-own" else "all"
    options = {"top_blocks": top_blocks_of(name)} if top_blocks_of(name) else {}
    if name == "global-window":
        options["window"] = window
    return partial(global_attention, block_size=block_size, causal=causal, scope=scope, **options)


def make_context_parallel_attention(
    name: str, *, causal: bool, block_size: int, window: int | None, group
) -> Attention:
    """``make_attention``'s global variants (not routing) over a sequence sharded across ``group``
    (each rank passes its shard); the others have no context-parallel form here."""
    from globalattn.distributed import context_parallel_attention

    check_attention(name, causal=causal)
    if name not in ("global", "global-own", "global-window"):
        raise ValueError(f"context parallelism runs the attentions global, global-own and global-window, got {name!r}")
    scope = "own" if name == "global-own" else "all"
    options = {"window": window} if name == "global-window" else {}
    return partial(context_parallel_attention, block_size=block_size, causal=causal, scope=scope, group=group,
                   **options)  # fmt: skip


def keys_per_token(name: str, seq_len: int, *, causal: bool, block_size: int, window: int | None) -> torch.Tensor:
    """How many keys (raw tokens and global tokens) each position attends to, an int64 tensor (T,).

    For ``global-top{k}`` the routed blocks are counted at their full size b (exact when b divides T).
    """
    pos = torch.arange(seq_len)
    if name == "dense":
        return pos + 1 if causal else torch.full((seq_len,), seq_len)
    if name == "sliding":
        return _window_counts(name, seq_len, window, causal)
    remainder = spec.resolve_remainder(causal, None)
    starts, ends = spec.block_starts_and_ends(seq_len, block_size, remainder)
    blk = spec.block_index(seq_len, block_size, remainder)
    if name == "global-window":
        local = _window_counts(name, seq_len, window, causal)
    else:
        local = pos - starts[blk] + 1 if causal else (ends - starts)[blk]
    if name == "local":
        return local
    num_blocks = len(starts)
    if name == "global-own":
        globals_seen = torch.ones(seq_len, dtype=torch.long)
    else:
        globals_seen = blk if causal else torch.full((seq_len,), num_blocks)
    routed_blocks = (globals_seen - (0 if causal else 1)).clamp(max=top_blocks_of(name))
    return local + globals_seen + routed_blocks * block_size


def routing_hits(query, key, recall, *, block_size: int, top_blocks: int) -> dict | None:
    """How often ``global-top{k}`` (causal) routes a query to the block of the token it must recall.

    query, key (B, H, T, hd): one layer's attention inputs; ``recall``: (row, query, source)
    positions (``Task.recall_positions``).  Over the (query, head) pairs whose source sits in an
    earlier block than the query: ``routed`` the fraction whose k routed blocks include the source's,
    ``chance`` the fraction that k blocks drawn at random from the candidates (every earlier block)
    would reach.  None when no source sits in an earlier block.
    """
    row, query_pos, source_pos = recall
    blocks = spec.block_index(query.shape[2], block_size, spec.resolve_remainder(True, None), query.device)
    earlier = blocks[source_pos] < blocks[query_pos]
    if not bool(earlier.any()):
        return None
    row, query_pos, source_pos = row[earlier], query_pos[earlier], source_pos[earlier]
    # In float64 a visible key's weight never underflows to 0: weight > 0 is "visible", and a raw
    # key of an earlier block is visible only through the routing.
    weights = attention_weights(query.double(), key.double(), block_size, causal=True, top_blocks=top_blocks)
    seen = weights[row, :, query_pos, source_pos] > 0  # (N, H)
    candidates = blocks[query_pos].double()  # blocks 0 .. c - 1: the query's own is never routed to
    chance = candidates.clamp(max=top_blocks) / candidates
    return {"routed": float(seen.double().mean()), "chance": float(chance.mean())}


def _window_counts(name: str, seq_len: int, window: int, causal: bool) -> torch.Tensor:
    """Raw keys in each position's window (sliding or global-window), cut off at the sequence's ends."""
    pos = torch.arange(seq_len)
    left, right = _window_sides(name, window, causal)
    return torch.minimum(pos + right, torch.tensor(seq_len - 1)) - (pos - left).clamp(min=0) + 1


def _window_sides(name: str, window, causal: bool):
    """Keys a query's window reaches before and after itself (ints or tensors).  sliding: w keys,
    causal all before, bidirectional centred; global-window: ``p - w < s <= p`` causal, ``|s - p| < w``
    bidirectional (docs/semantics.md), so w - 1 before and 0 or w - 1 after."""
    if name == "global-window":
        return window - 1, (0 if causal else window - 1)
    left = window - 1 if causal else (window - 1) // 2
    return left, window - 1 - left


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Each position's offset from the first position of its document: (B, T) int64, from
    ``document_ids`` (B, T) non-decreasing along T (``[[0, 0, 1, 1, 1]]`` -> ``[[0, 1, 0, 1, 2]]``)."""
    pos = torch.arange(document_ids.shape[1], device=document_ids.device).expand(document_ids.shape)
    new_doc = torch.ones_like(document_ids, dtype=torch.bool)
    new_doc[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return pos - torch.where(new_doc, pos, 0).cummax(dim=1).values  # minus the latest document start


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, document_ids=None):
    """Every key (causal: every earlier key); with ``document_ids``, of the query's document only."""
    if document_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    mask = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    if causal:
        mask = mask.tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, causal: bool, document_ids=None
):
    """Each query attends to the keys of its own block only (causal: up to itself).

    The blocks are global's (``remainder`` "separate" when causal, "merge" when not), gathered as
    tiles of the longest block's length; slots past a block's end are masked as keys.  With
    ``document_ids`` the blocks are cut from each document's first position, so they no longer
    fall on fixed tiles: it runs as ``sliding_window_attention`` with every block a document and a
    window that reaches every key of the longest block, L keys (causal: up to the query, L <= b;
    bidirectional: L - 1 either side, L <= 2b - 1 with a merged tail).
    """
    seq_len = q.shape[2]
    remainder = spec.resolve_remainder(causal, None)
    if document_ids is not None:
        blocks = spec.document_blocks(document_ids, block_size, remainder)
        longest = int((blocks.ends - blocks.starts).max())
        window = longest if causal else 2 * longest - 1
        block_ids = blocks.block_of.view(document_ids.shape)
        return sliding_window_attention(q, k, v, window=window, causal=causal, document_ids=block_ids)
    starts, ends = spec.block_starts_and_ends(seq_len, block_size, remainder, q.device)
    tile = int((ends - starts).max())
    slots = starts[:, None] + torch.arange(tile, device=q.device)  # (G, tile) positions
    real = slots < ends[:, None]
    slots = slots.clamp(max=seq_len - 1)
    mask = real[:, None, :] | torch.eye(tile, dtype=torch.bool, device=q.device)  # a padding slot sees itself
    if causal:
        mask = mask & torch.ones(tile, tile, dtype=torch.bool, device=q.device).tril()
    q_t, k_t, v_t = (x[:, :, slots] for x in (q, k, v))  # (B, H, G, tile, D)
    out_t = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask)
    out = torch.empty_like(q)
    out[:, :, slots[real]] = out_t[:, :, real]
    return out


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, causal: bool, document_ids=None
):
    """Each query attends to the ``window`` keys nearest it: causal the last w up to itself,
    bidirectional (w - 1) // 2 before and the rest after (fewer at the ends of the sequence; with
    ``document_ids``, at the ends of the query's document).

    Queries run in chunks of c = w; chunk i reads the c + w - 1 keys its windows can reach.
    """
    batch, heads, seq_len, head_dim = q.shape
    left, right = _window_sides("sliding", window, causal)
    chunk = window
    num_chunks = -(-seq_len // chunk)
    span = chunk + window - 1
    padded = num_chunks * chunk
    pad_keys = (0, 0, left, padded - seq_len + right)  # keys at positions -left .. padded + right - 1
    k_p, v_p = F.pad(k, pad_keys), F.pad(v, pad_keys)
    k_t, v_t = (x.unfold(2, span, chunk).transpose(-1, -2) for x in (k_p, v_p))  # (B, H, n, span, D)
    q_t = F.pad(q, (0, 0, 0, padded - seq_len)).view(batch, heads, num_chunks, chunk, head_dim)
    row = torch.arange(chunk, device=q.device)[:, None]
    col = torch.arange(span, device=q.device)[None, :]
    band = (col >= row) & (col - row <= window - 1)  # (c, span): key offset within the window
    key_pos = torch.arange(num_chunks, device=q.device)[:, None] * chunk - left + col  # (n, span)
    key_real = (key_pos >= 0) & (key_pos < seq_len)
    visible = key_real[:, None, :]  # (n, 1, span)
    if document_ids is not None:  # and in the query's document: (B, n, c, span), broadcast over the heads
        key_ids = F.pad(document_ids, (left, padded - seq_len + right)).unfold(1, span, chunk)  # (B, n, span)
        query_ids = F.pad(document_ids, (0, padded - seq_len)).view(batch, num_chunks, chunk)
        visible = (visible & (key_ids[:, :, None, :] == query_ids[..., None]))[:, None]
    mask = band & (visible | (col - row == left))  # every slot sees itself
    out = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask)
    return out.reshape(batch, heads, padded, head_dim)[:, :, :seq_len]
