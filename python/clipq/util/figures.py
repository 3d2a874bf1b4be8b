"""Plots as PNG files: matplotlib without a screen, each figure written atomically and closed."""

from __future__ import annotations

import os
from pathlib import Path

from clipq.util.atomic import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib takes half a second to import

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 90) -> None:
    """Write `fig` to `path` as PNG (temp file, then rename) and close it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    pyplot().close(fig)
