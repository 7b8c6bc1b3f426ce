"""Every backend against the float64 loop oracle (tests/oracle.py): outputs, log-sum-exp, gradients,
attention weights, chunking and dropout.

Low-precision results also obey flash-attention's rule: a backend's error against the exact result
may be at most 2x (forward) or 3x (gradients) the error of the same computation done naively in
PyTorch at the input's precision (``conftest.dense_attention`` at that dtype), plus a small slack.
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch

import globalattn.backends.blocked as blocked
from conftest import (
    DTYPE_IDS,
    FORWARD_ATOL,
    GRID,
    LOW_PRECISION,
    LSE_ATOL,
    ODD,
    SEED,
    SLACK,
    Case,
    assert_empty_rows_are_zero,
    assert_gradients_match_dense_float64,
    assert_max_error,
    assert_within_naive_error,
    case_params,
    dense_attention,
    grads_of,
)
from globalattn import attention_weights, global_attention

BACKENDS = ["reference", "torch", "auto", "flex", "triton"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params(GRID))
def test_forward_matches_oracle(case, backend, dtype, device):
    q, k, v, key_mask = case.inputs(dtype, device)
    out, lse = case.attend(backend, q, k, v, key_mask, return_lse=True)  # (B, Hq, L, Dv), (B, Hq, L)
    ref = case.oracle(q, k, v, key_mask)
    assert out.shape == ref.out.shape and out.dtype == dtype and out.device == q.device
    assert lse.shape == ref.lse.shape and lse.dtype == torch.promote_types(dtype, torch.float32)
    assert_empty_rows_are_zero(out, lse, ref)
    assert_max_error(out, ref.out, FORWARD_ATOL[dtype], "out")
    assert_max_error(lse, ref.lse, LSE_ATOL[dtype], "lse")
    if dtype in LOW_PRECISION:
        naive_out, naive_lse = dense_attention(q, k, v, ref, case.scale_value())
        assert_within_naive_error("out", out, naive_out, ref.out, factor=2, slack=SLACK[dtype])
        assert_within_naive_error("lse", lse, naive_lse, ref.lse, factor=2, slack=SLACK[dtype])


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_does_not_change_out(backend, return_lse):
    case = SEED.replace(mask="random")
    q, k, v, key_mask = case.inputs()
    result = case.attend(backend, q, k, v, key_mask, return_lse=return_lse)
    out = result[0] if return_lse else result
    assert isinstance(result, tuple) == return_lse
    torch.testing.assert_close(out, case.oracle(q, k, v, key_mask).out, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params(GRID))
def test_gradients_match_dense_float64(case, backend, dtype, device):
    q, k, v, key_mask = case.inputs(dtype, device, requires_grad=True)
    out, lse = case.attend(backend, q, k, v, key_mask, return_lse=True)
    assert_gradients_match_dense_float64(case, (q, k, v), key_mask, out, lse)


def test_dense_helper_matches_oracle():
    """The gradient reference (``dense_attention``) computes what the loop oracle computes."""
    for case in GRID:
        q, k, v, key_mask = case.inputs()
        ref = case.oracle(q, k, v, key_mask)
        out, lse = dense_attention(q, k, v, ref, case.scale_value())
        assert_max_error(out, ref.out, 1e-12, f"{case.id} out")
        assert_max_error(lse, ref.lse, 1e-12, f"{case.id} lse")


GRADCHECK_CASES = [
    Case(B=1, Hq=2, Hkv=1, L=7, S=7, D=3, Dv=2, b=3),
    Case(B=1, Hq=2, Hkv=2, L=7, S=7, D=2, b=3, scope="own", remainder="separate"),
    Case(B=2, Hq=2, Hkv=1, L=5, S=7, D=3, Dv=2, b=3, causal=True, mask="random"),
    Case(B=2, Hq=2, Hkv=1, L=7, S=7, D=2, b=2, causal=True, mask="block"),  # empty rows
    Case(B=1, Hq=1, Hkv=1, L=4, S=6, D=2, b=4, mask="random", scale=0.8),
]


def finite_lse(lse):
    """lse with -inf (an empty row) as 0, so that finite differences stay finite."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", case_params(GRADCHECK_CASES))
