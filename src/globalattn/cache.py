"""Incremental causal global attention: a decoding cache of O(b + S/b) entries per layer, not O(S).

In causal mode a query at position p, in block c = p // b, attends to the keys of block c up to p and
to the global tokens of the complete blocks j < c (docs/semantics.md, "Who attends to what").  A
decoder therefore needs, per layer, only the keys/values of the current, unfinished block (fewer
than b) and one pooled key/value per finished block (S // b of them): at S = 128k and b = 256, 768
entries instead of 131072.  With ``window=w`` it needs the last w raw positions instead of the
current block: it keeps them from the block that holds the first of them, fewer than w + b.
``PooledKVCache`` keeps exactly that.  Each step appends L new positions (a prompt, or one token)::

    window  = [the cached raw positions ; the L new ones]   (starts on a block boundary)
    outputs = global_attention(new queries, window, causal=True, window=w,
                               extra_global_tokens=the pooled tokens of the blocks before it)
    then every block the step completed is pooled, and the raw positions a next query may see are kept

which is, to rounding, the last L rows of ``global_attention(causal=True)`` over the whole sequence
(docs/semantics.md, "Global tokens from outside the call"): one call and one softmax per step,
through the same backends as training, with O(b + S/b) work (O(w + b + S/b) with a window) and no
re-pooling of the prefix."""

from __future__ import annotations

import torch

from globalattn import checks, spec
from globalattn.api import global_attention


