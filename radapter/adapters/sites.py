"""Site kinds: how an adapter attaches to a module and folds into its weights.

A site is a module whose output receives an adapter. Its kind says where the
feature axis is, how to reach the output tensor, and which tensors absorb the
adapter on merge. Every kind folds as ``T(alpha) = T0 + alpha * D`` with ``T0`` and
``D`` computed once, so re-merging at a new alpha is one memory-bound add per tensor.

Most kinds fold into the site module itself. A kind may fold into a second module too
(e.g. a BatchNorm site folds into the conv before it): a placement rule names that
module with ``fold_into`` and :func:`link_fold_target` ties it to the site at attach time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import PlacementError, RAdapterError

_FOLD_TARGET_ATTR = "radapter_fold_into"


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

    def check_fold_target(self, module: nn.Module, target: nn.Module | None, path: str) -> None:
        """Check the module a rule's ``fold_into`` names (``None`` when the rule names none)."""
        if target is not None:
            raise PlacementError(f"site {path!r} of kind {self.name!r} folds into itself; drop its rule's 'fold_into'")

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


def link_fold_target(module: nn.Module, target: nn.Module) -> None:
    """Tie ``target`` (a rule's ``fold_into`` module) to the site ``module``."""
    # Kept out of ``_modules``: a registered child would list the target's weights twice in the state dict.
    module.__dict__[_FOLD_TARGET_ATTR] = target


def unlink_fold_target(module: nn.Module) -> None:
    module.__dict__.pop(_FOLD_TARGET_ATTR, None)


def fold_target(module: nn.Module) -> nn.Module:
    try:
        return module.__dict__[_FOLD_TARGET_ATTR]
    except KeyError:
        raise PlacementError("this site has no linked 'fold_into' module; attach adapters with add_adapters") from None


class ConvBatchNormSite(SiteKind):
    """A ``BatchNorm2d`` after a conv (its rule's ``fold_into``): adapter on the BN output.

    In eval mode the pair computes ``y = k * (W x + b_conv - mean) + beta`` with
    ``k = gamma / sqrt(var + eps)``. The adapted ``(I + alpha * M) y`` folds exactly into
    ``W <- W + alpha * K^-1 M K W`` and ``beta <- beta + alpha * M c`` (``c`` = y at ``W x = 0``):
    the original tensors at alpha = 0, and the BN statistics and ``gamma`` stay untouched.
    Merging assumes eval-mode BatchNorm (running statistics).
    """

    name = "conv_bn"

    def check(self, module: nn.Module, path: str) -> None:
        ok = isinstance(module, nn.BatchNorm2d) and module.affine and module.track_running_stats
        if not ok:
            raise PlacementError(f"site {path!r} of kind 'conv_bn' is not an affine nn.BatchNorm2d with running stats")
        act = getattr(module, "act", None)  # timm's BatchNormAct2d
        if act is not None and not isinstance(act, nn.Identity):
            raise PlacementError(f"site {path!r} of kind 'conv_bn' applies {type(act).__name__} after normalising")

    def check_fold_target(self, module: nn.Module, target: nn.Module | None, path: str) -> None:
        ok = (isinstance(target, nn.Conv2d) and target.groups == 1
              and target.out_channels == getattr(module, "num_features", None))
        if not ok:
            raise PlacementError(f"site {path!r} of kind 'conv_bn' needs 'fold_into' naming the ungrouped nn.Conv2d "
                                 "that feeds it")

    def features(self, module: nn.Module) -> int:
        return module.num_features

    def channel_dim(self, module: nn.Module) -> int:
        return 1

    def weight_and_bias(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return fold_target(module).weight, module.bias

    def tensors_to_keep(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"conv_weight": fold_target(module).weight, "bn_bias": module.bias}

    def fold_plan(
        self, module: nn.Module, originals: dict[str, torch.Tensor], delta_matrix: torch.Tensor
    ) -> list[FoldedTensor]:
        conv = fold_target(module)
        w0, beta0 = originals["conv_weight"], originals["bn_bias"]
        # float64: dividing by small BN scales must not cost precision in the fp32 result.
        k = module.weight.double() / torch.sqrt(module.running_var.double() + module.eps)
        if float(k.abs().min()) <= torch.finfo(w0.dtype).eps * float(k.abs().max()):
            raise RAdapterError("a BatchNorm channel with (near-)zero scale cannot absorb an adapter: cannot merge")
        conv_bias = conv.bias.double() if conv.bias is not None else 0.0
        c = beta0.double() + k * (conv_bias - module.running_mean.double())
        m = delta_matrix.double()
        w = w0.reshape(w0.shape[0], -1).double()
        dw = (m @ (k[:, None] * w)) / k[:, None]
        return [FoldedTensor(conv.weight, w0, dw.reshape(w0.shape).to(w0.dtype)),
                FoldedTensor(module.bias, beta0, (m @ c).to(beta0.dtype))]


SITE_KINDS: dict[str, SiteKind] = {
    k.name: k for k in (LinearSite(), MultiheadAttentionSite(), Conv1x1Site(), ConvBatchNormSite())
}


def register_site_kind(kind: SiteKind) -> None:
    """Make a new kind of site available to placement specs (e.g. a new normalisation layer)."""
    SITE_KINDS[kind.name] = kind


def get_site_kind(name: str) -> SiteKind:
    try:
        return SITE_KINDS[name]
    except KeyError:
        raise PlacementError(f"unknown site kind {name!r}; known: {sorted(SITE_KINDS)}") from None
