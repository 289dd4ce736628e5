"""The R-Adapter: a residual, bias-free linear map ``y = x + s * A x``.

``A`` is a full ``d x d`` matrix or a low-rank product ``B @ A`` (``d x r`` times
``r x d``). It starts at zero so an adapted model starts as the pretrained one.
Adapter dropping and the EMA copy of the weights live here too, because both are
properties of one adapter's parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import RAdapterConfig


def _tokens_first(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., d) as a token-major view when that is free: a batch-first view of
    sequence-first memory (what ``nn.MultiheadAttention(batch_first=True)`` returns) is
    swapped back rather than copied."""
    if x.dim() == 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
        return x.transpose(0, 1)
    return x


class _FeatureMatmul(torch.autograd.Function):
    """``scale * (w @ x)`` over the feature axis of ``x``: the last axis, or axis 1 of a
    contiguous ``(N, C, L)`` tensor (``channel_first``), the result in the same layout.

    Backward keeps ``x``, ``w`` and ``scale`` and forms ``scale * w`` again (``d x d``,
    cheap) where stock autograd would keep that product. Channel-first inputs stay
    channel-first: moving channels last would hand the frozen layers below a channels-last
    gradient, which every conv, activation and norm backward of a CNN then copies back.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, channel_first: bool):
        ctx.save_for_backward(x, w, scale)
        ctx.channel_first = channel_first
        ws = w if scale is None else w * scale
        if channel_first:
            return torch.matmul(ws, x)
        if (t := _tokens_first(x)) is not x:
            return (t @ ws.t()).transpose(0, 1)
        return x @ ws.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, scale = ctx.saved_tensors
        ws = w if scale is None else w * scale
        # Under autocast the forward product ran in the gradient's dtype; backward runs outside
        # autocast, so cast as it did (autograd casts the gradients back to each input's dtype).
        x, ws = x.to(grad.dtype), ws.to(grad.dtype)
        grad_x = grad_w = grad_scale = outer = None
        want_outer = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        if ctx.channel_first:
            grad = grad.contiguous()
            if ctx.needs_input_grad[0]:
                grad_x = torch.matmul(ws.t(), grad)
            if want_outer:
                c, length = x.shape[1:]
                if c <= length:  # one (C, C) product per sample: smaller than channel-major copies
                    outer = torch.bmm(grad, x.transpose(1, 2)).sum(0)
                else:
                    outer = grad.transpose(0, 1).reshape(grad.shape[1], -1) @ x.transpose(0, 1).reshape(c, -1).t()
        else:
            # Work in the gradient's layout: a contiguous gradient times the matrix folds into one
            # matrix multiply, where a transposed one becomes a batched multiply over an expanded
            # copy of the matrix. ``x`` is copied once (for the outer product) if its layout differs.
            g = _tokens_first(grad)
            swapped = g is not grad
            t = x.transpose(0, 1) if swapped else x
            if ctx.needs_input_grad[0]:
                grad_x = g @ ws
                grad_x = grad_x.transpose(0, 1) if swapped else grad_x
            if want_outer:
                outer = g.reshape(-1, g.shape[-1]).t() @ t.reshape(-1, t.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = outer if scale is None else outer * scale
        if ctx.needs_input_grad[2]:
            grad_scale = (outer.float() * w.float()).sum().reshape(scale.shape)
        return grad_x, grad_w, grad_scale, None


class _AddRows(torch.autograd.Function):
    """``x`` with ``alpha * src`` added at ``rows`` along ``dim``, in ``x``'s layout.

    Keeps only ``rows`` for backward; autograd's own ``index_add`` keeps ``src`` as well (an
    activation-sized tensor, for its shape) and returns a contiguous result.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, rows: torch.Tensor, src: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.dim, ctx.alpha = dim, alpha
        out = x.clone()
        if torch.are_deterministic_algorithms_enabled():
            # CUDA's index_add_ adds with atomics, which deterministic mode refuses; rows are unique
            return out.index_copy_(dim, rows, x.index_select(dim, rows).add_(src, alpha=alpha))
        return out.index_add_(dim, rows, src, alpha=alpha)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        grad_src = grad.index_select(ctx.dim, rows) if ctx.needs_input_grad[3] else None
        if grad_src is not None and ctx.alpha != 1.0:
            grad_src.mul_(ctx.alpha)
        return grad, None, None, grad_src, None


