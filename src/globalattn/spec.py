"""The contract of docs/semantics.md in code: blocks, global tokens, and who sees what.

Every backend builds on these helpers, so that the rules below are written exactly once:

- ``block_starts_and_ends`` and ``block_index`` cut positions ``0 .. S-1`` into blocks
  (``remainder="merge"`` folds a short tail into the block before it, as the seed does;
  ``"separate"`` keeps it as its own, shorter block);
- ``pool_blocks`` averages each block's real tokens into its global token;
- ``local_visible`` and ``global_visible`` say which local keys and which global tokens a query may
  attend to.  They work elementwise on broadcastable tensors, so a backend can ask them about a
  whole score matrix (the reference) or about one tile (the blocked backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

REMAINDER_RULES = ("merge", "separate")
SCOPES = ("all", "own")


def resolve_remainder(causal: bool, remainder: str | None) -> str:
    """The remainder rule in force: ``"merge"`` when bidirectional, ``"separate"`` when causal."""
    if remainder is None:
        return "separate" if causal else "merge"
    return remainder


def num_blocks(seq_len: int, block_size: int, remainder: str) -> int:
    """G, the number of blocks (and of global tokens) for ``seq_len`` positions."""
    if remainder == "merge":
        return max(1, seq_len // block_size)
    return -(-seq_len // block_size)


def block_starts_and_ends(
    seq_len: int, block_size: int, remainder: str, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end (exclusive) of every block, two int64 tensors of shape (G,)."""
    g = num_blocks(seq_len, block_size, remainder)
    starts = torch.arange(g, device=device) * block_size
    ends = (starts + block_size).clamp(max=seq_len)
    ends[-1] = seq_len  # merge: the tail joins the last block; separate: already seq_len
    return starts, ends


