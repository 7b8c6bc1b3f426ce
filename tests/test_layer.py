"""GlobalAttention, the nn.Module: its projections by hand through the oracle, masks, layouts, grouped
heads, dropout, gradients, causality and refusals."""

from __future__ import annotations

import math

import pytest
import torch

import oracle
from globalattn import GlobalAttention

E, T, BATCH = 12, 10, 2  # embed dim, tokens, batch


def make_layer(num_heads=4, block_size=3, **kwargs) -> GlobalAttention:
    return GlobalAttention(E, num_heads, block_size, dtype=torch.float64, **kwargs)


def tokens(batch=BATCH, length=T) -> torch.Tensor:
    return torch.randn(batch, length, E, dtype=torch.float64)  # (B, T, E)


def padding_mask(batch=BATCH, length=T) -> torch.Tensor:
    """(B, T) bool, True at padding (as nn.MultiheadAttention); batch 0 ends in 4 padded tokens."""
    mask = torch.rand(batch, length) < 0.3
    mask[0, -4:] = True
    return mask


def by_hand(layer: GlobalAttention, x, key_padding_mask=None):
    """The layer's forward written out: its own Linear weights, heads, the oracle, out_proj."""
    batch, length, _ = x.shape
    hd = layer.head_dim

    def heads(proj, n):  # (B, T, E) -> (B, n, T, hd)
        return (x @ proj.weight.T + proj.bias).view(batch, length, n, hd).transpose(1, 2)

    q, k, v = (
        heads(layer.q_proj, layer.num_heads),
        heads(layer.k_proj, layer.num_kv_heads),
        heads(layer.v_proj, layer.num_kv_heads),
    )
    key_mask = None if key_padding_mask is None else ~key_padding_mask
    options = dict(
        causal=layer.causal, scope=layer.scope, key_mask=key_mask, top_blocks=layer.top_blocks, window=layer.window
    )
    ref = oracle.attention(q, k, v, layer.block_size, **options)
    merged = ref.out.transpose(1, 2).reshape(batch, length, layer.embed_dim)  # (B, T, E)
    return merged @ layer.out_proj.weight.T + layer.out_proj.bias, ref.weights


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(num_kv_heads=2),
        dict(num_kv_heads=1, causal=True),
        dict(scope="own", block_size=4),
        dict(num_heads=2, block_size=20),
        dict(block_size=2, top_blocks=2),
        dict(block_size=2, top_blocks=1, causal=True, num_kv_heads=2),
        dict(block_size=3, window=4),
        dict(block_size=3, window=2, causal=True, num_kv_heads=2),
        dict(block_size=3, window=3, causal=True, top_blocks=1),
    ],
    ids=[
        "mha",
        "gqa2",
        "gqa1-causal",
        "own-b4",
        "b_gt_T",
        "top2",
        "top1-causal-gqa2",
        "w4",
        "w2-causal-gqa2",
        "w3-causal-top1",
    ],  # fmt: skip
)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding"])
def test_layer_equals_its_projections_through_the_oracle(options, masked):
    layer = make_layer(**options)
    x = tokens()
    mask = padding_mask() if masked else None
    out, weights = layer(x, key_padding_mask=mask, need_weights=True)
    expected_out, expected_weights = by_hand(layer, x, mask)
    assert out.shape == (BATCH, T, E)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal, num_blocks", [(False, T // 3), (True, math.ceil(T / 3))], ids=["bidir", "causal"])
def test_need_weights_shape(causal, num_blocks):
    layer = make_layer(num_heads=4, block_size=3, causal=causal)
    out, weights = layer(tokens(), need_weights=True)
    assert weights.shape == (BATCH, 4, T, T + num_blocks)  # (B, H, T, T + G)
    assert layer(tokens())[1] is None


def test_batch_first_false_is_the_transposed_layout():
    first = make_layer()
    second = make_layer(batch_first=False)
    second.load_state_dict(first.state_dict())
    x = tokens()
    mask = padding_mask()
    out, weights = second(x.transpose(0, 1), key_padding_mask=mask, need_weights=True)  # (T, B, E)
    expected, expected_weights = first(x, key_padding_mask=mask, need_weights=True)
    assert out.shape == (T, BATCH, E)
    torch.testing.assert_close(out.transpose(0, 1), expected, rtol=0, atol=0)
    assert weights.shape == expected_weights.shape  # weights stay (B, H, T, T + G)


def test_padding_changes_the_output():
    layer = make_layer()
    x, mask = tokens(), padding_mask()
    assert (layer(x, key_padding_mask=mask)[0] - layer(x)[0]).abs().max() > 1e-6


