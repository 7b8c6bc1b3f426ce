"""The harness's transformer: causality, packed rows equal to their documents alone, equal
parameters for every attention, pooling, its attention cost, and a model without the data's fields
refused."""

from __future__ import annotations

import pytest
import torch

from globalattn.harness.config import ATTENTIONS, ModelConfig
from globalattn.harness.transformer import (
    DecoderLM,
    EncoderClassifier,
    RotaryEmbedding,
    attention_cost,
    build_model,
)

CAUSAL_NAMES = [name for name in (*ATTENTIONS, "global-top2") if name != "global-own"]
BIDIRECTIONAL_NAMES = [*ATTENTIONS, "global-top1"]


@pytest.mark.parametrize("name", CAUSAL_NAMES)
def test_decoder_is_causal(name):
    """Changing token t changes no logit before t."""
    config = ModelConfig(
        context=48, attention=name, vocab_size=50, causal=True, d_model=32, n_head=2, block_size=8, window=9
    )
    model = DecoderLM(config).eval()
    tokens = torch.randint(50, (2, 48))
    changed = tokens.clone()
    changed[:, 30] = (changed[:, 30] + 1) % 50
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :30], after[:, :30], rtol=0, atol=0)
    assert not torch.allclose(before[:, 30:], after[:, 30:])


@pytest.mark.parametrize("name", CAUSAL_NAMES)
def test_decoder_on_a_packed_row_equals_each_document_alone(name):
    """Logits of packed documents (float64) are those of each document run alone: the attention sees no
    other document.  Documents shorter than a block, with a short tail, and longer than the window."""
    lengths = [5, 19, 1, 23]
    config = ModelConfig(
        context=48, attention=name, vocab_size=50, causal=True, d_model=32, n_head=2, block_size=8, window=9
    )
    model = DecoderLM(config).double().eval()
    tokens = torch.randint(50, (2, 48))
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).expand(2, -1)
    with torch.no_grad():
        packed = model(tokens, ids)
        start = 0
        for length in lengths:
            alone = model(tokens[:, start : start + length])
            torch.testing.assert_close(packed[:, start : start + length], alone, rtol=1e-10, atol=1e-10)
            start += length
        assert not torch.allclose(packed, model(tokens))


def test_rope_positions_restart_at_each_document(monkeypatch):
    """Each document is rotated from position 0, as alone.  (RoPE's scores depend on position
    differences only, so the logits test above sees a shift only at float32 table rounding: this
    checks the positions themselves.)"""
    seen = []
    real_forward = RotaryEmbedding.forward

    def recording(self, x, positions):
        seen.append(positions)
        return real_forward(self, x, positions)

    monkeypatch.setattr(RotaryEmbedding, "forward", recording)
    model = DecoderLM(
        ModelConfig(context=16, attention="global", vocab_size=20, causal=True, d_model=16, n_head=2, n_layer=1)
    )
    ids = torch.tensor([[0] * 5 + [1] * 11, [0] * 16])
    model(torch.randint(20, (2, 16)), ids)
    expected = torch.tensor([[*range(5), *range(11)], [*range(16)]])
    assert len(seen) == 2 and all(torch.equal(positions, expected) for positions in seen)  # queries, keys
    seen.clear()
    model(torch.randint(20, (2, 16)))
    assert len(seen) == 2 and all(torch.equal(positions, torch.arange(16)) for positions in seen)


def test_every_variant_has_the_same_parameters():
    shapes = {}
    for name in BIDIRECTIONAL_NAMES:
        model = build_model(
            ModelConfig(context=64, attention=name, vocab_size=20, causal=False, num_classes=10, d_model=32, n_head=2)
        )
        shapes[name] = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert all(s == shapes["dense"] for s in shapes.values())
    lm = DecoderLM(ModelConfig(context=64, attention="dense", vocab_size=20, causal=True, d_model=32, n_head=2))
    assert not any("head" in n for n, _ in lm.named_parameters()), "the LM output is tied to the embedding"


