"""The accuracy budget (`--max-drop`): the smallest plan whose decoded model stays within a top-1 drop.

The search's objective eps(theta) - lambda * c_i(theta) is the Lagrangian of "minimise the size subject
to a bound on the summed search error": lambda is the multiplier. Each evaluation the search logged is an
(error, benefit) point whatever lambda the search ran with, so every lambda picks, per layer, the logged
point with the lowest objective. As lambda grows from 0 the picks only move to larger benefits, so the
distinct plans form a path ordered from the largest model to the smallest (`lagrangian_path`).

The budget is then a bisection over that path in log size (`next_candidate`): a round fine-tunes one plan
in Caffe, decodes it and measures its top-1 drop on held-out validation data; a plan that meets the
budget moves the bisection towards smaller plans, one that misses it towards larger ones. Where the path
leaves a wide gap between two neighbours, the plan halfway between them is tried too. A round meets the budget when
its validation drop plus `se_margin` standard errors of that drop (paired over the same images,
`paired_drop`) is at most the budget, so that the result also holds on data it was not chosen on.
Pure numpy: no Caffe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np

from clipq.plan import LayerPlan, rounded_rate
from clipq.search.gp import Evaluation


@dataclass(frozen=True)
class PathPlan:
    """One plan of the path: the chosen evaluation per layer and the lambda interval that picks it."""

    index: int
    lam_low: float
    lam_high: float  # math.inf for the last plan
    picks: dict[str, Evaluation]

    @property
    def plan(self) -> dict[str, LayerPlan]:
        return {name: LayerPlan(e.p, e.bits) for name, e in self.picks.items()}

    @property
    def benefit(self) -> float:
        """The share of the net's float32 bits the plan saves, by the search's (exact) size accounting."""
        return sum(e.benefit for e in self.picks.values())


def _picks(errors: np.ndarray, benefits: np.ndarray, lams: np.ndarray) -> np.ndarray:
    """Index of the lowest objective for every lambda; among equals the larger model (smaller benefit), then
    the earliest, as `gp.best`."""
    objectives = errors[None, :] - lams[:, None] * benefits[None, :]
    tied = objectives == objectives.min(axis=1, keepdims=True)
    return np.argmin(np.where(tied, benefits[None, :], np.inf), axis=1)


def _transitions(errors: np.ndarray, benefits: np.ndarray) -> np.ndarray:
    """Every lambda > 0 at which two points of a layer have equal objectives."""
    de = errors[:, None] - errors[None, :]
    db = benefits[:, None] - benefits[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = de / db
    return lam[(db > 0) & (lam > 0) & np.isfinite(lam)]


def lagrangian_path(histories: dict[str, list[Evaluation]]) -> list[PathPlan]:
    """The distinct plans picked as lambda goes from 0 to infinity, largest model first."""
    arrays = {name: (np.array([e.error for e in h]), np.array([e.benefit for e in h]))
              for name, h in histories.items()}
    cuts = np.unique(np.concatenate([_transitions(*a) for a in arrays.values()] + [np.zeros(0)]))
    # lambda 0 itself (the least error, the largest model among equals: where top-1 cannot rank the points,
    # the path starts at the largest of them), then one lambda inside every interval between consecutive
    # transitions (picks are constant there)
    bounds = np.concatenate([[0.0, 0.0], cuts, [math.inf]])
    probes = np.where(np.isinf(bounds[1:]), 2 * bounds[:-1] + 1, (bounds[:-1] + bounds[1:]) / 2)
    choice = np.stack([_picks(*arrays[name], probes) for name in histories], axis=1)
    path: list[PathPlan] = []
    for row, low, high in zip(choice, bounds[:-1], bounds[1:]):
        picks = {name: histories[name][i] for name, i in zip(histories, row)}
        if path and all(path[-1].picks[n] is picks[n] for n in histories):
            path[-1] = PathPlan(path[-1].index, path[-1].lam_low, float(high), path[-1].picks)
        else:
            path.append(PathPlan(len(path), float(low), float(high), picks))
    return path


def index_for_lambda(path: list[PathPlan], lam: float) -> int:
    """The path's plan that `lam` picks."""
    return next(p.index for p in path if p.lam_low <= lam < p.lam_high)


@dataclass(frozen=True)
class Drop:
    """Top-1 drop of a model against the baseline on the same images, in points, with its standard error."""

    points: float
    se: float

    def upper(self, se_margin: float) -> float:
        return self.points + se_margin * self.se


def paired_drop(baseline_correct: np.ndarray, model_correct: np.ndarray) -> Drop:
    """Baseline top-1 minus the model's, in points, and the standard error of that paired difference."""
    base = np.asarray(baseline_correct, dtype=float)
    model = np.asarray(model_correct, dtype=float)
    if base.shape != model.shape or base.size == 0:
        raise ValueError(f"per-image results differ in shape: {base.shape} vs {model.shape}")
    diff = base - model
    se = diff.std(ddof=1) / math.sqrt(diff.size) if diff.size > 1 else 0.0
    return Drop(100.0 * float(diff.mean()), 100.0 * float(se))


