"""CPU benchmark: global-token attention (the blocked PyTorch backend) against dense SDPA.

    python benchmarks/bench_cpu.py            # the README's table: S = 1k..32k, memory to 64k
    python benchmarks/bench_cpu.py --quick    # a smoke run with small sizes

Float32, B=1, H=8, D=64, b=128 by default.  For each sequence length, bidirectional and causal,
forward and forward+backward: the median time of global attention with the block rule, of global
attention with a window of w raw keys (``--window``, default 128), of global attention routed to
the k best blocks (``--top-blocks``, default 2; 0 leaves it out) and of dense SDPA, timed side by
side; the speed-ups over dense, the routed time over the block rule's, and the block rule's useful
FLOP rate (``globalattn.cost``: forward 4 * D per attended pair and head, backward 2.5x forward, as
flash-attention counts).  Then the extra peak memory of forward+backward, measured in a fresh
process per point (peak RSS after minus before the call).  Then packed documents: the same S tokens
as one document and as documents of ``--doc-lengths`` tokens (``document_ids``), forward+backward,
timed side by side.  Then a busy machine: at S = ``--busy-seq`` (0 skips it), forward+backward,
the block rule and dense timed side by side on a quiet machine, then again while one pure-Python
busy loop that the benchmark starts (and stops) competes for a core: each one's slow-down, and how
much of the quiet speed-up is left.  A correctness gate runs first: no speed is reported for a
wrong result.  A baseline that cannot run (too long) records nan.  Writes
benchmarks/results/cpu.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from globalattn import cost, global_attention

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--memory-seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--dense-max", type=int, default=32768, help="longest S to time dense SDPA at")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--window", type=int, default=128, help="w of the window rows (global_attention(window=w))")
    parser.add_argument(
        "--top-blocks", type=int, default=2, help="k of the routed column (global_attention(top_blocks=k)); 0: none"
    )
    parser.add_argument("--packed-seq", type=int, default=8192, help="S of the packed-documents rows")
    parser.add_argument("--doc-lengths", type=int, nargs="+", default=[2048, 512, 128, 37])
    parser.add_argument("--busy-seq", type=int, default=8192, help="S of the busy-machine rows; 0: none")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu.json")
    parser.add_argument("--measure-memory", nargs=4, metavar=("IMPL", "S", "CAUSAL", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory:
        impl, seq, causal, which = args.measure_memory
        print(json.dumps(_extra_peak_bytes(args, impl, int(seq), causal == "1", which)))
        return
    if args.quick:
        args.seq, args.memory_seq, args.dense_max, args.packed_seq = [512, 1024, 2048], [2048, 4096], 2048, 2048
        args.busy_seq = min(args.busy_seq, 2048)

    torch.manual_seed(0)
    _correctness_gate(args)
    machine = common.machine()
    print(f"machine: {machine}; torch threads: {torch.get_num_threads()}\n")

    timings = []
    impls, fast = _impls(args), _impls(args)[:-1]  # fast: all but dense
    title = {"routed": f"top{args.top_blocks}"}  # the routed column's title says its k
    widths = (10, 8, *((11,) if args.top_blocks else ()), 7)
    titles = [[f"{title.get(i, i)} ms" for i in impls], [f"{title.get(i, i)} x" for i in fast]]
    titles += [[f"{title['routed']}/global"]] if args.top_blocks else []
    header = f"{'S':>6} {'mode':>7} {'pass':>8} | " + _cells([*titles, ["GFLOP/s"]], widths)
    print(header + "\n" + "-" * len(header))
    for seq in args.seq:
        for causal in (False, True):
            for which in ("fwd", "fwd+bwd"):
                row = _time_point(args, seq, causal, which)
                timings.append(row)
                cells = [[f"{row[i + '_ms']:.1f}" for i in impls], [f"{row[SPEEDUP_KEY[i]]:.1f}x" for i in fast]]
                cells += [[f"{row['routed_vs_global']:.2f}x"]] if args.top_blocks else []
                mode = "causal" if causal else "bidir"
                print(f"{seq:>6} {mode:>7} {which:>8} | " + _cells([*cells, [f"{row['global_gflops']:.1f}"]], widths))

    memory = []
    print(f"\n{'S':>6} {'impl':>7} | {'extra peak MB (fwd+bwd, bidir)':>31} {'MB per 1k tokens':>17}")
    for seq in args.memory_seq:
        for impl in ("global", "window", "dense"):
            if impl == "dense" and seq > args.dense_max:
                continue
            extra = _measure_in_subprocess(args, impl, seq)
            memory.append({"seq": seq, "impl": impl, "extra_peak_bytes": extra})
            print(f"{seq:>6} {impl:>7} | {extra / 2**20:>31.1f} {extra / 2**20 / (seq / 1024):>17.2f}")

    packed = _time_packed(args)
    busy = _time_busy(args) if args.busy_seq else []

    config = {k: getattr(args, k) for k in ("heads", "head_dim", "block_size", "window", "top_blocks")}
    report = {"machine": machine, "dtype": "float32", "batch": 1, **config, "timings": timings, "memory": memory}
    report["packed"] = packed
    report["busy"] = busy
    common.write_json(args.out, report)
    print(f"\nwrote {args.out}")


SPEEDUP_KEY = {"global": "speedup", "window": "window_speedup", "routed": "routed_speedup"}  # the JSON's keys


def _impls(args) -> tuple[str, ...]:
    """What the main table times, in its columns' order: dense last, the routed column only when asked for."""
    return ("global", "window", *(("routed",) if args.top_blocks else ()), "dense")


