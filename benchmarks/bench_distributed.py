"""Context-parallel global-token attention: bytes and time per layer, measured; and the scaling model.

    python benchmarks/bench_distributed.py               # gloo, 2 and 4 CPU processes, S = 4k and 16k
    python benchmarks/bench_distributed.py --quick       # a smoke run
    python benchmarks/bench_distributed.py --model       # docs/scaling.md's tables (no processes)

    # GPUs (NCCL), one process per GPU; here 16 nodes of 8 (run the same line on every node):
    torchrun --nnodes=16 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD_NODE:29500 \\
        benchmarks/bench_distributed.py --seq 1048576 --block-size 1024 --heads 32 --kv-heads 8 \\
        --head-dim 128 --dtype bfloat16 --out benchmarks/results/distributed-nccl.json

For each world size P and sequence length S, one attention layer (B=1, bidirectional), every rank
holding its shard (``shard_range``):

- a correctness gate first: on a small sequence, every rank's context-parallel output and
  gradients equal its slice of the single-process result; no timing is reported otherwise;
- bytes each rank sends per layer, forward + backward, counted from the tensors handed to the
  collectives (ring algorithms: an all-gather sends (P-1) x its input, a reduce-scatter (P-1)/P);
- ring attention's bytes for the same shards (its K and V go round the ring in forward; K, V and
  their gradients in backward), and the time of that traffic on the same backend, run as plain
  collectives (a communication baseline: no dense attention is computed); the same for this
  scheme's global tokens alone;
- the median step time (forward + backward, the slowest rank), the part of it spent in collectives
  (waiting for a slower rank included), and the single-process time of the whole sequence.

Writes benchmarks/results/distributed-cpu.json (``--out`` to change).  Without torchrun it starts
its own gloo processes on this machine, talking over 127.0.0.1 only, one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common
import globalattn.distributed as cp
from globalattn import cost, global_attention, spec

RESULTS = Path(__file__).parent / "results"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="process counts (without torchrun)")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--single-max", type=int, default=1 << 16, help="longest S to time on one process")
    parser.add_argument("--backend", default=None, help="default: nccl with CUDA, else gloo")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--model", action="store_true", help="print the scaling model of docs/scaling.md and exit")
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed-cpu.json")
    args = parser.parse_args()
    if args.model:
        print_scaling_model()
        return
    if args.quick:
        args.seq, args.reps = [1024, 2048], 2

    if "RANK" in os.environ:  # launched by torchrun: this process is one rank of the world
        rows = _run_rank(args, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), store=None)
        if rows is not None:
            _report(args, rows)
        return
    rows = []
    for world in args.world:
        with tempfile.TemporaryDirectory() as scratch:
            result = Path(scratch) / "rows.json"
            mp.start_processes(
                _spawned_rank, args=(world, args, scratch, result), nprocs=world, start_method="spawn", join=True
            )
            rows += json.loads(result.read_text())
    _report(args, rows)


def _spawned_rank(rank: int, world: int, args, scratch: str, result: Path) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)  # the ranks share this machine's cores
    rows = _run_rank(args, rank, world, store=f"file://{scratch}/store")
    if rows is not None:
        common.write_json(result, rows)


def _run_rank(args, rank: int, world: int, store: str | None) -> list[dict] | None:
    """Every measurement on this rank; rank 0 returns the rows, the others None."""
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = args.backend or ("nccl" if device.type == "cuda" else "gloo")
    init = dict(init_method=store) if store else {}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=5), **init)
    meter = _Meter(device)
    cp._all_gather_single = meter.wrap("all-gather", cp._all_gather_single, world)
    cp._reduce_scatter_single = meter.wrap("reduce-scatter", cp._reduce_scatter_single, world)
    try:
        _correctness_gate(args, rank, world, device)
        rows = [_measure(args, meter, rank, world, seq, device) for seq in args.seq]
    finally:
        dist.destroy_process_group()
    return rows if rank == 0 else None


def _correctness_gate(args, rank: int, world: int, device) -> None:
    """On a small sequence with a ragged tail: context parallel == one process, output and gradients."""
    block, dtype = 16, torch.float64 if device.type == "cpu" else torch.float32
    seq = 3 * world * block + 5
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (
        torch.randn(1, h, seq, 16, generator=generator, dtype=dtype).to(device) for h in (4, 2, 2, 4)
    )  # grouped-query: 4 query heads over 2 key/value heads
    exact = common.output_and_grads(partial(global_attention, block_size=block), q, k, v, grad_out)
    own = cp.shard_range(seq, block, rank, world)
    shard = slice(own.start, own.stop)
    parts = [x[:, :, shard] for x in (q, k, v, grad_out)]
    context_parallel = common.output_and_grads(partial(cp.context_parallel_attention, block_size=block), *parts)
    error = max(common.max_abs_errors(context_parallel, [x[:, :, shard] for x in exact]))
    errors = [0.0] * world
    dist.all_gather_object(errors, error)
    if max(errors) > (1e-10 if dtype == torch.float64 else 1e-4):
        sys.exit(f"correctness gate failed: largest error by rank {errors}")
    if rank == 0:
        print(f"correctness gate on {world} ranks: context parallel == one process (largest error {max(errors):.1e})")


def _measure(args, meter, rank: int, world: int, seq: int, device) -> dict:
    dtype, block = DTYPES[args.dtype], args.block_size
    mine = cp.shard_range(seq, block, rank, world)
    generator = torch.Generator().manual_seed(rank)  # each rank draws its own shard
    shapes = [(1, h, len(mine), args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads)]
    q, k, v = (torch.randn(s, generator=generator).to(device, dtype).requires_grad_() for s in shapes)
    grad_out = torch.randn_like(q)

    def step():
        out = cp.context_parallel_attention(q, k, v, block)
        out.backward(grad_out)

    step_s, comm_s, sent = _time_steps(meter, step, args.reps, device)
    tokens = k.new_empty(1, args.kv_heads, spec.num_blocks(len(mine), block, "merge"), 2 * args.head_dim + 1)
    tokens_s = _time_steps(meter, lambda: _global_token_traffic(tokens), args.reps, device)[1]
    ring_s, ring_sent = _time_steps(meter, lambda: _ring_attention_traffic(k, v), args.reps, device)[1:]
    step_times = [None] * world
    dist.all_gather_object(step_times, (step_s, comm_s))
    step_s, comm_s = max(step_times)  # a step lasts as long as its slowest rank

    single_s = math.nan
    if rank == 0 and seq <= args.single_max:
        whole = [torch.randn(s[:2] + (seq,) + s[3:], device=device, dtype=dtype, requires_grad=True) for s in shapes]
        step_whole = {"single": lambda: global_attention(*whole, block).backward(torch.randn_like(whole[0]))}
        single_s = common.median_seconds(step_whole, device, reps=3)["single"]
    dist.barrier()
    return {
        "world": world,
        "seq": seq,
        "block_size": block,
        "global_tokens": spec.num_blocks(seq, block, "merge"),
        "sent_bytes_per_rank": sent,
        "ring_sent_bytes_per_rank": ring_sent,
        "step_ms": step_s * 1e3,
        "comm_ms": comm_s * 1e3,
        "tokens_comm_ms": tokens_s * 1e3,
        "ring_comm_ms": ring_s * 1e3,
        "single_process_ms": single_s * 1e3,
    }


def _global_token_traffic(tokens) -> None:
    """This scheme's traffic alone, as plain collectives: the packed global tokens (B, Hkv, G_rank,
    D + Dv + 1) all-gathered, and their gradient reduce-scattered."""
    world = dist.get_world_size()
    gathered = tokens.new_empty(world * tokens.shape[0], *tokens.shape[1:])
    cp._all_gather_single(gathered, tokens)
    cp._reduce_scatter_single(torch.empty_like(tokens), gathered)


def _ring_attention_traffic(key, value) -> None:
    """The bytes ring attention moves for these shards, as plain collectives: forward passes every
    rank's K and V to every other rank (an all-gather's volume); backward passes K and V again and
    reduces their gradients back to their owners (a reduce-scatter)."""
    world = dist.get_world_size()
    for _ in range(2):  # forward, and again in backward
        for x in (key, value):
            x = x.detach().contiguous()
            cp._all_gather_single(x.new_empty(world * x.shape[0], *x.shape[1:]), x)
    for x in (key, value):
        grads = x.detach().repeat(world, 1, 1, 1)
        cp._reduce_scatter_single(torch.empty_like(x), grads)


def _time_steps(meter, fn, reps: int, device) -> tuple[float, float, int]:
    """Median seconds of ``fn``, median seconds inside collectives, and bytes sent, per call."""
    fn()  # warm-up
    steps, comms = [], []
    for _ in range(reps):
        dist.barrier()
        meter.reset()
        steps.append(common.seconds(fn, device))
        comms.append(meter.seconds)
    return statistics.median(steps), statistics.median(comms), meter.sent_bytes


class _Meter:
    """Wraps a collective to add up the bytes each rank sends (ring algorithms) and the time spent."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sent_bytes, self.seconds = 0, 0.0

    def wrap(self, kind: str, collective, world: int):
        def measured(output, input, **options):
            size = input.numel() * input.element_size()
            self.sent_bytes += (world - 1) * size if kind == "all-gather" else (world - 1) * size // world
            start = time.perf_counter()
            collective(output, input, **options)
            common.sync(self.device)
            self.seconds += time.perf_counter() - start

        return measured


