"""Context parallelism: one sequence split along its length across the ranks of a process group.

Each rank holds a contiguous run of whole blocks (its *shard*).  Local attention never leaves a
block, so it needs no communication; what crosses ranks is the global tokens alone: every rank
pools its blocks and all-gathers them, G x (D + Dv) per key/value head in all, where ring attention
must pass every rank's S/P x (D + Dv) keys and values round the ring.  With ``window=w`` a rank
also receives the raw positions its queries' windows reach on the neighbouring ranks (halos of
whole blocks), and its call spans them.

A rank's output is one ``global_attention`` call on its shard, with the other ranks' global tokens
as ``extra_global_tokens``: all of them (bidirectional), those of earlier ranks (causal: their
blocks are complete and precede every query of the shard), none (``scope="own"``, which therefore
needs no communication at all).  The shard's own blocks follow the core's rules inside the call.

The all-gather's backward is a reduce-scatter: each pooled token's gradient, summed over the
queries of every rank, returns to the rank that owns it.  Every rank must therefore call forward
and run backward through its output, as with any collective inside autograd.

    # torchrun --nproc-per-node=4 train.py            (gloo on CPUs, NCCL on GPUs)
    dist.init_process_group()
    q, k, v = (shard_sequence(x, block_size, dim=2) for x in (query, key, value))
    out = context_parallel_attention(q, k, v, block_size)   # == this rank's slice of global_attention
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from globalattn import checks, spec
from globalattn.api import global_attention
from globalattn.options import GlobalTokens, resolve

# torch 2.13 renamed the single-tensor collectives (the old names now warn); older torch has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def context_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_size: int,
    *,
    group: dist.ProcessGroup | None = None,
    **options,
) -> torch.Tensor:
    """``global_attention`` over a sequence sharded across the ranks of ``group`` (default: world).

    Every rank passes its shard; ranks hold consecutive shards in rank order::

        query     (B, Hq,  n, D)    n = this rank's shard length, the same for query and key
        key       (B, Hkv, n, D)
        value     (B, Hkv, n, Dv)
        key_mask  (B, n) bool       this rank's slice of the (B, S) mask, or None

    A shard is a whole number of blocks: every shard but the last has a multiple of ``block_size``
    positions; the last may end with the remainder (a longer merged block, or a short separate one).
    ``shard_sequence`` cuts tensors this way.  An empty shard, or one cut inside a block, is refused
    with a ValueError on every rank.  ``options`` are the keyword options of ``global_attention``
    (causal, scope, remainder, key_mask, scale, window, dropout_p), all ranks passing the same; not
    ``top_blocks`` (it would read other ranks' raw tokens), ``extra_global_tokens`` nor
    ``document_ids``.  With
    ``window=w`` each rank also receives the raw keys its queries' windows reach on its neighbours,
    extended to whole blocks (fewer than w + b positions a side, or up to a merged last block),
    which must lie within the neighbour's shard.

    Returns (B, Hq, n, Dv): this rank's slice of ``global_attention`` on the whole sequence, with the
    gradients of the whole-sequence computation flowing back to every rank's inputs.
    """
    _check_shard(query, key)
    lengths = _shard_lengths(key, group)  # an empty shard is refused here, on every rank
    # Every rank passes the same options, so a bad one is refused on every rank alike, and the
    # shard layout is checked, all before anything is computed.
    if options.get("top_blocks"):
        raise ValueError("context_parallel_attention takes no top_blocks: it would read other ranks' raw tokens")
    for name, why in (
        ("extra_global_tokens", "the other ranks' global tokens are its extra tokens"),
        ("document_ids", "shards would have to fall on the documents' own block boundaries"),
    ):
        if options.get(name) is not None:
            raise ValueError(f"context_parallel_attention takes no {name}: {why}")
    resolved = resolve(query, key, value, block_size, **options)
    _check_whole_blocks(lengths, block_size, resolved.remainder)
    if len(lengths) == 1:
        return global_attention(query, key, value, block_size, **options)
    # The user's block size and window: the resolved ones are clamped to this shard's length.
    reach = _Reach.of(lengths, dist.get_rank(group), block_size, resolved.remainder, resolved.causal,
                      options.get("window"))  # fmt: skip
    others = None
    if resolved.scope != "own":  # scope "own" sees no other block's global token
        others = _gather_visible_global_tokens(key, value, block_size, resolved, lengths, reach, group)
    key_mask = options.pop("key_mask", None)
    if reach.exchanges_halos:
        key, value, key_mask = _with_halos(key, value, key_mask, reach, group)
        # Keys now run past the shard (bidirectional windows): the queries must be the call's last
        # rows, so zero queries stand in for those positions, and their rows are dropped.
        query = torch.cat([query, query.new_zeros(*query.shape[:2], reach.right, query.shape[3])], dim=2)
    out = global_attention(query, key, value, block_size, key_mask=key_mask, extra_global_tokens=others, **options)
    return out[:, :, : lengths[dist.get_rank(group)]]


@dataclass(frozen=True)
class _Reach:
    """What one rank's call spans: its shard, extended by the raw keys its windows reach on the
    neighbouring ranks to whole blocks (the halos), and what it sends them of its own."""

    left: int  # positions before the shard in the call (the previous rank's last ones)
    right: int  # positions after it (the next rank's first ones; causal: none)
    send_tail: int  # this shard's last positions that the next rank's call holds
    send_head: int  # its first positions that the previous rank's call holds
    first_block: int  # global index of the call's first block
    end_block: int  # one past its last block
    sent: tuple[int, ...]  # positions every rank sends (its tail for the next rank, then its head)

    @staticmethod
    def of(lengths: list[int], rank: int, block_size: int, remainder: str, causal: bool, window: int | None) -> _Reach:
        """Computed alike on every rank, from every rank's shard length."""
        seq_len = sum(lengths)
        block_starts, block_ends = spec.block_starts_and_ends(seq_len, block_size, remainder)
        block_of = spec.block_index(seq_len, block_size, remainder)
        shard_starts = [sum(lengths[:r]) for r in range(len(lengths))]
        spans = []  # (call start, call end) of every rank
        for r, (start, n) in enumerate(zip(shard_starts, lengths)):
            end = start + n
            if window is None:
                spans.append((start, end))
                continue
            lo = int(block_starts[block_of[max(0, start - window + 1)]])
            hi = end if causal else int(block_ends[block_of[min(seq_len, end + window - 1) - 1]])
            if (r > 0 and lo < shard_starts[r - 1]) or (r + 1 < len(lengths) and hi > end + lengths[r + 1]):
                raise ValueError(
                    f"window={window} reaches past a neighbouring rank's shard (shard lengths by rank: {lengths}): "
                    "context parallelism exchanges halos with the neighbours only; use a smaller window or fewer ranks"
                )
            spans.append((lo, hi))
        ends = [a + n for a, n in zip(shard_starts, lengths)]
        tails = [end - next_lo for end, (next_lo, _) in zip(ends, spans[1:])] + [0]
        heads = [0] + [prev_hi - start for (_, prev_hi), start in zip(spans, shard_starts[1:])]
        (lo, hi), start, end = spans[rank], shard_starts[rank], ends[rank]
        return _Reach(
            left=start - lo,
            right=hi - end,
            send_tail=tails[rank],
            send_head=heads[rank],
            first_block=int(block_of[lo]),
            end_block=int(block_of[hi - 1]) + 1,
            sent=tuple(t + h for t, h in zip(tails, heads)),
        )

    @property
    def exchanges_halos(self) -> bool:
        """Some rank's call holds another rank's positions."""
        return any(self.sent)


# ---------------------------------------------------------------------------------------------
# Sharding


def shard_range(
    seq_len: int, block_size: int, rank: int, world_size: int, *, causal: bool = False, remainder: str | None = None
) -> range:
    """The positions that ``rank`` of ``world_size`` holds: a contiguous run of whole blocks.

    The G blocks are shared out as evenly as possible, later ranks taking the extra ones; the last
    rank's shard ends with the remainder of ``remainder`` (resolved as in ``global_attention``).
    ``torch.arange(r.start, r.stop)`` gives the shard's absolute positions (e.g. for rotary
    embeddings).

    >>> [shard_range(16, 5, r, 2) for r in range(2)]    # blocks [0,5) [5,10) [10,16)
    [range(0, 5), range(5, 16)]
    """
    for name, x in (("seq_len", seq_len), ("block_size", block_size), ("world_size", world_size)):
        checks.positive_int(name, x)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    checks.mode(causal, remainder=remainder)
    starts, ends = spec.block_starts_and_ends(seq_len, block_size, spec.resolve_remainder(causal, remainder))
    blocks = starts.numel()
    if blocks < world_size:
        raise ValueError(
            f"seq_len={seq_len} with block_size={block_size} gives {blocks} blocks, fewer than world_size="
            f"{world_size}: some rank would hold an empty shard; use a smaller block_size or fewer ranks"
        )
    first, last = rank * blocks // world_size, (rank + 1) * blocks // world_size  # blocks first .. last - 1
    return range(int(starts[first]), int(ends[last - 1]))


def shard_sequence(
    x: torch.Tensor,
    block_size: int,
    *,
    dim: int,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    remainder: str | None = None,
) -> torch.Tensor:
    """This rank's shard of ``x`` along its sequence dimension ``dim`` (a view, see ``shard_range``).

    Queries, keys and values (B, H, S, D) use ``dim=2``; a key mask (B, S) ``dim=1``.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"x must be a tensor and dim one of its dimensions, got {checks.describe(x)} and dim={dim!r}")
    shard = shard_range(
        x.shape[dim], block_size, dist.get_rank(group), dist.get_world_size(group), causal=causal, remainder=remainder
    )
    return x.narrow(dim, shard.start, len(shard))


def unshard_sequence(x: torch.Tensor, *, dim: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The whole sequence on every rank: the ranks' shards of ``x`` concatenated along ``dim``.

    The shards may differ in length along ``dim``; every other dimension must match.  Differentiable:
    the gradient of each shard returns, summed over ranks, to the rank that holds it.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"x must be a tensor and dim one of its dimensions, got {checks.describe(x)} and dim={dim!r}")
    lengths = [row[0] for row in _all_gather_ints([x.shape[dim]], group, x.device)]
    return _all_gather_uneven(x, dim % x.dim(), lengths, group)


# ---------------------------------------------------------------------------------------------
# Context parallel x data parallel


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in a (data parallel) x (context parallel) grid of the world's ranks.

    ``context_parallel``: the ranks that share one sequence, consecutive ranks in sequence order
    (pass it as ``group``).  ``data_parallel``: the ranks at the same place in the other sequences
    (``dist.get_rank(data_parallel)`` picks the batch).  Parameter gradients are partial on every
    rank, so their all-reduce spans the whole world (DDP's default), not either group alone.
    """

    context_parallel: dist.ProcessGroup
    data_parallel: dist.ProcessGroup


def context_parallel_groups(context_parallel_size: int, *, timeout: timedelta | None = None) -> ParallelGroups:
    """Split the world into ``world_size / context_parallel_size`` sequences of that many ranks each.

    Collective: every rank calls it, after ``init_process_group``.  ``timeout`` bounds every wait in
    the new groups (None: torch's default); a rank that dies then fails the others instead of hanging.
    """
    world = dist.get_world_size()
    size = context_parallel_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or world % size:
        raise ValueError(f"context_parallel_size must be a positive int dividing world_size={world}, got {size!r}")
    ranks = list(range(world))
    sequences = [ranks[i : i + size] for i in range(0, world, size)]
    places = [ranks[i::size] for i in range(size)]
    context_parallel, _ = dist.new_subgroups_by_enumeration(sequences, timeout=timeout)
    data_parallel, _ = dist.new_subgroups_by_enumeration(places, timeout=timeout)
    return ParallelGroups(context_parallel=context_parallel, data_parallel=data_parallel)


# ---------------------------------------------------------------------------------------------
# The pieces of context_parallel_attention


def _check_shard(query, key) -> None:
    checks.tensor("query", query, layout="(B, Hq, n, head_dim), this rank's shard")
    checks.tensor("key", key, layout="(B, Hkv, n, head_dim), this rank's shard")
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"query and key must hold the same shard (n={key.shape[2]} positions), got query length {query.shape[2]}: "
            "context parallelism splits self-attention over one sequence"
        )


