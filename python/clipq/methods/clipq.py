"""CLIP-Q (section 3) as a method: one fine-tuning phase of ClipQ layers at the plan's (p, b), the operator
recomputed every minibatch (optionally with p ramped up over the first part of it: gradual pruning, Zhu &
Gupta's schedule p_t = p (1 - (1 - t / T)^3), which the every-minibatch recomputation makes natural); its
uniform variant (one (p, b) for every layer) and its sequential ablation
(prune with CLIP-Q's clip mask, retrain, then quantize with CLIP-Q's intervals), for `clipq compare`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clipq.methods.base import (
    Blobs,
    LayerRole,
    Method,
    OperatingPoint,
    Phase,
    Plan,
    PruneThenShare,
    Stored,
    Trial,
    own,
    plan_label,
    single,
)
from clipq.methods.registry import METHODS
from clipq.plan import LayerPlan
from clipq.quant import prune_quant


def ramped_rate(p: float, passes: int, ramp: int) -> float:
    """Zhu & Gupta's gradual pruning: p (1 - (1 - t/T)^3) after t of T ramp passes, p from then on."""
    done = min(passes / ramp, 1.0) if ramp else 1.0
    return p * (1.0 - (1.0 - done) ** 3)


@METHODS.register
@dataclass
class ClipQ(Method):
    """CLIP-Q: one phase of ClipQ layers at the plan's (p, b). In `clipq compare` it runs at the plans of the
    search's lambda path nearest the target rates (the baselines are placed at their sizes)."""

    NAME = "clipq"
    LABEL = "CLIP-Q (searched)"
    LAYER_KINDS = ("ClipQ",)

    plan: Plan = field(default_factory=dict)
    ramp: int = 0  # training passes over which each layer's p ramps up to its value (0: the plan's p from the start)

    def layers(self):
        return list(self.plan)

    def phases(self):
        options = {"ramp": self.ramp} if self.ramp else {}
        roles = {n: LayerRole("ClipQ", {"p": float(lp.p), "bits": int(lp.bits), **options},
                              state_blobs=1 if self.ramp else 0) for n, lp in self.plan.items()}

        def with_counter(blobs: Blobs) -> Blobs:  # the ramp's pass count starts at 0
            return {n: own(b, self.bias[n]) + [np.zeros(1, np.float32)] for n, b in blobs.items()}

        return [Phase("finetune", 1.0, roles, with_counter if self.ramp else None)]

    def export(self, blobs):
        out = {}
        for n, lp in self.plan.items():
            q = prune_quant.clip_quantize(blobs[n][0], lp.p, lp.bits)
            out[n] = Stored(q.codes, q.codebook, lp.bits)
        return out

    @classmethod
    def operating_points(cls, place):
        return [single(f"CLIP-Q point {i}", f"{place.rate(p):.0f}x plan: {plan_label(p)}",
                       lambda p=p: cls(cls.NAME, {"plan": plan_label(p)}, plan=p))
                for i, p in enumerate(place.clipq_plans, 1)]


@METHODS.register
@dataclass
class UniformClipQ(ClipQ):
    """CLIP-Q with one (p, b) for every layer: b the kept-weighted mean of CLIP-Q's plan (then b - 1 and b + 1 as
    further trials), p chosen by size."""

    NAME = "uniform"
    LABEL = "CLIP-Q, uniform (p, b)"

    @classmethod
    def operating_points(cls, place):
        points = []
        for slot, tag, target, plan in place.targets():
            kept = {n: np.size(place.weights[n]) * (1 - lp.p) for n, lp in plan.items()}
            mean_bits = round(sum(kept[n] * lp.bits for n, lp in plan.items()) / sum(kept.values()))
            trials = [cls.at_size(place, target, tag, bits)
                      for bits in dict.fromkeys(min(max(b, 2), 8) for b in (mean_bits, mean_bits - 1, mean_bits + 1))]
            points.append(OperatingPoint(slot, tuple(trials)))
        return points

    @classmethod
    def at_size(cls, place, target: float, tag: str, bits: int) -> Trial:
        """One (p, b) for every layer at `bits`, p bisected to the target size."""
        p = 1 - place.bisect(lambda k: {n: LayerPlan(min(1 - k, 0.9999), bits) for n in place.layers},
                             target, 1e-4, 1.0)
        uniform = {n: LayerPlan(round(min(p, 0.9999), 4), bits) for n in place.layers}
        return Trial(f"{tag}: p {p:.3f}, b {bits}", lambda u=uniform: cls(cls.NAME, {"plan": plan_label(u)}, plan=u))


@METHODS.register
@dataclass
class Sequential(PruneThenShare):
    """The sequential ablation: CLIP-Q's clip mask, retraining, then CLIP-Q's linear intervals at the same
    (p, b); in `clipq compare` at CLIP-Q's plans themselves."""

    NAME = "sequential"
    LABEL = "prune, then quantize"

    def mask(self, name, w, p):
        return prune_quant.clip_quantize(w, p, self.plan[name].bits).mask

    def share(self, name, w, mask):
        q = prune_quant.quantize_kept(w, mask, self.plan[name].bits)
        return q.codes, q.codebook

    @classmethod
    def operating_points(cls, place):
        return [single(slot, f"{tag}: CLIP-Q's plan", lambda p=plan: cls(cls.NAME, {"plan": plan_label(p)}, plan=p))
                for slot, tag, _, plan in place.targets()]
