"""Atomic file and folder writes: readers see the old content or the new, never half.

:func:`atomic_path` writes a file through a temporary file renamed over it. :func:`atomic_dir`
assembles a folder ``NAME`` in a temporary folder beside it and swaps it in, holding the lock
``.NAME.lock`` (which stays). Every name it leaves beside ``NAME`` when the process is killed
part-way is recognised and cleaned up, under that lock, by the next :func:`atomic_dir` (or
:func:`recover_dir`) of ``NAME``:

- ``.NAME.XXXXXXXX.tmp``: a folder being assembled, or (after an exchange) the previous content;
- ``.NAME.old``: the previous content, complete, moved aside by a two-rename swap; restored when
  ``NAME`` itself is missing, else removed;
- ``.NAME.XXXXXXXX.del``: something being deleted (a replaced ``.NAME.old``, or what
  :func:`discard` was given).

The live folder ``NAME`` is never deleted. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``,
so ``NAME`` always exists; elsewhere (or on a file system without it) ``NAME`` is renamed to
``.NAME.old`` and the new folder renamed to ``NAME``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
from filelock import Timeout as FileLockTimeout

log = logging.getLogger(__name__)

#: Fault injection: when set, called with a step name (one of :data:`STEPS`) just after that step of a
#: write is done. Tests raise there, or kill the process, to leave what a crash at that step leaves.
crash_hook: Callable[[str], None] | None = None

#: The steps :func:`crash_point` is called with here, in the order a write goes through them.
STEPS = (
    "recover.restored",  # a missing NAME was restored from .NAME.old
    "dir.created",  # the temporary folder exists (empty)
    "file.written",  # atomic_path: the temporary file is written, not yet renamed over the target
    "dir.filled",  # the temporary folder is complete, not yet swapped in
    "dir.exchanged",  # swapped by exchange: NAME is new, the temporary name holds the old content
    "dir.moved-aside",  # two-rename swap: NAME moved to .NAME.old, the new folder not yet renamed
    "dir.swapped",  # two-rename swap (or first write): the new folder is NAME
    "dir.trashed",  # something to delete was renamed to .NAME.XXXXXXXX.del
    "dir.deleting",  # a deletion is part-way through
)

_RANDOM = r"[a-z0-9_]{8}"  # tempfile's and secrets.token_hex's 8-character names


def crash_point(step: str) -> None:
    """Report ``step`` to :data:`crash_hook` (nothing when unset)."""
    if crash_hook is not None:
        crash_hook(step)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        crash_point("file.written")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- locks
_LOCKS: dict[tuple[int, str], FileLock] = {}  # by (process, lock file): a forked child makes its own
_LOCKS_GUARD = threading.Lock()


def lock_file(path: str | Path) -> Path:
    """The lock file of folder ``path``: ``.NAME.lock`` beside it (kept; removing lock files is racy)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def folder_lock(path: str | Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the exclusive lock of ``path``: across processes and threads, re-entrant within a thread.

    ``timeout``: seconds to wait (0: one attempt) before :class:`TimeoutError`; default: no limit.
    """
    file = lock_file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    key = (os.getpid(), os.path.abspath(file))
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = FileLock(key[1], thread_local=True)
    try:
        lock.acquire(timeout=-1 if timeout is None else timeout)
    except FileLockTimeout as e:
        raise TimeoutError(f"{path} is locked by another writer") from e
    try:
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------- leftovers
def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def leftovers(path: str | Path) -> list[Path]:
    """What interrupted writes of folder ``path`` left beside it (``.old``, ``.tmp``, ``.del``), sorted."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:{_RANDOM}\.(?:tmp|del)|old)")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return sorted(path.parent / n for n in names if pattern.fullmatch(n))


def _delete(victim: Path) -> None:
    """Remove a file or a folder, entry by entry; a failure is logged and left to the next clean-up."""
    try:
        if victim.is_symlink() or not victim.is_dir():
            victim.unlink(missing_ok=True)
            return
        for i, entry in enumerate(sorted(victim.iterdir())):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            if i == 0:
                crash_point("dir.deleting")
        victim.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove %s (%s); the next write of it retries", victim, e)


def discard(victim: str | Path, owner: str | Path | None = None) -> None:
    """Delete ``victim`` so that a crash part-way leaves only a name the next clean-up of folder ``owner``
    (default: ``victim``) removes: it is first renamed to ``.OWNER.XXXXXXXX.del``. Call it holding the
    lock of ``owner``."""
    victim = Path(victim)
    owner = Path(owner) if owner is not None else victim
    if not os.path.lexists(victim):
        return
    trash = owner.with_name(f".{owner.name}.{secrets.token_hex(4)}.del")
    os.replace(victim, trash)
    crash_point("dir.trashed")
    _delete(trash)


def recover_dir(path: str | Path) -> list[str]:
    """Clean up after interrupted writes of folder ``path``, under its lock; returns what was done.

    A missing ``path`` whose previous content survives as ``.NAME.old`` is restored from it; every
    other leftover (see :func:`leftovers`) is deleted. ``path`` itself is never touched otherwise.
    """
    path = Path(path)
    done: list[str] = []
    with folder_lock(path):
        old = _old(path)
        if os.path.lexists(old) and not os.path.lexists(path):
            os.replace(old, path)
            done.append(f"restored {path} from {old.name}")
            log.warning("%s was missing after an interrupted swap: restored the previous content", path)
            crash_point("recover.restored")
        if os.path.lexists(old):
            discard(old, path)
            done.append(f"removed {old.name}")
        for stale in leftovers(path):
            _delete(stale)
            done.append(f"removed {stale.name}")
    return done


# ----------------------------------------------------------------------------- swap
_renameat2: Callable[..., int] | None = None
_exchange_supported = sys.platform.startswith("linux")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    global _renameat2, _exchange_supported
    if not _exchange_supported:
        return False
    if _renameat2 is None:
        func = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
        if func is None:
            _exchange_supported = False
            return False
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        func.restype = ctypes.c_int
        _renameat2 = func
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # not on this file system (EINVAL) or kernel: fall back to two renames
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap(tmp: Path, path: Path) -> None:
    """Put the complete folder ``tmp`` at ``path``, deleting what was there."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        crash_point("dir.swapped")
    elif _exchange(tmp, path):
        crash_point("dir.exchanged")
        _delete(tmp)  # now the previous content, under a leftover name
    else:
        old = _old(path)
        os.replace(path, old)
        crash_point("dir.moved-aside")
        os.replace(tmp, path)
        crash_point("dir.swapped")
        discard(old, path)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success swap it in for ``path``.

    Holds the lock of ``path`` throughout and first cleans up what interrupted writes of it left
    (:func:`recover_dir`), so a write killed at any point never blocks the next one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path):
        recover_dir(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        crash_point("dir.created")
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            crash_point("dir.filled")
            _swap(tmp, path)
        finally:
            if os.path.lexists(tmp):
                _delete(tmp)