def _shard_lengths(key, group) -> list[int]:
    """Every rank's shard length, in rank order; an empty shard refused on every rank alike."""
    lengths = [row[0] for row in _all_gather_ints([key.shape[2]], group, key.device)]
    empty = [rank for rank, n in enumerate(lengths) if n == 0]
    if empty:
        raise ValueError(
            f"rank(s) {empty} passed an empty shard (shard lengths by rank: {lengths}); every rank needs at least "
            "one whole block: cut the sequence with shard_sequence, or use fewer ranks"
        )
    return lengths


def _check_whole_blocks(lengths: list[int], block_size: int, remainder: str) -> None:
    """Shards must start and end on the block boundaries of the whole sequence."""
    for rank, n in enumerate(lengths[:-1]):
        if n % block_size:
            raise ValueError(
                f"rank {rank}'s shard has {n} positions, not a whole number of blocks of block_size={block_size} "
                f"(shard lengths by rank: {lengths}); every shard but the last must be a multiple of block_size"
            )
    if remainder == "merge" and len(lengths) > 1 and lengths[-1] < block_size:
        raise ValueError(
            f"the last rank's shard has {lengths[-1]} < block_size={block_size} positions: with remainder='merge' "
            "a short tail belongs to the block before it, on another rank; give the tail to that rank's shard "
            "(shard_sequence does) or use remainder='separate'"
        )


