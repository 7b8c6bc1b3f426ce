"""Shared fixtures and helpers of the core test suite.

- ``seed`` (autouse): every test draws fresh random inputs, from a per-session seed (printed in the
  report header; set ``GLOBALATTN_TEST_SEED`` to replay a run) mixed with the test's id.
- ``device``: "cpu", and "cuda" (marked ``gpu``, skipped without a CUDA device).
- Without a CUDA device the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set here
  before globalattn imports them), so the "triton" backend is tested on the CPU too; on a GPU they
  run with their default tiles only (GLOBALATTN_TRITON_AUTOTUNE=0), not tuned per test shape.
- ``Case``: one attention problem (shapes and options) with a readable id, and its random inputs.
- ``dense_attention``: masked dense softmax over [keys ; global tokens] in differentiable torch ops,
  built from the oracle's allowed mask and pooling matrix.  At float64 it is the gradient reference;
  at a low precision it is the "same computation done naively" of flash-attention's error rule.
"""

from __future__ import annotations

import math
import os
import random
import zlib
from dataclasses import dataclass, fields

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GLOBALATTN_TRITON_AUTOTUNE", "0")  # one tile configuration: no tuning per test shape

import oracle  # noqa: E402
from globalattn import backends, global_attention, options  # noqa: E402

SESSION_SEED = int(os.environ.get("GLOBALATTN_TEST_SEED", random.randrange(2**31)))

# The tensors here are tiny: a second intra-op thread only adds a rendezvous per operation, which
# costs milliseconds when other processes hold the cores (the suite ran 7x slower on a busy 2-core
# machine).  GLOBALATTN_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("GLOBALATTN_TEST_THREADS", 1)))


