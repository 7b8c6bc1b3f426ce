"""GPU benchmark: global-token attention (our triton, flex and torch backends) against dense SDPA
(flash and cuDNN), forward, backward and both, bidirectional and causal, on one CUDA GPU.

On one H100/H200, in one call with a 600 s limit (about 4-6 minutes; no new measurement starts after
--budget-s, 360 s by default, so that even a slow compile leaves the run well inside 8 minutes):

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/gpu.py --out "$OUT"
    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/gpu.py --long --out "$OUT"   # + S=256k..1M, ours

then commit the JSON it names (``$OUT/gpu-<gpu>.json``) as ``benchmarks/results/gpu-<gpu>.json``.

    python benchmarks/gpu.py --smoke --out /tmp/gpu-smoke.json   # the whole pipeline on the CPU, tiny sizes

Defaults: bf16, B=1, H=16, D=128; S = 4k, 16k, 64k, 128k at b=128 (the targets' grid), then b ~ sqrt(S)
(the multiple of 64 with the fewest attended pairs; --all-blocks: b in 64, 128, 256 and ~sqrt(S)).
In this order:

1. the bf16 matrix product rate (8192^3), the ceiling the forward's "% of matmul rate" is read against;
2. a correctness gate: each of our backends at S=1000 (an uneven last block; --gate-seq) against
   backend="reference" (--gate-reference torch: the torch backend, whose memory is O(S), for a long gate),
   forward and the gradients of q, k, v for a random upstream gradient, bidirectional and causal:
   in float32 (relative error <= 2e-3, which tf32 dots pass; not with --gate-reference torch) and in
   bf16 against the float32 reference (<= max(3x the error of the reference itself run in bf16, 1e-2)).
   A backend that fails or raises is reported and not timed;
3. the timings: b=128 at every S, longest first, with the dense contenders; with --long, S = 256k,
   512k, 1M for our backends (b=128 and ~sqrt(S)); then the other block sizes.  For each (S, b, mode,
   pass) the contenders take turns: a first call (compile and autotune; its seconds are kept as first_call_s),
   one call with the peak memory tracked (torch.cuda.max_memory_allocated beyond what was allocated
   before: inputs excluded), then --rounds rounds of one sample each, the median reported.  A sample
   is triton.testing.do_bench's median (L2 flushed between calls) for calls under 50 ms, else the
   median of CUDA-event-timed calls.  "fwd" runs without autograd; "bwd" runs the backward of one
   kept forward graph again and again; "fwd+bwd" both.  A contender that raises is recorded as skipped
   with the reason, and the run goes on.

Useful FLOPs (globalattn.cost): ours 4 * D per attended (query, key or global token) pair per head
forward, the pairs of cost.attended_pairs; dense 4 * D * S^2 (causal S(S+1)/2); backward 2.5x forward,
as flash-attention counts.  The JSON (written after every measurement, so that a run cut short keeps
its rows) holds the GPU, versions, config, matmul rate, gate, every row and the issue's targets;
the tables and the targets are printed last.  Without CUDA (and without --smoke) it exits with one
line and code 2.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import common

try:
    from globalattn import cost, global_attention
except ImportError:  # run from a checkout that is not installed: python3 benchmarks/gpu.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from globalattn import cost, global_attention

PROG = "benchmarks/gpu.py"
RESULTS = Path(__file__).parent / "results"
SEQS = (4096, 16384, 65536, 131072)
LONG_SEQS = (262144, 524288, 1048576)
OTHER_BLOCKS = (64, 256)  # --all-blocks, beside --block and ~sqrt(S)
OURS = ("torch", "flex", "triton")
DENSE = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}  # SDPBackend
CONTENDERS = ("sdpa-flash", "sdpa-cudnn", "torch", "flex", "triton")
SMOKE_CONTENDERS = ("sdpa-math", "sdpa-flash", "sdpa-cudnn", "torch")  # those that run on a CPU, and one that raises
MODES = ("bidir", "causal")
PASSES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGET_SEQS = (16384, 65536, 131072)
TARGET_SPEEDUP = 1.5  # triton over flex, fwd and fwd+bwd, both modes
TARGET_MATMUL_FRACTION = 0.5  # triton forward at 128k, b=128, bidirectional
GATE_TOL_FP32 = 2e-3
GROUP_BUDGET_S = 8.0  # rounds are cut so that one (S, b, mode, pass) takes about this long
DO_BENCH_BELOW_MS = 50.0  # longer calls are timed one by one with CUDA events


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny tensors: a second thread only adds rendezvous
    elif not torch.cuda.is_available():
        print(
            f"{PROG}: error: no CUDA device (torch {torch.__version__}); this benchmark needs a GPU "
            "(--smoke runs its pipeline on the CPU at tiny sizes)",
            file=sys.stderr,
        )
        return 2
    else:
        device = torch.device("cuda")
    bench = Bench(args, device)
    bench.run()
    print_tables(bench.report)
    print(f"\nwrote {bench.out}")
    return 0


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    grid = parser.add_argument_group("grid")
    grid.add_argument("--seq", type=_positive, nargs="+", metavar="S", help=f"sequence lengths (default {list(SEQS)})")
    grid.add_argument("--long", action="store_true", help=f"also S = {list(LONG_SEQS)} for our backends alone")
    grid.add_argument("--block", type=_positive, default=128, help="the block size of the targets (default 128)")
    grid.add_argument("--all-blocks", action="store_true", help="b in 64, 128, 256, ~sqrt(S) at every S")
    grid.add_argument(
        "--window", type=_positive, metavar="W", help="our backends with window=W raw keys beside the global tokens"
    )
    grid.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), metavar="MODE", help="bidir, causal")
    grid.add_argument(
        "--passes", nargs="+", choices=PASSES, default=list(PASSES), metavar="PASS", help="fwd, bwd, fwd+bwd"
    )
    grid.add_argument(
        "--contenders",
        nargs="+",
        choices=(*OURS, *DENSE),
        metavar="NAME",
        help=f"of {', '.join((*OURS, *DENSE))} (default: {' '.join(CONTENDERS)})",
    )
    grid.add_argument("--dense-max", type=_positive, default=131072, help="longest S for dense SDPA")
    grid.add_argument("--torch-max", type=_positive, default=131072, help="longest S for the torch backend")
    shape = parser.add_argument_group("shape")
    shape.add_argument("--batch", type=_positive, default=1)
    shape.add_argument("--heads", type=_positive, default=16)
    shape.add_argument("--head-dim", type=_positive, default=128)
    shape.add_argument("--dtype", choices=DTYPES, default="bf16")
    shape.add_argument("--gate-seq", type=_positive, default=1000, help="S of the correctness gate")
    shape.add_argument(
        "--gate-reference",
        choices=("reference", "torch"),
        default="reference",
        help="the gate's float32 reference: the dense reference backend (S^2 memory), or the torch backend "
        "(O(S), for a long gate); with torch, ours are gated in the timed dtype alone",
    )
    timing = parser.add_argument_group("timing")
    timing.add_argument("--rounds", type=_positive, default=3, help="turns per measurement (fewer for long calls)")
    timing.add_argument("--warmup-ms", type=_positive, default=10, help="do_bench warm-up per sample")
    timing.add_argument("--rep-ms", type=_positive, default=60, help="do_bench repetition time per sample")
    timing.add_argument(
        "--budget-s", type=float, default=360.0, help="start no new measurement after this many seconds"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON file, or a folder for gpu-<gpu>.json (default: results/)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: tests the pipeline")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.seq = args.seq or [256, 512]
        args.block, args.heads, args.head_dim, args.gate_seq = 32, 2, 32, 200
        args.dtype, args.rounds, args.rep_ms = "fp32", 2, 20
        args.contenders = args.contenders or list(SMOKE_CONTENDERS)
    args.seq = args.seq or list(SEQS)
    args.contenders = args.contenders or list(CONTENDERS)
    return args


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def sqrt_block(seq: int) -> int:
    """The multiple of 64 (a whole number of tiles) with the fewest attended pairs: ~sqrt(S), where
    b + S/b, the keys per query, is smallest."""
    return cost.best_block_size(seq, candidates=cost.multiples_of(64, seq))


def plan(args) -> list[tuple[int, int]]:
    """(S, b) in the order they are measured: the targets' grid first, longest S first, so that a run
    cut short by the budget still has the points that matter most; dense SDPA runs at the points with
    b == --block."""
    points = [(seq, args.block) for seq in sorted(args.seq, reverse=True)]
    if args.long:
        points += [(seq, block) for seq in LONG_SEQS for block in (args.block, sqrt_block(seq))]
    for seq in args.seq:
        points += [(seq, block) for block in (*(OTHER_BLOCKS if args.all_blocks else ()), sqrt_block(seq))]
    return list(dict.fromkeys(points))  # in order, once each


# ---------------------------------------------------------------------------------------------
# Contenders: a function (q, k, v) -> out per (name, b, causal), and the useful FLOPs of one pass.


def contender(name: str, block: int | None, causal: bool, window: int | None = None) -> Callable:
    if name in DENSE:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, DENSE[name])

        def dense(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return dense

    def ours(q, k, v):
        return global_attention(q, k, v, block, causal=causal, window=window, backend=name)

    return ours


def useful_flops(
    name: str, seq: int, block: int, causal: bool, which: str, batch_heads: int, head_dim: int, window=None
) -> float:
    pairs = cost.attended_pairs(seq, None if name in DENSE else block, causal=causal, window=window)
    return cost.attention_flops(pairs, head_dim, heads=batch_heads, passes=which)


def pass_call(fn: Callable, which: str, q, k, v, grad_out) -> Callable[[], None]:
    """A call that runs one pass of ``fn``.  For "bwd" the forward runs here, once, and its graph is kept."""
    if which == "fwd":

        def forward():
            with torch.no_grad():
                fn(q, k, v)

        return forward
    if which == "fwd+bwd":
        return lambda: fn(q, k, v).backward(grad_out)
    out = fn(q, k, v)
    return lambda: out.backward(grad_out, retain_graph=True)


# ---------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Milliseconds of a call: triton.testing.do_bench's median for short calls on CUDA, CUDA events
    one call at a time for long ones (or when triton is missing), perf_counter on a CPU."""

    def __init__(self, device: torch.device, warmup_ms: float, rep_ms: float):
        self.device, self.cuda = device, device.type == "cuda"
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.do_bench = None
        if self.cuda:
            try:
                from triton.testing import do_bench

                self.do_bench = do_bench
            except ImportError:
                pass

    def sync(self) -> None:
        common.sync(self.device)

    def once(self, call, grads=()) -> tuple[float, int | None]:
        """One call: its milliseconds, and on CUDA the peak bytes it allocated beyond those already held."""
        for x in grads:
            x.grad = None
        if not self.cuda:
            return common.seconds(call) * 1e3, None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), torch.cuda.max_memory_allocated() - before

    def uses_do_bench(self, estimate_ms: float) -> bool:
        return self.do_bench is not None and estimate_ms < DO_BENCH_BELOW_MS

    def sample(self, call, grads, estimate_ms: float) -> float:
        if self.uses_do_bench(estimate_ms):
            return float(
                self.do_bench(
                    call, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=list(grads), return_mode="median"
                )
            )
        count = max(1, min(10, int(self.rep_ms / max(estimate_ms, 1e-3))))
        return statistics.median(self.once(call, grads)[0] for _ in range(count))

    def sample_cost_s(self, estimate_ms: float) -> float:
        """Rough seconds one sample takes (do_bench: 5 estimate calls, warm-up and repetitions)."""
        if self.uses_do_bench(estimate_ms):
            return (6 * estimate_ms + self.warmup_ms + self.rep_ms) / 1e3
        return max(1, min(10, int(self.rep_ms / max(estimate_ms, 1e-3)))) * estimate_ms / 1e3

    def method(self, estimate_ms: float) -> str:
        if not self.cuda:
            return "perf_counter"
        return "do_bench" if self.uses_do_bench(estimate_ms) else "cuda-events"


