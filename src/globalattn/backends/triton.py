"""The Triton backend: fused forward and backward kernels for global-token attention.

Forward (``_forward_kernel``), one program per tile of BLOCK_M query rows of one query head: one
online softmax (exp2, scores in log2 units) first over its rows' local keys (those of the blocks
they belong to or, with ``window=w``, the raw positions within w of them), then over the G global
tokens, read from the small pooled tensors (never concatenated with K).  It stores the output and
each row's log-sum-exp.  A tile may hold rows of several blocks (b < BLOCK_M) or part of one
block; either way it visits the key range its rows' blocks (or windows) span and the per-element
visibility test of docs/semantics.md decides.  Only edge tiles take that test: a tile of keys or
global tokens that every row of the tile sees (its block's keys bidirectionally, those before its
first row causally, the middle of a window; all global tokens but the last tile's, causally those
of the blocks before its first row; none with a key mask) skips it.  The backward tests every tile:
skipping there raised its kernels' registers (dKg, dVg at bf16, D = 128: 128 -> 188, half as many
programs per SM), a trade to measure on a GPU first.

Backward recomputes the probabilities from the stored lse, as flash-attention does, in three
kernels that write disjoint outputs (no atomics, so the result is deterministic):

- ``_query_grad_kernel``, per query tile: dQ over the local keys and the global tokens;
- ``_global_grad_kernel``, per tile of global tokens, key/value head and slice of query rows:
  that slice's share of dKg, dVg, written to its own buffer and summed in a fixed order after;
- ``_key_grad_kernel``, per tile of BLOCK_N keys and key/value head: dK, dV of the local part,
  summed over the query heads of the group and the query tiles that see those keys (the rows of
  their blocks, or with a window the rows within w of them), plus the pooling's backward (each
  real key's share of its block's dKg, dVg), so that dK and dV are written once and no gradient
  of the global tokens reaches autograd.

The pooling itself (``spec.pool_blocks``) is one pass over K and V in PyTorch, a reduction that
accumulates in float32 without a float32 copy of K and V, inside the forward op; the pooled tensors
(S / b rows) are kept for the backward.

Both directions are registered as custom ops (``globalattn::triton_forward`` / ``_backward``), so
``torch.compile`` treats a call as one opaque node instead of breaking the graph.

Coverage: float16, bfloat16 and float32 (fp32 accumulation; float32 matrix products in TF32, so
on a GPU only where PyTorch's float32 matmul precision allows TF32: in full precision the tiles
spill, and ``auto`` takes flex), head dims up to 256 (padded to a power of two), every option of docs/semantics.md,
``window`` included, except ``top_blocks``, ``extra_global_tokens`` and dropout.  On the CPU the
kernels run under ``TRITON_INTERPRET=1`` (set before globalattn is imported), which is how the
test suite exercises them without a GPU; the interpreter cannot multiply bfloat16.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from globalattn import backends, checks, spec

LOG2_E = math.log2(math.e)
MAX_HEAD_DIM = 256
ROW_TILE = 64  # query rows per program of the backward's per-row preprocessing
# The mode the kernels below were built in: TRITON_INTERPRET is read when ``triton.jit`` runs.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def unsupported(query, key, value, options) -> str | None:
    if query.device.type != "cuda" and not INTERPRETED:
        device = query.device.type
        return f"inputs are on {device}; the kernels run on CUDA (on the CPU under TRITON_INTERPRET=1, for testing)"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {query.dtype} is not supported (float16, bfloat16, float32)"
    if INTERPRETED and query.dtype == torch.bfloat16:
        return "the Triton interpreter cannot multiply bfloat16 (float16 and float32 run there)"
    if query.dtype == torch.float32 and not INTERPRETED and not backends.float32_uses_tf32():
        return ('float32 in full precision is not supported (without tensor cores its tiles spill); '
                'torch.set_float32_matmul_precision("high") runs it in TF32')  # fmt: skip
    if options.top_blocks:
        return "top_blocks is not supported"
    if options.dropout_p > 0:
        return "dropout is not supported"
    if options.document_ids is not None:
        return "document_ids are not supported (its kernels cut blocks at multiples of block_size)"
    if options.extra_global_tokens is not None:
        return "extra_global_tokens are not supported (its backward folds every global token into dK, dV)"
    if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM} are not supported (got D={query.shape[-1]}, Dv={value.shape[-1]})"
    return None


def attention(query, key, value, options):
    own = options.scope == "own"
    out, lse, _, _ = _forward_op(query, key, value, options.key_mask, options.block_size, options.remainder,
                                 options.causal, own, options.window, options.scale)  # fmt: skip
    return out, lse


# ---------------------------------------------------------------------------------------------
# Tile sizes (BLOCK_M, BLOCK_N, warps, stages), per kernel family and per width of a row: the head
# dim's tier (up to 64, 128 or 256, as BLOCK_D rounds it) and the bytes per element (2: float16 and
# bfloat16, 4: float32).  Each list holds only tiles that Triton compiles for sm_90 within shared
# memory and without spilling registers (tests/compile_for_gpu.py compiles every one at the shapes
# users run, through the launchers, and fails on a spill); the first is the default.  The key-tile
# kernels hold a tile of keys and its two float32 gradients in registers: they take the smallest
# tiles.  GLOBALATTN_TRITON_AUTOTUNE=0 keeps the defaults alone (the test suite does: it meets dozens
# of shapes, and tuning each would compile every configuration).  Under the interpreter one small
# tile shape, so that the test shapes span several tiles and each kernel runs once.
AUTOTUNE = os.environ.get("GLOBALATTN_TRITON_AUTOTUNE", "1") != "0"
Tiles = dict[tuple[int, int], list[tuple[int, int, int, int]]]

FORWARD_TILES: Tiles = {
    (64, 2): [(128, 64, 4, 3), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 4, 2), (128, 128, 8, 2)],
    (128, 2): [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2)],
    (256, 2): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (64, 32, 4, 3)],
    (64, 4): [(128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2)],
    (128, 4): [(64, 32, 8, 2), (32, 64, 8, 2), (64, 32, 4, 3)],
    (256, 4): [(32, 32, 4, 2), (16, 64, 4, 2)],
}
QUERY_GRAD_TILES: Tiles = {
    (64, 2): [(64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 8, 2)],
    (128, 2): [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
    (256, 2): [(64, 32, 8, 2), (32, 64, 8, 2), (128, 32, 8, 2), (32, 32, 8, 2)],
    (64, 4): [(64, 64, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2)],
    (128, 4): [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2)],
    (256, 4): [(16, 32, 8, 2), (32, 16, 4, 2)],
}
KEY_GRAD_TILES: Tiles = {  # dK, dV and dKg, dVg
    (64, 2): [(64, 32, 8, 2), (32, 64, 8, 2), (128, 32, 8, 2)],
    (128, 2): [(32, 64, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2)],
    (256, 2): [(32, 32, 8, 2), (16, 32, 8, 2)],
    (64, 4): [(32, 32, 4, 2), (16, 32, 8, 2)],
    (128, 4): [(16, 32, 8, 2), (16, 16, 4, 2)],
    (256, 4): [(16, 32, 8, 2), (16, 16, 4, 2)],
}


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def _tile_width(meta: dict, query: torch.Tensor) -> tuple[int, int]:
    return max(64, meta["BLOCK_D"], meta["BLOCK_DV"]), query.element_size()


def _autotuned(tiles: Tiles, key: list[str]):
    """triton.autotune over the tiles of each call's width: tried in turn, or the first alone."""
    if INTERPRETED:
        return triton.autotune(configs=[_config(16, 16, 1, 1)], key=key)
    configs = {shape: _config(*shape) for shapes in tiles.values() for shape in shapes}

    def tiles_for_this_call(_all, named_args, **meta):
        shapes = tiles[_tile_width(meta, named_args["Q"])]
        return [configs[shape] for shape in (shapes if AUTOTUNE else shapes[:1])]

    return triton.autotune(configs=list(configs.values()), key=key,
                           prune_configs_by={"early_config_prune": tiles_for_this_call})  # fmt: skip