def _gather_visible_global_tokens(key, value, block_size, resolved, lengths, reach, group):
    """The global tokens of the blocks outside this rank's call that its queries may see: earlier
    ones when causal, all of them when bidirectional.

    Returns keys (B, Hkv, T, D), values (B, Hkv, T, Dv) and present (B, T) bool (False: a block
    without a real token).  Every rank gathers every rank's tokens, so that the collective (and
    its backward) runs on all of them even when a rank sees none (causal rank 0).
    """
    remainder = resolved.remainder
    (key_global, value_global), present = spec.pool_blocks((key, value), block_size, remainder, resolved.key_mask)
    blocks = [spec.num_blocks(n, block_size, remainder) for n in lengths]
    tokens = _all_gather_uneven(_pack(key_global, value_global, present), 2, blocks, group)  # (B, Hkv, G, D + Dv + 1)
    earlier, later = tokens[:, :, : reach.first_block], tokens[:, :, reach.end_block :]
    visible = earlier if resolved.causal else torch.cat([earlier, later], dim=2)  # (B, Hkv, T, D + Dv + 1)
    return GlobalTokens(*_unpack(visible, key.shape[-1]))


def _with_halos(key, value, key_mask, reach, group):
    """[previous rank's last ``reach.left`` ; this shard ; next rank's first ``reach.right``] of the
    keys, the values and the mask, in one differentiable collective."""
    shard_len = key.shape[2]
    mask = torch.ones(key.shape[0], shard_len, dtype=torch.bool, device=key.device) if key_mask is None else key_mask
    packed = _pack(key, value, mask)  # (B, Hkv, n, D + Dv + 1)
    sent = torch.cat([packed[:, :, shard_len - reach.send_tail :], packed[:, :, : reach.send_head]], dim=2)
    pieces = _all_gather_uneven(sent, 2, list(reach.sent), group).split(reach.sent, dim=2)
    rank, nothing = dist.get_rank(group), packed[:, :, :0]
    left = pieces[rank - 1][:, :, : reach.left] if rank > 0 else nothing  # the previous rank's tail
    right = pieces[rank + 1][:, :, reach.sent[rank + 1] - reach.right :] if rank + 1 < len(pieces) else nothing
    key, value, mask = _unpack(torch.cat([left, packed, right], dim=2), key.shape[-1])
    return key, value, (None if key_mask is None else mask)


