"""Distribution shifts applied to one input image for the OOD-inspection tab."""

from __future__ import annotations

import numpy as np

from .service import InputError

CORRUPTIONS = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "zoom_blur",
               "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate"]


def apply_corruption(image: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """An ImageNet-C corruption (``imagecorruptions-imaug``) of an (H, W, 3) uint8 image, seeded."""
    from imagecorruptions import corrupt

    if corruption not in CORRUPTIONS:
        raise InputError(f"Unknown corruption {corruption!r}.")
    if not 1 <= severity <= 5:
        raise InputError("Severity goes from 1 to 5.")
    if min(image.shape[:2]) < 32:
        raise InputError("The image must be at least 32 pixels on each side for corruptions.")
    state = np.random.get_state()
    np.random.seed(seed)  # imagecorruptions draws from numpy's global RNG
    try:
        out = corrupt(image, corruption_name=corruption, severity=severity)
    finally:
        np.random.set_state(state)
    return np.clip(out, 0, 255).astype(np.uint8)
