"""Train every attention variant on the same tasks, contexts, seeds and budgets; tabulate and plot.

    globalattn compare --preset cpu-small --out runs/cpu-small
    globalattn compare --preset cpu-top-blocks --out runs/top-blocks
    globalattn compare --preset gpu --device cuda --out runs/gpu
    globalattn compare --preset gpu-recall --device cuda --out runs/gpu-recall
    globalattn compare --preset cpu-small --tasks mqar --contexts 256 --attentions dense global
    globalattn compare --preset cpu-recall --jobs 2 --out runs/cpu-recall   # two runs at a time

The presets (presets.py) and what each costs: docs/training.md.  Writes into ``--out``:
``runs/<task>-<context>-<attention>-s<seed>/`` (each run's metrics.json and checkpoint: an
interrupted comparison continues where it stopped when started again), ``results.json`` (every
run's summary), ``results.md`` (the tables) and ``plots/`` (report.py).  ``global-own`` is
bidirectional only: on causal tasks its cells read n/a.  ``jobs`` > 1 trains that many runs at a
time, each in a process of its own with ``threads`` intra-op threads: on a CPU, runs of one thread
side by side use the cores better than one run of several threads (its small matmuls scale poorly).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from globalattn.harness.config import TrainConfig
from globalattn.harness.presets import Preset
from globalattn.harness.report import plot_results, results_markdown
from globalattn.harness.train import NonFiniteLoss, train


def compare(
    preset: Preset,
    out: str | Path,
    *,
    device: str = "cpu",
    jobs: int = 1,
    threads: int | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Run ``preset``'s grid into ``out`` (``jobs`` runs at a time) and write results.json,
    results.md and plots/."""
    out = Path(out)
    grid = preset.runs()
    started = time.perf_counter()
    results = [{**_cell_of(run), "status": "n/a"} for run in grid]  # replaced for every trained run
    trained = [i for i, run in enumerate(grid) if isinstance(run, TrainConfig)]

    def record(i: int, outcome: dict, done: int) -> None:
        results[i] = {**results[i], **outcome}
        minutes = (time.perf_counter() - started) / 60  # no forecast: runs kept from before take no time
        shown = f"{outcome['final']['metric']:.3f}" if outcome.get("final") else outcome["status"]
        log(f"[{done}/{len(trained)}] {_name(grid[i])}: {shown}  ({minutes:.1f} min so far)")
        if "error" in outcome:
            log(f"  {outcome['status']}: {outcome['error']}")

    def arguments(i: int) -> tuple:
        return grid[i], out / "runs" / _name(grid[i]), device, threads, progress and jobs == 1

    if jobs == 1:
        for done, i in enumerate(trained, 1):
            record(i, _train_one(*arguments(i)), done)
    else:  # spawned, not forked: a forked child would inherit this process's torch thread pools
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_one, *arguments(i)): i for i in trained}
            for done, future in enumerate(as_completed(futures), 1):
                record(futures[future], future.result(), done)
    report = {
        "preset": dataclasses.asdict(preset),
        "device": device,
        "runs": results,
        "wall_seconds": time.perf_counter() - started,
    }
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every process trains; one writes
        return report
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(results_markdown(results))
    try:
        plot_results(results, out / "plots")
    except ImportError as missing:
        log(f"plots not drawn: {missing.name} is not installed (pip install matplotlib)")
    return report


def _cell_of(run) -> dict:
    if isinstance(run, TrainConfig):
        return {"task": run.task, "context": run.model.context, "attention": run.model.attention, "seed": run.seed}
    task, context, attention, seed = run
    return {"task": task, "context": context, "attention": attention, "seed": seed}


def _name(run: TrainConfig) -> str:
    return f"{run.task}-{run.model.context}-{run.model.attention}-s{run.seed}"


def _train_one(run: TrainConfig, out: Path, device: str, threads: int | None, progress: bool) -> dict:
    """One run's outcome: its summary with status "ok", or "diverged" / "failed" and the error (one
    variant that cannot run is recorded as such, and the grid goes on)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        return {"status": "ok", **train(run, out=out, resume=True, device=device, progress=progress)}
    except NonFiniteLoss as stop:
        return {"status": "diverged", "error": str(stop)}
    except Exception as error:
        return {"status": "failed", "error": f"{type(error).__name__}: {error}"}
