"""The training loop: learning, exact resume (also after a save that was killed), NaN stops,
data-parallel training on two gloo processes, and the ``globalattn train`` command line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from globalattn.cli import main
from globalattn.harness import train as training
from globalattn.harness.config import ModelConfig, TrainConfig
from globalattn.harness.tasks import make_task
from globalattn.harness.train import NonFiniteLoss, train
from globalattn.harness.transformer import Transformer

TINY = TrainConfig(
    task="shakespeare",
    model=ModelConfig(context=32, attention="global", d_model=16, n_layer=1, n_head=2),
    steps=6,
    batch=4,
    lr=1e-2,
    eval_every=3,
    eval_examples=1,
)
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def tiny(**changes) -> TrainConfig:
    """TINY with ``changes``; a field of the model changes TINY's model."""
    model = {name: changes.pop(name) for name in list(changes) if name in MODEL_FIELDS}
    return dataclasses.replace(TINY, model=TINY.model.replace(**model), **changes)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    return load_file(out / "checkpoints" / latest["path"] / "model.safetensors")


def assert_same_run(a: dict, b: dict) -> None:
    """Two summaries of the same run: the same history (training time apart)."""
    strip = [{k: v for k, v in h.items() if k != "train_seconds"} for h in a["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "train_seconds"} for h in b["history"]]


@pytest.mark.parametrize(
    "task,attention",
    [
        ("shakespeare", "dense"),
        ("shakespeare", "global"),
        ("mqar", "sliding"),
        ("shakespeare", "global-window"),
        ("listops", "global-own"),
        ("passkey", "local"),
    ],
)
def test_loss_goes_down(task, attention):
    context = 128 if task == "passkey" else 64
    config = tiny(task=task, attention=attention, context=context, steps=30, batch=8, d_model=32, eval_every=15)
    history = train(config)["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.05, history
    assert all(0 <= h["metric"] for h in history)


def test_bf16_autocast_trains_close_to_fp32():
    config = tiny(steps=4, eval_every=4)
    fp32, bf16 = train(config), train(dataclasses.replace(config, precision="bf16"))
    assert bf16["final"]["val_loss"] == pytest.approx(fp32["final"]["val_loss"], rel=0.02)
    with pytest.raises(ValueError, match="precision must be one of"):
        dataclasses.replace(config, precision="fp8")


def test_resume_is_bitwise_exact(tmp_path, monkeypatch):
    straight = train(TINY, out=tmp_path / "straight")

    real_step = training._train_step

    def stop_after_four(wrapped, optimizer, task, config, step, *args):
        if step == 4:
            raise KeyboardInterrupt  # killed between checkpoints: steps 4 and 5 are lost
        return real_step(wrapped, optimizer, task, config, step, *args)

    monkeypatch.setattr(training, "_train_step", stop_after_four)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, out=tmp_path / "resumed")
    monkeypatch.setattr(training, "_train_step", real_step)
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "latest.json").read_text())["step"] == 3
    resumed = train(TINY, out=tmp_path / "resumed", resume=True)
    assert_same_run(straight, resumed)
    for name, tensor in final_weights(tmp_path / "straight").items():
        assert torch.equal(tensor, final_weights(tmp_path / "resumed")[name]), name


KILLED_MID_SAVE = """
import json, os, signal, sys
from pathlib import Path
import safetensors.torch
from globalattn.harness.config import ModelConfig, TrainConfig
from globalattn.harness.train import train

real_save = safetensors.torch.save_file

def save_then_die(tensors, path, *args, **kwargs):
    if "step-00000006" in str(path) and Path(path).name == "optimizer.safetensors":
        Path(path).write_bytes(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(tensors, path, *args, **kwargs)

safetensors.torch.save_file = save_then_die
config = json.loads(sys.argv[1])
train(TrainConfig(**{**config, "model": ModelConfig(**config["model"])}), out=sys.argv[2])
"""


