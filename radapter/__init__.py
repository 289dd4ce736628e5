"""radapter: robust, parameter-efficient fine-tuning of CLIP models (R-Adapter, DRM).

Every public name loads on first use (``lazy_loader``), so ``import radapter`` and the
command lines' ``--help`` do not pay for torch and open_clip until they are needed.
"""

import lazy_loader as _lazy

__version__ = "0.1.0"

# Submodules load on first attribute access too (``radapter.adapters.merge`` without an import), as they did
# when the package imported them all; __all__ lists the public names only.
_SUBMODULES = [
    "adapters", "atomic", "cli", "cpu_memory", "data", "demo", "drm", "errors", "evaluation", "losses", "models",
]
__getattr__, __dir__, __all__ = _lazy.attach(__name__, _SUBMODULES, submod_attrs={
    "adapters.adapter": ["Adapter"],
    "adapters.adapter_sets": ["delete_adapter", "merge_and_unload", "set_adapter", "unload"],
    "adapters.checkpoint": ["adapter_file_info", "load_adapters", "save_adapters"],
    "adapters.config": ["RAdapterConfig"],
    "adapters.ema": ["update_ema"],
    "adapters.export": ["export_merged"],
    "adapters.fingerprint": ["compute_fingerprint"],
    "adapters.frozen_layers": ["lean_frozen_layers"],
    "adapters.inject": [
        "DEFAULT_ADAPTER", "active_adapter", "adapter_config", "adapter_parameters", "add_adapters",
        "base_fingerprint", "has_adapters", "iter_adapters", "list_adapters", "trainable_summary",
    ],
    "adapters.merge": [
        "interpolate_weights", "merge_adapters", "merge_targets", "merged_alpha", "merged_alphas",
        "release_merge_cache", "unmerge_adapters",
    ],
    "adapters.placement": ["PlacementSpec", "list_placements", "register_placement", "site_weights"],
    "adapters.sites": ["register_site_kind"],
    "cpu_memory": ["add_keep_freed_memory_option", "keep_freed_memory"],
    "errors": ["CheckpointError", "ModelLoadError", "PlacementError", "RAdapterError", "first_line"],
    "evaluation.zero_shot": ["OPENAI_TEMPLATES", "SIMPLE_TEMPLATES", "ZeroShotHead", "zero_shot_classifier"],
    "losses": ["clip_loss", "cross_entropy", "mpm_nce_loss"],
    "models.registry": ["DEFAULT_MODEL", "TINY_MODEL", "list_models", "load_model", "register_model"],
    "models.text_padding": ["trim_text_padding"],
})
__all__ = [name for name in __all__ if name not in _SUBMODULES]
