"""Compression methods as units: CLIP-Q and the paper's baselines, each a list of fine-tuning phases
(the Caffe layer each compressed layer becomes, and how the phase's starting blobs are made from the
previous ones) and an export to codes + codebook for the `.clipq` codec.

| method                | phases (fraction of the fine-tuning iterations)                        | stored  |
|-----------------------|-------------------------------------------------------------------------|---------|
| ClipQ                 | finetune (1): ClipQ layers, (p, b) per layer                            | b bits  |
| PruneThenShare: DC    | prune (1/2): Masked, magnitude mask; share (1/2): Shared, k-means       | b bits  |
| PruneThenShare: seq.  | prune (1/2): Masked, CLIP-Q's clip mask; share (1/2): CLIP-Q's intervals | b bits  |
| Surgery (DNS)         | surgery (1): Surgery layers, mask T spliced / pruned during training    | 8 bits  |
| LearningCompression   | L0..L(K-1) (1/K each): LC layers; a C step before each and at the end   | 8 bits  |

Blobs flow one way: plain caffemodel -> prepare(phase 1) -> `caffe train` -> prepare(phase 2) -> ... ->
export. A phase's `prepare` sees every compressed layer at once (LC's budget is over the whole net).
Methods that do not quantize (DNS, LC) are stored at 8 bits (CLIP-Q's linear intervals with p = 0:
only the zeros they pruned are dropped), so their bytes compare with the others'. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from clipq import deep_compression, lc_prune, prune_quant, surgery
from clipq.convert import LayerRole
from clipq.plan import LayerPlan

Blobs = dict[str, list[np.ndarray]]   # compressed layers' blobs by layer name: [weights-ish, bias?, state...]
STORE_BITS = 8                         # how methods that do not quantize are stored


@dataclass(frozen=True)
class Stored:
    """One layer as the codec stores it: codes (0 = zero) into a codebook of 2**bits - 1 levels."""

    codes: np.ndarray
    codebook: np.ndarray
    bits: int

    @property
    def weights(self) -> np.ndarray:
        return deep_compression.shared(self.codes, self.codebook)


@dataclass(frozen=True)
class Phase:
    name: str
    share: float                              # fraction of the fine-tuning iterations
    roles: dict[str, LayerRole]
    prepare: Callable[[Blobs], Blobs] | None  # starting blobs from the previous phase's (or plain) blobs;
                                              # None: start from those weights as they are


def own(blobs: list[np.ndarray], bias: bool) -> list[np.ndarray]:
    """The weights and (if the layer has one) the bias: the blobs every phase carries on."""
    return list(blobs[:2] if bias else blobs[:1])


def stored_at(weights: np.ndarray, bits: int = STORE_BITS) -> Stored:
    """Weights whose zeros are the pruning, stored at `bits` (linear levels; nothing more is pruned)."""
    q = prune_quant.clip_quantize(weights, 0.0, bits)
    return Stored(q.codes, q.codebook, bits)


@dataclass
class Method:
    """A compression method at one operating point. `bias`: which layers have a bias blob."""

    name: str
    settings: dict
    bias: dict[str, bool] = field(default_factory=dict)

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def export(self, blobs: Blobs) -> dict[str, Stored]:
        raise NotImplementedError

    def layers(self) -> list[str]:
        raise NotImplementedError


@dataclass
class ClipQ(Method):
    """CLIP-Q (section 3): one phase of ClipQ layers at the plan's (p, b)."""

    plan: dict[str, LayerPlan] = field(default_factory=dict)

    def layers(self):
        return list(self.plan)

    def phases(self):
        roles = {n: LayerRole("ClipQ", {"p": float(lp.p), "bits": int(lp.bits)}) for n, lp in self.plan.items()}
        return [Phase("finetune", 1.0, roles, None)]

    def export(self, blobs):
        out = {}
        for n, lp in self.plan.items():
            q = prune_quant.clip_quantize(blobs[n][0], lp.p, lp.bits)
            out[n] = Stored(q.codes, q.codebook, lp.bits)
        return out


