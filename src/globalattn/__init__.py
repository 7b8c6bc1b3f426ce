"""globalattn: exact global-token attention for PyTorch."""

from globalattn.api import attention_weights, block_bounds, global_attention
from globalattn.layer import GlobalAttention

__all__ = ["GlobalAttention", "attention_weights", "block_bounds", "global_attention"]
__version__ = "0.1.0"
