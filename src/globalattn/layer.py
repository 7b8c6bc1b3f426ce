"""GlobalAttention: a multi-head self-attention layer built on ``global_attention``."""

from __future__ import annotations

import torch
from torch import nn

from globalattn import spec
from globalattn.api import attention_weights, global_attention


class GlobalAttention(nn.Module):
    """Multi-head self-attention with global tokens, a drop-in for ``nn.MultiheadAttention``-style use.

    Each token attends to the tokens of its own block (``block_size`` tokens) and to one global
    token (the mean key/value) per block; see ``global_attention``.  ``num_kv_heads`` below
    ``num_heads`` gives grouped-query attention.

    >>> layer = GlobalAttention(64, 4, block_size=8, causal=True)
    >>> out, _ = layer(torch.randn(2, 100, 64))         # (B, T, E) with batch_first=True
    >>> out.shape
    torch.Size([2, 100, 64])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        block_size: int,
        *,
        num_kv_heads: int | None = None,
        causal: bool = False,
        scope: str = "all",
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, x in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{name} must be a positive int, got {x!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if scope not in spec.SCOPES:
            raise ValueError(f"scope must be one of {spec.SCOPES}, got {scope!r}")
        if causal and scope == "own":
            raise ValueError('scope="own" is bidirectional only; with causal=True use scope="all"')
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.block_size, self.causal, self.scope = block_size, causal, scope
        self.dropout, self.batch_first = dropout, batch_first
        factory = dict(device=device, dtype=dtype)
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, E) (or (T, B, E) when ``batch_first=False``); ``key_padding_mask``: (B, T)
        bool, True at padding, as in ``nn.MultiheadAttention``.

        Returns ``(out, weights)``: out like x; weights (B, num_heads, T, T + G) per head (local
        columns first, then one per global token) when ``need_weights``, else None.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            layout = "(B, T, E)" if self.batch_first else "(T, B, E)"
            raise ValueError(f"x must have shape {layout} with E={self.embed_dim}, got {_shape(x)}")
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch, seq_len, _ = x.shape
        key_mask = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, seq_len):
                raise ValueError(
                    f"key_padding_mask must be a bool tensor of shape (B, T) = {(batch, seq_len)} (True = padding), "
                    f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )
            key_mask = ~key_padding_mask
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        options = dict(causal=self.causal, scope=self.scope, key_mask=key_mask)
        out = global_attention(q, k, v, self.block_size, dropout_p=self.dropout if self.training else 0.0, **options)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, seq_len, self.embed_dim))  # (B, T, E)
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = attention_weights(q, k, self.block_size, **options) if need_weights else None
        return out, weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"block_size={self.block_size}, causal={self.causal}, scope={self.scope!r}, dropout={self.dropout}"
        )


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
