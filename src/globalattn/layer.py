"""GlobalAttention: a multi-head self-attention layer built on ``global_attention``."""

from __future__ import annotations

import torch
from torch import nn

from globalattn import checks
from globalattn.api import attention_weights, global_attention
from globalattn.cache import PooledKVCache


class GlobalAttention(nn.Module):
    """Multi-head self-attention with global tokens, a drop-in for ``nn.MultiheadAttention``-style use.

    Each token attends to the tokens of its own block (``block_size`` tokens) and to one global
    token (the mean key/value) per block; see ``global_attention``.  ``num_kv_heads`` below
    ``num_heads`` gives grouped-query attention; ``window=w`` replaces the own block's tokens by
    the w nearest (causal: the w most recent), LongT5's local + global pattern.

    >>> layer = GlobalAttention(64, 4, block_size=8, causal=True)
    >>> out, _ = layer(torch.randn(2, 100, 64))         # (B, T, E) with batch_first=True
    >>> out.shape
    torch.Size([2, 100, 64])

    Causal layers decode incrementally with a ``PooledKVCache``: feed the prompt, then one token at a
    time; the outputs are those of the whole sequence at once, from O(block_size + T / block_size)
    cached entries instead of T.

    >>> cache = PooledKVCache()
    >>> prompt, _ = layer(torch.randn(2, 90, 64), cache=cache)
    >>> step, _ = layer(torch.randn(2, 1, 64), cache=cache)   # position 90
    >>> cache.length
    91
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
        top_blocks: int = 0,
        window: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = True,
        context_parallel_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, x in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            checks.positive_int(name, x)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        checks.positive_int("block_size", block_size)
        checks.mode(causal, scope)
        checks.non_negative_int("top_blocks", top_blocks, " (0 = no routing)")
        checks.window(window)
        if context_parallel_group is not None and top_blocks:
            raise ValueError("top_blocks is not available with context_parallel_group (it reads other ranks' tokens)")
        checks.probability("dropout", dropout)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.block_size, self.causal, self.scope, self.top_blocks = block_size, causal, scope, top_blocks
        self.window = window
        # Context parallelism: x (and key_padding_mask) hold this rank's shard of the sequence,
        # whole blocks (globalattn.distributed.shard_sequence); ranks exchange only the global tokens.
        self.context_parallel_group = context_parallel_group
        self.dropout, self.batch_first = dropout, batch_first
        factory = dict(device=device, dtype=dtype)
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        cache: PooledKVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, E) (or (T, B, E) when ``batch_first=False``); ``key_padding_mask``: (B, T)
        bool, True at padding, as in ``nn.MultiheadAttention``.

        ``cache`` (causal layers, inference): x holds the T positions that follow those already in
        the cache, which receives their keys and values; the output is the last T rows of the
        whole sequence's.  ``key_padding_mask`` then covers the T new positions.
        ``document_ids`` (B, T) int, non-decreasing: packed documents, each attended as if alone.

        Returns ``(out, weights)``: out like x; weights (B, num_heads, T, T + G) per head (local
        columns first, then one per global token) when ``need_weights``, else None.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            layout = "(B, T, E)" if self.batch_first else "(T, B, E)"
            raise ValueError(f"x must have shape {layout} with E={self.embed_dim}, got {checks.describe(x)}")
        if cache is not None:
            self._check_cache(cache, need_weights)
        if self.context_parallel_group is not None and (cache is not None or need_weights):
            raise ValueError("context_parallel_group supports neither cache nor need_weights (whole sequence needed)")
        if document_ids is not None and (cache is not None or self.context_parallel_group is not None):
            raise ValueError("document_ids go with neither cache nor context_parallel_group (whole documents needed)")
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch, seq_len, _ = x.shape
        key_mask = None
        if key_padding_mask is not None:
            checks.bool_mask("key_padding_mask", key_padding_mask, (batch, seq_len), x.device, layout="(B, T)",
                             meaning="True = padding")  # fmt: skip
            key_mask = ~key_padding_mask
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        options = dict(causal=self.causal, scope=self.scope, window=self.window, key_mask=key_mask)
        routing = dict(top_blocks=self.top_blocks)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None:
            cache.update(k, v)
            out = cache.attend(q, block_size=self.block_size, window=self.window, key_mask=key_mask)
        elif self.context_parallel_group is not None:
            from globalattn.distributed import context_parallel_attention  # torch.distributed, only when used

            group = self.context_parallel_group
            out = context_parallel_attention(q, k, v, self.block_size, group=group, dropout_p=dropout_p, **options)
        else:
            out = global_attention(
                q, k, v, self.block_size, dropout_p=dropout_p, document_ids=document_ids, **options, **routing
            )
        out = self.out_proj(out.transpose(1, 2).reshape(batch, seq_len, self.embed_dim))  # (B, T, E)
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attention_weights(q, k, self.block_size, document_ids=document_ids, **options, **routing)
        return out, weights

    def _check_cache(self, cache, need_weights: bool) -> None:
        if not isinstance(cache, PooledKVCache):
            raise ValueError(f"cache must be a globalattn PooledKVCache or None, got {type(cache).__name__}")
        if not self.causal:
            raise ValueError("cache needs causal=True: bidirectional tokens see later ones, so they cannot decode")
        if need_weights:
            raise ValueError("need_weights is not available with cache (the cache holds no full key sequence)")
        if self.top_blocks:
            raise ValueError("top_blocks is not available with cache (routing reads the raw tokens of every block)")
        if self.training and self.dropout > 0:
            raise ValueError("cache is for inference and applies no dropout: call .eval() first (dropout > 0 here)")

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"block_size={self.block_size}, causal={self.causal}, scope={self.scope!r}, top_blocks={self.top_blocks}, "
            f"window={self.window}, dropout={self.dropout}"
        )