def _report(args, rows: list[dict]) -> None:
    machine = common.machine()
    load = os.getloadavg()[1]  # the cores may be shared: the 5-minute load says how busy they were
    print(f"\nmachine: {machine}, load average {load:.1f} over the last 5 minutes")
    print(f"B=1 H={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype}, bidirectional, times per layer")
    header = (
        f"{'P':>3} {'S':>6} {'b':>4} {'G':>4} | {'sent/rank KB':>12} {'ring KB':>9} {'ratio':>6} | "
        f"{'step ms':>8} {'in comm':>8} {'1 process':>9} | {'tokens ms':>9} {'ring ms':>8}"
    )
    print(header + "\n" + "-" * len(header))
    for row in rows:
        print(
            f"{row['world']:>3} {row['seq']:>6} {row['block_size']:>4} {row['global_tokens']:>4} | "
            f"{row['sent_bytes_per_rank'] / 1e3:>12.1f} {row['ring_sent_bytes_per_rank'] / 1e3:>9.1f} "
            f"{row['ring_sent_bytes_per_rank'] / row['sent_bytes_per_rank']:>5.0f}x | {row['step_ms']:>8.1f} "
            f"{row['comm_ms']:>8.1f} {row['single_process_ms']:>9.1f} | {row['tokens_comm_ms']:>9.2f} "
            f"{row['ring_comm_ms']:>8.2f}"
        )
    config = dict(batch=1, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype)
    report = {"machine": machine, "load_average_5min": load, **config, "rows": rows}
    common.write_json(args.out, report)
    print(f"\nwrote {args.out}")


