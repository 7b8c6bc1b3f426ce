"""Backends by name, and the rule that picks one.

Every backend is a function ``(query, key, value, *, block_size, causal, scope, remainder,
key_mask, scale, top_blocks, dropout_p) -> (out, lse)`` that takes validated, resolved arguments.
The fused GPU backends (``flex``, ``triton``) cover less than the whole contract; each module has
``unsupported(query, key, value, options) -> str | None``, the reason it cannot run these inputs
(None when it can).  They are imported with this package, so that ``torch.compile`` never meets an
import inside a call; the Triton kernels are built for the interpreter or the GPU depending on
``TRITON_INTERPRET`` at that moment.
"""

from __future__ import annotations

import importlib

from globalattn.backends.blocked import blocked_attention
from globalattn.backends.reference import reference_attention

NAMES = ("reference", "torch", "flex", "triton")


def _import_fused(name: str):
    """The fused backend's module; if it cannot be imported, the reason."""
    try:
        return importlib.import_module(f"globalattn.backends.{name}")
    except ImportError as error:  # triton missing, or a torch without what flex_attention needs
        return f"it cannot be imported here ({error})"


_FUSED = {name: _import_fused(name) for name in ("flex", "triton")}


def get_backend(name: str):
    """The attention function of backend ``name`` (one of NAMES)."""
    if name == "reference":
        return reference_attention
    if name == "torch":
        return blocked_attention
    return _FUSED[name].attention


def unsupported_reason(name: str, query, key, value, options: dict) -> str | None:
    """Why backend ``name`` cannot compute these inputs, or None when it can."""
    if name not in _FUSED:
        return None
    module = _FUSED[name]
    return module if isinstance(module, str) else module.unsupported(query, key, value, options)


def explain_backend(query, key, value, options: dict) -> tuple[str, list[str]]:
    """The backend ``"auto"`` picks for these inputs, and why each faster one was passed over.

    On CUDA: triton when it covers the inputs, else flex, else torch.  Elsewhere: torch (the fused
    backends are GPU kernels; the Triton interpreter is for testing, not speed).
    """
    if query.device.type != "cuda":
        return "torch", [f"inputs are on {query.device.type}, and the fused backends are for CUDA"]
    passed_over = []
    for name in ("triton", "flex"):
        reason = unsupported_reason(name, query, key, value, options)
        if reason is None:
            return name, passed_over
        passed_over.append(f"{name}: {reason}")
    return "torch", passed_over
