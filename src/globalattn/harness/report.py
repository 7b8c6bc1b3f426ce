"""The report of a comparison (compare.py): markdown tables and plots of the runs' summaries.

Each result is a run's summary (train.py) with its cell: task, context, attention, seed and
status ("ok", or "n/a", "failed", "diverged" without a number).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from globalattn.harness.tasks import TASKS

# The accuracies by kind (Task.breakdown) that get a table: the key in the final evaluation, title, note
BREAKDOWNS = (
    (
        "accuracy_by_gap",
        "MQAR accuracy by the query's gap to its key",
        "Quarters of the context T; queries_by_gap in results.json counts the queries of each (an empty "
        "quarter is blank).",
    ),
    (
        "accuracy_by_block",
        "MQAR accuracy by where the key sits",
        "In the query's own block or an earlier one, at the run's block size (also for the variants without "
        "blocks); queries_by_block counts them.",
    ),
    (
        "routed_to_key_block",
        "MQAR: queries routed to their key's block, by layer (global-top{k})",
        "Of the (query, head) pairs whose key sits in an earlier block, the fraction whose k routed blocks "
        "include the key's, in 16 validation sequences; k blocks drawn at random would reach routing_chance "
        "(results.json).",
    ),
    (
        "accuracy_by_digit",
        "Passkey accuracy by digit",
        "Each of the five digits of the answer, first to last; the metric above is exact match (all five).",
    ),
)


def results_markdown(results: list[dict]) -> str:
    """Three tables in one layout (a row per task and context, a column per attention): the final
    validation metric (mean over seeds, ± their standard deviation when several; best in bold),
    the training time, and the attended keys per token; then a table per breakdown (BREAKDOWNS) that
    some run's final evaluation holds, a row per task, context and group."""
    tables = [
        (
            "Final validation metric",
            "bpc: bits per character, lower is better; accuracy: higher is better. Best of each row in bold.",
            lambda r: r["final"]["metric"],
            "{:.3f}",
            True,
        ),
        (
            "Validation metric at equal training time",
            "Each run's last evaluation within the training time of the row's fastest attention (its slowest "
            "seed; the time table below); blank: no evaluation that early.",
            _at_equal_time(results),
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
    for key, title, note in BREAKDOWNS:
        if table := _breakdown_table(results, key):
            lines += [f"## {title}", "", note + " Best of each row in bold.", "", *table, ""]
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


def _at_equal_time(results: list[dict]):
    """The value of a run for the equal-time table: its validation metric at its last evaluation
    within its row's budget, the training time of the fastest attention of that task and context
    (of its slowest seed, so that the fastest attention's final evaluations all count)."""
    seconds = {}
    for r in results:
        if r["status"] == "ok":
            seconds.setdefault((r["task"], r["context"], r["attention"]), []).append(r["train_seconds"])
    budgets = {}
    for (task, context, _), times in seconds.items():
        budgets[task, context] = min(budgets.get((task, context), max(times)), max(times))

    def value(run: dict) -> float | None:
        budget = budgets[run["task"], run["context"]]
        within = [h["metric"] for h in run["history"] if h["train_seconds"] <= budget]
        return within[-1] if within else None

    return value


def _breakdown_table(results: list[dict], key: str) -> list[str]:
    """A row per task, context and group of breakdown ``key`` (a dict of group -> accuracy, or a
    list: groups 1, 2, ...), a column per attention; no lines when no run's final evaluation holds it."""
    runs = [r for r in results if r["status"] == "ok" and r["final"] and key in r["final"]]
    if not runs:
        return []
    attentions = list(dict.fromkeys(r["attention"] for r in runs))
    lines = ["| task | context | group | " + " | ".join(attentions) + " |", "|---|---|---|" + "---|" * len(attentions)]
    for task in dict.fromkeys(r["task"] for r in runs):
        for context in sorted({r["context"] for r in runs if r["task"] == task}):
            first = next(r["final"][key] for r in runs if (r["task"], r["context"]) == (task, context))
            labels = list(first) if isinstance(first, dict) else list(range(1, len(first) + 1))
            for at, label in enumerate(labels):
                value = _group(key, at)
                counted = [r for r in runs if value(r) is not None]  # None: the group was empty
                cells = {a: _cell(counted, task, context, a, value) for a in attentions}
                means = [c[0] for c in cells.values() if c is not None]
                best = max(means) if means else None
                row = [_format_cell(cells[a], best, "{:.3f}", True) for a in attentions]
                lines.append(f"| {task} | {context} | {label} | " + " | ".join(row) + " |")
    return lines


def _group(key: str, at: int):
    """A run's value of group number ``at`` of breakdown ``key`` in its final evaluation."""

    def value(run: dict) -> float:
        breakdown = run["final"][key]
        return list(breakdown.values())[at] if isinstance(breakdown, dict) else breakdown[at]

    return value


def _cell(results, task, context, attention, value=lambda r: r["final"]["metric"]):
    """(mean, standard deviation or None) of ``value`` over seeds; or the status of a cell without a
    number ("n/a", "failed", "diverged"); or None when the grid has no such run."""
    runs = [r for r in results if (r["task"], r["context"], r["attention"]) == (task, context, attention)]
    if not runs:
        return None
    failed = [r["status"] for r in runs if r["status"] != "ok"]
    if failed:
        return failed[0]
    values = [v for v in map(value, runs) if v is not None]  # None: no value for this run
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def _format_cell(cell, best, fmt: str, with_spread: bool) -> str:
    if cell is None or isinstance(cell, str):
        return cell or ""
    mean, spread = cell
    text = fmt.format(mean) + (" ± " + fmt.format(spread) if spread is not None and with_spread else "")
    return f"**{text}**" if best is not None and math.isclose(mean, best) else text


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
