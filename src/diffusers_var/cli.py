"""The ``diffusers-var`` command: ``diffusers-var convert ...`` and ``diffusers-var generate ...``."""

from __future__ import annotations

import argparse

from . import convert, generate


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
    generate_parser = commands.add_parser(
        "generate",
        help="sample class-conditional images from a VARPipeline",
        description=generate.__doc__.split("\n\n")[0],
    )
    generate.add_arguments(generate_parser)
    generate_parser.set_defaults(run=generate.generate)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as error:  # bad input, missing files: a message, not a traceback
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
