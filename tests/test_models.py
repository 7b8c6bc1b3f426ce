"""The harness's models: every attention variant against a brute-force float64 masked softmax
written from SPEC.md, key counts, causality, equal parameters, and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from globalattn.models import DecoderLM, EncoderClassifier, ModelConfig, build_model, keys_per_token, make_attention
from globalattn.models.attention import default_block_size, matched_window

CAUSAL_NAMES = ["dense", "global", "global-top2", "local", "sliding"]
BIDIRECTIONAL_NAMES = ["dense", "global", "global-own", "global-top1", "local", "sliding"]


def brute_force(name, q, k, v, *, causal, block_size, window):
    """SPEC.md and the variants' definitions, spelled out: an allowed mask over [T keys ; G global
    tokens] per (batch, head, query), one float64 softmax.  Returns (out, allowed count per query)."""
    batch, heads, seq_len, _ = q.shape
    starts = list(range(0, seq_len, block_size))
    if not causal and len(starts) > 1 and seq_len - starts[-1] < block_size:
        starts.pop()  # "merge": the short tail joins the block before it
    ends = starts[1:] + [seq_len]
    blk = [max(j for j, s in enumerate(starts) if s <= p) for p in range(seq_len)]
    num_global = len(starts)
    k_global = torch.stack([k[:, :, s:e].mean(2) for s, e in zip(starts, ends)], 2)  # (B, H, G, D)
    v_global = torch.stack([v[:, :, s:e].mean(2) for s, e in zip(starts, ends)], 2)
    keys, values = torch.cat([k, k_global], 2), torch.cat([v, v_global], 2)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T + G)
    allowed = torch.zeros(batch, heads, seq_len, seq_len + num_global, dtype=torch.bool)
    left = window - 1 if causal else (window - 1) // 2
    top = int(name.removeprefix("global-top")) if name.startswith("global-top") else 0
    for p in range(seq_len):
        c = blk[p]
        for s in range(seq_len):
            if name == "dense":
                allowed[:, :, p, s] = s <= p or not causal
            elif name == "sliding":
                allowed[:, :, p, s] = p - left <= s <= p - left + window - 1
            else:  # local and the global family: own block (causal: up to p)
                allowed[:, :, p, s] = blk[s] == c and (s <= p or not causal)
        if name.startswith("global"):
            own_only = name == "global-own"
            visible = [j for j in range(num_global) if (j < c if causal else (j == c or not own_only))]
            for j in visible:
                allowed[:, :, p, seq_len + j] = True
            candidates = [j for j in visible if j != c]
            for b in range(batch):
                for h in range(heads):
                    ranked = sorted(candidates, key=lambda j: (-float(scores[b, h, p, seq_len + j]), j))
                    for j in ranked[:top]:
                        allowed[b, h, p, starts[j] : ends[j]] = True
    weights = scores.masked_fill(~allowed, -math.inf).softmax(-1)
    return weights @ values, allowed.sum(-1)


def random_qkv(seq_len, batch=2, heads=3, head_dim=8):
    return (torch.randn(batch, heads, seq_len, head_dim, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize(
    "seq_len,block_size,window",
    [(32, 8, 9), (37, 6, 10), (20, 4, 1), (13, 16, 13)],
    ids=["T32-b8-w9", "T37-b6-w10", "T20-b4-w1", "T13-b16-w13"],
)
@pytest.mark.parametrize("name", sorted(set(CAUSAL_NAMES + BIDIRECTIONAL_NAMES)))
def test_variant_matches_brute_force_and_counts_its_keys(name, causal, seq_len, block_size, window):
    if name == "global-own" and causal:
        pytest.skip("global-own is bidirectional only")
    q, k, v = random_qkv(seq_len)
    attend = make_attention(name, causal=causal, block_size=block_size, window=window)
    expected, counts = brute_force(name, q, k, v, causal=causal, block_size=block_size, window=window)
    torch.testing.assert_close(attend(q, k, v), expected, rtol=1e-10, atol=1e-10)
    claimed = keys_per_token(name, seq_len, causal=causal, block_size=block_size, window=window)
    if name.startswith("global-top") and seq_len % block_size:
        return  # routed blocks are counted at size b: exact only when b divides T
    assert (counts == claimed).all()


@pytest.mark.parametrize("name", ["local", "sliding"])
def test_local_and_sliding_gradients_match_brute_force(name):
    q, k, v = (x.requires_grad_() for x in random_qkv(29))
    upstream = torch.randn(2, 3, 29, 8, dtype=torch.float64)
    (make_attention(name, causal=True, block_size=7, window=7)(q, k, v) * upstream).sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    (brute_force(name, q, k, v, causal=True, block_size=7, window=7)[0] * upstream).sum().backward()
    for g, x in zip(got, (q, k, v)):
        torch.testing.assert_close(g, x.grad, rtol=1e-9, atol=1e-9)


def test_sliding_window_is_matched_to_global_cost():
    for context in (256, 512, 1024):
        b = default_block_size(context)
        for causal in (True, False):
            w = matched_window(context, b, causal=causal)
            glob = keys_per_token("global", context, causal=causal, block_size=b, window=w).sum()
            slide = keys_per_token("sliding", context, causal=causal, block_size=b, window=w).sum()
            assert abs(int(slide - glob)) <= context, (context, causal, w)
            for other in (w - 1, w + 1):  # and no other window comes closer
                pairs = keys_per_token("sliding", context, causal=causal, block_size=b, window=other).sum()
                assert abs(int(pairs - glob)) >= abs(int(slide - glob))
    assert [default_block_size(t) for t in (1, 64, 256, 512, 1000, 1024, 2048, 4096)] == [1, 8, 16, 16, 32, 32, 32, 64]


@pytest.mark.parametrize("name", CAUSAL_NAMES)
def test_decoder_is_causal(name):
    """Changing token t changes no logit before t."""
    config = ModelConfig(vocab_size=50, context=48, attention=name, d_model=32, n_head=2, block_size=8, window=9)
    model = DecoderLM(config).eval()
    tokens = torch.randint(50, (2, 48))
    changed = tokens.clone()
    changed[:, 30] = (changed[:, 30] + 1) % 50
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :30], after[:, :30], rtol=0, atol=0)
    assert not torch.allclose(before[:, 30:], after[:, 30:])


def test_every_variant_has_the_same_parameters():
    shapes = {}
    for name in BIDIRECTIONAL_NAMES:
        model = build_model(
            ModelConfig(vocab_size=20, context=64, attention=name, causal=False, num_classes=10, d_model=32, n_head=2)
        )
        shapes[name] = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert all(s == shapes["dense"] for s in shapes.values())
    lm = DecoderLM(ModelConfig(vocab_size=20, context=64, d_model=32, n_head=2))
    assert not any("head" in n for n, _ in lm.named_parameters()), "the LM output is tied to the embedding"


def test_encoder_pools_real_tokens_only():
    config = ModelConfig(
        vocab_size=20, context=32, attention="global", causal=False, num_classes=10, d_model=32, n_head=2
    )
    model = EncoderClassifier(config).eval()
    tokens = torch.randint(1, 20, (3, 32))
    real = torch.rand(3, 32) > 0.3
    logits = model(tokens, real)
    features = model.transformer(tokens)
    for row in range(3):
        pooled = features[row, real[row]].mean(0)
        torch.testing.assert_close(logits[row], model.head(pooled))


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(attention="global-own"), "bidirectional only"),
        (dict(attention="global-top0"), "attention must be one of"),
        (dict(attention="bogus"), "attention must be one of"),
        (dict(d_model=30, n_head=4), "even integer"),
        (dict(block_size=0), "block_size"),
        (dict(window=65), "window"),
    ],
)
def test_bad_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"vocab_size": 20, "context": 64, **changes})


@pytest.mark.parametrize("name", ["dense", "local", "sliding", "global-top2"])
def test_context_parallel_runs_only_the_global_attentions(name):
    from globalattn.models.attention import make_context_parallel_attention

    with pytest.raises(ValueError, match="context parallelism runs the attentions global and global-own"):
        make_context_parallel_attention(name, causal=True, block_size=4, group=None)
