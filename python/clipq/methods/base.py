"""What a compression method is: fine-tuning phases (the Caffe layer each compressed layer becomes, and how
a phase's starting blobs are made from the previous ones), an export to codes + codebook for the `.clipq`
codec, and a size knob that places it at a given size for `clipq compare`.

Blobs flow one way: plain caffemodel -> prepare(phase 1) -> `caffe train` -> prepare(phase 2) -> ... ->
export. A phase's `prepare` sees every compressed layer at once (LC's budget is over the whole net).
Methods that do not quantize (DNS, LC) are stored at 8 bits (CLIP-Q's linear intervals with p = 0: only
the zeros they pruned are dropped), so their bytes compare with the others'. Pure numpy: a method never
imports Caffe; its Caffe layer lives in layers/clipq_layers.py, named by the method's LAYER_KINDS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np

from clipq.plan import LayerPlan
from clipq.quant import prune_quant
from clipq.util.errors import ClipqError

Blobs = dict[str, list[np.ndarray]]   # compressed layers' blobs by layer name: [weights-ish, bias?, state...]
Plan = dict[str, LayerPlan]
STORE_BITS = 8                         # how methods that do not quantize are stored


def shared(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """The weights a codebook and codes stand for (0 where the code is 0)."""
    table = np.concatenate([[0.0], np.asarray(codebook, np.float32)]).astype(np.float32)
    return table[np.asarray(codes).astype(np.int64)]


@dataclass(frozen=True)
class Stored:
    """One layer as the codec stores it: codes (0 = zero) into a codebook of 2**bits - 1 levels."""

    codes: np.ndarray
    codebook: np.ndarray
    bits: int

    @property
    def weights(self) -> np.ndarray:
        return shared(self.codes, self.codebook)


@dataclass(frozen=True)
class LayerRole:
    """How a compression method runs one layer in Caffe: the kind of Python layer (class "<kind><type>" in
    layers/clipq_layers.py), the options written into its param_str, and how many state blobs (masks,
    codes, ...) follow the layer's own blobs; state blobs get `param { lr_mult: 0 decay_mult: 0 }` so the
    solver never changes them, and they live in snapshots and caffemodels like weights (so they survive
    `--snapshot` resume)."""

    kind: str
    options: dict = field(default_factory=dict)
    state_blobs: int = 0


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


# --- placing a method at a size (clipq compare) ------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """What a method needs to place its operating points at the sizes of CLIP-Q's points (`clipq compare`)."""

    net: str                          # the prototxt's `name:` (published settings are looked up by it)
    weights: dict[str, np.ndarray]    # the compressed layers' baseline weights, in net order
    clipq_plans: list[Plan]           # CLIP-Q's operating points, largest model first
    matched: int                      # the baselines run at the sizes of this many of CLIP-Q's smallest points
    size_of: Callable[[Plan], int]    # bytes of the `.clipq` file a plan gives on the baseline weights
    original: int                     # float32 bytes of the net's weights and biases
    iterations: int                   # fine-tuning iterations every method gets
    seed: int
    options: dict[str, dict] = field(default_factory=dict)  # per method name: its knobs (e.g. LC's steps)
    error_of: Callable[[dict[str, np.ndarray]], float] | None = None  # top-1 error (%) on held-out images with
                                      # these layers' weights replaced, no fine-tuning (free: a sensitivity scan)

    @property
    def layers(self) -> list[str]:
        return list(self.weights)

    def rate(self, plan: Plan) -> float:
        return self.original / self.size_of(plan)

    def targets(self) -> list[tuple[str, str, int, Plan]]:
        """(slot, tag, bytes, CLIP-Q's plan) of the sizes the baselines are placed at, largest first."""
        numbered = list(enumerate(self.clipq_plans, 1))[-self.matched:]
        return [(f"size of CLIP-Q point {number}", f"at {self.original / self.size_of(plan):.0f}x",
                 self.size_of(plan), plan) for number, plan in numbered]

    def bisect(self, plan_for: Callable[[float], Plan], target_bytes: float, low: float, high: float) -> float:
        """The knob whose plan's size is nearest `target_bytes` (see `bisect`)."""
        return bisect(plan_for, self.size_of, target_bytes, low, high)


