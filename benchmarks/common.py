"""What every benchmark script here needs: a timer that waits for the device, the machine's name for
the JSON, the correctness gate's forward and backward, and a JSON writer that never leaves half a file.

The scripts run as ``python benchmarks/<name>.py``, which puts this folder first on ``sys.path``:
they ``import common``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device | str = "cpu") -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously; a CPU has nothing to wait for)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds(call: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall seconds of one ``call``, the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - start


def median_seconds(
    calls: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    *,
    reps: int,
    budget_s: float = math.inf,
) -> dict[str, float]:
    """Median seconds of each call over ``reps`` turns, after one warm-up call each.

    The calls take turns, so that a burst of load from elsewhere on a shared machine hits all of them
    alike; fewer turns (at least one) when ``reps`` would take longer than ``budget_s``.
    """
    first = {name: seconds(call, device) for name, call in calls.items()}
    per_turn = sum(first.values())
    if per_turn * reps > budget_s:
        reps = max(1, int(budget_s / per_turn))
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            times[name].append(seconds(call, device))
    return {name: statistics.median(t) for name, t in times.items()}


def device_info(device: torch.device | str = "cpu") -> dict:
    """The hardware a benchmark ran on: the GPU's name, compute capability, multiprocessors and memory,
    or the processor and its cores."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"type": "cpu", "processor": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    props = torch.cuda.get_device_properties(device)
    return {
        "type": "cuda",
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_bytes": props.total_memory,
    }


def machine(device: torch.device | str = "cpu", *, modules: tuple = (torch,), threads: bool = False) -> str:
    """``device_info`` in one line for the JSON: the GPU's name, or the processor and its cores
    (``threads``: and torch's thread count), then the versions of ``modules``."""
    info = device_info(device)
    if info["type"] == "cuda":
        hardware = info["name"]
    else:
        hardware = f"{info['processor']}, {info['cores']} cores"
        if threads:
            hardware += f" ({torch.get_num_threads()} torch threads)"
    return ", ".join([hardware, *(f"{module.__name__} {module.__version__}" for module in modules)])


def output_and_grads(attention: Callable, q, k, v, grad_out, *, dtype: torch.dtype | None = None) -> list:
    """[out, dq, dk, dv] of ``attention(q, k, v)`` for the upstream gradient ``grad_out``, detached:
    what a gate compares.  The inputs enter as new contiguous leaves, in ``dtype`` (default: their own)."""
    q, k, v, grad_out = (t.detach().to(dtype or t.dtype).contiguous() for t in (q, k, v, grad_out))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v)
    return [t.detach() for t in (out, *torch.autograd.grad(out, (q, k, v), grad_out))]


def max_abs_errors(got: list, expected: list) -> list[float]:
    """The largest absolute difference of each pair of tensors (out, dq, dk, dv)."""
    return [(a - b).abs().max().item() for a, b in zip(got, expected)]


def write_json(path: Path, report, *, indent: int = 2) -> None:
    """``report`` as JSON at ``path``, replacing the file whole: a run killed mid-write leaves the last
    complete file, never half of one.  Values JSON has no type for (a Path, a dtype) are written as text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=indent, default=str) + "\n")
    os.replace(partial, path)
