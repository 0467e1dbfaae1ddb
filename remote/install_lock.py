"""One install at a time per machine: an exclusive ``fcntl`` lock in the shared cache root.

Several agents may share an instance (:mod:`remote.seats`) and its cache root, where the
ai-toolkit checkout, its venv and the pip caches live. Two ``git clone`` or ``pip install`` runs
into one directory at once break each other, so the bootstrap holds this lock; the second agent
waits, then finds the first one's install done (``remote.bootstrap``'s done-marker). The kernel
drops the lock when its holder dies, so a killed agent never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Callable, Iterator

LOCK_NAME = "bootstrap.lock"


@contextlib.contextmanager
def install_lock(cache_root: Path, *, log: Callable[[str], None]) -> Iterator[None]:
    """Hold ``<cache_root>/bootstrap.lock`` for the ``with`` block, waiting (and saying so in
    the log) while another agent on this machine holds it."""
    cache_root.mkdir(parents=True, exist_ok=True)
    path = cache_root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another run's install on this machine to finish (lock {path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
            log("the other run's install finished; going on")
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
