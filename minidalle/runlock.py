"""One writer per run directory: ``minidalle run`` holds an exclusive ``fcntl.flock`` on
``<run.out_dir>/.minidalle.lock`` while it works. The kernel releases it when the process
ends in any way (SIGKILL included), so a stale lock never blocks a restart. The file holds
the holder's pid, which a refused process names.

The processes of one ``--nproc`` job share the lock of the launching process
(``MINIDALLE_RUN_LOCK`` names the directory it holds); under a bare torchrun only rank 0
takes it.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from minidalle.errors import RunLockedError

LOCK_FILE = ".minidalle.lock"
HELD_ENV = "MINIDALLE_RUN_LOCK"


@contextlib.contextmanager
def run_lock(out_dir):
    """Hold the run directory's lock for the ``with`` block (creating the directory); raise
    :class:`RunLockedError` at once, naming the holder's pid, when another process has it."""
    out_dir = Path(out_dir)
    key = str(out_dir.resolve())
    if os.environ.get(HELD_ENV) == key or (
            "LOCAL_RANK" in os.environ and HELD_ENV not in os.environ
            and os.environ.get("RANK", "0") != "0"):
        yield None  # the job's launcher (or rank 0) holds it
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield None
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise RunLockedError(
                f"{out_dir}: in use by another minidalle process (pid {holder}); wait for it "
                "to finish, stop it, or use another run.out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        previous = os.environ.get(HELD_ENV)
        os.environ[HELD_ENV] = key  # inherited by the processes this one launches
        try:
            yield path
        finally:
            if previous is None:
                os.environ.pop(HELD_ENV, None)
            else:
                os.environ[HELD_ENV] = previous
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
