"""Learning-Compression pruning, constraint form (Carreira-Perpinan & Idelbayev, CVPR 2018), and the method
that runs it in Caffe (`LearningCompression`, whose layer kind is LC in layers/clipq_layers.py).

min L(w) s.t. w has at most kappa non-zero weights *over the whole net*, by the augmented Lagrangian:
- L step: SGD on L(w) + mu/2 ||w - theta - lambda/mu||^2, whose extra gradient is mu (w - theta) - lambda
  (the clipq LC layers add it to each weight's gradient inside `caffe train`);
- C step: theta = the kappa largest-magnitude entries of w - lambda/mu (all layers together; the rest 0),
  then lambda <- lambda - mu (w - theta);
- mu grows geometrically, mu_k = mu_0 * a**k. The model is the final theta.
The per-layer pruning rates are not chosen: they emerge from the global budget. With `bits`, the C step also
quantizes each layer's kept weights by k-means to 2**bits - 1 levels (the toolkit's
`ConstraintL0Pruning(kappa, precision)`, its quantizing C step): `LCQuantized`. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from clipq.methods.base import (
    STORE_BITS,
    Blobs,
    LayerRole,
    OperatingPoint,
    Phase,
    Stored,
    Trial,
    Unquantized,
    kept_plan,
    lr_variant,
    own,
    shared,
)
from clipq.methods.deep_compression import share_weights
from clipq.methods.registry import METHODS

# The LC toolkit's LeNet-300-100 pruning schedule (examples/lenet300/lenet300.py): mu_k = 9e-5 * 1.1**k, 40 L steps.
TOOLKIT_MU0, TOOLKIT_GROWTH, TOOLKIT_STEPS = 9e-5, 1.1, 40


@dataclass(frozen=True)
class Schedule:
    """The mu schedule of the L steps: mu_k = mu0 * growth**k for k < steps."""

    mu0: float
    growth: float
    steps: int

    @classmethod
    def spanning(cls, first: float, last: float, steps: int) -> Schedule:
        """`steps` geometric steps from mu `first` to mu `last`."""
        return cls(first, (last / first) ** (1 / (steps - 1)) if steps > 1 else 1.0, steps)

    def mus(self) -> list[float]:
        return [mu_at(k, self.mu0, self.growth) for k in range(self.steps)]

    def label(self) -> str:
        return f"{self.steps} L steps, mu {self.mu0:.2g} x {self.growth:.3g}^k"


TOOLKIT = Schedule(TOOLKIT_MU0, TOOLKIT_GROWTH, TOOLKIT_STEPS)


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


def c_step(weights: dict[str, np.ndarray], lams: dict[str, np.ndarray], mu: float, kappa: int,
           compress: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(theta, updated lambda) from the L step's weights; theta = compress(w - lambda / mu), by default the
    top-kappa projection."""
    shifted = {n: np.asarray(weights[n], np.float64) - lams[n] / mu for n in weights}
    theta = compress(shifted) if compress is not None else top_kappa(shifted, kappa)
    new_lams = {n: (lams[n] - mu * (np.asarray(weights[n], np.float64) - theta[n])).astype(np.float32)
                for n in weights}
    return {n: t.astype(np.float32) for n, t in theta.items()}, new_lams


def global_kept(blobs: dict[str, np.ndarray], kappa: int) -> dict[str, float]:
    """Per-layer kept fractions of the kappa largest |w| over all layers (LC's budget, at its start)."""
    flat = np.sort(np.concatenate([np.abs(b).ravel() for b in blobs.values()]))[::-1]
    t = flat[max(kappa - 1, 0)]
    return {n: float(np.mean(np.abs(b) >= t)) for n, b in blobs.items()}


# `clipq compare`'s trials (equal-iteration budget), in order: (mu schedule, base_lr factor). mu has to end high
# enough that w ends near theta within the budget (a first schedule ending at mu 0.8 left w far from theta and
# its projection lost 20+ points), and the learning rate high enough that the weights can rearrange before mu
# bites: the toolkit trains at lr 0.1, 100x the LeNet fine-tuning solvers' 0.001, and lr x mu must stay small
# for SGD with momentum to stay stable. Measured on LeNet-300-100 at ~59x (seed 1, validation drop after 2,500
# iterations): mu 1e-3 .. 30 at the solver's lr +10.5 points, at 4x the lr +7.3; mu 1e-3 .. 10 at 10x +5.7;
# mu 1e-3 .. 3 and 1e-3 .. 10 at 30x +5.3 and +5.2; mu 1e-3 .. 1 at 100x +7.8; the toolkit's own range
# (9e-5 .. 3.7e-3 in 20 steps, made for 800 epochs) +45 at the solver's lr and +13.8 at the toolkit's.
SCHEDULES = (Schedule.spanning(1e-3, 30.0, 15), Schedule.spanning(1e-3, 10.0, 15), Schedule.spanning(1e-3, 3.0, 15),
             Schedule.spanning(TOOLKIT_MU0, TOOLKIT.mus()[-1], 20))
TRIALS = ((SCHEDULES[0], 1.0), (SCHEDULES[1], 30.0), (SCHEDULES[2], 30.0), (SCHEDULES[3], 100.0))