def _cells(groups: list[list[str]], widths: tuple[int, ...]) -> str:
    """One line of the main table: each group's cells right-aligned to its width, groups between bars."""
    return " | ".join(" ".join(f"{cell:>{width}}" for cell in group) for group, width in zip(groups, widths))


def _inputs(args, seq, requires_grad):
    shape = (1, args.heads, seq, args.head_dim)
    return [torch.randn(shape, requires_grad=requires_grad) for _ in range(3)]


def _run(impl, args, q, k, v, causal, grad_out=None):
    if impl == "dense":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        window = args.window if impl == "window" else None
        top_blocks = args.top_blocks if impl == "routed" else 0
        out = global_attention(
            q, k, v, args.block_size, causal=causal, window=window, top_blocks=top_blocks, backend="torch"
        )
    if grad_out is not None:
        out.backward(grad_out)
    return out


def _correctness_gate(args) -> None:
    """Blocked against the dense reference backend, forward and backward, before any timing."""
    seq = 1000  # not a multiple of the block size on purpose
    routings = sorted({0, args.top_blocks})
    for causal in (False, True):
        for window in (None, args.window):
            for top_blocks in routings:  # with the window too: the raw keys are then the union of both
                inputs = [torch.randn(1, args.heads, seq, args.head_dim) for _ in range(4)]  # q, k, v, upstream grad
                options = dict(block_size=args.block_size, causal=causal, window=window, top_blocks=top_blocks)
                blocked, reference = (
                    common.output_and_grads(partial(global_attention, **options, backend=backend), *inputs)
                    for backend in ("torch", "reference")
                )
                errors = common.max_abs_errors(blocked, reference)
                if max(errors) > 1e-4:
                    sys.exit(f"correctness gate failed ({options}): max errors out/dq/dk/dv = {errors}")
    routed = f", top_blocks {routings}" if args.top_blocks else ""
    print(
        "correctness gate: blocked == reference (forward and backward, bidirectional and causal, block and window"
        f"{routed})"
    )


def _time_point(args, seq, causal, which) -> dict:
    q, k, v = _inputs(args, seq, requires_grad=which == "fwd+bwd")
    grad_out = torch.randn_like(q) if which == "fwd+bwd" else None
    flops, window_flops = (
        cost.attention_flops(
            cost.attended_pairs(seq, args.block_size, causal=causal, window=window), args.head_dim, heads=args.heads,
            passes=which,
        )
        for window in (None, args.window)
    )  # fmt: skip
    calls = {impl: (lambda impl=impl: _run(impl, args, q, k, v, causal, grad_out)) for impl in _impls(args)}
    if seq > args.dense_max:
        del calls["dense"]
    seconds = common.median_seconds(calls, reps=7, budget_s=30.0)
    global_s, window_s, dense_s = seconds["global"], seconds["window"], seconds.get("dense", math.nan)
    row = {
        "seq": seq,
        "causal": causal,
        "pass": which,
        "global_ms": global_s * 1e3,
        "window_ms": window_s * 1e3,
        "dense_ms": dense_s * 1e3,
        "speedup": dense_s / global_s,
        "window_speedup": dense_s / window_s,
        "useful_flops": flops,
        "global_gflops": flops / global_s / 1e9,
        "window_useful_flops": window_flops,
        "window_gflops": window_flops / window_s / 1e9,
    }
    if "routed" in seconds:  # the target: at most 1.5x the block rule at S = 8192, fwd+bwd
        routed_s = seconds["routed"]
        row.update(routed_ms=routed_s * 1e3, routed_speedup=dense_s / routed_s, routed_vs_global=routed_s / global_s)
    return row


