"""Train every attention variant on the same tasks, contexts, seeds and budgets; tabulate and plot.

    globalattn compare --preset cpu-small --out runs/cpu-small     # < 30 min on 2 CPU cores
    globalattn compare --preset cpu-top-blocks --out runs/top-blocks  # ~37 min on 1 CPU core
    globalattn compare --preset gpu --device cuda --out runs/gpu    # < 10 min on one H100
    globalattn compare --preset gpu-recall --device cuda --out runs/gpu-recall  # ~10 min on one H100, by estimate
    globalattn compare --preset cpu-small --tasks mqar --contexts 256 --attentions dense global

Writes into ``--out``: ``runs/<task>-<context>-<attention>-s<seed>/`` (each run's metrics.json and
checkpoint: an interrupted comparison continues where it stopped when started again),
``results.json`` (every run's summary), ``results.md`` (the tables) and ``plots/`` (validation
metric against step and against training time for each task and context, and the final metric
against context length).  ``global-own`` is bidirectional only: on causal tasks its cells read n/a.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from globalattn.tasks import TASKS
from globalattn.train import NonFiniteLoss, TrainConfig, train

ATTENTIONS = ("dense", "global", "global-own", "local", "sliding")
# Routing to the top blocks against dense, plain global and the cheap baselines (causal tasks: no global-own)
ROUTING_ATTENTIONS = ("dense", "global", "global-top1", "global-top2", "global-top4", "local", "sliding")


@dataclass(frozen=True)
class Preset:
    tasks: tuple[str, ...]
    contexts: tuple[int, ...]
    attentions: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    tokens_per_step: int  # batch = tokens_per_step // context: every context sees the same tokens
    options: dict = dataclasses.field(default_factory=dict)  # more TrainConfig fields: the model, precision
    lr: float = 3e-3
    eval_every: int = 50
    eval_examples: int = 64
    per_task: dict[str, dict] = dataclasses.field(default_factory=dict)  # task -> fields that differ for it
    # the task's own options (TrainConfig.task_options); each task takes its own, so give them in per_task
    task_options: dict[str, int] = dataclasses.field(default_factory=dict)

    def for_task(self, task: str) -> Preset:
        return dataclasses.replace(self, **self.per_task.get(task, {}), per_task={})

    def narrowed(self, *, tasks=None, contexts=None, attentions=None, seeds=None, steps=None) -> Preset:
        """The same grid restricted to the given tasks, contexts and attentions (each task's own
        lists included), with other seeds or steps when given."""

        def keep(values, chosen):
            return tuple(v for v in values if chosen is None or v in chosen)

        def narrow(fields: dict) -> dict:
            fields = dict(fields)
            for name, chosen in (("contexts", contexts), ("attentions", attentions)):
                if name in fields:
                    fields[name] = keep(fields[name], chosen)
            return {**fields, **({"seeds": tuple(seeds)} if seeds else {}), **({"steps": steps} if steps else {})}

        narrowed = dataclasses.replace(
            self,
            tasks=keep(self.tasks, tasks),
            contexts=keep(self.contexts, contexts),
            attentions=keep(self.attentions, attentions),
            per_task={task: narrow(fields) for task, fields in self.per_task.items()},
        )
        return dataclasses.replace(narrowed, **narrow({}))

    def runs(self) -> list[TrainConfig | tuple[str, int, str, int]]:
        """Every run of the grid, in order: a TrainConfig, or (task, context, attention, seed) for
        a cell that cannot exist (global-own on a causal task)."""
        grid = []
        for task in self.tasks:
            plan = self.for_task(task)
            for context in plan.contexts:
                for attention in plan.attentions:
                    for seed in plan.seeds:
                        if attention == "global-own" and TASKS[task].causal:
                            grid.append((task, context, attention, seed))
                            continue
                        grid.append(
                            TrainConfig(
                                task=task,
                                attention=attention,
                                context=context,
                                seed=seed,
                                steps=plan.steps,
                                batch=max(1, plan.tokens_per_step // context),
                                lr=plan.lr,
                                eval_every=plan.eval_every,
                                eval_examples=plan.eval_examples,
                                task_options=plan.task_options,
                                **plan.options,
                            )
                        )
        return grid


PRESETS = {
    # Measured: docs/results.md.  Every run trains 200 steps of 4096 tokens (batch 16, 8, 4).
    "cpu-small": Preset(
        tasks=("shakespeare", "mqar", "listops"),
        contexts=(256, 512, 1024),
        attentions=ATTENTIONS,
        seeds=(0,),
        steps=200,
        tokens_per_step=4096,
        options=dict(d_model=64, n_layer=2, n_head=4),
        eval_every=25,
        eval_examples=64,
        per_task={
            "shakespeare": dict(seeds=(0, 1)),  # its differences are small: two seeds show the noise
            "mqar": dict(attentions=(*ATTENTIONS, "global-top2")),
            "listops": dict(eval_every=50, eval_examples=256),  # accuracy over 64 examples is too coarse
        },
    ),
    # Measured: docs/results.md.  Routing to the top blocks (SPEC's top_blocks) against dense, plain
    # global and the cheap baselines on character-level text, 1000 steps of 4096 tokens; ~37 min on
    # one CPU core.
    "cpu-top-blocks": Preset(
        tasks=("shakespeare",),
        contexts=(256,),
        attentions=ROUTING_ATTENTIONS,
        seeds=(0, 1),
        steps=1000,
        tokens_per_step=4096,
        options=dict(d_model=64, n_layer=2, n_head=4),
        eval_every=100,
        eval_examples=64,
    ),
    # Sized for one H100 in 10 minutes by estimate; not yet measured.
    "gpu": Preset(
        tasks=("shakespeare", "mqar", "listops"),
        contexts=(2048, 8192),
        attentions=ATTENTIONS,
        seeds=(0,),
        steps=250,
        tokens_per_step=32768,
        options=dict(d_model=256, n_layer=4, n_head=4, precision="bf16"),
        lr=2e-3,
        eval_every=50,
        eval_examples=64,
        per_task={
            "mqar": dict(attentions=(*ATTENTIONS, "global-top2")),
            "listops": dict(eval_examples=256),
        },
    ),
    # Recall through the routing (issue 7): MQAR at T = 512 with 128 pairs, so that the pairs fill 8
    # of the 16 blocks of b = 32 and no k <= 4 covers them all without choosing by content.  b = 32
    # (not a smaller b with fewer pairs) because the blocked backend that runs global-top{k} on CUDA
    # loops over chunks of one block each at this batch, a few hundred kernels per chunk: its step
    # costs ~ 5-10x dense's at b = 32, twice that at b = 16, four times at b = 8.  Sized by
    # estimate, not measured: one H100 in about 10 minutes (9-14), from per-step aten op counts on
    # the CPU (dense ~650, global-top{k} ~18,000) at 4-6 us per kernel launch.  2000 steps assume
    # that dense learns here with 8192 scored queries per step (the CPU pilots had 128-1024 and
    # never learned): pilot dense first, --attentions dense --seeds 0 (docs/training.md).
    "gpu-recall": Preset(
        tasks=("mqar",),
        contexts=(512,),
        attentions=ROUTING_ATTENTIONS,
        seeds=(0, 1),
        steps=2000,
        tokens_per_step=32768,  # batch 64
        options=dict(d_model=128, n_layer=2, n_head=4, block_size=32),
        lr=3e-3,
        eval_every=250,
        eval_examples=128,
        per_task={"mqar": dict(task_options=dict(num_pairs=128, vocab_size=512))},  # vocab >= 2 * (pairs + 1)
    ),
}


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
        name = f"{run.task}-{run.context}-{run.attention}-s{run.seed}"
        elapsed, done = time.perf_counter() - started, sum(r["status"] != "n/a" for r in results)
        eta = f", about {elapsed / done * (len(grid) - i + 1) / 60:.0f} min to go" if done else ""
        log(f"[{i}/{len(grid)}] {name}  ({elapsed / 60:.1f} min so far{eta})")
        cell = {"task": run.task, "context": run.context, "attention": run.attention, "seed": run.seed}
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


# ---------------------------------------------------------------------------------------------
# The tables


def results_markdown(results: list[dict]) -> str:
    """Three tables in one layout (a row per task and context, a column per attention): the final
    validation metric (mean over seeds, ± their standard deviation when several; best in bold),
    the training time, and the attended keys per token."""
    tables = [
        (
            "Final validation metric",
            "bpc: bits per character, lower is better; accuracy: higher is better. Best of each row in bold.",
            lambda r: r["final"]["metric"],
            "{:.3f}",
            True,
        ),
        (
            "Training time (s)",
            "Seconds of training steps, evaluation excluded.",
            lambda r: r["train_seconds"],
            "{:.0f}",
            False,
        ),
        (
            "Attended keys per token",
            "Mean over the sequence's queries of the raw and global tokens each attends to.",
            lambda r: r["keys_per_token"],
            "{:.1f}",
            False,
        ),
    ]
    lines = []
    for title, note, value, fmt, is_metric in tables:
        lines += [f"## {title}", "", note, "", *_grid_table(results, value, fmt, is_metric), ""]
    stopped = [r for r in results if r["status"] in ("failed", "diverged")]
    if stopped:
        lines += ["## Runs without a result", ""]
        lines += [f"- {r['task']} T={r['context']} {r['attention']} seed {r['seed']}: {r['error']}" for r in stopped]
        lines.append("")
    return "\n".join(lines)


def _grid_table(results: list[dict], value, fmt: str, is_metric: bool) -> list[str]:
    """A row per task and context, a column per attention; the metric's cells show the seeds'
    standard deviation and the best of the row in bold."""
    attentions = list(dict.fromkeys(r["attention"] for r in results))
    lines = ["| task | metric | context | " + " | ".join(attentions) + " |", "|---|---|---|" + "---|" * len(attentions)]
    for task in dict.fromkeys(r["task"] for r in results):
        metric = TASKS[task].metric
        for context in sorted({r["context"] for r in results if r["task"] == task}):
            cells = {a: _cell(results, task, context, a, value) for a in attentions}
            means = [c[0] for c in cells.values() if isinstance(c, tuple)]
            best = (max if metric == "accuracy" else min)(means) if means and is_metric else None
            row = [_format_cell(cells[a], best, fmt, is_metric) for a in attentions]
            lines.append(f"| {task} | {metric} | {context} | " + " | ".join(row) + " |")
    return lines


def _cell(results, task, context, attention, value=lambda r: r["final"]["metric"]):
    """(mean, standard deviation or None) of ``value`` over seeds; or the status of a cell without a
    number ("n/a", "failed", "diverged"); or None when the grid has no such run."""
    runs = [r for r in results if (r["task"], r["context"], r["attention"]) == (task, context, attention)]
    if not runs:
        return None
    failed = [r["status"] for r in runs if r["status"] != "ok"]
    if failed:
        return failed[0]
    values = [value(r) for r in runs]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def _format_cell(cell, best, fmt: str, with_spread: bool) -> str:
    if cell is None or isinstance(cell, str):
        return cell or ""
    mean, spread = cell
    text = fmt.format(mean) + (" ± " + fmt.format(spread) if spread is not None and with_spread else "")
    return f"**{text}**" if best is not None and math.isclose(mean, best) else text


# ---------------------------------------------------------------------------------------------
# The plots


def plot_results(results: list[dict], folder: Path) -> list[Path]:
    """Per task: validation metric against step and against training time (one panel per
    context), and final metric against context; one line per attention (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    runs = [r for r in results if r["status"] == "ok"]
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    attentions = list(dict.fromkeys(r["attention"] for r in runs))
    colours = {a: f"C{i}" for i, a in enumerate(attentions)}
    written = []
    for task in tasks:
        metric = TASKS[task].metric
        contexts = sorted({r["context"] for r in runs if r["task"] == task})
        for x_key, x_label, suffix in (("step", "step", "step"), ("train_seconds", "training time (s)", "time")):
            fig, axes = plt.subplots(1, len(contexts), figsize=(4.5 * len(contexts), 3.6), squeeze=False)
            for ax, context in zip(axes[0], contexts):
                for attention in attentions:
                    first = [r for r in runs if (r["task"], r["context"], r["attention"]) == (task, context, attention)]
                    if first:
                        history = first[0]["history"]
                        ax.plot(
                            [h[x_key] for h in history],
                            [h["metric"] for h in history],
                            marker=".",
                            color=colours[attention],
                            label=attention,
                        )
                ax.set(title=f"{task}, context {context}", xlabel=x_label, ylabel=f"validation {metric}")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            fig.tight_layout()
            written.append(folder / f"{task}-by-{suffix}.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for attention in attentions:
            points = sorted(
                (context, cell[0])
                for context in {r["context"] for r in runs if r["task"] == task}
                if isinstance(cell := _cell(results, task, context, attention), tuple)
            )
            if points:
                ax.plot(*zip(*points), marker="o", color=colours[attention], label=attention)
        contexts = sorted({r["context"] for r in runs if r["task"] == task})
        ax.set(title=task, xlabel="context", ylabel=f"final validation {TASKS[task].metric}", xscale="log")
        ax.set_xticks(contexts, [str(c) for c in contexts], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(folder / "final-by-context.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
