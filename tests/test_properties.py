"""Properties that must hold for any shapes and options (hypothesis), for both backends, in float64:
causality, padding invariance, batch independence, grouped-query equivalence, shift invariance,
the two backends agreeing with each other and with the oracle; and every available backend,
values and gradients, on the memory layouts users pass with garbage in the padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import LAYOUTS, Case, assert_max_error, in_layout
from globalattn import backends, global_attention

BACKENDS = ["reference", "torch"]
EXAMPLES = settings(max_examples=30, deadline=None)
ATOL = 1e-12


@st.composite
def cases(draw, *, causal=None, remainders=(None, "merge", "separate"), masks=(None, "random"), min_batch=1):
    """A random small problem, and a seed for its inputs."""
    causal = draw(st.booleans()) if causal is None else causal
    seq_len = draw(st.integers(1, 24))
    kv_heads = draw(st.integers(1, 2))
    case = Case(
        B=draw(st.integers(min_batch, 3)),
        Hkv=kv_heads,
        Hq=kv_heads * draw(st.integers(1, 3)),
        S=seq_len,
        L=draw(st.integers(1, seq_len)),
        D=draw(st.integers(1, 6)),
        Dv=draw(st.integers(1, 6)),
        b=draw(st.integers(1, seq_len + 3)),
        causal=causal,
        scope="all" if causal else draw(st.sampled_from(["all", "own"])),
        remainder=draw(st.sampled_from([r for r in remainders if not (causal and r == "merge")])),
        mask=draw(st.sampled_from(masks)),
    )
    return case, draw(st.integers(0, 2**31 - 1))


def inputs(case: Case, seed: int, **kwargs):
    torch.manual_seed(seed)
    return case.inputs(**kwargs)


def attend(backend, case, q, k, v, key_mask, **extra):
    """(out, lse) of ``global_attention`` for this case."""
    return case.attend(backend, q, k, v, key_mask, return_lse=True, **extra)


def assert_same(got, expected):
    for a, b in zip(got, expected):
        assert_max_error(a, b, ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(drawn=cases(causal=True), data=st.data())
def test_causal_rows_ignore_the_future(backend, drawn, data):
    case, seed = drawn
    q, k, v, key_mask = inputs(case, seed)
    t = data.draw(st.integers(0, case.L - 1), label="last unchanged row")
    p = case.S - case.L + t  # its position
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, t + 1 :] = torch.randn_like(q2[:, :, t + 1 :])
    k2[:, :, p + 1 :] = torch.randn_like(k2[:, :, p + 1 :])
    v2[:, :, p + 1 :] = torch.randn_like(v2[:, :, p + 1 :])
    mask2 = None
    if key_mask is not None:
        mask2 = key_mask.clone()
        mask2[:, p + 1 :] = torch.rand_like(mask2[:, p + 1 :], dtype=torch.float64) > 0.5
    before = attend(backend, case, q, k, v, key_mask)
    after = attend(backend, case, q2, k2, v2, mask2)
    assert_same([x[:, :, : t + 1] for x in after], [x[:, :, : t + 1] for x in before])


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(drawn=cases(masks=("random",)))
def test_padded_keys_and_values_are_ignored(backend, drawn):
    case, seed = drawn
    q, k, v, key_mask = inputs(case, seed)
    padded = ~key_mask[:, None, :, None]  # (B, 1, S, 1)
    k2 = torch.where(padded, 100 * torch.randn_like(k), k)
    v2 = torch.where(padded, 100 * torch.randn_like(v), v)
    assert_same(attend(backend, case, q, k2, v2, key_mask), attend(backend, case, q, k, v, key_mask))


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(drawn=cases(remainders=("separate",)), extra=st.integers(1, 8))
def test_appending_padding_changes_nothing(backend, drawn, extra):
    """With separate blocks, padded positions appended at the end leave every earlier row unchanged."""
    case, seed = drawn
    case = case.replace(L=case.S)
    q, k, v, key_mask = inputs(case, seed)
    longer = case.replace(S=case.S + extra, L=case.S + extra)
    q2, k2, v2, _ = longer.inputs()
    q2[:, :, : case.S], k2[:, :, : case.S], v2[:, :, : case.S] = q, k, v
    mask2 = torch.zeros(case.B, longer.S, dtype=torch.bool)
    mask2[:, : case.S] = True if key_mask is None else key_mask
    out2, lse2 = attend(backend, longer, q2, k2, v2, mask2)
    assert_same((out2[:, :, : case.S], lse2[:, :, : case.S]), attend(backend, case, q, k, v, key_mask))


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(drawn=cases(min_batch=2))
def test_batch_elements_are_independent(backend, drawn):
    case, seed = drawn
    q, k, v, key_mask = inputs(case, seed)
    out, lse = attend(backend, case, q, k, v, key_mask)
    for i in range(case.B):
        alone = slice(i, i + 1)
        mask_i = None if key_mask is None else key_mask[alone]
        assert_same(attend(backend, case, q[alone], k[alone], v[alone], mask_i), (out[alone], lse[alone]))


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(drawn=cases())
def test_grouped_queries_equal_repeated_heads(backend, drawn):
    """Hkv < Hq equals repeating each key/value head; its key/value gradients sum over the group."""
    case, seed = drawn
    group = case.Hq // case.Hkv
    q, k, v, key_mask = inputs(case, seed, requires_grad=True)
    k_rep, v_rep = (x.detach().repeat_interleave(group, 1).requires_grad_() for x in (k, v))
    grouped = attend(backend, case, q, k, v, key_mask)
    repeated = attend(backend, case.replace(Hkv=case.Hq), q, k_rep, v_rep, key_mask)
    assert_same(grouped, repeated)
    upstream = torch.randn_like(grouped[0])
    dq, dk, dv = torch.autograd.grad(grouped[0], (q, k, v), upstream)
    dq_rep, dk_rep, dv_rep = torch.autograd.grad(repeated[0], (q, k_rep, v_rep), upstream)

    def summed(x):  # (B, Hq, S, E) -> (B, Hkv, S, E)
        return x.unflatten(1, (case.Hkv, group)).sum(2)

    assert_same((dq, dk, dv), (dq_rep, summed(dk_rep), summed(dv_rep)))


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(drawn=cases())
def test_shifts_of_keys_and_values(backend, drawn):
    """Global tokens are means: adding one vector c to every key adds <q, c> to every score of a row
    (local and global alike), which the softmax ignores; adding c to every value adds c to every
    row that sees something."""
    case, seed = drawn
    q, k, v, key_mask = inputs(case, seed)
    out, lse = attend(backend, case, q, k, v, key_mask)
    key_shift = torch.randn(case.B, case.Hkv, 1, case.D, dtype=torch.float64)
    value_shift = torch.randn(case.B, case.Hkv, 1, case.Dv, dtype=torch.float64)
    shifted, _ = attend(backend, case, q, k + key_shift, v + value_shift, key_mask)
    sees = torch.isfinite(lse)[..., None]  # (B, Hq, L, 1)
    expected = torch.where(sees, out + value_shift.repeat_interleave(case.Hq // case.Hkv, 1), 0.0)
    assert_max_error(shifted, expected, 1e-10, "shifted out")


@EXAMPLES
@given(drawn=cases(masks=(None, "random", "block", "empty")))
def test_backends_agree_with_each_other_and_the_oracle(drawn):
    case, seed = drawn
    q, k, v, key_mask = inputs(case, seed, requires_grad=True)
    ref = case.oracle(q, k, v, key_mask)
    results = {}
    for backend in BACKENDS:
        out, lse = attend(backend, case, q, k, v, key_mask)
        assert_max_error(out, ref.out, 1e-10, f"{backend} out")
        assert_max_error(lse, ref.lse, 1e-10, f"{backend} lse")
        upstream = torch.randn_like(out, generator=torch.Generator().manual_seed(seed))
        results[backend] = (out, lse, *torch.autograd.grad(out, (q, k, v), upstream))
    assert_same(results["torch"], results["reference"])


# --- Every backend on the memory layouts users pass, with garbage in the padding -----------------


def available_backends() -> list:
    """Every backend that can run here; triton under the interpreter (float32), flex forward only."""
    fused = [name for name in ("triton", "flex") if hasattr(backends.get(name), "attention")]
    return ["reference", "torch", *fused]


@pytest.mark.parametrize("backend", available_backends())
@settings(max_examples=12, deadline=None)
@given(drawn=cases(masks=(None, "random", "block")), data=st.data())
def test_every_backend_on_user_layouts_with_garbage_in_padding(backend, drawn, data):
    case, seed = drawn
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    if backend in ("reference", "torch"):
        case = case.replace(top_blocks=data.draw(st.integers(0, 2), label="top_blocks"))
    if layout == "fused_qkv":  # one buffer: equal heads, lengths and head dims
        case = case.replace(Hq=case.Hkv, L=case.S, Dv=case.D)
    dtype = torch.float32 if backend == "triton" else torch.float64  # the interpreter: no float64
    q, k, v = (x.to(dtype) for x in inputs(case, seed)[:3])
    key_mask = case.key_mask()
    if key_mask is not None:
        # NaN and inf where the mask says padding: they must not reach any output or gradient.
        pad = ~key_mask[:, None, :, None]
        garbage = torch.tensor([float("nan"), float("inf")], dtype=dtype)[torch.randint(2, key_mask.shape)]
        k, v = (torch.where(pad, garbage[:, None, :, None], x) for x in (k, v))
        if data.draw(st.booleans(), label="column-major mask"):
            key_mask = key_mask.t().contiguous().t()
    with_grad = backend != "flex"  # flex has no gradients on the CPU (test_flex reaches them through a seam)
    q, k, v = (x.requires_grad_(with_grad) for x in in_layout(q, k, v, layout))  # the backend sees these views
    exact_inputs = [x.detach().double().contiguous() for x in (q, k, v)]
    if key_mask is not None:
        exact_inputs[1:] = [torch.where(pad, 0.0, x) for x in exact_inputs[1:]]
    exact_inputs = [x.requires_grad_() for x in exact_inputs]
    out, lse = attend(backend, case, q, k, v, key_mask)

    ref = case.oracle(*exact_inputs, key_mask)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_max_error(out, ref.out, tol, f"{backend} out")
    assert_max_error(lse, ref.lse, tol, f"{backend} lse")
    if not with_grad:
        return
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), upstream)
    exact_out = global_attention(*exact_inputs, case.b, key_mask=key_mask, backend="reference", **case.options())
    exact = torch.autograd.grad(exact_out, exact_inputs, upstream.double())
    for name, g, e in zip(("dq", "dk", "dv"), got, exact):
        assert g.shape == e.shape, name
        assert_max_error(g, e, tol * max(1.0, e.abs().max().item()), f"{backend} {name}")