def _time_packed(args) -> list[dict]:
    """fwd+bwd of S tokens as one document and as documents of each length, side by side."""
    seq = args.packed_seq
    print(f"\npacked documents, S = {seq}, fwd+bwd: ms, and / one document's")
    q, k, v = _inputs(args, seq, requires_grad=True)
    grad_out = torch.randn_like(q)
    rows = []
    for causal in (False, True):
        layouts = {"one": None, **{str(n): (torch.arange(seq) // n)[None] for n in args.doc_lengths}}

        def run(ids, causal=causal):
            global_attention(q, k, v, args.block_size, causal=causal, document_ids=ids, backend="torch").backward(
                grad_out
            )

        calls = {name: (lambda ids=ids: run(ids)) for name, ids in layouts.items()}
        seconds = common.median_seconds(calls, reps=5, budget_s=30.0)
        for name, s in seconds.items():
            row = {"seq": seq, "causal": causal, "doc_length": None if name == "one" else int(name), "ms": s * 1e3}
            row["vs_one_document"] = s / seconds["one"]
            rows.append(row)
            mode = "causal" if causal else "bidir"
            print(f"{mode:>7} docs of {name:>5}: {s * 1e3:8.1f} ms  {row['vs_one_document']:5.2f}x")
    return rows


def _time_busy(args) -> list[dict]:
    """fwd+bwd of the block rule and dense side by side, on a quiet machine and then with one busy
    process competing for a core: how much of the speed-up survives a shared machine."""
    seq = args.busy_seq
    print(f"\nbusy machine, S = {seq}, fwd+bwd: ms quiet and with one busy process, the speed-up over dense")
    header = (
        f"{'mode':>7} | {'global ms':>9} {'busy':>8} {'slower':>6} | {'dense ms':>9} {'busy':>8} {'slower':>6} | "
        f"{'quiet x':>7} {'busy x':>7} {'busy/quiet':>10}"
    )
    print(header + "\n" + "-" * len(header))
    q, k, v = _inputs(args, seq, requires_grad=True)
    grad_out = torch.randn_like(q)
    rows = []
    for causal in (False, True):
        calls = {
            impl: (lambda impl=impl, causal=causal: _run(impl, args, q, k, v, causal, grad_out))
            for impl in ("global", "dense")
        }
        quiet = common.median_seconds(calls, reps=5, budget_s=30.0)
        # Twice what the warm-up turn and the budget's turns take at a 5x slow-down; the loop ends by
        # itself should this process die without stopping it.
        with _busy_process(max_s=2 * (30.0 + 5 * sum(quiet.values()))) as busy_loop:
            busy = common.median_seconds(calls, reps=5, budget_s=30.0)
            if busy_loop.poll() is not None:
                sys.exit("busy machine: the busy process ended before the timing did (raise its max_s)")
        quiet_x, busy_x = quiet["dense"] / quiet["global"], busy["dense"] / busy["global"]
        row = {"seq": seq, "causal": causal, "pass": "fwd+bwd"}
        for impl in calls:
            row.update({f"quiet_{impl}_ms": quiet[impl] * 1e3, f"busy_{impl}_ms": busy[impl] * 1e3})
            row[f"{impl}_slowdown"] = busy[impl] / quiet[impl]
        # the target: a busy speed-up of at least 0.7 of the quiet one
        row.update(quiet_speedup=quiet_x, busy_speedup=busy_x, busy_vs_quiet=busy_x / quiet_x)
        rows.append(row)
        times = (f"{quiet[i] * 1e3:>9.1f} {busy[i] * 1e3:>8.1f} {row[i + '_slowdown']:>5.2f}x" for i in calls)
        print(
            f"{'causal' if causal else 'bidir':>7} | {' | '.join(times)} | "
            f"{quiet_x:>6.1f}x {busy_x:>6.1f}x {row['busy_vs_quiet']:>10.2f}"
        )
    return rows


@contextlib.contextmanager
def _busy_process(max_s: float):
    """One pure-Python busy loop in a process of its own, stopped on leaving; it exits by itself
    after ``max_s`` seconds in any case."""
    loop = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass"
    process = subprocess.Popen([sys.executable, "-c", loop, str(max_s)])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _measure_in_subprocess(args, impl, seq) -> int:
    command = [sys.executable, __file__, "--measure-memory", impl, str(seq), "0", "fwd+bwd"]
    command += ["--heads", str(args.heads), "--head-dim", str(args.head_dim), "--block-size", str(args.block_size)]
    command += ["--window", str(args.window)]
    return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def _extra_peak_bytes(args, impl, seq, causal, which) -> int:
    """Peak RSS growth of one call, in this fresh process (inputs and warm-up excluded; Linux)."""
    small = _inputs(args, 256, requires_grad=True)
    _run(impl, args, *small, causal, torch.randn_like(small[0]))  # load kernels, allocator pools
    q, k, v = _inputs(args, seq, requires_grad=True)
    grad_out = torch.randn_like(q)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = _proc_status_kib("VmRSS")
    _run(impl, args, q, k, v, causal, grad_out if which == "fwd+bwd" else None)
    return (_proc_status_kib("VmHWM") - before) * 1024


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


if __name__ == "__main__":
    main()
