"""The options of one attention call, checked and resolved once, in the form every backend receives.

``resolve`` checks the arguments of ``global_attention`` (and of the entry points built on it),
fills in the defaults (a concrete remainder rule, a float scale, a block size clamped to the
sequence) and returns an ``AttentionOptions``.  Backends take that object and trust it, so that no
backend repeats a check and every refusal reads the same: a ValueError naming the argument and
what would be valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from globalattn import checks, spec


class GlobalTokens(NamedTuple):
    """Global tokens from outside a call (docs/semantics.md, "Global tokens from outside the call").

    key (B, Hkv, T, D), value (B, Hkv, T, Dv), present (B, T) bool (False: a block without a real
    token, never attended to).  Every query row of the call may see every present one.
    """

    key: torch.Tensor
    value: torch.Tensor
    present: torch.Tensor


@dataclass(frozen=True, eq=False)
class AttentionOptions:
    """Everything but the query, key and value tensors of one checked ``global_attention`` call."""

    block_size: int  # b, at most S
    causal: bool
    scope: str  # "all" or "own"
    remainder: str  # "merge" or "separate", resolved from None
    key_mask: torch.Tensor | None  # (B, S) bool, True at real tokens
    scale: float
    top_blocks: int = 0
    window: int | None = None  # w: local keys are the raw positions within w of the query, not its block
    document_ids: torch.Tensor | None = None  # (B, S) int, non-decreasing: packed documents, each on its own
    # Their blocks, set by the API once it has laid the rows end to end as one (B = 1) row; what
    # the backends read instead of document_ids.
    documents: spec.DocumentBlocks | None = None
    dropout_p: float = 0.0
    # Kept even when empty (T = 0): the gradient of a context-parallel all-gather must reach every
    # rank's backward, causal rank 0's too, whose queries see none of the other ranks' tokens.
    extra_global_tokens: GlobalTokens | None = None

    @property
    def num_extra(self) -> int:
        """T, the number of global tokens from outside the call."""
        return 0 if self.extra_global_tokens is None else self.extra_global_tokens.key.shape[2]

    def global_tokens(self, key: torch.Tensor | None, value: torch.Tensor | None):
        """Every global token this call's rows may be shown, as (key (B, Hkv, T + G, D), value
        (B, Hkv, T + G, Dv), present (B, T + G)): the T from outside the call first (blocks -T .. -1,
        before every block of the call), then the mean of each of the call's G blocks.  Either of
        ``key`` and ``value`` may be None: its global tokens are then None too."""
        given = [x for x in (key, value) if x is not None]
        means, present = spec.pool_blocks(tuple(given), self.block_size, self.remainder, self.key_mask, self.documents)
        means = iter(means)
        key_global, value_global = (None if x is None else next(means) for x in (key, value))
        extra = self.extra_global_tokens
        if extra is None:
            return key_global, value_global, present
        key_global, value_global = (
            None if x is None else torch.cat([x_extra, x], dim=2)
            for x, x_extra in ((key_global, extra.key), (value_global, extra.value))
        )
        return key_global, value_global, torch.cat([extra.present, present], dim=1)


def resolve(query, key, value, block_size, **keywords) -> AttentionOptions:
    """Check one call's arguments (``value=None``: a call without values, ``attention_weights``);
    ``keywords``: any of the keyword options of ``global_attention`` (``NAMES``)."""
    unknown = sorted(set(keywords) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(NAMES)}")
    return _resolve(query, key, value, block_size, **keywords)


def _resolve(
    query,
    key,
    value,
    block_size,
    *,
    causal: bool = False,
    scope: str = "all",
    remainder: str | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    top_blocks: int = 0,
    window: int | None = None,
    document_ids: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    extra_global_tokens=None,
) -> AttentionOptions:
    checks.tensor("query", query)
    checks.tensor("key", key, like=query)
    batch, q_heads, q_len, head_dim = query.shape
    if head_dim == 0:
        raise ValueError("query and key must have head_dim >= 1, got 0")
    _, kv_heads, seq_len, _ = key.shape
    if key.shape[0] != batch:
        raise ValueError(f"key has batch size {key.shape[0]} but query has {batch}; they must match")
    if key.shape[3] != head_dim:
        raise ValueError(f"key has head_dim {key.shape[3]} but query has {head_dim}; they must match")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a positive multiple of key/value heads ({kv_heads})")
    if seq_len == 0:
        raise ValueError("key must hold at least one position (S >= 1)")
    if q_len > seq_len:
        raise ValueError(
            f"query length L={q_len} exceeds key length S={seq_len}; queries are the last L positions, so L <= S"
        )
    if value is not None:
        _check_value("value", value, key.shape[:3], key)
    checks.positive_int("block_size", block_size)
    checks.mode(causal, scope, remainder)
    if key_mask is not None:
        checks.bool_mask("key_mask", key_mask, (batch, seq_len), query.device)
    checks.non_negative_int("top_blocks", top_blocks, " (0 = no routing)")
    checks.window(window)
    checks.probability("dropout_p", dropout_p)
    extra = _check_extra_global_tokens(extra_global_tokens, key, value, scope, top_blocks)
    if document_ids is not None:
        _check_document_ids(document_ids, (batch, seq_len), q_len, query.device, extra)
    return AttentionOptions(
        # A block longer than the sequence cuts the same single block as b = S; clamping keeps the
        # index arithmetic of every backend inside int64 for any int the caller passes.
        block_size=min(int(block_size), seq_len),
        causal=causal,
        scope=scope,
        remainder=spec.resolve_remainder(causal, remainder),
        key_mask=key_mask,
        scale=checks.scale(scale, head_dim),
        top_blocks=int(top_blocks),
        # A window longer than the sequence sees what w = S sees (every key, or every earlier one).
        window=None if window is None else min(int(window), seq_len),
        document_ids=document_ids,
        dropout_p=float(dropout_p),
        extra_global_tokens=extra,
    )


NAMES = tuple(_resolve.__kwdefaults__)  # the keyword options, in global_attention's order


def _check_value(name: str, value, batch_heads_len: tuple, key) -> None:
    """value (B, Hkv, N, Dv): the given batch, heads and length, the key's dtype and device, Dv >= 1."""
    checks.tensor(name, value, like=key, like_name="key")
    if tuple(value.shape[:3]) != tuple(batch_heads_len) or value.shape[3] == 0:
        raise ValueError(
            f"{name} must have shape (B, Hkv, N, Dv) = {tuple(batch_heads_len)} + (Dv >= 1,), got {tuple(value.shape)}"
        )


