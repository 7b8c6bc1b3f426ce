"""The blocked PyTorch backend: exact global-token attention without an L x S matrix.

The work is cut into tiles: a tile is some query rows of one block and the keys of that block they
may see.  Tiles of one shape are batched into chunks; in a chunk each query scores its tile's keys
and the global tokens it may see, and one softmax runs over both.  Forward keeps only the output
and the log-sum-exp of each row; backward recomputes every chunk's scores from them (as
flash-attention does), so that the extra memory of forward and backward alike is O(S) plus one
chunk, whatever S.

A tile is a block's queries (those at or after the first query position) and the block's keys; in
causal mode the upper triangle of each tile is masked, not skipped (splitting blocks into smaller
causal tiles saved those FLOPs but lost more to smaller matmuls on the CPU).  With ``top_blocks``,
every row also scores the keys of the blocks it is routed to, gathered row by row.  With
``window=w`` a tile's keys are the span of its rows' windows instead of its block (b + w - 1 keys
causal).  Global tokens from outside the call (``extra_global_tokens``) are global columns ahead
of the call's own.  Packed documents (``options.documents``) come as one row whose blocks are cut
per document: a tile's keys and the global columns of its chunk stay within its documents.

Inside a chunk the query rows are laid out (n, g, Qm): tile, query head in its group, row.  With
that layout the grouped query heads of one key/value head share a single batched matmul, and the
key gradients' sum over the group falls out of the matmul instead of a separate reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from globalattn import checks, spec

# Score entries (B * Hq * rows * columns) per chunk.  Bounds the peak extra memory (a few buffers
# of this many float32 values) while keeping each matmul large enough to run at speed.
CHUNK_ELEMENTS = 1 << 20
LOG2_E, LN_2 = math.log2(math.e), math.log(2.0)


def unsupported(query, key, value, options) -> None:
    return None  # the whole contract


def attention(query, key, value, options):
    # Tokens from outside the call are global columns ahead of the call's own; their gradients
    # flow back through the concatenation.
    key_global, value_global, present = options.global_tokens(key, value)
    # Packed documents travel to the op as one (6, G) table of their blocks.
    document_table = None
    if options.documents is not None:
        parts = ("starts", "ends", "first_block", "last_block", "doc_start", "doc_end")
        document_table = torch.stack([getattr(options.documents, name) for name in parts])
    # Dropout draws its masks from one seed per call, taken from torch's generator (so that
    # torch.manual_seed reproduces a run) and replayed by the backward.
    seed = torch.randint(2**62, (1,)) if options.dropout_p > 0 else None
    flags = (
        options.block_size,
        options.causal,
        options.scope,
        options.remainder,
        options.scale,
        options.top_blocks,
        options.dropout_p,
        options.num_extra,
        options.window,
    )
    return _forward_op(
        query, key, value, key_global, value_global, present, options.key_mask, seed, document_table, *flags
    )


def _plan(
    query, key, value, present, key_mask, seed, document_table, block_size, causal, scope, remainder, scale,
    top_blocks, dropout_p, num_extra, window,
):  # fmt: skip
    """The options and chunks of one call (forward and backward plan the same)."""
    if document_table is None:  # planned on the CPU
        starts, ends = spec.block_starts_and_ends(key.shape[2], block_size, remainder)
        table = None
    else:
        table = document_table.cpu()
        starts, ends = table[0], table[1]
    return _Options(
        causal=causal,
        scope=scope,
        scale=scale,
        top_blocks=top_blocks,
        window=window,
        dropout_p=dropout_p,
        seed=0 if seed is None else int(seed),
        query_offset=key.shape[2] - query.shape[2],
        key_mask=key_mask,
        present=present,
        num_extra=num_extra,
        block_starts=starts.to(query.device),
        block_ends=ends.to(query.device),
        block_document=None if document_table is None else document_table[2],
        chunks=_plan_chunks(query, key, value, starts, ends, causal, scope, top_blocks, num_extra, window, table),
    )


@dataclass(frozen=True)
class _Chunk:
    """n tiles of one shape, as padded index tiles (padding slots repeat a real index)."""

    index: int  # position among the chunks (seeds the chunk's dropout)
    blocks: torch.Tensor  # (n,) the block of each tile
    query_rows: torch.Tensor  # (n, Qm) query row of each tile slot
    query_real: torch.Tensor  # (n, Qm) bool: slot holds a query of the tile
    has_padding_rows: bool  # some slot of query_real is False
    key_pos: torch.Tensor  # (n, Km) key position of each tile slot
    key_real: torch.Tensor  # (n, Km) bool: slot holds a key of the tile
    real_rows: torch.Tensor  # the real query rows, in tile order (each row is in exactly one tile)
    real_keys: torch.Tensor  # the real key positions, in tile order
    row_span: slice | None  # real_rows as a slice when they are consecutive and unpadded
    key_span: slice | None  # likewise for real_keys
    global_cols: slice  # the global columns (extra tokens first) any of its queries may see


@dataclass(frozen=True)
class _Options:
    causal: bool
    scope: str
    scale: float
    top_blocks: int
    window: int | None  # w: a row's local keys are the positions within w of it, not its block
    dropout_p: float
    seed: int  # dropout: chunk i draws from seed + i, in forward and again in backward
    query_offset: int  # query row i sits at position query_offset + i
    key_mask: torch.Tensor | None  # (B, S) bool
    present: torch.Tensor  # (B, T + G) bool: the global token exists (its block has a real token)
    num_extra: int  # T: global columns 0 .. T-1 hold tokens from outside the call, column T + j block j
    block_starts: torch.Tensor  # (G,) first position of each block
    block_ends: torch.Tensor  # (G,) one past its last position
    block_document: torch.Tensor | None  # (G,) packed documents: the first block of each block's document
    chunks: list[_Chunk]


def _plan_chunks(query, key, value, starts, ends, causal, scope, top_blocks, num_extra, window, documents):
    """``documents``: None, or the (6, G) table of packed documents' blocks (their starts, ends, and
    their documents' first and last blocks, first and one-past-last positions)."""
    batch, q_heads, q_len, _ = query.shape
    seq_len = key.shape[2]
    if batch * q_heads * q_len == 0:
        return []
    num_global = starts.numel()
    offset = seq_len - q_len  # query row i sits at position offset + i
    # Per query row: scores against the global tokens and, when routing, the routed keys' scores
    # plus their gathered keys and values.
    routed = min(top_blocks, num_global) * int((ends - starts).max())
    per_row = num_extra + num_global + routed * (1 + key.shape[-1] + value.shape[-1])
    q_start = starts.clamp(min=offset)  # each block's first query position
    blocks = torch.nonzero(ends > q_start)[:, 0]  # the blocks that hold queries
    key_lo, key_hi = starts, ends  # the keys a tile's queries may see: its block's, or their windows'
    if window is not None:  # within the document
        doc_start, doc_end = (0, seq_len) if documents is None else (documents[4], documents[5])
        key_lo = torch.maximum(q_start - window + 1, torch.as_tensor(doc_start))
        key_hi = ends if causal else torch.minimum(ends + window - 1, torch.as_tensor(doc_end))
    # The global tokens a tile may see are its document's: each block's document's first and last block.
    if documents is None:
        doc_blocks = torch.zeros_like(starts), torch.full_like(starts, num_global - 1)
    else:
        doc_blocks = documents[2], documents[3]
    q_width, k_width = int((ends - q_start)[blocks].max()), int((key_hi - key_lo)[blocks].max())
    per_chunk = max(1, CHUNK_ELEMENTS // (batch * q_heads * q_width * (k_width + per_row)))
    chunks = [
        _make_chunk(
            index, tile_blocks, q_start - offset, ends - offset, key_lo, key_hi, causal, scope, doc_blocks, num_extra
        )  # fmt: skip
        for index, tile_blocks in enumerate(blocks.split(per_chunk))
    ]
    device = query.device
    return [_to_device(chunk, device) for chunk in chunks]


def _make_chunk(index, blocks, row_start, row_end, key_start, key_end, causal, scope, doc_blocks, num_extra):
    query_rows, query_real = _tile(row_start[blocks], row_end[blocks])
    key_pos, key_real = _tile(key_start[blocks], key_end[blocks])
    first, last = int(blocks.min()), int(blocks.max())
    doc_first, doc_last = int(doc_blocks[0][first]), int(doc_blocks[1][last])  # the span of the tiles' documents
    if causal:  # a query in block c sees blocks j < c (of its document); extra tokens lead
        global_cols = slice(0 if num_extra else doc_first, num_extra + last)
    elif scope == "own":  # (never with extra tokens)
        global_cols = slice(first, last + 1)
    else:
        global_cols = slice(0 if num_extra else doc_first, num_extra + doc_last + 1)
    real_rows, real_keys = query_rows[query_real], key_pos[key_real]
    return _Chunk(
        index=index,
        blocks=blocks,
        query_rows=query_rows,
        query_real=query_real,
        has_padding_rows=not bool(query_real.all()),
        key_pos=key_pos,
        key_real=key_real,
        real_rows=real_rows,
        real_keys=real_keys,
        row_span=_as_span(real_rows, query_real),
        key_span=_as_span(real_keys, key_real),
        global_cols=global_cols,
    )


def _tile(starts, ends):
    """Padded (n, M) indices ``start .. end - 1`` per tile, M the longest; and which are real."""
    index = starts[:, None] + torch.arange(int((ends - starts).max()))
    real = index < ends[:, None]
    return torch.where(real, index, starts[:, None]), real


def _as_span(real_index, real) -> slice | None:
    """The indices as a slice when they are consecutive and no slot is padding, else None."""
    if not bool(real.all()) or bool((real_index.diff() != 1).any()):
        return None
    return slice(int(real_index[0]), int(real_index[-1]) + 1)


def _to_device(chunk: _Chunk, device) -> _Chunk:
    moved = {name: getattr(chunk, name) for name in chunk.__dataclass_fields__}
    for name, value in moved.items():
        if isinstance(value, torch.Tensor):
            moved[name] = value.to(device)
    return _Chunk(**moved)


# The forward and backward are custom ops, opaque to torch.compile: their chunk planning is Python
# over the block layout, which would otherwise break the graph of every model that calls them.


@torch.library.custom_op("globalattn::blocked_forward", mutates_args=())
def _forward_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_global: torch.Tensor,
    value_global: torch.Tensor,
    present: torch.Tensor,
    key_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    document_table: torch.Tensor | None,
    block_size: int,
    causal: bool,
    scope: str,
    remainder: str,
    scale: float,
    top_blocks: int,
    dropout_p: float,
    num_extra: int,
    window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    options = _plan(query, key, value, present, key_mask, seed, document_table, block_size, causal, scope, remainder,
                    scale, top_blocks, dropout_p, num_extra, window)  # fmt: skip
    out, lse = _empty_outputs(query, value)  # every row is written by the one tile that holds it
    for chunk in options.chunks:
        tiles = _ChunkTiles(chunk, options, query, key, value, key_global, value_global)
        probs, chunk_lse = tiles.probabilities()
        if options.dropout_p > 0:
            probs.mul_(tiles.dropout_scale(probs.shape))
        tiles.write_rows(out, tiles.weighted_values(probs))
        tiles.write_rows(lse[..., None], chunk_lse[..., None])
    return out, lse


@_forward_op.register_fake
def _(query, key, value, *rest):
    return _empty_outputs(query, value)


def _empty_outputs(query, value):
    """out (B, Hq, L, Dv) in the query's dtype and lse (B, Hq, L) in float32 or better, unfilled."""
    batch, q_heads, q_len, _ = query.shape
    lse_dtype = torch.promote_types(query.dtype, torch.float32)
    return query.new_empty(batch, q_heads, q_len, value.shape[-1]), query.new_empty(
        batch, q_heads, q_len, dtype=lse_dtype
    )


@torch.library.custom_op("globalattn::blocked_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_global: torch.Tensor,
    value_global: torch.Tensor,
    present: torch.Tensor,
    key_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    document_table: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_size: int,
    causal: bool,
    scope: str,
    remainder: str,
    scale: float,
    top_blocks: int,
    dropout_p: float,
    num_extra: int,
    window: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    options = _plan(query, key, value, present, key_mask, seed, document_table, block_size, causal, scope, remainder,
                    scale, top_blocks, dropout_p, num_extra, window)  # fmt: skip
    inputs = (query, key, value, key_global, value_global)
    grads = [torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32)) for x in inputs]
    grad_query, grad_key, grad_value, grad_key_global, grad_value_global = grads
    for chunk in options.chunks:
        tiles = _ChunkTiles(chunk, options, query, key, value, key_global, value_global)
        probs, _ = tiles.probabilities(lse=tiles.gather_rows(lse[..., None])[..., 0])
        tiles.zero_padding_rows_(probs)  # a padding slot repeats a real query: keep it out of dK, dV
        d_out = tiles.gather_rows(grad_out)  # (B, Hkv, n, g*Qm, Dv)
        # Softmax backward: dS = P * (dP - sum_j P_j dP_j + d_lse), and that sum equals <dO, O>.
        delta = (d_out * tiles.gather_rows(out)).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta -= tiles.gather_rows(grad_lse[..., None])
        d_scores = tiles.value_products(d_out)  # dO [V ; Vg]^T, (B, Hkv, n, g*Qm, Km + Gv)
        weights = probs
        if options.dropout_p > 0:
            keep = tiles.dropout_scale(probs.shape)
            d_scores.mul_(keep)
            weights = probs * keep
        tiles.add_value_grads(weights, d_out, grad_value, grad_value_global)
        d_scores.sub_(delta).mul_(probs)
        tiles.write_rows(grad_query, tiles.add_key_grads(d_scores, grad_key, grad_key_global))
    return tuple(g.to(x.dtype) for g, x in zip(grads, inputs))


