"""Command line: ``python -m bart_prefix_patch {doctor,demo,train,generate}``."""

from __future__ import annotations

import argparse
import sys

from ._doctor import doctor


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): the same shape as every other CLI error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None) -> int:
    """Entry point of ``python -m bart_prefix_patch``."""
    from ._cli import CLIError, add_commands, run

    parser = _Parser(prog="python -m bart_prefix_patch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="versions, fork, fingerprints and a few-second self-check")
    add_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return doctor()
    try:
        return run(args)
    except CLIError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
