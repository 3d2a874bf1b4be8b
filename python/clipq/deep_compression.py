"""Deep Compression's operators (Han, Mao & Dally, ICLR 2016): magnitude pruning, then weight sharing.

1. *Pruning*: a layer keeps its `round(keep * n)` largest-magnitude weights (ties by position in Caffe's
   blob order, the earlier one pruned first) and retrains with that mask fixed.
2. *Weight sharing*: k-means on the surviving weights with `2**bits - 1` clusters (the `.clipq` codebook;
   code 0 is the pruned weight), centroids initialised linearly between the kept weights' min and max
   (the paper's best initialisation), then fine-tuning of the centroids, where a centroid's gradient is
   the **sum** of its members' gradients (the paper's eq. 3).
Pure numpy; the Caffe layers that apply them are in layers/clipq_layers.py.
"""

from __future__ import annotations

import numpy as np

from clipq.prune_quant import pruned_count

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


def shared(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """The weights a codebook and codes stand for (0 where the code is 0)."""
    table = np.concatenate([[0.0], np.asarray(codebook, np.float32)]).astype(np.float32)
    return table[np.asarray(codes).astype(np.int64)]
