"""The run directory: settings, an append-only record store and atomically written outputs.

Layout of a run directory::

    settings.json      the run's settings (written last when the run is set up: its presence
                       marks a directory as a run that ``--resume`` may continue)
    model.pt           the briefly trained weights of a demo model (written before settings.json)
    records.jsonl      one JSON line per (sample, split): the per-sample results
    profile.json       final results (atomic: temp file + os.replace)
    summary.csv        one row per split
    samples.csv        one row per (sample, split)
    profile.png        leakage against split point
    .profile.lock      the lock a run holds while it uses the directory (never removed)

Record commits. Each record is one line ``{...}\\n`` whose JSON carries a CRC-32 of its own
content (``"crc"``). A batch of records is written with one ``write`` of whole lines, then
flushed and ``fsync``-ed. A record exists once its complete line is on disk: the reader skips a
torn last line (no final newline) and any line whose JSON or CRC does not check out (for example
the zero-filled tail a crash can leave), so a record is either fully present or absent. Before
appending, the writer truncates a torn tail so that a new line never continues a broken one.
Records are keyed by ``(sample, split)``; the reader keeps the first copy of a key, so the store
never holds a duplicate result. Only one process (rank 0) ever appends.

One run at a time. A run (rank 0) holds an exclusive, non-blocking ``flock`` on
``.profile.lock`` from the moment it claims the directory (a new run) or checks it (``--resume``)
until it exits (the operating system drops it when the process dies, SIGKILL included); a second
run on the directory is refused, naming the process that holds it (written into the lock file).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import ResumeError, RunDirError

__all__ = [
    "RecordStore",
    "RunDir",
    "RunLock",
    "RunDirBusy",
    "check_out_empty",
    "atomic_write_bytes",
    "atomic_write_text",
    "canonical_json",
    "record_key",
]

log = logging.getLogger(__name__)

SETTINGS = "settings.json"
RECORDS = "records.jsonl"
MODEL = "model.pt"
LOCK = ".profile.lock"
#: Files a run directory may contain (anything else makes a directory "foreign").
OUTPUTS = ("profile.json", "summary.csv", "samples.csv", "profile.png")
#: Bump when the record or settings layout, or the way a record's numbers are computed, changes
#: incompatibly (2: per-sample *_converged and *_is_bound flags for every metric; 3: every
#: quantity of a (split, batch) from one Linearization, sigma* from FSInfo at sigma = 1, no
#: shared input-side dFIL probes: a run of version 2 cannot be continued into mixed records;
#: 4: under auto the probe cap is min(m, d), a sample that cannot converge gives up early and a
#: plain FSInfo_diag route is rerouted to the deflated one: other routes and probes serve a
#: record, so a version-3 run is not continued into records computed two ways).
STORE_VERSION = 4


def canonical_json(obj: Any) -> str:
    """Compact, key-sorted JSON; non-finite floats are refused (store them as ``None``)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / file system allows it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsync, os.replace.

    A reader sees either the old file or the complete new one, never a partial file. With
    ``exclusive`` the file must not exist yet (a hard link of the temp file, which fails where
    another process created it first): :class:`FileExistsError` then, and nothing written.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with contextlib.suppress(OSError):  # mkstemp makes 0600; give the usual umask mode
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            _link_exclusive(tmp, path, data)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _link_exclusive(tmp: str, path: Path, data: bytes) -> None:
    """``path`` made from ``tmp`` only if it does not exist (a hard link; where the file system
    has none, an ``O_EXCL`` create written in place)."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError:  # no hard links here
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def record_key(rec: dict[str, Any]) -> tuple[int, str]:
    """The identity of a record: ``(sample id, split name)``."""
    return int(rec["sample"]), str(rec["split"])


def _encode(rec: dict[str, Any]) -> bytes:
    body = {k: v for k, v in rec.items() if k != "crc"}
    text = canonical_json(body)
    body["crc"] = zlib.crc32(text.encode("utf-8"))
    return (canonical_json(body) + "\n").encode("utf-8")


def _decode(line: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or "crc" not in rec:
        return None
    crc = rec.pop("crc")
    if zlib.crc32(canonical_json(rec).encode("utf-8")) != crc:
        return None
    if "sample" not in rec or "split" not in rec:
        return None
    return rec


class RecordStore:
    """Append-only JSONL store of per-sample records (see the module docstring).

    Args:
        path: the ``records.jsonl`` file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fh = None

    def read(self) -> dict[tuple[int, str], dict[str, Any]]:
        """Every committed record by key (first copy wins); torn or corrupt lines are skipped."""
        out: dict[tuple[int, str], dict[str, Any]] = {}
        for rec in self._iter_valid():
            out.setdefault(record_key(rec), rec)
        return out

    def _iter_valid(self) -> Iterator[dict[str, Any]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        lines = data.split(b"\n")
        tail = lines.pop()  # after the last newline: empty, or a torn record
        if tail:
            log.info("ignoring a torn last record (%d bytes) in %s", len(tail), self.path)
        bad = 0
        for line in lines:
            if not line.strip(b"\x00 \t\r"):
                continue
            rec = _decode(line)
            if rec is None:
                bad += 1
                continue
            yield rec
        if bad:
            log.warning("ignoring %d unreadable record line(s) in %s", bad, self.path)

    def open(self) -> RecordStore:
        """Open for appending, first cutting off a torn tail (bytes after the last newline)."""
        if self._fh is not None:
            return self
        fh = open(self.path, "ab+")  # noqa: SIM115 - kept open across appends, closed in close()
        try:
            size = fh.seek(0, os.SEEK_END)
            if size:
                back = min(size, 1 << 20)
                while True:
                    fh.seek(size - back)
                    chunk = fh.read(back)
                    nl = chunk.rfind(b"\n")
                    if nl >= 0 or back == size:
                        keep = size - back + nl + 1 if nl >= 0 else 0
                        break
                    back = min(size, back * 2)
                if keep != size:
                    fh.truncate(keep)
                    fh.flush()
                    os.fsync(fh.fileno())
        except BaseException:
            fh.close()
            raise
        self._fh = fh
        return self

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Commit records: whole lines in one write, then flush and fsync. Returns the count."""
        if self._fh is None:
            self.open()
        payload = b"".join(_encode(r) for r in records)
        if not payload:
            return 0
        self._fh.write(payload)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return payload.count(b"\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RecordStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunDirBusy(RunDirError):
    """Another profile run holds the run directory's lock."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on a run directory's lock file (see the module
    docstring). :meth:`acquire` raises :class:`RunDirBusy` where another process holds it;
    :meth:`release` (or the process's exit) drops it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            warnings.warn(f"cannot lock {self.path.parent} (no fcntl here): a second profile "
                          "run on it at the same time would not be detected", stacklevel=2)
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise RunDirError(f"cannot create the lock file {self.path}: "
                              f"{err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirBusy(
                    f"output directory {self.path.parent} is in use by another profile run "
                    f"({self.holder() or 'process unknown'}); wait for it to finish or stop "
                    "it, then --resume (or choose another --out)") from None
            warnings.warn(f"cannot lock {self.path.parent} ({err.strerror or err}: a file "
                          "system without flock): a second profile run on it at the same time "
                          "would not be detected", stacklevel=2)
            return self
        self._fd = fd
        with contextlib.suppress(OSError):  # who holds it, for the refusal of another run
            os.ftruncate(fd, 0)
            now = datetime.now().isoformat(timespec="seconds")
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {now}\n"
                      .encode(), 0)
        return self

    def holder(self) -> str:
        """What the lock file says about the process holding it (``""`` where unknown)."""
        try:
            return self.path.read_text("utf-8", errors="replace").strip()[:200]
        except OSError:
            return ""

    def busy(self) -> str | None:
        """The holder (or ``"process unknown"``) where another process holds the lock now,
        else None (the lock is not taken)."""
        if not self.path.is_file():
            return None
        try:
            self.acquire()
        except RunDirBusy:
            return self.holder() or "process unknown"
        except RunDirError:
            return None
        self.release()
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    if len(text) <= 60:
        return text
    if isinstance(value, str):  # (a digest: its head, quotes balanced)
        return json.dumps(value[:16] + "...")
    return text[:57] + "..."


