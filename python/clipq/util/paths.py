"""Where things are: the checkout clipq runs from (its prototxt/ and solvers/), and where clipq keeps what
outlives a checkout (the Caffe build, datasets and trained models)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]  # python/clipq/util/paths.py -> the checkout


def cache_root() -> Path:
    """$CLIPQ_CACHE, else $XDG_CACHE_HOME/clipq, else ~/.cache/clipq (same rule as tools/lib.sh)."""
    if os.environ.get("CLIPQ_CACHE"):
        return Path(os.environ["CLIPQ_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "clipq"


def data_dir() -> Path:
    """Datasets converted to LMDB (`make data`)."""
    return cache_root() / "data"


def models_dir() -> Path:
    """Trained caffemodels (`make baseline`)."""
    return cache_root() / "models"
