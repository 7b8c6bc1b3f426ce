"""The run's configuration: the model nested in the run, what each refuses, and the task filling in
the data's fields."""

from __future__ import annotations

import dataclasses

import pytest

from globalattn.harness.config import TASK_LR, ModelConfig, TrainConfig
from globalattn.harness.tasks import TASKS, make_task


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(attention="global-own"), "bidirectional only"),
        (dict(attention="global-top0"), "attention must be one of"),
        (dict(attention="bogus"), "attention must be one of"),
        (dict(d_model=30, n_head=4), "even integer"),
        (dict(block_size=0), "block_size must be a positive int, got 0"),
        (dict(block_size=2.5), "block_size must be a positive int, got 2.5"),
        (dict(window=65), "window must be between 1 and the context 64, got 65"),
        (dict(n_layer=0), "n_layer must be a positive int, got 0"),
        (dict(vocab_size=2.5), "vocab_size must be a positive int, got 2.5"),
        (dict(causal="yes"), "causal must be True or False, got 'yes'"),
        (dict(dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
    ],
)
def test_bad_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"context": 64, "attention": "dense", "vocab_size": 20, "causal": True, **changes})


def test_the_task_fills_in_the_models_data_fields():
    model = ModelConfig(context=64, attention="global-own")  # bidirectional only: the task decides
    listops = make_task("listops", 64)
    assert model.for_task(listops) == dataclasses.replace(
        model, vocab_size=listops.vocab_size, causal=False, num_classes=10
    )
    with pytest.raises(ValueError, match="bidirectional only"):
        model.for_task(make_task("mqar", 64))
    mqar = make_task("mqar", 64, vocab_size=40)
    assert ModelConfig(context=64, attention="dense").for_task(mqar).vocab_size == 40


@pytest.mark.parametrize(
    "model,message",
    [
        (
            ModelConfig(context=64, attention="dense", vocab_size=300),
            "leaves vocab_size, causal, num_classes to the task",
        ),
        (ModelConfig(context=64, attention="dense", causal=True), r"to the task, got \{'causal': True\}"),
        (dict(context=64, attention="dense"), "model must be a ModelConfig, got dict"),
    ],
)
def test_a_runs_model_leaves_the_data_to_the_task(model, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(task="mqar", model=model)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(steps=0), "steps must be a positive int, got 0"),
        (dict(batch=True), "batch must be a positive int, got True"),
        (dict(lr=float("inf")), "lr must be a positive number, got inf"),
        (dict(precision="fp8"), "precision must be one of 'fp32', 'bf16'; got 'fp8'"),
        (dict(context_parallel=0), "context_parallel must be a positive int, got 0"),
        (dict(pack="yes"), "pack must be True or False, got 'yes'"),
        (dict(pack=True), r"language-model tasks \(shakespeare, pystdlib\), not mqar"),
        (dict(task="shakespeare", pack=True, context_parallel=2), "--pack runs without --context-parallel"),
    ],
)
def test_bad_run_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"task": "mqar", "model": ModelConfig(context=64, attention="dense"), **changes})


def test_packing_is_off_by_default_and_on_for_the_language_model_tasks():
    model = ModelConfig(context=64, attention="dense")
    assert TrainConfig(task="shakespeare", model=model).pack is False
    assert TrainConfig(task="pystdlib", model=model, pack=True).pack is True


def test_the_schedule_warms_up_then_decays_to_a_tenth_or_stays():
    model = ModelConfig(context=64, attention="dense")
    cosine = TrainConfig(task="mqar", model=model, steps=100, lr=1e-3, warmup=10)
    assert [cosine.lr_at(s) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])  # linear warm-up
    assert cosine.lr_at(10) == pytest.approx(1e-3)  # the peak, where the decay starts
    assert cosine.lr_at(55) == pytest.approx(0.55e-3)  # half way: halfway between lr and lr / 10
    assert cosine.lr_at(100) == pytest.approx(1e-4)  # lr / 10 at the end
    constant = dataclasses.replace(cosine, schedule="constant")
    assert [constant.lr_at(s) for s in (0, 9, 10, 55, 99)] == pytest.approx([1e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    default = TrainConfig(task="mqar", model=model, steps=200, lr=1e-3)  # warm-up: steps // 10 = 20
    assert (default.schedule, default.lr_at(9), default.lr_at(19)) == ("cosine", pytest.approx(5e-4), 1e-3)
    assert dataclasses.replace(constant, warmup=0).lr_at(0) == 1e-3


@pytest.mark.parametrize("task,lr", [("mqar", 1e-3), ("passkey", 1e-3), ("shakespeare", 3e-3), ("listops", 3e-3)])
def test_lr_defaults_to_the_tasks_and_a_given_one_wins(task, lr):
    model = ModelConfig(context=64, attention="dense")
    assert TrainConfig(task=task, model=model).lr == lr  # resolved when built: what the records hold
    assert TrainConfig(task=task, model=model, lr=2e-3).lr == 2e-3


def test_every_task_has_a_default_lr():
    assert set(TASK_LR) == set(TASKS)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(warmup=-1), "warmup must be a non-negative int, got -1"),
        (dict(schedule="linear"), "schedule must be one of 'cosine', 'constant'; got 'linear'"),
    ],
)
def test_bad_schedules_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(task="mqar", model=ModelConfig(context=64, attention="dense"), **changes)
