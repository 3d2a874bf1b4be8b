"""Deep Compression (Han, Mao & Dally, ICLR 2016): magnitude pruning, then weight sharing, and the method
that runs them in Caffe (a `PruneThenShare`).

1. *Pruning*: a layer keeps its `round(keep * n)` largest-magnitude weights (ties by position in Caffe's
   blob order, the earlier one pruned first) and retrains with that mask fixed.
2. *Weight sharing*: k-means on the surviving weights with `2**bits - 1` clusters (the `.clipq` codebook;
   code 0 is the pruned weight), centroids initialised linearly between the kept weights' min and max
   (the paper's best initialisation), then fine-tuning of the centroids, where a centroid's gradient is
   the **sum** of its members' gradients (the paper's eq. 3).
As its authors would run it in `clipq compare`: the pruning iterated (prune, retrain, prune further) and the
per-layer kept fractions and bits chosen by a sensitivity scan (`Sensitivity`: each layer alone pruned, then
shared, on held-out images, without retraining) as well as the paper's LeNet setting.
Pure numpy; the Caffe layers that apply them (Masked, Shared) are in layers/clipq_layers.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from clipq.methods.base import (
    OperatingPoint,
    Plan,
    PruneThenShare,
    Trial,
    kept_plan,
    lr_variant,
    plan_label,
    published,
    scaled,
    shared,
)
from clipq.methods.registry import METHODS
from clipq.quant.partition import pruned_count

KMEANS_ITERATIONS = 30
KEEP_GRID = tuple(float(k) for k in np.geomspace(1.0, 0.004, 25))  # the scan's kept fractions
CONV_BITS, FC_BITS = (4, 5, 6, 7, 8), (3, 4, 5, 6)                 # the scan's bits (the paper's ranges)
ROUNDS = (1, 3)                                                     # pruning rounds tried in `clipq compare`


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


def bit_range(w: np.ndarray) -> tuple[int, ...]:
    """Bits the scan may give a layer: 4-8 for a convolution (4-D weights), 3-6 for a fully-connected one."""
    return CONV_BITS if np.ndim(w) == 4 else FC_BITS


@dataclass
class Sensitivity:
    """Han et al.'s sensitivity analysis: the loss in top-1 points (on held-out images, no retraining) with one
    layer at a time pruned to each kept fraction of KEEP_GRID, then shared at each of its bits; a tolerance
    gives each layer the smallest kept fraction and the fewest bits that lose at most that much.
    `error_of(replaced weights) -> top-1 error %` is the measurement (memoised here)."""

    weights: dict[str, np.ndarray]
    error_of: Callable[[dict[str, np.ndarray]], float]
    grid: tuple[float, ...] = KEEP_GRID
    pruned: dict[str, list[float]] = field(init=False)
    _shared: dict[tuple[str, float, int], float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.base = self.error_of({})
        self.pruned = {n: [self.error_of({n: w * magnitude_mask(w, k)}) - self.base for k in self.grid]
                       for n, w in self.weights.items()}

    def keep(self, name: str, tolerance: float) -> float:
        """The smallest kept fraction of the grid that, with every larger one, loses at most `tolerance`."""
        chosen = self.grid[0]
        for k, loss in zip(self.grid, self.pruned[name]):
            if loss > tolerance:
                break
            chosen = k
        return chosen

    def shared_loss(self, name: str, keep: float, bits: int) -> float:
        key = (name, keep, bits)
        if key not in self._shared:
            w = self.weights[name]
            codes, codebook = share_weights(w, magnitude_mask(w, keep), bits)
            self._shared[key] = self.error_of({name: shared(codes, codebook)}) - self.base
        return self._shared[key]

    def bits(self, name: str, keep: float, tolerance: float) -> int:
        """The fewest bits of the layer's range losing at most `tolerance` at `keep` (its most if none does)."""
        options = bit_range(self.weights[name])
        return next((b for b in options if self.shared_loss(name, keep, b) <= tolerance), options[-1])

    def plan(self, tolerance: float) -> Plan:
        keep = {n: self.keep(n, tolerance) for n in self.weights}
        return kept_plan(keep, {n: self.bits(n, keep[n], tolerance) for n in keep})