def pytest_report_header(config):
    return f"globalattn test seed: GLOBALATTN_TEST_SEED={SESSION_SEED}, torch threads: {torch.get_num_threads()}"


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Seed torch for this test: fresh every session, reproducible with GLOBALATTN_TEST_SEED."""
    value = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(value)
    return value


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


@dataclass(frozen=True)
class Case:
    """One attention problem: shapes, options, and which keys are padding.

    mask: None (all real), "random" (about 30% padding), "block" (as random, and batch 0's first
    block entirely padded: no global token, and empty rows where that block's queries see nothing
    else), "empty" (as random, and batch 0 entirely padded: every row of it empty).
    """

    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    L: int = 16
    S: int = 16
    D: int = 8
    Dv: int | None = None
    b: int = 5
    causal: bool = False
    scope: str = "all"
    remainder: str | None = None
    mask: str | None = None
    scale: float | None = None
    top_blocks: int = 0
    window: int | None = None

    @property
    def resolved_remainder(self) -> str:
        return self.remainder or ("separate" if self.causal else "merge")

    @property
    def id(self) -> str:
        parts = [f"B{self.B}-Hq{self.Hq}-Hkv{self.Hkv}-L{self.L}-S{self.S}-D{self.D}"]
        if self.Dv is not None:
            parts.append(f"Dv{self.Dv}")
        parts += [f"b{self.b}", "causal" if self.causal else "bidir", self.scope, self.resolved_remainder]
        if self.mask:
            parts.append(f"mask_{self.mask}")
        if self.scale is not None:
            parts.append(f"scale{self.scale}")
        if self.top_blocks:
            parts.append(f"top{self.top_blocks}")
        if self.window is not None:
            parts.append(f"w{self.window}")
        return "-".join(parts)

    def replace(self, **changes) -> Case:
        return Case(**{f.name: changes.get(f.name, getattr(self, f.name)) for f in fields(self)})

    def options(self) -> dict:
        """Keyword arguments of ``global_attention`` / ``oracle.attention`` (key_mask apart)."""
        return dict(
            causal=self.causal,
            scope=self.scope,
            remainder=self.remainder,
            scale=self.scale,
            top_blocks=self.top_blocks,
            window=self.window,
        )

    def inputs(self, dtype=torch.float64, device="cpu", requires_grad=False):
        """Random (query, key, value, key_mask): (B,Hq,L,D), (B,Hkv,S,D), (B,Hkv,S,Dv), (B,S) or None."""
        shapes = [(self.B, self.Hq, self.L, self.D), (self.B, self.Hkv, self.S, self.D)]
        shapes.append((self.B, self.Hkv, self.S, self.Dv or self.D))
        q, k, v = (torch.randn(shape, dtype=torch.float64).to(device, dtype) for shape in shapes)
        for x in (q, k, v):
            x.requires_grad_(requires_grad)
        return q, k, v, self.key_mask(device)

    def key_mask(self, device="cpu") -> torch.Tensor | None:
        if self.mask is None:
            return None
        real = torch.rand(self.B, self.S) > 0.3
        if self.mask == "block":
            lo, hi = oracle.blocks(self.S, self.b, self.resolved_remainder)[0]
            real[0, lo:hi] = False
        elif self.mask == "empty":
            real[0] = False
        else:
            assert self.mask == "random", self.mask
        return real.to(device)

    def attend(self, backend, q, k, v, key_mask, **extra):
        """``global_attention`` of these inputs with this case's options; a test of a fused
        backend on inputs it does not cover (a dtype, an option) is skipped with its reason."""
        if backend in ("flex", "triton"):
            chosen = {name: x for name, x in extra.items() if name in options.NAMES}
            resolved = options.resolve(q, k, v, self.b, key_mask=key_mask, **self.options(), **chosen)
            reason = backends.get(backend).unsupported(q, k, v, resolved)
            if reason is not None:
                pytest.skip(f"{backend}: {reason}")
        return global_attention(q, k, v, self.b, key_mask=key_mask, backend=backend, **self.options(), **extra)

    def oracle(self, q, k, v, key_mask) -> oracle.Result:
        return oracle.attention(q, k, v, self.b, key_mask=key_mask, **self.options())

    def scale_value(self) -> float:
        return 1.0 / math.sqrt(self.D) if self.scale is None else self.scale


# The grid every backend is tested on: the seed's 16 tokens and the corners of docs/semantics.md ("Edge cases").
# Largest error allowed against the float64 oracle (inputs ~ N(0, 1)): absolute for out and lse,
# relative to the largest exact value (at least 1) for gradients, which grow with the sequence.
FORWARD_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
# Low precision: the global tokens are rounded to the input dtype, which moves every global score.
LSE_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 8e-3}
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
# flash-attention's rule: the slack added to factor x (naive error), half an ulp at 1.
SLACK = {dtype: torch.finfo(dtype).eps / 2 for dtype in (torch.bfloat16, torch.float16)}

SEED = Case()  # B2-Hq4-Hkv2-L16-S16-D8-b5-bidir-all-merge: the seed's 16 tokens, b = 5
ODD = Case(B=1, Hq=2, Hkv=1, L=11, S=11, D=59, Dv=61, b=3)  # awkward head dims, Dv != D
GRID = [
    SEED,
    SEED.replace(remainder="separate"),
    SEED.replace(scope="own"),
    SEED.replace(scope="own", remainder="separate"),
    Case(L=12, S=12, b=4),  # S a multiple of b
    Case(L=13, S=13, b=4, remainder="separate"),
    Case(L=7, S=7, b=10),  # b > S
    Case(L=7, S=7, b=10, causal=True),
    Case(L=9, S=9, b=1),  # b = 1
    Case(L=9, S=9, b=1, causal=True),
    SEED.replace(causal=True),  # causal, L == S
    SEED.replace(causal=True, L=5),  # causal, L < S
    Case(L=1, S=13, b=4, causal=True),  # decoding one token
    SEED.replace(L=7),  # bidirectional, L < S
    Case(L=3, S=13, b=4, scope="own"),
    SEED.replace(Hkv=1),  # GQA down to one key/value head
    Case(Hq=3, Hkv=3, L=10, S=10, b=3),  # plain multi-head
    ODD,
    ODD.replace(causal=True, mask="random"),
    SEED.replace(mask="random"),
    SEED.replace(mask="block"),  # an absent global token
    SEED.replace(mask="empty"),  # every row of batch 0 sees nothing
    SEED.replace(scope="own", mask="block"),  # block 0's rows see nothing
    SEED.replace(causal=True, mask="block"),  # block 0's rows see nothing
    SEED.replace(causal=True, L=9, mask="empty"),
    SEED.replace(remainder="separate", mask="random", L=6),
    SEED.replace(scale=0.37),
    Case(L=10, S=10, b=3, causal=True, scale=2.5),
    # Long causal blocks, one of them partly before the first query.
    Case(B=1, Hq=2, Hkv=1, L=300, S=300, D=4, b=64, causal=True),
    Case(B=2, Hq=2, Hkv=1, L=100, S=300, D=4, b=71, causal=True, mask="random"),
]
# A sliding window of raw keys beside the global tokens (docs/semantics.md, "A sliding window of raw
# keys"): windows shorter than, equal to and longer than b, w = 1, w >= S, both modes, L < S.
WINDOW_GRID = [
    SEED.replace(window=3),
    SEED.replace(window=3, causal=True),
    SEED.replace(window=5, causal=True, mask="random"),  # w = b
    SEED.replace(window=8, mask="block"),  # w > b: three blocks' keys
    SEED.replace(window=1, causal=True),  # a row sees only itself
    SEED.replace(window=1, scope="own"),
    SEED.replace(window=40),  # w >= S: every key
    SEED.replace(window=40, causal=True, L=6),  # every earlier key, L < S
    SEED.replace(window=4, causal=True, L=1, Hkv=1),  # decoding one token, GQA
    ODD.replace(window=4, causal=True, mask="random"),
    Case(B=2, Hq=2, Hkv=1, L=100, S=300, D=4, b=32, window=50, causal=True, mask="random"),
]
GRID += WINDOW_GRID


def case_params(cases) -> list:
    """``pytest.param`` per case, with its readable id."""
    return [pytest.param(case, id=case.id) for case in cases]


def dense_attention(query, key, value, ref: oracle.Result, scale: float):
    """Global-token attention as one masked dense softmax, in torch ops at the inputs' dtype.

    query (B,Hq,L,D), key (B,Hkv,S,D), value (B,Hkv,S,Dv); ``ref`` supplies only the structure
    (who sees what, and the pooling matrix), so gradients flow through every score and mean.
    Returns out (B,Hq,L,Dv) and lse (B,Hq,L), -inf for a row that sees nothing.
    """
    group = query.shape[1] // key.shape[1]
    pool = ref.pool.to(query.device, query.dtype)[:, None]  # (B, 1, G, S)
    keys = torch.cat([key, pool @ key], dim=2).repeat_interleave(group, dim=1)  # (B, Hq, S+G, D)
    values = torch.cat([value, pool @ value], dim=2).repeat_interleave(group, dim=1)  # (B, Hq, S+G, Dv)
    allowed = ref.allowed.to(query.device)[:, None]  # (B, 1, L, S+G)
    has_any = allowed.any(-1, keepdim=True)  # (B, 1, L, 1)
    scores = scale * (query @ keys.transpose(-1, -2))
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_any, 0.0)
    weights = torch.softmax(scores, dim=-1) * has_any
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~has_any[..., 0], float("-inf"))
    return weights @ values, lse


def max_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest absolute difference, with -inf == -inf counting as exact (empty rows' lse)."""
    got, exact = got.detach().cpu().double(), exact.detach().cpu().double()
    assert torch.equal(torch.isneginf(got), torch.isneginf(exact)), "-inf in different places"
    finite = torch.isfinite(exact)
    assert torch.isfinite(got[finite]).all(), "non-finite values where the exact result is finite"
    return float((got[finite] - exact[finite]).abs().max()) if finite.any() else 0.0


