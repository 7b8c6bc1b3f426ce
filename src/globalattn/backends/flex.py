"""The FlexAttention backend: global-token attention as one ``flex_attention`` call.

The keys are extended with the global tokens, and a block-sparse mask says who sees what::

    columns   [ K (S keys) | pad to a tile | extra (T) ; Kg (G block means) | pad to a tile ]   (N = S_pad + G_pad)
    values    [ V          | zeros         | extra (T) ; Vg                 | zeros         ]

(the T ``extra_global_tokens`` of blocks outside the call, if any, lead the global columns as
blocks -T .. -1, which every row may see).

    tiles for S = 12, b = 4, T = 4 (bidirectional, scope "all"): row tile r reads its block's key
    tile and the global tile; ``F`` full (no mask evaluated), ``P`` partial (mask evaluated per cell)

              key tiles   global tile
        r0    F . .       P            (the global tile holds G = 3 tokens and one padding column)
        r1    . F .       P
        r2    . . F       P

``BlockMask.from_kv_blocks`` gets these tile lists, computed straight from the block bounds (a few
columns per row tile: the key tiles of the row tile's blocks, then the global tiles it may see), so
no S x (S + G) mask is ever built and the mask works at 128k tokens and beyond.  A tile is "full"
when every cell of it is provably visible: it lies inside the one block that all of the row tile's
queries share (and, causal, before the first of them), or with ``window=w`` within every one of
their windows, or it holds complete earlier global tokens; with a ``key_mask``, extra tokens or
packed documents nothing is provably visible, and every tile is partial.  Inside partial tiles the
``mask_mod`` applies the rules of docs/semantics.md cell by cell, through ``spec.local_visible``
and ``spec.global_visible`` (and each block's document), from small per-row and per-column tables
(O(S) memory, captured by the mask_mod).  Without packed documents the tile lists depend only on
the shapes and options, so they are cached per (shapes, options, device), the last 8 of them, and
with a key_mask only the (B, N) table of real columns is built per call; packed documents are
planned on every call.

Gradients: the global tokens come from ``AttentionOptions.global_tokens`` and are concatenated to the keys, so
FlexAttention's own backward reaches the keys and values through the global tokens as well.

Memory beyond the inputs: the concatenated keys and values (S + G rows each), the O(S) tables, and
the BlockMask's index tensors, which FlexAttention's format makes rectangles of (S/T) x (S/T + G/T)
int32 entries (T = 128): four of them (partial and full, by row and by column), about 4 MB each at
S = 128k, so about 17 MB in all; quadratic in S/T, they grow to about 270 MB each at S = 1M.

Devices:

- CUDA: ``torch.compile(flex_attention)``, created once on first use, generates fused Triton
  kernels.  Compiling happens on the first call for each new combination of dtype, head dims,
  grouped-query ratio and options (causal, scope, key_mask or not: each is a different mask_mod),
  and at first per shape: the first call compiles the forward kernel, the first backward the
  backward kernel, and a new sequence length makes dynamo recompile (after the first change, with
  symbolic sizes).  Past ``torch._dynamo.config.recompile_limit`` recompilations
  dynamo stops compiling, and FlexAttention then runs unfused, with an L x N score matrix.
  float32 inputs follow torch's float32 matmul precision setting (TF32 when it is "high").
- CPU: ``flex_attention`` runs eagerly, which materialises the whole L x N score matrix and ignores
  the tiles (only the mask_mod decides): for testing only, and, as of torch 2.13, without a
  backward pass.  The "auto" backend never picks flex on the CPU.

Not covered (``unsupported`` says so, and ``backend="torch"`` computes these): ``top_blocks``,
``dropout_p > 0``, gradients on the CPU, and on CUDA float64 inputs and head dims below 16.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from globalattn import spec

# FlexAttention's tile (its default sparse block size): T query rows x T key columns.  The key
# columns are padded to multiples of it so that no tile mixes keys with global tokens.
TILE = 128
_compiled_flex_attention = None  # torch.compile(flex_attention), created on the first CUDA call
HAS_TRITON = importlib.util.find_spec("triton") is not None  # looked up once, not on every call


def attention(query, key, value, options):
    """docs/semantics.md's attention through FlexAttention: out (B, Hq, L, Dv), lse (B, Hq, L).

    ``options`` are resolved by ``globalattn.options.resolve``; ``top_blocks`` and ``dropout_p``
    must be 0 (see ``unsupported``).
    """
    batch, q_heads, q_len, _ = query.shape
    kv_heads, seq_len = key.shape[1], key.shape[2]
    lse_dtype = torch.promote_types(query.dtype, torch.float32)
    if batch * q_heads * q_len == 0:  # nothing to attend; FlexAttention's kernels refuse empty queries
        nothing = sum(x[:, :, :0].sum() for x in (query, key, value))  # 0, connected to the inputs' graph
        out = query.new_zeros(batch, q_heads, q_len, value.shape[-1]) + nothing
        return out, torch.full((batch, q_heads, q_len), float("-inf"), dtype=lse_dtype, device=query.device)

    if not torch.is_grad_enabled():  # flex_attention refuses CPU inputs that require grad, even then
        query, key, value = query.detach(), key.detach(), value.detach()
    block_size, remainder, key_mask, extra = (
        options.block_size,
        options.remainder,
        options.key_mask,
        options.extra_global_tokens,
    )
    documents = options.documents
    # Tokens from outside the call lead the global columns, ahead of the call's own.
    key_global, value_global, present = options.global_tokens(key, value)
    # With padding or extra tokens, whether a column exists differs per batch element.
    masked = key_mask is not None or extra is not None
    mode = (options.causal, options.scope, options.window, TILE)
    if documents is None:  # the tiles depend on the shapes and options alone: planned once for them
        plan = _uniform_plan(seq_len, q_len, block_size, remainder, masked, options.num_extra, *mode, query.device)
    else:  # packed documents: no tile is provably full, and real columns are per element as with a mask
        masked = True
        plan = _plan(_Layout.of_documents(documents), seq_len, q_len, True, options.num_extra, *mode, query.device)
    keys = _columns(key, key_global, plan)  # (B, Hkv, N, D)
    values = _columns(value, value_global, plan)  # (B, Hkv, N, Dv)
    block_mask = plan.with_real_columns(key_mask, present) if masked else plan.block_mask

    out, aux = _flex_function(query.device)(
        query,
        keys,
        values,
        block_mask=block_mask,
        scale=options.scale,
        enable_gqa=q_heads != kv_heads,
        return_aux=AuxRequest(lse=True),
    )
    return out, aux.lse.to(lse_dtype)


def unsupported(query, key, value, options) -> str | None:
    """Why this backend cannot compute these inputs (a short reason), or None when it can."""
    if options.top_blocks > 0:
        return "top_blocks (routing to the top blocks) is not supported"
    if options.dropout_p > 0:
        return "dropout is not supported"
    device = query.device.type
    if device == "cpu":
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
        if needs_grad:
            return "FlexAttention has no backward pass on the CPU (torch 2.13); run without gradients, or on CUDA"
        return None
    if device != "cuda":
        return f"inputs are on {device}, and it runs on CUDA (and, for testing, on the CPU)"
    if not HAS_TRITON:
        return "torch.compile needs triton to build FlexAttention's CUDA kernels, and triton is not installed"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"FlexAttention's CUDA kernels take float16, bfloat16 or float32, not {query.dtype}"
    head_dim, value_dim = query.shape[-1], value.shape[-1]
    if min(head_dim, value_dim) < 16:
        return f"FlexAttention's CUDA kernels need head dims of at least 16, got D={head_dim} and Dv={value_dim}"
    return None


def _flex_function(device: torch.device):
    """flex_attention, compiled on CUDA (fused kernels), eager elsewhere (the CPU's test path)."""
    global _compiled_flex_attention
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


def _columns(x: torch.Tensor, x_global: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[x ; zeros ; x_global ; zeros] along dim 2: (B, H, S, E), (B, H, G, E) -> (B, H, N, E)."""
    batch, heads, seq_len, dim = x.shape
    num_global = x_global.shape[2]
    pads = [x.new_zeros(batch, heads, n, dim) for n in (plan.key_columns - seq_len, plan.global_columns - num_global)]
    return torch.cat([x, pads[0], x_global, pads[1]], dim=2)


# ---------------------------------------------------------------------------------------------
# The plan: tile lists, tables and the BlockMask for one (shapes, options, device).


@dataclass(frozen=True)
class _Plan:
    seq_len: int  # S
    key_columns: int  # S_pad: the keys, padded to a multiple of the tile
    global_columns: int  # G_pad: the T + G global tokens (extra ones first), likewise
    tables: dict  # the mask_mod's per-row and per-column tables, on the device
    causal: bool
    scope: str
    window: int | None
    block_mask: BlockMask  # for inputs without a key_mask

    def with_real_columns(self, key_mask: torch.Tensor | None, present: torch.Tensor) -> BlockMask:
        """The BlockMask for a batch with padding or extra global tokens: the same tiles, and per
        batch element the real columns (keys where key_mask is True, present global tokens)."""
        batch, num_global = present.shape
        real = present.new_zeros(batch, self.key_columns + self.global_columns)  # (B, N)
        real[:, : self.seq_len] = True if key_mask is None else key_mask
        real[:, self.key_columns : self.key_columns + num_global] = present
        tables = {**self.tables, "column_real": real}
        bm = self.block_mask
        return BlockMask(
            seq_lengths=bm.seq_lengths,
            kv_num_blocks=bm.kv_num_blocks,
            kv_indices=bm.kv_indices,
            full_kv_num_blocks=bm.full_kv_num_blocks,
            full_kv_indices=bm.full_kv_indices,
            q_num_blocks=bm.q_num_blocks,
            q_indices=bm.q_indices,
            full_q_num_blocks=bm.full_q_num_blocks,
            full_q_indices=bm.full_q_indices,
            BLOCK_SIZE=bm.BLOCK_SIZE,
            mask_mod=_mask_mod(tables, self.causal, self.scope, self.window, batched=True),
        )


@dataclass(frozen=True)
class _Layout:
    """The blocks of the key positions, on the CPU (the tile lists are planned there): their starts
    and ends (G,), every position's block (S,), and the first and last block of each block's
    document (G,): 0 and G - 1 without packed documents."""

    starts: torch.Tensor
    ends: torch.Tensor
    block_of: torch.Tensor
    doc_first: torch.Tensor
    doc_last: torch.Tensor
    packed: bool  # documents restrict who sees what beyond the blocks

    @staticmethod
    def uniform(seq_len: int, block_size: int, remainder: str) -> _Layout:
        starts, ends = spec.block_starts_and_ends(seq_len, block_size, remainder)
        first, last = torch.zeros_like(starts), torch.full_like(starts, starts.numel() - 1)
        return _Layout(starts, ends, spec.block_index(seq_len, block_size, remainder), first, last, False)

    @staticmethod
    def of_documents(documents: spec.DocumentBlocks) -> _Layout:
        parts = (documents.starts, documents.ends, documents.block_of, documents.first_block, documents.last_block)
        return _Layout(*(x.cpu() for x in parts), True)


@functools.lru_cache(maxsize=8)
def _uniform_plan(seq_len, q_len, block_size, remainder, masked, num_extra, causal, scope, window, tile, device):
    """The plan without packed documents: cached, since it depends on shapes and options alone."""
    layout = _Layout.uniform(seq_len, block_size, remainder)
    return _plan(layout, seq_len, q_len, masked, num_extra, causal, scope, window, tile, device)


def _plan(layout, seq_len, q_len, masked, num_extra, causal, scope, window, tile, device) -> _Plan:
    """Everything about one attention call that the tiles need.

    ``masked``: which columns exist will be given per batch element (a key_mask, or extra global
    tokens with their ``present``), so no tile can be proven full, and the BlockMask from here
    serves only as a template for ``with_real_columns``.  ``num_extra``: T, global tokens from
    outside the call, in the global columns ahead of the call's own.
    """
    num_global = num_extra + layout.starts.numel()
    key_columns, global_columns = _round_up(seq_len, tile), _round_up(num_global, tile)
    partial, full = _tile_lists(layout, seq_len, q_len, causal, scope, masked, num_extra, window, tile)
    num_tiles = (key_columns + global_columns) // tile
    kv_num_blocks, kv_indices = _as_kv_blocks(partial, num_tiles)
    full_kv_num_blocks, full_kv_indices = _as_kv_blocks(full, num_tiles) if full.any() else (None, None)
    tables = _tables(layout, seq_len, q_len, key_columns, num_extra, num_global, global_columns, device)
    block_mask = BlockMask.from_kv_blocks(
        kv_num_blocks.to(device),
        kv_indices.to(device),
        None if full_kv_num_blocks is None else full_kv_num_blocks.to(device),
        None if full_kv_indices is None else full_kv_indices.to(device),
        BLOCK_SIZE=tile,
        mask_mod=_mask_mod(tables, causal, scope, window, batched=False),
        seq_lengths=(q_len, key_columns + global_columns),
    )
    return _Plan(seq_len, key_columns, global_columns, tables, causal, scope, window, block_mask)


def _tile_lists(layout, seq_len, q_len, causal, scope, masked, num_extra, window, tile):
    """Which column tiles each of the R = ceil(L / T) query-row tiles reads: (partial, full).

    Both select among the same (R, M) candidate tiles: a row tile's key tiles (those of its
    blocks), then every global tile.  Partial: read with the mask_mod applied; full: read without
    it, every cell being visible to every query of the row tile.
    """
    offset = seq_len - q_len  # query row i sits at position offset + i
    starts, ends, block_of = layout.starts, layout.ends, layout.block_of
    num_global = num_extra + starts.numel()  # global column u holds the token of block u - T
    row_tiles = torch.arange(_round_up(q_len, tile) // tile)
    first = offset + row_tiles * tile  # (R,) position of each row tile's first and last query
    last = offset + ((row_tiles + 1) * tile).clamp(max=q_len) - 1
    first_block, last_block = block_of[first], block_of[last]  # the blocks c0 <= c <= c1 of its queries

    # Local keys: the row tile's blocks, in causal mode only up to its last query.
    key_lo, key_hi = starts[first_block], (last + 1 if causal else ends[last_block])  # [lo, hi) key positions
    if window is not None:  # the queries' windows instead: [first - w + 1, last] causal, to last + w - 1 not
        key_lo, key_hi = (first - window + 1).clamp(min=0), (last + 1 if causal else (last + window).clamp(max=seq_len))
    tile_lo, tile_hi = key_lo // tile, (key_hi - 1) // tile  # inclusive tile range
    local = tile_lo[:, None] + torch.arange(int((tile_hi - tile_lo).max()) + 1)  # (R, Ml) candidate key tiles
    local_read = local <= tile_hi[:, None]
    one_block = (first_block == last_block)[:, None]
    if window is None:
        local_full = one_block & (local * tile >= key_lo[:, None]) & ((local + 1) * tile <= ends[first_block][:, None])
        if causal:
            local_full &= (local + 1) * tile - 1 <= first[:, None]  # every key at or before every query
    else:  # every key of the tile within every query's window, and none past the sequence
        tile_first, tile_last = local * tile, (local + 1) * tile - 1
        reach = first + (0 if causal else window - 1)  # the last key the first query sees
        local_full = (tile_first > (last - window)[:, None]) & (tile_last <= reach[:, None]) & (tile_last < seq_len)

    # Global columns j in [u*T, min((u+1)*T, T + G)) of global tile u; column j holds block j - T,
    # so a rule "block < c" reads "column < c + T" (scope "own" never has extra tokens).
    global_tiles = torch.arange(_round_up(num_global, tile) // tile)
    j_lo, j_hi = global_tiles * tile, ((global_tiles + 1) * tile).clamp(max=num_global) - 1  # (Mg,) inclusive
    complete = ((global_tiles + 1) * tile <= num_global)[None]  # no padding column in the tile
    c0, c1 = first_block[:, None] + num_extra, last_block[:, None] + num_extra
    # The global columns of the row tile's documents (all of them without packed documents); the
    # extra tokens' columns lead, read by every row.
    doc_lo = layout.doc_first[first_block][:, None] + num_extra
    doc_hi = layout.doc_last[last_block][:, None] + num_extra
    in_documents = (j_lo[None] < num_extra) | ((j_hi[None] >= doc_lo) & (j_lo[None] <= doc_hi))
    if causal:  # j < c: some row sees a token of the tile iff j_lo < c1; all rows all of them iff j_hi < c0
        global_read, global_full = (j_lo[None] < c1) & in_documents, (j_hi[None] < c0) & complete
    elif scope == "own":  # j == c
        global_read = (j_lo[None] <= c1) & (j_hi[None] >= c0)
        global_full = (c0 == c1) & (j_lo[None] == c0) & (j_hi[None] == c0) & complete
    else:
        global_read = torch.ones(row_tiles.numel(), global_tiles.numel(), dtype=torch.bool) & in_documents
        global_full = complete.expand_as(global_read)

    key_tiles = _round_up(seq_len, tile) // tile
    candidates = torch.cat([local, key_tiles + global_tiles[None].expand(row_tiles.numel(), -1)], dim=1)
    read = torch.cat([local_read, global_read], dim=1)
    full = torch.cat([local_full, global_full], dim=1) & read & (not masked)
    return _Selection(candidates, read & ~full), _Selection(candidates, full)


@dataclass(frozen=True)
class _Selection:
    """Some of the candidate tiles of each row tile: ``tiles`` (R, M) int64 and ``chosen`` (R, M) bool."""

    tiles: torch.Tensor
    chosen: torch.Tensor

    def any(self) -> bool:
        return bool(self.chosen.any())


def _as_kv_blocks(selection: _Selection, num_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's (kv_num_blocks (1, 1, R), kv_indices (1, 1, R, num_tiles)) int32: per row
    tile, the count of chosen tiles and their indices first, in ascending order.  The rows are as
    wide as the number of tiles, as FlexAttention's own masks are (its transposition for the
    backward pass and ``to_dense`` rely on it)."""
    rows, width = selection.tiles.shape
    order = torch.sort((~selection.chosen).to(torch.int8), dim=1, stable=True).indices  # chosen ones first
    indices = torch.zeros(rows, num_tiles, dtype=torch.int32)
    indices[:, :width] = selection.tiles.gather(1, order).to(torch.int32)
    counts = selection.chosen.sum(1).to(torch.int32)
    return counts[None, None], indices[None, None]


def _tables(layout, seq_len, q_len, key_columns, num_extra, num_global, global_columns, device):
    """Per query row (L,) and per column (N,) int32/bool tables for the mask_mod.

    query_pos, query_block: position and block of each query row.  column_block: the block of a
    key column, the block j - T of global column j (negative for the T extra tokens).
    column_global: the column holds a global token.  column_real: a key or a global token, not
    padding (``with_real_columns`` replaces it per batch element).  block_document (packed
    documents only): the first block of each block's document.
    """
    block_of = layout.block_of.to(device, torch.int32)
    query_pos = torch.arange(seq_len - q_len, seq_len, dtype=torch.int32, device=device)
    n = key_columns + global_columns
    column_block = torch.full((n,), -1, dtype=torch.int32, device=device)
    column_block[:seq_len] = block_of
    global_blocks = torch.arange(-num_extra, num_global - num_extra, dtype=torch.int32, device=device)
    column_block[key_columns : key_columns + num_global] = global_blocks
    column_global = torch.zeros(n, dtype=torch.bool, device=device)
    column_global[key_columns:] = True
    column_real = torch.zeros(n, dtype=torch.bool, device=device)
    column_real[:seq_len] = True
    column_real[key_columns : key_columns + num_global] = True
    tables = dict(
        query_pos=query_pos,
        query_block=block_of[query_pos.long()],
        column_block=column_block,
        column_global=column_global,
        column_real=column_real,
    )
    if layout.packed:
        tables["block_document"] = layout.doc_first.to(device, torch.int32)
    return tables


def _mask_mod(tables: dict, causal: bool, scope: str, window: int | None, batched: bool):
    """docs/semantics.md's visibility of (query row q_idx, column kv_idx), for FlexAttention.

    Key column kv_idx holds the key at position kv_idx; ``batched``: ``column_real`` is per batch
    element (B, N), from a key_mask.
    """
    query_pos, query_block = tables["query_pos"], tables["query_block"]
    column_block, column_global, column_real = tables["column_block"], tables["column_global"], tables["column_real"]
    block_document = tables.get("block_document")

    def global_token_attention(b, h, q_idx, kv_idx):
        row_block, col_block = query_block[q_idx], column_block[kv_idx]
        local = spec.local_visible(query_pos[q_idx], kv_idx, row_block, col_block, causal, window)
        glob = spec.global_visible(row_block, col_block, causal, scope)
        real = column_real[b, kv_idx] if batched else column_real[kv_idx]
        visible = torch.where(column_global[kv_idx], glob, local) & real
        if block_document is not None:  # each document on its own (padding columns, block -1, are not real)
            visible = visible & (block_document[row_block] == block_document[col_block.clamp(min=0)])
        return visible

    return global_token_attention


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
