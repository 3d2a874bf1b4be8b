"""The pieces every method's size knob uses: the bisection, kept-fraction plans, published settings."""

from __future__ import annotations

import pytest

from clipq.methods import base
from clipq.plan import LayerPlan
from clipq.util.errors import ClipqError


def test_bisect_finds_the_knob_whose_size_is_nearest_the_target():
    knob = base.bisect(lambda k: {"a": LayerPlan(k, 4)}, lambda plan: 100 + 1000 * plan["a"].p, 600, 0.0, 0.99)
    assert abs(knob - 0.5) < 1e-6


def test_kept_plan_and_scaling_clip_to_valid_rates():
    plan = base.kept_plan(base.scaled({"a": 0.5, "b": 0.1}, 3.0), {"a": 4, "b": 6})
    assert plan["a"] == LayerPlan(0.0, 4) and plan["b"].bits == 6 and plan["b"].p == pytest.approx(0.7)
    assert base.kept_plan({"a": 0.0}, 8)["a"].p == 0.9999


def place(net: str, layers: dict) -> base.Placement:
    plan = {name: LayerPlan(0.5, 4) for name in layers}
    return base.Placement(net, layers, [plan], 1, lambda p: 100, 1000, 10, 0)


def test_published_settings_are_used_for_their_net_and_the_fallback_for_others():
    published = {"LeNet": {"a": 0.1, "b": 0.2}}
    assert base.published(place("LeNet", {"a": 0, "b": 0}), published, {"a": 1, "b": 1}) == {"a": 0.1, "b": 0.2}
    assert base.published(place("Other", {"x": 0}), published, {"x": 0.5}) == {"x": 0.5}


def test_published_settings_for_other_layers_are_refused_naming_the_net():
    with pytest.raises(ClipqError, match="published settings for LeNet name layers"):
        base.published(place("LeNet", {"conv1": 0}), {"LeNet": {"a": 0.1}}, {})


def test_the_targets_are_clipqs_smallest_points_numbered_as_in_its_table():
    plans = [{"a": LayerPlan(p, 4)} for p in (0.1, 0.5, 0.9)]
    sizes = {0.1: 900, 0.5: 500, 0.9: 100}
    where = base.Placement("n", {"a": 0}, plans, 2, lambda plan: sizes[plan["a"].p], 1000, 10, 0)
    assert [(slot, tag, size) for slot, tag, size, _ in where.targets()] == [
        ("size of CLIP-Q point 2", "at 2x", 500), ("size of CLIP-Q point 3", "at 10x", 100)]