# ---------------------------------------------------------------------------------------------
# The scaling model of docs/scaling.md

MODEL = {
    # a 7B-class model in bf16
    "heads": 32,
    "kv_heads": 8,
    "head_dim": 128,
    "layers": 32,
    "element_bytes": 2,
    # attention FLOP/s one H100 sustains with a fused kernel (forward and backward alike)
    "flops": 400e12,
    # 8 GPUs a node on NVLink 4; between nodes 400 Gb/s InfiniBand per GPU
    "node_gpus": 8,
    "nvlink_bytes_s": 450e9,
    "network_bytes_s": 50e9,
    # latency of one step of a ring collective (P - 1 steps each)
    "nvlink_step_s": 3e-6,
    "network_step_s": 10e-6,
}


def scaling_row(seq: int, world: int, block: int, m: dict = MODEL) -> dict:
    """Per GPU and per layer (B=1, bidirectional, forward + backward): bytes sent, FLOPs and seconds,
    for ring attention (dense) and for this scheme."""
    kv_bytes = m["kv_heads"] * 2 * m["head_dim"] * m["element_bytes"]  # one position's K and V
    blocks = seq // block
    shard = seq / world
    inside_node = world <= m["node_gpus"]
    bandwidth = m["nvlink_bytes_s"] if inside_node else m["network_bytes_s"]
    step = m["nvlink_step_s"] if inside_node else m["network_step_s"]
    # Ring attention: K, V round the ring in forward; K, V and dK, dV in backward.
    ring_bytes = 3 * (world - 1) * shard * kv_bytes
    ring_flops = 3.5 * 4 * shard * seq * m["head_dim"] * m["heads"]  # backward = 2.5 x forward
    # This scheme: the shard lengths (8 bytes a rank), the tokens (one more channel: presence)
    # all-gathered, their gradients reduce-scattered; three collectives of P - 1 ring steps each.
    token_bytes = (blocks / world) * m["kv_heads"] * (2 * m["head_dim"] + 1) * m["element_bytes"]
    ours_bytes = (world - 1) * (8 + 2 * token_bytes)
    ours_flops = 3.5 * 4 * shard * (block + blocks) * m["head_dim"] * m["heads"]
    ours_comm_s = 3 * (world - 1) * step + ours_bytes / bandwidth
    return dict(
        seq=seq, world=world, block=block, shard=shard, ring_bytes=ring_bytes, ours_bytes=ours_bytes,
        ring_compute_s=ring_flops / m["flops"], ring_comm_s=ring_bytes / bandwidth,
        ours_compute_s=ours_flops / m["flops"], ours_comm_s=ours_comm_s,
    )  # fmt: skip


