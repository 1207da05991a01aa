"""``python -m fsinfo_fast.bench``: the same as ``fsinfo-fast bench``."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import FSInfoError
from . import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` like ``fsinfo-fast bench`` and run it (user errors: one line, status 2)."""
    parser = argparse.ArgumentParser(
        prog="python -m fsinfo_fast.bench",
        description="benchmark every way to compute the metrics, side by side",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(run(args) or 0)
    except (FSInfoError, FileNotFoundError, PermissionError, IsADirectoryError) as err:
        if args.debug:
            raise
        print(f"fsinfo-fast bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("fsinfo-fast bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
