"""One writer per results folder, and the check that a folder can be written at all.

``bench run`` (and ``bench merge`` for its ``--out``) holds ``<out>/writer.lock`` while it writes:
a :class:`filelock.FileLock`, i.e. an OS lock (``flock``) that the kernel drops the moment its
holder dies, so a killed sweep never leaves the folder locked (where a filesystem has no ``flock``,
filelock falls back to its soft lock, which it breaks when the recorded pid is no longer alive on
the same host). Next to it, ``<out>/writer.json`` names the holder (host, pid, start time,
command): a second writer exits at once with one line naming it. The holder file is removed on a
clean release, so finding one while taking the lock means the previous writer was killed: that is
said on stderr and the lock is taken over.

``report`` and ``merge`` never lock the folders they read.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from bench.errors import UserError

LOCK_NAME = "writer.lock"
HOLDER_NAME = "writer.json"

_held: set[Path] = set()  # results folders this process holds (the lock is re-entrant per process)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def writable_folder(path: str | Path, what: str) -> Path:
    """Create ``path`` if needed and prove it is a writable folder, or raise one-line :class:`UserError`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{what} {str(path)!r} cannot be created or written: {exc.strerror or exc}") from None
    return path


def read_holder(folder: Path) -> dict | None:
    """The holder record of ``folder`` (None if there is none or it cannot be read)."""
    try:
        holder = json.loads((Path(folder) / HOLDER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, TypeError, ValueError):
        return True  # exists but not ours, or not a pid we can probe: assume alive
    return True


def _alive(holder: dict | None) -> bool:
    """Whether a holder record may name a live process (one on another host cannot be checked)."""
    if not holder:
        return False
    return holder.get("host") != socket.gethostname() or pid_alive(holder.get("pid"))


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another process (it has not recorded itself yet)"
    text = f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started_at')}"
    if holder.get("command"):
        text += f" (`{holder['command']}`)"
    return text


def _acquire(folder: Path, command: str | None, warn):
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = read_holder(folder)
        deadline = time.monotonic() + 2.0  # the holder writes its record right after taking the lock
        while not _alive(holder) and time.monotonic() < deadline:
            time.sleep(0.1)
            holder = read_holder(folder)
        where = describe_holder(holder)
        if holder and not _alive(holder):
            where += "; that pid is no longer running, so a process it started still holds the lock"
        raise UserError(f"results folder {str(folder)!r} is in use by another writer: {where}; wait for it "
                        "to finish or use another --out") from None
    except OSError as exc:
        raise UserError(f"cannot lock results folder {str(folder)!r}: {exc.strerror or exc}") from None
    try:
        stale = read_holder(folder)
        if stale:
            gone = "holding it no more" if _alive(stale) else "not running"
            warn(f"results folder {str(folder)!r} was left locked by {describe_holder(stale)}, which is {gone} "
                 "(killed?); taking it over")
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": command}
        from .results import atomic_write_bytes

        atomic_write_bytes(folder / HOLDER_NAME, json.dumps(holder).encode())
    except BaseException:
        lock.release()
        raise
    return lock


@contextmanager
def results_writer(folder: str | Path, command: str | None = None, warn=_warn):
    """Hold ``folder``'s writer lock for the ``with`` block (creating the folder; one-line
    :class:`UserError` if it cannot be written or another process holds it). Re-entrant within a
    process: ``bench run`` holds it for the whole call and the sweep loop takes it again for free."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _held:
        yield folder
        return
    writable_folder(folder, "results folder")
    lock = _acquire(folder, command or " ".join(sys.argv), warn)
    _held.add(key)
    try:
        yield folder
    finally:
        _held.discard(key)
        with suppress(OSError):
            (folder / HOLDER_NAME).unlink()
        lock.release()