def block_index(seq_len: int, block_size: int, remainder: str, device: torch.device | None = None) -> torch.Tensor:
    """``blk(s)`` for every position s, an int64 tensor of shape (S,)."""
    g = num_blocks(seq_len, block_size, remainder)
    return (torch.arange(seq_len, device=device) // block_size).clamp(max=g - 1)


def pool_blocks(
    xs: tuple[torch.Tensor, ...],
    block_size: int,
    remainder: str,
    key_mask: torch.Tensor | None,
    documents: DocumentBlocks | None = None,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Global tokens: the mean of each block's real tokens, for each tensor in ``xs``.

    xs: tensors of shape (B, H, S, D) (keys and values: the same blocks, their own head dims);
    key_mask: (B, S) bool or None; ``documents``: the blocks of packed documents (B = 1) instead of
    the uniform ones.  Returns the means, each (B, H, G, D) in its input's dtype (summed in float32
    or better), and ``present`` (B, G) bool: False for a block without a real token, whose mean is
    zero and must never be attended to.
    """
    batch, _, seq_len, _ = xs[0].shape
    acc_dtype = torch.promote_types(xs[0].dtype, torch.float32)
    if documents is None:
        sums = partial(_block_sums, block_size=block_size, remainder=remainder)
        counts = real_token_counts(key_mask, batch, seq_len, block_size, remainder, xs[0].device, acc_dtype)
    else:
        sums = documents.block_sums
        real = xs[0].new_ones(batch, seq_len, dtype=acc_dtype) if key_mask is None else key_mask.to(acc_dtype)
        counts = sums(real[:, None, :, None], dtype=acc_dtype)[:, 0, :, 0]  # (1, G)
    inverse_counts = (1.0 / counts.clamp(min=1))[:, None, :, None]
    # Summed in acc_dtype by the reduction itself: no full-precision copy of K and V (on a GPU at
    # 128k tokens such a copy costs as much traffic as half the forward).
    means = tuple((sums(zero_padding(x, key_mask), dtype=acc_dtype) * inverse_counts).to(x.dtype) for x in xs)
    return means, counts > 0


def zero_padding(x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, S, D) with its padding positions (``key_mask`` False) set to zero, by selection:
    padding often holds garbage, and NaN * 0 is NaN, so a multiplication would let it through."""
    return x if key_mask is None else torch.where(key_mask[:, None, :, None], x, 0)


def real_token_counts(
    key_mask: torch.Tensor | None, batch: int, seq_len: int, block_size: int, remainder: str, device, dtype
) -> torch.Tensor:
    """(B, G): how many real tokens each (uniform) block holds, the denominator of its global token."""
    if key_mask is None:
        weights = torch.ones(batch, seq_len, dtype=dtype, device=device)
    else:
        weights = key_mask.to(dtype)
    return _block_sums(weights[:, None, :, None], block_size, remainder, dtype=dtype)[:, 0, :, 0]


def _block_sums(x: torch.Tensor, block_size: int, remainder: str, *, dtype: torch.dtype) -> torch.Tensor:
    """Sum over each block of dim -2: (B, H, S, D) -> (B, H, G, D) in ``dtype``, by reshaping, not
    scattering."""
    seq_len = x.shape[-2]
    full = seq_len // block_size
    sums = x[..., : full * block_size, :].unflatten(-2, (full, block_size)).sum(-2, dtype=dtype)
    if full * block_size == seq_len:
        return sums
    tail = x[..., full * block_size :, :].sum(-2, keepdim=True, dtype=dtype)
    if remainder == "separate" or full == 0:
        return torch.cat([sums, tail], dim=-2)
    return torch.cat([sums[..., :-1, :], sums[..., -1:, :] + tail], dim=-2)


@dataclass(frozen=True)
class DocumentBlocks:
    """The blocks of packed documents (docs/semantics.md, "Packed sequences") along one row of N
    positions: each document cut into blocks from its first position, the remainder rule applied
    per document, so that no block spans two documents.  Every field is an int64 tensor."""

    starts: torch.Tensor  # (G,) first position of each block
    ends: torch.Tensor  # (G,) one past its last
    block_of: torch.Tensor  # (N,) the block of every position
    first_block: torch.Tensor  # (G,) the first block of each block's document (equal: the same document)
    last_block: torch.Tensor  # (G,) the last block of it
    doc_start: torch.Tensor  # (G,) the first position of each block's document
    doc_end: torch.Tensor  # (G,) one past its last

    def block_sums(self, x: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
        """Sum over each block of dim -2: (1, H, N, D) -> (1, H, G, D) in ``dtype``."""
        sums = x.new_zeros(*x.shape[:-2], self.starts.numel(), x.shape[-1], dtype=dtype)
        return sums.index_add_(-2, self.block_of, x.to(dtype))


def document_blocks(document_ids: torch.Tensor, block_size: int, remainder: str) -> DocumentBlocks:
    """The blocks of ``document_ids`` (B, S), its rows laid end to end as one row of B * S positions
    (a row's first position always starts a document).  Built with tensor ops, whatever the number
    of documents."""
    seq_len = document_ids.shape[1]
    ids = document_ids.reshape(-1)
    device = ids.device
    pos = torch.arange(ids.numel(), device=device)
    new_doc = (pos % seq_len == 0) | torch.cat([ids.new_ones(1, dtype=torch.bool), ids[1:] != ids[:-1]])
    doc_starts = pos[new_doc]  # (D,)
    doc_ends = torch.cat([doc_starts[1:], pos.new_full((1,), ids.numel())])
    lengths = doc_ends - doc_starts
    per_doc = (lengths // block_size).clamp(min=1) if remainder == "merge" else -(-lengths // block_size)
    first = per_doc.cumsum(0) - per_doc  # (D,) each document's first block
    doc = torch.repeat_interleave(torch.arange(doc_starts.numel(), device=device), per_doc)  # (G,) block -> doc
    nth = torch.arange(doc.numel(), device=device) - first[doc]  # block's index within its document
    starts = doc_starts[doc] + nth * block_size
    is_last = nth == per_doc[doc] - 1  # a document's last block runs to its end (a merged tail)
    ends = torch.where(is_last, doc_ends[doc], torch.minimum(starts + block_size, doc_ends[doc]))
    doc_of = new_doc.cumsum(0) - 1  # (N,) document of every position
    within = torch.minimum((pos - doc_starts[doc_of]) // block_size, per_doc[doc_of] - 1)
    return DocumentBlocks(
        starts=starts,
        ends=ends,
        block_of=first[doc_of] + within,
        first_block=first[doc],
        last_block=(first + per_doc - 1)[doc],
        doc_start=doc_starts[doc],
        doc_end=doc_ends[doc],
    )


def local_visible(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    query_block: torch.Tensor,
    key_block: torch.Tensor,
    causal: bool,
    window: int | None = None,
) -> torch.Tensor:
    """May the query at ``query_pos`` (in ``query_block``) attend to the raw key at ``key_pos``?

    Without a window: same block, and in causal mode not after the query.  With ``window=w``
    (docs/semantics.md, "A sliding window of raw keys"): ``p - w < s <= p`` causal, ``|s - p| < w``
    bidirectional, whatever the blocks.  (Padding is the caller's to apply.)
    """
    if window is not None:
        return in_window(query_pos, key_pos, causal, window)
    visible = query_block == key_block
    if causal:
        visible = visible & (key_pos <= query_pos)
    return visible


def in_window(query_pos: torch.Tensor, key_pos: torch.Tensor, causal: bool, window: int) -> torch.Tensor:
    """Is ``key_pos`` within the query's window: ``p - w < s <= p`` causal, ``|s - p| < w`` bidirectional?"""
    offset = query_pos - key_pos
    return (offset >= 0) & (offset < window) if causal else offset.abs() < window


def global_visible(query_block: torch.Tensor, global_block: torch.Tensor, causal: bool, scope: str) -> torch.Tensor:
    """May a query in ``query_block`` attend to the global token of ``global_block``?

    causal: complete earlier blocks only (the own block's mean holds future tokens);
    scope "own": the own block's token only (the seed's literal example); scope "all": every block.
    (Blocks without a real token are the caller's to drop.)
    """
    if causal:
        return global_block < query_block
    if scope == "own":
        return global_block == query_block
    return torch.ones_like(global_block == query_block)


def select_top_blocks(
    global_scores: torch.Tensor, candidate: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing (docs/semantics.md, "Routing to the top blocks"): each query's k candidate blocks with the highest score.

    global_scores (..., G) the query's scores against the global tokens; candidate (..., G) bool,
    broadcastable: the global tokens it may see, its own block excluded.  Ties go to the lower
    block; a query with fewer than k candidates gets all of them.  The choice carries no gradient.
    Returns ``blocks`` (..., min(k, G)) int64 and ``chosen`` (..., min(k, G)) bool (False where
    the slot holds no candidate).
    """
    # The lowest finite value where a block is no candidate (an addition of -inf, then a clamp:
    # both broadcast much faster than masked_fill), so that a taken block, set to -inf, ranks below it.
    minus_inf = torch.where(candidate, 0.0, float("-inf")).to(global_scores.dtype)
    ranked = (global_scores.detach() + minus_inf).clamp_(min=torch.finfo(global_scores.dtype).min)
    blocks = torch.zeros((*ranked.shape[:-1], min(k, ranked.shape[-1])), dtype=torch.long, device=ranked.device)
    for slot in range(blocks.shape[-1]):  # k is small: k passes of argmax cost far less than a sort of all G
        best = ranked.argmax(-1, keepdim=True)  # the first maximum: ties go to the lower block
        blocks[..., slot : slot + 1] = best
        ranked.scatter_(-1, best, float("-inf"))
    return blocks, candidate.expand_as(ranked).gather(-1, blocks)


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of ``scores`` over the cells ``allowed`` (broadcastable) of the last dim, and its lse.

    A row that may see nothing gets all-zero weights, ``lse = -inf`` and zero gradients, never NaN:
    its scores are replaced by zeros before the softmax and its weights multiplied by 0 after.
    """
    row_has_any = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~row_has_any, 0.0)
    weights = torch.softmax(scores, dim=-1) * row_has_any
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~row_has_any[..., 0], float("-inf"))
    return weights, lse


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """-inf (a row that sees nothing) replaced by 0, so that exp(-inf - x) stays 0 and not NaN."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))
