"""Deep Compression (Han, Mao & Dally, ICLR 2016): magnitude pruning, then weight sharing, and the method
that runs them in Caffe (a `PruneThenShare`).

1. *Pruning*: a layer keeps its `round(keep * n)` largest-magnitude weights (ties by position in Caffe's
   blob order, the earlier one pruned first) and retrains with that mask fixed.
2. *Weight sharing*: k-means on the surviving weights with `2**bits - 1` clusters (the `.clipq` codebook;
   code 0 is the pruned weight), centroids initialised linearly between the kept weights' min and max
   (the paper's best initialisation), then fine-tuning of the centroids, where a centroid's gradient is
   the **sum** of its members' gradients (the paper's eq. 3).
Pure numpy; the Caffe layers that apply them (Masked, Shared) are in layers/clipq_layers.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipq.methods.base import OperatingPoint, PruneThenShare, kept_plan, plan_label, published, scaled
from clipq.methods.registry import METHODS
from clipq.quant.partition import pruned_count

KMEANS_ITERATIONS = 30


def magnitude_mask(w: np.ndarray, keep: float) -> np.ndarray:
    """True for the round(keep * n) largest |w| (same shape as w)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep fraction must be in (0, 1], got {keep}")
    flat = np.asarray(w, np.float32).ravel()
    pruned = pruned_count(1.0 - keep, flat.size)
    order = np.argsort(np.abs(flat), kind="stable")
    mask = np.ones(flat.size, bool)
    mask[order[:pruned]] = False
    return mask.reshape(np.shape(w))


def linear_centroids(values: np.ndarray, levels: int) -> np.ndarray:
    """`levels` centroids spaced evenly between min and max of `values` (Deep Compression's linear init)."""
    if values.size == 0:
        return np.zeros(levels, np.float64)
    return np.linspace(float(values.min()), float(values.max()), levels)


def nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (centroids ascending; ties to the lower one)."""
    edges = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(edges, values, side="left")


def kmeans(values: np.ndarray, levels: int, iterations: int = KMEANS_ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """1-D Lloyd's k-means from the linear initialisation: (centroids float64 ascending, member index).
    An empty cluster keeps its centroid."""
    values = np.asarray(values, np.float64).ravel()
    centroids = linear_centroids(values, levels)
    members = nearest(values, centroids)
    for _ in range(iterations):
        counts = np.bincount(members, minlength=levels)
        sums = np.bincount(members, weights=values, minlength=levels)
        moved = centroids.copy()
        moved[counts > 0] = sums[counts > 0] / counts[counts > 0]
        moved.sort()  # 1-D Lloyd keeps the order; sort guards against float ties
        again = nearest(values, moved)
        done = np.array_equal(again, members) and np.allclose(moved, centroids)
        centroids, members = moved, again
        if done:
            break
    return centroids, members


def share_weights(w: np.ndarray, mask: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 of w's shape, codebook float32 (2**bits - 1,)): k-means of the kept weights;
    code 0 = pruned, j = codebook[j - 1]."""
    levels = 2 ** bits - 1
    flat, keep = np.asarray(w, np.float32).ravel(), np.asarray(mask, bool).ravel()
    centroids, members = kmeans(flat[keep], levels)
    codes = np.zeros(flat.size, np.uint8)
    codes[keep] = members + 1
    return codes.reshape(np.shape(w)), centroids.astype(np.float32)


def centroid_gradient(grad: np.ndarray, codes: np.ndarray, levels: int) -> np.ndarray:
    """Each centroid's gradient: the sum of its members' weight gradients (pruned weights have none)."""
    flat_codes = np.asarray(codes).ravel().astype(np.int64)
    kept = flat_codes > 0
    return np.bincount(flat_codes[kept] - 1, weights=np.asarray(grad, np.float64).ravel()[kept],
                       minlength=levels)[:levels].astype(np.float32)


# The published LeNet settings (by the prototxt's `name:`), Tables 1-2 of the paper: kept fraction, bits.
PAPER_SETTINGS = {
    "LeNet5": {"conv1": (0.66, 8), "conv2": (0.12, 8), "ip1": (0.08, 5), "ip2": (0.19, 5)},
    "LeNet300_100": {"ip1": (0.08, 6), "ip2": (0.09, 6), "ip3": (0.26, 6)},
}


@METHODS.register
@dataclass
class DeepCompression(PruneThenShare):
    """Deep Compression: magnitude mask, k-means codebook. In `clipq compare` it runs at its paper's LeNet
    setting as published, and at CLIP-Q's sizes with the paper's kept fractions scaled by one factor."""

    NAME = "deep-compression"
    LABEL = "Deep Compression"

    def mask(self, name, w):
        return magnitude_mask(w, 1.0 - self.plan[name].p)

    def share(self, name, w, mask):
        return share_weights(w, mask, self.plan[name].bits)

    @classmethod
    def operating_points(cls, place):
        # (kept fraction, bits) per layer: the paper's for its LeNets, else CLIP-Q's smallest plan's
        shape = published(place, PAPER_SETTINGS, {n: (1 - lp.p, lp.bits) for n, lp in place.clipq_plans[-1].items()})
        keep, bits = {n: k for n, (k, _) in shape.items()}, {n: b for n, (_, b) in shape.items()}
        points = []
        if place.net in PAPER_SETTINGS:
            paper = kept_plan(keep, bits)
            points.append(OperatingPoint("paper setting", f"paper setting: {plan_label(paper)}",
                                         lambda p=paper: cls(cls.NAME, {"plan": plan_label(p)}, plan=p)))
        for slot, tag, target, _ in place.targets():
            factor = place.bisect(lambda f: kept_plan(scaled(keep, f), bits), target, 1e-3, 1 / min(keep.values()))
            plan = kept_plan(scaled(keep, factor), bits)
            points.append(OperatingPoint(slot, f"{tag}: {plan_label(plan)}",
                                         lambda p=plan: cls(cls.NAME, {"plan": plan_label(p)}, plan=p)))
        return points