def settings_diff(old: dict[str, Any], new: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """Human-readable differences ``key: old -> new`` over ``keys``."""
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if a != b:
            out.append(f"{k} {_describe(a)} -> {_describe(b)}")
    return out


def check_out_empty(path: Path, holds: str, fix: str,
                    ignore: Callable[[Path], bool] | None = None) -> None:
    """Raise :class:`RunDirError` unless ``path`` can take a new run's output: absent, or an
    empty directory (entries for which ``ignore`` is true do not count). A command that writes
    its files at fixed names (``profile``, ``validate``) would otherwise overwrite a previous
    run's results without a word.

    Args:
        path: the ``--out`` directory.
        holds: what a non-empty directory is said to hold, e.g. ``"a previous profile run"``.
        fix: what to do instead, e.g. ``"choose a new --out"``.
        ignore: entries that a new run may replace.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RunDirError(f"output path {p} exists and is not a directory; choose another --out")
    if not p.is_dir():
        return
    try:
        entries = [e for e in p.iterdir() if ignore is None or not ignore(e)]
    except OSError as err:
        raise RunDirError(f"cannot read output directory {p}: {err.strerror or err}") from None
    if entries:
        raise RunDirError(f"output directory {p} is not empty (it holds {holds}); {fix}")


class RunDir:
    """A run directory (see the module docstring for its layout).

    Args:
        path: the directory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def settings_path(self) -> Path:
        return self.path / SETTINGS

    @property
    def records(self) -> RecordStore:
        return RecordStore(self.path / RECORDS)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    def lock(self) -> RunLock:
        """Take the directory's run lock (:class:`RunDirBusy` where another run holds it)."""
        return RunLock(self.path / LOCK).acquire()

    def exists(self) -> bool:
        """Whether this directory holds a run (its settings file)."""
        return self.settings_path.is_file()

    def load_settings(self) -> dict[str, Any]:
        """The stored settings; :class:`ResumeError` when missing or unreadable."""
        try:
            data = json.loads(self.settings_path.read_text("utf-8"))
        except FileNotFoundError:
            raise ResumeError(
                f"--resume: {self.path} holds no profile run (no {SETTINGS}); start a new run "
                "without --resume"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ResumeError(f"--resume: cannot read {self.settings_path}: {err}") from None
        if not isinstance(data, dict) or data.get("store_version") != STORE_VERSION:
            raise ResumeError(
                f"--resume: {self.settings_path} was written by an incompatible version of "
                "fsinfo-fast profile; start a new run with a new --out"
            )
        return data

    def check_new(self) -> None:
        """Raise unless the directory can hold a new run: absent, or an empty directory, and its
        nearest existing parent is writable."""
        p = self.path
        if p.is_dir():
            holder = RunLock(p / LOCK).busy()
            if holder is not None:
                raise RunDirBusy(
                    f"output directory {p} is in use by another profile run ({holder}); "
                    "choose another --out (or --resume it once that run has stopped)")
        check_out_empty(p, "a previous profile run" if self.exists() else "other files",
                        "pass --resume to continue that run or choose a new --out",
                        ignore=self._setup_leftover)
        self._check_writable()

    def check_resume(self) -> tuple[dict[str, Any], RunLock]:
        """Raise unless the directory holds a run that can be continued; return its settings
        and the run lock, now held (:class:`RunDirBusy` where another run holds it; the caller
        releases it).

        Temporary files of an interrupted atomic write are removed (once the lock is held: not
        another run's)."""
        if not self.path.is_dir():
            raise ResumeError(
                f"--resume: output directory {self.path} does not exist; start a new run "
                "without --resume"
            )
        settings = self.load_settings()
        self._check_writable()
        lock = self.lock()
        for tmp in self.path.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        return settings, lock

    def _setup_leftover(self, entry: Path) -> bool:
        """Files an interrupted set-up may leave before ``settings.json`` exists (a new run may
        replace them): the demo weights and temporary files of atomic writes."""
        if self.settings_path.exists():
            return False
        return entry.is_file() and (entry.name in (MODEL, LOCK) or (
            entry.name.startswith(".") and entry.name.endswith(".tmp")))

    def _check_writable(self) -> None:
        p = self.path
        probe = p
        while not probe.exists():
            parent = probe.parent
            if parent == probe:
                break
            probe = parent
        if not probe.is_dir():
            raise RunDirError(
                f"cannot create output directory {p}: {probe} is not a directory"
            )
        if not os.access(probe, os.W_OK | os.X_OK):
            raise RunDirError(
                f"output directory {p} cannot be written (no write permission on {probe})"
            )

    def create(self) -> None:
        """Create the directory (and parents); one-line :class:`RunDirError` on failure."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(
                f"cannot create output directory {self.path}: {err.strerror or err}"
            ) from None

    def clear_leftovers(self) -> None:
        """Remove what an interrupted set-up left (see :meth:`check_new`)."""
        if self.settings_path.exists() or not self.path.is_dir():
            return
        for entry in list(self.path.iterdir()):
            if self._setup_leftover(entry) and entry.name != LOCK:  # another run may hold it
                with contextlib.suppress(OSError):
                    entry.unlink()

    def write_settings(self, settings: dict[str, Any], *, new: bool = False) -> None:
        """Commit the settings (atomically); from now on the directory is a resumable run.
        ``new``: claim the directory for a new run: :class:`FileExistsError` where another run
        committed its settings there first (two runs started together mixed their records)."""
        text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(self.settings_path, text.encode("utf-8"), exclusive=new)
