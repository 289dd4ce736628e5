"""radapter: robust, parameter-efficient fine-tuning of CLIP models (R-Adapter, DRM)."""

from .adapter import Adapter
from .checkpoint import adapter_file_info, load_adapters, save_adapters
from .config import RAdapterConfig
from .cpu_memory import keep_freed_memory
from .ema import update_ema
from .errors import CheckpointError, ModelLoadError, PlacementError, RAdapterError
from .export import export_merged
from .fingerprint import compute_fingerprint
from .inject import adapter_parameters, add_adapters, iter_adapters, trainable_summary
from .losses import clip_loss, cross_entropy, mpm_nce_loss
from .merge import (
    interpolate_weights,
    merge_adapters,
    merged_alpha,
    release_merge_cache,
    unmerge_adapters,
)
from .models import DEFAULT_MODEL, TINY_MODEL, list_models, load_model, register_model
from .placement import PlacementSpec, list_placements, register_placement
from .sites import register_site_kind
from .zero_shot import OPENAI_TEMPLATES, SIMPLE_TEMPLATES, ZeroShotHead, zero_shot_classifier

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "OPENAI_TEMPLATES", "SIMPLE_TEMPLATES", "TINY_MODEL", "Adapter", "CheckpointError",
    "ModelLoadError",
    "PlacementError", "PlacementSpec", "RAdapterConfig", "RAdapterError", "ZeroShotHead", "adapter_file_info",
    "adapter_parameters", "add_adapters", "clip_loss", "compute_fingerprint", "cross_entropy", "export_merged",
    "interpolate_weights", "iter_adapters", "keep_freed_memory", "list_models", "list_placements", "load_adapters",
    "load_model",
    "merge_adapters", "merged_alpha", "mpm_nce_loss", "register_model", "register_placement",
    "register_site_kind", "release_merge_cache", "save_adapters", "trainable_summary", "unmerge_adapters",
    "update_ema", "zero_shot_classifier",
]