def test_an_untied_head_is_a_parameter_of_its_own():
    config = ModelConfig(context=32, attention="dense", vocab_size=20, causal=True, d_model=32, n_head=2)
    tied, untied = DecoderLM(config), DecoderLM(config.replace(untied_head=True))
    assert [n for n, _ in untied.named_parameters()] == [n for n, _ in tied.named_parameters()] + ["head.weight"]
    tokens = torch.randint(20, (2, 32))
    features = untied.transformer(tokens)
    torch.testing.assert_close(untied(tokens), features @ untied.head.weight.T)
    assert not torch.allclose(untied(tokens), features @ untied.transformer.embed.weight.T)
    untied(tokens).sum().backward()
    assert untied.head.weight.grad.abs().sum() > 0


def test_embed_std_scales_the_embedding_only():
    std = float(torch.empty(()).uniform_(0.1, 1.0))
    config = ModelConfig(context=32, attention="dense", vocab_size=512, causal=True, d_model=64, n_head=2)
    model = DecoderLM(config.replace(embed_std=std))
    assert float(model.transformer.embed.weight.std()) == pytest.approx(std, rel=0.05)
    assert float(model.transformer.blocks[0].attn.qkv.weight.std()) == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match="embed_std must be a positive number"):
        config.replace(embed_std=0.0)


def test_encoder_pools_real_tokens_only():
    config = ModelConfig(
        context=32, attention="global", vocab_size=20, causal=False, num_classes=10, d_model=32, n_head=2
    )
    model = EncoderClassifier(config).eval()
    tokens = torch.randint(1, 20, (3, 32))
    real = torch.rand(3, 32) > 0.3
    logits = model(tokens, real)
    features = model.transformer(tokens)
    for row in range(3):
        pooled = features[row, real[row]].mean(0)
        torch.testing.assert_close(logits[row], model.head(pooled))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_attention_cost_counts_4_head_dim_flops_per_pair_and_layer(causal):
    context, d_model, layers = 64, 32, 3
    config = ModelConfig(context=context, attention="dense", causal=causal, d_model=d_model, n_head=4, n_layer=layers)
    pairs = context * (context + 1) // 2 if causal else context * context
    assert attention_cost(config) == {
        "keys_per_token": pairs / context,
        "attention_flops": 4 * d_model * pairs * layers,
    }
    local = ModelConfig(context=context, attention="local", causal=causal, block_size=64)  # one block: dense's pairs
    assert attention_cost(local)["attention_flops"] == 4 * 128 * pairs * 2


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_global_window_cost_counts_its_window_and_the_global_tokens(causal):
    context, block, window, d_model = 64, 8, 5, 32
    config = ModelConfig(
        context=context, attention="global-window", causal=causal, block_size=block, window=window, d_model=d_model
    )
    if causal:  # the window's keys up to the query, and the complete blocks before the query's
        pairs = sum(min(p + 1, window) + p // block for p in range(context))
    else:  # the keys less than w away, and all T / b global tokens
        pairs = sum(min(p + window, context) - max(p - window + 1, 0) + context // block for p in range(context))
    assert attention_cost(config) == {
        "keys_per_token": pairs / context,
        "attention_flops": 4 * d_model * pairs * config.n_layer,
    }


def test_a_model_needs_the_data_fields():
    config = ModelConfig(context=16, attention="dense", d_model=16, n_head=2)  # as a TrainConfig holds it
    for incomplete in (config.replace(causal=True), config.replace(causal=False, num_classes=10)):
        with pytest.raises(ValueError, match="a model needs vocab_size and causal"):
            build_model(incomplete)
    with pytest.raises(ValueError, match="DecoderLM needs a causal config"):
        DecoderLM(config.replace(vocab_size=20))
    assert isinstance(build_model(config.replace(vocab_size=20, causal=True)), DecoderLM)
