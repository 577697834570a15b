"""The ``cggr`` command: ``cggr demo [flags]`` and ``cggr bench quality [flags]``.

Each subcommand is one ``_add_<name>`` function below that declares its flags
and sets ``func``, the callable run with the parsed arguments. Both commands
live in :mod:`cggr_lab`, the harness beside the library; this file is the
only place in ``cggr`` that imports it, and only when a parser is built or a
command runs. Before a command runs, the harness's packages (the ``demo``
extra) are checked, so a missing one reads as the ``pip install`` that brings
it, not as a traceback after minutes of training.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def _lab_command(module: str, function: str):
    """A ``func`` that checks the harness's packages, then runs ``cggr_lab.<module>.<function>(args)``."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        import cggr_lab

        missing = cggr_lab.missing_requirements()
        if missing:
            raise RuntimeError(f"this command needs {', '.join(missing)}: install the {cggr_lab.EXTRA!r} extra, "
                               f'pip install ".[{cggr_lab.EXTRA}]" from the cggr source tree')
        try:
            getattr(importlib.import_module(f"cggr_lab.{module}"), function)(args)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] in ("cggr", "cggr_lab"):
                raise  # a bug in cggr itself, not a missing package: the traceback says where
            raise RuntimeError(f"this command needs the module {e.name!r}, which is not installed "
                               f'(the {cggr_lab.EXTRA!r} extra brings the usual ones: pip install '
                               f'".[{cggr_lab.EXTRA}]" from the cggr source tree)') from e
        return 0

    return run


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from cggr_lab.demo import add_demo_arguments

    p = sub.add_parser("demo", help="train a small Llama dense, with cggr's default (random) routing and with "
                                         "difficulty routing; plot val loss",
                       description="Train a small Llama-style model three ways (dense, cggr's default random "
                                   "routing, routing by difficulty as the seed did) from identical weights on identical batches; print "
                                   "step times and validation losses, save a plot and a JSON of the curves.")
    add_demo_arguments(p)
    p.set_defaults(func=_lab_command("demo", "run_demo"))


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from cggr_lab.quality import add_quality_arguments

    bench = sub.add_parser("bench", help="benchmarks (quality: validation loss of routed vs dense training)")
    kinds = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    q = kinds.add_parser("quality", help="train dense and routed arms from identical weights and data; compare "
                                         "validation loss at equal steps or equal wall-clock",
                         description="Train Llama-style models dense and with cggr routing policies from identical "
                                     "weights on identical batches, in the pretrain / continued / finetune regimes; "
                                     "write curves (JSON), plots (PNG) and a table.")
    add_quality_arguments(q)
    q.set_defaults(func=_lab_command("quality", "run_quality"))
    # The speed benchmark is `python -m benchmarks.speed` from a checkout (it needs a GPU): see the README.


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
