"""Train every attention variant on the same tasks, contexts, seeds and budgets; tabulate and plot.

    globalattn compare --preset cpu-small --out runs/cpu-small
    globalattn compare --preset cpu-top-blocks --out runs/top-blocks
    globalattn compare --preset gpu --device cuda --out runs/gpu
    globalattn compare --preset gpu-recall --device cuda --out runs/gpu-recall
    globalattn compare --preset cpu-small --tasks mqar --contexts 256 --attentions dense global

The presets (presets.py) and what each costs: docs/training.md.  Writes into ``--out``:
``runs/<task>-<context>-<attention>-s<seed>/`` (each run's metrics.json and checkpoint: an
interrupted comparison continues where it stopped when started again), ``results.json`` (every
run's summary), ``results.md`` (the tables) and ``plots/`` (report.py).  ``global-own`` is
bidirectional only: on causal tasks its cells read n/a.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from globalattn.harness.config import TrainConfig
from globalattn.harness.presets import Preset
from globalattn.harness.report import plot_results, results_markdown
from globalattn.harness.train import NonFiniteLoss, train


def compare(preset: Preset, out: str | Path, *, device: str = "cpu", progress: bool = True, log=print) -> dict:
    """Run ``preset``'s grid into ``out`` and write results.json, results.md and plots/."""
    out = Path(out)
    grid = preset.runs()
    results, started = [], time.perf_counter()
    for i, run in enumerate(grid, 1):
        if not isinstance(run, TrainConfig):
            task, context, attention, seed = run
            results.append({"task": task, "context": context, "attention": attention, "seed": seed, "status": "n/a"})
            continue
        name = f"{run.task}-{run.model.context}-{run.model.attention}-s{run.seed}"
        elapsed, done = time.perf_counter() - started, sum(r["status"] != "n/a" for r in results)
        eta = f", about {elapsed / done * (len(grid) - i + 1) / 60:.0f} min to go" if done else ""
        log(f"[{i}/{len(grid)}] {name}  ({elapsed / 60:.1f} min so far{eta})")
        cell = {"task": run.task, "context": run.model.context, "attention": run.model.attention, "seed": run.seed}
        try:
            results.append(
                {
                    **cell,
                    "status": "ok",
                    **train(run, out=out / "runs" / name, resume=True, device=device, progress=progress),
                }
            )
        except NonFiniteLoss as stop:
            results.append({**cell, "status": "diverged", "error": str(stop)})
            log(f"  diverged: {stop}")
        except Exception as error:  # one variant that cannot run is recorded as such; the grid goes on
            results.append({**cell, "status": "failed", "error": f"{type(error).__name__}: {error}"})
            log(f"  failed: {type(error).__name__}: {error}")
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
