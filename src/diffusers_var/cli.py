"""The ``diffusers-var`` command: ``diffusers-var convert ...``."""

from __future__ import annotations

import argparse

from . import convert


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="diffusers-var", description="VAR for diffusers and transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert_parser = commands.add_parser(
        "convert",
        help="official VAR checkpoints → a VARPipeline folder",
        description=convert.__doc__.split("\n\n")[0],
    )
    convert.add_arguments(convert_parser)
    convert_parser.set_defaults(run=convert.run)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
