"""Fig. 3 of the paper for one layer: what the search evaluated, iteration by iteration."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipq.search.gp import B_DOMAIN, METRIC_LABELS, Evaluation, best
from clipq.util.figures import pyplot, save_png


def plot_layer(layer: str, history: list[Evaluation], path: Path, lam: float, metric: str = "error") -> None:
    """Fig. 3 of the paper for one layer: p, b before rounding and the objective per iteration, the
    chosen evaluation marked."""
    plt = pyplot()
    it = [e.iteration + 1 for e in history]
    chosen = best(history)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    panels = [([e.p for e in history], "pruning rate p", (0, 1), chosen.p),
              ([e.b_raw for e in history], "b before rounding", B_DOMAIN, chosen.b_raw),
              ([e.objective for e in history], f"{METRIC_LABELS[metric]} - {lam:g} x c", None, chosen.objective)]
    for ax, (values, label, ylim, mark) in zip(axes, panels):
        ax.plot(it, values, ".-", color="tab:blue", lw=0.8, label="evaluated")
        ax.plot([chosen.iteration + 1], [mark], "*", color="tab:red", ms=12, label="chosen")
        ax.set(xlabel="iteration", ylabel=label, ylim=ylim)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[2].plot(it, np.minimum.accumulate([e.objective for e in history]), "-", color="tab:orange",
                 label="best so far")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{layer}: chosen p = {chosen.p:.3f}, b = {chosen.bits} (iteration {chosen.iteration + 1}; "
                 f"{METRIC_LABELS[metric]} {chosen.error:.3g}, c = {chosen.benefit:.4f})", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
