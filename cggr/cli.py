"""The ``cggr`` command: ``cggr demo [flags]`` and ``cggr bench quality [flags]``.

Each subcommand is one ``_add_<name>`` function below that declares its flags
and sets ``func``, the callable run with the parsed arguments. Heavy imports
(torch, transformers) happen inside the subcommand, so ``cggr --help`` is fast.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .demo import add_demo_arguments

    p = sub.add_parser("demo", help="train a small Llama dense, with cggr's default (random) routing and with "
                                         "difficulty routing; plot val loss",
                       description="Train a small Llama-style model three ways (dense, cggr's default random "
                                   "routing, the seed's difficulty routing) from identical weights on identical batches; print "
                                   "step times and validation losses, save a plot and a JSON of the curves.")
    add_demo_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from .demo import run_demo

        run_demo(args)
        return 0

    p.set_defaults(func=run)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .quality import add_quality_arguments

    bench = sub.add_parser("bench", help="benchmarks (quality: validation loss of routed vs dense training)")
    kinds = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    q = kinds.add_parser("quality", help="train dense and routed arms from identical weights and data; compare "
                                         "validation loss at equal steps or equal wall-clock",
                         description="Train Llama-style models dense and with cggr routing policies from identical "
                                     "weights on identical batches, in the pretrain / continued / finetune regimes; "
                                     "write curves (JSON), plots (PNG) and a table.")
    add_quality_arguments(q)

    def run(args: argparse.Namespace) -> int:
        from .quality import run_quality

        run_quality(args)
        return 0

    q.set_defaults(func=run)
    # The speed benchmark is benchmarks/speed.py (it needs a GPU): see the README.


SUBCOMMANDS = (_add_demo, _add_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cggr", description="cggr: token-routed gradient depth for transformer "
                                                              "training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cggr`` console script and of ``python -m cggr``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "cggr " + shlex.join(sys.argv[1:] if argv is None else argv)  # recorded in results
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        # Configuration mistakes read as one line, not a traceback.
        command = " ".join(c for c in (args.command, getattr(args, "benchmark", None)) if c)
        print(f"cggr {command}: error: {e}", file=sys.stderr)
        return 1
