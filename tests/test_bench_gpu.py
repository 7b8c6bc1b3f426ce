"""benchmarks/gpu.py: its whole pipeline at tiny sizes on the CPU (--smoke), its refusal without a GPU,
its plan, and the issue's targets read off rows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _load():
    """The script as a module.  Its folder goes on sys.path while it loads, as when it runs as a script
    (it imports ``common``, the benchmarks' shared helpers)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        module_spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def _run(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_smoke_runs_the_pipeline_and_writes_json(tmp_path):
    out = tmp_path / "smoke.json"
    done = _run("--smoke", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["complete"] and report["stopped"] is None
    assert report["config"]["smoke"] and report["versions"]["torch"]
    assert report["matmul"]["tflops"] > 0
    gate = {(g["backend"], g["mode"], g["dtype"]): g["status"] for g in report["gate"]}
    assert gate == {("torch", m, d): "passed" for m in ("bidir", "causal") for d in ("float32", "bfloat16")}

    rows = report["rows"]
    torch_rows = [r for r in rows if r["contender"] == "torch"]
    # 2 sequence lengths x 2 block sizes (32, and 64 ~ sqrt(S)) x 2 modes x 3 passes
    assert len(torch_rows) == 24
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0 and r["samples_ms"] for r in torch_rows)
    assert {r["block_size"] for r in torch_rows} == {32, 64}
    dense = [r for r in rows if r["contender"] == "sdpa-math"]
    assert len(dense) == 12 and all(r["block_size"] is None and r["status"] == "ok" for r in dense)
    cudnn = [r for r in rows if r["contender"] == "sdpa-cudnn"]  # raises on a CPU: recorded, the run goes on
    assert cudnn and all(r["status"] == "skipped" and r["reason"] for r in cudnn)
    # a causal row counts fewer useful FLOPs than its bidirectional twin
    forward = [r for r in torch_rows if r["block_size"] == 32 and r["pass"] == "fwd"]
    flops = {(r["seq"], r["mode"]): r["useful_flops"] for r in forward}
    assert flops[(512, "causal")] < flops[(512, "bidir")]

    targets = report["targets"]
    assert all(p["speedup"] is None for p in targets["triton_over_flex"]["points"])  # triton is not run here
    assert targets["forward_matmul_fraction"]["fraction"] is None
    lines = done.stdout.rstrip().splitlines()
    assert lines[-1] == f"wrote {out}"
    assert any(line.startswith("targets (same card, same run)") for line in lines[-12:])


def test_window_rows_run_our_backends_with_the_window(tmp_path):
    out = tmp_path / "window.json"
    done = _run("--smoke", "--window", "8", "--seq", "512", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert all(g["status"] == "passed" for g in report["gate"])  # the gate ran with the window too
    rows = [r for r in report["rows"] if r["contender"] == "torch" and r["pass"] == "fwd"]
    assert rows and all(r["window"] == 8 and r["status"] == "ok" for r in rows)
    for r in rows:  # 8 raw keys (causal) or 15 (bidirectional) per query, cut at the ends, plus the global tokens
        pos = torch.arange(r["seq"])
        offset = pos[:, None] - pos[None]
        raw = ((offset >= 0) & (offset < 8)) if r["mode"] == "causal" else offset.abs() < 8
        blocks = -(-r["seq"] // r["block_size"]) if r["mode"] == "causal" else r["seq"] // r["block_size"]
        globals_seen = r["seq"] * blocks if r["mode"] == "bidir" else sum(
            min(p // r["block_size"], blocks) for p in range(r["seq"])
        )  # fmt: skip
        heads = report["config"]["batch"] * report["config"]["heads"]
        assert r["useful_flops"] == 4.0 * report["config"]["head_dim"] * heads * (int(raw.sum()) + globals_seen)


def test_without_cuda_it_refuses_in_one_line(tmp_path):
    done = _run("--out", str(tmp_path), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("benchmarks/gpu.py: error: no CUDA device")
    assert not list(tmp_path.iterdir())


def test_plan_puts_the_targets_grid_first():
    gpu = _load()
    args = gpu._parse([])
    points = gpu.plan(args)
    assert points[:4] == [(131072, 128), (65536, 128), (16384, 128), (4096, 128)]
    assert points[4:] == [(4096, 64), (65536, 256), (131072, 384)]  # ~sqrt(S); 16k's is 128 already
    long = gpu.plan(gpu._parse(["--long", "--all-blocks"]))
    assert long[4:10] == [(262144, 128), (262144, 512), (524288, 128), (524288, 704), (1048576, 128), (1048576, 1024)]
    assert len(long) == len(set(long))


def test_targets_are_read_off_the_rows():
    gpu = _load()
    config = {"seqs": [16384, 131072], "target_block": 128, "contenders": list(gpu.CONTENDERS)}
    rows = []
    for seq in config["seqs"]:
        for mode in gpu.MODES:
            for which in ("fwd", "fwd+bwd"):
                common = {"seq": seq, "mode": mode, "pass": which, "status": "ok"}
                rows.append({**common, "block_size": 128, "contender": "triton", "ms": 1.0, "tflops": 500.0})
                rows.append({**common, "block_size": 128, "contender": "flex", "ms": 2.0 if seq == 16384 else 1.2})
                rows[-2]["extra_peak_bytes"] = 100
                rows.append({**common, "block_size": None, "contender": "sdpa-cudnn", "extra_peak_bytes": 150})
    report = {"config": config, "rows": rows, "matmul": {"tflops": 800.0}}
    result = gpu.targets(report)
    speedups = {(p["seq"], p["mode"], p["pass"]): p for p in result["triton_over_flex"]["points"]}
    assert speedups[(16384, "causal", "fwd+bwd")]["speedup"] == 2.0 and speedups[(16384, "bidir", "fwd")]["meets"]
    assert speedups[(131072, "bidir", "fwd")]["speedup"] == 1.2 and not speedups[(131072, "bidir", "fwd")]["meets"]
    fraction = result["forward_matmul_fraction"]
    assert fraction["seq"] == 131072 and fraction["fraction"] == 500 / 800 and fraction["meets"]
    memory = result["peak_memory_vs_dense"]["points"]
    assert all(p["ratio"] == 100 / 150 and p["meets"] for p in memory)

    rows[0] |= {"status": "skipped", "reason": "ValueError: no kernel"}
    first = gpu.targets(report)["triton_over_flex"]["points"][0]
    assert first["speedup"] is None and first["reason"] == "triton: ValueError: no kernel"


def test_the_gpu_check_script_selects_a_representative_test_subset():
    """scripts/gpu_check.sh runs the GPU tests its -k expression selects: collected here (nothing runs), the
    subset must cover what issue 18 lists, and stay small enough for its time limit."""
    root = SCRIPT.parents[1]
    script = (root / "scripts" / "gpu_check.sh").read_text()
    subset = script.split("subset='", 1)[1].split("'", 1)[0]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
         "tests/test_triton.py", "tests/test_backends.py", "-k", subset],
        capture_output=True, text=True, cwd=root, timeout=120,
    )  # fmt: skip
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert 40 <= len(ids) <= 150, (len(ids), done.stdout[-2000:])
    for wanted in ("triton-bf16", "triton-f16", "flex-bf16", "causal", "bidir", "mask_random", "Hkv1", "-w", "D59",
                   "L100-S300", "test_realistic_size_on_gpu", "test_more_batch_heads"):  # fmt: skip
        assert any(wanted in i for i in ids), wanted
    assert any("gradients" in i for i in ids) and any("forward" in i for i in ids)
