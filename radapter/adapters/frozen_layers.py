"""Leaner autograd through frozen layers: what their backward does not need is not kept.

Training adapters backpropagates through a frozen network. PyTorch's stock layers keep
what a trainable layer needs: a convolution keeps its input (for the weight gradient), an
eval-mode BatchNorm keeps its input, and a frozen attention in-projection on a transposed
input takes a slow batched-matmul path (matmul only folds a non-contiguous input when the
weight needs a gradient). :func:`lean_frozen_layers` patches those layers, per module, to

- ``nn.Conv2d`` with a frozen weight: keep only the weight; the input gradient is the same
  ``convolution_backward`` call autograd would make;
- eval-mode ``nn.BatchNorm2d`` (and timm's ``BatchNormAct2d``) with frozen affine tensors: the
  per-channel affine map ``x * a + c``, which keeps only ``a``;
- batch-first ``nn.MultiheadAttention`` with a frozen in-projection: the input is laid out so
  the module's internal transpose is contiguous, which takes the fused ``addmm`` path.

Every patch applies only while autograd records through the layer (grad enabled, input
requiring grad, the layer's own tensors frozen and, for BatchNorm, eval mode); otherwise the
original forward runs, so inference and full fine-tuning are bit-for-bit unchanged. Training
outputs agree with the stock layers to float rounding (the BatchNorm affine is computed in a
different order).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

_PATCHED = "_radapter_lean"


class _FrozenConv2d(torch.autograd.Function):
    """``conv2d`` whose backward needs only the weight (the input needs a gradient, the weight none)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        # The kernel lays its input out as it laid out the output (channels-last for a
        # channels-last weight, say); a placeholder in another layout would be copied.
        layout = torch.channels_last if not y.is_contiguous() and y.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format
        ctx.conv = (x.shape, layout, stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, layout, stride, padding, dilation, groups = ctx.conv
        placeholder = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=layout)
        # Under autocast the forward ran in the gradient's dtype; backward runs outside it.
        grad_x = torch.ops.aten.convolution_backward(
            grad, placeholder, weight.to(grad.dtype), None, stride, padding, dilation, False, [0, 0], groups,
            (True, False, False))[0]
        return grad_x, None, None, None, None, None, None


def _records(x: torch.Tensor, *frozen: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and x.requires_grad and not any(t is not None and t.requires_grad for t in frozen)


# Set per module as ``functools.partial(fn, module)``: unlike a bound method of a module-level
# function, a partial pickles, and pickle and copy.deepcopy bind it to the copy.
def _lean_conv_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if not _records(x, conv.weight, conv.bias):
        return type(conv).forward(conv, x)
    return _FrozenConv2d.apply(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _frozen_affine(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps) * bn.weight
        shift = bn.bias - bn.running_mean * scale
    # addcmul keeps ``scale`` (no gradient needed for it), not ``x``.
    return torch.addcmul(shift.view(1, -1, 1, 1).to(x.dtype), x, scale.view(1, -1, 1, 1).to(x.dtype))


def _lean_bn_forward(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    if bn.training or x.dim() != 4 or not _records(x, bn.weight, bn.bias):
        return type(bn).forward(bn, x)
    y = _frozen_affine(bn, x)
    if hasattr(bn, "act"):  # timm's BatchNormAct2d: normalise, dropout, activation
        y = bn.act(bn.drop(y))
    return y


def _attention_pre_hook(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple | None:
    if not args or not _records(args[0], mha.in_proj_weight, mha.in_proj_bias):
        return None
    query = args[0]
    if query.dim() != 3 or not all(a is query for a in args[1:3]):
        return None
    # (B, L, E) backed by (L, B, E) memory: the module's transpose(1, 0) is then contiguous.
    laid_out = query.transpose(0, 1).contiguous().transpose(0, 1)
    return (laid_out, laid_out, laid_out, *args[3:]), kwargs


def _bn_supported(module: nn.Module) -> bool:
    return (isinstance(module, nn.BatchNorm2d) and module.affine and module.track_running_stats
            and (type(module) is nn.BatchNorm2d or type(module).__name__ == "BatchNormAct2d"))


def lean_frozen_layers(model: nn.Module) -> int:
    """Patch ``model``'s convolutions, BatchNorms and attention modules as described above.

    Idempotent; returns how many modules were patched now. The patches check at every call
    whether they apply, so unfreezing a layer later simply turns its patch off. Opt-in:
    ``add_adapters`` does not call it; ``python -m train`` does for every PEFT method. A
    patched model still deep-copies, pickles and moves between devices.
    """
    patched = 0
    for module in model.modules():
        if getattr(module, _PATCHED, False):
            continue
        if type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            module.forward = functools.partial(_lean_conv_forward, module)
        elif _bn_supported(module):
            module.forward = functools.partial(_lean_bn_forward, module)
        elif isinstance(module, nn.MultiheadAttention) and module.batch_first and module.in_proj_weight is not None:
            module.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)
        else:
            continue
        setattr(module, _PATCHED, True)
        patched += 1
    return patched
