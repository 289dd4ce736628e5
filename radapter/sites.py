"""Site kinds: how an adapter attaches to a module and folds into its weights.

A site is a module whose output receives an adapter. Its kind says where the
feature axis is, how to reach the output tensor, and which tensors absorb the
adapter on merge. Every kind folds as ``T(alpha) = T0 + alpha * D`` with ``T0`` and
``D`` computed once, so re-merging at a new alpha is one memory-bound add per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import PlacementError


@dataclass
class FoldedTensor:
    """One tensor of a merged site: ``target <- base + alpha * delta``."""

    target: torch.Tensor
    base: torch.Tensor
    delta: torch.Tensor | None


class SiteKind:
    """Behaviour shared by linear-like sites; subclasses override what differs."""

    name = "base"

    def check(self, module: nn.Module, path: str) -> None:
        raise NotImplementedError

    def features(self, module: nn.Module) -> int:
        raise NotImplementedError

    def batch_dim(self, module: nn.Module) -> int:
        return 0

    def channel_dim(self, module: nn.Module) -> int:
        return -1

    def output_tensor(self, output: Any) -> torch.Tensor:
        return output

    def replace_output(self, output: Any, tensor: torch.Tensor) -> Any:
        return tensor

    def weight_and_bias(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def fold_plan(
        self, module: nn.Module, originals: dict[str, torch.Tensor], delta_matrix: torch.Tensor
    ) -> list[FoldedTensor]:
        """Tensors to rewrite when merging ``(I + alpha * M)`` after this module.

        ``originals`` maps the names returned by :meth:`tensors_to_keep` to pristine
        copies; ``delta_matrix`` is ``M = s * A`` (fp32, ``d x d``).
        """
        weight, bias = self.weight_and_bias(module)
        plan = []
        w0 = originals["weight"]
        dw = (delta_matrix @ w0.reshape(w0.shape[0], -1).float()).reshape(w0.shape).to(w0.dtype)
        plan.append(FoldedTensor(weight, w0, dw))
        if bias is not None:
            b0 = originals["bias"]
            plan.append(FoldedTensor(bias, b0, (delta_matrix @ b0.float()).to(b0.dtype)))
        return plan

    def tensors_to_keep(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The live tensors a merge overwrites (their copies make unmerge exact)."""
        weight, bias = self.weight_and_bias(module)
        return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}


class LinearSite(SiteKind):
    """``nn.Linear``: the adapter acts on the output features (last axis)."""

    name = "linear"

    def check(self, module: nn.Module, path: str) -> None:
        if not isinstance(module, nn.Linear):
            raise PlacementError(f"site {path!r} of kind 'linear' is a {type(module).__name__}, not nn.Linear")

    def features(self, module: nn.Module) -> int:
        return module.out_features

    def weight_and_bias(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return module.weight, module.bias


class MultiheadAttentionSite(SiteKind):
    """``nn.MultiheadAttention``: adapter on the attention output, folded into out_proj.

    The hook must sit on the whole attention module: ``nn.MultiheadAttention`` hands
    ``out_proj.weight`` to a functional kernel and never calls ``out_proj`` itself.
    """

    name = "mha"

    def check(self, module: nn.Module, path: str) -> None:
        if not isinstance(module, nn.MultiheadAttention):
            raise PlacementError(f"site {path!r} of kind 'mha' is a {type(module).__name__}, not nn.MultiheadAttention")

    def features(self, module: nn.Module) -> int:
        return module.out_proj.out_features

    def batch_dim(self, module: nn.Module) -> int:
        return 0 if module.batch_first else 1

    def output_tensor(self, output: Any) -> torch.Tensor:
        return output[0]

    def replace_output(self, output: Any, tensor: torch.Tensor) -> Any:
        return (tensor, *output[1:])

    def weight_and_bias(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return module.out_proj.weight, module.out_proj.bias


class Conv1x1Site(SiteKind):
    """A 1x1 ``nn.Conv2d`` (a per-pixel linear map): adapter on the channel axis."""

    name = "conv1x1"

    def check(self, module: nn.Module, path: str) -> None:
        ok = isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
        if not ok:
            raise PlacementError(f"site {path!r} of kind 'conv1x1' is not a 1x1, ungrouped nn.Conv2d")

    def features(self, module: nn.Module) -> int:
        return module.out_channels

    def channel_dim(self, module: nn.Module) -> int:
        return 1

    def weight_and_bias(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return module.weight, module.bias


SITE_KINDS: dict[str, SiteKind] = {k.name: k for k in (LinearSite(), MultiheadAttentionSite(), Conv1x1Site())}


def register_site_kind(kind: SiteKind) -> None:
    """Make a new kind of site available to placement specs (e.g. a conv + BatchNorm pair)."""
    SITE_KINDS[kind.name] = kind


def get_site_kind(name: str) -> SiteKind:
    try:
        return SITE_KINDS[name]
    except KeyError:
        raise PlacementError(f"unknown site kind {name!r}; known: {sorted(SITE_KINDS)}") from None
