"""radapter/atomic.py: folder swaps killed at every step, leftovers of earlier kills, the folder lock.

A kill is simulated by the fault-injection hook: at the chosen step it copies the parent folder
(what a SIGKILL there leaves on disk) and raises; the test then carries on from the copy.
"""

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from radapter import atomic

OLD = {"a": "old", "sub/b": "old"}
NEW = {"a": "new", "sub/b": "new", "c": "new"}
NEWER = {"a": "newer"}

#: The steps a replace of an existing folder goes through, by swap mode (tests/test_atomic.py covers each).
REPLACE_STEPS = {
    "exchange": ["dir.created", "dir.filled", "dir.exchanged", "dir.deleting"],
    "rename": ["dir.created", "dir.filled", "dir.moved-aside", "dir.swapped", "dir.trashed", "dir.deleting"],
}


class Killed(BaseException):
    """Raised by the hook where the process is "killed" (not an Exception: nothing may catch it)."""


def _exchange_works(folder: Path) -> bool:
    a, b = folder / ".probe-a", folder / ".probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return atomic._exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


def use_swap(swap: str, monkeypatch, folder: Path) -> None:
    """Swap by ``renameat2`` exchange (Linux) or by two renames (elsewhere, or forced here)."""
    if swap == "exchange" and not _exchange_works(folder):
        pytest.skip("no atomic exchange on this system")
    if swap == "rename":
        monkeypatch.setattr(atomic, "_exchange_supported", False)


@pytest.fixture(params=["exchange", "rename"])
def mode(request, monkeypatch, tmp_path):
    use_swap(request.param, monkeypatch, tmp_path)
    return request.param


def fill(folder: Path, content: dict[str, str]) -> None:
    for rel, text in content.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)