@torch.no_grad()
def lerp_all(pairs: list[tuple[torch.Tensor, torch.Tensor]], weight: float) -> None:
    """``a <- a + weight * (b - a)`` for every ``(a, b)``, in one fused call."""
    targets = [a for a, _ in pairs]
    torch._foreach_lerp_(targets, [b for _, b in pairs], weight)
    # The merge cache keys on tensor versions; a foreach op under a dispatch mode (e.g. the
    # FLOP counter) leaves them as they were.
    torch.autograd.graph.increment_version(targets)


class Adapter(nn.Module):
    """Residual branch ``s * A(x)`` acting on the feature axis of ``x``.

    The module returns only the branch; the site hook adds it to the frozen output.
    In eval mode, the EMA copy (when kept) is used, so evaluation, saving and merging
    all see the temporal ensemble by default.
    """

    def __init__(self, features: int, config: RAdapterConfig) -> None:
        super().__init__()
        self.features = features
        self.config = config
        rank = config.rank
        self.low_rank = config.is_low_rank(features)
        if self.low_rank:
            # LoRA-style init: B = 0 keeps the product at zero while A gets gradients.
            self.lora_A = nn.Parameter(torch.empty(rank, features))
            self.lora_B = nn.Parameter(torch.zeros(features, rank))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            self.weight = nn.Parameter(torch.zeros(features, features))
        self.scale = nn.Parameter(torch.tensor(float(config.scale_init)), requires_grad=config.learn_scale)
        if config.ema_momentum is not None:
            for name, p in self.named_parameters(recurse=False):
                self.register_buffer(f"ema_{name}", p.detach().clone())
        # Set by add_adapters: where this adapter sits and how it folds.
        self.site_path = ""
        self.site_kind = "linear"
        self.tower = ""
        self._merge_cache = None  # radapter.adapters.merge's products for this adapter
        # A buffer, so a resumed run continues the EMA warm-up where it stopped.
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    @property
    def param_names(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B", "scale") if self.low_rank else ("weight", "scale")

    @property
    def has_ema(self) -> bool:
        return self.config.ema_momentum is not None

    def tensors(self, use_ema: bool | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors: live parameters, or the EMA copy.

        ``use_ema=None`` picks the EMA copy in eval mode (when kept), else the live one.
        """
        if use_ema is None:
            use_ema = not self.training
        use_ema = use_ema and self.has_ema
        return {n: getattr(self, f"ema_{n}" if use_ema else n) for n in self.param_names}

    def delta_matrix(self, use_ema: bool | None = None) -> torch.Tensor:
        """``s * A`` as a dense ``d x d`` matrix (fp32), the map folded into a layer."""
        t = {k: v.float() for k, v in self.tensors(use_ema).items()}
        a = t["lora_B"] @ t["lora_A"] if self.low_rank else t["weight"]
        return t["scale"] * a

    def forward(self, x: torch.Tensor, batch_dim: int = 0, channel_dim: int = -1) -> torch.Tensor:
        """The branch ``s * A x`` (zero for the samples or tokens adapter dropping drops)."""
        factor = None
        if self.training and self.config.drop_prob > 0:
            factor = self._drop_mask(x, batch_dim, channel_dim)
        return self._branch(x, batch_dim, channel_dim, factor)

    def add_to(self, x: torch.Tensor, batch_dim: int = 0, channel_dim: int = -1) -> torch.Tensor:
        """``x + self(x)``: a site's adapted output, with the same draw of adapter dropping.

        Per-sample dropping (``drop_mode="adapter"``) in training runs the product on the kept
        samples only and adds it back at their rows: the dropped samples' branch is zero, so
        the result and the gradients are those of ``x + self(x)`` for ``1 - p`` of the work.
        """
        if not (self.training and self.config.drop_prob > 0 and self.config.drop_mode == "adapter"):
            return x + self(x, batch_dim, channel_dim)
        keep = self._draw_keep(x, batch_dim, channel_dim)
        rows = keep.flatten().nonzero().flatten()
        # No rows kept still runs (an empty product): the parameters get a zero gradient, as with
        # the mask, so AdamW's momentum and DDP's gradient reduction see them every step.
        if rows.numel() == keep.numel():
            return x + self._branch(x, batch_dim, channel_dim, keep.to(x.device, non_blocking=True))
        rows = rows.to(x.device, non_blocking=True)
        branch = self._branch(x.index_select(batch_dim, rows), batch_dim, channel_dim, None)
        return _AddRows.apply(x, batch_dim, rows, branch, self._kept_factor)

    def _branch(self, x: torch.Tensor, batch_dim: int, channel_dim: int, mask: torch.Tensor | None) -> torch.Tensor:
        t = self.tensors()
        scale = t["scale"]
        # Nothing here keeps an activation-sized tensor that backward can do without: a learnt
        # scale goes into the matrix product, a fixed one and the drop mask into one small factor.
        learnt = scale if scale.requires_grad else None
        mats = [(t["lora_A"], None), (t["lora_B"], learnt)] if self.low_rank else [(t["weight"], learnt)]
        channel_dim %= x.dim()
        channel_first = channel_dim == 1 and batch_dim % x.dim() == 0 and x.dim() >= 3 and x.is_contiguous()
        if channel_first:
            h = x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
        else:
            h = x.movedim(channel_dim, -1) if channel_dim != x.dim() - 1 else x
        h = h.to(scale.dtype)
        for w, s in mats:
            h = _FeatureMatmul.apply(h, w, s, channel_first)
        if channel_first:
            h = h.reshape(*x.shape[:1], h.shape[1], *x.shape[2:])
        elif channel_dim != x.dim() - 1:
            h = h.movedim(-1, channel_dim)
        factor = None if scale.requires_grad else scale
        if mask is not None:
            factor = mask if factor is None else factor * mask
        if factor is not None:
            h = h * factor  # stock autograd keeps only ``factor`` here: ``h`` needs no gradient of it
        return h.to(x.dtype)

    @property
    def _kept_factor(self) -> float:
        return 1.0 / (1.0 - self.config.drop_prob) if self.config.drop_rescale else 1.0

    def _drop_mask(self, x: torch.Tensor, batch_dim: int, channel_dim: int) -> torch.Tensor:
        """The drop mask on ``x``'s device: 0 where dropped, the kept factor elsewhere."""
        # non_blocking: the GPU need not finish its queued work before a small host tensor goes up
        return self._draw_keep(x, batch_dim, channel_dim).to(x.device, non_blocking=True)

    def _draw_keep(self, x: torch.Tensor, batch_dim: int, channel_dim: int) -> torch.Tensor:
        p = self.config.drop_prob
        batch_dim %= x.dim()
        channel_dim %= x.dim()
        if self.config.drop_mode == "adapter":
            # One draw per sample: the whole adapter is on or off for that sample.
            shape = [x.shape[d] if d == batch_dim else 1 for d in range(x.dim())]
        else:
            # Authors' drop-path: one draw per token position, shared across the batch.
            shape = [1 if d in (batch_dim, channel_dim) else x.shape[d] for d in range(x.dim())]
        # Drawn on the CPU generator whatever the device: the same masks for the same seed on
        # CPU and GPU, and add_to reads the kept rows without waiting for the GPU.
        return torch.empty(shape, device="cpu").bernoulli_(1.0 - p) * self._kept_factor

    def ema_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(ema copy, live tensor)`` for every adapter tensor (empty without EMA)."""
        if not self.has_ema:
            return []
        return [(getattr(self, f"ema_{n}"), getattr(self, n).detach()) for n in self.param_names]

    @torch.no_grad()
    def update_ema(self, momentum: float) -> None:
        """``ema <- m * ema + (1 - m) * live`` for every adapter tensor."""
        pairs = self.ema_pairs()
        if pairs:
            lerp_all(pairs, 1.0 - momentum)
            self.ema_updates += 1

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set live and EMA tensors to the same values (loading a saved adapter)."""
        for n in self.param_names:
            getattr(self, n).copy_(tensors[n])
            if self.has_ema:
                getattr(self, f"ema_{n}").copy_(tensors[n])

    def extra_repr(self) -> str:
        kind = f"rank={self.config.rank}" if self.low_rank else "full-rank"
        return f"features={self.features}, {kind}, drop={self.config.drop_prob}/{self.config.drop_mode}"