def seen_warning(baseline: dict) -> str:
    return (f"the baseline scores {100 * baseline['val']['accuracy']:.2f}% on the {baseline['val']['images']:,} "
            f"validation images and {100 * baseline['train_sample']['accuracy']:.2f}% on as many training images: "
            "it looks trained on the validation images too; their drop then counts what compression makes it "
            "forget, and the budget keeps a larger model than images it never saw would need. Hold out images "
            "the baseline never saw for --val.")


def validation_looks_seen(baseline: dict) -> bool:
    """Whether the baseline scores about as well on the validation images as on training images (less than two
    standard errors of the difference apart): as if it had been trained on them too (say, a zoo model trained
    on the same images). Its validation drop then counts what compression makes it forget as damage, so the
    budget keeps larger models than images it never saw would ask for."""
    val, train = baseline.get("val"), baseline.get("train_sample")
    if not val or not train:
        return False
    se = math.sqrt(sum(s["accuracy"] * (1 - s["accuracy"]) / s["images"] for s in (val, train)))
    return train["accuracy"] - val["accuracy"] <= 2 * se  # <=: both at 100% (se 0) is the plainest case


def meets(drop: Drop, max_drop: float, se_margin: float) -> bool:
    return drop.upper(se_margin) <= max_drop


def relative_sizes(path: list[PathPlan]) -> list[float]:
    """Each plan's size as a share of the float32 net, by the search's (exact) size accounting."""
    return [max(1.0 - entry.benefit, 1e-12) for entry in path]


def bracket(length: int, results: dict[int, bool]) -> tuple[int, int]:
    """(low, high): the smallest model known to meet the budget (-1: none) and the largest smaller one known
    to miss it (`length`: none). Results need not be monotone: the bracket is taken above the best success."""
    low = max((i for i, ok in results.items() if ok), default=-1)
    high = min((i for i, ok in results.items() if not ok and i > low), default=length)
    return low, high


def next_index(sizes: list[float], results: dict[int, bool]) -> int | None:
    """The next index to try given the plans' sizes (decreasing) and {index: met the budget}, or None when
    no untried plan is left inside the bracket.

    The next plan is the one nearest the bracket's geometric middle in size, so that every round halves the
    log-size range whatever the path's density (its small end holds many plans of nearly equal size).
    """
    low, high = bracket(len(sizes), results)
    candidates = range(low + 1, high)
    if not candidates:
        return None
    log_size = np.log(sizes)
    large = log_size[low] if low >= 0 else log_size[candidates[0]]
    small = log_size[high] if high < len(sizes) else log_size[candidates[-1]]
    middle = (large + small) / 2
    return min(candidates, key=lambda i: (abs(log_size[i] - middle), i))


@dataclass(frozen=True)
class Candidate:
    """A plan the budget may fine-tune: one of the path's, or one interpolated between two neighbours."""

    plan: dict[str, LayerPlan]
    size: float   # share of the float32 size (the search's accounting; a geometric mean if interpolated)
    origin: str   # where it comes from, for the report

    @property
    def key(self) -> tuple:
        return tuple((name, rounded_rate(lp.p), lp.bits) for name, lp in sorted(self.plan.items()))


BACKOFF = LayerPlan(0.0, 8)  # a backed-off layer: nothing pruned, 8-bit linear levels (near the float32 layer)


def backoff_candidates(first: PathPlan, size: Callable[[dict[str, LayerPlan]], float]) -> list[Candidate]:
    """Plans larger than the lambda path's first, largest first: its layers backed off to BACKOFF one after the
    other, the one whose pick the search measured worst first, until every layer is; `size` is a plan's share
    of the float32 size. With them some plan meets any budget the (nearly) uncompressed net meets."""
    order = sorted(first.picks, key=lambda name: (-first.picks[name].error, name))
    plan, plans = first.plan, []
    for count, name in enumerate(order, 1):
        plan = {**plan, name: BACKOFF}
        plans.append((plan, f"back-off {count}/{len(order)}: {', '.join(order[:count])} at p 0, b 8"))
    return [Candidate(plan, size(plan), origin) for plan, origin in reversed(plans)]


def path_candidates(path: list[PathPlan]) -> list[Candidate]:
    return [Candidate(entry.plan, size, f"lambda path {entry.index + 1}/{len(path)}")
            for entry, size in zip(path, relative_sizes(path))]


def interpolate(larger: Candidate, smaller: Candidate) -> Candidate | None:
    """The plan halfway between two plans: every layer that differs keeps the geometric mean of their kept
    shares (1 - p) and the mean of their bit widths. None when that equals one of the two."""
    plan = {}
    for name, a in larger.plan.items():
        b = smaller.plan[name]
        kept = math.sqrt((1 - a.p) * (1 - b.p))
        plan[name] = a if a == b else LayerPlan(rounded_rate(1 - kept), int(math.floor((a.bits + b.bits) / 2 + 0.5)))
    middle = Candidate(plan, math.sqrt(larger.size * smaller.size), "between two neighbours of the path")
    return None if middle.key in (larger.key, smaller.key) else middle


