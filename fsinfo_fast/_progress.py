"""Progress bars of the subcommands (tqdm): live on a terminal, sparse in a log.

Where stderr is not a terminal (a log file, CI), every redraw is a carriage-return line in the
file; the bars then redraw at most every :data:`LOG_INTERVAL` seconds and a status text never
forces a redraw of its own.
"""

from __future__ import annotations

import sys
from typing import Any

from ._extras import require

__all__ = ["LOG_INTERVAL", "progress_bar", "set_status"]

#: seconds between redraws where stderr is not a terminal
LOG_INTERVAL = 30.0


def progress_bar(feature: str, **kw: Any):
    """A tqdm bar on stderr for ``feature`` (the extra's message names it if tqdm is missing)."""
    require("tqdm", feature)
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", tty)
    if not tty:
        kw.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(**kw)


def set_status(bar: Any, text: str) -> None:
    """Show ``text`` after the bar: at once on a terminal, with the next redraw in a log."""
    bar.set_postfix_str(text, refresh=sys.stderr.isatty())
