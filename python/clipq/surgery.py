"""Dynamic Network Surgery's mask rule (Guo, Yao & Chen, NIPS 2016), as in the authors' Caffe layers.

A layer keeps full-precision weights W and a binary mask T; the forward pass uses W * T and every weight
(masked or not) gets the gradient, so a pruned weight can be *spliced* back. At the start of training the
mean mu and standard deviation sigma of |W| are taken; with the threshold t = max(mu + c_rate * sigma, 0),
a surgery step sets T to 0 where |w| <= 0.9 t and to 1 where |w| > 1.1 t (the band in between keeps its
mask, which stops weights from flapping). A step happens at a training iteration with probability
(1 + gamma * iter) ** -power while iter < iter_stop. Pure numpy.
"""

from __future__ import annotations

import numpy as np

GAMMA = 1e-4
POWER = 1.0
LOW, HIGH = 0.9, 1.1


def magnitude_statistics(w: np.ndarray) -> tuple[float, float]:
    """(mu, sigma) of |w|: taken once, from the weights training starts from."""
    a = np.abs(np.asarray(w, np.float64))
    return float(a.mean()), float(a.std())


def threshold(mu: float, sigma: float, c_rate: float) -> float:
    """t = max(mu + c_rate * sigma, 0)."""
    return max(mu + c_rate * sigma, 0.0)


def update_mask(w: np.ndarray, mask: np.ndarray, t: float) -> np.ndarray:
    """T -> 0 where |w| <= 0.9 t, T -> 1 where |w| > 1.1 t, unchanged in between (new array)."""
    a = np.abs(w)
    out = np.array(mask, copy=True)
    out[a <= LOW * t] = 0
    out[a > HIGH * t] = 1
    return out


def surgery_probability(iteration: int, gamma: float = GAMMA, power: float = POWER) -> float:
    """Probability of a surgery step at this training iteration."""
    return float((1.0 + gamma * iteration) ** -power)


def c_rate_for(w: np.ndarray, keep: float) -> float:
    """The c_rate whose threshold keeps about `keep` of these weights (|w| > t): how clipq places a DNS
    operating point at a chosen sparsity (the final sparsity moves with training; it is measured)."""
    mu, sigma = magnitude_statistics(w)
    t = float(np.quantile(np.abs(np.asarray(w, np.float64)), 1.0 - keep))
    return (t - mu) / sigma if sigma > 0 else 0.0
