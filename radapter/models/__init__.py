"""Models: the registry behind ``radapter.load_model``, the offline default model, and tiny configs."""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submod_attrs={
    "info": ["ModelInfo", "model_info"],
    "registry": ["DEFAULT_MODEL", "TINY_MODEL", "list_models", "load_model", "register_model"],
})
