"""Context parallelism (``globalattn.distributed``) on gloo processes, against one process.

Starting processes is what costs time here, so each spawned job starts its ranks once and runs
every case inside them.  All ranks draw the whole-sequence inputs from the same seed, compute the
single-process result themselves, and compare their shard of it (outputs and every gradient, in
float64, to 1e-10) with what context parallelism gives.  Processes talk over 127.0.0.1 only; every
wait has a timeout (the process group's, and the join's).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import hypothesis.strategies as st
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings

import globalattn.backends.blocked
import globalattn.distributed
import globalattn.layer
from globalattn import GlobalAttention, block_bounds, global_attention
from globalattn.distributed import (
    context_parallel_attention,
    context_parallel_groups,
    shard_range,
    shard_sequence,
    unshard_sequence,
)

TOLERANCE = 1e-10
JOB_TIMEOUT_S = 120.0  # a whole spawned job, start-up included
GROUP_TIMEOUT_S = 30.0  # any single collective of a healthy job finishes long before this
START_METHOD = "forkserver"


# ---------------------------------------------------------------------------------------------
# Sharding, in this process


@settings(max_examples=200, deadline=None)
@given(
    seq_len=st.integers(1, 300),
    block_size=st.integers(1, 40),
    world_size=st.integers(1, 9),
    rule=st.sampled_from(["bidirectional", "causal", "separate"]),
)
def test_shards_are_contiguous_balanced_runs_of_whole_blocks(seq_len, block_size, world_size, rule):
    causal, remainder = rule == "causal", "separate" if rule == "separate" else None
    blocks = block_bounds(seq_len, block_size, remainder="separate" if causal or remainder else "merge")
    if len(blocks) < world_size:
        with pytest.raises(ValueError, match="world_size"):
            shard_range(seq_len, block_size, 0, world_size, causal=causal, remainder=remainder)
        return
    shards = [
        shard_range(seq_len, block_size, r, world_size, causal=causal, remainder=remainder) for r in range(world_size)
    ]
    assert [p for shard in shards for p in shard] == list(range(seq_len))
    starts = {start for start, _ in blocks}
    assert all(shard.start in starts for shard in shards)  # cut at block boundaries only
    counts = [sum(shard.start <= start < shard.stop for start, _ in blocks) for shard in shards]
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1


def test_shard_range_refuses_bad_arguments():
    with pytest.raises(ValueError, match="rank must be an int in"):
        shard_range(20, 5, 2, 2)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        shard_range(20, 5, 0, 0)
    with pytest.raises(ValueError, match="cannot be causal"):
        shard_range(20, 5, 0, 2, causal=True, remainder="merge")
    with pytest.raises(ValueError, match="remainder must be one of"):
        shard_range(20, 5, 0, 2, remainder="drop")
    with pytest.raises(ValueError, match="gives 4 blocks, fewer than world_size=5"):
        shard_range(20, 5, 0, 5)


# ---------------------------------------------------------------------------------------------
# Against one process, on 2 and 4 gloo processes

# S = 37, b = 5: merge gives 7 blocks (the last one 7 long), separate 8 (the last one 2 long), so
# shards are uneven on 2 and on 4 ranks.  Grouped-query heads and Dv != D throughout.
SHAPE = dict(B=3, Hq=4, Hkv=2, S=37, D=8, Dv=6, b=5)
CASES = [
    dict(),
    dict(causal=True),
    dict(remainder="separate"),
    dict(mask=True),
    dict(causal=True, mask=True),
    dict(scope="own", mask=True),
    dict(scale=0.3, cuts=True),  # shards cut by hand, not by shard_range
    dict(causal=True, mask=True, cuts=True),
    dict(mask=True, chunk_elements=200),  # each rank's call cut into many chunks
    # A window of raw keys: halos from the neighbours, whole blocks (w - 1 <= 5, the shortest shard).
    dict(window=3),
    dict(window=5, causal=True, mask=True),
    dict(window=6, mask=True, remainder="separate"),
    dict(window=4, scope="own"),  # halos, but no other rank's global token
    dict(window=2, causal=True, cuts=True),
    dict(window=6, mask=True, cuts=True),
]


def _padding(batch: int, seq_len: int, block_size: int) -> torch.Tensor:
    """About 30% padding; batch 0's first block all padding (no global token, and in causal mode
    rows that see nothing); batch 2 all padding (every row empty)."""
    real = torch.rand(batch, seq_len) > 0.3
    real[0, :block_size] = False
    real[2] = False
    return real


def _hand_cuts(seq_len: int, block_size: int, world_size: int) -> list[int]:
    """Shard boundaries unlike shard_range's: one block on every rank but the last."""
    return [r * block_size for r in range(world_size)] + [seq_len]