def bisect(plan_for: Callable[[float], Plan], size_of: Callable[[Plan], int], target_bytes: float,
           low: float, high: float, steps: int = 30) -> float:
    """The knob in [low, high] whose plan's size is nearest `target_bytes` (size grows with the knob)."""
    for _ in range(steps):
        mid = (low + high) / 2
        if size_of(plan_for(mid)) > target_bytes:
            high = mid
        else:
            low = mid
    return min((low, high), key=lambda k: abs(math.log(size_of(plan_for(k)) / target_bytes)))


def kept_plan(keep: dict[str, float], bits: dict[str, int] | int) -> Plan:
    """A (p, b) plan from kept fractions (p = 1 - keep, at most 0.9999)."""
    return {n: LayerPlan(float(min(max(1.0 - k, 0.0), 0.9999)), bits if isinstance(bits, int) else bits[n])
            for n, k in keep.items()}


def scaled(keep: dict[str, float], factor: float) -> dict[str, float]:
    return {n: min(1.0, k * factor) for n, k in keep.items()}


def published(place: Placement, settings: dict[str, dict], fallback: dict) -> dict:
    """A method's published per-layer settings for this net (by its `name:`), else `fallback` (e.g. from
    CLIP-Q's smallest plan); an error if they name other layers than the net's."""
    shape = settings.get(place.net) or fallback
    if set(shape) != set(place.layers):
        raise ClipqError(f"published settings for {place.net} name layers {sorted(shape)}; the net has "
                         f"{place.layers}")
    return shape


def plan_label(plan: Plan) -> str:
    return " ".join(f"{n} {lp.p:.2f}/{lp.bits}" for n, lp in plan.items())


@dataclass(frozen=True)
class Trial:
    """One setting of a method to try at an operating point: as the table shows it, and the method at it."""

    label: str
    make: Callable[[], Method]


@dataclass(frozen=True)
class OperatingPoint:
    """One operating point of a method in `clipq compare`: which slot it fills (the same across seeds) and the
    settings the method offers to try there, its best guess first. `clipq compare` fine-tunes an equal number of
    trials for every method (topping a short list up with learning-rate variants, `lr_variant`), keeps the one with
    the smallest validation drop and scores only that one on the test set."""

    slot: str
    trials: tuple[Trial, ...]


def single(slot: str, label: str, make: Callable[[], Method]) -> OperatingPoint:
    """An operating point with one setting of the method's own (compare tunes its learning rate)."""
    return OperatingPoint(slot, (Trial(label, make),))


def with_lr(method: Method, factor: float) -> Method:
    """The method with its fine-tuning learning rate multiplied by `factor` (recorded in its settings)."""
    method.lr *= factor
    method.settings = {**method.settings, "lr": method.lr}
    return method


def lr_variant(trial: Trial, factor: float) -> Trial:
    """The trial with the solver's base_lr multiplied by `factor`."""
    return Trial(f"{trial.label}, lr x{factor:g}", lambda: with_lr(trial.make(), factor))


# --- the method --------------------------------------------------------------------------------------

@dataclass
class Method:
    """A compression method at one operating point. `bias`: which layers have a bias blob (set by the
    pipeline from the net). Subclasses name themselves (NAME, LABEL), the Caffe layer kinds their phases
    use (LAYER_KINDS) and are registered in `methods.registry`."""

    NAME: ClassVar[str] = ""
    LABEL: ClassVar[str] = ""
    LAYER_KINDS: ClassVar[tuple[str, ...]] = ()
    QUANTIZES: ClassVar[bool] = True   # False: stored at STORE_BITS linear levels (`Unquantized`)

    name: str
    settings: dict
    bias: dict[str, bool] = field(default_factory=dict)
    lr: float = 1.0   # multiplies the solver's base_lr in every phase (a tuning knob of `clipq compare`)

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def export(self, blobs: Blobs) -> dict[str, Stored]:
        raise NotImplementedError

    def layers(self) -> list[str]:
        raise NotImplementedError

    @classmethod
    def operating_points(cls, place: Placement) -> list[OperatingPoint]:
        """The method's runs in `clipq compare`: by default none (a method must say how to size itself)."""
        return []