def assert_max_error(got, exact, tol: float, name: str = "result") -> None:
    err = max_error(got, exact)
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


def assert_within_naive_error(name, got, naive, exact, *, factor, slack):
    """flash-attention's rule: error vs the exact result at most ``factor`` times that of the naive
    computation at the input's precision, plus ``slack``."""
    err, naive_err = max_error(got, exact), max_error(naive, exact)
    assert err <= factor * naive_err + slack, f"{name}: error {err:.3g} > {factor} x naive {naive_err:.3g} + {slack:g}"


def grads_of(outputs, inputs, grad_outputs):
    """d(inputs) for the given upstream gradients (one per output)."""
    return torch.autograd.grad(outputs, inputs, grad_outputs)


def assert_empty_rows_are_zero(out, lse, ref):
    """Rows that may see nothing: output exactly 0, lse -inf; and no NaN anywhere."""
    empty = ~ref.allowed.any(-1)[:, None].expand(lse.shape).to(out.device)  # (B, Hq, L)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[empty] == 0).all()
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()


def assert_gradients_match_dense_float64(case: Case, inputs, key_mask, out, lse):
    """dq, dk, dv of (out, lse) = attention(*inputs) for a random upstream gradient, against float64
    autograd of ``dense_attention``; at low precision also flash-attention's 3x rule.  And a row
    that sees nothing has no gradient; a padded key receives none either."""
    q, k, v = inputs
    dtype, device = q.dtype, q.device
    ref = case.oracle(q, k, v, key_mask)
    upstream = (torch.randn_like(out), torch.randn_like(lse))
    got = grads_of((out, lse), inputs, upstream)

    exact_inputs = [x.detach().double().requires_grad_() for x in inputs]
    exact_outputs = dense_attention(*exact_inputs, ref, case.scale_value())
    exact = grads_of(exact_outputs, exact_inputs, [g.double() for g in upstream])
    if dtype in LOW_PRECISION:
        naive = grads_of(dense_attention(q, k, v, ref, case.scale_value()), inputs, upstream)

    for i, name in enumerate(("dq", "dk", "dv")):
        assert got[i].dtype == dtype and got[i].shape == exact[i].shape
        assert torch.isfinite(got[i]).all(), f"{name} not finite"
        assert_max_error(got[i], exact[i], GRAD_RTOL[dtype] * max(1.0, exact[i].abs().max().item()), name)
        if dtype in LOW_PRECISION:
            assert_within_naive_error(name, got[i], naive[i], exact[i], factor=3, slack=SLACK[dtype])

    dq, dk, dv = got
    empty = ~ref.allowed.any(-1).to(device)  # (B, L)
    assert (dq.transpose(1, 2)[empty] == 0).all()
    if key_mask is not None:
        assert (dk.transpose(1, 2)[~key_mask] == 0).all() and (dv.transpose(1, 2)[~key_mask] == 0).all()


