"""The harness's attention variants against a brute-force float64 masked softmax written from
docs/semantics.md, their key counts, the default block size and window, and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from globalattn.harness.attention import (
    keys_per_token,
    make_attention,
    make_context_parallel_attention,
    matched_window,
    positions_in_documents,
    resolved_block_size,
    resolved_window,
    routing_hits,
)
from globalattn.harness.config import ATTENTIONS, ModelConfig

NAMES = [*ATTENTIONS, "global-top1", "global-top2"]


def brute_force(name, q, k, v, *, causal, block_size, window):
    """docs/semantics.md and the variants' definitions, spelled out: an allowed mask over [T keys ; G global
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
            elif name == "global-window":  # docs/semantics.md, "A sliding window of raw keys"
                allowed[:, :, p, s] = p - window < s <= p if causal else abs(s - p) < window
            else:  # local and the global family: own block (causal: up to p)
                allowed[:, :, p, s] = blk[s] == c and (s <= p or not causal)
        if name.startswith("global"):  # global-window sees global's global tokens
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
@pytest.mark.parametrize("name", NAMES)
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


def packed_ids(lengths: list[int], batch: int = 2) -> torch.Tensor:
    """(batch, sum(lengths)) document ids 0, 0, ..., 1, ...: document i is lengths[i] positions long."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).expand(batch, -1)


# Documents shorter than a block, one block plus a short tail (merged when bidirectional), a single
# position, one exactly two blocks long: b = 6.
DOCUMENTS = [4, 9, 1, 12, 7]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", NAMES)
def test_packed_documents_are_each_attended_as_if_alone(name, causal):
    """docs/semantics.md, "Packed sequences", for every variant: each document's rows equal the variant
    run on that document alone, and the packed call differs from one over the unpacked row."""
    if name == "global-own" and causal:
        pytest.skip("global-own is bidirectional only")
    q, k, v = random_qkv(sum(DOCUMENTS))
    attend = make_attention(name, causal=causal, block_size=6, window=5)
    packed = attend(q, k, v, document_ids=packed_ids(DOCUMENTS))
    start = 0
    for length in DOCUMENTS:
        doc = slice(start, start + length)
        alone = attend(q[:, :, doc], k[:, :, doc], v[:, :, doc])
        torch.testing.assert_close(packed[:, :, doc], alone, rtol=1e-10, atol=1e-10)
        start += length
    assert not torch.allclose(packed, attend(q, k, v))


@pytest.mark.parametrize("name", ["dense", "local", "sliding"])
def test_packed_gradients_are_those_of_each_document_alone(name):
    """The harness's own masks (dense, local, sliding) under backward: the packed gradients of every
    document equal those of the document run alone."""
    q, k, v = (x.requires_grad_() for x in random_qkv(sum(DOCUMENTS)))
    upstream = torch.randn(2, 3, sum(DOCUMENTS), 8, dtype=torch.float64)
    attend = make_attention(name, causal=True, block_size=6, window=5)
    (attend(q, k, v, document_ids=packed_ids(DOCUMENTS)) * upstream).sum().backward()
    packed = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    start = 0
    for length in DOCUMENTS:
        doc = slice(start, start + length)
        (attend(q[:, :, doc], k[:, :, doc], v[:, :, doc]) * upstream[:, :, doc]).sum().backward()
        start += length
    for got, x in zip(packed, (q, k, v)):
        torch.testing.assert_close(got, x.grad, rtol=1e-9, atol=1e-9)


def test_positions_count_from_each_documents_start():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1], [5, 5, 5, 5, 5, 5, 5, 5]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert torch.equal(positions_in_documents(ids), expected)


def test_sliding_window_is_matched_to_global_cost():
    for context in (256, 512, 1024):
        for causal in (True, False):
            config = ModelConfig(context=context, attention="sliding", causal=causal)
            b, w = resolved_block_size(config), resolved_window(config)
            assert w == matched_window(context, b, causal=causal)
            glob = keys_per_token("global", context, causal=causal, block_size=b, window=w).sum()
            slide = keys_per_token("sliding", context, causal=causal, block_size=b, window=w).sum()
            assert abs(int(slide - glob)) <= context, (context, causal, w)
            for other in (w - 1, w + 1):  # and no other window comes closer
                pairs = keys_per_token("sliding", context, causal=causal, block_size=b, window=other).sum()
                assert abs(int(pairs - glob)) >= abs(int(slide - glob))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("context", [16, 100, 512])
def test_global_window_defaults_to_the_smallest_window_holding_globals_own_block_keys(causal, context):
    """docs: w = b. global-window with its default window sees every raw key global sees (its own
    block, causal up to the query), and with one position less it would not."""
    config = ModelConfig(context=context, attention="global-window", causal=causal)
    b, w = resolved_block_size(config), resolved_window(config)
    assert w == b
    starts = list(range(0, context, b))
    if not causal and len(starts) > 1 and context - starts[-1] < b:
        starts.pop()  # "merge", as in brute_force
    ends = starts[1:] + [context]

    def blocks_held(window):
        """The blocks all of whose queries have in their window every raw key global shows them."""
        held = []
        for start, end in zip(starts, ends):
            own = [range(start, p + 1) if causal else range(start, end) for p in range(start, end)]
            window_keys = [[s for s in keys if (p - window < s <= p if causal else abs(s - p) < window)]
                           for p, keys in zip(range(start, end), own)]  # fmt: skip
            if all(len(seen) == len(keys) for seen, keys in zip(window_keys, own)):
                held.append((start, end))
        return held

    # every block, but a merged last block (bidirectional), up to 2b - 1 long: its ends are further than b apart
    assert blocks_held(w) == [(s, e) for s, e in zip(starts, ends) if causal or e - s <= b]
    assert w == 1 or all(e - s < b for s, e in blocks_held(w - 1))  # a block of b tokens needs w >= b
    given = ModelConfig(context=context, attention="global-window", causal=causal, window=3)
    assert resolved_window(given) == 3
    assert resolved_window(ModelConfig(context=context, attention="global", causal=causal, window=3)) is None


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_default_block_size_is_the_power_of_two_nearest_sqrt_context(causal):
    contexts = (1, 64, 256, 512, 1000, 1024, 2048, 4096)
    sizes = [resolved_block_size(ModelConfig(context=t, attention="global", causal=causal)) for t in contexts]
    assert sizes == [1, 8, 16, 16, 32, 32, 32, 64]  # the smaller at a tie: 16 at T = 512
    assert resolved_block_size(ModelConfig(context=512, attention="global", causal=causal, block_size=7)) == 7


@pytest.mark.parametrize("name", ["dense", "local", "sliding", "global-top2"])
def test_context_parallel_runs_only_the_global_attentions(name):
    with pytest.raises(
        ValueError, match="context parallelism runs the attentions global, global-own and global-window"
    ):
        make_context_parallel_attention(name, causal=True, block_size=4, window=None, group=None)


@pytest.mark.parametrize("aim", ["source", "elsewhere"])
def test_routing_hits_count_the_queries_routed_to_their_sources_block(aim):
    """Each block's keys point one way, each query at one block: routed there with k = 1, so the hit rate
    is 1 when queries aim at their source's block and 0 when they aim at another earlier one."""
    block_size, num_blocks, heads = 4, 8, 2
    seq_len = block_size * num_blocks
    directions = torch.eye(num_blocks).repeat_interleave(block_size, 0)  # (T, D): block j's keys along e_j
    key = 10 * directions + 0.1 * torch.randn(1, heads, seq_len, num_blocks)
    query_pos = torch.randperm(seq_len - 2 * block_size)[:20] + 2 * block_size  # blocks 2 .. 7: >= 2 candidates
    query_block = query_pos // block_size
    source_block = (torch.rand(20) * query_block).long()  # an earlier block
    source_pos = source_block * block_size + torch.randint(block_size, (20,))
    aimed = source_block if aim == "source" else (source_block + 1) % query_block  # another earlier block
    query = torch.zeros(1, heads, seq_len, num_blocks)
    query[0, :, query_pos] = torch.eye(num_blocks)[aimed] * 10
    recall = (torch.zeros(20, dtype=torch.long), query_pos, source_pos)
    hits = routing_hits(query, key, recall, block_size=block_size, top_blocks=1)
    assert hits["routed"] == (1.0 if aim == "source" else 0.0)
    assert hits["chance"] == pytest.approx(float((1 / query_block.double()).mean()))  # one of c earlier blocks


def test_routing_hits_leave_out_sources_in_the_querys_own_block():
    query, key = torch.randn(2, 1, 2, 16, 8)
    own = (torch.zeros(3, dtype=torch.long), torch.tensor([9, 10, 13]), torch.tensor([8, 8, 12]))  # b = 4
    assert routing_hits(query, key, own, block_size=4, top_blocks=1) is None
