"""Where candle_dist keeps what it builds once per machine (tiny CLIP weights, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$CANDLE_DIST_CACHE, else $XDG_CACHE_HOME/candle_dist, else ~/.cache/candle_dist."""
    if os.environ.get("CANDLE_DIST_CACHE"):
        return Path(os.environ["CANDLE_DIST_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "candle_dist"
