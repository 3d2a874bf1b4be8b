"""The method registry: one class per name, in registration order, and what the rest of clipq derives from it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from clipq.methods import METHODS
from clipq.methods.base import Method
from clipq.methods.registry import Registry


@dataclass
class Toy(Method):
    NAME = "toy"
    LABEL = "a toy"
    LAYER_KINDS = ("ClipQ", "Toy")


def test_a_second_method_with_a_taken_name_is_refused():
    registry = Registry()
    registry.register(Toy)

    @dataclass
    class Other(Toy):
        pass

    with pytest.raises(ValueError, match="'toy' is taken by Toy"):
        registry.register(Other)


def test_a_method_without_a_name_is_refused():
    @dataclass
    class Nameless(Method):
        pass

    with pytest.raises(ValueError, match="needs a NAME"):
        Registry().register(Nameless)


def test_layer_kinds_are_listed_once_in_registration_order():
    registry = Registry()
    registry.register(Toy)
    assert registry.names() == ("toy",) and registry.labels() == {"toy": "a toy"}
    assert registry.layer_kinds() == ("ClipQ", "Toy") and "toy" in registry and registry["toy"] is Toy


def test_clipqs_methods_are_registered_in_the_order_compare_runs_them():
    assert METHODS.names() == ("clipq", "uniform", "sequential", "deep-compression", "dns", "lc",
                              "lc-quantized")
    assert all(METHODS[name].NAME == name and METHODS[name].LABEL for name in METHODS.names())
