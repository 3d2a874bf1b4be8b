"""The accuracy budget's pure parts: the Lagrangian path of logged evaluations, the bisection over it,
and the paired drop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clipq.plan import LayerPlan
from clipq.search import budget, gp
from clipq.search.gp import Evaluation


def history(seed: int, n: int = 40) -> list[Evaluation]:
    """Evaluations shaped like a real layer's: error rises with p and with fewer bits, benefit too."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, bits = float(rng.uniform(0, 0.99)), int(rng.integers(1, 9))
        benefit = 0.5 * p + 0.02 * (8 - bits)
        error = 10 + 30 * p ** 4 + 0.2 * (8 - bits) ** 2 + float(rng.normal(0, 0.2))
        out.append(Evaluation(i, p, float(bits), bits, error, benefit, error - 10 * benefit, 0.1))
    return out


HISTORIES = {"conv1": history(0), "ip1": history(1), "ip2": history(2)}


def test_path_goes_from_the_largest_to_the_smallest_model():
    path = budget.lagrangian_path(HISTORIES)
    benefits = [entry.benefit for entry in path]
    assert len(path) > 5
    assert all(a < b for a, b in zip(benefits, benefits[1:]))
    assert path[0].lam_low == 0 and path[-1].lam_high == math.inf
    assert all(a.lam_high == b.lam_low for a, b in zip(path, path[1:]))
    assert [entry.index for entry in path] == list(range(len(path)))


@pytest.mark.parametrize("lam", [0.5, 3.0, 10.0, 42.0, 250.0, 1e5])
def test_every_lambda_picks_what_the_search_would_pick_at_that_lambda(lam):
    path = budget.lagrangian_path(HISTORIES)
    entry = path[budget.index_for_lambda(path, lam)]
    for name, h in HISTORIES.items():
        rescored = [Evaluation(**{**e.__dict__, "objective": gp.objective(e.error, e.benefit, lam)}) for e in h]
        assert entry.picks[name].iteration == gp.best(rescored).iteration


def test_a_single_point_per_layer_is_a_path_of_one_plan():
    path = budget.lagrangian_path({name: h[:1] for name, h in HISTORIES.items()})
    assert len(path) == 1 and path[0].plan["ip1"].p == HISTORIES["ip1"][0].p


def bisect(sizes: list[float], meets, rounds: int) -> list[int]:
    results, tried = {}, []
    for _ in range(rounds):
        index = budget.next_index(sizes, results)
        if index is None:
            break
        tried.append(index)
        results[index] = meets(index)
    return tried


GEOMETRIC = list(np.geomspace(1.0, 0.001, 40))  # sizes falling evenly in log scale


def test_bisection_finds_the_boundary_when_every_model_up_to_it_meets_the_budget():
    tried = bisect(GEOMETRIC, lambda i: i <= 26, rounds=10)
    assert max(i for i in tried if i <= 26) == 26 and 27 in tried
    assert len(tried) <= math.ceil(math.log2(41)) + 1


def test_bisection_stops_at_the_largest_model_when_nothing_meets_the_budget():
    tried = bisect(GEOMETRIC[:16], lambda i: False, rounds=10)
    assert tried[0] == 7 and tried[-1] == 0 and len(tried) <= 5


def test_bisection_halves_the_log_size_range_not_the_plan_count():
    # 10 plans from 20% to 1% of the size, then 30 plans crowded between 1% and 0.9%
    sizes = list(np.geomspace(0.2, 0.01, 10)) + list(np.linspace(0.0099, 0.009, 30))
    first = budget.next_index(sizes, {})
    assert first == 5  # sqrt(0.2 * 0.009) = 4.2%, not plan 20 of 40
    assert budget.next_index(sizes, {first: False}) == 2


def test_a_bracket_is_kept_when_results_are_not_monotone():
    assert budget.next_index(GEOMETRIC[:10], {3: True, 4: False}) is None
    assert budget.next_index(GEOMETRIC[:20], {5: False, 10: True}) in (14, 15)


def test_paired_drop_and_its_standard_error():
    base = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 1], bool)
    model = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], bool)
    drop = budget.paired_drop(base, model)
    diff = base.astype(float) - model
    assert drop.points == pytest.approx(10.0)
    assert drop.se == pytest.approx(100 * diff.std(ddof=1) / math.sqrt(10))
    assert budget.meets(drop, 10.0, 0) and not budget.meets(drop, 10.0, 1)
    assert budget.paired_drop(base, base).se == 0
    with pytest.raises(ValueError, match="differ in shape"):
        budget.paired_drop(base, model[:5])


def candidate(ip1: tuple[float, int], size: float) -> budget.Candidate:
    return budget.Candidate({"conv1": LayerPlan(0.1, 4), "ip1": LayerPlan(*ip1)}, size, "test")