@METHODS.register
@dataclass
class LearningCompression(Unquantized):
    """LC pruning with a budget of kappa non-zero weights over `names`: `steps` L steps, mu_k = mu0 a^k. In
    `clipq compare` it runs at CLIP-Q's sizes with the global kappa chosen by size, its trials TRIALS."""

    NAME = "lc"
    LABEL = "LC pruning"
    LAYER_KINDS = ("LC",)

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
        def first(blobs: Blobs) -> Blobs:  # direct compression: theta = C(w), lambda = 0
            theta = self.compress({n: b[0] for n, b in blobs.items()})
            return {n: own(b, self.bias[n]) + [theta[n], np.zeros(b[0].shape, np.float32)] for n, b in blobs.items()}

        def after(step: int) -> Callable[[Blobs], Blobs]:
            def c_step(blobs: Blobs) -> Blobs:
                theta, lams = self.c_step(blobs, step - 1)
                return {n: own(b, self.bias[n]) + [theta[n], lams[n]] for n, b in blobs.items()}
            return c_step

        return [Phase(f"L{k}", 1.0 / self.steps,
                      {n: LayerRole("LC", {"mu": self.mu(k)}, state_blobs=2) for n in self.names},
                      first if k == 0 else after(k)) for k in range(self.steps)]

    def compress(self, vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The C step's projection: the kappa largest magnitudes over the net."""
        return top_kappa(vectors, self.kappa)

    def c_step(self, blobs: Blobs, step: int) -> tuple[dict, dict]:
        """The C step after L step `step` (its mu): theta and the updated multipliers."""
        return c_step({n: b[0] for n, b in blobs.items()}, {n: b[-1] for n, b in blobs.items()},
                      self.mu(step), self.kappa, self.compress)

    def pruned_weights(self, blobs):
        """The final C step's theta (the model)."""
        theta, _ = self.c_step(blobs, self.steps - 1)
        return theta

    @classmethod
    def stored_bits(cls, options: dict) -> int:
        """Bits the sizes are placed at: the codec's 8 for pruning alone."""
        return STORE_BITS

    @classmethod
    def operating_points(cls, place):
        options = place.options.get(cls.NAME, {})
        n_all = sum(np.size(w) for w in place.weights.values())
        points = []
        for slot, tag, target, _ in place.targets():
            trials = []
            for extra, lr in cls.trial_settings():
                settings = {**extra, **options}
                bits = cls.stored_bits(settings)
                kappa = round(place.bisect(lambda k: kept_plan(global_kept(place.weights, max(1, round(k))), bits),
                                           target, 1, n_all))
                lc = dict(kappa=kappa, **settings)
                schedule = Schedule(lc["mu0"], lc["growth"], lc["steps"])
                bits_label = f", {bits} bits" if "bits" in lc else ""
                trial = Trial(f"{tag}: kappa {kappa:,} ({100 * kappa / n_all:.2f}%){bits_label}, {schedule.label()}",
                              lambda lc=lc: cls(cls.NAME, lc, names=place.layers, **lc))
                trials.append(trial if lr == 1.0 else lr_variant(trial, lr))
            points.append(OperatingPoint(slot, tuple(trials)))
        return points

    @classmethod
    def trial_settings(cls) -> list[tuple[dict, float]]:
        """(settings, base_lr factor) of each trial `clipq compare` runs, in order."""
        return [({"steps": s.steps, "mu0": s.mu0, "growth": s.growth}, lr) for s, lr in TRIALS]


def quantized_top_kappa(vectors: dict[str, np.ndarray], kappa: int, bits: int) -> dict[str, np.ndarray]:
    """The quantizing C step: top-kappa over the net, then each layer's kept values by k-means to 2**bits - 1
    levels (Deep Compression's linear-initialised Lloyd)."""
    return {n: shared_values(t, bits) for n, t in top_kappa(vectors, kappa).items()}


def shared_values(theta: np.ndarray, bits: int) -> np.ndarray:
    """A layer's kept values on their k-means levels (zeros stay zero)."""
    return shared(*share_weights(theta, theta != 0, bits))


@METHODS.register
@dataclass
class LCQuantized(LearningCompression):
    """LC pruning whose C step also quantizes (the toolkit's `ConstraintL0Pruning` with a precision): the
    budget of kappa non-zero weights over the net, each layer's kept weights on 2**bits - 1 k-means levels.
    In `clipq compare` its trials are LC's first two trials' schedules at 5 and 4 bits."""

    NAME = "lc-quantized"
    LABEL = "LC pruning + quantization"
    QUANTIZES = True

    bits: int = 5

    def compress(self, vectors):
        return quantized_top_kappa(vectors, self.kappa, self.bits)

    def export(self, blobs):
        return {n: self.stored(theta) for n, theta in self.pruned_weights(blobs).items()}

    def stored(self, theta: np.ndarray) -> Stored:
        codes, codebook = share_weights(theta, theta != 0, self.bits)
        return Stored(codes, codebook, self.bits)

    @classmethod
    def stored_bits(cls, options):
        return options["bits"]

    @classmethod
    def trial_settings(cls):
        first, fast = SCHEDULES[:2]
        return [({"steps": s.steps, "mu0": s.mu0, "growth": s.growth, "bits": b}, lr)
                for s, b, lr in ((first, 5, 1.0), (first, 4, 1.0), (fast, 4, 30.0), (fast, 5, 30.0))]