def densified(candidates: list[Candidate], ratio: float = 1.5, rounds: int = 4) -> list[Candidate]:
    """The candidates with plans interpolated between neighbours whose sizes differ by more than `ratio`
    (again between the new neighbours, up to `rounds` times): operating points where the path has gaps."""
    out = list(candidates)
    for _ in range(rounds):
        filled = [out[0]] if out else []
        for larger, smaller in zip(out, out[1:]):
            middle = interpolate(larger, smaller) if larger.size > ratio * smaller.size else None
            filled += [middle, smaller] if middle is not None else [smaller]
        if len(filled) == len(out):
            break
        out = filled
    return out


REFINE_RATIO = 1.1  # a closed bracket wider than this in size still gets the plan between its ends
RETRY_RATIO = 1.25  # a bracket narrower than this first retries its missed end from the smallest model that met


def next_candidate(candidates: list[Candidate], met: dict[tuple, bool],
                   refine_ratio: float = REFINE_RATIO) -> int | None:
    """The position of the next plan to fine-tune in `candidates` (which it may extend), or None when done.

    Bisects the candidates in log size. Where the bracket's ends (the smallest plan that met, the largest
    smaller one that missed) are more than `refine_ratio` apart but no candidate lies in the middle half of
    the bracket (the path's plans bunch up at its ends, or there are none), the plan halfway between the ends
    is inserted and tried: the search's evaluations are sparse where the error rises steeply, and the
    fine-tuning decides, not the search.
    """
    results = {i: met[c.key] for i, c in enumerate(candidates) if c.key in met}
    index = next_index([c.size for c in candidates], results)
    low, high = bracket(len(candidates), results)
    if low < 0 or high >= len(candidates) or candidates[low].size < refine_ratio * candidates[high].size:
        return index
    ends = np.log([candidates[low].size, candidates[high].size])
    if index is not None and abs(math.log(candidates[index].size) - ends.mean()) <= (ends[0] - ends[1]) / 4:
        return index  # a candidate in the middle half of the bracket (in log size)
    middle = interpolate(candidates[low], candidates[high])
    if middle is None or middle.key in met:
        return index
    position = next(i for i in range(low + 1, high + 1) if i == high or candidates[i].size < middle.size)
    candidates.insert(position, middle)
    return position


def closing_miss(candidates: list[Candidate], met: dict[tuple, bool]) -> int | None:
    """The position of the plan that closes the bracket from below (the largest plan smaller than the smallest
    that met, and known to miss), or None. A plan missed when fine-tuned from a larger model may meet when
    fine-tuned again from the smallest model that met: the caller retries it once from there."""
    results = {i: met[c.key] for i, c in enumerate(candidates) if c.key in met}
    low, high = bracket(len(candidates), results)
    return high if low >= 0 and high < len(candidates) else None


@dataclass
class Rounds:
    """Which plan each round of the budget fine-tunes: the bisection of `candidates` (`next_candidate`); the
    `backoff` plans join it when even the largest candidate missed. A plan missed when fine-tuned from a larger
    model may meet when fine-tuned from the smallest model that met: once the bracket is narrower than
    RETRY_RATIO (or closed), its missed end is tried again from there, once per start."""

    candidates: list[Candidate]
    backoff: list[Candidate] = field(default_factory=list)
    met: dict[tuple, bool] = field(default_factory=dict)
    started: dict[tuple, Hashable] = field(default_factory=dict)  # the start of each plan's last fine-tuning

    def next(self, start: Hashable) -> tuple[Candidate, str] | None:
        """(the plan to fine-tune from `start`, where it comes from), or None when the rounds are done."""
        retry = self.retry(start)
        again = retry is not None and self.bracket_ratio() < RETRY_RATIO
        index = retry if again else next_candidate(self.candidates, self.met)
        if index is None and self.backoff and not any(self.met.values()):
            self.candidates, self.backoff = self.backoff + self.candidates, []
            index = next_candidate(self.candidates, self.met)
        if index is None:
            index, again = self.retry(start), True
            if index is None:
                return None
        if again:
            del self.met[self.candidates[index].key]
        candidate = self.candidates[index]
        self.started[candidate.key] = start
        return candidate, candidate.origin + (", again from a smaller model" if again else "")

    def bracket_ratio(self) -> float:
        """Size of the smallest plan that met over that of the largest smaller one that missed (inf: none)."""
        low, high = bracket(len(self.candidates), {i: self.met[c.key] for i, c in enumerate(self.candidates)
                                                   if c.key in self.met})
        if low < 0 or high >= len(self.candidates):
            return math.inf
        return self.candidates[low].size / self.candidates[high].size

    def retry(self, start: Hashable) -> int | None:
        """The bracket's missed end, if it was fine-tuned from another start than `start`."""
        index = closing_miss(self.candidates, self.met)
        return None if index is None or self.started[self.candidates[index].key] == start else index

    def record(self, candidate: Candidate, met: bool) -> None:
        self.met[candidate.key] = met