def _check_extra_global_tokens(extra, key, value, scope: str, top_blocks: int) -> GlobalTokens | None:
    """(key (B, Hkv, T, D), value (B, Hkv, T, Dv), present (B, T) bool) or None."""
    if extra is None:
        return None
    name = "extra_global_tokens"
    if not isinstance(extra, tuple) or len(extra) != 3:
        raise ValueError(f"{name} must be a tuple (key, value, present) or None, got {checks.describe(extra)}")
    extra_key, extra_value, present = extra
    batch, kv_heads, _, head_dim = key.shape
    checks.tensor(f"{name}'s key", extra_key, layout="(B, Hkv, T, D)", like=key, like_name="key")
    if (extra_key.shape[0], extra_key.shape[1], extra_key.shape[3]) != (batch, kv_heads, head_dim):
        raise ValueError(
            f"{name}'s key must have shape (B, Hkv, T, D) with (B, Hkv, D) = {(batch, kv_heads, head_dim)} "
            f"like key, got {tuple(extra_key.shape)}"
        )
    num_extra = extra_key.shape[2]
    value_dim = None if value is None else value.shape[3]
    _check_value(f"{name}'s value", extra_value, (batch, kv_heads, num_extra), key)
    if value_dim is not None and extra_value.shape[3] != value_dim:
        raise ValueError(f"{name}'s value has Dv={extra_value.shape[3]} but value has Dv={value_dim}; they must match")
    checks.bool_mask(f"{name}'s present", present, (batch, num_extra), key.device, layout="(B, T)",
                     meaning="True = a token that may be seen")  # fmt: skip
    if scope == "own":
        raise ValueError(f'{name} cannot be used with scope="own": a row sees only its own block\'s global token')
    if top_blocks:
        raise ValueError(f"{name} cannot be used with top_blocks > 0: routing needs the raw keys of those blocks")
    return GlobalTokens(extra_key, extra_value, present)


def _check_document_ids(ids, shape: tuple, q_len: int, device, extra) -> None:
    """(B, S) integers, non-decreasing along S (docs/semantics.md, "Packed sequences")."""
    name = "document_ids"
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (B, S) = {shape}, got {checks.describe(ids)}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} must have shape (B, S) = {shape}, got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but query is on {device}; they must match")
    if q_len != shape[1]:
        raise ValueError(f"{name} needs queries at every position (L == S), got L={q_len} and S={shape[1]}")
    if extra is not None:
        raise ValueError(f"{name} cannot be used with extra_global_tokens: which document would they belong to?")
    decreasing = (ids[:, 1:] < ids[:, :-1]).nonzero()
    if len(decreasing):
        row, pos = decreasing[0].tolist()
        raise ValueError(
            f"{name} must be non-decreasing along S (one run of positions per document): row {row} goes from "
            f"{int(ids[row, pos])} to {int(ids[row, pos + 1])} at position {pos + 1}"
        )
