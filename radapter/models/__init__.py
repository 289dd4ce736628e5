"""Models: the registry behind ``radapter.load_model``, the offline default model, and tiny configs."""

import lazy_loader as _lazy

# Submodules load on first attribute access too (``radapter.models.registry`` without an import), as they did
# when the package imported them all; __all__ lists the public names only.
_SUBMODULES = [
    "info", "offline", "registry", "text_padding",
]
__getattr__, __dir__, __all__ = _lazy.attach(__name__, _SUBMODULES, submod_attrs={
    "info": ["ModelInfo", "model_info"],
    "registry": ["DEFAULT_MODEL", "TINY_MODEL", "list_models", "load_model", "register_model"],
})
__all__ = [name for name in __all__ if name not in _SUBMODULES]
