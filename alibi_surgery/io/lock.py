"""One run at a time per output directory: ``DirLock`` for every command that writes a directory.

``repair``, ``demo`` and ``random-model`` hold ``OUT/.alibi-surgery.lock`` while they write OUT. The lock is an
exclusive ``flock`` on that file, so the kernel drops it the instant its holder exits, however it exits (SIGKILL
included): a lock file left behind by a dead run is taken over by the next run, with no race between two runs doing
so at once. The file holds the holder's pid, host, command and start time; a second run refuses in one line naming
them. The lock file is removed on release, and a directory the lock created is removed again when the run leaves it
empty (a run refused after taking the lock leaves nothing behind).

Within one process, a lock on a directory covers its subdirectories (``repair --passes`` locks OUT and runs each
pass inside it). Limits: ``flock`` is advisory and per host; on network file systems that do not support it the
lock may not exclude a run on another machine.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from ..errors import UsageError
from .files import writing

__all__ = ["DirLock", "LOCK_NAME", "lock_holder"]

LOCK_NAME = ".alibi-surgery.lock"
_HELD: set[Path] = set()  # directories this process holds


def _describe(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}: "
            f"{info.get('command', '?')}")


def lock_holder(directory) -> str | None:
    """Who holds the lock on ``directory`` (a one-line description), or None when nobody does (no lock file, or
    a stale one left by a dead run). Held by this process: None."""
    directory = Path(directory).resolve()
    if any(directory == d or d in directory.parents for d in _HELD):
        return None
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return _describe(json.loads(os.read(fd, 65536) or b"{}"))
            except ValueError:
                return "another alibi-surgery run"
        return None
    finally:
        os.close(fd)


class DirLock:
    """Exclusive use of ``directory`` (created if missing) for the life of the ``with`` block."""

    def __init__(self, directory, what: str | None = None):
        """``what``: how a refusal names the directory (default: as the ``out`` argument, ``out='/x'``)."""
        self.dir = Path(directory).resolve()
        self.what = what
        self._fd: int | None = None
        self._created = False
        self._nested = False

    def acquire(self) -> "DirLock":
        with writing(self.dir, "directory"):
            self._created = not self.dir.exists()
            self.dir.mkdir(parents=True, exist_ok=True)
        if any(self.dir == d or d in self.dir.parents for d in _HELD):
            self._nested = True
            return self
        with writing(self.dir, "directory"):
            path = self.dir / LOCK_NAME
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = lock_holder(self.dir) or "another alibi-surgery run"
                    os.close(fd)
                    self._drop_created_dir()
                    name = f"out={str(self.dir)!r}" if self.what is None else f"{self.what} {self.dir}"
                    raise UsageError(f"{name} is in use by another run ({holder}); wait for it to "
                                     f"finish or choose another directory") from None
                try:  # the file we locked must still be the one at the path (a releasing holder unlinks it)
                    same = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": datetime.datetime.now().isoformat(timespec="seconds"),
                    "command": " ".join(["alibi-surgery", *sys.argv[1:]]) if sys.argv else "?"}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
        self._fd = fd
        _HELD.add(self.dir)
        return self

    def release(self) -> None:
        if self._nested:
            self._drop_created_dir()
            return
        if self._fd is None:
            return
        _HELD.discard(self.dir)
        try:
            (self.dir / LOCK_NAME).unlink(missing_ok=True)  # while still locked: no one can have locked this inode
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._drop_created_dir()

    def _drop_created_dir(self) -> None:
        if self._created:
            try:
                self.dir.rmdir()  # only when empty
            except OSError:
                pass

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
