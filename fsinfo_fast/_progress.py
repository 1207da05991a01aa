"""Progress bars of the subcommands (tqdm): live on a terminal, sparse in a log.

Where stderr is not a terminal (a log file, CI), every redraw is a carriage-return line in the
file; the bars then redraw at most every :data:`LOG_INTERVAL` seconds and a status text never
forces a redraw of its own.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from ._extras import require

__all__ = ["LOG_INTERVAL", "meter", "part", "progress_bar", "set_status", "tick"]

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


#: the bar the products of the running call count on (:func:`meter`), or None
_METER: ContextVar[Any] = ContextVar("fsinfo_fast_meter", default=None)


@contextlib.contextmanager
def meter(enabled: bool, desc: str, total: int | None = None) -> Iterator[None]:
    """Within: the Jacobian products the library computes count (:func:`tick`) on a bar named
    ``desc`` where ``enabled`` (``ff.linearize(..., progress=True)``); nothing otherwise.
    ``total``: the products expected (None: not known ahead, an adaptive probe count).

    A bar already running (an outer call's) keeps counting; a part with a ``total`` shows its
    ``desc`` and counts towards ``total`` more products on it while it runs (:func:`part`)."""
    if not enabled or _METER.get() is not None:
        with part(desc, total):
            yield
        return
    bar = progress_bar("progress=True", desc=desc, total=total, unit=" product", leave=False)
    token = _METER.set(bar)
    try:
        yield
    finally:
        _METER.reset(token)
        bar.close()


@contextlib.contextmanager
def part(desc: str, total: int | None) -> Iterator[None]:
    """Within: the running bar (if any) names ``desc`` and expects ``total`` more products (a
    loop whose count is known: the exact routes' one-hot products); its name and total come
    back after. Nothing where no bar runs or ``total`` is None."""
    bar = _METER.get()
    if bar is None or total is None:
        yield
        return
    before = (bar.total, bar.desc)
    bar.total = bar.n + int(total)
    bar.set_description_str(desc, refresh=False)
    try:
        yield
    finally:
        bar.total = before[0]
        bar.set_description_str(before[1], refresh=False)


def tick(n: int) -> None:
    """``n`` more products done on the running :func:`meter`'s bar, if any (the backends'
    ``jvp`` / ``vjp`` count rows times probes; the float64 oracle its one-hot chunks)."""
    bar = _METER.get()
    if bar is not None:
        bar.update(n)