def _check_case(rank: int, world_size: int, seed: int, case: dict) -> None:
    torch.manual_seed(seed)
    B, Hq, Hkv, S, D, Dv, b = (SHAPE[n] for n in ("B", "Hq", "Hkv", "S", "D", "Dv", "b"))
    options = dict(causal=case.get("causal", False), scope=case.get("scope", "all"), remainder=case.get("remainder"))
    options["window"] = case.get("window")
    q = torch.randn(B, Hq, S, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, S, Dv, dtype=torch.float64, requires_grad=True)
    mask = _padding(B, S, b) if case.get("mask") else None
    grad_out = torch.randn(B, Hq, S, Dv, dtype=torch.float64)
    exact = global_attention(q, k, v, b, key_mask=mask, scale=case.get("scale"), **options)
    exact_grads = torch.autograd.grad(exact, (q, k, v), grad_out)

    if case.get("cuts"):
        cuts = _hand_cuts(S, b, world_size)
        shard = slice(cuts[rank], cuts[rank + 1])
        q_s, k_s, v_s = (x.detach()[:, :, shard].clone().requires_grad_() for x in (q, k, v))
        mask_s = None if mask is None else mask[:, shard]
    else:
        sharding = dict(causal=options["causal"], remainder=options["remainder"])
        mine = shard_range(S, b, rank, world_size, **sharding)
        shard = slice(mine.start, mine.stop)
        q_s, k_s, v_s = (shard_sequence(x.detach(), b, dim=2, **sharding).requires_grad_() for x in (q, k, v))
        mask_s = None if mask is None else shard_sequence(mask, b, dim=1, **sharding)
    blocked = globalattn.backends.blocked  # the backend every rank's call runs on the CPU
    chunk_elements = blocked.CHUNK_ELEMENTS
    blocked.CHUNK_ELEMENTS = case.get("chunk_elements", chunk_elements)
    try:
        out = context_parallel_attention(q_s, k_s, v_s, b, key_mask=mask_s, scale=case.get("scale"), **options)
        grads = torch.autograd.grad(out, (q_s, k_s, v_s), grad_out[:, :, shard])
        with torch.no_grad():
            again = context_parallel_attention(q_s, k_s, v_s, b, key_mask=mask_s, scale=case.get("scale"), **options)
    finally:
        blocked.CHUNK_ELEMENTS = chunk_elements

    where = f"rank {rank} of {world_size}, case {case}"
    torch.testing.assert_close(out, exact[:, :, shard], rtol=0, atol=TOLERANCE, msg=lambda m: f"{where}: out: {m}")
    for name, got, want in zip(("query", "key", "value"), grads, exact_grads):
        torch.testing.assert_close(
            got, want[:, :, shard], rtol=0, atol=TOLERANCE, msg=lambda m, n=name: f"{where}: grad {n}: {m}"
        )
    torch.testing.assert_close(again, out, rtol=0, atol=0, msg=lambda m: f"{where}: without autograd: {m}")
    whole = unshard_sequence(out.detach(), dim=2)
    torch.testing.assert_close(whole, exact.detach(), rtol=0, atol=TOLERANCE, msg=lambda m: f"{where}: unshard: {m}")


def _check_refusals(rank: int, world_size: int) -> None:
    """Bad shards are refused with the same ValueError on every rank, and the group stays usable."""
    b = 5
    S = 2 * world_size * b + 3  # two blocks a rank, and a tail of 3
    q, k, v = (torch.randn(1, 2, S, 4, dtype=torch.float64) for _ in range(3))

    def attend(cuts, **options):
        shard = slice(cuts[rank], cuts[rank + 1])
        return context_parallel_attention(q[:, :, shard], k[:, :, shard], v[:, :, shard], b, **options)

    cuts = [r * 2 * b for r in range(world_size)] + [S]
    with pytest.raises(ValueError, match=rf"rank\(s\) \[{world_size - 1}\] passed an empty shard"):
        attend(cuts[:-2] + [S, S])  # the last rank's shard is empty
    with pytest.raises(ValueError, match="rank 0's shard has 11 positions, not a whole number of blocks"):
        attend([0, 11] + cuts[2:])
    with pytest.raises(ValueError, match="the last rank's shard has 3 < block_size=5 positions"):
        attend(cuts[:-2] + [S - 3, S])
    attend(cuts[:-2] + [S - 3, S], remainder="separate")  # a short separate last block is fine
    with pytest.raises(ValueError, match="takes no top_blocks"):
        attend(cuts, top_blocks=1)
    with pytest.raises(ValueError, match="takes no document_ids"):
        attend(cuts, document_ids=torch.zeros(1, cuts[rank + 1] - cuts[rank], dtype=torch.long))
    if world_size > 2:  # rank 2's window would reach into rank 0's shard
        with pytest.raises(ValueError, match="window=12 reaches past a neighbouring rank's shard"):
            attend(cuts, window=12)
    with pytest.raises(ValueError, match="unknown option.*causl"):
        attend(cuts, causl=True)
    with pytest.raises(ValueError, match='remainder="merge" cannot be causal'):
        attend(cuts, causal=True, remainder="merge")
    with pytest.raises(ValueError, match="same shard"):
        context_parallel_attention(q[:, :, :b], k[:, :, : 2 * b], v[:, :, : 2 * b], b)  # refused before any collective