def test_the_plan_between_two_neighbours_interpolates_only_the_layers_that_differ():
    middle = budget.interpolate(candidate((0.952, 6), 0.0226), candidate((0.987, 3), 0.009))
    assert middle.plan["conv1"] == LayerPlan(0.1, 4)
    assert middle.plan["ip1"] == LayerPlan(round(1 - math.sqrt(0.048 * 0.013), 4), 5)
    assert middle.size == pytest.approx(math.sqrt(0.0226 * 0.009))
    assert budget.interpolate(candidate((0.5, 3), 0.1), candidate((0.5, 3), 0.1)) is None


def test_the_plan_between_two_rates_near_1_stays_below_1():
    middle = budget.interpolate(candidate((0.9998, 2), 0.002), candidate((0.99999, 2), 0.001))
    ip1 = middle.plan["ip1"]
    assert ip1.p == pytest.approx(1 - math.sqrt(0.0002 * 0.00001), abs=1e-12) and ip1.p < 1  # 0.999955...


def test_a_wide_gap_in_a_closed_bracket_is_filled_by_the_plan_between():
    candidates = [candidate((0.8, 6), 0.08), candidate((0.952, 6), 0.0226), candidate((0.987, 3), 0.009)]
    met = {candidates[0].key: True, candidates[1].key: True, candidates[2].key: False}
    assert budget.next_candidate(candidates, met) == 2
    assert len(candidates) == 4 and 0.009 < candidates[2].size < 0.0226
    met[candidates[2].key] = False
    assert budget.next_candidate(candidates, met) == 2  # again between 1 and the new miss
    close = [candidate((0.95, 6), 0.0226), candidate((0.955, 6), 0.0218)]
    assert budget.next_candidate(close, {close[0].key: True, close[1].key: False}) is None  # < 1.1x apart


def test_the_closing_miss_is_the_missed_plan_just_below_the_smallest_that_met():
    candidates = [candidate((0.8, 6), 0.08), candidate((0.95, 6), 0.0226), candidate((0.955, 6), 0.0218),
                  candidate((0.99, 2), 0.005)]
    met = {candidates[0].key: True, candidates[1].key: True, candidates[2].key: False, candidates[3].key: False}
    assert budget.next_candidate(candidates, met) is None and budget.closing_miss(candidates, met) == 2
    assert budget.closing_miss(candidates, {candidates[1].key: False}) is None  # nothing met: no bracket
    assert budget.closing_miss(candidates, {candidates[3].key: True}) is None  # the smallest met: none below


def test_densified_fills_gaps_between_far_apart_neighbours_only():
    from clipq.search.budget import Candidate, densified

    big = Candidate({"a": LayerPlan(0.5, 4)}, 0.2, "path")
    close = Candidate({"a": LayerPlan(0.55, 4)}, 0.18, "path")
    small = Candidate({"a": LayerPlan(0.99, 2)}, 0.01, "path")
    out = densified([big, close, small], ratio=1.5)
    assert out[:2] == [big, close] and out[-1] == small
    sizes = [c.size for c in out]
    assert max(a / b for a, b in zip(sizes, sizes[1:])) <= 1.5
    assert sizes == sorted(sizes, reverse=True)


def evaluation(i: int, error: float, benefit: float, p: float = 0.5, bits: int = 4) -> Evaluation:
    return Evaluation(i, p, float(bits), bits, error, benefit, error - benefit, 0.1)


def test_where_top1_cannot_rank_the_points_the_path_starts_at_the_largest_of_the_least_error():
    flat = [evaluation(0, 0.0, 0.5, p=0.9, bits=2), evaluation(1, 0.0, 0.1, p=0.2, bits=8),
            evaluation(2, 0.0, 0.3, p=0.6, bits=4), evaluation(3, 2.0, 0.6, p=0.95, bits=1)]
    path = budget.lagrangian_path({"ip1": flat})
    assert [entry.picks["ip1"].iteration for entry in path] == [1, 0, 3]  # then the cheapest at equal error
    assert gp.best([evaluation(0, 1.0, 0.5), evaluation(1, 0.7, 0.2)]).iteration == 1  # equal objectives


def test_back_off_plans_release_the_worst_measured_layer_first_up_to_every_layer():
    first = budget.PathPlan(0, 0.0, 1.0, {"conv1": evaluation(0, 0.5, 0.1, p=0.3, bits=5),
                                          "ip1": evaluation(1, 3.0, 0.6, p=0.95, bits=2),
                                          "ip2": evaluation(2, 1.0, 0.1, p=0.8, bits=3)})
    candidates = budget.backoff_candidates(first, lambda plan: sum(lp.bits for lp in plan.values()) / 100)
    assert [c.origin.split(":")[0] for c in candidates] == ["back-off 3/3", "back-off 2/3", "back-off 1/3"]
    assert all(lp == budget.BACKOFF for lp in candidates[0].plan.values())  # the largest: every layer released
    assert candidates[-1].plan == {**first.plan, "ip1": budget.BACKOFF}  # ip1 measured worst: released first
    assert candidates[1].plan["conv1"] == first.plan["conv1"] and candidates[1].plan["ip2"] == budget.BACKOFF
    assert [c.size for c in candidates] == sorted((c.size for c in candidates), reverse=True)