# ---------------------------------------------------------------------------------------------
# The run


class Bench:
    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.dtype = DTYPES[args.dtype]
        self.timer = Timer(device, args.warmup_ms, args.rep_ms)
        self.start = time.perf_counter()
        self.unavailable: dict[str, str] = {}  # contender -> why it is not timed
        self._inputs_key, self._inputs = None, None
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
        slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
        default_name = f"gpu-{slug}.json"
        if args.out is None:
            self.out = (Path(tempfile.gettempdir()) if args.smoke else RESULTS) / default_name
        else:
            self.out = args.out / default_name if args.out.is_dir() else args.out
        self.report = {
            "gpu": gpu,
            "device": common.device_info(device),
            "versions": _versions(),
            "argv": args.argv,
            "config": {
                "smoke": args.smoke,
                "dtype": args.dtype,
                "batch": args.batch,
                "heads": args.heads,
                "head_dim": args.head_dim,
                "seqs": args.seq,
                "long": args.long,
                "long_seqs": list(LONG_SEQS) if args.long else [],
                "target_block": args.block,
                "all_blocks": args.all_blocks,
                "modes": args.modes,
                "passes": args.passes,
                "contenders": args.contenders,
                "dense_max": args.dense_max,
                "torch_max": args.torch_max,
                "rounds": args.rounds,
                "warmup_ms": args.warmup_ms,
                "rep_ms": args.rep_ms,
                "budget_s": args.budget_s,
                "timer": "do_bench median below do_bench_below_ms, else CUDA events (perf_counter on a CPU)",
                "do_bench_below_ms": DO_BENCH_BELOW_MS,
                "flops": "ours: 4*D*attended pairs per head (cost.attended_pairs); dense: 4*D*S^2 (causal "
                "S(S+1)/2); backward 2.5x forward",
                "memory": "extra_peak_bytes: torch.cuda.max_memory_allocated during one call minus the bytes "
                "allocated before it (inputs, and for bwd the kept forward graph, excluded)",
                "fwd": "timed under torch.no_grad()",
            },
            "matmul": None,
            "gate": [],
            "rows": [],
            "targets": None,
            "elapsed_s": 0.0,
            "complete": False,
            "stopped": None,
        }

    # --- the phases

    def run(self) -> None:
        torch.manual_seed(self.args.seed)
        if self.device.type == "cuda" and "flex" in self.args.contenders:
            _raise_recompile_limit()
        self.save()
        try:
            self.report["matmul"] = self.matmul_rate()
            self.save()
            self.gate()
            self.save()
            for seq, block, mode, which in self.groups():
                if time.perf_counter() - self.start > self.args.budget_s:
                    self.report["stopped"] = (
                        f"time budget of {self.args.budget_s:g} s spent before S={seq}, b={block}, {mode} {which}"
                    )
                    break
                self.measure(seq, block, mode, which)
                self.save()
            else:
                self.report["complete"] = True
        except _DeviceBroken as broken:
            self.report["stopped"] = f"the device failed, nothing more can run: {broken}"
        if self.report["stopped"]:
            print(f"stopped: {self.report['stopped']}")
        self._inputs = None
        self.report["targets"] = targets(self.report)
        self.save()

    def groups(self):
        """(S, b, mode, pass) in the order they are measured."""
        for seq, block in plan(self.args):
            for mode in self.args.modes:
                for which in self.args.passes:
                    yield seq, block, mode, which

    def matmul_rate(self) -> dict:
        n = 256 if self.args.smoke else 8192
        dtype = self.dtype if self.device.type == "cuda" else torch.float32
        a, b = (torch.randn(n, n, device=self.device, dtype=dtype) for _ in range(2))
        a @ b  # noqa: B018 (warm-up: cuBLAS handle, clocks)
        estimate, _ = self.timer.once(lambda: a @ b)
        times = [self.timer.sample(lambda: a @ b, (), estimate) for _ in range(self.args.rounds)]
        ms = statistics.median(times)
        result = {"n": n, "dtype": str(dtype).removeprefix("torch."), "ms": ms, "tflops": 2 * n**3 / ms / 1e9}
        print(f"matmul {n}^3 {result['dtype']}: {ms:.3f} ms, {_rate(result['tflops'])} TFLOP/s")
        return result

    def gate(self) -> None:
        """Each of our backends against --gate-reference (float32 on the same device), forward and
        gradients, before any timing: no speed is reported for a wrong result."""
        args = self.args
        ours = [name for name in args.contenders if name in OURS]
        low = self.dtype if self.dtype != torch.float32 else torch.bfloat16
        dtypes = (low,) if args.gate_reference == "torch" else (torch.float32, low)
        shape = (1, min(args.heads, 4), args.gate_seq, args.head_dim)
        for causal in (False, True):
            mode = "causal" if causal else "bidir"
            q, k, v, grad_out = (torch.randn(shape, device=self.device) for _ in range(4))
            reference = _forward_backward(args.gate_reference, (q, k, v, grad_out), args, causal, torch.float32)
            naive = _forward_backward(args.gate_reference, (q, k, v, grad_out), args, causal, low)
            naive_errors = [_relative_error(a, r) for a, r in zip(naive, reference)]
            for name in ours:
                if name in self.unavailable:
                    continue
                for dtype in dtypes:
                    entry = {"backend": name, "mode": mode, "dtype": str(dtype).removeprefix("torch.")}
                    try:
                        got = _forward_backward(name, (q, k, v, grad_out), args, causal, dtype)
                    except Exception as error:  # not available (yet), or broken
                        entry |= {"status": "skipped", "reason": _reason(error)}
                        self.report["gate"].append(entry)
                        print(f"gate {name} {mode} {entry['dtype']}: skipped: {entry['reason']}")
                        self.check_device(error)
                        if dtype == self.dtype:  # the timed dtype: not timed either
                            self.unavailable[name] = f"gate: {entry['reason']}"
                        continue
                    errors = [_relative_error(a, r) for a, r in zip(got, reference)]
                    if dtype == torch.float32:
                        tolerances = [GATE_TOL_FP32] * 4
                    else:
                        tolerances = [max(3 * e, 1e-2) for e in naive_errors]
                    passed = all(e <= t for e, t in zip(errors, tolerances))  # NaN fails
                    entry |= {
                        "status": "passed" if passed else "failed",
                        "errors": dict(zip(("out", "dq", "dk", "dv"), errors)),
                        "tolerances": dict(zip(("out", "dq", "dk", "dv"), tolerances)),
                        "reference_in_low_precision_errors": dict(zip(("out", "dq", "dk", "dv"), naive_errors)),
                    }
                    self.report["gate"].append(entry)
                    shown = " ".join(f"{k}={e:.1e}" for k, e in entry["errors"].items())
                    print(f"gate {name} {mode} {entry['dtype']}: {entry['status']} (relative errors {shown})")
                    if not passed:
                        self.unavailable.setdefault(name, f"gate: failed ({mode}, {entry['dtype']}: {shown})")

    def inputs(self, seq: int):
        """q, k, v (leaf tensors that take gradients) and a random upstream gradient, for this S."""
        if self._inputs_key != seq:
            self._inputs = None  # free the last ones first
            gc.collect()
            shape = (self.args.batch, self.args.heads, seq, self.args.head_dim)
            q, k, v = (torch.randn(shape, device=self.device, dtype=self.dtype).requires_grad_() for _ in range(3))
            self._inputs, self._inputs_key = (q, k, v, torch.randn_like(q)), seq
        return self._inputs

    def measure(self, seq: int, block: int, mode: str, which: str) -> None:
        """One (S, b, mode, pass): every contender, taking turns; a row each."""
        args, timer = self.args, self.timer
        causal = mode == "causal"
        q, k, v, grad_out = self.inputs(seq)
        grads = (q, k, v) if which != "fwd" else ()
        names = [n for n in args.contenders if n in OURS or block == args.block]
        rows, calls = {}, {}
        for name in names:
            row = {
                "seq": seq,
                "block_size": None if name in DENSE else block,
                "window": None if name in DENSE else args.window,
                "mode": mode,
                "pass": which,
                "contender": name,
                "status": "ok",
                "useful_flops": useful_flops(
                    name, seq, block, causal, which, args.batch * args.heads, args.head_dim, window=args.window
                ),
            }
            rows[name] = row
            reason = self.skip_reason(name, seq)
            if reason:
                row |= {"status": "skipped", "reason": reason}
                continue
            try:
                start = time.perf_counter()
                call = pass_call(contender(name, block, causal, args.window), which, q, k, v, grad_out)
                call()
                timer.sync()
                row["first_call_s"] = time.perf_counter() - start  # compile, autotune, first run
                estimate, peak = timer.once(call, grads)
                row["extra_peak_bytes"] = peak
                calls[name] = (call, estimate)
            except Exception as error:
                row |= self._failure(error)
        per_round = sum(timer.sample_cost_s(estimate) for _, estimate in calls.values())
        rounds = max(1, min(args.rounds, int(GROUP_BUDGET_S / max(per_round, 1e-9))))
        samples = {name: [] for name in calls}
        for _ in range(rounds):
            for name, (call, estimate) in list(calls.items()):
                try:
                    samples[name].append(timer.sample(call, grads, estimate))
                except Exception as error:
                    rows[name] |= self._failure(error)
                    del calls[name], samples[name]
        for name, times in samples.items():
            ms = statistics.median(times)
            rows[name] |= {
                "ms": ms,
                "tflops": rows[name]["useful_flops"] / ms / 1e9,
                "samples_ms": times,
                "timer": timer.method(calls[name][1]),
            }
        del calls
        for x in grads:
            x.grad = None
        self.report["rows"].extend(rows.values())
        self.report["elapsed_s"] = time.perf_counter() - self.start
        cells = "  ".join(f"{name} {_cell(row, tflops=False)}" for name, row in rows.items())
        print(f"[{self.report['elapsed_s']:5.0f}s] S={seq} b={block} {mode} {which} ({rounds}x): {cells}")

    def skip_reason(self, name: str, seq: int) -> str | None:
        if name in self.unavailable:
            return self.unavailable[name]
        if name in DENSE and seq > self.args.dense_max:
            return f"S > --dense-max {self.args.dense_max} (dense time grows as S^2)"
        if name == "torch" and seq > self.args.torch_max:
            return f"S > --torch-max {self.args.torch_max}"
        return None

    def _failure(self, error: Exception) -> dict:
        if isinstance(error, torch.cuda.OutOfMemoryError):
            gc.collect()
            torch.cuda.empty_cache()
            return {"status": "skipped", "reason": "out of memory: " + _reason(error)}
        self.check_device(error)
        return {"status": "skipped", "reason": _reason(error)}

    def check_device(self, error: Exception) -> None:
        """After a CUDA error, whether the device still works (an illegal address or a failed launch
        leaves the context unusable: then nothing more can be measured)."""
        if self.device.type != "cuda" or not isinstance(error, (RuntimeError, getattr(torch, "AcceleratorError", ()))):
            return
        try:
            torch.cuda.synchronize()
            torch.ones(1, device=self.device).sum().item()
        except Exception as broken:
            raise _DeviceBroken(f"{_reason(error)} (then: {_reason(broken)})") from error

    def save(self) -> None:
        """The report so far, replacing the file whole (a run killed mid-write keeps the last one)."""
        self.report["elapsed_s"] = time.perf_counter() - self.start
        common.write_json(self.out, self.report, indent=1)


