"""The GP-EI core of the search (CLIP-Q section 3.2): settings, one evaluation, the objective, GPyOpt's
suggestions. Pure: no Caffe, no files.

For each layer i, minimise  eps(theta) - lambda * c_i(theta)  over theta = (p, b), where eps is the top-1
error in percent on a subset with layer i pruned-quantized and c_i the layer's share of the net's bits saved
by compressing it (`subset_eval`). Error in percent is what makes the paper's lambda (40 AlexNet, 5
GoogLeNet, 10 ResNet-50) give its tables: with error as a fraction, any lambda of that size would favour
maximal compression everywhere.

Domain: p in [0, p_max] (continuous); b continuous in [0.5, 8.5] and rounded to the nearest integer (so
every bit width 1..8 owns an equal share of the axis), the "b before rounding" of the paper's Fig. 3. The
first `initial` points of a layer are drawn at random, the rest are GPyOpt's EI suggestions from all points
so far.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from clipq.quant.partition import MAX_BITS

B_DOMAIN = (0.5, MAX_BITS + 0.5)


@dataclass(frozen=True)
class SearchSettings:
    """What changes the search's result (a resumed log must have been made with the same)."""

    lam: float = 10.0
    iterations: int = 50
    initial: int = 5
    subset: int = 5000
    seed: int = 0
    p_max: float = 0.99
    metric: str = "error"  # what eps measures (`subset_eval.METRICS`): error, loss or kl


@dataclass(frozen=True)
class Evaluation:
    iteration: int
    p: float
    b_raw: float   # GPyOpt's continuous b, before rounding
    bits: int
    error: float   # the search metric on the subset: top-1 error in percent, or 100 x the loss / KL
    benefit: float  # c_i
    objective: float
    seconds: float


METRIC_LABELS = {"error": "error %", "loss": "100 x loss", "kl": "100 x KL (nats)"}


def objective(error: float, benefit: float, lam: float) -> float:
    """Eq. 1 of the paper: eps(theta) - lambda * c_i(theta)."""
    return error - lam * benefit


def round_bits(b_raw: float) -> int:
    """Nearest bit width in 1..8 (half up)."""
    return int(min(max(math.floor(b_raw + 0.5), 1), MAX_BITS))


def _rng(settings: SearchSettings, layer_index: int, iteration: int) -> np.random.Generator:
    return np.random.default_rng([settings.seed, layer_index, iteration])


def suggest_batch(history: list[Evaluation], settings: SearchSettings, layer_index: int,
                  size: int) -> list[tuple[float, float]]:
    """The next `size` (p, b_raw) to evaluate (fewer if the initial design or the layer's iterations end
    sooner): random for the initial design, then GP-EI; a batch of several uses GPyOpt's local penalization.
    Size 1 gives the same points as evaluating one at a time."""
    iteration = len(history)
    size = max(1, min(size, settings.iterations - iteration))
    if iteration < settings.initial:  # each initial point has its own generator: batching keeps the same points
        return [_random_point(settings, _rng(settings, layer_index, i))
                for i in range(iteration, min(iteration + size, settings.initial))]
    rng = _rng(settings, layer_index, iteration)
    os.environ.setdefault("MPLBACKEND", "Agg")  # GPyOpt imports pylab
    import GPyOpt  # lazy: GPyOpt (with GPy and matplotlib) takes two seconds to import

    domain = [{"name": "p", "type": "continuous", "domain": (0.0, settings.p_max)},
              {"name": "b", "type": "continuous", "domain": B_DOMAIN}]
    X = np.array([[e.p, e.b_raw] for e in history])
    Y = np.array([[e.objective] for e in history])
    batch = {} if size == 1 else {"evaluator_type": "local_penalization", "batch_size": size}
    if batch:
        _patch_gpyopt_local_penalization()
    np.random.seed(int(rng.integers(2 ** 31)))  # GPyOpt draws from numpy's global generator
    with threadpool_limits(1):  # tiny matrices: threads cost more than they save (measured 5x slower)
        bo = GPyOpt.methods.BayesianOptimization(f=None, domain=domain, X=X, Y=Y, acquisition_type="EI",
                                                 normalize_Y=True, exact_feval=False, optimize_restarts=1,
                                                 verbosity=False, **batch)
        points = bo.suggest_next_locations()
    return [(float(np.clip(p, 0.0, settings.p_max)), float(np.clip(b_raw, *B_DOMAIN))) for p, b_raw in points]


def _random_point(settings: SearchSettings, rng: np.random.Generator) -> tuple[float, float]:
    return float(rng.uniform(0, settings.p_max)), float(rng.uniform(*B_DOMAIN))


def _patch_gpyopt_local_penalization() -> None:
    """GPyOpt 1.2.6's batch mode with current scipy (1.17): `estimate_L` reads `res.fun[0][0]`, but L-BFGS-B's
    `res.fun` is now a plain float (TypeError). Replace it by the same estimate with that one expression
    made tolerant (`np.atleast_2d(res.fun)[0][0]`); site-packages stay untouched."""
    import scipy.optimize  # lazy: only the batch mode needs it
    from GPyOpt.core.evaluators import batch_local_penalization as lp  # lazy: as GPyOpt above

    if getattr(lp.estimate_L, "clipq_patched", False):
        return

    def estimate_L(model, bounds, storehistory=True):
        def df(x, model, x0):
            dmdx, _ = model.predictive_gradients(np.atleast_2d(x))
            return -np.sqrt((dmdx * dmdx).sum(1))  # minus the norm of the mean's gradient

        samples = np.vstack([lp.samples_multidimensional_uniform(bounds, 500), model.X])
        x0 = samples[np.argmin(df(samples, model, 0))]
        res = scipy.optimize.minimize(df, x0, method="L-BFGS-B", bounds=bounds, args=(model, x0),
                                      options={"maxiter": 200})
        L = -np.atleast_2d(res.fun)[0][0]
        return 10 if L < 1e-7 else L  # as GPyOpt: a flat model

    estimate_L.clipq_patched = True
    lp.estimate_L = estimate_L


def best(history: list[Evaluation]) -> Evaluation:
    """The evaluation with the lowest objective; among equals the larger model (smaller benefit), then the
    earliest."""
    return min(history, key=lambda e: (e.objective, e.benefit, e.iteration))