def test_rounds_retry_the_missed_end_of_a_closed_bracket_once_from_the_smallest_model_that_met():
    candidates = [candidate((0.5 + 0.1 * i, 4), 0.1 / 2 ** i) for i in range(5)]  # 10% .. 0.625%, 2x apart

    def meets(c: budget.Candidate, start: float) -> bool:  # a closer start tolerates a smaller plan
        return c.size >= (0.02 if start == 1.0 else start / 1.6)

    schedule, start, tried = budget.Rounds(list(candidates)), 1.0, []
    while (picked := schedule.next(start)) is not None:
        chosen, origin = picked
        assert (chosen.key, start) not in tried  # never the same plan from the same start twice
        tried.append((chosen.key, start))
        met = meets(chosen, start)
        schedule.record(chosen, met)
        if met:
            start = min(start, chosen.size)
        assert len(tried) < 30
    again = [key for key, _ in tried if sum(k == key for k, _ in tried) > 1]
    assert again and start < 0.02  # some missed plan met when tried again from closer: below the base's reach


def test_rounds_take_the_back_off_plans_when_even_the_largest_plan_misses():
    candidates = [candidate((0.9, 3), 0.05), candidate((0.99, 2), 0.01)]
    backoff = [candidate((0.0, 8), 0.3), candidate((0.5, 8), 0.15)]
    schedule = budget.Rounds(list(candidates), list(backoff))
    origins = []
    while (picked := schedule.next("baseline")) is not None:
        chosen, _ = picked
        origins.append(chosen.size)
        schedule.record(chosen, chosen.size >= 0.15)
    assert 0.15 in origins and all(size != 0.3 or 0.15 in origins for size in origins)
    assert schedule.met[backoff[1].key] and not schedule.met[candidates[0].key]


def test_plans_bunched_at_the_ends_of_a_bracket_give_way_to_the_plan_halfway_between():
    candidates = [candidate((0.9357, 2), 0.0221), candidate((0.94, 2), 0.0216), candidate((0.9715, 3), 0.0151),
                  candidate((0.975, 3), 0.0147)]
    met = {candidates[0].key: True, candidates[3].key: False}
    index = budget.next_candidate(candidates, met)
    assert len(candidates) == 5 and candidates[index].origin == "between two neighbours of the path"
    assert candidates[index].size == pytest.approx(math.sqrt(0.0221 * 0.0147))
    assert [c.size for c in candidates] == sorted((c.size for c in candidates), reverse=True)
    inside = [candidate((0.9357, 2), 0.0221), candidate((0.955, 2), 0.018), candidate((0.975, 3), 0.0147)]
    assert budget.next_candidate(inside, {inside[0].key: True, inside[2].key: False}) == 1  # in the middle half


def test_validation_looks_seen_when_the_baseline_scores_as_well_on_it_as_on_training_images():
    def scores(val: float, train: float) -> dict:
        return {"val": {"accuracy": val, "images": 500}, "train_sample": {"accuracy": train, "images": 500}}

    assert budget.validation_looks_seen(scores(0.996, 0.998))  # a zoo model trained on the same images
    assert budget.validation_looks_seen(scores(1.0, 1.0))  # no error anywhere: no spread to compare against
    assert not budget.validation_looks_seen(scores(0.904, 0.940))  # 3.6 points apart: held out
    assert not budget.validation_looks_seen({"val": {"accuracy": 0.9, "images": 500}})  # nothing to compare
    assert "99.60% on the 500 validation images" in budget.seen_warning(scores(0.996, 0.998))


def test_a_narrow_bracket_retries_its_missed_end_before_refining_between():
    candidates = [candidate((0.9, 3), 0.04), candidate((0.95, 3), 0.0226), candidate((0.96, 3), 0.020)]
    schedule = budget.Rounds(list(candidates))
    first, _ = schedule.next("baseline")
    schedule.record(first, True)
    second, _ = schedule.next("baseline")  # not yet narrow: bisect
    schedule.record(second, second.size > 0.021)
    assert schedule.bracket_ratio() == pytest.approx(0.0226 / 0.020)
    third, origin = schedule.next("round 2")  # 1.13x apart, and the miss began elsewhere: retry it first
    assert third.key == candidates[2].key and origin.endswith("again from a smaller model")