@dataclass
class Unquantized(Method):
    """A method that prunes but does not quantize: its trained weights are stored at STORE_BITS linear levels per
    layer, or at `store_bits[layer]` (bits chosen after training, `clipq compare`'s "bits after training" rows).
    Subclasses say what the trained weights are (`pruned_weights`)."""

    QUANTIZES = False

    store_bits: dict[str, int] = field(default_factory=dict)

    def pruned_weights(self, blobs: Blobs) -> dict[str, np.ndarray]:
        """The model's weights, float, zeros where pruned, from the trained blobs."""
        raise NotImplementedError

    def export(self, blobs):
        return {n: stored_at(w, self.store_bits.get(n, STORE_BITS)) for n, w in self.pruned_weights(blobs).items()}


@dataclass
class PruneThenShare(Method):
    """Prune with a fixed mask and retrain, then share weights and fine-tune the codebook (summed gradients).
    With `rounds` > 1 the pruning is iterative: round r of R prunes to keep ** (r / R) of each layer's weights
    (the mask only grows sparser) and retrains, the rounds sharing the pruning's half of the iterations.
    Subclasses choose the mask and the sharing."""

    LAYER_KINDS = ("Masked", "Shared")

    plan: Plan = field(default_factory=dict)   # p = 1 - kept fraction, b = bits
    rounds: int = 1

    def layers(self):
        return list(self.plan)

    def mask(self, name: str, w: np.ndarray, p: float) -> np.ndarray:
        """The layer's mask pruning `p` of its weights (pruned weights are 0 in w after the first round)."""
        raise NotImplementedError

    def share(self, name: str, w: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def round_p(self, name: str, round_: int) -> float:
        """The pruning rate of round `round_` (1..rounds): kept fractions in geometric steps down to the plan's."""
        p = self.plan[name].p
        return p if round_ == self.rounds else 1.0 - (1.0 - p) ** (round_ / self.rounds)

    def phases(self):
        masked = {n: LayerRole("Masked", state_blobs=1) for n in self.plan}
        shared = {n: LayerRole("Shared", {"bits": self.plan[n].bits}, state_blobs=1) for n in self.plan}

        def prune(round_: int) -> Callable[[Blobs], Blobs]:
            def prepare(blobs: Blobs) -> Blobs:
                out = {}
                for n, b in blobs.items():
                    w = b[0] * (b[-1] > 0) if round_ > 1 else b[0]  # a pruned weight stays pruned
                    out[n] = own(b, self.bias[n]) + [self.mask(n, w, self.round_p(n, round_)).astype(np.float32)]
                return out
            return prepare

        def share(blobs: Blobs) -> Blobs:
            out = {}
            for n, b in blobs.items():
                codes, codebook = self.share(n, b[0], b[-1] > 0)
                out[n] = [codebook.astype(np.float32)] + own(b, self.bias[n])[1:] + [codes.astype(np.float32)]
            return out

        names = ["prune"] if self.rounds == 1 else [f"prune{r}" for r in range(1, self.rounds + 1)]
        return ([Phase(name, 0.5 / self.rounds, masked, prune(r)) for r, name in enumerate(names, 1)]
                + [Phase("share", 0.5, shared, share)])

    def export(self, blobs):
        return {n: Stored(blobs[n][-1].astype(np.uint8), blobs[n][0].astype(np.float32), self.plan[n].bits)
                for n in self.plan}