@_backward_op.register_fake
def _(grad_out, grad_lse, query, key, value, key_global, value_global, *rest):
    return tuple(torch.empty_like(x) for x in (query, key, value, key_global, value_global))


def _setup_context(ctx, inputs, output):
    tensors, ctx.options = inputs[:9], inputs[9:]  # (query .. document_table), (block_size .. window)
    ctx.save_for_backward(*tensors, *output)


def _backward(ctx, grad_out, grad_lse):
    checks.first_order_backward("torch")
    *tensors, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grads = _backward_op(grad_out, grad_lse, *tensors, out, lse, *ctx.options)
    return (*grads, None, None, None, None, *(None for _ in ctx.options))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _ChunkTiles:
    """One chunk's inputs gathered into padded tiles, in the compute dtype, and the tile math.

    Score columns of a row: [its tile's keys (Km) | the global tokens (Gv) | with ``top_blocks``,
    the keys of its routed blocks (R = k * the longest block)].
    """

    def __init__(self, chunk: _Chunk, options: _Options, query, key, value, key_global, value_global):
        self.chunk, self.options = chunk, options
        self.batch, self.q_heads = query.shape[:2]
        self.kv_heads = key.shape[1]
        self.group = self.q_heads // self.kv_heads
        self.n, self.q_width = chunk.query_rows.shape
        self.k_width = chunk.key_pos.shape[1]
        self.dtype = torch.promote_types(query.dtype, torch.float32)
        # The scale is applied to the queries, which are far fewer than the scores.  Scores are
        # computed in log2 units (times log2 e) for exp2, which runs several times faster than exp
        # here, and far faster on the masked -inf cells; gradients use the natural scale.
        self.scaled_query = self.gather_rows(query) * options.scale  # (B, Hkv, n, g*Qm, D)
        self.query_log2 = self.scaled_query * LOG2_E
        self.key = self._gather_keys(key)  # (B, Hkv, n, Km, D)
        self.value = self._gather_keys(value)  # (B, Hkv, n, Km, Dv)
        self.key_global = key_global[:, :, chunk.global_cols].to(self.dtype)  # (B, Hkv, Gv, D)
        self.value_global = value_global[:, :, chunk.global_cols].to(self.dtype)  # (B, Hkv, Gv, Dv)
        self.global_scores = self._rows_times(self.key_global.transpose(-1, -2))  # (B, Hkv, n, g*Qm, Gv)
        self.g_width = self.key_global.shape[2]
        if options.top_blocks:
            self._route(key, value)

    # -- layout -------------------------------------------------------------------------------
    def gather_rows(self, x):
        """(B, Hq, L, E) -> (B, Hkv, n, g*Qm, E): the chunk's query rows, grouped per key head."""
        span = self.chunk.row_span
        rows = x[:, :, span] if span else x.index_select(2, self.chunk.query_rows.flatten())
        rows = rows.to(self.dtype).view(self.batch, self.kv_heads, self.group, self.n, self.q_width, -1)
        return rows.transpose(2, 3).reshape(self.batch, self.kv_heads, self.n, self.group * self.q_width, -1)

    def write_rows(self, target, rows):
        """target[:, :, row] = the real rows of ``rows`` (B, Hkv, n, g*Qm, E), target (B, Hq, L, E)."""
        rows = rows.view(self.batch, self.kv_heads, self.n, self.group, self.q_width, -1).transpose(2, 3)
        rows = rows.reshape(self.batch, self.q_heads, self.n * self.q_width, -1).to(target.dtype)
        if self.chunk.row_span:
            target[:, :, self.chunk.row_span] = rows
        else:
            target.index_copy_(2, self.chunk.real_rows, rows[:, :, self.chunk.query_real.flatten()])

    def _gather_keys(self, x):
        """(B, Hkv, S, E) -> (B, Hkv, n, Km, E): each tile's keys, padded to the longest."""
        span = self.chunk.key_span
        keys = x[:, :, span] if span else x.index_select(2, self.chunk.key_pos.flatten())
        return keys.to(self.dtype).view(self.batch, self.kv_heads, self.n, self.k_width, -1)

    def _add_keys(self, target, keys):
        """target[:, :, pos] += the real keys of ``keys`` (B, Hkv, n, Km, E), target (B, Hkv, S, E)."""
        keys = keys.flatten(2, 3)
        if self.chunk.key_span:
            target[:, :, self.chunk.key_span] += keys
        else:
            target.index_add_(2, self.chunk.real_keys, keys[:, :, self.chunk.key_real.flatten()])

    def _rows_times(self, matrix):
        """All rows of the chunk (B, Hkv, n, g*Qm, E) times a (B, Hkv, E, F) matrix, as one matmul."""
        return (self.query_log2.flatten(2, 3) @ matrix).unflatten(2, (self.n, -1))

    def zero_padding_rows_(self, x):
        """Set the rows of padding slots of x (B, Hkv, n, g*Qm, E) to zero, in place."""
        if self.chunk.has_padding_rows:
            tile = x.view(*x.shape[:3], self.group, self.q_width, x.shape[-1])
            tile.mul_(self.chunk.query_real[:, None, :, None])  # (n, 1, Qm, 1)

    def _split(self, x):
        """Columns [local keys | global tokens | routed keys] of a score-shaped tile."""
        routed_start = self.k_width + self.g_width
        return x[..., : self.k_width], x[..., self.k_width : routed_start], x[..., routed_start:]

    # -- who sees what ------------------------------------------------------------------------
    def _local_seen(self):
        """(B or 1, n, Qm, Km): the tile's keys each query may see."""
        chunk, options = self.chunk, self.options
        query_pos = (chunk.query_rows + options.query_offset)[:, :, None]  # (n, Qm, 1)
        block = chunk.blocks[:, None, None]  # (n, 1, 1)
        seen = spec.local_visible(query_pos, chunk.key_pos[:, None, :], block, block, options.causal, options.window)
        seen = (seen & chunk.key_real[:, None, :])[None]  # (1, n, Qm, Km)
        if options.key_mask is not None:
            seen = seen & options.key_mask[:, chunk.key_pos][:, :, None, :]  # (B, n, Qm, Km)
        return seen

    def _global_seen(self, exclude_own=False):
        """(B, n, 1, Gv): the global tokens each tile's queries may see (routing: not their own)."""
        chunk, options = self.chunk, self.options
        block = chunk.blocks[:, None]  # (n, 1)
        columns = torch.arange(options.present.shape[1], device=block.device)[chunk.global_cols]
        global_block = (columns - options.num_extra)[None]  # extra tokens: negative, before every block
        seen = spec.global_visible(block, global_block, options.causal, options.scope)  # (n, Gv)
        if options.block_document is not None:  # (never with extra tokens) each document on its own
            seen = seen & (options.block_document[global_block] == options.block_document[block])
        if exclude_own:
            seen = seen & (global_block != block)
        return (seen[None] & options.present[:, None, chunk.global_cols])[:, :, None, :]

    def _hide_unseen_(self, scores, seen):
        """-inf, in place, where a row may not look: scores (B, Hkv, n, g*Qm, C), seen (B|1, n, Qm|1, C)."""
        if not bool(seen.all()):
            tile = scores.view(*scores.shape[:3], self.group, self.q_width, scores.shape[-1])
            tile.masked_fill_(~seen[:, None, :, None], float("-inf"))

    def _route(self, key, value):
        """Each row's top blocks (``top_blocks``), their keys and values gathered per row."""
        options = self.options
        candidate = self._global_seen(exclude_own=True)[:, None, :, None]  # (B, 1, n, 1, 1, Gv)
        scores = self.global_scores.view(*self.global_scores.shape[:3], self.group, self.q_width, -1)
        blocks, chosen = spec.select_top_blocks(scores, candidate, options.top_blocks)  # (B, Hkv, n, g, Qm, k)
        blocks = blocks.flatten(2, 4) + self.chunk.global_cols.start  # (B, Hkv, rows, k)
        chosen = chosen.flatten(2, 4)
        longest = int((options.block_ends - options.block_starts).max())
        pos = options.block_starts[blocks][..., None] + torch.arange(longest, device=blocks.device)
        seen = chosen[..., None] & (pos < options.block_ends[blocks][..., None])  # (B, Hkv, rows, k, longest)
        pos = torch.where(seen, pos, 0).flatten(-2)  # (B, Hkv, rows, R)
        seen = seen.flatten(-2)
        if options.key_mask is not None:
            seen = seen & options.key_mask.gather(1, pos.flatten(1)).view(seen.shape)
        if options.window is not None:  # the union with the window: a key in both is seen once, as local
            rows = self.chunk.query_rows + options.query_offset  # (n, Qm) query positions
            row_pos = rows[:, None, :].expand(self.n, self.group, self.q_width).reshape(-1, 1)  # (rows, 1)
            seen = seen & ~spec.in_window(row_pos, pos, options.causal, options.window)
        self.routed_pos, self.routed_seen = pos, seen
        self.routed_key = self._gather_routed(key)  # (B, Hkv, rows, R, D)
        self.routed_value = self._gather_routed(value)  # (B, Hkv, rows, R, Dv)

    def _gather_routed(self, x):
        index = self.routed_pos.flatten(2)[..., None].expand(-1, -1, -1, x.shape[-1])
        return x.gather(2, index).to(self.dtype).view(*self.routed_pos.shape, x.shape[-1])

    def _scatter_routed(self, target, per_key):
        """target (B, Hkv, S, E) += per_key (B, Hkv, rows, R, E) at the routed key positions."""
        index = self.routed_pos.flatten(2)[..., None].expand(-1, -1, -1, per_key.shape[-1])
        target.scatter_add_(2, index, per_key.flatten(2, 3))

    def _per_row(self, rows, per_key):
        """Row-wise products with the routed keys: rows (B, Hkv, n, g*Qm, E) . per_key (..., R, E)."""
        return (rows.flatten(2, 3)[..., None, :] @ per_key.transpose(-1, -2))[..., 0, :].unflatten(2, (self.n, -1))

    # -- math ---------------------------------------------------------------------------------
    def probabilities(self, lse=None):
        """Softmax weights over every column (B, Hkv, n, g*Qm, C), and each row's lse.

        Given ``lse`` (backward), the weights are recomputed from it instead of renormalised.
        The score tile is large: every step below works on it in place.
        """
        local = self.query_log2 @ self.key.transpose(-1, -2)  # (B, Hkv, n, g*Qm, Km), log2 units
        self._hide_unseen_(local, self._local_seen())
        glob = self.global_scores  # masked in place: routing, the only other reader, ran in __init__
        self._hide_unseen_(glob, self._global_seen())
        parts = [local, glob]
        if self.options.top_blocks:
            routed = self._per_row(self.query_log2, self.routed_key)  # (B, Hkv, n, g*Qm, R)
            parts.append(routed.masked_fill_(~self.routed_seen.unflatten(2, (self.n, -1)), float("-inf")))
        scores = torch.cat(parts, dim=-1)
        if lse is not None:
            return scores.sub_(spec.finite_or_zero(lse)[..., None] * LOG2_E).exp2_(), None
        row_max = spec.finite_or_zero(scores.amax(-1, keepdim=True))
        probs = scores.sub_(row_max).exp2_()
        total = probs.sum(-1, keepdim=True)
        chunk_lse = (row_max + torch.log2(total))[..., 0] * LN_2  # natural log, as the contract's lse
        return probs.mul_(torch.where(total > 0, total, 1.0).reciprocal_()), chunk_lse

    def dropout_scale(self, shape):
        """The chunk's dropout mask divided by the keep probability; the same draw in backward."""
        generator = torch.Generator(device=self.key.device)
        generator.manual_seed(self.options.seed + self.chunk.index)
        keep = 1.0 - self.options.dropout_p
        draw = torch.rand(shape, generator=generator, device=self.key.device, dtype=self.dtype)
        return (draw < keep).to(self.dtype).div_(keep)

    def weighted_values(self, weights):
        local, glob, routed = self._split(weights)
        out = local @ self.value + (glob.flatten(2, 3) @ self.value_global).unflatten(2, (self.n, -1))
        if self.options.top_blocks:
            out += (routed.flatten(2, 3)[..., None, :] @ self.routed_value)[..., 0, :].unflatten(2, (self.n, -1))
        return out

    def value_products(self, d_out):
        """dO times every column's value: (B, Hkv, n, g*Qm, C)."""
        glob = (d_out.flatten(2, 3) @ self.value_global.transpose(-1, -2)).unflatten(2, (self.n, -1))
        parts = [d_out @ self.value.transpose(-1, -2), glob]
        if self.options.top_blocks:
            parts.append(self._per_row(d_out, self.routed_value))
        return torch.cat(parts, dim=-1)

    def add_key_grads(self, d_scores, grad_key, grad_key_global):
        """Backward through scores = (scale Q) [K ; Kg ; routed K]^T: adds dK and dKg; returns dQ rows."""
        local, glob, routed = self._split(d_scores)
        glob_flat = glob.flatten(2, 3)
        d_query = local @ self.key + (glob_flat @ self.key_global).unflatten(2, (self.n, -1))
        self._add_keys(grad_key, local.transpose(-1, -2) @ self.scaled_query)
        grad_key_global[:, :, self.chunk.global_cols] += glob_flat.transpose(-1, -2) @ self.scaled_query.flatten(2, 3)
        if self.options.top_blocks:
            routed = routed.flatten(2, 3)[..., None]  # (B, Hkv, rows, R, 1)
            d_query += (routed.transpose(-1, -2) @ self.routed_key)[..., 0, :].unflatten(2, (self.n, -1))
            self._scatter_routed(grad_key, routed * self.scaled_query.flatten(2, 3)[..., None, :])
        return d_query.mul_(self.options.scale)

    def add_value_grads(self, weights, d_out, grad_value, grad_value_global):
        """Backward through out = weights [V ; Vg ; routed V]: adds dV and dVg."""
        local, glob, routed = self._split(weights)
        self._add_keys(grad_value, local.transpose(-1, -2) @ d_out)
        grad_value_global[:, :, self.chunk.global_cols] += glob.flatten(2, 3).transpose(-1, -2) @ d_out.flatten(2, 3)
        if self.options.top_blocks:
            self._scatter_routed(grad_value, routed.flatten(2, 3)[..., None] * d_out.flatten(2, 3)[..., None, :])
