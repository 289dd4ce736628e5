"""radapter: robust, parameter-efficient fine-tuning of CLIP models (R-Adapter, DRM)."""

from .adapters.adapter import Adapter
from .adapters.adapter_sets import delete_adapter, merge_and_unload, set_adapter, unload
from .adapters.checkpoint import adapter_file_info, load_adapters, save_adapters
from .adapters.config import RAdapterConfig
from .adapters.ema import update_ema
from .adapters.export import export_merged
from .adapters.fingerprint import compute_fingerprint
from .adapters.frozen_layers import lean_frozen_layers
from .adapters.inject import (
    DEFAULT_ADAPTER,
    active_adapter,
    adapter_config,
    adapter_parameters,
    add_adapters,
    base_fingerprint,
    has_adapters,
    iter_adapters,
    list_adapters,
    trainable_summary,
)
from .adapters.merge import (
    interpolate_weights,
    merge_adapters,
    merge_targets,
    merged_alpha,
    merged_alphas,
    release_merge_cache,
    unmerge_adapters,
)
from .adapters.placement import PlacementSpec, list_placements, register_placement, site_weights
from .adapters.sites import register_site_kind
from .cpu_memory import keep_freed_memory
from .errors import CheckpointError, ModelLoadError, PlacementError, RAdapterError
from .evaluation.zero_shot import OPENAI_TEMPLATES, SIMPLE_TEMPLATES, ZeroShotHead, zero_shot_classifier
from .losses import clip_loss, cross_entropy, mpm_nce_loss
from .models.registry import DEFAULT_MODEL, TINY_MODEL, list_models, load_model, register_model
from .models.text_padding import trim_text_padding

__version__ = "0.1.0"

__all__ = [
    "Adapter", "CheckpointError", "DEFAULT_ADAPTER", "DEFAULT_MODEL", "ModelLoadError", "OPENAI_TEMPLATES",
    "PlacementError", "PlacementSpec", "RAdapterConfig", "RAdapterError", "SIMPLE_TEMPLATES", "TINY_MODEL",
    "ZeroShotHead", "active_adapter", "adapter_config", "adapter_file_info", "adapter_parameters", "add_adapters",
    "base_fingerprint", "clip_loss", "compute_fingerprint", "cross_entropy", "delete_adapter", "export_merged",
    "has_adapters", "interpolate_weights", "iter_adapters", "keep_freed_memory", "lean_frozen_layers",
    "list_adapters", "list_models", "list_placements", "load_adapters", "load_model", "merge_adapters",
    "merge_and_unload", "merge_targets", "merged_alpha", "merged_alphas", "mpm_nce_loss", "register_model",
    "register_placement", "register_site_kind", "release_merge_cache", "save_adapters", "set_adapter",
    "site_weights", "trainable_summary", "trim_text_padding", "unload", "unmerge_adapters", "update_ema",
    "zero_shot_classifier",
]