@dataclass
class PruneThenShare(Method):
    """Prune with a fixed mask and retrain, then share weights and fine-tune the codebook (summed
    gradients): Deep Compression (magnitude mask, k-means) or the sequential ablation of CLIP-Q (CLIP-Q's
    clip mask and linear intervals at the searched (p, b))."""

    plan: dict[str, LayerPlan] = field(default_factory=dict)   # p = 1 - kept fraction, b = bits
    rule: str = "deep-compression"                             # or "sequential"

    def layers(self):
        return list(self.plan)

    def mask(self, name: str, w: np.ndarray) -> np.ndarray:
        lp = self.plan[name]
        if self.rule == "sequential":
            return prune_quant.clip_quantize(w, lp.p, lp.bits).mask
        return deep_compression.magnitude_mask(w, 1.0 - lp.p)

    def share(self, name: str, w: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bits = self.plan[name].bits
        if self.rule == "sequential":
            q = prune_quant.quantize_kept(w, mask, bits)
            return q.codes, q.codebook
        return deep_compression.share_weights(w, mask, bits)

    def phases(self):
        masked = {n: LayerRole("Masked", state_blobs=1) for n in self.plan}
        shared = {n: LayerRole("Shared", {"bits": self.plan[n].bits}, state_blobs=1) for n in self.plan}

        def prune(blobs: Blobs) -> Blobs:
            return {n: own(b, self.bias[n]) + [self.mask(n, b[0]).astype(np.float32)] for n, b in blobs.items()}

        def share(blobs: Blobs) -> Blobs:
            out = {}
            for n, b in blobs.items():
                codes, codebook = self.share(n, b[0], b[-1] > 0)
                out[n] = [codebook.astype(np.float32)] + own(b, self.bias[n])[1:] + [codes.astype(np.float32)]
            return out

        return [Phase("prune", 0.5, masked, prune), Phase("share", 0.5, shared, share)]

    def export(self, blobs):
        return {n: Stored(blobs[n][-1].astype(np.uint8), blobs[n][0].astype(np.float32), self.plan[n].bits)
                for n in self.plan}


@dataclass
class Surgery(Method):
    """Dynamic Network Surgery: c_rate per layer; surgery until `iter_stop` (an iteration of its phase)."""

    c_rates: dict[str, float] = field(default_factory=dict)
    iter_stop: int = 0
    seed: int = 0

    def layers(self):
        return list(self.c_rates)

    def phases(self):
        roles = {n: LayerRole("Surgery", {"c_rate": float(c), "iter_stop": int(self.iter_stop),
                                          "gamma": surgery.GAMMA, "power": surgery.POWER, "seed": self.seed + i},
                              state_blobs=2) for i, (n, c) in enumerate(self.c_rates.items())}

        def start(blobs: Blobs) -> Blobs:
            out = {}
            for n, b in blobs.items():
                mu, sigma = surgery.magnitude_statistics(b[0])
                out[n] = own(b, self.bias[n]) + [np.ones(b[0].shape, np.float32),
                                                 np.array([0, mu, sigma], np.float32)]
            return out

        return [Phase("surgery", 1.0, roles, start)]

    def export(self, blobs):
        return {n: stored_at(blobs[n][0] * blobs[n][-2]) for n in self.c_rates}


@dataclass
class LearningCompression(Method):
    """LC pruning with a budget of kappa non-zero weights over `names`: `steps` L steps, mu_k = mu0 a^k."""

    names: list[str] = field(default_factory=list)
    kappa: int = 0
    steps: int = 5
    mu0: float = 1e-3
    growth: float = 2.0

    def layers(self):
        return list(self.names)

    def mu(self, step: int) -> float:
        return lc_prune.mu_at(step, self.mu0, self.growth)

    def phases(self):
        def first(blobs: Blobs) -> Blobs:  # direct compression: theta = top-kappa of w, lambda = 0
            theta = lc_prune.top_kappa({n: b[0] for n, b in blobs.items()}, self.kappa)
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
        return lc_prune.c_step({n: b[0] for n, b in blobs.items()}, {n: b[-1] for n, b in blobs.items()},
                               self.mu(step), self.kappa)

    def export(self, blobs):
        theta, _ = self.c_step(blobs, self.steps - 1)
        return {n: stored_at(theta[n]) for n in self.names}