def test_a_run_killed_mid_save_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL while the second checkpoint's optimizer file is half written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_SAVE, json.dumps(dataclasses.asdict(TINY)), str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-00000006.tmp" / "optimizer.safetensors").exists()
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert final_weights(tmp_path / "run")  # the named checkpoint is whole
    resumed = train(TINY, out=tmp_path / "run", resume=True)
    assert_same_run(train(TINY), resumed)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest.json", "step-00000006"]


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = training.loss_sum_of
    calls = {"n": 0}

    def nan_at_fifth_step(task, logits, batch):
        calls["n"] += 1
        loss = real_loss(task, logits, batch)
        return loss * float("nan") if logits.requires_grad and calls["n"] >= 6 else loss  # 6th call: step 5

    monkeypatch.setattr(training, "loss_sum_of", nan_at_fifth_step)
    with pytest.raises(NonFiniteLoss, match=r"step 5: the loss is nan.*last good checkpoint \(step 3\)"):
        train(TINY, out=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == 3


def test_resume_refuses_other_settings_and_out_refuses_overwrite(tmp_path):
    train(TINY, out=tmp_path / "run")
    with pytest.raises(ValueError, match="other settings .*lr"):
        train(tiny(lr=1e-3), out=tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match=r"other settings \(model.d_model\)"):
        train(tiny(d_model=32), out=tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(TINY, out=tmp_path / "run")


def test_resume_takes_a_field_added_since_the_checkpoint_as_its_default(tmp_path):
    """A checkpoint saved before ``pack`` and ``model.untied_head`` existed ran with their defaults."""
    train(TINY, out=tmp_path / "run")
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    state_file = tmp_path / "run" / "checkpoints" / latest["path"] / "state.json"
    state = json.loads(state_file.read_text())
    del state["summary"]["config"]["pack"], state["summary"]["config"]["model"]["untied_head"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"other settings \(model.untied_head\)"):  # set otherwise now
        train(tiny(untied_head=True), out=tmp_path / "run", resume=True)
    assert train(TINY, out=tmp_path / "run", resume=True)["step"] == TINY.steps


def tiny_mqar(**options) -> TrainConfig:
    return tiny(task="mqar", context=64, steps=2, eval_every=2, task_options=options)


def test_task_options_reach_the_task_and_the_records(tmp_path):
    pairs = int(torch.randint(1, 17, ()))  # context 64 holds at most 16 pairs
    vocab = int(torch.randint(2 * pairs + 2, 100, ()))
    config = tiny_mqar(vocab_size=vocab, num_pairs=pairs)
    assert list(config.task_options) == ["num_pairs", "vocab_size"]  # one order in every record
    assert config == tiny_mqar(num_pairs=pairs, vocab_size=vocab)
    summary = train(config, out=tmp_path / "run")
    assert summary["data"]["num_pairs"] == pairs and summary["data"]["vocab_size"] == vocab
    assert final_weights(tmp_path / "run")["transformer.embed.weight"].shape[0] == vocab  # the model was built for it
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    state = json.loads((tmp_path / "run" / "checkpoints" / latest["path"] / "state.json").read_text())
    for record in (json.loads((tmp_path / "run" / "metrics.json").read_text()), state["summary"]):
        assert record["config"]["task_options"] == {"num_pairs": pairs, "vocab_size": vocab}
        assert record["data"]["num_pairs"] == pairs

    other = tiny_mqar(vocab_size=vocab + 1, num_pairs=pairs)  # still valid for the task, but different
    with pytest.raises(ValueError, match=r"other settings \(task_options\)"):
        train(other, out=tmp_path / "run", resume=True)
    assert train(config, out=tmp_path / "run", resume=True)["step"] == 2  # the same options resume


@pytest.mark.parametrize(
    "task,options,message",
    [
        ("mqar", {"pairs": 4}, "task mqar has no option 'pairs': it takes num_pairs, vocab_size"),
        ("shakespeare", {"num_pairs": 4}, "task shakespeare has no option 'num_pairs': it takes none"),
        ("mqar", [("num_pairs", 4)], "task_options must be a dict"),
    ],
)
def test_config_refuses_options_the_task_does_not_take(task, options, message):
    with pytest.raises(ValueError, match=message):
        tiny(task=task, task_options=options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "sharding, attention",
    [
        ([], "global"),
        (["--fsdp"], "global"),
        (["--context-parallel", "2"], "global"),
        (["--context-parallel", "2"], "global-window"),
    ],
    ids=["ddp", "fsdp2", "context-parallel", "context-parallel-window"],
)
def test_two_gloo_processes_train_as_one(tmp_path, sharding, attention):
    """torchrun's environment by hand: two processes on 127.0.0.1, half of the same global batch each
    (rows, or with --context-parallel 2 the two halves of every sequence, exchanging halos of raw
    keys with global-window)."""
    args = (
        f"--task shakespeare --attention {attention} --context 32 --steps 4 --batch 4 --lr 1e-2 --d-model 16 "
        "--layers 1 --heads 2 --eval-every 2 --eval-examples 1 --no-progress --threads 1"
    ).split()
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "globalattn", "train", *args, *sharding, "--out", str(tmp_path / f"ddp{rank}")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the gloo processes did not finish in 120 s")
        assert proc.returncode == 0, output
    reference = train(tiny(steps=4, eval_every=2, attention=attention), out=tmp_path / "single")
    ddp = json.loads((tmp_path / "ddp0" / "metrics.json").read_text())
    assert ddp["world_size"] == 2 and not (tmp_path / "ddp1" / "metrics.json").exists()  # rank 0 writes
    assert len(ddp["history"]) == len(reference["history"]) == 2
    for a, b in zip(ddp["history"], reference["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    # Adam divides each gradient by its own running size, so where a gradient nearly cancels, the last-bit
    # difference of summing it in another order (the all-reduce) moves that weight by up to a small fraction
    # of lr (1e-2 here; 2.5e-6 seen on one CPU); a wrong shard or a missing reduction moves weights by ~lr.
    for name, tensor in final_weights(tmp_path / "single").items():
        torch.testing.assert_close(final_weights(tmp_path / "ddp0")[name], tensor, rtol=1e-5, atol=1e-4)


def test_cli_passes_task_options(tmp_path):
    pairs = int(torch.randint(1, 17, ()))
    argv = "train --task mqar --attention dense --context 64 --steps 1 --batch 2 --d-model 16 --heads 2 --no-progress"
    options = ["--task-option", f"num_pairs={pairs}", "--task-option", "vocab_size=40"]
    assert main([*argv.split(), *options, "--eval-examples", "1", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["task_options"] == {"num_pairs": pairs, "vocab_size": 40}
    assert (metrics["data"]["num_pairs"], metrics["data"]["vocab_size"]) == (pairs, 40)


def test_cli_trains_and_reports(tmp_path, capsys):
    argv = "train --task mqar --attention sliding --context 64 --steps 2 --batch 2 --d-model 16 --heads 2"
    code = main(
        [*argv.split(), "--eval-every", "2", "--eval-examples", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    )
    assert code == 0
    assert "mqar sliding T=64: step 2, validation accuracy" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("task,window", [("mqar", None), ("listops", 5)], ids=["causal-default", "bidir-w5"])
def test_cli_trains_global_window_and_records_its_window(tmp_path, task, window):
    argv = f"train --task {task} --attention global-window --context 64 --block-size 8 --steps 2 --batch 2"
    options = [] if window is None else ["--window", str(window)]
    out = tmp_path / "run"
    more = ["--d-model", "16", "--heads", "2", "--eval-examples", "1", "--no-progress", "--out", str(out)]
    assert main([*argv.split(), *options, *more]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"]["window"] == window
    assert metrics["window"] == (8 if window is None else window)  # the default: the block size


def test_packed_training_hands_the_model_each_batchs_document_ids(monkeypatch):
    seen = []
    real_forward = Transformer.forward

    def recording(self, tokens, document_ids=None):
        seen.append(document_ids)
        return real_forward(self, tokens, document_ids)

    monkeypatch.setattr(Transformer, "forward", recording)
    config = tiny(task="pystdlib", pack=True, steps=2, eval_every=2)
    summary = train(config)
    assert summary["config"]["pack"] is True and math.isfinite(summary["final"]["val_loss"])
    task = make_task("pystdlib", config.model.context, pack=True)
    expected = [task.batch("train", 0, 4), task.batch("train", 1, 4), task.batch("val", 0, 4)]  # 2 steps, 1 eval
    assert len(seen) == len(expected)
    for ids, batch in zip(seen, expected):
        assert torch.equal(ids, batch["document_ids"])


def test_cli_trains_packed_text_and_records_pack(tmp_path):
    argv = "train --task shakespeare --attention global --context 64 --steps 2 --batch 2 --d-model 16 --heads 2"
    more = ["--eval-examples", "1", "--no-progress"]
    for pack in (True, False):
        out = tmp_path / f"pack-{pack}"
        assert main([*argv.split(), *(["--pack"] if pack else []), *more, "--out", str(out)]) == 0
        assert json.loads((out / "metrics.json").read_text())["config"]["pack"] is pack


def test_only_the_variants_with_a_window_record_one():
    recorded = {name: "window" in train(tiny(attention=name, steps=1, eval_every=1)) for name in ("global", "sliding")}
    assert recorded == {"global": False, "sliding": True}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "mqar", "--attention", "global-own", "--context", "64"], "bidirectional only"),
        (["--task", "mqar", "--attention", "bogus", "--context", "64"], "attention must be one of"),
        (["--task", "nope", "--attention", "dense", "--context", "64"], "task must be one of"),
        (["--task", "mqar", "--attention", "dense", "--context", "0"], "context must be a positive int"),
        (["--task", "mqar", "--attention", "dense", "--context", "64", "--batch", "0"], "batch must be a positive int"),
        (["--task", "mqar", "--attention", "global", "--context", "64", "--context-parallel", "2"], "language-model"),
        (["--task", "shakespeare", "--attention", "global", "--context", "64", "--context-parallel", "2"], "torchrun"),
        (["--task", "shakespeare", "--attention", "global", "--context", "64", "--context-parallel", "0"], "positive"),
        (
            ["--task", "mqar", "--attention", "dense", "--context", "64", "--pack"],
            "--pack packs the documents of the language-model tasks (shakespeare, pystdlib), not mqar",
        ),
        (
            ["--task", "shakespeare", "--attention", "global", "--context", "64", "--pack", "--context-parallel", "2"],
            "--pack runs without --context-parallel",
        ),
        *(
            (["--task", "mqar", "--attention", "dense", "--context", "64", "--task-option", option], message)
            for option, message in [
                ("num_pairs", "--task-option takes KEY=VALUE with an integer VALUE (num_pairs=32), got 'num_pairs'"),
                ("=4", "got '=4'"),
                ("num_pairs=", "got 'num_pairs='"),
                ("num_pairs=four", "got 'num_pairs=four'"),
                ("num_pairs=1.5", "got 'num_pairs=1.5'"),
                ("num_pair=4", "task mqar has no option 'num_pair': it takes num_pairs, vocab_size"),
                ("num_pairs=0", "mqar option num_pairs must be a positive int, got 0"),
                ("num_pairs=17", "mqar needs an even context of at least 4 * num_pairs = 68, got 64"),
                ("vocab_size=8", "mqar needs vocab_size >= 2 * (num_pairs + 1) = 34, got 8"),
            ]
        ),
        (
            ["--task", "mqar", "--attention", "dense", "--context", "64"]
            + ["--task-option", "num_pairs=2", "--task-option", "num_pairs=3"],
            "--task-option num_pairs is given twice",
        ),
    ],
)
def test_cli_refuses_bad_input_in_one_line(args, message, capsys):
    assert main(["train", *args, "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("globalattn: error: ") and message in err and err.count("\n") == 1


def test_cli_reports_a_diverged_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "loss_sum_of", lambda task, logits, batch: logits.sum() * float("inf"))
    argv = "train --task mqar --attention dense --context 64 --steps 2 --batch 2 --d-model 16 --heads 2 --no-progress"
    code = main([*argv.split(), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("globalattn: error: step 1: the loss is") and "no checkpoint" in err


def _drop_a_tensor(path: Path) -> None:
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, path)


def _rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


CORRUPTIONS = {  # what is done to a finished run's checkpoint, and the file the refusal must name
    "model-tensor-missing": (lambda c: _drop_a_tensor(c / "model.safetensors"), "model.safetensors"),
    "optimizer-empty": (
        lambda c: save_file({}, c / "optimizer.safetensors"),
        "optimizer.safetensors",
    ),
    "model-truncated": (
        lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:100]),
        "model.safetensors",
    ),
    "model-missing": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors"),
    "state-corrupt": (lambda c: (c / "state.json").write_text("{not json"), "state.json"),
    "latest-negative-step": (
        lambda c: _rewrite_json(c.parent / "latest.json", lambda d: d.update(step=-1)),
        "latest.json",
    ),
    "latest-outside-the-run": (
        lambda c: _rewrite_json(c.parent / "latest.json", lambda d: d.update(path="../../elsewhere")),
        "latest.json",
    ),
    "latest-corrupt": (lambda c: (c.parent / "latest.json").write_text("[1, 2"), "latest.json"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_resume_refuses_a_damaged_checkpoint_in_one_line(tmp_path, corruption, capsys):
    argv = "train --task shakespeare --attention global --context 32 --steps 2 --batch 2 --d-model 16 --heads 2"
    argv = [*argv.split(), "--eval-examples", "1", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    damage, file_named = CORRUPTIONS[corruption]
    damage(tmp_path / "run" / "checkpoints" / latest["path"])
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("globalattn: error: cannot resume from ") and err.count("\n") == 1, err
    assert file_named in err


def test_dense_learns_mqar_past_the_plateau():
    """Issue 17: dense leaves MQAR's plateau at ~1/num_pairs.  When it does is a lottery at MQAR's default
    1e-3 (seeds 0, 1, 2 at 400 steps: 0.97, 0.91, 0.99 on an AMD EPYC, 0.26, 0.29, 0.27 on an Intel Xeon);
    at 5e-4 it is steady: seeds 0-6 on the Xeon at 0.31-0.61 at step 300, 0.94-0.99 at 500, 0.98-1.0 at
    600.  ~18 s, one thread."""
    config = TrainConfig(
        task="mqar",
        model=ModelConfig(context=64, attention="dense", d_model=64, n_layer=2, n_head=4),
        steps=600,
        batch=32,
        lr=5e-4,
        warmup=20,
        schedule="constant",  # the cosine's decay slows the late phase where recall is learned
        eval_every=300,
        eval_examples=64,
        task_options={"num_pairs": 4, "vocab_size": 32},
    )
    final = train(config)["final"]
    assert final["metric"] > 0.6, final  # chance among the 4 values a sequence holds: 0.25
    assert sum(final["queries_by_gap"].values()) == 64 * 4 and final["queries_by_block"]["earlier"] == 64 * 4


def test_the_cli_records_the_lr_and_schedule_used(tmp_path):
    argv = "train --task mqar --attention dense --context 64 --steps 2 --batch 2 --d-model 16 --heads 2 --no-progress"
    base = [*argv.split(), "--eval-examples", "1"]
    assert main([*base, "--schedule", "constant", "--warmup", "0", "--out", str(tmp_path / "default")]) == 0
    recorded = json.loads((tmp_path / "default" / "metrics.json").read_text())["config"]
    assert (recorded["lr"], recorded["schedule"], recorded["warmup"]) == (1e-3, "constant", 0)
    assert main([*base, "--lr", "5e-4", "--out", str(tmp_path / "given")]) == 0
    recorded = json.loads((tmp_path / "given" / "metrics.json").read_text())["config"]
    assert (recorded["lr"], recorded["schedule"], recorded["warmup"]) == (5e-4, "cosine", None)


def test_routing_runs_record_how_often_each_layer_routes_to_the_keys_block():
    # key_span 32: the pairs spread over blocks 0-3 of b = 8, the queries after them
    config = tiny(task="mqar", context=64, attention="global-top2", block_size=8, n_layer=2, steps=2, eval_every=2,
                  task_options={"num_pairs": 4, "key_span": 32})  # fmt: skip
    final = train(config)["final"]
    assert len(final["routed_to_key_block"]) == 2 and all(0 <= hit <= 1 for hit in final["routed_to_key_block"])
    assert 2 / 7 <= final["routing_chance"] <= 1 / 2  # 2 of the c = 4 .. 7 earlier blocks of a query
    assert "routed_to_key_block" not in train(dataclasses.replace(config, model=config.model.replace(
        attention="global")))["final"]  # fmt: skip


def test_evaluations_record_the_passkey_breakdown():
    history = train(tiny(task="passkey", context=128, steps=2, eval_every=1, eval_examples=4))["history"]
    assert len(history) == 2 and all(
        len(h["accuracy_by_digit"]) == 5 and len(h["accuracy_by_depth"]) == 5 for h in history
    )
    assert all(min(h["accuracy_by_digit"]) >= h["metric"] for h in history)  # a digit is right wherever all five are


def test_evaluate_reproduces_a_runs_final_evaluation_and_runs_its_weights_under_another_attention(tmp_path):
    config = tiny(task="mqar", context=64, attention="dense", block_size=8, n_layer=2, steps=4, eval_every=2,
                  task_options={"num_pairs": 4, "key_span": 32})  # fmt: skip
    final = train(config, out=tmp_path / "run")["final"]
    again = training.evaluate_run(tmp_path / "run")
    assert again["step"] == 4 and again["attention"] == "dense"
    assert again["metric"] == final["metric"] and again["val_loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    routed = training.evaluate_run(tmp_path / "run", attention="global-top2")
    assert routed["attention"] == "global-top2" and len(routed["routed_to_key_block"]) == 2
    assert routed["val_loss"] != final["val_loss"]  # the same weights, another attention


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "{tmp}/nothing"], "holds no checkpoint"),
        (["evaluate", "{run}", "--attention", "global-own"], "bidirectional only"),
        (["evaluate", "{run}", "--attention", "nonsense"], "attention"),
    ],
)
def test_cli_evaluate_refuses_bad_input_in_one_line(tmp_path, args, message, capsys):
    run = tmp_path / "run"
    train(tiny(steps=2, eval_every=2), out=run)
    capsys.readouterr()
    assert main([a.format(tmp=tmp_path, run=run) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("globalattn: error: ") and message in err and err.count("\n") == 1, err


def test_cli_evaluate_prints_the_evaluation_as_json(tmp_path, capsys):
    run = tmp_path / "run"
    final = train(tiny(steps=2, eval_every=2), out=run)["final"]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--attention", "local"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["attention"] == "local" and printed["step"] == 2 and printed["metric"] != final["metric"]
