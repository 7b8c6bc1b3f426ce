"""Compile the Triton kernels for a Hopper GPU (sm_90) on a machine without one, as a run would.

The interpreter runs the kernels' logic but not Triton's GPU compiler, which is where type errors,
unsupported operations, tiles too large for shared memory and register spills show up.  So this
script calls the backend's real launchers (its forward and backward custom ops) on CPU tensors of
realistic shapes, with every kernel launch intercepted: an autotuned kernel compiles each
configuration its pruning keeps, with the argument specialisation (divisibility by 16, constants)
that Triton's launcher derives from those very arguments, and nothing runs.  ptxas, which Triton
ships, reports each kernel's registers and spills.

Run as a script in a process without TRITON_INTERPRET; prints one JSON line per compiled kernel.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

import globalattn.backends.triton as kernels
from globalattn import spec

TARGET = GPUTarget("cuda", 90, 32)
KERNEL_NAMES = {
    kernels._forward_kernel: "forward",
    kernels._row_terms_kernel: "row_terms",
    kernels._query_grad_kernel: "query_grad",
    kernels._global_grad_kernel: "global_grad",
    kernels._key_grad_kernel: "key_grad",
}

# The shapes a user runs, each with its options: (dtype, B, Hq, Hkv, L, S, D, b, options).  The ends of
# the head dims and dtypes (D = 256, float32), sequence lengths divisible by 16 and not, every mask.
SHAPES = {
    "bf16-d128-bidirectional": (torch.bfloat16, 1, 2, 2, 16384, 16384, 128, 128, {}),
    "bf16-d128-causal-masked-window-gqa": (torch.bfloat16, 1, 4, 2, 16384, 16384, 128, 128,
                                           dict(causal=True, mask=True, window=128)),
    "bf16-d256-causal": (torch.bfloat16, 1, 2, 2, 16384, 16384, 256, 128, dict(causal=True)),
    "f32-d128-bidirectional": (torch.float32, 1, 2, 2, 16384, 16384, 128, 128, {}),
    "f32-d64-causal-masked": (torch.float32, 1, 2, 2, 16384, 16384, 64, 128, dict(causal=True, mask=True)),
    "f32-d256-bidirectional-window": (torch.float32, 1, 2, 2, 16384, 16384, 256, 128, dict(window=128)),
    "f16-d64-own-window-odd": (torch.float16, 2, 2, 1, 900, 1000, 64, 100,
                               dict(scope_own=True, mask=True, window=50, remainder="separate")),
}  # fmt: skip


def _compile(fn: JITFunction, args: tuple, kwargs: dict) -> dict:
    """Compile ``fn`` for TARGET as its launcher would for these arguments (Triton's own binder
    and argument packing), and report what the GPU would allocate."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    ptxas_log = io.StringIO()
    with contextlib.redirect_stdout(ptxas_log):  # Triton prints its ptxas report there
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                                  options=options.__dict__)  # fmt: skip
    report = ptxas_log.getvalue()
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    return {"shared": compiled.metadata.shared, "registers": registers, "spill_bytes": sum(spills)}


class _Recorder:
    """Stands in for the launches: each kernel call compiles (every pruned configuration of an
    autotuned kernel) and records, instead of running."""

    def __init__(self):
        self.records: list[dict] = []

    def autotuned(self, tuner: Autotuner, *args, grid, warmup, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        for config in tuner.prune_configs(kwargs):
            launch = {**kwargs, **config.all_kwargs()}
            self.records.append({"kernel": KERNEL_NAMES[tuner], **config.kwargs, "num_warps": config.num_warps,
                                 "num_stages": config.num_stages, **_compile(tuner.fn, args, launch)})  # fmt: skip

    def plain(self, fn: JITFunction, *args, grid, warmup, **kwargs):
        self.records.append({"kernel": KERNEL_NAMES[fn], **_compile(fn, args, kwargs)})


def compile_shape(name: str) -> list[dict]:
    dtype, batch, q_heads, kv_heads, q_len, seq_len, head_dim, block_size, options = SHAPES[name]
    causal, window = options.get("causal", False), options.get("window")
    remainder = options.get("remainder", spec.resolve_remainder(causal, None))
    q = torch.randn(batch, q_heads, q_len, head_dim, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, seq_len, head_dim, dtype=dtype) for _ in range(2))
    key_mask = torch.rand(batch, seq_len) > 0.1 if options.get("mask") else None
    static = (block_size, remainder, causal, options.get("scope_own", False), window, head_dim**-0.5)

    # TF32 for float32: the backend refuses float32 in full precision on a GPU
    torch.set_float32_matmul_precision("high" if dtype == torch.float32 else "highest")
    recorder = _Recorder()
    triton.knobs.nvidia.dump_ptxas_log = True  # registers and spills: its "-v" report
    Autotuner.run = lambda tuner, *a, **kw: recorder.autotuned(tuner, *a, **kw)
    JITFunction.run = lambda fn, *a, **kw: recorder.plain(fn, *a, **kw)
    with tempfile.TemporaryDirectory() as cache:
        triton.knobs.cache.dir = cache  # compile every time: a cached kernel prints no report
        out, lse, key_global, value_global = kernels._forward_op(q, k, v, key_mask, *static)
        kernels._backward_op(torch.randn_like(out), torch.randn_like(lse), q, k, v, key_mask, out, lse, key_global,
                             value_global, *static)  # fmt: skip
    return [{"shape": name, **record} for record in recorder.records]


def main() -> None:
    # In worker processes: the interception replaces Triton's launchers there only.
    with ProcessPoolExecutor(max_workers=min(len(SHAPES), 2)) as pool:
        for records in pool.map(compile_shape, SHAPES):
            for record in records:
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
