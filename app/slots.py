"""One model copy per adapter, merged tower by tower at the alpha each request needs.

``radapter.merge_adapters`` re-merges both towers and walks every module of the model:
about 4 ms on the default model, a quarter of one image forward. A classification at a
new alpha only needs the *image* tower re-merged (its text side comes from heads cached
per alpha), so :class:`Slot` keeps the image tower's fold plan and re-merges it alone
(0.2 ms). The plan is built by the site kinds' own ``fold_plan`` from the pristine weights,
the way ``merge_adapters`` builds its own, and checked bit for bit against it when the
slot is made; a mismatch turns the fast path off rather than serve other weights.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

import radapter
from radapter.sites import FoldedTensor, get_site_kind

if TYPE_CHECKING:
    from .service import AdapterEntry

log = logging.getLogger(__name__)


@torch.no_grad()
def image_tower_plan(model: nn.Module) -> list[FoldedTensor] | None:
    """Fold plans of the image tower's adapters; call it before the first merge (pristine weights).

    ``None`` when some adapter's tower is neither image nor text (the image forward might
    use it, so only a full merge is safe).
    """
    plan: list[FoldedTensor] = []
    for _, module, adapter in radapter.iter_adapters(model):
        tower = getattr(adapter, "tower", None)
        if tower == "text":
            continue
        if tower != "image":
            return None
        kind = get_site_kind(adapter.site_kind)
        originals = {n: t.detach().clone() for n, t in kind.tensors_to_keep(module).items()}
        plan += kind.fold_plan(module, originals, adapter.delta_matrix(True))
    return plan


@torch.no_grad()
def _write(plan: list[FoldedTensor], alpha: float) -> None:
    for t in plan:  # the same arithmetic as merge_adapters, so the same bits
        if t.delta is None:
            t.target.copy_(t.base)
        else:
            torch.add(t.base, t.delta, alpha=alpha, out=t.target)


@torch.no_grad()
def _matches(plan: list[FoldedTensor], alpha: float) -> bool:
    """Whether the targets hold exactly what the plan writes at ``alpha``."""
    return all(torch.equal(t.target, t.base if t.delta is None else torch.add(t.base, t.delta, alpha=alpha))
               for t in plan)


@dataclass
class Slot:
    """The base model, or the base model + one adapter, with the lock that guards its alpha.

    ``alpha`` is what ``merge_adapters`` last merged (the text tower is there);
    ``image_alpha`` is where the image tower is, which the fast path may move alone.
    Callers hold ``lock`` while they merge and use the model.
    """

    model: nn.Module
    entry: AdapterEntry | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    image_plan: list[FoldedTensor] | None = None
    alpha: float | None = None
    image_alpha: float | None = None

    @classmethod
    def with_adapter(cls, base: nn.Module, entry: AdapterEntry) -> Slot:
        """A copy of ``base`` with the adapter file loaded, merged at its default alpha."""
        model = copy.deepcopy(base)
        radapter.load_adapters(model, entry.path)
        model.eval()
        plan = image_tower_plan(model)
        slot = cls(model, entry)
        for alpha in (1.0, entry.default_alpha):  # alpha 1 checks the deltas, not only the originals
            slot.merge(alpha)
            if plan is not None and not _matches(plan, alpha):
                log.warning("%s: the image-tower fast merge differs from merge_adapters; using full merges",
                            entry.name)
                plan = None
        slot.image_plan = plan
        return slot

    def merge(self, alpha: float | None) -> None:
        """Both towers at ``alpha`` (no-op without an adapter or when already there)."""
        if self.entry is None or alpha is None or (self.alpha == alpha and self.image_alpha == alpha):
            return
        radapter.merge_adapters(self.model, alpha)
        self.alpha = self.image_alpha = alpha

    def merge_text(self, alpha: float | None) -> None:
        """The text tower at ``alpha`` (``merge_adapters`` moves the image tower along with it)."""
        if self.entry is not None and alpha is not None and self.alpha != alpha:
            self.merge(alpha)

    def merge_image(self, alpha: float | None) -> None:
        """The image tower at ``alpha``; the text tower may stay elsewhere (use :meth:`merge` for text)."""
        if self.entry is None or alpha is None or self.image_alpha == alpha:
            return
        if self.image_plan is None:
            self.merge(alpha)
            return
        _write(self.image_plan, alpha)
        self.image_alpha = alpha