# The published LeNet settings (by the prototxt's `name:`), Tables 1-2 of the paper: kept fraction, bits.
PAPER_SETTINGS = {
    "LeNet5": {"conv1": (0.66, 8), "conv2": (0.12, 8), "ip1": (0.08, 5), "ip2": (0.19, 5)},
    "LeNet300_100": {"ip1": (0.08, 6), "ip2": (0.09, 6), "ip3": (0.26, 6)},
}


@METHODS.register
@dataclass
class DeepCompression(PruneThenShare):
    """Deep Compression: magnitude mask, k-means codebook. In `clipq compare` it runs at its paper's LeNet
    setting as published, and at CLIP-Q's sizes with kept fractions scaled by one factor from two shapes (the
    paper's, and the sensitivity scan's at the tolerance whose plan is nearest the size, with the scan's bits),
    pruned in one round and in ROUNDS[-1] (`ordered`)."""

    NAME = "deep-compression"
    LABEL = "Deep Compression"

    def mask(self, name, w, p):
        return magnitude_mask(w, 1.0 - p)

    def share(self, name, w, mask):
        return share_weights(w, mask, self.plan[name].bits)

    @classmethod
    def operating_points(cls, place):
        # (kept fraction, bits) per layer: the paper's for its LeNets, else CLIP-Q's smallest plan's
        shape = published(place, PAPER_SETTINGS, {n: (1 - lp.p, lp.bits) for n, lp in place.clipq_plans[-1].items()})
        paper = ({n: k for n, (k, _) in shape.items()}, {n: b for n, (_, b) in shape.items()})
        scan = Sensitivity(place.weights, place.error_of) if place.error_of is not None else None
        points = []
        if place.net in PAPER_SETTINGS:
            setting = kept_plan(*paper)
            points.append(OperatingPoint("paper setting", tuple(cls.trial("paper setting", setting, r) for r in ROUNDS)))
        for slot, tag, target, _ in place.targets():
            shapes = [("paper's shape", *paper)]
            if scan is not None:
                tolerance = -place.bisect(lambda t: scan.plan(-t), target, -100.0, 0.0)
                chosen = scan.plan(tolerance)
                shapes.append((f"scan's shape (tolerance {tolerance:.2f} points)",
                               {n: 1 - lp.p for n, lp in chosen.items()}, {n: lp.bits for n, lp in chosen.items()}))
            trials = []
            for name, keep, bits in shapes:
                factor = place.bisect(lambda f: kept_plan(scaled(keep, f), bits), target, 1e-3, 1 / min(keep.values()))
                plan = kept_plan(scaled(keep, factor), bits)
                trials.append([cls.trial(f"{tag}, {name}", plan, rounds) for rounds in ROUNDS])
            points.append(OperatingPoint(slot, cls.ordered(trials)))
        return points

    @staticmethod
    def ordered(trials: list[list[Trial]]) -> tuple[Trial, ...]:
        """The paper's shape in one round and in ROUNDS[-1], the latter at twice the learning rate, then the
        scan's shape in ROUNDS[-1] (in `clipq compare`'s first four trials; the rest follow)."""
        paper = trials[0]
        if len(trials) == 1:
            return tuple(paper)
        scan = trials[1]
        return (paper[0], paper[-1], lr_variant(paper[-1], 2.0), scan[-1], *scan[:-1])

    @classmethod
    def trial(cls, label: str, plan: Plan, rounds: int) -> Trial:
        settings = {"plan": plan_label(plan), **({"rounds": rounds} if rounds > 1 else {})}
        return Trial(f"{label}: {plan_label(plan)}" + (f", {rounds} pruning rounds" if rounds > 1 else ""),
                     lambda: cls(cls.NAME, settings, plan=plan, rounds=rounds))
