"""``top_blocks`` routing (docs/semantics.md, "Routing to the top blocks"): each query also reads the
raw tokens of its k best-scoring blocks.

Every backend against the float64 loop oracle (which ranks the candidate blocks itself), ties,
k beyond the number of candidates, gradients, the cost bound, and ``top_blocks=0`` as the plain
contract.
"""

from __future__ import annotations

import pytest
import torch

import globalattn.backends.blocked as blocked
import oracle
from conftest import Case, case_params, grads_of, max_error
from globalattn import attention_weights, global_attention

BACKENDS = ["reference", "torch"]
BASE = Case(B=2, Hq=4, Hkv=2, L=24, S=24, D=8, b=4, top_blocks=2)
GRID = [
    BASE,
    BASE.replace(top_blocks=1, mask="random"),
    BASE.replace(top_blocks=10),  # more than the candidates: all of them
    BASE.replace(causal=True),
    BASE.replace(causal=True, L=7, mask="random"),  # decoding-like, L < S
    BASE.replace(causal=True, L=1, top_blocks=3),
    BASE.replace(Hkv=1, mask="block"),  # GQA, an absent block cannot be routed to
    BASE.replace(S=27, L=27, b=5),  # merge: a longer last block
    BASE.replace(S=27, L=20, b=5, causal=True, top_blocks=3),
    BASE.replace(scope="own"),  # no candidate: the own block is excluded
    BASE.replace(b=30),  # one block: no candidate
    BASE.replace(L=13, S=13, b=16, causal=True),  # one block, causal: no global token at all
    BASE.replace(L=9, D=5, Dv=7, scale=0.8),
    Case(B=1, Hq=2, Hkv=1, L=300, S=300, D=4, b=64, causal=True, top_blocks=1),  # long causal blocks
    # With a window the raw keys are the union of the window and the routed blocks, each seen once.
    BASE.replace(window=3),
    BASE.replace(window=6, causal=True, mask="random"),  # windows overlap the routed blocks
    BASE.replace(window=9, top_blocks=3, L=7),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params(GRID))
def test_matches_oracle(case, backend):
    q, k, v, key_mask = case.inputs()
    out, lse = case.attend(backend, q, k, v, key_mask, return_lse=True)
    ref = case.oracle(q, k, v, key_mask)
    assert max_error(out, ref.out) < 1e-10
    assert max_error(lse, ref.lse) < 1e-10


@pytest.mark.parametrize("case", case_params(GRID))
def test_weights_match_oracle(case):
    q, k, _, key_mask = case.inputs()
    weights = attention_weights(q, k, case.b, key_mask=key_mask, **case.options())
    ref = case.oracle(q, k, k, key_mask)
    assert max_error(weights, ref.weights) < 1e-12
    # The cost bound of docs/semantics.md: at most b + G + k*b keys per query (the longest block standing for b;
    # with a window, its w or 2w - 1 positions instead of the own block's).
    blocks = oracle.blocks(case.S, case.b, case.resolved_remainder)
    longest = max(hi - lo for lo, hi in blocks)
    local = longest if case.window is None else case.window if case.causal else 2 * case.window - 1
    assert (weights > 0).sum(-1).max() <= local + len(blocks) + case.top_blocks * longest


@pytest.mark.parametrize("case", case_params([BASE, BASE.replace(causal=True, mask="random"), *GRID[-4:]]))
def test_gradients_match_reference(case):
    """torch's hand-written backward against autograd through the dense reference, random dO."""
    q, k, v, key_mask = case.inputs(requires_grad=True)
    out = case.attend("reference", q, k, v, key_mask)
    grad_out = torch.randn_like(out)
    expected = grads_of(out, (q, k, v), grad_out)
    got = grads_of(case.attend("torch", q, k, v, key_mask), (q, k, v), grad_out)
    for name, g, e in zip("qkv", got, expected):
        assert max_error(g, e) < 1e-10, name


