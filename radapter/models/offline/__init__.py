"""The offline default model: EfficientNet-Lite0 (ImageNet) + MiniLM, joined by an ImageNet bridge,
then aligned LiT-style on clip art (:mod:`.align`).

Not OpenAI CLIP: a weak but real zero-shot image-text model assembled from towers that
ship on PyPI, so the library, tests and demo work with no network. Load it with
``radapter.load_model()``; see ``docs/offline_model.md`` for what it is and its limits.
"""

from .build import BRIDGE_NAME, LIT_NAME, NAME, build_offline_model

__all__ = ["BRIDGE_NAME", "LIT_NAME", "NAME", "build_offline_model"]