def _check_unshard_gradient(rank: int, world_size: int) -> None:
    """Each rank's shard receives the gradient of its rows summed over every rank's whole copy."""
    cuts = _hand_cuts(11, 2, world_size)
    shard = torch.randn(3, cuts[rank + 1] - cuts[rank], 2, dtype=torch.float64, requires_grad=True)
    weight = torch.arange(3 * 11 * 2, dtype=torch.float64).view(3, 11, 2)  # the same on every rank
    (unshard_sequence(shard, dim=1) * weight).sum().backward()
    torch.testing.assert_close(shard.grad, world_size * weight[:, cuts[rank] : cuts[rank + 1]], rtol=0, atol=0)


def _check_dropout(rank: int, world_size: int, seed: int) -> None:
    """Dropout reaches the other ranks' global tokens too, and stays unbiased after the merge."""
    torch.manual_seed(seed)
    S, b, draws, p = 5 * world_size, 5, 300, 0.25
    q, k, v = (torch.randn(1, 2, S, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(1, S, dtype=torch.bool)
    mask[0, :b] = False  # rank 0 holds one block, all padding: its rows see other ranks' tokens alone
    exact = global_attention(q, k, v, b, key_mask=mask)
    shard = slice(rank * b, (rank + 1) * b)
    torch.manual_seed(seed + 1 + rank)  # each rank its own dropout draws
    outs = torch.stack(
        [
            context_parallel_attention(
                q[:, :, shard], k[:, :, shard], v[:, :, shard], b, key_mask=mask[:, shard], dropout_p=p
            )
            for _ in range(draws)
        ]
    )
    if rank == 0:
        assert outs.std(0).min() > 0, "dropout left the rows that see only other ranks' tokens unchanged"
    # Each entry's mean over the draws is within 6 standard errors of the exact output.
    error = (outs.mean(0) - exact[:, :, shard]).abs()
    assert (error <= 6 * outs.std(0) / draws**0.5 + 1e-12).all(), f"rank {rank}: dropout is biased"


def _check_dropout_gradient(rank: int, world_size: int, seed: int) -> None:
    """Backward drops what forward dropped: with the draws fixed by a seed, the query gradient
    matches finite differences (queries reach only their own rank's output, so the check is local)."""
    b = 3  # two blocks a rank: a query sees two other-rank tokens, so their dropout shapes its gradient
    q = torch.randn(1, 2, 2 * b, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 2 * b, 4, dtype=torch.float64) for _ in range(2))

    def attend(query):
        torch.manual_seed(seed + rank)  # the same draws on every call
        return context_parallel_attention(query, k, v, b, dropout_p=0.3)

    assert torch.autograd.gradcheck(attend, (q,), fast_mode=True)


def _job_two_ranks(rank: int, world_size: int, seed: int) -> None:
    for index, case in enumerate(CASES):
        _check_case(rank, world_size, seed + index, case)
    _check_refusals(rank, world_size)
    _check_unshard_gradient(rank, world_size)
    _check_dropout(rank, world_size, seed)
    _check_dropout_gradient(rank, world_size, seed)


def _job_four_ranks(rank: int, world_size: int, seed: int) -> None:
    for index, case in enumerate(CASES):
        _check_case(rank, world_size, seed + index, case)
    _check_refusals(rank, world_size)
    _check_layer_context_and_data_parallel(rank, world_size, seed)


def _check_layer_context_and_data_parallel(rank: int, world_size: int, seed: int) -> None:
    """GlobalAttention on a (2 data parallel) x (2 context parallel) grid equals one process."""
    with pytest.raises(ValueError, match="context_parallel_size must be a positive int dividing world_size=4"):
        context_parallel_groups(3)
    groups = context_parallel_groups(2, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    sequence = dist.get_rank(groups.data_parallel)  # which batch slice this rank's CP group holds
    assert dist.get_process_group_ranks(groups.context_parallel) == [2 * sequence, 2 * sequence + 1]
    for causal in (False, True):
        torch.manual_seed(seed + causal)
        layer = GlobalAttention(16, 4, block_size=4, num_kv_heads=2, causal=causal, dtype=torch.float64)
        x = torch.randn(4, 30, 16, dtype=torch.float64, requires_grad=True)  # 2 sequences per CP group
        padding = (torch.rand(4, 30) < 0.2) if not causal else None  # True = padding, as in nn.MultiheadAttention
        grad_out = torch.randn(4, 30, 16, dtype=torch.float64)
        exact, _ = layer(x, padding)
        exact_grads = torch.autograd.grad(exact, (x, *layer.parameters()), grad_out)

        rows = slice(2 * sequence, 2 * sequence + 2)
        mine = shard_range(30, 4, dist.get_rank(groups.context_parallel), 2, causal=causal)
        cols = slice(mine.start, mine.stop)
        x_s = x.detach()[rows, cols].clone().requires_grad_()
        layer.context_parallel_group = groups.context_parallel
        out, _ = layer(x_s, None if padding is None else padding[rows, cols])
        layer.context_parallel_group = None
        grads = torch.autograd.grad(out, (x_s, *layer.parameters()), grad_out[rows, cols])
        for grad in grads[1:]:  # every rank's parameter gradient is partial: sum over the world
            dist.all_reduce(grad)

        where = f"rank {rank}, causal={causal}"
        torch.testing.assert_close(out, exact[rows, cols], rtol=0, atol=TOLERANCE, msg=lambda m, w=where: f"{w}: {m}")
        torch.testing.assert_close(grads[0], exact_grads[0][rows, cols], rtol=0, atol=TOLERANCE)
        for (name, _), got, want in zip(layer.named_parameters(), grads[1:], exact_grads[1:]):
            message = f"{where}: grad {name}"
            torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE, msg=lambda m, w=message: f"{w}: {m}")


def test_two_ranks_match_one_process(seed, tmp_path):
    _spawn(_job_two_ranks, 2, seed, store=tmp_path / "store")


def test_four_ranks_and_the_layer_on_a_2x2_grid_match_one_process(seed, tmp_path):
    _spawn(_job_four_ranks, 4, seed, store=tmp_path / "store")


# ---------------------------------------------------------------------------------------------
# A rank that dies, or hangs, fails the others within the group's timeout

SHORT_TIMEOUT_S = 2.0


def _job_lost_rank(rank: int, world_size: int, how: str, forward_done, verdict_done) -> None:
    q, k, v = (torch.randn(1, 2, 10, 4, requires_grad=True) for _ in range(3))
    out = context_parallel_attention(q, k, v, 5)  # both ranks take part in forward...
    if rank == 1:  # ...then rank 1 is lost before backward
        forward_done.wait(JOB_TIMEOUT_S)  # not while rank 0 may still be reading its last message
        if how == "dies":
            os._exit(0)  # no clean-up at all, as in a crash
        verdict_done.wait(JOB_TIMEOUT_S)  # alive, but never joins backward's collective
        return
    forward_done.set()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="context parallel: the reduce-scatter .* failed on rank 0 of 2"):
        out.sum().backward()
    verdict_done.set()
    assert time.monotonic() - start < SHORT_TIMEOUT_S + 2.0


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_lost_rank_fails_the_others_with_a_clear_error(how, tmp_path):
    events = [mp.get_context(START_METHOD).Event() for _ in range(2)]
    _spawn(_job_lost_rank, 2, how, *events, store=tmp_path / "store", group_timeout_s=SHORT_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# Process launching


def _spawn(job, world_size: int, *args, store, group_timeout_s: float = GROUP_TIMEOUT_S) -> None:
    """Run ``job(rank, world_size, *args)`` on ``world_size`` fresh gloo processes; fail on any
    rank's exception (its traceback is shown) or if the job outlives JOB_TIMEOUT_S."""
    # A fork server that has imported torch and this module once starts each rank in a fraction
    # of a second; "spawn" would import torch again in every rank, ten times slower on shared cores.
    mp.set_forkserver_preload(["torch", __name__])
    context = mp.start_processes(
        _rank_main,
        args=(world_size, str(store), group_timeout_s, job, args),
        nprocs=world_size,
        join=False,
        start_method=START_METHOD,
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{job.__name__} on {world_size} processes ran past {JOB_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _rank_main(rank: int, world_size: int, store: str, group_timeout_s: float, job, args) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections: loopback only
    torch.set_num_threads(1)  # the machine's cores are shared by all ranks
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",  # a fresh file per job: no port to race for
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=group_timeout_s),
    )
    try:
        job(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