def test_dropout_only_in_training():
    layer = make_layer(dropout=0.5)
    plain = make_layer()
    plain.load_state_dict(layer.state_dict())
    x = tokens()
    layer.eval()
    torch.testing.assert_close(layer(x)[0], plain(x)[0], rtol=0, atol=0)
    layer.train()
    first, second = layer(x)[0], layer(x)[0]
    assert (first - plain(x)[0]).abs().max() > 1e-6 and (first - second).abs().max() > 1e-6


def test_gradients_reach_every_parameter():
    layer = make_layer(num_kv_heads=2, causal=True)
    out, _ = layer(tokens(), key_padding_mask=padding_mask())
    (out * torch.randn_like(out)).sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().max() > 0, name


@pytest.mark.parametrize("t", [0, 4, 8])
def test_causal_layer_ignores_future_tokens(t):
    layer = make_layer(num_kv_heads=2, causal=True)
    x = tokens()
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
    before, after = layer(x)[0], layer(changed)[0]
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-12)
    assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().max() > 1e-6


def test_bias_false_has_no_bias():
    layer = GlobalAttention(E, 4, 3, bias=False)
    assert all(proj.bias is None for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj))
    assert layer(torch.randn(BATCH, T, E))[0].shape == (BATCH, T, E)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        pytest.param((0, 4, 3), {}, "embed_dim", id="embed_dim-0"),
        pytest.param((-12, 4, 3), {}, "embed_dim", id="embed_dim-negative"),
        pytest.param((12.0, 4, 3), {}, "embed_dim", id="embed_dim-float"),
        pytest.param((True, 1, 3), {}, "embed_dim", id="embed_dim-bool"),
        pytest.param((12, 0, 3), {}, "num_heads", id="num_heads-0"),
        pytest.param((12, 5, 3), {}, "num_heads", id="embed_dim-not-divisible"),
        pytest.param((12, 4, 3), dict(num_kv_heads=0), "num_kv_heads", id="num_kv_heads-0"),
        pytest.param((12, 4, 3), dict(num_kv_heads=3), "num_kv_heads", id="num_kv_heads-not-divisor"),
        pytest.param((12, 4, 0), {}, "block_size", id="block_size-0"),
        pytest.param((12, 4, 2.5), {}, "block_size", id="block_size-float"),
        pytest.param((12, 4, True), {}, "block_size", id="block_size-bool"),
        pytest.param((12, 4, "4"), {}, "block_size", id="block_size-str"),
        pytest.param((12, 4, 3), dict(scope="local"), "scope", id="scope-unknown"),
        pytest.param((12, 4, 3), dict(causal=True, scope="own"), "scope", id="causal-own"),
        pytest.param((12, 4, 3), dict(causal="yes"), "causal", id="causal-str"),
        pytest.param((12, 4, 3), dict(dropout=-0.1), "dropout", id="dropout-negative"),
        pytest.param((12, 4, 3), dict(dropout=1.0), "dropout", id="dropout-one"),
        pytest.param((12, 4, 3), dict(dropout=math.nan), "dropout", id="dropout-nan"),
        pytest.param((12, 4, 3), dict(dropout="0.1"), "dropout", id="dropout-str"),
        pytest.param((12, 4, 3), dict(top_blocks=-1), "top_blocks", id="top_blocks-negative"),
        pytest.param((12, 4, 3), dict(top_blocks=1.0), "top_blocks", id="top_blocks-float"),
        pytest.param((12, 4, 3), dict(top_blocks=1, context_parallel_group=object()), "top_blocks", id="top-cp"),
    ],
)
def test_constructor_refuses(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GlobalAttention(*args, **kwargs)


@pytest.mark.parametrize(
    "x, key_padding_mask, match",
    [
        pytest.param(torch.randn(T, E), None, "x", id="x-rank2"),
        pytest.param(torch.randn(BATCH, T, E + 1), None, "x", id="x-wrong-embed"),
        pytest.param(torch.randn(BATCH, T, E).tolist(), None, "x", id="x-list"),
        pytest.param(torch.randn(BATCH, T, E), torch.zeros(BATCH, T), "key_padding_mask", id="mask-float"),
        pytest.param(
            torch.randn(BATCH, T, E), torch.zeros(BATCH, T + 1, dtype=torch.bool), "key_padding_mask", id="mask-shape"
        ),
        pytest.param(torch.randn(BATCH, T, E), [[False] * T] * BATCH, "key_padding_mask", id="mask-list"),
    ],
)
def test_forward_refuses(x, key_padding_mask, match):
    layer = GlobalAttention(E, 4, 3)
    with pytest.raises(ValueError, match=match):
        layer(x, key_padding_mask=key_padding_mask)
