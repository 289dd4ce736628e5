"""Classification heads per (adapter, alpha, class list), and a background warmer for the slider's alphas.

A head at alpha a is the zero-shot head of the text tower merged at exactly a (20 prompts
through MiniLM: ~40 ms, 2-3 image forwards). After a classification the warmer builds the
heads at every alpha the slider can take (``ALPHA_GRID``) for that class list, nearest to
the user's alpha first, so a slider release finds its head ready and costs one image
forward. It never interpolates: each head is computed at its own alpha. It steps aside
while a user request is running and drops a job when a newer one for the adapter arrives.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

ALPHA_STEP = 0.05  # the UI slider's step
ALPHA_GRID: tuple[float, ...] = tuple(round(i * ALPHA_STEP, 4) for i in range(round(1 / ALPHA_STEP) + 1))

V = TypeVar("V")


@dataclass(frozen=True)
class HeadSpec:
    """What a head depends on besides the model and its alpha."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    beta: float | None = None  # DRM heads only


class LRU(Generic[V]):
    """A small thread-safe least-recently-used cache."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def grid_order(center: float) -> list[float]:
    """The slider's alphas, nearest to ``center`` first (where the user will most likely go next)."""
    return sorted(ALPHA_GRID, key=lambda a: (abs(a - center), a))


class HeadWarmer:
    """One daemon thread building heads at the slider's alphas, at low priority.

    ``build(adapter, alpha, spec, should_stop)`` builds and caches one head (returning
    early when ``should_stop()`` says so); ``busy()`` says whether a user request runs.
    """

    def __init__(self, build: Callable[[str, float, HeadSpec, Callable[[], bool]], None],
                 busy: Callable[[], bool]) -> None:
        self._build, self._busy = build, busy
        self._cond = threading.Condition()
        self._jobs: dict[str, tuple[HeadSpec, float]] = {}
        self._working = False
        self._thread: threading.Thread | None = None

    def request(self, adapter: str, spec: HeadSpec, center: float) -> None:
        """Warm ``spec``'s heads for ``adapter`` at every grid alpha, nearest to ``center`` first.

        Replaces the adapter's pending job (the latest class list and alpha win).
        """
        with self._cond:
            self._jobs[adapter] = (spec, center)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="head-warmer")
                self._thread.start()
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job is pending or running; ``False`` on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._working, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._jobs))
                adapter, (spec, center) = next(iter(self._jobs.items()))
                del self._jobs[adapter]
                self._working = True
            try:
                self._warm(adapter, spec, center)
            except Exception:  # a warm-up failure must not kill the thread; requests build on demand
                log.exception("warming heads for %s failed", adapter)
            finally:
                with self._cond:
                    self._working = False
                    self._cond.notify_all()

    def _superseded(self, adapter: str) -> bool:
        with self._cond:
            return adapter in self._jobs

    def _yield(self, adapter: str) -> bool:
        """Wait while a user request runs (they get the CPU and the slot lock); ``True`` to stop."""
        while self._busy():
            if self._superseded(adapter):
                return True
            time.sleep(0.005)
        return self._superseded(adapter)

    def _warm(self, adapter: str, spec: HeadSpec, center: float) -> None:
        for alpha in grid_order(center):
            if self._yield(adapter):
                return
            self._build(adapter, alpha, spec, lambda: self._yield(adapter))