def test_gradcheck(case, backend, return_lse):
    q, k, v, key_mask = case.inputs(requires_grad=True)

    def attention(q, k, v):
        if not return_lse:
            return case.attend(backend, q, k, v, key_mask)
        out, lse = case.attend(backend, q, k, v, key_mask, return_lse=True)
        return out, finite_lse(lse)

    assert torch.autograd.gradcheck(attention, (q, k, v))


# -- attention weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", case_params(GRID))
def test_attention_weights_match_oracle(case, dtype, device):
    q, k, _, key_mask = case.inputs(dtype, device)
    weights = attention_weights(q, k, case.b, key_mask=key_mask, **case.options())  # (B, Hq, L, S + G)
    ref = case.oracle(q, k, k[..., :1], key_mask)
    assert weights.shape == ref.weights.shape and weights.dtype == dtype
    assert_max_error(weights, ref.weights, 1e-12 if dtype == torch.float64 else 1e-6, "weights")
    hidden = ~ref.allowed[:, None].expand(weights.shape).to(device)
    assert (weights[hidden] == 0).all()  # cells a query may not see are exactly 0
    sums = weights.double().sum(-1)  # 1, or 0 for a row that sees nothing
    expected = ref.allowed.any(-1)[:, None].expand(sums.shape).double()
    torch.testing.assert_close(sums.cpu(), expected, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)


# -- chunking ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    case_params(
        [
            SEED.replace(mask="random"),
            SEED.replace(causal=True, L=9, mask="block"),
            SEED.replace(scope="own", L=11, remainder="separate"),
            ODD.replace(causal=True),
            Case(B=1, Hq=2, Hkv=1, L=260, S=300, D=3, b=64, causal=True, mask="block"),
        ]
    ),
)
def test_many_chunks_give_the_same_result(case, monkeypatch):
    q, k, v, key_mask = case.inputs(requires_grad=True)
    upstream = (torch.randn(case.B, case.Hq, case.L, case.Dv or case.D, dtype=torch.float64),)
    upstream += (torch.randn(case.B, case.Hq, case.L, dtype=torch.float64),)
    chunk_counts = []  # how many chunks each call planned

    def forward_backward():
        out, lse = case.attend("torch", q, k, v, key_mask, return_lse=True)
        return (out, lse, *grads_of((out, lse), (q, k, v), upstream))

    def counting(*args, **kwargs):
        options = plan(*args, **kwargs)
        chunk_counts.append(len(options.chunks))
        return options

    plan = blocked._plan
    monkeypatch.setattr(blocked, "_plan", counting)
    whole = forward_backward()
    monkeypatch.setattr(blocked, "CHUNK_ELEMENTS", 1)
    chunked = forward_backward()
    assert chunk_counts[-1] > max(1, chunk_counts[0])  # the premise: one chunk per tile now (forward and backward plan)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), whole, chunked):
        assert_max_error(b, a, 1e-12, name)
    assert_max_error(chunked[0], case.oracle(q, k, v, key_mask).out, 1e-10, "out")


