"""Models: the registry behind ``radapter.load_model``, the offline default model, and tiny configs."""

from .info import ModelInfo, model_info
from .registry import DEFAULT_MODEL, TINY_MODEL, list_models, load_model, register_model

__all__ = ["DEFAULT_MODEL", "TINY_MODEL", "ModelInfo", "list_models", "load_model", "model_info", "register_model"]
