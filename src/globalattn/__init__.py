"""globalattn: exact global-token attention for PyTorch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from globalattn.api import attention_weights, block_bounds, explain_backend, global_attention
    from globalattn.cache import PooledKVCache
    from globalattn.layer import GlobalAttention

__version__ = "0.1.0"

# Each public name and its module, imported on first use (PEP 562), so that the command line's
# --help, which imports this package, needs no torch.
_EXPORTS = {
    "GlobalAttention": "globalattn.layer",
    "PooledKVCache": "globalattn.cache",
    "attention_weights": "globalattn.api",
    "block_bounds": "globalattn.api",
    "explain_backend": "globalattn.api",
    "global_attention": "globalattn.api",
}
__all__ = [
    "GlobalAttention",
    "PooledKVCache",
    "attention_weights",
    "block_bounds",
    "explain_backend",
    "global_attention",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'globalattn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
