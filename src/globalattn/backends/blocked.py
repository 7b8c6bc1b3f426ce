"""The blocked PyTorch backend: exact global-token attention without an L x S matrix.

The work is cut into tiles: a tile is some query rows of one block and the keys of that block they
may see.  Tiles of one shape are batched into chunks; in a chunk each query scores its tile's keys
and the global tokens it may see, and one softmax runs over both.  Forward keeps only the output
and the log-sum-exp of each row; backward recomputes every chunk's scores from them (as
flash-attention does), so that the extra memory of forward and backward alike is O(S) plus one
chunk, whatever S.

Bidirectional, a tile is a whole block.  Causal, a block's queries are split into a few parts, and
part r sees only the keys up to its end: the masked upper triangle of the block is mostly skipped
instead of computed and thrown away.

Inside a chunk the query rows are laid out (n, g, Qm): tile, query head in its group, row.  With
that layout the grouped query heads of one key/value head share a single batched matmul, and the
key gradients' sum over the group falls out of the matmul instead of a separate reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from globalattn import spec

# Score entries (B * Hq * rows * columns) per chunk.  Bounds the peak extra memory (a few buffers
# of this many float32 values) while keeping each matmul large enough to run at speed.
CHUNK_ELEMENTS = 1 << 20
# Causal: a block's queries are split into parts of at least this many rows (at most 4 parts).
MIN_CAUSAL_PART = 32


def blocked_attention(query, key, value, *, block_size, causal, scope, remainder, key_mask, scale, dropout_p):
    (key_global, value_global), present = spec.pool_blocks((key, value), block_size, remainder, key_mask)
    seed = int(torch.randint(2**62, (1,)).item()) if dropout_p > 0 else 0
    chunks = _plan_chunks(query, key, block_size, remainder, causal, scope)
    query_offset = key.shape[2] - query.shape[2]
    options = _Options(causal, scope, scale, dropout_p, seed, query_offset, key_mask, present, chunks)
    return _BlockedAttention.apply(query, key, value, key_global, value_global, options)


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
    real_keys: torch.Tensor  # the real key positions, in tile order (a key may be in several chunks)
    row_span: slice | None  # real_rows as a slice when they are consecutive and unpadded
    key_span: slice | None  # likewise for real_keys
    global_cols: slice  # the global tokens any of its queries may see


@dataclass(frozen=True)
class _Options:
    causal: bool
    scope: str
    scale: float
    dropout_p: float
    seed: int  # dropout: chunk i draws from seed + i, in forward and again in backward
    query_offset: int  # query row i sits at position query_offset + i
    key_mask: torch.Tensor | None  # (B, S) bool
    present: torch.Tensor  # (B, G) bool: block has a real token
    chunks: list[_Chunk]


def _plan_chunks(query, key, block_size, remainder, causal, scope) -> list[_Chunk]:
    batch, q_heads, q_len, _ = query.shape
    seq_len = key.shape[2]
    if q_len == 0:
        return []
    starts, ends = spec.block_starts_and_ends(seq_len, block_size, remainder)  # planned on the CPU
    num_global = starts.numel()
    offset = seq_len - q_len  # query row i sits at position offset + i
    parts = max(1, min(4, block_size // MIN_CAUSAL_PART)) if causal else 1
    part_len = -(-block_size // parts)

    chunks = []
    for part in range(parts):
        # Query positions [q_start, q_end) of each block's part, and the keys [starts, k_end) they see.
        q_start = (starts + part * part_len).clamp(min=offset)
        q_end = ends if part == parts - 1 else torch.minimum(starts + (part + 1) * part_len, ends)
        k_end = q_end if causal else ends
        blocks = torch.nonzero(q_end > q_start)[:, 0]
        if blocks.numel() == 0:
            continue
        rows, cols = int((q_end - q_start)[blocks].max()), int((k_end - starts)[blocks].max())
        per_chunk = max(1, CHUNK_ELEMENTS // (batch * q_heads * rows * (cols + num_global)))
        for tile_blocks in blocks.split(per_chunk):
            chunks.append(
                _make_chunk(
                    len(chunks), tile_blocks, q_start - offset, q_end - offset, starts, k_end, causal, scope, num_global
                )
            )
    device = query.device
    return [_to_device(chunk, device) for chunk in chunks]


def _make_chunk(index, blocks, row_start, row_end, key_start, key_end, causal, scope, num_global) -> _Chunk:
    query_rows, query_real = _tile(row_start[blocks], row_end[blocks])
    key_pos, key_real = _tile(key_start[blocks], key_end[blocks])
    if causal:
        global_cols = slice(0, int(blocks.max()))  # a query in block c sees blocks j < c
    elif scope == "own":
        global_cols = slice(int(blocks.min()), int(blocks.max()) + 1)
    else:
        global_cols = slice(0, num_global)
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


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, key_global, value_global, options: _Options):
        batch, q_heads, q_len, _ = query.shape
        compute_dtype = torch.promote_types(query.dtype, torch.float32)
        out = query.new_zeros(batch, q_heads, q_len, value.shape[-1])
        lse = torch.full((batch, q_heads, q_len), float("-inf"), dtype=compute_dtype, device=query.device)
        for chunk in options.chunks:
            tiles = _ChunkTiles(chunk, options, query, key, value, key_global, value_global)
            probs, chunk_lse = tiles.probabilities()
            if options.dropout_p > 0:
                probs.mul_(tiles.dropout_scale(probs.shape))
            tiles.write_rows(out, tiles.weighted_values(probs))
            tiles.write_rows(lse[..., None], chunk_lse[..., None])
        ctx.save_for_backward(query, key, value, key_global, value_global, out, lse)
        ctx.options = options
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        query, key, value, key_global, value_global, out, lse = ctx.saved_tensors
        options = ctx.options
        grads = [torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32)) for x in ctx.saved_tensors[:5]]
        grad_query, grad_key, grad_value, grad_key_global, grad_value_global = grads
        if grad_out is None:
            grad_out = torch.zeros_like(out)
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
            d_value_local, d_value_global = tiles.value_grads(weights, d_out)
            d_scores.sub_(delta).mul_(probs)
            d_query_rows, d_key_local, d_key_global = tiles.score_input_grads(d_scores)
            tiles.write_rows(grad_query, d_query_rows)
            tiles.add_keys(grad_key, d_key_local)
            tiles.add_keys(grad_value, d_value_local)
            grad_key_global[:, :, chunk.global_cols] += d_key_global
            grad_value_global[:, :, chunk.global_cols] += d_value_global
        return (*(g.to(x.dtype) for g, x in zip(grads, ctx.saved_tensors)), None)


class _ChunkTiles:
    """One chunk's inputs gathered into padded tiles, in the compute dtype, and the tile math."""

    def __init__(self, chunk: _Chunk, options: _Options, query, key, value, key_global, value_global):
        self.chunk, self.options = chunk, options
        self.batch, self.q_heads = query.shape[:2]
        self.kv_heads = key.shape[1]
        self.group = self.q_heads // self.kv_heads
        self.n, self.q_width = chunk.query_rows.shape
        self.k_width = chunk.key_pos.shape[1]
        self.dtype = torch.promote_types(query.dtype, torch.float32)
        # The scale is applied to the queries, which are far fewer than the scores.
        self.scaled_query = self.gather_rows(query) * options.scale  # (B, Hkv, n, g*Qm, D)
        self.key = self._gather_keys(key)  # (B, Hkv, n, Km, D)
        self.value = self._gather_keys(value)  # (B, Hkv, n, Km, Dv)
        self.key_global = key_global[:, :, chunk.global_cols].to(self.dtype)  # (B, Hkv, Gv, D)
        self.value_global = value_global[:, :, chunk.global_cols].to(self.dtype)  # (B, Hkv, Gv, Dv)

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

    def add_keys(self, target, keys):
        """target[:, :, pos] += the real keys of ``keys`` (B, Hkv, n, Km, E), target (B, Hkv, S, E)."""
        keys = keys.flatten(2, 3)
        if self.chunk.key_span:
            target[:, :, self.chunk.key_span] += keys
        else:
            target.index_add_(2, self.chunk.real_keys, keys[:, :, self.chunk.key_real.flatten()])

    def zero_padding_rows_(self, x):
        """Set the rows of padding slots of x (B, Hkv, n, g*Qm, E) to zero, in place."""
        if self.chunk.has_padding_rows:
            tile = x.view(*x.shape[:3], self.group, self.q_width, x.shape[-1])
            tile.mul_(self.chunk.query_real[:, None, :, None])  # (n, 1, Qm, 1)

    def _split(self, x):
        """Columns [local keys | global tokens] of a (..., Km + Gv) tile."""
        return x[..., : self.k_width], x[..., self.k_width :]

    def _hide_unseen_(self, local, glob):
        """Set to -inf, in place, the scores of cells a query may not see (SPEC's table).

        local (B, Hkv, n, g*Qm, Km), glob (B, Hkv, n, g*Qm, Gv).  The masks stay small and broadcast:
        local cells depend on (tile, row, key), global ones on (tile, global token) alone.
        """
        chunk, options = self.chunk, self.options
        query_pos = (chunk.query_rows + options.query_offset)[:, :, None]  # (n, Qm, 1)
        block = chunk.blocks[:, None, None]  # (n, 1, 1)
        seen = spec.local_visible(query_pos, chunk.key_pos[:, None, :], block, block, options.causal)
        seen = (seen & chunk.key_real[:, None, :])[None]  # (1, n, Qm, Km)
        if options.key_mask is not None:
            seen = seen & options.key_mask[:, chunk.key_pos][:, :, None, :]  # (B, n, Qm, Km)
        self._fill_unseen_(local, seen)
        global_block = torch.arange(options.present.shape[1], device=block.device)[chunk.global_cols]
        seen = spec.global_visible(block[:, 0], global_block[None], options.causal, options.scope)  # (n, Gv)
        self._fill_unseen_(glob, (seen[None] & options.present[:, None, chunk.global_cols])[:, :, None, :])

    def _fill_unseen_(self, scores, seen):
        """scores (B, Hkv, n, g*Qm, C), seen (B or 1, n, Qm or 1, C): -inf where not seen."""
        if not bool(seen.all()):
            tile = scores.view(*scores.shape[:3], self.group, self.q_width, scores.shape[-1])
            tile.masked_fill_(~seen[:, None, :, None], float("-inf"))

    # -- math ---------------------------------------------------------------------------------
    def probabilities(self, lse=None):
        """Softmax weights over [local ; global] (B, Hkv, n, g*Qm, Km + Gv), and each row's lse.

        Given ``lse`` (backward), the weights are recomputed from it instead of renormalised.
        The score tile is large: every step below works on it in place.
        """
        query = self.scaled_query
        local = query @ self.key.transpose(-1, -2)
        glob = (query.flatten(2, 3) @ self.key_global.transpose(-1, -2)).unflatten(2, (self.n, -1))
        self._hide_unseen_(local, glob)
        scores = torch.cat([local, glob], dim=-1)
        if lse is not None:
            return scores.sub_(_finite_or_zero(lse)[..., None]).exp_(), None
        row_max = _finite_or_zero(scores.amax(-1, keepdim=True))
        probs = scores.sub_(row_max).exp_()
        total = probs.sum(-1, keepdim=True)
        chunk_lse = (row_max + torch.log(total))[..., 0]
        return probs.mul_(torch.where(total > 0, total, 1.0).reciprocal_()), chunk_lse

    def dropout_scale(self, shape):
        """The chunk's dropout mask divided by the keep probability; the same draw in backward."""
        generator = torch.Generator(device=self.key.device)
        generator.manual_seed(self.options.seed + self.chunk.index)
        keep = 1.0 - self.options.dropout_p
        draw = torch.rand(shape, generator=generator, device=self.key.device, dtype=self.dtype)
        return (draw < keep).to(self.dtype).div_(keep)

    def weighted_values(self, weights):
        local, glob = self._split(weights)
        return local @ self.value + (glob.flatten(2, 3) @ self.value_global).unflatten(2, (self.n, -1))

    def value_products(self, d_out):
        """dO [V ; Vg]^T for every tile cell: (B, Hkv, n, g*Qm, Km + Gv)."""
        glob = (d_out.flatten(2, 3) @ self.value_global.transpose(-1, -2)).unflatten(2, (self.n, -1))
        return torch.cat([d_out @ self.value.transpose(-1, -2), glob], dim=-1)

    def score_input_grads(self, d_scores):
        """Gradients through scores = (scale Q) [K ; Kg]^T: dQ rows, dK per block tile, dKg of the columns."""
        local, glob = self._split(d_scores)
        glob_flat = glob.flatten(2, 3)
        d_query = local @ self.key + (glob_flat @ self.key_global).unflatten(2, (self.n, -1))
        d_key = local.transpose(-1, -2) @ self.scaled_query
        d_key_global = glob_flat.transpose(-1, -2) @ self.scaled_query.flatten(2, 3)
        return d_query.mul_(self.options.scale), d_key, d_key_global

    def value_grads(self, weights, d_out):
        local, glob = self._split(weights)
        d_value = local.transpose(-1, -2) @ d_out
        d_value_global = glob.flatten(2, 3).transpose(-1, -2) @ d_out.flatten(2, 3)
        return d_value, d_value_global


def _finite_or_zero(x):
    """Replace -inf (a row that sees nothing) by 0, so that exp(-inf - x) stays 0 and not NaN."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))
