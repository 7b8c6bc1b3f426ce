"""The comparison grid: n/a cells, tables, plots, presets, and continuing an interrupted grid."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from globalattn.cli import main
from globalattn.harness.attention import resolved_block_size
from globalattn.harness.compare import compare
from globalattn.harness.config import ATTENTIONS, TASK_LR, top_blocks_of
from globalattn.harness.presets import PRESETS, ROUTING_ATTENTIONS, Preset
from globalattn.harness.report import results_markdown
from globalattn.harness.tasks import IGNORE, make_task

TINY = Preset(
    tasks=("mqar", "listops"),
    contexts=(64,),
    attentions=("dense", "global-own"),
    seeds=(0,),
    steps=2,
    tokens_per_step=128,
    model=dict(d_model=16, n_layer=1, n_head=2),
    eval_every=1,
    eval_examples=1,
)


def test_grid_runs_tabulates_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    logged = []
    report = compare(TINY, tmp_path, progress=False, log=logged.append)
    cells = {(r["task"], r["attention"]): r for r in report["runs"]}
    assert cells[("mqar", "global-own")]["status"] == "n/a" and cells[("listops", "global-own")]["status"] == "ok"
    assert len(cells[("listops", "dense")]["history"]) == 2 and cells[("listops", "dense")]["config"]["batch"] == 2
    table = (tmp_path / "results.md").read_text()
    assert "| mqar | accuracy | 64 |" in table and "n/a" in table
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["task"] == "mqar"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "final-by-context.png",
        "listops-by-step.png",
        "listops-by-time.png",
        "mqar-by-step.png",
        "mqar-by-time.png",
    ]
    assert len(logged) == 3  # three runs; the n/a cell trains nothing

    again = compare(TINY, tmp_path, progress=False, log=logged.append)  # finished runs are kept, not retrained
    assert [r.get("history") for r in again["runs"]] == [r.get("history") for r in report["runs"]]


def run(task, attention, metric, context=256, seed=0):
    history = [{"step": 1, "train_seconds": 1.0, "metric": metric}]
    return {
        "task": task,
        "context": context,
        "attention": attention,
        "seed": seed,
        "status": "ok",
        "final": history[0],
        "history": history,
        "keys_per_token": 16.0,
        "train_seconds": 2.0,
    }


def test_table_marks_the_best_of_each_row_by_the_metric_direction():
    results = [
        run("shakespeare", "dense", 2.5),
        run("shakespeare", "global", 2.4),
        run("mqar", "dense", 0.9),
        run("mqar", "global", 0.2),
        run("mqar", "global", 0.4, seed=1),
        {"task": "mqar", "context": 256, "attention": "global-own", "seed": 0, "status": "n/a"},
        {"task": "mqar", "context": 256, "attention": "local", "seed": 0, "status": "failed", "error": "Boom: x"},
    ]
    table = results_markdown(results)
    assert "| shakespeare | bpc | 256 | 2.500 | **2.400** |  |" in table  # lower bpc is better
    assert "| mqar | accuracy | 256 | **0.900** | 0.300 ± 0.141 | n/a | failed |" in table
    assert "- mqar T=256 local seed 0: Boom: x" in table


def test_a_run_that_fails_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    import globalattn.harness.compare as comparing

    real_train = comparing.train

    def broken_global_own(config, **kwargs):
        if config.model.attention == "global-own":
            raise RuntimeError("kernel exploded")
        return real_train(config, **kwargs)

    monkeypatch.setattr(comparing, "train", broken_global_own)
    report = compare(TINY, tmp_path, progress=False, log=lambda line: None)
    assert [r["status"] for r in report["runs"]] == ["ok", "n/a", "ok", "failed"]
    assert "RuntimeError: kernel exploded" in (tmp_path / "results.md").read_text()


def test_presets_compare_every_attention_on_a_bidirectional_task():
    for preset in (PRESETS["cpu-small"], PRESETS["gpu"]):
        measured = [r for r in preset.runs() if not isinstance(r, tuple)]
        assert {r.model.attention for r in measured} >= set(ATTENTIONS)
        assert {r.model.attention for r in measured if r.task == "listops"} >= set(ATTENTIONS)  # global-own measured
        assert "global-top2" in {r.model.attention for r in measured if r.task == "mqar"}
        assert len({r.batch * r.model.context for r in measured if r.task == "shakespeare"}) == 1  # tokens per step
    assert max(PRESETS["cpu-small"].contexts) <= 1024


def test_top_blocks_preset_routes_against_dense_and_global_on_text():
    runs = PRESETS["cpu-top-blocks"].runs()
    assert [r.model.attention for r in runs if r.seed == 0] == [
        "dense",
        "global",
        "global-top1",
        "global-top2",
        "global-top4",
        "global-window",
        "local",
        "sliding",
    ]
    cells = {(r.task, r.model.context, r.batch, r.steps, r.model.d_model) for r in runs}
    assert cells == {("shakespeare", 256, 16, 1000, 64)}
    assert len(runs) == 16  # two seeds: the differences are small


def test_text_preset_trains_every_context_on_the_same_tokens_at_three_seeds():
    runs = PRESETS["cpu-text"].runs()
    assert {r.model.attention for r in runs} >= {"dense", "global", "global-window", "local", "sliding"}
    assert {r.model.context for r in runs} == {512, 1024} and {r.seed for r in runs} == {0, 1, 2}
    assert len({r.batch * r.model.context for r in runs}) == 1 and len({r.steps for r in runs}) == 1
    assert {r.lr for r in runs} == {TASK_LR["shakespeare"]}  # the text recipe: the task's own rate


def test_per_task_options_reach_each_run_of_their_task(tmp_path):
    pairs = int(torch.randint(1, 9, ()))  # context 64 holds up to 16
    options = {"num_pairs": pairs, "vocab_size": 2 * pairs + 2}
    preset = dataclasses.replace(TINY, attentions=("dense",), per_task={"mqar": dict(task_options=options)})
    assert [(r.task, r.task_options) for r in preset.runs()] == [("mqar", options), ("listops", {})]
    assert preset.narrowed(tasks=["mqar"], steps=1).runs()[0].task_options == options
    compare(preset, tmp_path, progress=False, log=lambda line: None)
    mqar = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert mqar["config"]["task_options"] == options and mqar["data"]["num_pairs"] == pairs


def test_options_for_a_task_that_does_not_take_them_are_refused_with_the_grid():
    preset = dataclasses.replace(TINY, task_options={"num_pairs": 4})  # for every task: listops takes none
    with pytest.raises(ValueError, match="task listops has no option 'num_pairs': it takes none"):
        preset.runs()


def test_gpu_recall_preset_spreads_the_pairs_over_more_blocks_than_any_route():
    runs = PRESETS["gpu-recall"].runs()
    assert [r.model.attention for r in runs if r.seed == 0] == list(ROUTING_ATTENTIONS)  # causal: no global-own
    assert len(runs) == 16 and {r.seed for r in runs} == {0, 1}
    assert {(r.task, r.model.context, r.batch * r.model.context) for r in runs} == {("mqar", 512, 32768)}
    assert all(r.steps >= 1000 for r in runs)  # MQAR takes thousands of steps, where it is learned at all
    assert all(r.lr == 1e-3 and r.schedule == "constant" for r in runs)  # the recipe of docs/training.md
    config = runs[0]
    assert all(r.task_options == config.task_options and r.model.block_size == config.model.block_size for r in runs)
    task = make_task("mqar", 512, seed=int(torch.randint(1000, ())), **config.task_options)
    batch = task.batch("val", 0, 4)
    blocks_holding_a_queried_pair = set()
    for tokens, targets in zip(batch["tokens"].tolist(), batch["targets"].tolist()):
        for key in (tokens[i] for i, t in enumerate(targets) if t != IGNORE):
            blocks_holding_a_queried_pair.add(tokens.index(key) // config.model.block_size)
    assert len(blocks_holding_a_queried_pair) >= 8
    assert len(blocks_holding_a_queried_pair) > max(top_blocks_of(r.model.attention) for r in runs)


def test_narrowing_a_preset_narrows_each_task_too():
    narrowed = PRESETS["cpu-small"].narrowed(
        tasks=["mqar"], contexts=[256], attentions=["dense", "global-top2"], steps=3
    )
    runs = narrowed.runs()
    assert [(r.task, r.model.context, r.model.attention, r.steps) for r in runs] == [
        ("mqar", 256, "dense", 3),
        ("mqar", 256, "global-top2", 3),
    ]


def test_cli_compare_narrows_the_preset(tmp_path, monkeypatch):
    import globalattn.harness.compare as comparing

    seen = {}
    monkeypatch.setattr(
        comparing, "compare", lambda preset, out, **kw: seen.update(preset=preset) or {"runs": [], "wall_seconds": 0.0}
    )
    argv = [
        "compare",
        "--preset",
        "cpu-small",
        "--tasks",
        "mqar",
        "--contexts",
        "256",
        "--attentions",
        "dense",
        "--steps",
        "3",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    assert seen["preset"] == PRESETS["cpu-small"].narrowed(
        tasks=["mqar"], contexts=[256], attentions=["dense"], steps=3
    )


def test_tables_break_mqar_and_passkey_down_by_group():
    gaps = {"[0, T/4)": 0.9, "[T/4, T/2)": None, "[T/2, 3T/4)": 0.2, "[3T/4, T)": 0.1}
    dense, local = run("mqar", "dense", 0.8), run("mqar", "local", 0.3)
    dense["final"] = {**dense["final"], "accuracy_by_gap": gaps}
    local["final"] = {**local["final"], "accuracy_by_gap": {**gaps, "[0, T/4)": 0.95, "[T/2, 3T/4)": 0.0}}
    passkey = run("passkey", "dense", 0.0)
    passkey["final"] = {**passkey["final"], "accuracy_by_digit": [1.0, 0.1, 0.1, 0.1, 0.0]}
    table = results_markdown([dense, local, passkey])
    assert "| mqar | 256 | [0, T/4) | 0.900 | **0.950** |" in table
    assert "| mqar | 256 | [T/4, T/2) |  |  |" in table  # no queries there: blank, not a number
    assert "| mqar | 256 | [T/2, 3T/4) | **0.200** | 0.000 |" in table
    assert "| passkey | 256 | 1 | **1.000** |" in table and "| passkey | 256 | 5 | **0.000** |" in table
    assert "## MQAR accuracy by where the key sits" not in table  # no run holds accuracy_by_block


def test_runs_side_by_side_in_processes_give_the_same_results(tmp_path):
    threads = torch.get_num_threads()
    try:  # the same single intra-op thread in this process as in the workers: the same sums
        one = compare(TINY, tmp_path / "one", threads=1, progress=False, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    logged = []
    two = compare(TINY, tmp_path / "two", jobs=2, threads=1, progress=False, log=logged.append)

    def outcomes(report):
        return [
            (r["task"], r["attention"], r["status"], [h["metric"] for h in r.get("history", [])])
            for r in report["runs"]
        ]

    assert outcomes(two) == outcomes(one) and len(outcomes(one)[0][3]) == 2
    assert len(logged) == 3 and (tmp_path / "two" / "results.md").exists()
    assert torch.get_num_threads() == threads  # the workers' thread count stayed in the workers


def test_the_equal_time_table_takes_each_run_at_the_fastest_attentions_time():
    def timed(attention, seconds_and_metrics, seed=0):
        result = run("mqar", attention, seconds_and_metrics[-1][1], seed=seed)
        result["history"] = [
            {"step": i, "train_seconds": t, "metric": m} for i, (t, m) in enumerate(seconds_and_metrics)
        ]
        result["train_seconds"] = seconds_and_metrics[-1][0]
        return result

    results = [
        timed("global", [(10.0, 0.2), (20.0, 0.4)]),
        timed("global", [(11.0, 0.3), (22.0, 0.5)], seed=1),  # the fastest attention's slowest seed: 22 s
        timed("dense", [(15.0, 0.6), (30.0, 0.9), (45.0, 1.0)]),
        timed("dense", [(16.0, 0.7), (32.0, 0.8), (48.0, 1.0)], seed=1),
        timed("local", [(30.0, 0.1)]),  # no evaluation within 22 s: blank
    ]
    table = results_markdown(results)
    section = table.split("## Validation metric at equal training time")[1].split("##")[0]
    assert "| mqar | accuracy | 256 | 0.450 ± 0.071 | **0.650 ± 0.071** |  |" in section
    assert "| mqar | accuracy | 256 | 0.450 ± 0.071 | **1.000 ± 0.000** | 0.100 |" in table  # the final metrics


def test_cpu_recall_preset_spreads_the_pairs_over_more_blocks_than_any_route():
    preset = PRESETS["cpu-recall"]
    runs = preset.runs()
    assert {r.model.attention for r in runs} == set(ROUTING_ATTENTIONS) and {r.seed for r in runs} == {0, 1, 2}
    assert {(r.task, r.model.context) for r in runs} == {
        ("mqar", 128),
        ("mqar", 256),
        ("passkey", 256),
        ("passkey", 512),
    }
    assert all(r.lr == 1e-3 and r.schedule == "constant" for r in runs)  # the recall tasks' recipe
    assert {r.batch for r in runs if (r.task, r.model.context) == ("mqar", 128)} == {64}  # 192k sequences in 3000 steps
    max_route = max(top_blocks_of(r.model.attention) for r in runs)
    for config in (r for r in runs if r.task == "mqar" and r.model.attention == "global" and r.seed == 0):
        model = config.model.for_task(make_task("mqar", config.model.context))
        block = resolved_block_size(model)
        task = make_task("mqar", config.model.context, seed=int(torch.randint(1000, ())), **config.task_options)
        batch = task.batch("val", 0, 32)
        blocks_of_keys = set()
        for tokens, targets in zip(batch["tokens"].tolist(), batch["targets"].tolist()):
            blocks_of_keys |= {tokens.index(tokens[i]) // block for i, t in enumerate(targets) if t != IGNORE}
        assert len(blocks_of_keys) > max_route, (config.model.context, block, blocks_of_keys)
