"""A small pre-norm transformer whose attention is chosen by name (see ``attention.py``).

    config = ModelConfig(context=512, attention="global", vocab_size=256, causal=True)
    lm = DecoderLM(config)                      # next-token logits (B, T, vocab), head tied to the embedding
    clf = EncoderClassifier(config.replace(causal=False, num_classes=10))   # (B, num_classes)

Every variant has exactly the same parameters: the attention functions have none of their own.
RoPE rotates queries and keys before the attention, so ``global``'s global tokens are means of
rotated keys (what the library computes from the keys it is given).

``lm(tokens, document_ids=ids)`` runs packed documents (ids (B, T), non-decreasing along T): each
document's logits are those of the document run alone, to rounding, as its attention sees no other
document and RoPE counts positions from each document's start.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from globalattn import cost
from globalattn.harness.attention import (
    keys_per_token,
    make_attention,
    make_context_parallel_attention,
    positions_in_documents,
    resolved_block_size,
    resolved_window,
)
from globalattn.harness.config import ModelConfig


def attention_cost(config: ModelConfig, seq_len: int | None = None) -> dict:
    """Mean attended keys per token, and forward attention FLOPs per sequence over all layers
    (``globalattn.cost.attention_flops``)."""
    keys = keys_per_token(
        config.attention,
        seq_len or config.context,
        causal=config.causal,
        block_size=resolved_block_size(config),
        window=resolved_window(config),
    )
    head_dim = config.d_model // config.n_head
    flops = cost.attention_flops(int(keys.sum()), head_dim, heads=config.n_head) * config.n_layer
    return {"keys_per_token": float(keys.double().mean()), "attention_flops": int(flops)}


class RotaryEmbedding(nn.Module):
    """Rotates pairs of channels (first half, second half) by position-dependent angles."""

    def __init__(self, head_dim: int, context: int, base: float):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(context, dtype=torch.float32), inv_freq)  # (T, hd/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, hd) at ``positions``: (T,), or (B, T) when the rows differ (packed documents)."""
        cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd/2): the same for every head
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.rope = RotaryEmbedding(config.d_model // config.n_head, config.context, config.rope_base)
        self.attend = make_attention(
            config.attention,
            causal=config.causal,
            block_size=resolved_block_size(config),
            window=resolved_window(config),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
        batch, seq_len, channels = x.shape  # x: (B, T, C)
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        y = self.attend(self.rope(q, positions), self.rope(k, positions), v, document_ids=document_ids)  # (B, H, T, hd)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(batch, seq_len, channels)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, 4 * config.d_model, bias=False)
        self.down = nn.Linear(4 * config.d_model, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.norm2 = nn.RMSNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), positions, document_ids)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Token embedding, the blocks, a final norm: (B, T) token ids -> (B, T, C) features."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None or config.causal is None:
            raise ValueError("a model needs vocab_size and causal (a TrainConfig's model gets them from its task)")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model)
        self.position_offset = 0  # context parallel: the first position of this rank's shard
        init_weights(self, config)

    def forward(self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``document_ids`` (B, T), non-decreasing along T: packed documents, RoPE positions counted
        from each one's start; None: one sequence per row."""
        seq_len = tokens.shape[1]
        if seq_len > self.config.context:
            raise ValueError(f"sequence of {seq_len} tokens exceeds the model's context {self.config.context}")
        if document_ids is None:
            positions = torch.arange(self.position_offset, self.position_offset + seq_len, device=tokens.device)
        else:
            positions = positions_in_documents(document_ids)
        x = self.dropout(self.embed(tokens))  # (B, T, C)
        for block in self.blocks:
            x = block(x, positions, document_ids)
        return self.norm(x)


@contextlib.contextmanager
def recorded_attention_inputs(model: nn.Module):
    """Inside the ``with``, every call of an attention layer of ``model`` appends its (q, k), as the
    attention function receives them (after RoPE), to the list this yields: in call order."""
    recorded, layers = [], [m for m in model.modules() if isinstance(m, SelfAttention)]

    def recording(attend):
        def call(q, k, v, **options):
            recorded.append((q, k))
            return attend(q, k, v, **options)

        return call

    originals = [layer.attend for layer in layers]
    for layer in layers:
        layer.attend = recording(layer.attend)
    try:
        yield recorded
    finally:
        for layer, attend in zip(layers, originals):
            layer.attend = attend


def init_weights(model: nn.Module, config: ModelConfig) -> None:
    """GPT-2's: normal std 0.02 (the embedding ``config.embed_std``), residual outputs 0.02 / sqrt(2 * layers)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=config.embed_std)
        elif isinstance(module, nn.Linear):
            residual = name.endswith(("proj", "down"))
            nn.init.normal_(module.weight, std=0.02 / math.sqrt(2 * config.n_layer) if residual else 0.02)


class DecoderLM(nn.Module):
    """Causal language model: logits for the next token at every position, from the embedding's
    transpose (tied) or, with ``config.untied_head``, from a head of its own."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.causal:
            raise ValueError("DecoderLM needs a causal config (causal=True)")
        self.config = config
        self.transformer = Transformer(config)
        self.head = None
        if config.untied_head:
            self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, T, vocab); ``document_ids`` as ``Transformer.forward``'s."""
        features = self.transformer(tokens, document_ids)
        return self.head(features) if self.head is not None else features @ self.transformer.embed.weight.T


class EncoderClassifier(nn.Module):
    """Bidirectional encoder: the mean of the real tokens' features, then a linear classifier."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.causal or not config.num_classes:
            raise ValueError("EncoderClassifier needs causal=False and num_classes >= 1")
        self.config = config
        self.transformer = Transformer(config)
        self.head = nn.Linear(config.d_model, config.num_classes)

    def forward(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """tokens (B, T); real (B, T) bool, False at padding (attended as ordinary tokens, not pooled)."""
        x = self.transformer(tokens)  # (B, T, C)
        weights = real.to(x.dtype).unsqueeze(-1)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, C)
        return self.head(pooled)


def build_model(config: ModelConfig) -> DecoderLM | EncoderClassifier:
    return DecoderLM(config) if config.causal else EncoderClassifier(config)


def use_context_parallel(model: nn.Module, group, shard: range) -> None:
    """Make ``model`` run on this rank's ``shard`` of every sequence (whole blocks, from
    ``globalattn.distributed.shard_range``): RoPE at the shard's positions, attention exchanging only
    the global tokens over ``group``."""
    config = model.config
    attend = make_context_parallel_attention(
        config.attention,
        causal=config.causal,
        block_size=resolved_block_size(config),
        window=resolved_window(config),
        group=group,
    )
    model.transformer.position_offset = shard.start
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.attend = attend