def _pack(key, value, mask):
    """(B, Hkv, N, D), (B, Hkv, N, Dv), (B, N) bool -> one (B, Hkv, N, D + Dv + 1) tensor, for one
    collective; the mask rides along as a 0/1 channel (exact in any float dtype)."""
    flag = mask[:, None, :, None].expand(*key.shape[:3], 1).to(key.dtype)
    return torch.cat([key, value, flag], dim=-1)


def _unpack(packed, head_dim: int):
    return packed[..., :head_dim], packed[..., head_dim:-1], packed[:, 0, :, -1] > 0.5


# ---------------------------------------------------------------------------------------------
# Collectives, with autograd and with errors that say what failed


def _all_gather_ints(values: list[int], group, device) -> list[list[int]]:
    """Every rank's ``values`` (all ranks pass the same number), in rank order."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    table = mine.new_empty(dist.get_world_size(group) * len(values))
    _collective("all-gather of shard lengths", _all_gather_single, table, mine, group=group)
    return table.view(-1, len(values)).tolist()


def _all_gather_uneven(x, dim: int, lengths: list[int], group):
    """Concatenate the ranks' ``x`` along ``dim`` (non-negative), rank r's being lengths[r] long there."""
    longest = max(lengths)
    padding = list(x.shape)
    padding[dim] = longest - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(padding)], dim=dim).movedim(dim, 0)  # equal shapes for the collective
    parts = _AllGather.apply(padded, group).unflatten(0, (len(lengths), longest))  # (P, longest, ...)
    return torch.cat([part[:n] for part, n in zip(parts, lengths)]).movedim(0, dim)


class _AllGather(torch.autograd.Function):
    """(n, ...) on every rank -> (P * n, ...), rank order.  Backward reduce-scatters: the gradient
    of rank r's rows, summed over all ranks, returns to rank r."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])
        _collective("all-gather", _all_gather_single, out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous()
        grad = grad_out.new_empty(grad_out.shape[0] // dist.get_world_size(ctx.group), *grad_out.shape[1:])
        _collective(
            "reduce-scatter (an all-gather's backward)", _reduce_scatter_single, grad, grad_out, group=ctx.group
        )
        return grad, None


def _collective(what: str, fn, *args, group) -> None:
    """Run a blocking collective; if it fails (a rank died, or did not join before the group's
    timeout), say which one, where, and what to look at."""
    try:
        fn(*args, group=group)
    except RuntimeError as err:
        raise RuntimeError(
            f"context parallel: the {what} failed on rank {dist.get_rank(group)} of {dist.get_world_size(group)}: "
            "another rank died, hung past the process group's timeout, or skipped this call (every rank must "
            "call forward and run backward through its output); see the other ranks' logs"
        ) from err
