"""Learning-Compression pruning, constraint form (Carreira-Perpinan & Idelbayev, CVPR 2018), and the method
that runs it in Caffe (`LearningCompression`, whose layer kind is LC in layers/clipq_layers.py).

min L(w) s.t. w has at most kappa non-zero weights *over the whole net*, by the augmented Lagrangian:
- L step: SGD on L(w) + mu/2 ||w - theta - lambda/mu||^2, whose extra gradient is mu (w - theta) - lambda
  (the clipq LC layers add it to each weight's gradient inside `caffe train`);
- C step: theta = the kappa largest-magnitude entries of w - lambda/mu (all layers together; the rest 0),
  then lambda <- lambda - mu (w - theta);
- mu grows geometrically, mu_k = mu_0 * a**k. The model is the final theta.
The per-layer pruning rates are not chosen: they emerge from the global budget. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from clipq.methods.base import STORE_BITS, Blobs, LayerRole, Method, OperatingPoint, Phase, kept_plan, own, stored_at
from clipq.methods.registry import METHODS


def mu_at(step: int, mu0: float, growth: float) -> float:
    """mu_k = mu_0 * a**k."""
    return float(mu0 * growth ** step)


def penalty_gradient(w: np.ndarray, theta: np.ndarray, lam: np.ndarray, mu: float) -> np.ndarray:
    """Gradient of mu/2 ||w - theta - lambda/mu||^2 with respect to w."""
    return (mu * (np.asarray(w, np.float64) - theta) - lam).astype(np.float32)


def top_kappa(vectors: dict[str, np.ndarray], kappa: int) -> dict[str, np.ndarray]:
    """The C step's projection: keep the kappa largest |v| over all arrays together (ties: earlier array,
    then earlier position, kept first), zero the rest."""
    names = list(vectors)
    flat = np.concatenate([np.asarray(vectors[n], np.float32).ravel() for n in names])
    if not 0 <= kappa <= flat.size:
        raise ValueError(f"kappa must be in 0..{flat.size} (the weights of the layers), got {kappa}")
    order = np.argsort(-np.abs(flat), kind="stable")
    keep = np.zeros(flat.size, bool)
    keep[order[:kappa]] = True
    out, start = {}, 0
    for n in names:
        size = np.size(vectors[n])
        out[n] = np.where(keep[start:start + size], flat[start:start + size], 0).reshape(np.shape(vectors[n]))
        start += size
    return out


def c_step(weights: dict[str, np.ndarray], lams: dict[str, np.ndarray], mu: float,
           kappa: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(theta, updated lambda) from the L step's weights."""
    shifted = {n: np.asarray(weights[n], np.float64) - lams[n] / mu for n in weights}
    theta = top_kappa(shifted, kappa)
    new_lams = {n: (lams[n] - mu * (np.asarray(weights[n], np.float64) - theta[n])).astype(np.float32)
                for n in weights}
    return {n: t.astype(np.float32) for n, t in theta.items()}, new_lams


def global_kept(blobs: dict[str, np.ndarray], kappa: int) -> dict[str, float]:
    """Per-layer kept fractions of the kappa largest |w| over all layers (LC's budget, at its start)."""
    flat = np.sort(np.concatenate([np.abs(b).ravel() for b in blobs.values()]))[::-1]
    t = flat[max(kappa - 1, 0)]
    return {n: float(np.mean(np.abs(b) >= t)) for n, b in blobs.items()}


@METHODS.register
@dataclass
class LearningCompression(Method):
    """LC pruning with a budget of kappa non-zero weights over `names`: `steps` L steps, mu_k = mu0 a^k. In
    `clipq compare` it runs at CLIP-Q's sizes with the global kappa chosen by size, STEPS L steps and the mu
    schedule MU0 * GROWTH**k (by the last L step mu ~ 30, large enough that w ends near theta: a first run
    with 0.05 * 2**k, last mu 0.8, left w far from theta and its projection lost 20+ points)."""

    NAME = "lc"
    LABEL = "LC pruning"
    LAYER_KINDS = ("LC",)
    STEPS, MU0, GROWTH = 5, 0.5, 2.8

    names: list[str] = field(default_factory=list)
    kappa: int = 0
    steps: int = 5
    mu0: float = 1e-3
    growth: float = 2.0

    def layers(self):
        return list(self.names)

    def mu(self, step: int) -> float:
        return mu_at(step, self.mu0, self.growth)

    def phases(self):
        def first(blobs: Blobs) -> Blobs:  # direct compression: theta = top-kappa of w, lambda = 0
            theta = top_kappa({n: b[0] for n, b in blobs.items()}, self.kappa)
            return {n: own(b, self.bias[n]) + [theta[n], np.zeros(b[0].shape, np.float32)] for n, b in blobs.items()}

        def after(step: int) -> Callable[[Blobs], Blobs]:
            def c_step(blobs: Blobs) -> Blobs:
                theta, lams = self.c_step(blobs, step - 1)
                return {n: own(b, self.bias[n]) + [theta[n], lams[n]] for n, b in blobs.items()}
            return c_step

        return [Phase(f"L{k}", 1.0 / self.steps,
                      {n: LayerRole("LC", {"mu": self.mu(k)}, state_blobs=2) for n in self.names},
                      first if k == 0 else after(k)) for k in range(self.steps)]

    def c_step(self, blobs: Blobs, step: int) -> tuple[dict, dict]:
        """The C step after L step `step` (its mu): theta and the updated multipliers."""
        return c_step({n: b[0] for n, b in blobs.items()}, {n: b[-1] for n, b in blobs.items()},
                      self.mu(step), self.kappa)

    def export(self, blobs):
        theta, _ = self.c_step(blobs, self.steps - 1)
        return {n: stored_at(theta[n]) for n in self.names}

    @classmethod
    def operating_points(cls, place):
        options = {"steps": cls.STEPS, "mu0": cls.MU0, "growth": cls.GROWTH, **place.options.get(cls.NAME, {})}
        n_all = sum(np.size(w) for w in place.weights.values())
        points = []
        for slot, tag, target, _ in place.targets():
            kappa = round(place.bisect(lambda k: kept_plan(global_kept(place.weights, max(1, round(k))), STORE_BITS),
                                       target, 1, n_all))
            lc = dict(kappa=kappa, **options)
            points.append(OperatingPoint(slot, f"{tag}: kappa {kappa:,} ({100 * kappa / n_all:.2f}%)",
                                         lambda lc=lc: cls(cls.NAME, lc, names=place.layers, **lc)))
        return points