@pytest.mark.parametrize("case", case_params([BASE.replace(causal=True, mask="random"), BASE.replace(mask="block")]))
def test_many_chunks_give_the_same_result(case, monkeypatch):
    """One block per chunk: the first causal chunk sees no global token and routes nowhere."""
    q, k, v, key_mask = case.inputs(requires_grad=True)
    out = case.attend("torch", q, k, v, key_mask)
    grad_out = torch.randn_like(out)
    expected = (out, *grads_of(out, (q, k, v), grad_out))
    monkeypatch.setattr(blocked, "CHUNK_ELEMENTS", 1)
    out = case.attend("torch", q, k, v, key_mask)
    for got, want in zip((out, *grads_of(out, (q, k, v), grad_out)), expected):
        assert max_error(got, want) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    case = Case(B=1, Hq=2, Hkv=1, L=9, S=12, D=3, b=3, causal=True, mask="random", top_blocks=2)
    q, k, v, key_mask = case.inputs(requires_grad=True)

    def attend(q, k, v):
        out, lse = case.attend(backend, q, k, v, key_mask, return_lse=True)
        return out, torch.where(torch.isinf(lse), 0.0, lse)

    assert torch.autograd.gradcheck(attend, (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_block(backend):
    """Blocks 0 and 1 hold the same keys, so a query of block 2 scores their global tokens equally:
    it must route to block 0, never to block 1."""
    q = torch.randn(1, 1, 4, 4, dtype=torch.float64)  # positions 8..11: block 2
    k = torch.randn(1, 1, 12, 4, dtype=torch.float64)
    v = torch.randn(1, 1, 12, 4, dtype=torch.float64)
    k[:, :, 4:8] = k[:, :, 0:4]
    weights = attention_weights(q, k, 4, top_blocks=1)[0, 0]  # (L, S + G)
    assert (weights[:, 0:4] > 0).all() and (weights[:, 4:8] == 0).all()
    out = global_attention(q, k, v, 4, top_blocks=1, backend=backend)
    assert max_error(out, oracle.attention(q, k, v, 4, top_blocks=1).out) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params([BASE.replace(top_blocks=0), BASE.replace(causal=True, top_blocks=0)]))
def test_zero_is_the_plain_contract_bit_for_bit(case, backend):
    q, k, v, key_mask = case.inputs()
    assert torch.equal(case.attend(backend, q, k, v, key_mask), case.replace().attend(backend, q, k, v, key_mask))
    plain = global_attention(q, k, v, case.b, causal=case.causal, backend=backend)
    assert torch.equal(global_attention(q, k, v, case.b, causal=case.causal, top_blocks=0, backend=backend), plain)


def test_routing_reaches_a_fact_the_mean_blurs():
    """A query whose key matches one token of a far block reads that token's value exactly."""
    torch.manual_seed(0)
    seq, block, dim = 64, 8, 16
    k = torch.randn(1, 1, seq, dim, dtype=torch.float64) * 0.1
    v = torch.randn(1, 1, seq, dim, dtype=torch.float64)
    k[0, 0, 13] = 3.0 * torch.ones(dim)  # the fact sits in block 1
    q = torch.zeros(1, 1, seq, dim, dtype=torch.float64)
    q[0, 0, -1] = 3.0 * torch.ones(dim)  # the last query (block 7) asks for it
    routed = global_attention(q, k, v, block, causal=True, top_blocks=1)[0, 0, -1]
    plain = global_attention(q, k, v, block, causal=True)[0, 0, -1]
    assert (routed - v[0, 0, 13]).norm() < 0.05 * v[0, 0, 13].norm()
    assert (plain - v[0, 0, 13]).norm() > 0.5 * v[0, 0, 13].norm()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_refuses_bad_top_blocks(bad):
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="top_blocks"):
        global_attention(q, q, q, 4, top_blocks=bad)
    with pytest.raises(ValueError, match="top_blocks"):
        attention_weights(q, q, 4, top_blocks=bad)