# Tuned once per head dims, options, block size and power-of-two bucket of the sequence length
# (``seq_bucket``, an argument the kernels take for this alone): a tile that suits 1k tokens need
# not suit 128k, and a new length within a bucket must not tune again.
_AUTOTUNE_KEY = ["BLOCK_D", "BLOCK_DV", "CAUSAL", "SCOPE_OWN", "HAS_MASK", "block_size", "seq_bucket", "DOT_PRECISION"]
# The kernels that visit local keys: with a window, w and not b sets how many each row sees.
_LOCAL_AUTOTUNE_KEY = _AUTOTUNE_KEY + ["HAS_WINDOW", "window"]


# ---------------------------------------------------------------------------------------------
# Who sees what (docs/semantics.md), on broadcastable index tensors: the same test in every kernel.


@triton.jit
def _block_of(pos, block_size, num_blocks):
    """blk(pos): the last block absorbs a merged tail, as spec.block_index."""
    return tl.minimum(pos // block_size, num_blocks - 1)


@triton.jit
def _local_seen(query_pos, key_pos, block_size, num_blocks, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """As spec.local_visible: the same block, or with a window the raw positions within w."""
    if HAS_WINDOW:
        offset = query_pos - key_pos
        if CAUSAL:
            seen = (offset >= 0) & (offset < window)
        else:
            seen = (offset > -window) & (offset < window)
    else:
        seen = _block_of(query_pos, block_size, num_blocks) == _block_of(key_pos, block_size, num_blocks)
        if CAUSAL:
            seen = seen & (key_pos <= query_pos)
    return seen


@triton.jit
def _global_seen(query_block, global_block, CAUSAL: tl.constexpr, SCOPE_OWN: tl.constexpr):
    if CAUSAL:
        seen = global_block < query_block  # complete earlier blocks only
    elif SCOPE_OWN:
        seen = global_block == query_block
    else:
        seen = global_block >= 0  # every block: a (1, N) row, broadcast where it is used
    return seen


@triton.jit
def _local_key_range(first_pos, last_pos, seq_len, block_size, num_blocks, window, CAUSAL: tl.constexpr,
                     HAS_WINDOW: tl.constexpr):  # fmt: skip
    """The keys a tile of query positions first_pos..last_pos may see: its blocks' span, or with a
    window the positions within w of it.  Bidirectional, seeing is symmetric: these are also the
    queries that may see keys first_pos..last_pos."""
    if HAS_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0)
        hi = tl.minimum(last_pos + window, seq_len)
    else:
        lo = _block_of(first_pos, block_size, num_blocks) * block_size
        last_block = _block_of(last_pos, block_size, num_blocks)
        hi = tl.where(last_block == num_blocks - 1, seq_len, (last_block + 1) * block_size)
    if CAUSAL:
        hi = tl.minimum(hi, last_pos + 1)
    return lo, hi


@triton.jit
def _global_range(first_block, last_block, num_blocks, CAUSAL: tl.constexpr, SCOPE_OWN: tl.constexpr):
    """The global tokens a tile whose rows lie in blocks first_block..last_block may see."""
    if CAUSAL:
        return 0, last_block
    elif SCOPE_OWN:
        return first_block, last_block + 1
    else:
        return 0, num_blocks


@triton.jit
def _local_edge(first_pos, last_pos, first_key, last_key, key_end, block_size, num_blocks, window,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, TEST_ALL: tl.constexpr):  # fmt: skip
    """Whether a tile of query positions first_pos..last_pos and keys first_key..last_key (real up
    to key_end) needs the per-pair test: unless every row sees every key.  TEST_ALL: every tile
    does (with a key mask any key may be padding)."""
    if TEST_ALL:
        return True
    else:
        if HAS_WINDOW:
            seen_by_all = first_key > last_pos - window
            if CAUSAL:
                seen_by_all = seen_by_all & (last_key <= first_pos)
            else:
                seen_by_all = seen_by_all & (last_key < first_pos + window)
        else:  # one block holds all of them
            block = _block_of(first_pos, block_size, num_blocks)
            seen_by_all = (_block_of(last_pos, block_size, num_blocks) == block) & (
                _block_of(first_key, block_size, num_blocks) == block) & (
                _block_of(last_key, block_size, num_blocks) == block)  # fmt: skip
            if CAUSAL:
                seen_by_all = seen_by_all & (last_key <= first_pos)
        return (last_key >= key_end) | ~seen_by_all


@triton.jit
def _global_edge(first_key, first_block, num_blocks, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 SCOPE_OWN: tl.constexpr, TEST_ALL: tl.constexpr):  # fmt: skip
    """Whether the global tokens first_key .. first_key + BLOCK_N - 1 need the per-pair test for a
    tile of rows whose first lies in block first_block: unless every row sees every one of them.
    TEST_ALL: every tile does (with a key mask a block may lack a global token)."""
    if TEST_ALL or SCOPE_OWN:  # with scope="own" a row sees its own block's alone
        return True
    elif CAUSAL:  # every row sees the complete blocks before the first row's
        return first_key + BLOCK_N > first_block
    else:
        return first_key + BLOCK_N > num_blocks


@triton.jit
def _tile_and_rest(num_tiles):
    """This program's tile and the index of what it repeats over (batch and head, ...), from a
    one-dimensional grid: CUDA caps the grid's second and third dimensions at 65535, which B * H
    passes.  One head's tiles are adjacent, so programs that run together share its keys in L2."""
    pid = tl.program_id(0)
    return pid % num_tiles, pid // num_tiles


# ---------------------------------------------------------------------------------------------
# Per query tile: the forward pass, and dQ.  One kernel: both visit the same local keys and global
# tokens in the same order; BACKWARD picks what is done with each tile of scores.  lse2 is each
# row's lse in log2 units with -inf (a row that saw nothing) as 0, and delta = rowsum(dO * O) -
# dlse, the softmax backward's correction term.


@triton.jit
def _load_keys(K, V, key_pos, key_ok, stride_k, stride_v, dims, dim_ok, value_dims, value_dim_ok):
    k = tl.load(K + key_pos[:, None] * stride_k + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
    v = tl.load(V + key_pos[:, None] * stride_v + value_dims[None, :], mask=key_ok[:, None] & value_dim_ok[None, :],
                other=0.0)  # fmt: skip
    return k, v


@triton.jit
def _scores(q, k, scale_log2, DOT_PRECISION: tl.constexpr):
    """A (BLOCK_M, BLOCK_N) tile of scores in log2 units."""
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2


@triton.jit
def _online_softmax_step(scores, values, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold a tile of scores (-inf where unseen) and its values into the running max, sum and
    output.  A row that has seen nothing yet keeps m = -inf and adds nothing."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - shift[:, None])
    alpha = tl.math.exp2(m_i - shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _probs_and_score_grads(scores, v, do, lse2, delta, DOT_PRECISION: tl.constexpr):
    """A tile's probabilities P, recomputed from its scores (-inf where unseen) and lse, and
    dS = P * (dP - delta)."""
    p = tl.math.exp2(scores - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def _query_tile_kernel(
    Q, K, V, KG, VG, KEEP, PRESENT, DO, LSE2, DELTA, OUT, LSE,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_gb, stride_gh, stride_gg,
    stride_wb, stride_wh, stride_wg,
    stride_ob, stride_oh, stride_ol,
    q_heads, group, q_len, seq_len, num_blocks, query_offset, block_size, scale_log2, scale,
    head_dim, value_dim, seq_bucket, window,
    BACKWARD: tl.constexpr, CAUSAL: tl.constexpr, SCOPE_OWN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Forward: OUT (B, Hq, L, Dv) and LSE (B, Hq, L).  BACKWARD: OUT is dQ, shaped like Q."""
    num_tiles = tl.cdiv(q_len, BLOCK_M)
    tile, batch_head = _tile_and_rest(num_tiles)
    if CAUSAL:  # the last tiles see the most global tokens: start them first, so that none is left alone at the end
        tile = num_tiles - 1 - tile
    b, h = batch_head // q_heads, batch_head % q_heads
    kv_h = h // group
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    KG += b.to(tl.int64) * stride_gb + kv_h.to(tl.int64) * stride_gh
    VG += b.to(tl.int64) * stride_wb + kv_h.to(tl.int64) * stride_wh
    row_base = batch_head.to(tl.int64) * q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    pos = rows + query_offset
    query_block = _block_of(pos, block_size, num_blocks)
    dims, value_dims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    dim_ok, value_dim_ok = dims < head_dim, value_dims < value_dim
    q = tl.load(Q + rows[:, None] * stride_ql + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if BACKWARD:
        DO += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        do = tl.load(DO + rows[:, None] * stride_ol + value_dims[None, :],
                     mask=row_ok[:, None] & value_dim_ok[None, :], other=0.0)  # fmt: skip
        lse2 = tl.load(LSE2 + row_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    first_pos = tile * BLOCK_M + query_offset
    last_pos = tl.minimum(tile * BLOCK_M + BLOCK_M, q_len) - 1 + query_offset
    lo, hi = _local_key_range(first_pos, last_pos, seq_len, block_size, num_blocks, window, CAUSAL, HAS_WINDOW)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k, v = _load_keys(K, V, cols, col_ok, stride_ks, stride_vs, dims, dim_ok, value_dims, value_dim_ok)
        scores = _scores(q, k, scale_log2, DOT_PRECISION)
        if _local_edge(first_pos, last_pos, start, start + BLOCK_N - 1, hi, block_size, num_blocks, window, CAUSAL,
                       HAS_WINDOW, HAS_MASK | BACKWARD):  # fmt: skip
            seen = _local_seen(pos[:, None], cols[None, :], block_size, num_blocks, window, CAUSAL, HAS_WINDOW)
            seen = seen & col_ok[None, :]
            if HAS_MASK:
                seen = seen & (tl.load(KEEP + b * seq_len + cols, mask=col_ok, other=0) != 0)[None, :]
            scores = tl.where(seen, scores, float("-inf"))
        if BACKWARD:
            p, ds = _probs_and_score_grads(scores, v, do, lse2, delta, DOT_PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        else:
            m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, DOT_PRECISION)

    first_block = _block_of(first_pos, block_size, num_blocks)
    g_lo, g_hi = _global_range(first_block, _block_of(last_pos, block_size, num_blocks), num_blocks, CAUSAL, SCOPE_OWN)
    for start in range(g_lo, g_hi, BLOCK_N):
        blocks = start + tl.arange(0, BLOCK_N)
        block_ok = blocks < g_hi
        kg, vg = _load_keys(KG, VG, blocks, block_ok, stride_gg, stride_wg, dims, dim_ok, value_dims, value_dim_ok)
        scores = _scores(q, kg, scale_log2, DOT_PRECISION)
        if _global_edge(start, first_block, num_blocks, BLOCK_N, CAUSAL, SCOPE_OWN, HAS_MASK | BACKWARD):
            if HAS_MASK:  # without padding every block has a global token
                block_ok = block_ok & (tl.load(PRESENT + b * num_blocks + blocks, mask=block_ok, other=0) != 0)
            seen = _global_seen(query_block[:, None], blocks[None, :], CAUSAL, SCOPE_OWN) & block_ok[None, :]
            scores = tl.where(seen, scores, float("-inf"))
        if BACKWARD:
            p, ds = _probs_and_score_grads(scores, vg, do, lse2, delta, DOT_PRECISION)
            dq += tl.dot(ds.to(kg.dtype), kg, input_precision=DOT_PRECISION)
        else:
            m_i, l_i, acc = _online_softmax_step(scores, vg, m_i, l_i, acc, DOT_PRECISION)

    if BACKWARD:
        OUT += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        tl.store(OUT + rows[:, None] * stride_ql + dims[None, :], (dq * scale).to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])  # fmt: skip
    else:
        seen_any = l_i > 0
        safe_sum = tl.where(seen_any, l_i, 1.0)
        OUT += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        out = acc / safe_sum[:, None]
        tl.store(OUT + rows[:, None] * stride_ol + value_dims[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & value_dim_ok[None, :])  # fmt: skip
        lse = tl.where(seen_any, (m_i + tl.math.log2(safe_sum)) * 0.6931471805599453, float("-inf"))  # ln 2
        tl.store(LSE + row_base + rows, lse, mask=row_ok)


_forward_kernel = _autotuned(FORWARD_TILES, _LOCAL_AUTOTUNE_KEY)(_query_tile_kernel)
_query_grad_kernel = _autotuned(QUERY_GRAD_TILES, _LOCAL_AUTOTUNE_KEY)(_query_tile_kernel)


@triton.jit
def _row_terms_kernel(
    OUT, DO, LSE, DLSE, LSE2, DELTA,
    stride_ob, stride_oh, stride_ol,
    stride_db, stride_dh, stride_dl,
    q_heads, q_len, value_dim,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """What every backward kernel reads per query row: lse2 and delta (see above), in float32
    without a float32 copy of O or dO."""
    tile, batch_head = _tile_and_rest(tl.cdiv(q_len, BLOCK_M))
    b, h = batch_head // q_heads, batch_head % q_heads
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    value_dims = tl.arange(0, BLOCK_DV)
    ok = row_ok[:, None] & (value_dims < value_dim)[None, :]
    OUT += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    DO += b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
    out = tl.load(OUT + rows[:, None] * stride_ol + value_dims[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * stride_dl + value_dims[None, :], mask=ok, other=0.0).to(tl.float32)
    row = batch_head.to(tl.int64) * q_len + rows
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    tl.store(LSE2 + row, tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634), mask=row_ok)  # log2 e
    tl.store(DELTA + row, tl.sum(out * do, 1) - tl.load(DLSE + row, mask=row_ok, other=0.0), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Per key tile: dK, dV of the local keys, and dKg, dVg of the global tokens.


@triton.jit
def _key_tile_grads(
    Q, DO, LSE2, DELTA, b, kv_h, kv_heads, group, k, v, key_index, key_ok, row_lo, row_hi,
    stride_qb, stride_qh, stride_ql, stride_ob, stride_oh, stride_ol,
    q_len, query_offset, block_size, num_blocks, window, scale_log2,
    dims, dim_ok, value_dims, value_dim_ok,
    GLOBAL: tl.constexpr, CAUSAL: tl.constexpr, SCOPE_OWN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """dK, dV (float32, unscaled) of one tile of keys (GLOBAL: of global tokens) from the query rows
    row_lo .. row_hi - 1 of every query head of key head kv_h's group, in batch row b."""
    first_head = (b * kv_heads + kv_h).to(tl.int64) * group  # batch row b's query heads, flattened
    Q += b.to(tl.int64) * stride_qb + (kv_h * group).to(tl.int64) * stride_qh
    DO += b.to(tl.int64) * stride_ob + (kv_h * group).to(tl.int64) * stride_oh
    LSE2 += first_head * q_len
    DELTA += first_head * q_len
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for _ in range(group):
        for start in range(row_lo, row_hi, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < row_hi
            q = tl.load(Q + rows[:, None] * stride_ql + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                        other=0.0)  # fmt: skip
            do = tl.load(DO + rows[:, None] * stride_ol + value_dims[None, :],
                         mask=row_ok[:, None] & value_dim_ok[None, :], other=0.0)  # fmt: skip
            lse2 = tl.load(LSE2 + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
            pos = rows + query_offset
            if GLOBAL:
                seen = _global_seen(_block_of(pos, block_size, num_blocks)[:, None], key_index[None, :], CAUSAL,
                                    SCOPE_OWN)  # fmt: skip
            else:
                seen = _local_seen(pos[:, None], key_index[None, :], block_size, num_blocks, window, CAUSAL, HAS_WINDOW)
            seen = seen & row_ok[:, None] & key_ok[None, :]
            scores = tl.where(seen, _scores(q, k, scale_log2, DOT_PRECISION), float("-inf"))
            p, ds = _probs_and_score_grads(scores, v, do, lse2, delta, DOT_PRECISION)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION)
        Q += stride_qh
        DO += stride_oh
        LSE2 += q_len
        DELTA += q_len
    return dk, dv


@_autotuned(KEY_GRAD_TILES, _LOCAL_AUTOTUNE_KEY)
@triton.jit
def _key_grad_kernel(
    Q, K, V, KEEP, DO, LSE2, DELTA, DKG, DVG, INV_COUNT, DK, DV,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_ol,
    kv_heads, group, q_len, seq_len, num_blocks, query_offset, block_size, scale_log2, scale,
    head_dim, value_dim, seq_bucket, window,
    CAUSAL: tl.constexpr, SCOPE_OWN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dK, dV (B, Hkv, S, D | Dv): one program per BLOCK_N keys and key head.  The local part, plus
    the pooling's backward: each real key's share of its block's dKg, dVg (float32 (B, Hkv, G, D |
    Dv), from ``_global_grad_kernel``), one over the block's count of real tokens (INV_COUNT, (B, G))."""
    tile, batch_head = _tile_and_rest(tl.cdiv(seq_len, BLOCK_N))
    b, kv_h = batch_head // kv_heads, batch_head % kv_heads
    K += b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < seq_len
    dims, value_dims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    dim_ok, value_dim_ok = dims < head_dim, value_dims < value_dim
    k, v = _load_keys(K, V, cols, col_ok, stride_ks, stride_vs, dims, dim_ok, value_dims, value_dim_ok)
    key_ok = col_ok
    if HAS_MASK:
        key_ok = key_ok & (tl.load(KEEP + b * seq_len + cols, mask=col_ok, other=0) != 0)

    # The query positions that may see these keys: the keys the same positions would see
    # bidirectionally (their blocks' span, or within w of them), causal: not before the keys.
    first_key = tile * BLOCK_N
    pos_lo, pos_hi = _local_key_range(first_key, tl.minimum(first_key + BLOCK_N, seq_len) - 1, seq_len, block_size,
                                      num_blocks, window, False, HAS_WINDOW)  # fmt: skip
    if CAUSAL:
        pos_lo = tl.maximum(pos_lo, first_key)
    dk, dv = _key_tile_grads(
        Q, DO, LSE2, DELTA, b, kv_h, kv_heads, group,
        k, v, cols, key_ok, tl.maximum(pos_lo - query_offset, 0), pos_hi - query_offset,
        stride_qb, stride_qh, stride_ql, stride_ob, stride_oh, stride_ol,
        q_len, query_offset, block_size, num_blocks, window, scale_log2,
        dims, dim_ok, value_dims, value_dim_ok,
        False, CAUSAL, SCOPE_OWN, HAS_WINDOW, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
    )  # fmt: skip
    key_block = _block_of(cols, block_size, num_blocks)
    share = tl.load(INV_COUNT + b * num_blocks + key_block, mask=key_ok, other=0.0)  # 0 for padding
    pooled = (b * kv_heads + kv_h).to(tl.int64) * num_blocks + key_block  # the block's row of DKG, DVG
    dk = dk * scale + share[:, None] * tl.load(DKG + pooled[:, None] * head_dim + dims[None, :],
                                               mask=key_ok[:, None] & dim_ok[None, :], other=0.0)  # fmt: skip
    dv += share[:, None] * tl.load(DVG + pooled[:, None] * value_dim + value_dims[None, :],
                                   mask=key_ok[:, None] & value_dim_ok[None, :], other=0.0)  # fmt: skip
    DK += b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    DV += b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    tl.store(DK + cols[:, None] * stride_ks + dims[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None] & dim_ok[None, :])  # fmt: skip
    tl.store(DV + cols[:, None] * stride_vs + value_dims[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & value_dim_ok[None, :])  # fmt: skip


@_autotuned(KEY_GRAD_TILES, _AUTOTUNE_KEY)
@triton.jit
def _global_grad_kernel(
    Q, KG, VG, PRESENT, DO, LSE2, DELTA, DKG, DVG,
    stride_qb, stride_qh, stride_ql,
    stride_gb, stride_gh, stride_gg,
    stride_wb, stride_wh, stride_wg,
    stride_ob, stride_oh, stride_ol,
    kv_heads, group, q_len, seq_len, num_blocks, query_offset, block_size, scale_log2, scale,
    head_dim, value_dim, seq_bucket, splits, rows_per_split,
    CAUSAL: tl.constexpr, SCOPE_OWN: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One slice of query rows' share of dKg, dVg: one program per BLOCK_N global tokens, slice
    and key head, written to float32 (splits, B, Hkv, G, D | Dv) buffers DKG, DVG."""
    num_tiles = tl.cdiv(num_blocks, BLOCK_N)
    tile, rest = _tile_and_rest(num_tiles)
    split, batch_head = rest % splits, rest // splits
    b, kv_h = batch_head // kv_heads, batch_head % kv_heads
    KG += b.to(tl.int64) * stride_gb + kv_h.to(tl.int64) * stride_gh
    VG += b.to(tl.int64) * stride_wb + kv_h.to(tl.int64) * stride_wh
    blocks = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = blocks < num_blocks
    block_ok = in_range
    if HAS_MASK:  # without padding every block has a global token
        block_ok = block_ok & (tl.load(PRESENT + b * num_blocks + blocks, mask=in_range, other=0) != 0)
    dims, value_dims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    dim_ok, value_dim_ok = dims < head_dim, value_dims < value_dim
    kg, vg = _load_keys(KG, VG, blocks, block_ok, stride_gg, stride_wg, dims, dim_ok, value_dims, value_dim_ok)

    # The query positions that may see these global tokens.
    first_block = tile * BLOCK_N
    if CAUSAL:  # queries of later blocks
        pos_lo = tl.where(first_block + 1 < num_blocks, (first_block + 1) * block_size, seq_len)
        pos_hi = seq_len
    elif SCOPE_OWN:  # queries of these blocks (the blocks' span, whatever the window)
        last_block = tl.minimum(first_block + BLOCK_N, num_blocks) - 1
        pos_lo, pos_hi = _local_key_range(first_block * block_size, last_block * block_size, seq_len, block_size,
                                          num_blocks, 0, False, False)  # fmt: skip
    else:
        pos_lo, pos_hi = 0, seq_len
    row_lo = tl.maximum(pos_lo - query_offset, split * rows_per_split)
    row_hi = tl.minimum(pos_hi - query_offset, tl.minimum(split * rows_per_split + rows_per_split, q_len))
    dkg, dvg = _key_tile_grads(
        Q, DO, LSE2, DELTA, b, kv_h, kv_heads, group, kg, vg, blocks, block_ok, row_lo, row_hi,
        stride_qb, stride_qh, stride_ql, stride_ob, stride_oh, stride_ol,
        q_len, query_offset, block_size, num_blocks, 0, scale_log2,  # no window: global tokens are per block
        dims, dim_ok, value_dims, value_dim_ok,
        True, CAUSAL, SCOPE_OWN, False, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
    )  # fmt: skip
    kv_batch_heads = tl.num_programs(0) // (num_tiles * splits)
    part = ((split * kv_batch_heads + batch_head) * num_blocks).to(tl.int64)
    tl.store(DKG + (part + blocks[:, None]) * head_dim + dims[None, :], dkg * scale,
             mask=in_range[:, None] & dim_ok[None, :])  # fmt: skip
    tl.store(DVG + (part + blocks[:, None]) * value_dim + value_dims[None, :], dvg,
             mask=in_range[:, None] & value_dim_ok[None, :])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launchers, registered as custom ops.


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and row strides of a (B, H, rows, E) tensor whose last dim is contiguous."""
    return x.stride(0), x.stride(1), x.stride(2)


def _kernel_layout(*xs: torch.Tensor) -> list[torch.Tensor]:
    """The tensors as the kernels read them: unit stride along the head dim, and every offset within
    one (batch, head) slice in int32 (the kernels add batch and head offsets in int64); a layout
    that misses either is copied to a contiguous one."""
    return [x if x.stride(-1) == 1 and x.shape[2] * x.stride(2) < 2**31 else x.contiguous() for x in xs]


def _with_gradient_buffer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and an empty buffer for its gradient, with the same strides: the kernels read the one and
    write the other through one set of strides.  ``empty_like`` keeps a dense layout (e.g. a
    (B, S, H, D) transpose) but not an expanded or sliced one (a fused-QKV view); those are copied."""
    grad = torch.empty_like(x)
    if grad.stride() != x.stride():
        x = x.contiguous()
        grad = torch.empty_like(x)  # not the first one's: empty_like may permute a non-dense layout
    return x, grad


def _static_args(query, value, key_keep, causal, scope_own) -> dict:
    """Meta-parameters every kernel takes."""
    return dict(
        CAUSAL=causal,
        SCOPE_OWN=scope_own,
        HAS_MASK=key_keep is not None,
        BLOCK_D=max(16, triton.next_power_of_2(query.shape[-1])),
        BLOCK_DV=max(16, triton.next_power_of_2(value.shape[-1])),
        # float32 in TF32 where PyTorch's matmuls may use it; else in full precision, which only the
        # interpreter runs here (see unsupported)
        DOT_PRECISION="ieee" if query.dtype == torch.float32 and not backends.float32_uses_tf32() else "tf32",
    )


def _window_args(window: int | None) -> dict:
    """The window as the kernels that visit local keys take it: a runtime int, and a flag that
    compiles the window test in (without it the kernels are those of the block rule alone)."""
    return dict(window=0 if window is None else window, HAS_WINDOW=window is not None)


def _key_keep(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The key mask as the kernels read it: a row-major (B, S) int8 array, whatever the caller's layout."""
    return None if key_mask is None else key_mask.to(torch.int8, memory_format=torch.contiguous_format)


@torch.library.custom_op("globalattn::triton_forward", mutates_args=())
def _forward_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None,
    block_size: int,
    remainder: str,
    causal: bool,
    scope_own: bool,
    window: int | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, and the global tokens, kept for the backward: S / b rows, not pooled twice)."""
    query, key, value = _kernel_layout(query, key, value)
    (key_global, value_global), present = spec.pool_blocks((key, value), block_size, remainder, key_mask)
    keep = _key_keep(key_mask)
    batch, q_heads, q_len, _ = query.shape
    kv_heads, seq_len = key.shape[1], key.shape[2]
    out = query.new_empty(batch, q_heads, q_len, value.shape[-1])
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=query.device)
    if out.numel() == 0:  # no rows (L, B or Hq is 0): no program to launch
        return out, lse, key_global, value_global
    grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]) * batch * q_heads,)  # noqa: E731
    _forward_kernel[grid](
        query, key, value, key_global, value_global, keep, present.to(torch.int8), None, None, None, out, lse,
        *_strides(query), *_strides(key), *_strides(value), *_strides(key_global), *_strides(value_global),
        *_strides(out),
        q_heads, q_heads // kv_heads, q_len, seq_len, key_global.shape[2], seq_len - q_len, block_size,
        scale * LOG2_E, scale, query.shape[-1], value.shape[-1], triton.next_power_of_2(seq_len), BACKWARD=False,
        **_window_args(window), **_static_args(query, value, keep, causal, scope_own),
    )  # fmt: skip
    return out, lse, key_global, value_global


@_forward_op.register_fake
def _(query, key, value, key_mask, block_size, remainder, causal, scope_own, window, scale):
    batch, q_heads, q_len, _ = query.shape
    out = query.new_empty(batch, q_heads, q_len, value.shape[-1])
    blocks = spec.num_blocks(key.shape[2], block_size, remainder)
    pooled = [x.new_empty(batch, x.shape[1], blocks, x.shape[3]) for x in (key, value)]
    return out, query.new_empty(batch, q_heads, q_len, dtype=torch.float32), *pooled


@torch.library.custom_op("globalattn::triton_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_global: torch.Tensor,
    value_global: torch.Tensor,
    block_size: int,
    remainder: str,
    causal: bool,
    scope_own: bool,
    window: int | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    query, key, value, grad_out, out = _kernel_layout(query, key, value, grad_out, out)
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, seq_len, value_dim = key.shape[1], key.shape[2], value.shape[-1]
    num_blocks = key_global.shape[2]
    if query.numel() == 0:  # no rows (L, B or Hq is 0): no program to launch
        return torch.empty_like(query), torch.zeros_like(key), torch.zeros_like(value)
    counts = spec.real_token_counts(key_mask, batch, seq_len, block_size, remainder, query.device, torch.float32)
    present, keep = (counts > 0).to(torch.int8), _key_keep(key_mask)
    (query, grad_query), (key, grad_key), (value, grad_value) = map(_with_gradient_buffer, (query, key, value))
    lse2, delta = torch.empty_like(lse), torch.empty_like(lse)
    static = _static_args(query, value, keep, causal, scope_own)
    grid = (triton.cdiv(q_len, ROW_TILE) * batch * q_heads,)
    _row_terms_kernel[grid](
        out, grad_out, lse.contiguous(), grad_lse.contiguous(), lse2, delta,
        *_strides(out), *_strides(grad_out), q_heads, q_len, value_dim,
        BLOCK_M=ROW_TILE, BLOCK_DV=static["BLOCK_DV"],
    )  # fmt: skip
    common = (q_len, seq_len, num_blocks, seq_len - q_len, block_size, scale * LOG2_E, scale, head_dim, value_dim)
    common += (triton.next_power_of_2(seq_len),)  # seq_bucket
    group = q_heads // kv_heads

    grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]) * batch * q_heads,)  # noqa: E731
    _query_grad_kernel[grid](
        query, key, value, key_global, value_global, keep, present, grad_out, lse2, delta, grad_query, None,
        *_strides(query), *_strides(key), *_strides(value), *_strides(key_global), *_strides(value_global),
        *_strides(grad_out), q_heads, group, *common, BACKWARD=True, **_window_args(window), **static,
    )  # fmt: skip
    splits = _global_grad_splits(query, batch * kv_heads, num_blocks)
    rows_per_split = triton.cdiv(q_len, splits)
    parts = [torch.empty(splits, batch, kv_heads, num_blocks, d, device=query.device) for d in (head_dim, value_dim)]
    grid = lambda meta: (triton.cdiv(num_blocks, meta["BLOCK_N"]) * splits * batch * kv_heads,)  # noqa: E731
    _global_grad_kernel[grid](
        query, key_global, value_global, present, grad_out, lse2, delta, *parts,
        *_strides(query), *_strides(key_global), *_strides(value_global), *_strides(grad_out),
        kv_heads, group, *common, splits, rows_per_split, **static,
    )  # fmt: skip
    grad_key_global, grad_value_global = (part.sum(0) for part in parts)  # a fixed order: deterministic
    grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_N"]) * batch * kv_heads,)  # noqa: E731
    _key_grad_kernel[grid](
        query, key, value, keep, grad_out, lse2, delta, grad_key_global, grad_value_global,
        1.0 / counts.clamp(min=1), grad_key, grad_value,
        *_strides(query), *_strides(key), *_strides(value), *_strides(grad_out),
        kv_heads, group, *common, **_window_args(window), **static,
    )  # fmt: skip
    return grad_query, grad_key, grad_value


@_backward_op.register_fake
def _(grad_out, grad_lse, query, key, value, *rest):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _global_grad_splits(query: torch.Tensor, kv_batch_heads: int, num_blocks: int) -> int:
    """Slices of query rows for the global tokens' gradients: enough programs to fill the GPU
    (each slice adds one (B, Hkv, G, D) float32 buffer)."""
    if query.device.type != "cuda":
        return 2  # the interpreter: exercise the sum over slices
    programs = triton.cdiv(num_blocks, 64) * kv_batch_heads
    units = torch.cuda.get_device_properties(query.device).multi_processor_count
    return max(1, min(triton.cdiv(2 * units, programs), triton.cdiv(query.shape[2], 256)))


def _setup_context(ctx, inputs, output):
    query, key, value, key_mask, *options = inputs
    ctx.save_for_backward(query, key, value, key_mask, *output)
    ctx.mark_non_differentiable(*output[2:])  # the global tokens: their gradient reaches K, V inside the op
    ctx.options = options  # block_size, remainder, causal, scope_own, window, scale


def _backward(ctx, grad_out, grad_lse, _grad_key_global, _grad_value_global):
    checks.first_order_backward("triton")
    query, key, value, key_mask, out, lse, key_global, value_global = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grads = _backward_op(grad_out, grad_lse, query, key, value, key_mask, out, lse, key_global, value_global,
                         *ctx.options)  # fmt: skip
    return (*grads, None, None, None, None, None, None, None)  # none for key_mask and the options


_forward_op.register_autograd(_backward, setup_context=_setup_context)
