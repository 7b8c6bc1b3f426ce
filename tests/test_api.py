"""The public functions: every refused input raises a ValueError that names the argument; the defaults
resolve as docs/semantics.md says."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import globalattn
from conftest import CUDA, max_error
from globalattn import attention_weights, block_bounds, global_attention

# A valid call: query (1, 2, 4, 3), key (1, 1, 6, 3), value (1, 1, 6, 2), b = 2.
B, HQ, HKV, L, S, D, DV = 1, 2, 1, 4, 6, 3, 2


def valid_arguments() -> dict:
    return dict(
        query=torch.randn(B, HQ, L, D, dtype=torch.float64),
        key=torch.randn(B, HKV, S, D, dtype=torch.float64),
        value=torch.randn(B, HKV, S, DV, dtype=torch.float64),
        block_size=2,
    )


def randn(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


# (id, arguments replaced in the valid call, regex the message must match: it names the argument)
REFUSALS = [
    ("query-rank3", dict(query=randn(HQ, L, D)), "query"),
    ("query-rank5", dict(query=randn(1, B, HQ, L, D)), "query"),
    ("key-rank3", dict(key=randn(HKV, S, D)), "key"),
    ("value-rank3", dict(value=randn(HKV, S, DV)), "value"),
    ("query-list", dict(query=randn(B, HQ, L, D).tolist()), "query"),
    ("query-numpy", dict(query=np.zeros((B, HQ, L, D))), "query"),
    ("key-none", dict(key=None), "key"),
    ("value-none", dict(value=None), "value"),
    ("value-numpy", dict(value=np.ones((B, HKV, S, DV))), "value"),
    ("query-int-dtype", dict(query=torch.ones(B, HQ, L, D, dtype=torch.int64)), "query"),
    ("key-dtype-mismatch", dict(key=randn(B, HKV, S, D, dtype=torch.float32)), "key"),
    ("value-dtype-mismatch", dict(value=randn(B, HKV, S, DV, dtype=torch.float32)), "value"),
    ("key-batch-mismatch", dict(key=randn(B + 1, HKV, S, D), value=randn(B + 1, HKV, S, DV)), "key.*batch"),
    ("value-batch-mismatch", dict(value=randn(B + 1, HKV, S, DV)), "value"),
    ("key-head_dim-mismatch", dict(key=randn(B, HKV, S, D + 1)), "head_dim"),
    ("head_dim-zero", dict(query=randn(B, HQ, L, 0), key=randn(B, HKV, S, 0)), "head_dim"),
    ("value-seq-mismatch", dict(value=randn(B, HKV, S - 1, DV)), "value"),
    ("value-heads-mismatch", dict(value=randn(B, HKV + 1, S, DV)), "value"),
    ("heads-not-multiple", dict(query=randn(B, 3, L, D), key=randn(B, 2, S, D), value=randn(B, 2, S, DV)), "heads"),
    ("L-gt-S", dict(query=randn(B, HQ, S + 1, D)), r"\bL\b|query length"),
    ("S-zero", dict(query=randn(B, HQ, 0, D), key=randn(B, HKV, 0, D), value=randn(B, HKV, 0, DV)), r"key|\bS\b"),
    ("block_size-0", dict(block_size=0), "block_size"),
    ("block_size-negative", dict(block_size=-1), "block_size"),
    ("block_size-float", dict(block_size=2.5), "block_size"),
    ("block_size-integral-float", dict(block_size=2.0), "block_size"),
    ("block_size-bool", dict(block_size=True), "block_size"),
    ("block_size-str", dict(block_size="4"), "block_size"),
    ("block_size-none", dict(block_size=None), "block_size"),
    ("causal-int", dict(causal=1), "causal"),
    ("causal-str", dict(causal="yes"), "causal"),
    ("causal-merge", dict(causal=True, remainder="merge"), "remainder"),
    ("causal-own", dict(causal=True, scope="own"), "scope"),
    ("scope-unknown", dict(scope="local"), "scope"),
    ("scope-none", dict(scope=None), "scope"),
    ("remainder-unknown", dict(remainder="tail"), "remainder"),
    ("backend-unknown", dict(backend="flash"), "backend"),
    ("backend-none", dict(backend=None), "backend"),
    ("key_mask-float", dict(key_mask=torch.ones(B, S)), "key_mask"),
    ("key_mask-int", dict(key_mask=torch.ones(B, S, dtype=torch.int64)), "key_mask"),
    ("key_mask-short", dict(key_mask=torch.ones(B, S - 1, dtype=torch.bool)), "key_mask"),
    ("key_mask-1d", dict(key_mask=torch.ones(S, dtype=torch.bool)), "key_mask"),
    ("key_mask-per-head", dict(key_mask=torch.ones(B, HKV, S, dtype=torch.bool)), "key_mask"),
    ("key_mask-list", dict(key_mask=[[True] * S]), "key_mask"),
    ("scale-nan", dict(scale=math.nan), "scale"),
    ("scale-inf", dict(scale=math.inf), "scale"),
    ("scale-minus-inf", dict(scale=-math.inf), "scale"),
    ("scale-overflowing", dict(scale=1e38), "scale"),  # float32 scores would overflow into NaN
    ("scale-str", dict(scale="0.5"), "scale"),
    ("scale-bool", dict(scale=True), "scale"),
    ("scale-tensor", dict(scale=torch.tensor([0.5, 0.5])), "scale"),
    ("dropout_p-negative", dict(dropout_p=-0.1), "dropout_p"),
    ("dropout_p-one", dict(dropout_p=1.0), "dropout_p"),
    ("dropout_p-nan", dict(dropout_p=math.nan), "dropout_p"),
    ("dropout_p-str", dict(dropout_p="0.1"), "dropout_p"),
    ("dropout_p-bool", dict(dropout_p=True), "dropout_p"),
    ("return_lse-int", dict(return_lse=1), "return_lse"),
    ("return_lse-none", dict(return_lse=None), "return_lse"),
]


@pytest.mark.parametrize("changes, match", [pytest.param(c, m, id=i) for i, c, m in REFUSALS])
def test_global_attention_refuses(changes, match):
    arguments = valid_arguments() | changes
    with pytest.raises(ValueError, match=match):
        global_attention(**arguments)


WEIGHT_REFUSALS = [
    ("query-rank3", dict(query=randn(HQ, L, D)), "query"),
    ("key-none", dict(key=None), "key"),
    ("key-dtype-mismatch", dict(key=randn(B, HKV, S, D, dtype=torch.float32)), "key"),
    ("key-head_dim-mismatch", dict(key=randn(B, HKV, S, D + 1)), "head_dim"),
    ("heads-not-multiple", dict(query=randn(B, 3, L, D), key=randn(B, 2, S, D)), "heads"),
    ("L-gt-S", dict(query=randn(B, HQ, S + 1, D)), r"\bL\b|query length"),
    ("block_size-0", dict(block_size=0), "block_size"),
    ("block_size-str", dict(block_size="4"), "block_size"),
    ("causal-merge", dict(causal=True, remainder="merge"), "remainder"),
    ("causal-own", dict(causal=True, scope="own"), "scope"),
    ("scope-unknown", dict(scope="local"), "scope"),
    ("key_mask-short", dict(key_mask=torch.ones(B, S - 1, dtype=torch.bool)), "key_mask"),
    ("scale-nan", dict(scale=math.nan), "scale"),
]


@pytest.mark.parametrize("changes, match", [pytest.param(c, m, id=i) for i, c, m in WEIGHT_REFUSALS])
def test_attention_weights_refuses(changes, match):
    arguments = valid_arguments() | changes
    del arguments["value"]
    with pytest.raises(ValueError, match=match):
        attention_weights(**arguments)


@pytest.mark.parametrize(
    "seq_len, block_size, remainder, match",
    [
        pytest.param(0, 2, "merge", "seq_len", id="seq_len-0"),
        pytest.param(-3, 2, "merge", "seq_len", id="seq_len-negative"),
        pytest.param(2.5, 2, "merge", "seq_len", id="seq_len-float"),
        pytest.param(True, 2, "merge", "seq_len", id="seq_len-bool"),
        pytest.param(8, 0, "merge", "block_size", id="block_size-0"),
        pytest.param(8, -2, "merge", "block_size", id="block_size-negative"),
        pytest.param(8, "4", "merge", "block_size", id="block_size-str"),
        pytest.param(8, False, "merge", "block_size", id="block_size-bool"),
        pytest.param(8, 2, "tail", "remainder", id="remainder-unknown"),
        pytest.param(8, 2, None, "remainder", id="remainder-none"),
    ],
)
def test_block_bounds_refuses(seq_len, block_size, remainder, match):
    with pytest.raises(ValueError, match=match):
        block_bounds(seq_len, block_size, remainder=remainder)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("moved", ["key", "value", "key_mask"])
def test_refuses_mixed_devices(moved):
    arguments = valid_arguments() | dict(key_mask=torch.ones(B, S, dtype=torch.bool))
    arguments = {name: x.cuda() if torch.is_tensor(x) and name != moved else x for name, x in arguments.items()}
    with pytest.raises(ValueError, match=moved):
        global_attention(**arguments)


# -- what is accepted, and the defaults -------------------------------------------------------------


def test_public_names():
    expected = {"GlobalAttention", "PooledKVCache", "attention_weights", "block_bounds", "global_attention"}
    assert set(globalattn.__all__) == expected | {"explain_backend"}


def test_default_scale_is_inverse_sqrt_head_dim():
    arguments = valid_arguments()
    explicit = global_attention(**arguments, scale=1 / math.sqrt(D))
    assert torch.equal(global_attention(**arguments), explicit)
    assert max_error(global_attention(**arguments, scale=0.3), explicit) > 1e-6  # the scale matters


@pytest.mark.parametrize("causal, resolved", [(False, "merge"), (True, "separate")])
def test_default_remainder(causal, resolved):
    arguments = valid_arguments() | dict(block_size=4)  # S = 6, b = 4: the rules differ
    default = global_attention(**arguments, causal=causal)
    assert torch.equal(default, global_attention(**arguments, causal=causal, remainder=resolved))
    if not causal:
        assert max_error(default, global_attention(**arguments, remainder="separate")) > 1e-6


def test_all_true_key_mask_is_no_mask():
    arguments = valid_arguments()
    masked = global_attention(**arguments, key_mask=torch.ones(B, S, dtype=torch.bool))
    torch.testing.assert_close(masked, global_attention(**arguments), rtol=0, atol=1e-14)


@pytest.mark.parametrize("block_size", [np.int64(2), torch.tensor(2).item()], ids=["numpy-int", "python-int"])
def test_integral_block_sizes_are_accepted(block_size):
    arguments = valid_arguments()
    torch.testing.assert_close(
        global_attention(**arguments | dict(block_size=block_size)), global_attention(**arguments), rtol=0, atol=0
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_return_types(dtype):
    arguments = {name: x.to(dtype) if torch.is_tensor(x) else x for name, x in valid_arguments().items()}
    out = global_attention(**arguments)
    assert isinstance(out, torch.Tensor) and out.shape == (B, HQ, L, DV) and out.dtype == dtype
    out2, lse = global_attention(**arguments, return_lse=True)
    assert torch.equal(out2, out)
    assert lse.shape == (B, HQ, L) and lse.dtype == torch.promote_types(dtype, torch.float32)
    weights = attention_weights(arguments["query"], arguments["key"], 2)
    assert weights.shape == (B, HQ, L, S + S // 2) and weights.dtype == dtype


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("empty", ["B", "Hq"])
def test_empty_batch_or_heads_give_empty_results(backend, empty):
    """B = 0 or Hq = 0: the empty output and lse, and empty gradients, as for any other shape."""
    batch, q_heads = (0, HQ) if empty == "B" else (B, 0)
    q = randn(batch, q_heads, L, D).requires_grad_()
    k, v = randn(batch, HKV, S, D).requires_grad_(), randn(batch, HKV, S, D).requires_grad_()
    out, lse = global_attention(q, k, v, 4, causal=True, top_blocks=1, return_lse=True, backend=backend)
    assert out.shape == (batch, q_heads, L, D) and lse.shape == (batch, q_heads, L)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("block_size", [2**63, 2**70])
def test_block_sizes_beyond_int64_cut_one_block(block_size):
    """A block longer than the sequence is one block, whatever the int: the same as b = S."""
    arguments = valid_arguments() | dict(block_size=block_size)
    expected = global_attention(**(arguments | dict(block_size=S)))
    assert max_error(global_attention(**arguments), expected) == 0
    assert block_bounds(S, block_size) == [(0, S)]


@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_compiles_without_graph_breaks(causal):
    """torch.compile(fullgraph=True) of forward and backward equals eager (to float32 rounding)."""
    q, k, v = (randn(B, h, S, D).requires_grad_() for h in (HQ, HKV, HKV))
    key_mask = torch.rand(B, S) > 0.3

    def attend(q, k, v, key_mask):
        return global_attention(q, k, v, 4, causal=causal, key_mask=key_mask, top_blocks=1, backend="torch")

    upstream = randn(B, HQ, S, D)
    eager = attend(q, k, v, key_mask)
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v, key_mask)
    assert max_error(compiled, eager) < 1e-6
    for got, expected in zip(
        torch.autograd.grad(compiled, (q, k, v), upstream), torch.autograd.grad(eager, (q, k, v), upstream)
    ):
        assert max_error(got, expected) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_first_order_backends_refuse_double_backward(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = (randn(B, h, S, 16, dtype=dtype).requires_grad_() for h in (HQ, HKV, HKV))
    out = global_attention(q, k, v, 4, backend=backend)
    with pytest.raises(RuntimeError, match=f"backend='{backend}' has no double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True, allow_unused=True)


def test_import_loads_only_what_is_used():
    """``import globalattn`` loads no torch until a public name is used; resolving every name loads
    neither Triton, transformers, the harness nor the distributed machinery, and neither does using
    them on the CPU (torch's custom ops themselves import Triton, when installed, on a first call)."""
    script = """
import sys
untouched = "torch" not in sys.modules
import globalattn
untouched = untouched and "torch" not in sys.modules
names = [name for name in globalattn.__all__ if getattr(globalattn, name) is None]
heavy = ["triton", "transformers", "globalattn.harness", "globalattn.distributed", "globalattn.backends.flex"]
print(untouched, names, [m for m in heavy if m in sys.modules])
import torch
q = torch.randn(1, 2, 8, 4)
globalattn.global_attention(q, q, q, 4, causal=True)
layer = globalattn.GlobalAttention(8, 2, block_size=4, causal=True)
layer(torch.randn(1, 5, 8), cache=globalattn.PooledKVCache())
print([m for m in heavy[1:] + ["globalattn.backends.triton"] if m in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["True [] []", "[]"]
