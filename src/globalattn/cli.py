"""The ``globalattn`` command (also ``python -m globalattn``).

    globalattn demo                       # the seed sentence, step by step, with pictures
    globalattn demo --help

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
    try:
        return args.run(args)
    except ValueError as refused:  # the demo and the library refuse bad input with a one-line reason
        print(f"{PROG}: error: {refused}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Global-token attention for PyTorch.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(commands)
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
