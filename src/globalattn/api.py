"""The public functions: check the arguments once, pick a backend, run it.

``options.resolve`` checks every argument and resolves the defaults into one ``AttentionOptions``;
the backends receive that object and trust it, so that no backend repeats a check and every
refusal reads the same.
"""

from __future__ import annotations

import dataclasses

import torch

from globalattn import backends, checks, options, spec
from globalattn.options import GlobalTokens


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
    window: int | None = None,
    document_ids: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    extra_global_tokens: GlobalTokens | tuple | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Global-token attention: each query attends, in one softmax, to the keys of its own block
    and to the global tokens (the mean key/value of each block).  The contract, exactly:
    docs/semantics.md.

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
    ``window=w`` (default None, off): the local keys of a row are the raw positions within w of it
    (causal ``p - w < s <= p``, bidirectional ``|s - p| < w``) instead of its block's, so no token
    is cut off from the ones just before it (LongT5 / Longformer); the blocks still define the
    global tokens and which of them a row sees.  With ``top_blocks`` the raw keys are the union of
    the window and the routed blocks.
    ``document_ids`` (B, S) int, non-decreasing along S: packed documents, each computed exactly as
    if it were alone (blocks cut from each document's start; no key, global token or routed block
    of another document); needs L == S.
    ``remainder``: ``"merge"`` folds a short last block into the one before it (the default when
    bidirectional); ``"separate"`` keeps it (the default, and the only choice, when causal).
    ``extra_global_tokens=(key (B, Hkv, T, D), value (B, Hkv, T, Dv), present (B, T) bool)``: the
    global tokens of blocks outside this call (a decoding cache's finished blocks, other ranks'
    blocks), seen by every query row in the same softmax, with gradients; in causal mode they must
    be complete blocks before the call's first position.  Not with ``top_blocks`` or ``scope="own"``.
    A row that may see nothing (all of its keys padded) returns zeros.

    Returns ``out`` (B, Hq, L, Dv), and with ``return_lse=True`` also the natural-log
    log-sum-exp of every row's scores (B, Hq, L), float32 or better, ``-inf`` for an empty row.
    ``dropout_p`` drops attention weights (local and global alike) while training.
    ``backend``: ``"auto"`` (the fastest that covers the call, see ``explain_backend``),
    ``"triton"`` (fused kernels, CUDA), ``"flex"`` (FlexAttention, CUDA), ``"torch"`` (blocked
    PyTorch, any device, the whole contract) or ``"reference"`` (dense and explicit: the oracle,
    O(L * S) memory).  Asking for a backend that cannot compute the call is a ValueError that says why.
    """
    resolved = _resolve(
        query, key, value, block_size, dict(causal=causal, scope=scope, remainder=remainder, key_mask=key_mask,
        scale=scale, top_blocks=top_blocks, window=window, document_ids=document_ids, dropout_p=dropout_p,
        extra_global_tokens=extra_global_tokens),
    )  # fmt: skip
    checks.boolean("return_lse", return_lse)
    checks.choice("backend", backend, ("auto", *backends.NAMES))
    if backend == "auto":
        backend, _ = _choose_backend(query, key, value, resolved)
    else:
        reason = backends.get(backend).unsupported(query, key, value, resolved)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot compute this call: {reason}; backend='torch' can")
    key, value, resolved = _without_padding(key, value, resolved)
    if resolved.document_ids is not None:
        out, lse = _attend_packed(backends.get(backend), query, key, value, resolved)
    else:
        out, lse = backends.get(backend).attention(query, key, value, resolved)
    return (out, lse) if return_lse else out


def explain_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_size: int, **options):
    """The backend that ``global_attention(..., backend="auto")`` would run for these arguments
    (the keyword options of ``global_attention``, but ``return_lse`` and ``backend``), and why each
    faster backend was passed over (e.g. ``"triton: top_blocks is not supported"``).

    >>> explain_backend(q, k, v, 128)   # doctest: +SKIP
    ('triton', [])
    """
    return _choose_backend(query, key, value, _resolve(query, key, value, block_size, options))


def attention_weights(query: torch.Tensor, key: torch.Tensor, block_size: int, **options) -> torch.Tensor:
    """The explicit attention weights of ``global_attention`` (the same keyword options but
    ``dropout_p``, ``extra_global_tokens``, ``return_lse`` and ``backend``; no values needed).

    Returns (B, Hq, L, S + G): the S key columns first (the own block's keys, or with ``window`` the
    window's, and with ``top_blocks`` the routed blocks' keys), then one column per global token (with
    ``document_ids``, a row's blocks are its documents', G the most of any row, the rest zeros).
    Each row sums to 1 (or is all zeros when the row may see nothing); cells a query may not see
    are exactly 0.  Dense, for visualisation and explanation, not for long sequences.
    """
    for name in ("dropout_p", "extra_global_tokens"):
        if name in options:
            raise ValueError(f"attention_weights takes no {name}: it returns the weights of the call's own columns")
    resolved = _resolve(query, key, None, block_size, options, needs_value=False)
    reference = backends.get("reference")
    if resolved.document_ids is None:
        return reference.weights(query, key, resolved)
    # Packed documents: each row has its own blocks, so its own number of global columns; the rows
    # are computed one at a time (this is for looking at), their global columns padded with zeros.
    rows = []
    for row, ids in enumerate(resolved.document_ids):
        mask = None if resolved.key_mask is None else resolved.key_mask[row : row + 1]
        documents = spec.document_blocks(ids[None], resolved.block_size, resolved.remainder)
        one = dataclasses.replace(resolved, key_mask=mask, documents=documents)
        rows.append(reference.weights(query[row : row + 1], key[row : row + 1], one))
    if not rows:  # an empty batch: its rows have no blocks
        return reference.weights(query, key, resolved)
    width = max(w.shape[-1] for w in rows)
    return torch.cat([torch.nn.functional.pad(w, (0, width - w.shape[-1])) for w in rows])


def _resolve(query, key, value, block_size, keywords: dict, needs_value=True) -> options.AttentionOptions:
    if needs_value and value is None:
        checks.tensor("value", value, layout="(B, Hkv, S, Dv)")  # refuses it, in the usual words
    return options.resolve(query, key, value, block_size, **keywords)


def _choose_backend(query, key, value, resolved) -> tuple[str, list[str]]:
    """The backend ``"auto"`` picks for these inputs, and why each faster one was passed over.

    On CUDA: triton when it covers the inputs, else flex, else torch.  Elsewhere: torch (the fused
    backends are GPU kernels; the Triton interpreter is for testing, not speed).
    """
    if query.device.type != "cuda":
        return "torch", [f"inputs are on {query.device.type}, and the fused backends are for CUDA"]
    passed_over = []
    for name in ("triton", "flex"):
        reason = backends.get(name).unsupported(query, key, value, resolved)
        if reason is None:
            return name, passed_over
        passed_over.append(f"{name}: {reason}")
    return "torch", passed_over


def _attend_packed(backend, query, key, value, resolved):
    """Packed documents: the rows laid end to end as one row (every row starts a document), each
    document cut into its own blocks, so that a backend computes the whole batch in one call."""
    batch, seq_len = resolved.document_ids.shape

    def one_row(x):  # (B, H, S, E) -> (1, H, B * S, E)
        return x.transpose(0, 1).reshape(1, x.shape[1], batch * seq_len, x.shape[3])

    flat = dataclasses.replace(
        resolved,
        key_mask=None if resolved.key_mask is None else resolved.key_mask.reshape(1, -1),
        documents=spec.document_blocks(resolved.document_ids, resolved.block_size, resolved.remainder),
    )
    out, lse = backend.attention(one_row(query), one_row(key), one_row(value), flat)
    out = out[0].unflatten(1, (batch, seq_len)).transpose(0, 1)  # (B, Hq, S, Dv)
    return out, lse[0].unflatten(1, (batch, seq_len)).transpose(0, 1)


def _without_padding(key, value, resolved):
    """Padding must influence nothing, and it often holds garbage (NaN, inf): zeroed once here, by
    selection, so that no backend's weight-0 products (0 * NaN = NaN) can carry it into a real row.
    The same for global tokens from outside the call that are not present."""
    key, value = (spec.zero_padding(x, resolved.key_mask) for x in (key, value))
    extra = resolved.extra_global_tokens
    if extra is not None:
        extra_key, extra_value = (spec.zero_padding(x, extra.present) for x in extra[:2])
        resolved = dataclasses.replace(
            resolved, extra_global_tokens=GlobalTokens(extra_key, extra_value, extra.present)
        )
    return key, value, resolved
