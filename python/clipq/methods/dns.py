"""Dynamic Network Surgery (Guo, Yao & Chen, NIPS 2016): the mask rule, as in the authors' Caffe layers, and
the method that runs it in Caffe (`Surgery`, whose layer kind is Surgery in layers/clipq_layers.py).

A layer keeps full-precision weights W and a binary mask T; the forward pass uses W * T and every weight
(masked or not) gets the gradient, so a pruned weight can be *spliced* back. At the start of training the
mean mu and standard deviation sigma of |W| are taken; with the threshold t = max(mu + c_rate * sigma, 0),
a surgery step sets T to 0 where |w| <= 0.9 t and to 1 where |w| > 1.1 t (the band in between keeps its
mask, which stops weights from flapping). A step happens at a training iteration with probability
(1 + gamma * iter) ** -power while iter < iter_stop. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clipq.methods.base import (
    STORE_BITS,
    Blobs,
    LayerRole,
    OperatingPoint,
    Phase,
    Trial,
    Unquantized,
    kept_plan,
    own,
    published,
    scaled,
)
from clipq.methods.registry import METHODS

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
    """The c_rate whose first surgery step keeps `keep` of these weights: the mask starts all ones and the
    step cuts |w| <= 0.9 t, so 0.9 t goes at the keep-quantile (t itself there kept 1.4-2.7x the share in the
    LeNets' layers). How clipq places a DNS operating point at a chosen sparsity; the final sparsity moves
    with training and is measured."""
    mu, sigma = magnitude_statistics(w)
    t = float(np.quantile(np.abs(np.asarray(w, np.float64)), 1.0 - keep)) / LOW
    return (t - mu) / sigma if sigma > 0 else 0.0


# The published LeNet settings (by the prototxt's `name:`), Tables 1-2 of the paper: kept fraction per layer.
PAPER_KEEP = {
    "LeNet5": {"conv1": 0.142, "conv2": 0.031, "ip1": 0.007, "ip2": 0.043},
    "LeNet300_100": {"ip1": 0.018, "ip2": 0.018, "ip3": 0.055},
}


@METHODS.register
@dataclass
class Surgery(Unquantized):
    """Dynamic Network Surgery: c_rate per layer; surgery until `iter_stop` (an iteration of its phase). In
    `clipq compare` it runs at CLIP-Q's sizes with its paper's kept fractions scaled by one factor, each turned
    into a c_rate on the baseline weights, and surgery for the first STOPS[i] of the iterations (one trial each;
    the reference's LeNet-5 ip1 stops at 14,000 of its training's iterations)."""

    NAME = "dns"
    LABEL = "Dynamic Network Surgery"
    LAYER_KINDS = ("Surgery",)
    STOPS = (0.5, 0.9)

    c_rates: dict[str, float] = field(default_factory=dict)
    iter_stop: int = 0
    seed: int = 0

    def layers(self):
        return list(self.c_rates)

    def phases(self):
        roles = {n: LayerRole("Surgery", {"c_rate": float(c), "iter_stop": int(self.iter_stop),
                                          "gamma": GAMMA, "power": POWER, "seed": self.seed + i},
                              state_blobs=2) for i, (n, c) in enumerate(self.c_rates.items())}

        def start(blobs: Blobs) -> Blobs:
            out = {}
            for n, b in blobs.items():
                mu, sigma = magnitude_statistics(b[0])
                out[n] = own(b, self.bias[n]) + [np.ones(b[0].shape, np.float32),
                                                 np.array([0, mu, sigma], np.float32)]
            return out

        return [Phase("surgery", 1.0, roles, start)]

    def pruned_weights(self, blobs):
        return {n: blobs[n][0] * blobs[n][-2] for n in self.c_rates}

    @classmethod
    def operating_points(cls, place):
        shape = published(place, PAPER_KEEP, {n: 1 - lp.p for n, lp in place.clipq_plans[-1].items()})
        stops = [place.options[cls.NAME]["stop"]] if "stop" in place.options.get(cls.NAME, {}) else cls.STOPS
        points = []
        for slot, tag, target, _ in place.targets():
            factor = place.bisect(lambda f: kept_plan(scaled(shape, f), STORE_BITS), target, 1e-3,
                                  1 / min(shape.values()))
            keep = scaled(shape, factor)
            rates = {n: round(c_rate_for(place.weights[n], k), 4) for n, k in keep.items()}
            label = f"{tag}: keep " + " ".join(f"{n} {k:.3f}" for n, k in keep.items())
            points.append(OperatingPoint(slot, tuple(
                Trial(f"{label}, surgery until {share:g} of the iterations",
                      lambda r=rates, stop=round(share * place.iterations): cls(
                          cls.NAME, {"c_rates": r, "iter_stop": stop, "seed": place.seed},
                          c_rates=r, iter_stop=stop, seed=place.seed))
                for share in stops)))
        return points