class PooledKVCache:
    """One attention layer's decoding cache for causal global attention (``remainder="separate"``).

    Two calls per step, in the order of a model's attention layer: store the new keys and values,
    then attend with the new queries::

        window_key, window_value = cache.update(key, value)    # key (B, Hkv, L, D), value (B, Hkv, L, Dv)
        out = cache.attend(query, block_size=b)                # query (B, Hq, L, D) -> out (B, Hq, L, Dv)

    ``out`` is the last L rows of ``global_attention(q, k, v, b, causal=True, window=w)`` over every
    position appended so far.  ``update`` returns the window [raw positions ; new positions]
    (B, Hkv, R + L, ·), for callers that hand keys to an attention function.  ``attend(key_mask=...)``
    (B, L) bool marks padding among the new positions (True = real), as ``global_attention``'s
    key_mask does.  ``block_size`` and ``window`` are fixed by the first ``attend``.

    Held between steps (``G = S // b`` finished blocks; ``R`` raw positions from ``raw_start``, the
    first block that a next query's window reaches: without a window the current, unfinished block,
    ``R = S mod b``; with one, ``R < w + b``)::

        raw_key, raw_value       (B, Hkv, R, D), (B, Hkv, R, Dv)   the raw positions raw_start .. S - 1
        raw_mask                 (B, R) bool                        their real tokens
        pooled_key, pooled_value (B, Hkv, G, D), (B, Hkv, G, Dv)   the mean of each finished block
        pooled_present           (B, G) bool                        the block had a real token

    >>> cache, q, k, v = PooledKVCache(), torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    >>> _ = cache.update(k[:, :, :7], v[:, :, :7]); prompt = cache.attend(q[:, :, :7], block_size=3)
    >>> _ = cache.update(k[:, :, 7:], v[:, :, 7:]); step = cache.attend(q[:, :, 7:], block_size=3)
    >>> torch.allclose(step, global_attention(q, k, v, 3, causal=True)[:, :, 7:], atol=1e-6)
    True
    >>> cache.length, cache.raw_key.shape[2], cache.pooled_key.shape[2]     # 9 positions: 0 + 3 blocks
    (9, 0, 3)
    """

    def __init__(self):
        self.length = 0  # positions appended so far (S)
        self.block_size: int | None = None  # fixed by the first attend, as is the window
        self.window: int | None = None
        self.raw_start = 0  # position of raw_key[:, :, 0], a block boundary
        self.raw_key = self.raw_value = self.raw_mask = None
        self.pooled_key = self.pooled_value = self.pooled_present = None
        self._window: tuple[torch.Tensor, torch.Tensor] | None = None  # staged by update, consumed by attend
        self.pending = 0  # new positions staged by update and not yet attended

    @property
    def nbytes(self) -> int:
        """Bytes held between steps (every stored key, value and mask)."""
        held = (self.raw_key, self.raw_value, self.raw_mask, self.pooled_key, self.pooled_value)
        return sum(t.numel() * t.element_size() for t in (*held, self.pooled_present) if t is not None)

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage L new positions; returns the window [raw positions ; new] (B, Hkv, R + L, D) and (…, Dv)."""
        if self.pending:
            raise RuntimeError(
                f"update() was called again while {self.pending} positions await attend(): "
                "every update() must be followed by one attend() with its queries"
            )
        checks.tensor("key", key, layout="(B, Hkv, L, head_dim)")
        checks.tensor("value", value, layout="(B, Hkv, L, Dv)")
        if value.shape[:3] != key.shape[:3] or value.dtype != key.dtype:
            raise ValueError(
                f"value must have key's (B, Hkv, L) = {tuple(key.shape[:3])} and dtype {key.dtype}, "
                f"got {checks.describe(value)}"
            )
        if key.shape[2] == 0:
            raise ValueError("key must hold at least one new position (L >= 1)")
        if self.raw_key is None:
            self._start(key, value)
        for name, new, held in (("key", key, self.raw_key), ("value", value, self.raw_value)):
            if _layout(new) != _layout(held):
                raise ValueError(
                    f"{name} must continue the cached sequence: (B, Hkv, ·, head_dim) = "
                    f"{(*held.shape[:2], '·', held.shape[3])}, {held.dtype} on {held.device}; "
                    f"got {checks.describe(new)}"
                )
        self._window = (torch.cat([self.raw_key, key], dim=2), torch.cat([self.raw_value, value], dim=2))
        self.pending = key.shape[2]
        self.length += key.shape[2]
        return self._window

    def attend(
        self,
        query: torch.Tensor,
        *,
        block_size: int,
        window: int | None = None,
        key_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Outputs (B, Hq, L, Dv) of the L staged positions, whose queries are ``query`` (B, Hq, L, D).

        Then folds every block completed by this step into one pooled key/value.  ``block_size``
        and ``window`` must be the same at every step; ``key_mask`` (B, L) bool, True at the new
        real tokens.
        """
        if not self.pending:
            raise RuntimeError("attend() needs update() first: it attends with the positions update() staged")
        checks.positive_int("block_size", block_size)
        checks.window(window)
        if self.block_size is not None and (block_size, window) != (self.block_size, self.window):
            raise ValueError(
                f"block_size and window must stay {self.block_size} and {self.window} (the cache's), "
                f"got {block_size} and {window}"
            )
        batch, kv_heads, _, head_dim = self._window[0].shape
        dtype, device = self._window[0].dtype, self._window[0].device
        new = self.pending
        if (
            not isinstance(query, torch.Tensor)
            or query.dim() != 4
            or (query.shape[0], query.shape[2], query.shape[3]) != (batch, new, head_dim)
            or query.shape[1] % kv_heads
            or (query.dtype, query.device) != (dtype, device)
        ):
            raise ValueError(
                f"query must be a {dtype} tensor on {device} of shape (B={batch}, Hq, L={new}, "
                f"D={head_dim}) (the staged positions), Hq a multiple of {kv_heads}; got {checks.describe(query)}"
            )
        if key_mask is not None:
            checks.bool_mask("key_mask", key_mask, (batch, new), device, layout="(B, L)")
        new_mask = torch.ones(batch, new, dtype=torch.bool, device=query.device) if key_mask is None else key_mask
        window_mask = torch.cat([self.raw_mask, new_mask.to(self.raw_mask.device)], dim=1)  # (B, R + L)
        # Garbage at padding positions must reach nothing, here and in the blocks kept for later steps.
        window_key, window_value = (spec.zero_padding(x, window_mask) for x in self._window)

        # The window starts on a block boundary, so it is cut into the same blocks as the whole
        # sequence; the finished blocks before it are global tokens every new query may see.
        before = self.raw_start // block_size
        earlier_blocks = (self.pooled_key[:, :, :before], self.pooled_value[:, :, :before],
                          self.pooled_present[:, :before]) if before else None  # fmt: skip
        out = global_attention(query, window_key, window_value, block_size, causal=True, window=window,
                               key_mask=window_mask, scale=scale, extra_global_tokens=earlier_blocks)  # fmt: skip
        self.block_size, self.window, self.pending, self._window = block_size, window, 0, None
        self._fold(window_key, window_value, window_mask)
        return out

    def index_batch(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (LongTensor), in that order: beam search reordering, selection, repeats."""
        if self.pending:
            raise RuntimeError("index_batch() between update() and attend(): finish the step first")
        for name in ("raw_key", "raw_value", "raw_mask", "pooled_key", "pooled_value", "pooled_present"):
            held = getattr(self, name)
            if held is not None:
                setattr(self, name, held.index_select(0, index.to(held.device)))

    # ---------------------------------------------------------------------------------------------

    def _start(self, key, value) -> None:
        """Empty state with the batch, heads, head dims, dtype and device of the first keys/values."""
        batch, kv_heads = key.shape[:2]
        self.raw_key, self.pooled_key = (key.new_empty(batch, kv_heads, 0, key.shape[3]) for _ in range(2))
        self.raw_value, self.pooled_value = (value.new_empty(batch, kv_heads, 0, value.shape[3]) for _ in range(2))
        self.raw_mask, self.pooled_present = (key.new_ones(batch, 0, dtype=torch.bool) for _ in range(2))

    def _fold(self, window_key, window_value, window_mask) -> None:
        """Pool the blocks this step completed; keep the raw positions a next query may see."""
        b = self.block_size
        finished = self.pooled_key.shape[2]  # blocks pooled before this step
        first_new = finished * b - self.raw_start  # window offset of the first block not yet pooled
        done = (window_key.shape[2] - first_new) // b * b  # positions of the blocks this step completed
        if done:
            completed = slice(first_new, first_new + done)
            (key_means, value_means), present = spec.pool_blocks(
                (window_key[:, :, completed], window_value[:, :, completed]), b, "separate", window_mask[:, completed]
            )
            self.pooled_key = torch.cat([self.pooled_key, key_means], dim=2)
            self.pooled_value = torch.cat([self.pooled_value, value_means], dim=2)
            self.pooled_present = torch.cat([self.pooled_present, present], dim=1)
        # Keep from the block that holds the first key a next query's window reaches (without a
        # window: the current block), so that the next window starts on a block boundary too.
        reach = self.length if self.window is None else max(0, self.length - self.window + 1)
        keep = reach // b * b - self.raw_start
        # Copies, not views: a view would keep a long prompt's whole window alive.
        self.raw_key = window_key[:, :, keep:].clone()
        self.raw_value = window_value[:, :, keep:].clone()
        self.raw_mask = window_mask[:, keep:].clone()
        self.raw_start += keep


def _layout(x: torch.Tensor) -> tuple:
    """What must stay the same from step to step: batch, heads, head dim, dtype, device."""
    return x.shape[0], x.shape[1], x.shape[3], x.dtype, x.device
