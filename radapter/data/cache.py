"""Where prepared benchmark data lives (outside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "RADAPTER_DATA"


def data_dir(override: str | Path | None = None) -> Path:
    """``override``, else ``$RADAPTER_DATA``, else ``$XDG_CACHE_HOME/radapter/data`` (``~/.cache/...``)."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "radapter" / "data"
