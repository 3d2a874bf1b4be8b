"""Learning-Compression pruning, constraint form (Carreira-Perpinan & Idelbayev, CVPR 2018).

min L(w) s.t. w has at most kappa non-zero weights *over the whole net*, by the augmented Lagrangian:
- L step: SGD on L(w) + mu/2 ||w - theta - lambda/mu||^2, whose extra gradient is mu (w - theta) - lambda
  (the clipq LC layers add it to each weight's gradient inside `caffe train`);
- C step: theta = the kappa largest-magnitude entries of w - lambda/mu (all layers together; the rest 0),
  then lambda <- lambda - mu (w - theta);
- mu grows geometrically, mu_k = mu_0 * a**k. The model is the final theta.
The per-layer pruning rates are not chosen: they emerge from the global budget. Pure numpy.
"""

from __future__ import annotations

import numpy as np


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
