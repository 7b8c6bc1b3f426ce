"""The blocked PyTorch backend: exact global-token attention without an L x S matrix.

Queries are processed a chunk of consecutive blocks at a time.  For a chunk of n blocks, each
query scores only its own block's keys (a padded (n, Qm, Km) tile) and the global tokens it may
see, and one softmax runs over both.  Forward keeps only the output and the log-sum-exp of each
row; backward recomputes every chunk's scores from them (as flash-attention does), so that the
extra memory of forward and backward alike is O(S) plus one chunk, whatever S.

Inside a chunk the query rows are laid out (n, g, Qm): block, query head in its group, row.  With
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
CHUNK_ELEMENTS = 1 << 22


def blocked_attention(query, key, value, *, block_size, causal, scope, remainder, key_mask, scale, dropout_p):
    (key_global, value_global), present = spec.pool_blocks((key, value), block_size, remainder, key_mask)
    seed = int(torch.randint(2**62, (1,)).item()) if dropout_p > 0 else 0
    chunks = _plan_chunks(query, key, block_size, remainder, causal, scope)
    query_offset = key.shape[2] - query.shape[2]
    options = _Options(causal, scope, scale, dropout_p, seed, query_offset, key_mask, present, chunks)
    return _BlockedAttention.apply(query, key, value, key_global, value_global, options)


@dataclass(frozen=True)
class _Chunk:
    """A run of consecutive blocks ``first .. first + n - 1``, as padded index tiles."""

    index: int  # position among the chunks (seeds the chunk's dropout)
    first: int
    query_rows: torch.Tensor  # (n, Qm) query row of each tile slot (clamped where padded)
    query_real: torch.Tensor  # (n, Qm) bool: slot holds a query
    key_pos: torch.Tensor  # (n, Km) key position of each tile slot (clamped where padded)
    key_real: torch.Tensor  # (n, Km) bool: slot holds a key of the block
    rows: slice  # the contiguous query rows the chunk covers
    keys: slice  # the contiguous key positions its blocks hold
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
    device = query.device
    starts, ends = spec.block_starts_and_ends(seq_len, block_size, remainder, device)
    num_global = starts.numel()
    offset = seq_len - q_len  # query row i sits at position offset + i
    q_starts, q_ends = (starts - offset).clamp(min=0), (ends - offset).clamp(min=0)
    first_block = min(offset // block_size, num_global - 1)
    longest = int((ends - starts).max())
    per_chunk = max(1, CHUNK_ELEMENTS // (batch * q_heads * longest * (longest + num_global)))

    chunks = []
    for index, first in enumerate(range(first_block, num_global, per_chunk)):
        last = min(first + per_chunk, num_global)  # exclusive
        blocks = slice(first, last)
        query_rows, query_real = _tile(q_starts[blocks], q_ends[blocks], max(q_len - 1, 0))
        key_pos, key_real = _tile(starts[blocks], ends[blocks], seq_len - 1)
        if causal:
            global_cols = slice(0, last - 1)  # a query in block c sees blocks j < c
        elif scope == "own":
            global_cols = blocks
        else:
            global_cols = slice(0, num_global)
        chunks.append(
            _Chunk(
                index=index,
                first=first,
                query_rows=query_rows,
                query_real=query_real,
                key_pos=key_pos,
                key_real=key_real,
                rows=slice(int(q_starts[first]), int(q_ends[last - 1])),
                keys=slice(int(starts[first]), int(ends[last - 1])),
                global_cols=global_cols,
            )
        )
    return chunks


def _tile(starts, ends, max_index):
    """Padded (n, M) indices ``start .. end - 1`` per block, M the longest; and which are real."""
    width = int((ends - starts).max())
    index = starts[:, None] + torch.arange(width, device=starts.device)
    return index.clamp(max=max_index), index < ends[:, None]


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
            weights = probs * tiles.dropout_scale(probs.shape) if options.dropout_p > 0 else probs
            out_rows = tiles.weighted_values(weights)
            out[:, :, chunk.rows] = tiles.scatter_rows(out_rows).to(out.dtype)
            lse[:, :, chunk.rows] = tiles.scatter_rows(chunk_lse[..., None])[..., 0]
        ctx.save_for_backward(query, key, value, key_global, value_global, out, lse)
        ctx.options = options
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        query, key, value, key_global, value_global, out, lse = ctx.saved_tensors
        options = ctx.options
        compute_dtype = torch.promote_types(query.dtype, torch.float32)
        grad_query = torch.zeros_like(query, dtype=compute_dtype)
        grad_key = torch.zeros_like(key, dtype=compute_dtype)
        grad_value = torch.zeros_like(value, dtype=compute_dtype)
        grad_key_global = torch.zeros_like(key_global, dtype=compute_dtype)
        grad_value_global = torch.zeros_like(value_global, dtype=compute_dtype)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        for chunk in options.chunks:
            tiles = _ChunkTiles(chunk, options, query, key, value, key_global, value_global)
            probs, _ = tiles.probabilities(lse=tiles.gather_rows(lse[..., None])[..., 0])
            probs = tiles.zero_padding_rows(probs)  # a padding slot repeats a real query: keep it out of dK, dV
            d_out = tiles.gather_rows(grad_out)  # (B, Hkv, n, g*Qm, Dv)
            o = tiles.gather_rows(out)
            # Softmax backward: dS = P * (dP - sum_j P_j dP_j + d_lse); the sum equals <dO, O>.
            delta = (d_out * o).sum(-1, keepdim=True)
            if grad_lse is not None:
                delta = delta - tiles.gather_rows(grad_lse[..., None])
            d_probs = tiles.value_products(d_out)  # dO V^T, (B, Hkv, n, g*Qm, Km + Gv)
            weights = probs
            if options.dropout_p > 0:
                keep = tiles.dropout_scale(probs.shape)
                d_probs = d_probs * keep
                weights = probs * keep
            d_scores = probs * (d_probs - delta) * options.scale
            d_query_rows, d_key_local, d_key_global = tiles.score_input_grads(d_scores)
            d_value_local, d_value_global = tiles.value_grads(weights, d_out)
            grad_query[:, :, chunk.rows] = tiles.scatter_rows(d_query_rows)
            grad_key[:, :, chunk.keys] = tiles.scatter_keys(d_key_local)
            grad_value[:, :, chunk.keys] = tiles.scatter_keys(d_value_local)
            grad_key_global[:, :, chunk.global_cols] += d_key_global
            grad_value_global[:, :, chunk.global_cols] += d_value_global
        return (
            grad_query.to(query.dtype),
            grad_key.to(key.dtype),
            grad_value.to(value.dtype),
            grad_key_global.to(key_global.dtype),
            grad_value_global.to(value_global.dtype),
            None,
        )


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
        self.query = self.gather_rows(query)  # (B, Hkv, n, g*Qm, D)
        self.key = self._gather_keys(key)  # (B, Hkv, n, Km, D)
        self.value = self._gather_keys(value)  # (B, Hkv, n, Km, Dv)
        self.key_global = key_global[:, :, chunk.global_cols].to(self.dtype)  # (B, Hkv, Gv, D)
        self.value_global = value_global[:, :, chunk.global_cols].to(self.dtype)  # (B, Hkv, Gv, Dv)

    # -- layout -------------------------------------------------------------------------------
    def gather_rows(self, x):
        """(B, Hq, L, E) -> (B, Hkv, n, g*Qm, E): the chunk's query rows, grouped per key head."""
        rows = x.index_select(2, self.chunk.query_rows.flatten()).to(self.dtype)
        rows = rows.view(self.batch, self.kv_heads, self.group, self.n, self.q_width, -1).transpose(2, 3)
        return rows.reshape(self.batch, self.kv_heads, self.n, self.group * self.q_width, -1)

    def scatter_rows(self, rows):
        """Inverse of ``gather_rows`` for the real rows: (B, Hkv, n, g*Qm, E) -> (B, Hq, rows, E)."""
        rows = rows.view(self.batch, self.kv_heads, self.n, self.group, self.q_width, -1).transpose(2, 3)
        rows = rows.reshape(self.batch, self.q_heads, self.n * self.q_width, -1)
        return rows[:, :, self.chunk.query_real.flatten()]

    def _gather_keys(self, x):
        """(B, Hkv, S, E) -> (B, Hkv, n, Km, E): each block's keys, padded to the longest."""
        keys = x.index_select(2, self.chunk.key_pos.flatten()).to(self.dtype)
        return keys.view(self.batch, self.kv_heads, self.n, self.k_width, -1)

    def scatter_keys(self, keys):
        """Inverse of ``_gather_keys`` for the real keys: (B, Hkv, n, Km, E) -> (B, Hkv, keys, E)."""
        return keys.flatten(2, 3)[:, :, self.chunk.key_real.flatten()]

    def zero_padding_rows(self, x):
        """x (B, Hkv, n, g*Qm, E) with the rows of padding slots set to zero."""
        tile = x.view(*x.shape[:3], self.group, self.q_width, x.shape[-1])
        real = self.chunk.query_real[:, None, :, None]  # (n, 1, Qm, 1)
        return (tile * real).view(x.shape)

    def _split(self, x):
        """Columns [local keys | global tokens] of a (..., Km + Gv) tile."""
        return x[..., : self.k_width], x[..., self.k_width :]

    # -- masks --------------------------------------------------------------------------------
    def _allowed(self):
        """(B, 1, n, 1, Qm, Km + Gv): which tile cells a query may see (SPEC's table)."""
        chunk, options = self.chunk, self.options
        query_pos = (chunk.query_rows + options.query_offset)[:, :, None]  # (n, Qm, 1)
        block = torch.arange(chunk.first, chunk.first + self.n, device=query_pos.device)[:, None, None]  # (n, 1, 1)
        local = spec.local_visible(query_pos, chunk.key_pos[:, None, :], block, block, options.causal)
        local = (local & chunk.key_real[:, None, :])[None]  # (1, n, Qm, Km)
        if options.key_mask is not None:
            local = local & options.key_mask[:, chunk.key_pos][:, :, None, :]  # (B, n, Qm, Km)
        global_block = torch.arange(options.present.shape[1], device=block.device)[chunk.global_cols]
        glob = spec.global_visible(block[:, 0], global_block[None], options.causal, options.scope)  # (n, Gv)
        glob = (glob[None] & options.present[:, None, chunk.global_cols])[:, :, None, :]  # (B, n, 1, Gv)
        shape = (self.batch, self.n, self.q_width)
        allowed = torch.cat([local.expand(*shape, -1), glob.expand(*shape, -1)], dim=-1)
        return allowed[:, None, :, None]

    # -- math ---------------------------------------------------------------------------------
    def probabilities(self, lse=None):
        """Softmax weights over [local ; global] (B, Hkv, n, g*Qm, Km + Gv), and each row's lse.

        Given ``lse`` (backward), the weights are recomputed from it instead of renormalised.
        """
        scores = torch.cat(
            [
                self.query @ self.key.transpose(-1, -2),
                (self.query.flatten(2, 3) @ self.key_global.transpose(-1, -2)).unflatten(2, (self.n, -1)),
            ],
            dim=-1,
        )
        scores = scores * self.options.scale
        tile = scores.view(*scores.shape[:3], self.group, self.q_width, -1)
        tile.masked_fill_(~self._allowed(), float("-inf"))
        if lse is not None:
            return torch.exp(scores - _finite_or_zero(lse)[..., None]), None
        row_max = _finite_or_zero(scores.amax(-1, keepdim=True))
        probs = torch.exp(scores - row_max)
        total = probs.sum(-1, keepdim=True)
        chunk_lse = (row_max + torch.log(total))[..., 0]
        return probs / torch.where(total > 0, total, 1.0), chunk_lse

    def dropout_scale(self, shape):
        """The chunk's dropout mask divided by the keep probability; the same draw in backward."""
        generator = torch.Generator(device=self.query.device)
        generator.manual_seed(self.options.seed + self.chunk.index)
        keep = 1.0 - self.options.dropout_p
        draw = torch.rand(shape, generator=generator, device=self.query.device, dtype=self.dtype)
        return (draw < keep).to(self.dtype) / keep

    def weighted_values(self, weights):
        local, glob = self._split(weights)
        return local @ self.value + (glob.flatten(2, 3) @ self.value_global).unflatten(2, (self.n, -1))

    def value_products(self, d_out):
        """dO V^T for every tile cell: (B, Hkv, n, g*Qm, Km + Gv)."""
        glob = (d_out.flatten(2, 3) @ self.value_global.transpose(-1, -2)).unflatten(2, (self.n, -1))
        return torch.cat([d_out @ self.value.transpose(-1, -2), glob], dim=-1)

    def score_input_grads(self, d_scores):
        """Gradients through scores = Q [K ; Kg]^T: dQ rows, dK per block tile, dKg of the columns."""
        local, glob = self._split(d_scores)
        glob_flat = glob.flatten(2, 3)
        d_query = local @ self.key + (glob_flat @ self.key_global).unflatten(2, (self.n, -1))
        d_key = local.transpose(-1, -2) @ self.query
        d_key_global = glob_flat.transpose(-1, -2) @ self.query.flatten(2, 3)
        return d_query, d_key, d_key_global

    def value_grads(self, weights, d_out):
        local, glob = self._split(weights)
        d_value = local.transpose(-1, -2) @ d_out
        d_value_global = glob.flatten(2, 3).transpose(-1, -2) @ d_out.flatten(2, 3)
        return d_value, d_value_global


def _finite_or_zero(x):
    """Replace -inf (a row that sees nothing) by 0, so that exp(-inf - x) stays 0 and not NaN."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))
