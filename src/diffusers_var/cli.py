"""The ``diffusers-var`` command: ``diffusers-var convert|generate|evaluate ...``.

Every error a user can cause (bad input, missing or damaged files, no GPU) ends the command with one line on
stderr and a non-zero exit status, never a traceback. ``DIFFUSERS_VAR_TRACEBACK=1`` shows the traceback of an
error that was not expected (a bug worth reporting).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from . import convert, evaluate, generate

# errors that describe the user's input or environment (a RuntimeError: out of memory, a CUDA failure); anything
# else, a TypeError included, is a bug and said to be unexpected
_EXPECTED_ERRORS = (ValueError, OSError, RuntimeError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors on one line (``prog: error: message (see --help)``) instead of usage plus message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(error: BaseException) -> str:
    """The error's message on a single line."""
    return " ".join(str(error).split()) or type(error).__name__


def run_command(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], object], args) -> None:
    """Run a command; turn any exception into ``error: <one line>`` on stderr and a non-zero exit.

    Exit status 2 for bad input (ValueError, as argparse uses for bad flags), 1 for other failures, 130 when
    interrupted.
    """
    try:
        run(args)
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")
    except Exception as error:
        if os.environ.get("DIFFUSERS_VAR_TRACEBACK"):
            raise
        status = 2 if isinstance(error, ValueError) else 1
        message = one_line(error)
        if not isinstance(error, _EXPECTED_ERRORS):
            message = f"unexpected {type(error).__name__}: {message} (DIFFUSERS_VAR_TRACEBACK=1 shows where)"
        parser.exit(status, f"error: {message}\n")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="diffusers-var", description="VAR for diffusers and transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert_parser = commands.add_parser(
        "convert",
        help="official VAR checkpoints → a VARPipeline folder",
        description=convert.__doc__.split("\n\n")[0].replace("``", ""),
    )
    convert.add_arguments(convert_parser)
    convert_parser.set_defaults(run=convert.run)
    generate_parser = commands.add_parser(
        "generate",
        help="sample class-conditional images from a VARPipeline",
        description=generate.__doc__.split("\n\n")[0].replace("``", ""),
    )
    generate.add_arguments(generate_parser)
    generate_parser.set_defaults(run=generate.generate)
    evaluate_parser = commands.add_parser(
        "evaluate",
        help="FID, Inception Score, KID and precision/recall of samples against a reference",
        description=evaluate.__doc__.split("\n\n")[0].replace("``", ""),
    )
    evaluate.add_arguments(evaluate_parser)
    evaluate_parser.set_defaults(run=evaluate.evaluate)
    args = parser.parse_args(argv)
    run_command(parser, args.run, args)


if __name__ == "__main__":
    main()