@pytest.mark.parametrize(
    "case",
    case_params(
        [
            SEED.replace(causal=True, L=9, mask="block", window=4),  # neighbouring tiles share keys
            Case(B=2, Hq=4, Hkv=2, L=40, S=40, D=3, b=4, mask="random", top_blocks=2),
            Case(B=1, Hq=2, Hkv=1, L=30, S=37, D=3, b=5, causal=True, top_blocks=1, window=3),
        ]
    ),
)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_the_thread_count_does_not_change_the_result(case, dropout_p, monkeypatch):
    """The torch backend spreads its chunks over torch's thread count, each thread adding into its
    own gradients: one thread and three give the same values, gradients and dropout masks."""
    q, k, v, key_mask = case.inputs(requires_grad=True)
    upstream = torch.randn(case.B, case.Hq, case.L, case.Dv or case.D, dtype=torch.float64)
    monkeypatch.setattr(blocked, "CHUNK_ELEMENTS", 1)  # one tile per chunk: many chunks to spread
    pools = []  # the premise: three threads ran the chunks
    monkeypatch.setattr(blocked, "_pool", lambda threads, pool=blocked._pool: pools.append(threads) or pool(threads))

    def forward_backward(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(0)
            out = case.attend("torch", q, k, v, key_mask, dropout_p=dropout_p)
            return (out, *grads_of(out, (q, k, v), upstream), torch.get_num_threads())
        finally:
            torch.set_num_threads(before)

    *one, _ = forward_backward(1)
    *three, threads_after = forward_backward(3)
    assert threads_after == 3  # restored after the call
    assert pools and set(pools) == {3}
    for name, a, b in zip(("out", "dq", "dk", "dv"), one, three):
        assert_max_error(b, a, 1e-12, name)


def _attend_in_many_chunks():
    blocked.CHUNK_ELEMENTS = 1  # (in the child: the parent's value is the test's to restore)
    q = torch.randn(1, 2, 64, 8)
    global_attention(q, q, q, 4, backend="torch")


def test_a_forked_child_runs_the_chunks_on_threads_of_its_own(monkeypatch):
    """A fork inherits the parent's thread pools without their threads (a DataLoader worker):
    the child must not wait forever for them."""
    monkeypatch.setattr(blocked, "CHUNK_ELEMENTS", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the premise: the parent has a pool of two threads
    try:
        _attend_in_many_chunks()
        child = multiprocessing.get_context("fork").Process(target=_attend_in_many_chunks)
        child.start()
        child.join(60)
        hung = child.is_alive()
        child.kill()
    finally:
        torch.set_num_threads(before)
    assert not hung and child.exitcode == 0


# -- dropout ----------------------------------------------------------------------------------------

DROPOUT_CASES = [
    Case(B=1, Hq=2, Hkv=1, L=10, S=10, D=4, b=3),
    Case(B=1, Hq=2, Hkv=1, L=10, S=10, D=4, b=3, causal=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_zero_is_no_dropout(backend):
    case = SEED.replace(mask="random")
    q, k, v, key_mask = case.inputs()
    torch.testing.assert_close(
        case.attend(backend, q, k, v, key_mask, dropout_p=0.0), case.attend(backend, q, k, v, key_mask), rtol=0, atol=0
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params(DROPOUT_CASES))
def test_dropout_changes_output_reproducibly(case, backend):
    q, k, v, key_mask = case.inputs()
    plain = case.attend(backend, q, k, v, key_mask)
    torch.manual_seed(1234)
    first = case.attend(backend, q, k, v, key_mask, dropout_p=0.3)
    torch.manual_seed(1234)
    again = case.attend(backend, q, k, v, key_mask, dropout_p=0.3)
    other = case.attend(backend, q, k, v, key_mask, dropout_p=0.3)  # the generator has moved on
    assert torch.equal(first, again)
    assert not torch.allclose(first, plain) and not torch.allclose(first, other)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params(DROPOUT_CASES))
def test_dropout_is_unbiased(case, backend):
    """The mean over many draws (a batch of copies of one problem) approaches the output without dropout."""
    draws = 4000
    q, k, v, _ = case.inputs()
    plain = case.attend(backend, q, k, v, None)[0]  # (Hq, L, D)
    copies = [x.expand(draws, *x.shape[1:]).contiguous() for x in (q, k, v)]
    outs = case.attend(backend, *copies, None, dropout_p=0.25)  # (draws, Hq, L, D)
    mean, standard_error = outs.mean(0), outs.std(0) / draws**0.5
    assert (standard_error > 0).any()  # dropout did something
    assert ((mean - plain).abs() <= 5 * standard_error + 1e-12).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params([c.replace(L=7, S=7, D=3, b=3, mask="random") for c in DROPOUT_CASES]))
def test_dropout_backward_matches_its_forward(case, backend):
    """With the generator re-seeded before every call the dropout mask is fixed, so gradcheck applies."""
    q, k, v, key_mask = case.inputs(requires_grad=True)

    def attention(q, k, v):
        torch.manual_seed(99)
        out, lse = case.attend(backend, q, k, v, key_mask, dropout_p=0.4, return_lse=True)
        return out, finite_lse(lse)

    assert not torch.allclose(attention(q, k, v)[0], case.attend(backend, q, k, v, key_mask))
    assert torch.autograd.gradcheck(attention, (q, k, v))