# Memory layouts users pass: every backend is tested on them (test_properties, test_triton, test_flex).
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "fused_qkv")


def in_layout(q, k, v, layout: str):
    """The same values as (q, k, v), as views of the given memory layout.

    transposed: (B, S, H, D) storage; sliced: every other position of a longer buffer, head dim cut
    from a wider one; expanded: key/value heads broadcast from one (stride 0, so all heads equal);
    fused_qkv: views into one (B, S, 3, H, D) buffer, as a fused QKV projection gives them.
    """
    if layout == "contiguous":
        return q, k, v
    if layout == "transposed":
        return tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    if layout == "sliced":

        def sliced(x):
            wide = torch.randn(x.shape[0], x.shape[1], 2 * x.shape[2], x.shape[3] + 3, dtype=x.dtype)
            wide[:, :, ::2, : x.shape[3]] = x
            return wide[:, :, ::2, : x.shape[3]]

        return tuple(sliced(x) for x in (q, k, v))
    if layout == "expanded":
        return q, k[:, :1].expand_as(k), v[:, :1].expand_as(v)
    assert layout == "fused_qkv", layout
    assert q.shape == k.shape == v.shape
    qkv = torch.stack([x.transpose(1, 2) for x in (q, k, v)], dim=2)  # (B, S, 3, H, D)
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
