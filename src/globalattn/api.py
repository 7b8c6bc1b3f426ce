"""The public functions: validate the arguments, resolve the defaults, dispatch to a backend.

Backends receive arguments that are already checked and resolved (a concrete remainder rule and a
float scale), so that no backend repeats a check and every refusal reads the same.
"""

from __future__ import annotations

import torch

from globalattn import backends, checks, spec


def block_bounds(seq_len: int, block_size: int, *, remainder: str = "merge") -> list[tuple[int, int]]:
    """Half-open ``(start, end)`` of every block of ``seq_len`` positions.

    >>> block_bounds(16, 5)                      # the seed: the short tail joins the last block
    [(0, 5), (5, 10), (10, 16)]
    >>> block_bounds(16, 5, remainder="separate")
    [(0, 5), (5, 10), (10, 15), (15, 16)]
    """
    checks.positive_int("seq_len", seq_len)
    checks.positive_int("block_size", block_size)
    checks.choice("remainder", remainder, spec.REMAINDER_RULES)
    starts, ends = spec.block_starts_and_ends(seq_len, min(block_size, seq_len), remainder)
    return list(zip(starts.tolist(), ends.tolist()))


def global_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_size: int,
    *,
    causal: bool = False,
    scope: str = "all",
    remainder: str | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    top_blocks: int = 0,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Global-token attention: each query attends, in one softmax, to the keys of its own block
    and to the global tokens (the mean key/value of each block).

    Arguments (the layout of ``F.scaled_dot_product_attention``)::

        query     (B, Hq,  L, D)    Hq a multiple of Hkv: query head h reads key/value head
        key       (B, Hkv, S, D)    h // (Hq // Hkv) (grouped-query attention)
        value     (B, Hkv, S, Dv)   L <= S: query row i sits at position S - L + i
        key_mask  (B, S) bool       True at real tokens, False at padding; None = all real
        block_size                  b >= 1, a Python int

    Who sees what, for S = 12, b = 4 (``#`` local key, ``G`` global token, ``.`` not seen)::

        bidirectional, scope="all"      causal
              keys        globals             keys        globals
        q0  ####........  GGG            q0  #...........  ...
        q5  ....####....  GGG            q5  ....##......  G..
        q9  ........####  GGG            q9  ........##..  GG.

    ``scope="own"`` (bidirectional only) sees its own block's global token alone.
    ``top_blocks=k`` (default 0, off) also lets each query attend to every real token of the k
    blocks (other than its own) whose global tokens score highest for it, in the same softmax: the
    global tokens say where to look, and the query then reads the exact tokens there.
    ``remainder``: ``"merge"`` folds a short last block into the one before it (the default when
    bidirectional); ``"separate"`` keeps it (the default, and the only choice, when causal).
    A row that may see nothing (all of its keys padded) returns zeros.

    Returns ``out`` (B, Hq, L, Dv), and with ``return_lse=True`` also the natural-log
    log-sum-exp of every row's scores (B, Hq, L), float32 or better, ``-inf`` for an empty row.
    ``dropout_p`` drops attention weights (local and global alike) while training.
    ``backend``: ``"auto"`` (the fastest that covers the call, see ``explain_backend``),
    ``"triton"`` (fused kernels, CUDA), ``"flex"`` (FlexAttention, CUDA), ``"torch"`` (blocked
    PyTorch, any device, the whole contract) or ``"reference"`` (dense and explicit: the oracle,
    O(L * S) memory).  Asking for a backend that cannot compute the call is a ValueError that says why.
    """
    args = _check_call(query, key, value, block_size, causal, scope, remainder, key_mask, scale, top_blocks, dropout_p)
    checks.boolean("return_lse", return_lse)
    checks.choice("backend", backend, ("auto", *backends.NAMES))
    if backend == "auto":
        backend, _ = backends.explain_backend(query, key, value, args)
    else:
        reason = backends.unsupported_reason(backend, query, key, value, args)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot compute this call: {reason}; backend='torch' can")
    # Padding must influence nothing, and it often holds garbage (NaN, inf): zeroed once here, so
    # that no backend's weight-0 products (0 * NaN = NaN) can carry it into a real row.
    key, value = (spec.zero_padding(x, args["key_mask"]) for x in (key, value))
    out, lse = backends.get_backend(backend)(query, key, value, **args)
    return (out, lse) if return_lse else out


def explain_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_size: int,
    *,
    causal: bool = False,
    scope: str = "all",
    remainder: str | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    top_blocks: int = 0,
    dropout_p: float = 0.0,
) -> tuple[str, list[str]]:
    """The backend that ``global_attention(..., backend="auto")`` would run for these arguments,
    and why each faster backend was passed over (e.g. ``"triton: top_blocks is not supported"``).

    >>> explain_backend(q, k, v, 128)   # doctest: +SKIP
    ('triton', [])
    """
    args = _check_call(query, key, value, block_size, causal, scope, remainder, key_mask, scale, top_blocks, dropout_p)
    return backends.explain_backend(query, key, value, args)


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    block_size: int,
    *,
    causal: bool = False,
    scope: str = "all",
    remainder: str | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    top_blocks: int = 0,
) -> torch.Tensor:
    """The explicit attention weights of ``global_attention`` (same arguments, no values needed).

    Returns (B, Hq, L, S + G): the S key columns first (the own block's keys, and with
    ``top_blocks`` the routed blocks' keys), then one column per global token.
    Each row sums to 1 (or is all zeros when the row may see nothing); cells a query may not see
    are exactly 0.  Dense, for visualisation and explanation, not for long sequences.
    """
    from globalattn.backends.reference import reference_weights

    args = _check_attention_args(query, key, block_size, causal, scope, remainder, key_mask, scale, top_blocks)
    return reference_weights(query, key, **args)


# ---------------------------------------------------------------------------------------------
# Validation: every refusal is a ValueError that names the argument and what would be valid.


def _check_call(query, key, value, block_size, causal, scope, remainder, key_mask, scale, top_blocks, dropout_p):
    """Check a call of global_attention (all but its output options); return the backends' arguments."""
    args = _check_attention_args(query, key, block_size, causal, scope, remainder, key_mask, scale, top_blocks)
    _check_value(value, key)
    checks.probability("dropout_p", dropout_p)
    return {**args, "dropout_p": dropout_p}


def _check_attention_args(query, key, block_size, causal, scope, remainder, key_mask, scale, top_blocks) -> dict:
    """Check everything but the values and the backend-specific options; return the resolved options."""
    _check_tensor("query", query, query)
    _check_tensor("key", key, query)
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
    checks.positive_int("block_size", block_size)
    checks.mode(causal, scope, remainder)
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask must be a bool tensor (True = real token), got {checks.describe(key_mask)}")
        if tuple(key_mask.shape) != (batch, seq_len):
            raise ValueError(f"key_mask must have shape (B, S) = {(batch, seq_len)}, got {tuple(key_mask.shape)}")
        if key_mask.device != query.device:
            raise ValueError(f"key_mask is on {key_mask.device} but query is on {query.device}; they must match")
    checks.non_negative_int("top_blocks", top_blocks, " (0 = no routing)")
    return dict(
        # A block longer than the sequence cuts the same single block as b = S; clamping keeps the
        # index arithmetic of every backend inside int64 for any int the caller passes.
        block_size=min(int(block_size), seq_len),
        causal=causal,
        scope=scope,
        remainder=spec.resolve_remainder(causal, remainder),
        key_mask=key_mask,
        scale=checks.scale(scale, head_dim),
        top_blocks=int(top_blocks),
    )


def _check_tensor(name: str, t, query) -> None:
    """A 4-d floating-point tensor with the dtype and device of ``query``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, H, seq, head_dim), got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions (B, H, seq, head_dim), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if t.dtype != query.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but query has {query.dtype}; all must match")
    if t.device != query.device:
        raise ValueError(f"{name} is on {t.device} but query is on {query.device}; all must match")


def _check_value(value, key) -> None:
    """value (B, Hkv, S, Dv): the (already checked) key's batch, heads and length, a head dim >= 1."""
    _check_tensor("value", value, key)
    if value.shape[:3] != key.shape[:3] or value.shape[3] == 0:
        raise ValueError(
            f"value must have shape (B, Hkv, S, Dv) = {tuple(key.shape[:3])} + (Dv >= 1,) like key, "
            f"got {tuple(value.shape)}"
        )
