"""Command line: ``python -m bart_prefix_patch doctor``."""

from __future__ import annotations

import argparse
import sys

from ._doctor import doctor


def main(argv=None) -> int:
    """Entry point of ``python -m bart_prefix_patch``."""
    parser = argparse.ArgumentParser(prog="python -m bart_prefix_patch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="versions, fork, fingerprints and a few-second self-check")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return doctor()
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
