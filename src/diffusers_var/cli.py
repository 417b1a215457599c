"""The ``diffusers-var`` command: ``diffusers-var convert|generate|evaluate|search|index ...``.

Every error a user can cause (bad input, missing or damaged files, no GPU) ends the command with one line on
stderr and a non-zero exit status, never a traceback. ``DIFFUSERS_VAR_TRACEBACK=1`` shows the traceback of an
error that was not expected (a bug worth reporting).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from . import convert, evaluate, generate
from .retrieval import command as index
from .search import command as search

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


def _commands() -> dict[str, tuple[object, Callable[[argparse.Namespace], object], str]]:
    """Each command: its module (``add_arguments`` and the docstring), the function that runs it, its help line."""
    return {
        "convert": (convert, convert.run, "official VAR checkpoints → a VARPipeline folder"),
        "generate": (generate, generate.generate, "sample class-conditional images from a VARPipeline"),
        "evaluate": (
            evaluate,
            evaluate.evaluate,
            "FID, Inception Score, KID and precision/recall of samples against a reference",
        ),
        "search": (search, search.search, "sample with inference-time search and a verifier, under a budget"),
        "index": (index, index.run, "a retrieval datastore of real images: embeddings, a FAISS index, token maps"),
    }


def _description(module) -> str:
    return module.__doc__.split("\n\n")[0].replace("``", "")


def command_main(name: str, argv: list[str] | None = None) -> None:
    """``python -m diffusers_var.<name> ...``: the same as ``diffusers-var <name> ...``."""
    module, run, _ = _commands()[name]
    parser = ArgumentParser(prog=f"diffusers-var {name}", description=_description(module))
    module.add_arguments(parser)
    run_command(parser, run, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="diffusers-var", description="VAR for diffusers and transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, run, help_line) in _commands().items():
        command_parser = commands.add_parser(name, help=help_line, description=_description(module))
        module.add_arguments(command_parser)
        command_parser.set_defaults(run=run)
    args = parser.parse_args(argv)
    run_command(parser, args.run, args)


if __name__ == "__main__":
    main()
