"""Compile the Triton kernels for a Hopper GPU (sm_90) on a machine without one.

The interpreter runs the kernels' logic but not Triton's GPU compiler, which is where type errors,
unsupported operations and tiles too large for shared memory show up.  Run as a script in a
process without TRITON_INTERPRET; prints one JSON line per kernel and mode: its shared memory.
"""

from __future__ import annotations

import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import globalattn.backends.triton as kernels

FLOAT_ARGS = {"scale_log2", "scale"}


def compile_for_hopper(kernel, pointers: dict, constants: dict) -> dict:
    """Compile ``kernel`` (an autotuned one in its first configuration); pointers maps pointer
    arguments to Triton types (None: not passed), constants the other constexpr arguments."""
    autotuned = hasattr(kernel, "configs")
    jit, config = (kernel.fn, kernel.configs[0]) if autotuned else (kernel, triton.Config({}))
    constants = {**constants, **config.kwargs}
    signature, constexprs = {}, {}
    for i, (name, param) in enumerate(zip(jit.arg_names, jit.params)):
        if param.is_constexpr or pointers.get(name, "") is None:
            signature[name] = "constexpr"
            constexprs[(i,)] = constants[name] if param.is_constexpr else None
        else:
            signature[name] = pointers.get(name) or ("fp32" if name in FLOAT_ARGS else "i32")
    source = ASTSource(fn=jit, signature=signature, constexprs=constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return {"shared": compiled.metadata.shared, **config.kwargs}


def main() -> None:
    t = "*bf16"
    inputs = dict(Q=t, K=t, V=t, KG=t, VG=t, KEEP="*i8", PRESENT="*i8")
    grads = dict(DO=t, LSE2="*fp32", DELTA="*fp32")
    dims = dict(BLOCK_D=128, BLOCK_DV=128, DOT_PRECISION="tf32")
    modes = {  # the two ends, every mask in play and none (scope "all" without padding); and each with a window
        "causal-masked": dict(CAUSAL=True, SCOPE_OWN=False, HAS_MASK=True, HAS_WINDOW=False, **dims),
        "bidirectional": dict(CAUSAL=False, SCOPE_OWN=False, HAS_MASK=False, HAS_WINDOW=False, **dims),
        "causal-masked-window": dict(CAUSAL=True, SCOPE_OWN=False, HAS_MASK=True, HAS_WINDOW=True, **dims),
        "bidirectional-window": dict(CAUSAL=False, SCOPE_OWN=False, HAS_MASK=False, HAS_WINDOW=True, **dims),
    }
    plan = {
        "forward": (kernels._forward_kernel, {**inputs, "DO": None, "LSE2": None, "DELTA": None, "OUT": t,
                                              "LSE": "*fp32"}, {"BACKWARD": False}),
        "query_grad": (kernels._query_grad_kernel, {**inputs, **grads, "OUT": t, "LSE": None}, {"BACKWARD": True}),
        "key_grad": (kernels._key_grad_kernel, {**inputs, **grads, "DKG": "*fp32", "DVG": "*fp32",
                                                "INV_COUNT": "*fp32", "DK": t, "DV": t}, {}),
        "global_grad": (kernels._global_grad_kernel, {**inputs, **grads, "DKG": "*fp32", "DVG": "*fp32"}, {}),
        "row_terms": (kernels._row_terms_kernel, {"OUT": t, "DO": t, "LSE": "*fp32", "DLSE": "*fp32",
                                                  "LSE2": "*fp32", "DELTA": "*fp32"},
                      {"BLOCK_M": kernels.ROW_TILE}),
    }  # fmt: skip
    for mode, options in modes.items():
        for name, (kernel, pointers, extra) in plan.items():
            compiled = compile_for_hopper(kernel, pointers, {**options, **extra})
            print(json.dumps({"kernel": name, "mode": mode, **compiled}), flush=True)


if __name__ == "__main__":
    main()
