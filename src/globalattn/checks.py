"""Argument checks shared by every public entry point (api, layer, cache, distributed, the
transformers integration, the training harness).

Each raises a ValueError that names the argument and says what would be valid, so that every
refusal in the library reads the same.
"""

from __future__ import annotations

import math
import numbers

import torch

from globalattn import spec


def describe(x) -> str:
    """What was passed, for an error message: a tensor's dtype and shape, or the type's name."""
    return f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def positive_int(name: str, x, where: str = "") -> None:
    """``where``: where the value came from, for the message (e.g. " (from config.block_size)")."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}{where}")


def positive_number(name: str, x) -> None:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not x > 0 or not math.isfinite(x):
        raise ValueError(f"{name} must be a positive number, got {x!r}")


def window(x) -> None:
    """``window``: a positive int (the raw keys within w of a query), or None (its own block's keys)."""
    if x is not None:
        positive_int("window", x, " (or None: the own block's keys)")


def non_negative_int(name: str, x, meaning: str = "") -> None:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0:
        raise ValueError(f"{name} must be a non-negative int{meaning}, got {x!r}")


def boolean(name: str, x) -> None:
    if not isinstance(x, bool):
        raise ValueError(f"{name} must be True or False, got {x!r}")


def choice(name: str, x, choices) -> None:
    if not isinstance(x, str) or x not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {x!r}")


def probability(name: str, x) -> None:
    """A number in [0, 1): a dropout rate."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {x!r}")


def tensor(name: str, x, *, dims: int = 4, layout: str = "(B, H, seq, head_dim)", like=None, like_name="query") -> None:
    """A floating-point tensor of ``dims`` dimensions (``layout`` names them), with the dtype and
    device of ``like`` (called ``like_name`` in the message) when given."""
    if not isinstance(x, torch.Tensor) or x.dim() != dims or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape {layout}, got {describe(x)}")
    if like is not None and x.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but {like_name} has {like.dtype}; they must match")
    if like is not None and x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}; they must match")


def bool_mask(
    name: str, mask, shape: tuple, device, *, layout: str = "(B, S)", meaning: str = "True = real token"
) -> None:
    """A bool tensor of exactly ``shape`` on ``device`` (nothing is broadcast)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} must be a bool tensor of shape {layout} = {tuple(shape)} ({meaning}), got {describe(mask)}"
        )
    if mask.device != torch.device(device):
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}; they must match")


# The largest |scale| accepted.  Scores are float32 in every backend but the float64 one, and a
# scale near float32's range (3.4e38) turns them into inf and the softmax into NaN.  1e6 (a
# temperature of 1e-6, far past any argmax-like use) keeps the scores of inputs of ordinary
# magnitude finite.
MAX_SCALE = 1e6


def scale(x, head_dim: int) -> float:
    """The softmax scale: ``x`` if a real number with ``|x| <= MAX_SCALE``, ``1 / sqrt(head_dim)`` if None."""
    if x is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not abs(x) <= MAX_SCALE:
        raise ValueError(
            f"scale must be a real number with |scale| <= {MAX_SCALE:g} or None (= 1/sqrt(head_dim)), got {x!r}"
        )
    return float(x)


def mode(causal, scope: str = "all", remainder: str | None = None) -> None:
    """causal, scope and remainder, each valid and not contradicting the others (docs/semantics.md, "Blocks")."""
    boolean("causal", causal)
    choice("scope", scope, spec.SCOPES)
    if remainder is not None:
        choice("remainder", remainder, spec.REMAINDER_RULES)
    if causal and remainder == "merge":
        raise ValueError(
            'remainder="merge" cannot be causal: a position\'s block would depend on the final sequence '
            'length; use remainder="separate" or None'
        )
    if causal and scope == "own":
        raise ValueError('scope="own" is bidirectional only; with causal=True use scope="all"')


def first_order_backward(backend: str) -> None:
    """Called in a backend's backward: refuse ``create_graph=True``, since its gradients are not
    differentiable (without this, a second derivative would be silently missing)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"backend={backend!r} has no double backward (its backward is not differentiable); "
            "use backend='reference' for second derivatives"
        )
