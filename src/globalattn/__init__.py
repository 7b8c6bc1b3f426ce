"""globalattn: exact global-token attention for PyTorch."""

from globalattn.api import attention_weights, block_bounds, explain_backend, global_attention
from globalattn.cache import PooledKVCache
from globalattn.layer import GlobalAttention

__all__ = [
    "GlobalAttention",
    "PooledKVCache",
    "attention_weights",
    "block_bounds",
    "explain_backend",
    "global_attention",
]
__version__ = "0.1.0"
