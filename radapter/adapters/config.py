"""`RAdapterConfig`: everything that defines an R-Adapter, as plain data."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

DropMode = Literal["adapter", "token"]
Tower = Literal["image", "text"]


@dataclass
class RAdapterConfig:
    """Configuration of the adapters added to a model.

    Defaults follow the R-Adapter paper (ECCV 2024) for full-data runs.

    Attributes:
        rank: ``None`` for a full-rank ``d x d`` adapter, else the rank ``r`` of ``B @ A``.
        scale_init: initial value of the learnable scalar scale ``s``.
        learn_scale: train ``s`` (the authors' code does) or keep it fixed.
        drop_prob: adapter-dropping probability ``p`` during training.
        drop_mode: ``"adapter"``: one Bernoulli draw per adapter and per sample (the
            paper); ``"token"``: one draw per token position shared across the batch
            (the authors' drop-path code).
        drop_rescale: divide kept branches by ``1 - p`` so the expectation is kept.
        ema_momentum: momentum ``m`` of the EMA of adapter weights; ``None`` disables it.
        ema_warmup: ramp the momentum as ``min(m, (1 + t) / (10 + t))`` so early steps are
            not dominated by the zero initialisation.
        placement: name of a registered placement spec, or ``"auto"``.
        towers: which towers receive adapters.
        default_alpha: re-scaling coefficient used when no alpha is given.
    """

    rank: int | None = None
    scale_init: float = 0.1
    learn_scale: bool = True
    drop_prob: float = 0.2
    drop_mode: DropMode = "adapter"
    drop_rescale: bool = True
    ema_momentum: float | None = 0.999
    ema_warmup: bool = True
    placement: str = "auto"
    towers: tuple[Tower, ...] = field(default=("image", "text"))
    default_alpha: float = 0.5

    def __post_init__(self) -> None:
        self.towers = tuple(self.towers)
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be a positive integer or None, got {self.rank}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {self.drop_prob}")
        if self.drop_mode not in ("adapter", "token"):
            raise ValueError(f"drop_mode must be 'adapter' or 'token', got {self.drop_mode!r}")
        if self.ema_momentum is not None and not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1) or None, got {self.ema_momentum}")
        if not isinstance(self.default_alpha, int | float) or not 0.0 <= self.default_alpha <= 1.0:
            raise ValueError(f"default_alpha must be a number in [0, 1], got {self.default_alpha!r}")
        self.default_alpha = float(self.default_alpha)
        bad = [t for t in self.towers if t not in ("image", "text")]
        if bad or not self.towers:
            raise ValueError(f"towers must be a non-empty subset of ('image', 'text'), got {self.towers}")

    def is_low_rank(self, features: int) -> bool:
        """Whether an adapter on ``features`` channels is a ``B @ A`` product (else a full matrix)."""
        return self.rank is not None and self.rank < features

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["towers"] = list(self.towers)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RAdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RAdapterConfig fields: {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RAdapterConfig:
        return cls.from_dict(json.loads(text))