def content(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def write(path: Path, what: dict[str, str]) -> None:
    with atomic.atomic_dir(path) as tmp:
        fill(tmp, what)


def record_steps(monkeypatch) -> list[str]:
    steps: list[str] = []
    monkeypatch.setattr(atomic, "crash_hook", steps.append)
    return steps


def kill_at(monkeypatch, step: str, copy_from: Path, copy_to: Path, nth: int = 1) -> None:
    """Make the ``nth`` report of ``step`` copy ``copy_from`` to ``copy_to`` and raise :class:`Killed`."""
    seen = []

    def hook(s: str) -> None:
        if s == step and len(seen) < nth:
            seen.append(s)
            if len(seen) == nth:
                shutil.copytree(copy_from, copy_to, symlinks=True)
                raise Killed(step)

    monkeypatch.setattr(atomic, "crash_hook", hook)


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_replace_steps_are_the_ones_tested(mode, tmp_path, monkeypatch):
    fill(tmp_path / "g", OLD)
    steps = record_steps(monkeypatch)
    write(tmp_path / "g", NEW)
    assert steps == REPLACE_STEPS[mode] and set(steps) <= set(atomic.STEPS)
    assert content(tmp_path / "g") == NEW and listing(tmp_path) == [".g.lock", "g"]


@pytest.mark.parametrize("swap, step", [(m, s) for m, steps in REPLACE_STEPS.items() for s in steps])
def test_replace_killed_at_each_step_leaves_old_or_new_and_the_next_write_recovers(swap, step, tmp_path,
                                                                                   monkeypatch):
    use_swap(swap, monkeypatch, tmp_path)
    live, killed = tmp_path / "live", tmp_path / "killed"
    fill(live / "g", OLD)
    kill_at(monkeypatch, step, live, killed)
    with pytest.raises(Killed):
        write(live / "g", NEW)
    monkeypatch.setattr(atomic, "crash_hook", None)
    g = killed / "g"
    if step == "dir.moved-aside":  # between the two renames: the old folder is whole, aside
        assert not g.exists() and content(killed / ".g.old") == OLD
    else:
        assert content(g) in (OLD, NEW)
    shutil.copytree(killed, tmp_path / "killed2", symlinks=True)
    # recovery alone: the old or the new folder, complete, and nothing else
    before = content(g) if g.exists() else OLD
    atomic.recover_dir(g)
    assert content(g) == before and listing(killed) == [".g.lock", "g"] and atomic.leftovers(g) == []
    # the next write succeeds and leaves nothing else either
    write(tmp_path / "killed2" / "g", NEWER)
    assert content(tmp_path / "killed2" / "g") == NEWER and listing(tmp_path / "killed2") == [".g.lock", "g"]


def test_first_write_killed_before_its_swap_leaves_nothing_behind(tmp_path, monkeypatch):
    live, killed = tmp_path / "live", tmp_path / "killed"
    live.mkdir()
    kill_at(monkeypatch, "dir.filled", live, killed)
    with pytest.raises(Killed):
        write(live / "g", NEW)
    monkeypatch.setattr(atomic, "crash_hook", None)
    assert not (killed / "g").exists() and len(atomic.leftovers(killed / "g")) == 1  # the complete .tmp
    write(killed / "g", NEWER)
    assert content(killed / "g") == NEWER and listing(killed) == [".g.lock", "g"]


# ----------------------------------------------------------------------------- leftovers of earlier kills
def test_half_deleted_old_folder_does_not_block_the_next_write(mode, tmp_path):
    """A kill while ``.g.old`` was being deleted: renaming ``g`` onto it failed with errno 39 (not empty)."""
    fill(tmp_path / "g", OLD)
    fill(tmp_path / ".g.old", {"sub/b": "older"})  # the rest already deleted
    write(tmp_path / "g", NEW)
    assert content(tmp_path / "g") == NEW and listing(tmp_path) == [".g.lock", "g"]


def test_stale_temporary_folders_and_trash_are_removed(mode, tmp_path):
    fill(tmp_path / "g", OLD)
    fill(tmp_path / ".g.k3j_x0q9.tmp", {"img_emb/img_emb_0000.npy": "x" * 1000})  # a kill during assembly
    fill(tmp_path / ".g.0123abcd.del", {"a": "half deleted"})
    (tmp_path / ".g.zz99zz99.tmp").write_text("a file's temporary")
    others = [".g.x.lock", ".gg.abcdefgh.tmp", ".g.x.abcdefgh.tmp", ".g.work", "g2", ".g.toolong12.tmp"]
    for name in others:  # not leftovers of g: other folders' files, and g's work folder
        (tmp_path / name).mkdir()
    assert [p.name for p in atomic.leftovers(tmp_path / "g")] == [".g.0123abcd.del", ".g.k3j_x0q9.tmp",
                                                                   ".g.zz99zz99.tmp"]
    write(tmp_path / "g", NEW)
    assert content(tmp_path / "g") == NEW and listing(tmp_path) == sorted([".g.lock", "g", *others])


def test_missing_folder_is_restored_from_its_complete_old_copy(tmp_path):
    """A kill between the two renames of a swap: ``g`` is missing, ``.g.old`` holds it whole."""
    fill(tmp_path / ".g.old", OLD)
    fill(tmp_path / ".g.abcd1234.tmp", NEW)
    done = atomic.recover_dir(tmp_path / "g")
    assert content(tmp_path / "g") == OLD and listing(tmp_path) == [".g.lock", "g"]
    assert done[0].startswith("restored")
    assert atomic.recover_dir(tmp_path / "g") == []  # nothing left to do


@pytest.mark.parametrize("step, nth", [("recover.restored", 1), ("dir.trashed", 1), ("dir.deleting", 1),
                                       ("dir.deleting", 2)])
def test_recovery_killed_part_way_is_finished_by_the_next_one(step, nth, tmp_path, monkeypatch):
    live, killed = tmp_path / "live", tmp_path / "killed"
    fill(live / ".g.old", OLD)
    fill(live / ".g.abcd1234.tmp", NEW)
    fill(live / ".g.0123abcd.del", {"x": "1", "y": "2"})
    if step == "dir.trashed":  # a trashed .old is only ever one beside a live folder
        fill(live / "g", NEW)
    kill_at(monkeypatch, step, live, killed, nth)
    with pytest.raises(Killed):
        atomic.recover_dir(live / "g")
    monkeypatch.setattr(atomic, "crash_hook", None)
    expected = NEW if step == "dir.trashed" else OLD
    atomic.recover_dir(killed / "g")
    assert content(killed / "g") == expected and listing(killed) == [".g.lock", "g"]


def test_a_failed_write_leaves_the_old_folder_and_no_leftovers(mode, tmp_path):
    fill(tmp_path / "g", OLD)
    with pytest.raises(RuntimeError), atomic.atomic_dir(tmp_path / "g") as tmp:
        fill(tmp, NEW)
        raise RuntimeError("disk full")
    assert content(tmp_path / "g") == OLD and listing(tmp_path) == [".g.lock", "g"]


# ----------------------------------------------------------------------------- the lock
def test_writers_of_one_folder_take_turns(tmp_path):
    g = tmp_path / "g"
    fill(g, OLD)
    inside, release, order = threading.Event(), threading.Event(), []
    first_tmp: list[Path] = []

    def first() -> None:
        with atomic.atomic_dir(g) as tmp:
            first_tmp.append(tmp)
            fill(tmp, NEW)
            inside.set()
            release.wait(10)
            order.append("first")

    def second() -> None:
        with atomic.atomic_dir(g) as tmp:  # must neither start nor clean up while the first one runs
            order.append("second")
            fill(tmp, NEWER)

    a = threading.Thread(target=first)
    a.start()
    assert inside.wait(10)
    b = threading.Thread(target=second)
    b.start()
    time.sleep(0.3)
    assert order == [] and first_tmp[0].is_dir()
    release.set()
    a.join(10)
    b.join(10)
    assert order == ["first", "second"] and content(g) == NEWER and listing(tmp_path) == [".g.lock", "g"]
    with atomic.folder_lock(g), atomic.atomic_dir(g) as tmp:  # re-entrant within a thread
        fill(tmp, OLD)
    assert content(g) == OLD


def test_lock_timeout(tmp_path):
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with atomic.folder_lock(tmp_path / "g"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(10)
    try:
        with pytest.raises(TimeoutError, match="locked"), atomic.folder_lock(tmp_path / "g", timeout=0):
            pass
    finally:
        release.set()
        t.join(10)
    with atomic.folder_lock(tmp_path / "g", timeout=0):
        pass


def test_the_lock_excludes_other_processes(tmp_path):
    g = tmp_path / "g"
    fill(g, OLD)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, filelock\n"
                               "with filelock.FileLock(sys.argv[1]):\n"
                               "    print('held', flush=True)\n"
                               "    sys.stdin.readline()\n", str(atomic.lock_file(g))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        entered = threading.Event()

        def writer() -> None:
            with atomic.atomic_dir(g) as tmp:
                entered.set()
                fill(tmp, NEW)

        t = threading.Thread(target=writer)
        t.start()
        assert not entered.wait(0.5)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert entered.wait(10)
        t.join(10)
    finally:
        holder.kill()
        holder.wait()
    assert content(g) == NEW