def model_block_size(seq: int, world: int) -> int:
    """The power of two with the fewest attended pairs (b ~ sqrt(S)), at most one GPU's shard; at a
    tie the larger, which sends half as many global tokens for the same FLOPs."""
    return cost.best_block_size(seq, candidates=cost.powers_of_two(seq // world), larger_at_tie=True)


def print_scaling_model() -> None:
    m = MODEL
    print(f"model: {m}\n")
    print(
        "| S | GPUs | b | tokens/GPU | ring MB/GPU/layer | ours KB/GPU/layer | ring / ours | ring GB/GPU/step "
        "| ours MB/GPU/step | ring compute ms | ring comm ms | ours compute ms | ours comm ms |"
    )
    print("|" + "---:|" * 13)
    for seq in (1 << 17, 1 << 19, 1 << 20, 1 << 22):
        for world in (8, 64, 256, 1024):
            r = scaling_row(seq, world, model_block_size(seq, world))
            print(
                f"| {_tokens(seq)} | {world} | {r['block']} | {r['shard']:,.0f} | {r['ring_bytes'] / 1e6:,.0f} | "
                f"{r['ours_bytes'] / 1e3:,.1f} | {r['ring_bytes'] / r['ours_bytes']:,.0f}x | "
                f"{r['ring_bytes'] * m['layers'] / 1e9:,.1f} | {r['ours_bytes'] * m['layers'] / 1e6:,.2f} | "
                f"{r['ring_compute_s'] * 1e3:,.2f} | {r['ring_comm_s'] * 1e3:,.2f} | "
                f"{r['ours_compute_s'] * 1e3:,.3f} | {r['ours_comm_s'] * 1e3:,.3f} |"
            )
    print("\nCrossovers (per layer):")
    ring_hidden = {
        name: m["flops"]
        * m["kv_heads"]
        * 2
        * m["head_dim"]
        * m["element_bytes"]
        / (4 * m["head_dim"] * m["heads"] * bw)
        for name, bw in (("NVLink", m["nvlink_bytes_s"]), ("network", m["network_bytes_s"]))
    }
    print(f"- ring attention hides its traffic behind compute from {ring_hidden} tokens per GPU up")
    for seq in (1 << 17, 1 << 19, 1 << 20, 1 << 22):
        print(f"- S = {_tokens(seq)}: this scheme's communication exceeds its compute from {_crossover(seq)} GPUs up")


def _crossover(seq: int) -> int | None:
    """The fewest GPUs (a power of two) at which this scheme's communication outlasts its compute."""
    for world in (2**i for i in range(1, 17)):
        row = scaling_row(seq, world, model_block_size(seq, world))
        if row["ours_comm_s"] > row["ours_compute_s"]:
            return world
    return None


def _tokens(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}k"


if __name__ == "__main__":
    main()
