"""The backends, by name.

Each backend is a module with the same pair of functions, taking arguments already checked and
resolved by ``globalattn.options.resolve``:

- ``attention(query, key, value, options) -> (out, lse)``;
- ``unsupported(query, key, value, options) -> str | None``: why it cannot compute these inputs
  (None when it can).  ``reference`` and ``torch`` cover the whole contract; the fused GPU
  backends (``flex``, ``triton``) less of it.

The fused ones are imported on first use, not with globalattn (Triton alone takes a noticeable
fraction of a second to import); an ``import`` statement, unlike ``importlib``, is traced by
``torch.compile`` without a graph break.  The Triton kernels are built for the interpreter or the
GPU depending on ``TRITON_INTERPRET`` at that moment.
"""

from __future__ import annotations

import torch

NAMES = ("reference", "torch", "flex", "triton")
_unavailable: dict[str, _Unavailable] = {}  # backends whose import failed, with the reason


def get(name: str):
    """The module of backend ``name`` (one of NAMES); if it cannot be imported here, a stand-in
    whose ``unsupported`` says why."""
    if name in _unavailable:
        return _unavailable[name]
    try:
        if name == "reference":
            from globalattn.backends import reference as backend
        elif name == "torch":
            from globalattn.backends import blocked as backend
        elif name == "flex":
            from globalattn.backends import flex as backend
        else:
            from globalattn.backends import triton as backend
    except ImportError as error:  # triton missing, or a torch without what flex_attention needs
        _unavailable[name] = _Unavailable(f"it cannot be imported here ({error})")
        return _unavailable[name]
    return backend


def float32_uses_tf32() -> bool:
    """Whether PyTorch lets float32 matrix products use TF32 (``torch.set_float32_matmul_precision
    ("high")`` or the newer ``torch.backends.cuda.matmul.fp32_precision = "tf32"``), as cuBLAS and
    FlexAttention then do; by default they run in full precision."""
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")  # the newer switch, when set
    if setting != "none":
        return setting != "ieee"
    return torch.get_float32_matmul_precision() != "highest"


class _Unavailable:
    def __init__(self, reason: str):
        self.reason = reason

    def unsupported(self, query, key, value, options) -> str:
        return self.reason
