"""The ``fsinfo-fast`` command line.

Subcommands live in their own modules, imported only when used; each module provides
``add_arguments(parser)`` and ``run(args) -> int``. User errors print one line and exit with
status 2 (no traceback); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings

from .errors import FSInfoError

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "profile": ("fsinfo_fast.profile", "leakage at every split point of a model over a data set"),
    "guard": ("fsinfo_fast.profile.guard_cmd",
              "FSInfoGuard noise for a target FSInfo per split, and its accuracy cost"),
    "bench": ("fsinfo_fast.bench", "benchmark every way to compute the metrics, side by side"),
    "validate": ("fsinfo_fast.validate", "check the metric against real reconstruction attacks"),
    "info": ("fsinfo_fast.info", "versions, devices and available backends"),
}


class UsageError(FSInfoError, ValueError):
    """A command-line problem the user can fix (exit status 2)."""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="fsinfo-fast",
        description="Fast, verified FSInfo / dFIL privacy-leakage metrics for split inference.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    for name, (modname, help_) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as err:
            if err.name != modname:
                raise
            continue  # not built yet
        p = sub.add_parser(name, help=help_, description=help_)
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def given_options(argv: list[str] | None) -> frozenset[str]:
    """The option destinations the command line sets explicitly (whatever their value): the
    same parser with every default suppressed (``profile --resume`` reads the others from the
    run it continues)."""
    parser, _ = build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:  # argparse keeps no public list of them
            if action.dest != "command":
                action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return frozenset(vars(parser.parse_args(argv)))


@contextlib.contextmanager
def _command_line_warnings(command: str):
    """Warnings printed as ``fsinfo-fast <command>: warning: <Category>: <message>`` while the
    command runs: the library attributes a warning to the caller's line, which on the command
    line was ``<frozen runpy>:88``. Only the text changes (``warnings.formatwarning``): filters
    and whoever records warnings (pytest) are left alone."""
    def text(message, category, filename, lineno, line=None):
        return f"fsinfo-fast {command}: warning: {category.__name__}: {message}\n"

    before = warnings.formatwarning
    warnings.formatwarning = text
    try:
        yield
    finally:
        warnings.formatwarning = before


def _unknown(parser: argparse.ArgumentParser, command: str | None, extra: list[str],
             argv: list[str]) -> None:
    """Exit with the error of the parser an unknown argument belongs to: the subcommand's
    usage for one after the command (the top-level usage named only ``fsinfo-fast [-h]
    [--debug] COMMAND``), the top-level one for one before it, and where a top-level option
    (``--debug``) comes after the command, where it goes."""
    top = [t for t in extra if t.split("=")[0] in parser._option_string_actions]
    if top and command:
        parser.error(f"{' '.join(top)} is an option of fsinfo-fast itself: give it before the "
                     f"command (fsinfo-fast {' '.join(top)} {command} ...)")
    at = argv.index(command) if command in argv else len(argv)
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    after = command and sub is not None and all(
        t not in argv[:at] for t in extra)  # (every unknown token follows the command)
    (sub.choices[command] if after else parser).error(
        f"unrecognized arguments: {' '.join(extra)}")


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unknown(parser, args.command, extra, sys.argv[1:] if argv is None else list(argv))
    args.given_options = given_options(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # (as typed: a resume hint)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with _command_line_warnings(args.command):
            return int(modules[args.command].run(args) or 0)
    except (FSInfoError, FileNotFoundError, FileExistsError, PermissionError,
            IsADirectoryError, NotADirectoryError) as err:
        if args.debug:
            raise
        print(f"fsinfo-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fsinfo-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (``fsinfo-fast info | head``): no traceback; stdout is
        # pointed at devnull so the interpreter's final flush does not raise again
        if args.debug:
            raise
        try:
            fd = sys.stdout.fileno()
        except (OSError, ValueError):  # (not a real file: a captured stream)
            return 141
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
