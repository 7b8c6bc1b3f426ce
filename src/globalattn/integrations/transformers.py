"""Hugging Face ``transformers``: global attention as an ``attn_implementation``, and a decoding cache.

    from globalattn.integrations.transformers import GlobalAttentionCache, register

    register()                                      # attn_implementation="global_attention"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="global_attention",
                                                 global_attention_block_size=64)   # global_attention_window=w too
    out = model.generate(input_ids, past_key_values=GlobalAttentionCache(), max_new_tokens=50)

Every attention layer that calls ``transformers``' ``AttentionInterface`` then computes

    global_attention(query, key, value, block_size, causal=module.is_causal, remainder="separate",
                     key_mask=the 2D padding mask, scale=module's scaling, window=window)

with grouped-query heads taken from the key/value head count, and the block size from the forward's
``global_attention_block_size`` keyword or, failing that, ``config.global_attention_block_size``; the
window (None, the default: the own block's keys) likewise from ``global_attention_window``.
``remainder="separate"`` in both modes: a short last block stays its own, so that a sequence's real
tokens get the same outputs however much right padding its batch adds.  ``GlobalAttentionCache``
keeps, per layer, O(b + S/b) entries instead of S, O(w + b + S/b) with a window (see ``globalattn.cache``).

Packed batches (``DataCollatorWithFlattening``: documents laid end to end, ``position_ids`` restarting
at each) pass ``document_ids=`` derived from the ``position_ids`` the layer receives, so that each
document is computed as if it were alone; positions that run on give None, the unpacked call.

Needs transformers >= 4.56 (the first release with both interfaces and the per-layer ``Cache`` that
the cache builds on).  Details, supported models and limits: docs/huggingface.md.
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from globalattn import checks
from globalattn.api import global_attention
from globalattn.cache import PooledKVCache

MIN_TRANSFORMERS = "4.56"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(
        f"globalattn.integrations.transformers needs transformers>={MIN_TRANSFORMERS} "
        f"(pip install 'globalattn[hf]'); found {transformers.__version__}"
    )

BLOCK_SIZE_KEY = "global_attention_block_size"  # config attribute, or keyword of the model's forward
WINDOW_KEY = "global_attention_window"  # the same; None: no window
# transformers hands the attention function only what ``Cache.update`` returned, so the cache marks
# the keys it returns with the layer state that must attend with them.
_STAGED_BY = "_globalattn_staged_by"
# Every layer of a forward receives the same position_ids tensor: the first one marks it with the
# documents it found, so that the others neither recompute them nor wait for the device again.
_DOCUMENTS = "_globalattn_documents"


def register(name: str = "global_attention") -> str:
    """Register global attention under ``name`` with ``AttentionInterface`` and its padding-mask
    function with ``AttentionMaskInterface`` (without the latter, models drop the padding mask).

    Afterwards ``from_pretrained(..., attn_implementation=name)`` and
    ``model.set_attn_implementation(name)`` work.  Returns ``name``.
    """
    if not isinstance(name, str) or not name or name == "eager":
        raise ValueError(f"name must be a non-empty string other than 'eager', got {name!r}")
    for interface, function in (
        (AttentionInterface(), global_attention_forward),
        (AttentionMaskInterface(), global_attention_mask),
    ):
        if interface.get(name, function) is not function:
            raise ValueError(f"name {name!r} is already registered by another {type(interface).__name__} entry")
    AttentionInterface.register(name, global_attention_forward)
    AttentionMaskInterface.register(name, global_attention_mask)
    # from_pretrained routes a keyword into the config only if the config already has that
    # attribute, else hands it to the model's __init__ (a TypeError).  Declaring it on the base
    # class (None = unset) makes the one-line form work for every model and AutoConfig
    # (sentence-transformers' config_kwargs included); a value set this way is saved with the model.
    for key in (BLOCK_SIZE_KEY, WINDOW_KEY):
        if not hasattr(PretrainedConfig, key):
            setattr(PretrainedConfig, key, None)
    return name


def global_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function.

    query (B, Hq, L, D), key (B, Hkv, S, D), value (B, Hkv, S, Dv), attention_mask (B, S) bool from
    ``global_attention_mask`` (True = real) or None.  Returns (out (B, L, Hq, Dv), None): no weights.
    """
    _check_layer(module, kwargs)
    block_size, window = _block_size(module, kwargs), _window(module, kwargs)
    # The module says whether the layer is causal: the is_causal keyword can be a hint for sdpa
    # instead (GPT-2 in 4.x passes False for causal layers whenever a mask is given).
    causal = getattr(module, "is_causal", None)
    causal = kwargs.get("is_causal", True) if causal is None else causal
    key_mask = _key_mask(module, attention_mask, key)
    document_ids = _document_ids(module, kwargs.get("position_ids"), key_mask, query)
    staged_by: PooledKVCache | None = getattr(key, _STAGED_BY, None)
    if document_ids is not None and (staged_by is not None or key.shape[2] != query.shape[2]):
        raise ValueError(
            f"{_name(module)} got packed sequences (position_ids that restart) with keys held from earlier calls: "
            "a cache cannot tell which document its positions belong to, so run packed batches without a cache "
            "(use_cache=False) and decode each sequence in its own row"
        )
    if staged_by is not None:  # a GlobalAttentionCache step: key is [raw positions held ; new positions]
        if not causal:
            raise ValueError(f"{_name(module)} is bidirectional; GlobalAttentionCache decodes causal layers only")
        new_mask = None if key_mask is None else key_mask[:, -query.shape[2] :]
        out = staged_by.attend(query, block_size=block_size, window=window, key_mask=new_mask, scale=scaling)
    else:
        options = dict(causal=causal, remainder="separate", key_mask=key_mask, scale=scaling, dropout_p=dropout)
        out = global_attention(query, key, value, block_size, window=window, document_ids=document_ids, **options)
    return out.transpose(1, 2).contiguous(), None  # (B, L, Hq, Dv)