class _DeviceBroken(RuntimeError):
    """A CUDA error that leaves the context unusable (illegal address, launch failure)."""


def _forward_backward(backend: str, tensors, args, causal: bool, dtype) -> list[torch.Tensor]:
    """out, dq, dk, dv of one backend at ``dtype`` (as float32), for a given upstream gradient."""
    attention = partial(global_attention, block_size=args.block, causal=causal, window=args.window, backend=backend)
    return [t.float() for t in common.output_and_grads(attention, *tensors, dtype=dtype)]


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).norm() / reference.norm().clamp(min=1e-30))


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:400]


def _raise_recompile_limit(limit: int = 64) -> None:
    """FlexAttention is compiled per shape and mask; the default limit (8) would send a long sweep to
    the eager fallback, which is neither fast nor O(S) in memory."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    versions["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    return versions


# ---------------------------------------------------------------------------------------------
# The targets, and the tables


def targets(report: dict) -> dict:
    """The issue's targets, read off the rows: triton over flex at 16k, 64k, 128k (fwd and fwd+bwd,
    both modes, b = the target block); triton's forward at 128k, bidirectional, as a fraction of the
    matmul rate; triton's fwd+bwd peak memory against dense SDPA's.  A value that was not measured is
    None, with the reason.  (The smoke run measures none of the target sizes: it uses its own.)"""
    config = report["config"]
    block = config["target_block"]
    seqs = [s for s in TARGET_SEQS if s in config["seqs"]] or config["seqs"]
    fwd_seq = 131072 if 131072 in config["seqs"] else max(config["seqs"])
    rows = {(r["seq"], r["block_size"], r["mode"], r["pass"], r["contender"]): r for r in report["rows"]}

    def get(seq, mode, which, name, field="ms"):
        if name not in config["contenders"]:
            return None, f"{name} not among the contenders"
        row = rows.get((seq, None if name in DENSE else block, mode, which, name))
        if row is None:
            return None, "not measured"
        if row["status"] != "ok":
            return None, f"{name}: {row.get('reason', row['status'])}"
        return row.get(field), None

    speedups = []
    for seq in seqs:
        for mode in MODES:
            for which in ("fwd", "fwd+bwd"):
                (fast, why), (base, why_base) = get(seq, mode, which, "triton"), get(seq, mode, which, "flex")
                entry = {"seq": seq, "mode": mode, "pass": which, "speedup": None}
                if fast and base:
                    entry["speedup"] = base / fast
                    entry["meets"] = entry["speedup"] >= TARGET_SPEEDUP
                else:
                    entry["reason"] = why or why_base
                speedups.append(entry)
    tflops, why = get(fwd_seq, "bidir", "fwd", "triton", "tflops")
    matmul = (report.get("matmul") or {}).get("tflops")
    fraction = {"seq": fwd_seq, "block_size": block, "tflops": tflops, "matmul_tflops": matmul, "fraction": None}
    if tflops and matmul:
        fraction["fraction"] = tflops / matmul
        fraction["meets"] = fraction["fraction"] >= TARGET_MATMUL_FRACTION
    else:
        fraction["reason"] = why or "no matmul rate"
    memory = []
    for seq in config["seqs"]:
        for mode in MODES:
            ours, why = get(seq, mode, "fwd+bwd", "triton", "extra_peak_bytes")
            dense = [get(seq, mode, "fwd+bwd", name, "extra_peak_bytes")[0] for name in DENSE]
            dense = [d for d in dense if d is not None]
            entry = {"seq": seq, "mode": mode, "triton_bytes": ours, "dense_bytes": min(dense) if dense else None}
            if ours is not None and dense:
                entry["ratio"] = ours / min(dense)
                entry["meets"] = ours <= min(dense)
            else:
                entry["ratio"] = None
                entry["reason"] = why or "no dense SDPA measured"
            memory.append(entry)
    return {
        "triton_over_flex": {"target": TARGET_SPEEDUP, "block_size": block, "points": speedups},
        "forward_matmul_fraction": {"target": TARGET_MATMUL_FRACTION, **fraction},
        "peak_memory_vs_dense": {"target": "triton <= min(dense SDPA)", "points": memory},
    }


def print_tables(report: dict) -> None:
    config = report["config"]
    names = config["contenders"]
    block = config["target_block"]
    print(
        f"\n{report['gpu']}; torch {report['versions']['torch']}, triton {report['versions']['triton']}; "
        f"{config['dtype']}, B={config['batch']}, H={config['heads']}, D={config['head_dim']}"
    )
    if report["matmul"]:
        m = report["matmul"]
        print(f"matmul {m['n']}^3 {m['dtype']}: {_rate(m['tflops'])} TFLOP/s")
    gate = {(g["backend"], g["status"]) for g in report["gate"]}
    print("gate: " + (", ".join(f"{b} {s}" for b, s in sorted(gate)) or "no backend of ours"))

    groups: dict[tuple, dict] = {}
    for row in report["rows"]:
        if row["block_size"] is None:  # dense: shown on the rows of the target block
            key = (row["seq"], block, row["mode"], row["pass"])
        else:
            key = (row["seq"], row["block_size"], row["mode"], row["pass"])
        groups.setdefault(key, {})[row["contender"]] = row
    width = 12
    header = f"{'S':>7} {'b':>4} {'mode':>6} {'pass':>7} |" + "".join(f" {n:>{width}}" for n in names)
    header += f" | {'dense/ours':>10}"
    print("\nmedian ms (useful TFLOP/s)\n" + header + "\n" + "-" * len(header))
    for key in sorted(groups, key=lambda k: (k[0], k[1] != block, k[1], MODES.index(k[2]), PASSES.index(k[3]))):
        cells = groups[key]
        line = f"{key[0]:>7} {key[1]:>4} {key[2]:>6} {key[3]:>7} |"
        line += "".join(f" {_cell(cells[n]) if n in cells else '':>{width}}" for n in names)
        best = {
            kind: min((r["ms"] for n, r in cells.items() if (n in DENSE) == kind and "ms" in r), default=None)
            for kind in (True, False)
        }
        ratio = f"{best[True] / best[False]:.1f}x" if best[True] and best[False] else ""
        print(line + f" | {ratio:>10}")

    memory_rows = sorted(k for k in groups if k[1] == block and k[3] == "fwd+bwd")
    if any(cells.get("extra_peak_bytes") is not None for k in memory_rows for cells in groups[k].values()):
        header = f"{'S':>7} {'mode':>6} |" + "".join(f" {n:>{width}}" for n in names)
        print(f"\npeak MiB beyond the inputs, fwd+bwd, b={block}\n" + header + "\n" + "-" * len(header))
        for key in memory_rows:
            cells = groups[key]
            line = f"{key[0]:>7} {key[2]:>6} |"
            for n in names:
                peak = cells.get(n, {}).get("extra_peak_bytes")
                line += f" {'' if peak is None else f'{peak / 2**20:.0f}':>{width}}"
            print(line)

    reasons = {}
    for row in report["rows"]:
        if row["status"] != "ok":
            reasons.setdefault((row["contender"], row["reason"]), 0)
            reasons[(row["contender"], row["reason"])] += 1
    if reasons:
        print("\nnot timed:")
        for (name, reason), count in reasons.items():
            print(f"  {name} ({count} rows): {reason[:200]}")
    first = {}
    for row in report["rows"]:
        if "first_call_s" in row:
            first[row["contender"]] = first.get(row["contender"], 0.0) + row["first_call_s"]
    if first:
        shown = ", ".join(f"{name} {seconds:.0f}" for name, seconds in first.items())
        print(f"\nfirst calls (compile, autotune, first run), seconds in all: {shown}")

    t = report["targets"] or targets(report)
    print(f"\ntargets (same card, same run), b={block}")
    speedups = t["triton_over_flex"]["points"]
    print(f"  triton over flex (>= {TARGET_SPEEDUP}x):")
    for seq in dict.fromkeys(p["seq"] for p in speedups):
        cells = []
        for p in (p for p in speedups if p["seq"] == seq):
            value = f"{p['speedup']:.2f}x" + ("" if p["meets"] else " (miss)") if p["speedup"] else "n/a"
            cells.append(f"{p['mode']} {p['pass']} {value}")
        print(f"    S={seq:>6}: " + ", ".join(cells))
    missing = {p["reason"] for p in speedups if p["speedup"] is None}
    for reason in missing:
        print(f"    n/a: {reason}")
    f = t["forward_matmul_fraction"]
    if f["fraction"] is not None:
        verdict = "meets" if f["meets"] else "misses"
        print(
            f"  triton forward at S={f['seq']}, bidir: {_rate(f['tflops'])} TFLOP/s = {100 * f['fraction']:.0f}% "
            f"of the matmul rate {_rate(f['matmul_tflops'])} ({verdict} >= {100 * TARGET_MATMUL_FRACTION:.0f}%)"
        )
    else:
        print(f"  triton forward at S={f['seq']}, bidir, as % of the matmul rate: n/a ({f['reason']})")
    cells = [
        f"S={p['seq']} {p['mode']} {p['ratio']:.2f}" + ("" if p["meets"] else " (miss)")
        for p in t["peak_memory_vs_dense"]["points"]
        if p["ratio"] is not None
    ]
    print("  triton fwd+bwd peak memory / dense SDPA's (<= 1): " + (", ".join(cells) or "n/a"))
    if report.get("stopped"):
        print(f"  incomplete: {report['stopped']}")


def _cell(row: dict, tflops: bool = True) -> str:
    if row["status"] != "ok":
        return "oom" if row.get("reason", "").startswith("out of memory") else "skip"
    ms = row["ms"]
    digits = max(0, 2 - math.floor(math.log10(ms))) if ms > 0 else 3
    text = f"{ms:.{digits}f}"
    return f"{text} ({_rate(row['tflops'])})" if tflops else text


def _rate(tflops: float) -> str:
    return f"{tflops:.0f}" if tflops >= 10 else f"{tflops:.2g}"


if __name__ == "__main__":
    sys.exit(main())
