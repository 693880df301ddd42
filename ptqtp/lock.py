"""The lock on an output directory: one `ptqtp quantize` writes a directory at a time.

Imports only `errors`. Two runs into one directory would delete each other's temp shards and interleave
manifests, so a run holds OUT/.ptqtp-lock from its first write to its last. The file records the owner (pid,
host, start time) for the second run's error message; the lock itself is `flock` on it, which the kernel drops
when the owner dies, however it dies, so a lock left behind by a killed run is simply taken over. Where the
filesystem has no `flock`, a lock whose pid no longer runs on this host counts as stale.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import pathlib
import socket

try:
    import fcntl
except ImportError:  # Windows: the pid check below is all there is
    fcntl = None

from .errors import OutputBusyError

LOCK_NAME = ".ptqtp-lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _owner(text: str) -> dict:
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "owner not recorded yet"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


def _alive_here(info: dict) -> bool:
    """The owner may still run: it is on another host (unknowable), or its pid exists here."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return True
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """`with OutputLock(out):` holds OUT/.ptqtp-lock; a second holder gets `OutputBusyError` naming the first.

    The directory must exist. Leaving the block removes the file.
    """

    def __init__(self, directory):
        self.path = pathlib.Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._try_flock(fd)
            except BaseException:
                os.close(fd)
                raise
            info = _owner(self._read(fd))
            busy = not locked if locked is not None else bool(info) and _alive_here(info)
            if busy:
                os.close(fd)
                raise OutputBusyError(f"{self.path.parent} is being written by another ptqtp run ({_describe(info)});"
                                      " wait for it to finish, or choose another -o directory.")
            try:  # a run that just finished may have removed the file we opened: lock the one at the path
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode())
        self._fd = fd
        return self

    @staticmethod
    def _try_flock(fd: int) -> bool | None:
        """True: locked; False: another process holds it; None: this filesystem has no flock."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in _NO_FLOCK:
                return None
            raise

    @staticmethod
    def _read(fd: int) -> str:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode(errors="replace")

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held, so no one locks a file about to vanish
        finally:
            os.close(self._fd)
            self._fd = None