def global_attention_mask(
    batch_size: int, kv_length: int, kv_offset: int = 0, attention_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` function: the keys' padding mask (B, kv_length) bool, True =
    real, or None when every key is real.

    Global attention brings its own pattern (blocks, causality), so the model's mask function
    (causal, sliding window, ...) is not used; only the 2D padding mask of the keys matters.
    """
    # Queries are the last positions of the keys (global_attention's L <= S rule).  A fixed-size
    # cache (StaticCache, cache_implementation="static") pads its keys to its length, and is the
    # one that gives the query offset as a tensor; its padded mask would pass every check below.
    if isinstance(kwargs.get("q_offset"), torch.Tensor):
        raise ValueError(
            "global attention needs keys that end at the last query, and a fixed-size cache (StaticCache, "
            "cache_implementation='static') pads them: pass a GlobalAttentionCache() (or a DynamicCache) as the cache"
        )
    if attention_mask is None:
        return None
    key_mask = attention_mask[:, kv_offset : kv_offset + kv_length].bool()
    if key_mask.shape[1] != kv_length:
        raise ValueError(
            f"the attention mask covers {attention_mask.shape[1]} positions, the keys run to {kv_offset + kv_length}: "
            "global attention needs keys that end at the last query, as with DynamicCache or GlobalAttentionCache"
        )
    # Skipping an all-real mask saves work in eager mode; under torch.compile the check breaks the graph.
    return key_mask if torch.compiler.is_compiling() or not bool(key_mask.all()) else None


class GlobalAttentionCacheLayer(CacheLayerMixin):
    """One layer of ``GlobalAttentionCache``: a ``PooledKVCache`` behind transformers' layer API."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.state = PooledKVCache()

    def lazy_initialization(self, key_states, value_states=None) -> None:
        """Nothing to allocate ahead: the state takes its shapes from the first update."""

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.state.update(key_states, value_states)
        setattr(keys, _STAGED_BY, self.state)
        return keys, values

    def get_seq_length(self, *args) -> int:
        return self.state.length

    def get_mask_sizes(self, query) -> tuple[int, int]:
        """(kv_length, kv_offset) of the keys ``update`` will return: [raw positions held ; new positions].

        ``query``: the query length (transformers 5) or the new positions (4.x)."""
        query_length = query if isinstance(query, int) else query.shape[0]
        fill = 0 if self.state.raw_key is None else self.state.raw_key.shape[2]
        return fill + query_length, self.state.length - fill

    def get_max_length(self) -> int:
        return -1  # no maximum (transformers 5)

    def get_max_cache_shape(self) -> int:
        return -1  # no maximum (transformers 4.x)

    def reset(self) -> None:
        self.state = PooledKVCache()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state.index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state.index_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state.raw_key is not None:
            batch = self.state.raw_key.shape[0]
            self.state.index_batch(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, *args) -> None:
        raise ValueError(
            "GlobalAttentionCache cannot crop: finished blocks are pooled, so earlier states cannot be restored "
            "(assisted or speculative decoding needs a DynamicCache)"
        )


class GlobalAttentionCache(Cache):
    """A ``transformers`` ``Cache`` for causal models that run ``attn_implementation="global_attention"``.

    Per layer, the keys/values of the current, unfinished block (with a window: of the raw positions
    it reaches, from the start of their block) and one pooled key/value per finished block:
    O(b + S/b) entries, O(w + b + S/b) with a window, instead of the S of a ``DynamicCache``.  Greedy
    generation gives the same tokens as without a cache.  ``nbytes``: the bytes held, all layers together.

    >>> out = model.generate(input_ids, past_key_values=GlobalAttentionCache(), max_new_tokens=50)  # doctest: +SKIP
    """

    def __init__(self):
        super().__init__(layer_class_to_replicate=GlobalAttentionCacheLayer)

    @property
    def nbytes(self) -> int:
        return sum(layer.state.nbytes for layer in self.layers)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # A layer whose attention is not global attention never attends with what it stored; say so
        # at the next update, before more wrong outputs are computed from it.
        for idx in (layer_idx - 1, layer_idx):
            if 0 <= idx < len(self.layers) and self.layers[idx].state.pending:
                raise RuntimeError(
                    f"GlobalAttentionCache layer {idx} stored keys that no attention used: the model must run "
                    f"attn_implementation='global_attention' (see globalattn.integrations.transformers.register)"
                )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# The checks of global_attention_forward: each refusal names the layer.


def _name(module) -> str:
    layer_idx = getattr(module, "layer_idx", None)
    return type(module).__name__ + ("" if layer_idx is None else f" (layer {layer_idx})")


def _check_layer(module, kwargs) -> None:
    """Refuse the layers whose attention global attention cannot stand in for."""
    if getattr(module, "is_cross_attention", False) or "CrossAttention" in type(module).__name__:
        problem = "is cross-attention: global attention pools blocks of the query's own sequence"
    elif kwargs.get("sliding_window") is not None:
        problem = f"uses a sliding window ({kwargs['sliding_window']} tokens); global attention replaces full attention"
    elif kwargs.get("softcap") is not None:
        problem = "soft-caps its attention logits"
    elif kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        problem = "has attention sinks"
    elif kwargs.get("position_bias") is not None:
        problem = "adds a position bias to its attention scores"
    else:
        return
    raise ValueError(f"{_name(module)} {problem}, so it cannot use attn_implementation='global_attention'")


def _setting(module, kwargs, key: str):
    """(value, where it came from): the forward's ``key=`` keyword, or failing that ``config.<key>``
    (None when neither is set)."""
    if kwargs.get(key) is not None:
        return kwargs[key], f"the {key}= keyword"
    return getattr(getattr(module, "config", None), key, None), f"config.{key}"


def _block_size(module, kwargs) -> int:
    size, where = _setting(module, kwargs, BLOCK_SIZE_KEY)
    if size is None:
        raise ValueError(
            f"{_name(module)} needs a block size for global attention: set model.config.{BLOCK_SIZE_KEY} = 64 "
            f"(or pass {BLOCK_SIZE_KEY}=64 to from_pretrained, which stores it in the config), or pass "
            f"{BLOCK_SIZE_KEY}=64 to the model's forward"
        )
    checks.positive_int(BLOCK_SIZE_KEY, size, f" (from {where})")
    return int(size)


def _window(module, kwargs) -> int | None:
    window, where = _setting(module, kwargs, WINDOW_KEY)
    if window is None:
        return None
    checks.positive_int(WINDOW_KEY, window, f" (from {where}; None: no window)")
    return int(window)


def _document_ids(module, position_ids, key_mask, query) -> torch.Tensor | None:
    """The (B, L) document of every query position of a packed batch, or None when there is one
    sequence per row: a document starts wherever a real token's position id is not one more than
    that of the real token before it (``DataCollatorWithFlattening`` restarts them at each sequence).

    Padding (``key_mask`` False) never starts or splits a document: left padding, whose position ids
    ``generate`` sets to 1 before the first real token's 0, stays one sequence (blocks cut from slot 0),
    and padding between packed documents joins the one before it, where it changes nothing.
    """
    batch, length = query.shape[0], query.shape[2]
    # Multimodal rotary embeddings pass (3, B, L) position ids: no documents to read from those.
    if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2 or position_ids.shape[1] != length:
        return None
    if length < 2:  # a decoding step
        return None
    real = None if key_mask is None else key_mask[:, -length:]
    # (1, L) is common for B rows; a model split over devices gives its layers the first one's ids.
    positions = position_ids.to(query.device).expand(batch, -1)
    if torch.compiler.is_compiling():
        # Whether documents are there is a fact about the data: branching on it would break the
        # graph of every compiled forward, packed or not.  Unpacked batches stay one graph; packed
        # ones are refused on the device, the message naming the layer.
        torch._assert_async(
            ~_restarts(positions, real).any(),
            f"{_name(module)} got packed sequences (position_ids that restart) under torch.compile: global attention "
            "finds their documents in eager mode only, so train packed batches without torch.compile",
        )
        return None
    # The version counter tells an in-place change of the position ids (a reused buffer) from the
    # same forward's next layer; tensors made under torch.inference_mode have none, so no memo.
    stamp = None if position_ids.is_inference() else (position_ids._version, batch, length)
    memo = getattr(position_ids, _DOCUMENTS, None)
    if stamp is not None and memo is not None and memo[0] == stamp and memo[1] is key_mask:
        document_ids = memo[2]
    else:
        restarts = _restarts(positions, real)
        document_ids = None
        if bool(restarts.any()):
            first = restarts.new_zeros(batch, 1, dtype=torch.long)
            document_ids = torch.cat([first, restarts.long().cumsum(1)], dim=1)
        if stamp is not None:
            setattr(position_ids, _DOCUMENTS, (stamp, key_mask, document_ids))
    return None if document_ids is None else document_ids.to(query.device)


def _restarts(positions, real) -> torch.Tensor:
    """(B, L - 1) bool: does the position at t + 1 start a new document (see ``_document_ids``)?"""
    if real is None:
        return positions[:, 1:] != positions[:, :-1] + 1
    index = torch.arange(positions.shape[1], device=positions.device)
    last_real = torch.where(real, index, -1).cummax(dim=1).values[:, :-1]  # the last real token before t + 1
    previous = positions.gather(1, last_real.clamp(min=0))
    return real[:, 1:] & (last_real >= 0) & (positions[:, 1:] != previous + 1)


def _key_mask(module, attention_mask, key) -> torch.Tensor | None:
    """The (B, S) bool padding mask of the keys, checked against them."""
    if attention_mask is None:
        return None
    expected = (key.shape[0], key.shape[2])
    if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != expected:
        raise ValueError(
            f"{_name(module)} got an attention mask of shape {tuple(attention_mask.shape)} ({attention_mask.dtype}); "
            f"global attention takes the keys' 2D padding mask (B, S) = {expected}, as its registered mask function "
            "makes it: pass a 2D attention_mask to the model, not a prepared 4D one"
        )
    return attention_mask
